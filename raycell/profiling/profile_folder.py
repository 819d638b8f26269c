"""`raycell profile`: features -> well profiles -> retrieval metrics, written as one output folder.

The folder (built in a staging folder beside the target and swapped in, `raycell.utils.outputs`):

* `profiles.parquet`: the well profiles (CytoTable layout: `Metadata_*`, then the kept features);
* `consensus.parquet`: one median profile per treatment (when `profile.treatment` is set);
* `activity_map.csv`: mAP per treatment against the controls, sorted, with p-values and `retrieved`;
* `consistency_<column>.csv`: mAP per value of each annotation column;
* `retrieval.json`: the headline numbers (fraction retrieved, mean mAP, percent replicating);
* `comparison.csv` / `comparison.md`: with `profile.compare`, one row per feature set and batch
  correction (raw, control-normalised, Harmony) with the same metrics and batch mixing;
* `profile.json`: the manifest (settings, counts, notes); it marks the folder as raycell's.

`raycell evaluate --profiles` scores a profile table as it is (no normalisation), same layout.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from raycell.config import ExperimentConfig, ProfileConfig
from raycell.profiling.retrieval import (
    RetrievalResult,
    RetrievalSettings,
    retrieval,
)
from raycell.profiling.streamed import ParquetInput, source, streamed_table, use_ray
from raycell.profiling.wellprofiles import (
    ProfileError,
    ProfileTable,
    build_profiles,
    consensus,
    control_mask,
    filter_rows,
    prepare,
    read_input,
)

GENERATOR = "raycell.profile"
PROFILES, CONSENSUS, ACTIVITY = "profiles.parquet", "consensus.parquet", "activity_map.csv"
RETRIEVAL = "retrieval.json"
COMPARISON, COMPARISON_MD = "comparison.csv", "comparison.md"


@dataclass
class ProfileSettings(ProfileConfig):
    """Everything `raycell profile` reads: the `profile.*` keys (declared and checked once, in
    `ProfileConfig`) and the run's seed.
    """

    seed: int = 0

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> "ProfileSettings":
        """From an ExperimentConfig (its `profile` section and seed), as the loader checked them."""
        keys = {f.name: getattr(cfg.profile, f.name) for f in fields(ProfileConfig)}
        return cls(**keys, seed=cfg.seed)


def check_settings(s: ProfileSettings) -> None:
    """What `raycell profile` needs beyond valid keys, checked before any data is read."""
    if not s.input:
        raise ProfileError(
            "profile needs an input: --input (profile.input), an embeddings folder "
            "or a parquet/CSV table of per-cell or per-well features"
        )
    if not s.out:
        raise ProfileError("profile needs an output folder: --out (profile.out)")
    if s.metrics and not s.treatment:
        raise ProfileError(
            "profile.metrics needs profile.treatment: the column(s) naming each "
            "well's treatment (e.g. --treatment Metadata_broad_sample), or "
            "--no-metrics"
        )


def retrieval_settings(s: ProfileSettings, t: ProfileTable) -> RetrievalSettings:
    """The copairs pairing rules for table `t` (controls evaluated on its rows)."""
    mask = control_mask(t.frame, s.controls) if s.controls else None
    return RetrievalSettings(
        treatment=list(s.treatment),
        controls_mask=mask,
        annotations=list(s.annotations),
        null_size=s.null_size,
        fdr=s.fdr,
        distance=s.distance,
        consistency_level=s.consistency_level,
        consistency_active_only=s.consistency_active_only,
        seed=s.seed,
    )


def _json_safe(v):
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def consistency_file(column: str) -> str:
    """`consistency_<column>.csv`, the column name made safe for a file name."""
    return f"consistency_{re.sub(r'[^A-Za-z0-9_.-]+', '_', column)}.csv"


def write_folder(
    out: Path,
    t: ProfileTable,
    s: ProfileSettings,
    res: RetrievalResult | None,
    extra: dict | None = None,
    comparison: pd.DataFrame | None = None,
) -> Path:
    """Write the profile folder atomically (staging folder, then swap); returns its path."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raycell.utils.io import atomic_write_json
    from raycell.utils.outputs import PROFILE, PROFILE_JSON, prepare_output, staging_dir, swap_in

    out = prepare_output(
        out,
        [("profile.input", s.input)],
        s.overwrite,
        what="profile.out",
        kind=PROFILE,
        error=ProfileError,
    )
    staged = staging_dir(out, PROFILE)
    try:
        pq.write_table(
            pa.Table.from_pandas(t.frame, preserve_index=False),
            staged / PROFILES,
            compression="zstd",
        )
        files = [PROFILES]
        if s.treatment:
            c = consensus(t, list(s.treatment))
            pq.write_table(
                pa.Table.from_pandas(c.frame, preserve_index=False),
                staged / CONSENSUS,
                compression="zstd",
            )
            files.append(CONSENSUS)
        if res is not None:
            if res.activity is not None:
                res.activity.to_csv(staged / ACTIVITY, index=False)
                files.append(ACTIVITY)
            for col, table in res.consistency.items():
                table.to_csv(staged / consistency_file(col), index=False)
                files.append(consistency_file(col))
            atomic_write_json(staged / RETRIEVAL, _json_safe(res.summary))
            files.append(RETRIEVAL)
        if comparison is not None:
            from raycell.profiling.correction import markdown

            comparison.to_csv(staged / COMPARISON, index=False)
            (staged / COMPARISON_MD).write_text(markdown(comparison) + "\n")
            files += [COMPARISON, COMPARISON_MD]
        manifest = {
            "generator": GENERATOR,
            "input": str(Path(s.input).absolute()),
            "settings": _json_safe(asdict(s)),
            "n_profiles": len(t.frame),
            "n_features": len(t.features),
            "features": t.features,
            "files": files,
            "notes": t.notes + (res.notes if res is not None else []),
            **(extra or {}),
        }
        atomic_write_json(staged / PROFILE_JSON, manifest)
        swap_in(staged, out)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return out


def cell_rows(s: ProfileSettings, feature_set: str, src: ParquetInput | None) -> ProfileTable:
    """The input's rows that `profile.where` keeps; with Ray Data (`profile.engine`; `src` is the
    input `streamed.source` scanned), already one per well, so that a per-cell input larger than
    memory never sits in one process.
    """
    if use_ray(s.engine, src, feature_set):
        return streamed_table(src, feature_set, list(s.strata), s.aggregate, s.where)
    return filter_rows(read_input(s.input, feature_set, s.where), s.where)


def make_profiles(
    s: ProfileSettings, src: ParquetInput | None = None
) -> tuple[ProfileTable, RetrievalResult | None]:
    """Read, build and (with `metrics`) score the profiles, without writing anything.

    `src`: the input as `streamed.source(s.engine, s.input)` scanned it (scanned here when None).
    """
    check_settings(s)
    src = src or source(s.engine, s.input)
    t = build_profiles(
        cell_rows(s, s.features, src),
        list(s.strata),
        s.aggregate,
        s.controls,
        s.normalize,
        list(s.feature_select),
        s.sphere,
        s.plate_column,
    )
    res = retrieval(t, retrieval_settings(s, t)) if s.metrics else None
    return t, res


def profile(s: ProfileSettings) -> dict:
    """`raycell profile`: write the folder; returns its path, counts and retrieval summary."""
    from raycell.utils.outputs import PROFILE, check_output

    check_settings(s)
    check_output(
        s.out, [("profile.input", s.input)], what="profile.out", kind=PROFILE, error=ProfileError
    )
    src = source(s.engine, s.input)  # the input's size is read once, for every feature set
    t, res = make_profiles(s, src)
    comparison = compare(s, src) if s.compare else None
    out = write_folder(Path(s.out), t, s, res, comparison=comparison)
    return {
        "out": str(out),
        "n_profiles": len(t.frame),
        "n_features": len(t.features),
        "retrieval": _json_safe(res.summary) if res is not None else None,
        "notes": t.notes,
    }


def compare(s: ProfileSettings, src: ParquetInput | None) -> pd.DataFrame:
    """`profile.compare`: each feature set x batch correction scored on the same wells."""
    from raycell.profiling.correction import compare_corrections, corrected_versions

    tables = {}
    for fs in s.compare_features or (s.features,):
        t = prepare(cell_rows(s, fs, src), list(s.strata), s.aggregate)
        for name, v in corrected_versions(
            t, s.controls, s.batch_column, s.plate_column, s.compare, s.seed
        ).items():
            tables[f"{fs} / {name}"] = v
    wells = {len(v.frame) for v in tables.values()}
    if len(wells) != 1:  # the morph features may lose wells a NaN made unusable: say so
        raise ProfileError(f"profile.compare: the feature sets give different wells ({wells})")
    first = next(iter(tables.values()))
    return compare_corrections(tables, retrieval_settings(s, first), s.controls, s.batch_column)


def read_profile_table(path: str | os.PathLike) -> ProfileTable:
    """A profile folder's `profiles.parquet`, or any CytoTable-layout table, as it is."""
    p = Path(path)
    if p.is_dir() and (p / PROFILES).is_file():
        p = p / PROFILES
    return read_input(p)


def score_profiles(path: str | os.PathLike, s: ProfileSettings) -> dict:
    """`raycell evaluate --profiles`: retrieval metrics of profiles as they are, into `s.out`."""
    from raycell.profiling.wellprofiles import check_finite

    check_settings(s)
    t = read_profile_table(path)
    check_finite(t, str(path))
    res = retrieval(t, retrieval_settings(s, t))
    s = ProfileSettings(
        **{
            **asdict(s),
            "input": str(path),
            "aggregate": "median",
            "normalize": "none",
            "feature_select": (),
            "sphere": False,
        }
    )
    out = write_folder(Path(s.out), t, s, res, extra={"scored_as_given": True})
    return {"out": str(out), "retrieval": _json_safe(res.summary)}


def summary_lines(summary: dict) -> list[str]:
    """The headline numbers of `retrieval.json` as short lines for the terminal."""
    lines = []
    a = summary.get("activity")
    if a:
        lines.append(
            f"activity: {a['n_retrieved']}/{a['n_treatments']} treatments retrieved "
            f"(fraction {a['fraction_retrieved']:.3f}), mean mAP {a['mean_map']:.4f}"
        )
    for col, c in (summary.get("consistency") or {}).items():
        mm = c["mean_map"]
        lines.append(
            f"consistency {col}: {c['n_retrieved']}/{c['n_values']} values retrieved, "
            f"mean mAP {mm if mm is None else f'{mm:.4f}'}"
        )
    pr = summary.get("percent_replicating")
    if pr is not None:
        lines.append(f"percent replicating: {pr:.3f}")
    return lines


def activity_frame(folder: Path) -> pd.DataFrame | None:
    """A profile folder's activity table, or None."""
    f = Path(folder) / ACTIVITY
    return pd.read_csv(f) if f.is_file() else None
