"""Well profiles the field can compare: aggregated, normalised per plate against controls, selected.

The steps are pycytominer's (`normalize`, `feature_select`, `normalize(method="spherize")`; the
per-well reduction is its `aggregate`'s, in `raycell.formats.wells`, which `raycell embed` shares),
called on a table in the CytoTable layout: `Metadata_*` columns, then one float
column per feature with a compartment prefix (`Cells_`, `Cytoplasm_`, `Nuclei_`). What this module
adds around them is what pycytominer leaves to its caller: reading a `raycell embed` folder or a
parquet/CSV table, refusing bad input with one line (a control query that names no column or
matches no well of a plate, NaN features), dropping features that cannot be normalised (no spread
among a plate's controls: MAD scaling would blow them up to ~1e18), and normalising each plate
separately, which pycytominer's `normalize` does not do by itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from raycell.constants import Aggregation, ProfileFeatures, ProfileNormalization
from raycell.formats.wells import aggregate_rows
from raycell.profiling import profiles as P
from raycell.profiling.table import ProfileError, ProfileTable

TREATMENT_KEY = "Metadata_raycell_treatment"


def _pycytominer():
    """pycytominer, imported without its process-wide side effect.

    Importing it turns on pandas' copy-on-write for the whole process (its preparation for pandas
    3); the rest of raycell, and the user's own code in the same process, keep the pandas
    behaviour they started with.
    """
    import pandas as pd

    cow = pd.options.mode.copy_on_write
    import pycytominer

    pd.options.mode.copy_on_write = cow
    return pycytominer


def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            return pd.read_parquet(path)
        if name.endswith((".csv", ".csv.gz", ".csv.zip", ".csv.bz2", ".csv.xz", ".tsv", ".tsv.gz")):
            return pd.read_csv(path, sep="\t" if ".tsv" in name else ",", low_memory=False)
    except (OSError, ValueError) as exc:
        raise ProfileError(
            f"profile input {path}: cannot read it ({str(exc).splitlines()[0]})"
        ) from None
    raise ProfileError(
        f"profile input {path}: expected an embeddings folder (embeddings.json), a "
        ".parquet or a .csv(.gz) table"
    )


def read_input(
    path: str | Path, feature_set: ProfileFeatures = "embedding", where: str = ""
) -> ProfileTable:
    """Per-cell or per-well features from an embeddings folder or a CytoTable-layout table.

    Args:
        path: a `raycell embed` folder, or a parquet/CSV file whose features carry a compartment
            prefix (`Cells_`, `Cytoplasm_`, `Nuclei_`) and whose metadata columns start with
            `Metadata_`; other columns are left out (and named in the notes).
        feature_set: for an embeddings folder, "embedding" (the deep features), "morph" (the
            hand-made `morph_*` columns, as `Cells_Morph_*`), "all" (both) or "handmade"
            (CellProfiler-style features of its crop data set, `raycell.profiling.handmade`).
            A crop data set folder (dataset.json) gives its hand-made features, or with
            "cpmeasure" CellProfiler's measurements by cp-measure, of the rows `where` selects.
        where: for "cpmeasure", the pandas query of the cells to measure ('' = all); the caller
            filters the other feature sets (`filter_rows`).
    """
    from raycell.profiling.export import morph_feature_name

    path = Path(path)
    if not path.exists():
        raise ProfileError(f"profile input not found: {path}")
    if path.is_dir() and (
        (path / "dataset.json").is_file() or feature_set in ("handmade", "cpmeasure")
    ):
        from raycell.profiling.handmade import cpmeasure_table, handmade_table

        data = path
        if not (path / "dataset.json").is_file():
            data = P.read_manifest(path).get("dataset")
            if not data or not Path(data).is_dir():
                raise ProfileError(
                    f"profile.features={feature_set}: the crop data set of {path} "
                    f"({data or 'not recorded in ' + P.MANIFEST}) is not there"
                )
        if feature_set == "cpmeasure":
            return cpmeasure_table(data, where)
        return handmade_table(data)
    if path.is_dir():
        if not (path / P.MANIFEST).is_file():
            raise ProfileError(
                f"profile input {path} is a folder without {P.MANIFEST}: give a "
                "`raycell embed` folder or a parquet/CSV table"
            )
        meta, X, names = P.read_embeddings(path)
        mcols = P.morph_columns(meta)
        if feature_set != "embedding" and not mcols:
            raise ProfileError(
                f"profile.features={feature_set}: the embeddings in {path} have no morph_* columns"
            )
        metas = meta[
            [
                c
                for c in meta.columns
                if str(c).startswith(P.META_PREFIX) and not P.is_list_column(meta[c])
            ]
        ].reset_index(drop=True)
        parts = [metas]
        feats: list[str] = []
        if feature_set in ("embedding", "all"):
            parts.append(pd.DataFrame(X, columns=names))
            feats += names
        if feature_set in ("morph", "all"):
            m = meta[mcols].apply(pd.to_numeric, errors="coerce").astype(np.float64)
            m.columns = [morph_feature_name(c) for c in mcols]
            parts.append(m.reset_index(drop=True))
            feats += list(m.columns)
        return ProfileTable(pd.concat(parts, axis=1), feats)
    frame = _read_table(path)
    feats = P.feature_columns(frame.columns)
    if not feats:
        raise ProfileError(
            f"profile input {path}: no feature columns (names starting with "
            f"{', '.join(P.FEATURE_PREFIXES)}); columns: "
            f"{', '.join(map(str, frame.columns[:8]))}"
        )
    metas = [c for c in frame.columns if str(c).startswith(P.META_PREFIX)]
    other = [str(c) for c in frame.columns if c not in set(feats) | set(metas)]
    bad = [f for f in feats if not pd.api.types.is_numeric_dtype(frame[f])]
    if bad:
        raise ProfileError(
            f"profile input {path}: feature column {bad[0]!r} is not numeric "
            f"(e.g. {frame[bad[0]].dropna().iloc[0]!r})"
        )
    notes = (
        [
            f"left out {len(other)} column(s) that are neither Metadata_* nor features: "
            f"{', '.join(other[:5])}"
        ]
        if other
        else []
    )
    return ProfileTable(frame[metas + feats].reset_index(drop=True), feats, notes)


def check_finite(t: ProfileTable, where: str) -> None:
    """Refuse NaN or infinite features, naming the first feature, its count and its first row."""
    X = t.matrix()
    bad = ~np.isfinite(X)
    if bad.any():
        j = int(np.flatnonzero(bad.any(axis=0))[0])
        i = int(np.flatnonzero(bad[:, j])[0])
        keys = [c for c in (P.PLATE, P.WELL) if c in t.frame.columns]
        at = ", ".join(f"{k}={t.frame[k].iloc[i]}" for k in keys) or f"row {i}"
        raise ProfileError(
            f"{where}: feature {t.features[j]!r} has {int(bad[:, j].sum())} NaN or "
            f"infinite value(s) (first at {at}); fill or drop that column before "
            "profiling"
        )


def _require(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        meta = [str(c) for c in frame.columns if str(c).startswith(P.META_PREFIX)]
        raise ProfileError(
            f"{what}: no column {missing[0]!r} in the profiles (metadata columns: "
            f"{', '.join(meta[:12])}{' ...' if len(meta) > 12 else ''})"
        )


def aggregate(
    t: ProfileTable, strata: list[str], operation: Aggregation = "median"
) -> ProfileTable:
    """One row per `strata` group (`raycell.formats.wells.aggregate_rows`, the reduction embed shares).

    A table already holding one row per group is returned as it is (its values unchanged), so well
    profiles pass through. `Metadata_Count_Cells` counts the rows of each group.
    """
    _require(t.frame, strata, "profile.strata")
    if not t.frame[strata].astype("string").fillna("").duplicated().any():
        return t
    frame = aggregate_rows(t.frame[t.meta_columns], t.frame[t.features], strata, operation)
    return ProfileTable(
        frame,
        list(t.features),
        t.notes
        + [f"aggregated {len(t.frame)} rows to {len(frame)} by {', '.join(strata)} ({operation})"],
    )


def control_mask(frame: pd.DataFrame, controls: str) -> np.ndarray:
    """Which rows the pandas query `controls` selects; '' selects every row.

    Raises:
        ProfileError: the query names a column the profiles lack, does not parse, or matches no row.
    """
    if not controls:
        return np.ones(len(frame), dtype=bool)
    try:
        hit = frame.query(controls)
    except pd.errors.UndefinedVariableError as exc:
        meta = [str(c) for c in frame.columns if str(c).startswith(P.META_PREFIX)]
        raise ProfileError(
            f"profile.controls {controls!r}: {exc} (metadata columns: {', '.join(meta[:12])})"
        ) from None
    except Exception as exc:  # pandas raises SyntaxError, ValueError, TypeError, KeyError...
        raise ProfileError(
            f"profile.controls {controls!r} is not a pandas query that works on the "
            f"profiles: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    mask = frame.index.isin(hit.index)
    if not mask.any():
        raise ProfileError(
            f"profile.controls {controls!r} matches none of the {len(frame)} "
            "profiles (check the column's values)"
        )
    return mask


def _spread(x: np.ndarray, method: str) -> np.ndarray:
    if method == "standardize":
        return x.std(axis=0)
    med = np.median(x, axis=0)
    return (
        np.median(np.abs(x - med), axis=0)
        if method == "mad_robustize"
        else np.subtract(*np.percentile(x, [75, 25], axis=0))
    )


def normalize_plates(
    t: ProfileTable,
    controls: str = "",
    method: ProfileNormalization = "mad_robustize",
    plate: str = P.PLATE,
) -> ProfileTable:
    """Each plate's features centred and scaled on its control wells (pycytominer's `normalize`).

    Features whose spread among one plate's controls is zero are dropped first (and named in the
    notes): every method divides by that spread.
    """
    pycytominer = _pycytominer()

    if method == "none":
        return t
    frame = t.frame.reset_index(drop=True)
    _require(frame, [plate], "profile.plate_column")
    ctrl = control_mask(frame, controls)
    plates = frame[plate].astype("string").fillna("")
    X = frame[t.features].to_numpy(dtype=np.float64)
    keep = np.ones(len(t.features), dtype=bool)
    for p in plates.unique():
        rows = (plates == p).to_numpy() & ctrl
        if not rows.any():
            raise ProfileError(
                f"profile.controls {controls!r} matches no well of plate "
                f"{plate}={p}: it cannot be normalised against its controls"
            )
        keep &= _spread(X[rows], method) > 0
    if not keep.any():
        raise ProfileError(
            f"every one of the {len(keep)} features has no spread among the "
            "controls "
            f"({controls or 'all wells'}) of some plate: nothing to normalise"
        )
    feats = [f for f, k in zip(t.features, keep) if k]
    notes = list(t.notes)
    if not keep.all():
        dropped = [f for f, k in zip(t.features, keep) if not k]
        notes.append(
            f"dropped {len(dropped)} feature(s) with no spread among a plate's controls: "
            f"{', '.join(dropped[:5])}{' ...' if len(dropped) > 5 else ''}"
        )
    meta = [c for c in frame.columns if c not in set(t.features)]
    parts = []
    for p in plates.unique():
        sub = frame.loc[(plates == p).to_numpy(), meta + feats].copy()
        # pycytominer picks controls by a query string: a column holding the mask already checked
        # above makes that query exact (and names no user column it could misread)
        sub["__ctrl"] = ctrl[(plates == p).to_numpy()]
        out = pycytominer.normalize(
            sub,
            features=feats,
            meta_features=meta + ["__ctrl"],
            samples="__ctrl == True",
            method=method,
            output_file=None,
        )
        parts.append(out.drop(columns="__ctrl"))
    out = pd.concat(parts).loc[frame.index]  # back to the input order
    notes.append(
        f"normalised {len(plates.unique())} plate(s) by {method} against "
        f"{int(ctrl.sum())} control profile(s) ({controls or 'all wells'})"
    )
    return ProfileTable(out.reset_index(drop=True), feats, notes)


def select(t: ProfileTable, operations: list[str]) -> ProfileTable:
    """Select features by pycytominer's `feature_select` `operations` (empty = keep all)."""
    pycytominer = _pycytominer()

    if not operations:
        return t
    out = pycytominer.feature_select(
        t.frame, features=t.features, operation=list(operations), output_file=None
    )
    feats = [f for f in t.features if f in out.columns]
    if not feats:
        raise ProfileError(f"profile.feature_select {list(operations)} removed every feature")
    return ProfileTable(
        out[t.meta_columns + feats].reset_index(drop=True),
        feats,
        t.notes
        + [
            f"feature selection ({', '.join(operations)}) kept "
            f"{len(feats)} of {len(t.features)} features"
        ],
    )


def sphere(t: ProfileTable, controls: str = "") -> ProfileTable:
    """ZCA-cor whitening fitted on the controls over every plate (pycytominer's "spherize")."""
    pycytominer = _pycytominer()

    ctrl = control_mask(t.frame, controls)
    work = t.frame.assign(__ctrl=ctrl)
    out = pycytominer.normalize(
        work,
        features=t.features,
        meta_features=t.meta_columns + ["__ctrl"],
        samples="__ctrl == True",
        method="spherize",
        output_file=None,
    )
    return ProfileTable(
        out.drop(columns="__ctrl").reset_index(drop=True),
        list(t.features),
        t.notes + [f"sphered (ZCA-cor) on {int(ctrl.sum())} control profile(s)"],
    )


def treatment_key(frame: pd.DataFrame, treatment: list[str]) -> pd.Series:
    """One string per row naming its treatment (the columns' values joined with ' | ')."""
    _require(frame, list(treatment), "profile.treatment")
    cols = [frame[c].astype("string").fillna("<NA>") for c in treatment]
    key = cols[0]
    for c in cols[1:]:
        key = key + " | " + c
    return key.astype(str)


def consensus(t: ProfileTable, treatment: list[str]) -> ProfileTable:
    """One profile per treatment: the median of its well profiles (pycytominer's `aggregate`)."""
    key = pd.Series(treatment_key(t.frame, treatment).to_numpy(), name=TREATMENT_KEY)
    frame = pd.concat([t.frame.reset_index(drop=True), key], axis=1)
    out = aggregate(ProfileTable(frame, list(t.features)), [TREATMENT_KEY], "median")
    if len(out.frame) == len(frame):  # one well per treatment: aggregate passed it through
        out = ProfileTable(
            frame.sort_values(TREATMENT_KEY, kind="stable").reset_index(drop=True), list(t.features)
        )
    return ProfileTable(out.frame, out.features, list(t.notes))


def filter_rows(t: ProfileTable, where: str) -> ProfileTable:
    """The rows the pandas query `where` selects ('' = all), e.g. "Metadata_Split == 'unseen'"."""
    if not where:
        return t
    try:
        frame = t.frame.query(where)
    except Exception as exc:  # pandas raises UndefinedVariableError, SyntaxError, ValueError...
        raise ProfileError(
            f"profile.where {where!r} does not work on the profiles: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    if frame.empty:
        raise ProfileError(f"profile.where {where!r} matches none of the {len(t.frame)} rows")
    return ProfileTable(
        frame.reset_index(drop=True),
        list(t.features),
        t.notes + [f"kept {len(frame)} of {len(t.frame)} rows ({where})"],
    )


def prepare(t: ProfileTable, strata: list[str], operation: Aggregation = "median") -> ProfileTable:
    """Aggregate, refuse NaN, drop constant features (all constant: refused)."""
    t = aggregate(t, list(strata), operation)
    check_finite(t, "profiles")
    const = [f for f, s in zip(t.features, np.ptp(t.matrix(), axis=0)) if not s > 0]
    if len(const) == len(t.features):
        raise ProfileError(
            f"every one of the {len(const)} features is constant over the "
            f"{len(t.frame)} profiles: nothing to profile"
        )
    if const:
        t = ProfileTable(
            t.frame.drop(columns=const),
            [f for f in t.features if f not in const],
            t.notes
            + [
                f"dropped {len(const)} constant feature(s): "
                f"{', '.join(const[:5])}{' ...' if len(const) > 5 else ''}"
            ],
        )
    return t


def build_profiles(
    t: ProfileTable,
    strata: list[str],
    operation: Aggregation = "median",
    controls: str = "",
    method: ProfileNormalization = "mad_robustize",
    feature_select: list[str] | tuple = (),
    spherize: bool = False,
    plate: str = P.PLATE,
) -> ProfileTable:
    """Aggregate -> refuse NaN -> normalise per plate -> select features -> (sphere)."""
    t = prepare(t, strata, operation)
    t = normalize_plates(t, controls, method, plate)
    t = select(t, list(feature_select))
    if spherize:
        t = sphere(t, controls)
    check_finite(t, "normalised profiles")
    return t
