"""`raycell ingest`: raw fields of view -> crop shards + rejects table, as a Ray Data pipeline.

`run_ingest` drives the steps, each in its own module:

1. **Plan** (`plan`, no pixels read): files -> fields of view (FOVs) + plate map; files and FOVs
   that cannot be used become rows of the rejects table right away.
2. **Statistics pass** (`stats`, Ray Data, only when needed): illumination functions and
   normalisation ranges, fields at another scale left out.
   **Scale pass** (`plate_diameters`, Ray Data, a few FOVs per plate, only when the diameter is
   estimated): each plate's median diameter, the reference against which the crop pass replaces a
   runaway estimate and rejects an implausible segmentation (`implausible-segmentation`).
3. **Crop pass** (`fov`, Ray Data, one task per few FOVs): each FOV gives exactly one row, its
   crops and metadata or a reject reason.
4. This driver streams the rows into one `ShardWriter` as they arrive. Why the driver and not
   per-task shard files: the writer fills shards to a fixed row count (few, evenly sized files for
   the training reader, not one tiny file per FOV), checks cell ids are unique over the whole data
   set and accumulates the exact per-channel intensity histograms for the manifest. The crops are
   small next to the segmentation work (about 10 KB per cell), so the driver is not the bottleneck
   at the scale of one node; per-task files plus a manifest merge would be the next step for a large
   cluster. It then writes the rejects table, the summary and the manifest.

Re-runs: everything is written into a staging folder `<out>.partial-XXXXXXXX` and swapped into place
only when complete, so a killed run leaves the previous data set intact, and a re-run starts from
scratch without duplicates. `ingest.out` must be new, empty or a raycell data set, and apart from
the inputs (`raycell.utils.outputs`): nothing raycell did not write is ever deleted.
When `out` already holds a data set made from the same files with the same parameters, the run is
skipped; when the inputs or parameters differ, `ingest.overwrite=true` is required.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from raycell import constants as K
from raycell.ingest import images as imio
from raycell.ingest.fov import crop_batch, scale_batch
from raycell.ingest.plan import check_out, check_params, plan_ingest
from raycell.ingest.sources import IngestError, reject_row
from raycell.ingest.stats import compute_stats
from raycell.ingest.tasks import fov_dataset, map_fovs

REJECTS = "rejects.parquet"
SUMMARY = "ingest_summary.json"


def _existing(out: Path, p: dict, fingerprint: str) -> dict | None:
    """Summary of an identical earlier run in `out` (to skip), else None; raise on a clash."""
    from raycell.utils.io import read_json

    if not (out / K.MANIFEST).is_file():
        return None
    m = read_json(out / K.MANIFEST, "manifest")
    prev = m.get("ingest", {})
    same = prev.get("fingerprint") == fingerprint and prev.get("params") == _params_record(p)
    if same and not p["overwrite"] and (out / SUMMARY).is_file():
        s = read_json(out / SUMMARY, "ingest summary")
        return {**s, "skipped": True}
    if not same and not p["overwrite"]:
        raise IngestError(
            f"{out} already holds a data set made from other inputs or parameters; choose "
            "another ingest.out or set ingest.overwrite=true"
        )
    return None


def _params_record(p: dict) -> dict:
    rec = {k: v for k, v in p.items() if k not in ("overwrite", "out")}
    return json.loads(json.dumps(rec))


def plate_diameters(fovs: list[dict], p: dict, ch: dict, stats: dict) -> dict[str, float]:
    """Scale pass: the median automatic diameter of up to `ingest.scale_fovs` fields per plate.

    Why a separate pass: the crop pass streams each field's crops into the writer as it arrives,
    so a field can only be compared with its plate if the plate's typical scale is known before.
    Sampled fields are spread over the plate (a fixed random draw); a median of a few fields is
    robust to the odd one that ran away. Skipped when the diameter is given, for cellpose, or with
    `ingest.scale_fovs=0`.
    """
    import ray

    k = int(p.get("scale_fovs", 8))
    if k <= 0 or p["diameter"] > 0 or p["segmentation"] != "classical" or not fovs:
        return {}
    by_plate: dict[str, list] = {}
    for f in fovs:
        by_plate.setdefault(f["row"][K.PLATE], []).append(f)
    rng = np.random.default_rng(0)
    sample = []
    for group in by_plate.values():
        take = rng.choice(len(group), min(len(group), k), replace=False)
        sample += [group[i] for i in sorted(take)]
    plate_of = {f["fov_id"]: f["row"][K.PLATE] for f in sample}
    stats_ref = [ray.put(stats)] if stats.get("illum") else None
    kw = {"p": p, "ch": ch, "stats_ref": stats_ref}
    ds = map_fovs(fov_dataset(sample, p), scale_batch, p, kw)
    got: dict[str, list] = {}
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for fid, d in zip(block.column("fov_id").to_pylist(), block.column("diameter").to_pylist()):
            if d > 0:
                got.setdefault(plate_of[fid], []).append(d)
    return {pl: float(np.median(v)) for pl, v in got.items() if v}


def _stream_crops(fovs: list[dict], p: dict, ch: dict, stats: dict, writer) -> dict:
    """Run the crop pass and feed its rows into `writer` as they arrive; collect the FOV rejects."""
    import ray

    by_id = {f["fov_id"]: f for f in fovs}
    got = {
        "seen": set(),
        "rejects": [],
        "n_ok": 0,
        "n_cells": 0,
        "diameter": [],
        "seconds": [],
        "cpu_seconds": 0.0,
        "separate": {},
        "all_zero": np.zeros(len(ch["names"]), np.int64),
        "saturated": np.zeros(len(ch["names"]), np.int64),
    }
    got["diameter_ref"] = stats.get("diameter_ref", {})
    if not fovs:
        return got
    need = stats["illum"] or stats["lohi"] or stats.get("diameter_ref")
    stats_ref = [ray.put(stats)] if need else None
    ds = map_fovs(fov_dataset(fovs, p), crop_batch, p, {"p": p, "ch": ch, "stats_ref": stats_ref})
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in block.to_pylist():
            fov = by_id[r["fov_id"]]
            got["seen"].add(r["fov_id"])
            info = json.loads(r["info"] or "{}")
            if "diameter" in info:
                got["diameter"].append(info["diameter"])
            if r["status"] != "ok":
                files = [f["relpath"] for f in fov["files"]]
                got["rejects"].append(
                    reject_row("fov", r["code"], r["reason"], r["fov_id"], files, fov["meta"])
                )
                continue
            crops = np.frombuffer(r["crops"], imio.OUT_DTYPES[p["dtype"]])
            meta = pa.ipc.open_stream(r["meta"]).read_all().to_pandas()
            writer.add(crops.reshape(json.loads(r["shape"])), meta)
            got["n_ok"] += 1
            got["n_cells"] += len(meta)
            got["seconds"].append(info.get("seconds", 0.0))
            got["cpu_seconds"] += info.get("cpu_seconds", 0.0)
            if info.get("separate"):
                got["separate"][r["fov_id"]] = info["separate"]
            for k in ("all_zero", "saturated"):
                got[k] += np.asarray(info["crop_flags"][k], np.int64)
    # belt and braces: a FOV that came back from no task is still accounted for
    for f in fovs:
        if f["fov_id"] not in got["seen"]:
            files = [x["relpath"] for x in f["files"]]
            got["rejects"].append(
                reject_row(
                    "fov",
                    "lost",
                    "no result came back from its task",
                    f["fov_id"],
                    files,
                    f["meta"],
                )
            )
    return got


def _crop_checks(got: dict, names: list[str]) -> tuple[dict, list[str]]:
    """Counts of crops with an all-zero or saturated channel, and a warning per channel affected."""
    n = got["n_cells"]
    checks = {
        "n_crops": n,
        "all_zero": dict(zip(names, got["all_zero"].tolist())),
        "saturated": dict(zip(names, got["saturated"].tolist())),
    }
    notes = []
    for what, desc in (("all_zero", "all zero"), ("saturated", "more than half saturated")):
        for name, k in checks[what].items():
            if k:
                notes.append(
                    f"warning: {k} of {n} crops ({100 * k / max(n, 1):.1f}%) have channel "
                    f"{name!r} {desc}: check ingest.normalization / ingest.norm_percentiles and "
                    "the rejects table"
                )
    return checks, notes


def _summary(p: dict, plan: dict, got: dict, rej: pd.DataFrame, seconds: dict) -> dict:
    ch = plan["channels"]
    diam = got["diameter"]
    checks, check_notes = _crop_checks(got, ch["names"])
    sep = [
        f"field {fid} normalised by itself (ingest.scale_check=separate): {why}"
        for fid, why in sorted(got["separate"].items())
    ]
    n_bad = int((rej["code"] == "implausible-segmentation").sum()) if len(rej) else 0
    bad = (
        [f"warning: {n_bad} field(s) rejected as implausible-segmentation (see the rejects table)"]
        if n_bad
        else []
    )
    n_odd = int((rej["code"] == "out-of-scale").sum()) if len(rej) else 0
    odd = (
        [f"warning: {n_odd} field(s) rejected as out-of-scale (see the rejects table)"]
        if n_odd
        else []
    )
    return {
        "out": p["out"],
        "input": p["input"],
        "n_files": plan["n_files"],
        "n_files_rejected": int((rej["kind"] == "file").sum()),
        "n_fovs_in": plan["n_fovs_in"],
        "n_fovs_with_cells": got["n_ok"],
        "n_fovs_rejected": int((rej["kind"] == "fov").sum()),
        "n_cells": got["n_cells"],
        "rejects_by_code": {k: int(v) for k, v in rej["code"].value_counts().items()},
        "channels": ch["names"],
        "nucleus_channel": ch["names"][ch["nucleus"]],
        "cytoplasm_channel": ch["names"][ch["cytoplasm"]] if ch["cytoplasm"] is not None else "",
        "diameter_px": {
            "plates": got.get("diameter_ref", {}),
            "median": float(np.median(diam)) if diam else 0.0,
            "min": float(min(diam)) if diam else 0.0,
            "max": float(max(diam)) if diam else 0.0,
        },
        "seconds": {
            **seconds,
            "per_fov_task_median": float(np.median(got["seconds"])) if got["seconds"] else 0.0,
            # CPU time of the crop tasks that gave cells: throughput per core, whatever the load
            "crop_task_cpu_total": round(got["cpu_seconds"], 2),
        },
        "crop_checks": checks,
        "fields_normalised_alone": sorted(got["separate"]),
        "notes": plan["notes"] + odd + bad + sep + check_notes,
        "skipped": False,
    }


def _manifest_extra(p: dict, plan: dict, stats: dict, summary: dict, illum_files: dict) -> dict:
    """What the manifest records about ingest: parameters, corrections, accounting, rejects."""
    counts = (
        "n_files",
        "n_files_rejected",
        "n_fovs_in",
        "n_fovs_with_cells",
        "n_fovs_rejected",
        "n_cells",
    )
    return {
        "ingest": {
            "params": _params_record(p),
            "fingerprint": plan["fingerprint"],
            "normalization": {
                "mode": p["normalization"],
                "percentiles": p["norm_percentiles"],
                "ranges": stats["lohi"],
                "units": "input intensity after illumination correction",
                "dtype": p["dtype"],
            },
            "illumination": {
                "enabled": p["illum_correction"],
                "downscale": p["illum_downscale"],
                "functions": illum_files,
            },
            "scale_check": {
                "mode": p["scale_check"],
                "fold": p["scale_fold"],
                "plates": stats.get("scale_ref", {}),
                "n_rejected": summary["rejects_by_code"].get("out-of-scale", 0),
                "normalised_alone": summary["fields_normalised_alone"],
            },
            "crop_checks": summary["crop_checks"],
            "z_projection": p["z_projection"],
            "segmentation": p["segmentation"],
            "channel_roles": {
                "nucleus": summary["nucleus_channel"],
                "cytoplasm": summary["cytoplasm_channel"],
            },
            "morph_units": "pixels (areas px^2); morph_mean_* in input intensity units",
            "accounting": {k: summary[k] for k in counts},
            "rejects": {"file": REJECTS, "by_code": summary["rejects_by_code"]},
        }
    }


def run_ingest(cfg) -> dict:
    """Ingest raw images into a crop-shard data set (SPEC stage 2). See the module docstring.

    Args:
        cfg: an `ExperimentConfig`; reads `cfg.ingest` and `cfg.ray.progress`. Uses the running Ray
            (`ray.init` is the caller's job: jobs/ingest.py, the CLI); Ray Data starts a local one
            if none.

    Returns:
        Summary dict: counts (files, FOVs in / with cells / rejected, cells), rejects by code,
        paths, the seconds taken, and `skipped` when an identical data set was already there.

    Raises:
        IngestError: inputs or parameters that make the whole job impossible (the message names
            the key or file), or no FOV gave any cell.
    """
    import ray

    from raycell.formats.shards import ShardWriter
    from raycell.utils.io import atomic_write_json, atomic_write_parquet
    from raycell.utils.outputs import DATASET, staging_dir, swap_in

    t0 = time.perf_counter()
    p = dataclasses.asdict(cfg.ingest)
    check_params(p)
    for k in ("input", "out", "platemap", "cellpose_model"):  # Ray workers do not share our cwd
        if p[k]:
            p[k] = os.path.abspath(os.path.expanduser(p[k]))
    out = check_out(p)
    plan = plan_ingest(p)
    prev = _existing(out, p, plan["fingerprint"])
    if prev is not None:
        print(
            f"ingest: {out} already holds this data set (same inputs, parameters); skipped",
            file=sys.stderr,
        )
        return prev
    ray.data.DataContext.get_current().enable_progress_bars = bool(cfg.ray.progress)
    stats = compute_stats(plan["fovs"], p, plan["channels"])
    stats["diameter_ref"] = plate_diameters(plan["fovs"], p, plan["channels"], stats)
    t_stats = time.perf_counter() - t0
    partial = staging_dir(out, DATASET)
    writer = ShardWriter(
        partial, plan["channels"]["names"], rows_per_shard=p["rows_per_shard"], overwrite=True
    )
    got = _stream_crops(plan["fovs"], p, plan["channels"], stats, writer)
    cols = ["kind", "fov_id", "code", "reason", "files"]
    rej = (
        pd.DataFrame(
            plan["rejects"] + got["rejects"],
            columns=None if plan["rejects"] or got["rejects"] else cols,
        )
        .fillna("")
        .astype(str)
    )
    atomic_write_parquet(pa.Table.from_pandas(rej, preserve_index=False), partial / REJECTS)
    summary = _summary(
        p, plan, got, rej, {"stats": round(t_stats, 2), "total": round(time.perf_counter() - t0, 2)}
    )
    if summary["n_fovs_in"] != summary["n_fovs_with_cells"] + summary["n_fovs_rejected"]:
        raise RuntimeError(f"ingest accounting bug: {summary}")  # never expected: fail loudly
    if summary["n_cells"] == 0:
        raise IngestError(
            f"no field of view gave any cell ({summary['n_fovs_rejected']} rejected: "
            f"{summary['rejects_by_code']}); see {partial / REJECTS}"
        )
    illum_files = {}
    for plate, func in stats["illum"].items():
        illum_files[plate] = f"illum/{_safe(plate)}.npy"
        (partial / "illum").mkdir(exist_ok=True)
        np.save(partial / illum_files[plate], func)
    writer.close(
        params={"stage": "ingest", "input": p["input"]},
        extra=_manifest_extra(p, plan, stats, summary, illum_files),
    )
    atomic_write_json(partial / SUMMARY, summary)
    swap_in(partial, out)
    return summary


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s) or "plate"
