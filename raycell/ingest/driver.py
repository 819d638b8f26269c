"""`raycell ingest`: raw fields of view -> crop shards + rejects table, as a Ray Data pipeline.

`ingest_fields` drives the steps, each in its own module:

1. **Plan** (`plan`, no pixels read): files -> fields of view (FOVs) + plate map; files and FOVs
   that cannot be used become rows of the rejects table right away.
2. **Statistics pass** (`stats`, Ray Data, only when needed): illumination functions and
   normalisation ranges, fields at another scale left out.
   **Scale pass** (`plate_diameters`, Ray Data, a few FOVs per plate, only when the diameter is
   estimated): each plate's median diameter, the reference against which the crop pass replaces a
   runaway estimate and rejects an implausible segmentation (`implausible-segmentation`).
3. **Crop pass** (`fov`, Ray Data, one task per few FOVs): each FOV gives exactly one small row,
   ok with its cell count or a reject reason; its crops go into its task's shard files.
4. **The crop tasks write their fields' cells** where they compute (`fov.crop_batch`): each task
   writes `parts/shards/part-<index of its first FOV in plan order, 6 digits>-<piece>.parquet` in
   the staging folder (`write_shard_file`, at most `ingest.rows_per_shard` rows per file), and
   returns only one small row per FOV (status, reject code and reason, info JSON) plus the part
   records of its files (row count, sparse per-channel histogram, value counts). A task whose FOVs
   gave no cell writes no file. The driver gathers those rows (never a crop: on a cluster one
   process computing every crop would be the ceiling) and sorts the parts by file name (so nothing
   depends on which task finished first; a retried task rewrites its own files atomically).
5. **Compaction** (`_compact`, `raycell.formats.compact`): the gathered parts, in that order, are
   rewritten as the data set's shards `shards/part-NNNNN.parquet` of `ingest.rows_per_shard` rows
   (at most `ingest.shard_mb` MiB of image bytes), whatever the number of fields; a field's cells
   may span two shards. Rows are copied, never decoded. Only gathered parts are read, and the
   `parts/` folder is removed, so a file a lost task wrote (its FOVs are `lost`) or a killed
   writer's temporary file never reaches the data set: it holds exactly the cells of the FOVs
   accounted as ok. The manifest's statistics and counts come from the part records
   (`ManifestBuilder.add`), its shard list from the compaction (`ManifestBuilder.relist`); then the
   rejects table, the summary and the manifest are written.
   Unique cell ids: a cell id is `<fov_id>-c<label>` (label: 5 or more digits), unique by
   construction since FOV ids are (the plan groups files by them; the driver checks that each
   comes back once) and labels are unique within a FOV; each task checks its own rows, the cheap
   check that needs no set of every cell id in one process.
   Shared storage: the tasks write into `ingest.out`'s staging folder, so on a cluster `ingest.out`
   must be on storage every node mounts at the same path (as `ingest.input` already is).

Re-runs: everything is written into a staging folder `<out>.partial-XXXXXXXX` and swapped into place
only when complete, so a killed run leaves the previous data set intact, and a re-run starts from
scratch without duplicates. `ingest.out` must be new, empty or a raycell data set, and apart from
the inputs (`raycell.utils.outputs`): nothing raycell did not write is ever deleted.
When `out` already holds a data set made from the same files with the same parameters, the run is
skipped; when the inputs or parameters differ, `ingest.overwrite=true` is required.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from raycell import constants as K
from raycell.ingest.fov import crop_batch, scale_batch
from raycell.ingest.overlays import OVERLAY_DIR, OVERLAY_INDEX, write_overlays
from raycell.ingest.params import IngestParams
from raycell.ingest.plan import check_out, check_params, plan_ingest
from raycell.ingest.segment import cellpose_gpus
from raycell.ingest.sources import IngestError, reject_row
from raycell.ingest.stats import compute_stats
from raycell.ingest.tasks import fov_dataset, map_fovs

REJECTS = "rejects.parquet"
PARTS = "parts"  # the crop tasks' files, in the staging folder until compacted
SUMMARY = "ingest_summary.json"


def _existing(out: Path, p: IngestParams, fingerprint: str) -> dict | None:
    """Summary of an identical earlier run in `out` (to skip), else None; raise on a clash."""
    from raycell.formats.manifest import ShardError, read_dataset_manifest
    from raycell.utils.io import read_json

    if not (out / K.MANIFEST).is_file():
        return None
    try:
        prev = read_dataset_manifest(out).ingest or {}
    except ShardError:  # not a manifest this version reads: no earlier run of these inputs
        prev = {}
    same = prev.get("fingerprint") == fingerprint and prev.get("params") == p.record()
    if same and not p.overwrite and (out / SUMMARY).is_file():
        s = read_json(out / SUMMARY, "ingest summary")
        return {**s, "skipped": True}
    if not same and not p.overwrite:
        raise IngestError(
            f"{out} already holds a data set made from other inputs or parameters; choose "
            "another ingest.out or set ingest.overwrite=true"
        )
    return None


def plate_diameters(fovs: list[dict], p: IngestParams, ch: dict, stats: dict) -> dict[str, float]:
    """Scale pass: the median automatic diameter of up to `ingest.scale_fovs` fields per plate.

    Why a separate pass: each crop task writes its fields' crops as it goes, so a field can only be
    compared with its plate if the plate's typical scale is known before.
    Sampled fields are spread over the plate (a fixed random draw); a median of a few fields is
    robust to the odd one that ran away. Skipped when the diameter is given, for cellpose, or with
    `ingest.scale_fovs=0`.
    """
    import ray

    k = p.scale_fovs
    given = p.masks or p.objects  # the lab's objects: nothing to estimate
    if k <= 0 or p.diameter > 0 or p.segmentation != "classical" or given or not fovs:
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


def _result_rows(ds):
    """The crop pass's result rows as dicts, block by block as they arrive (small: no crops)."""
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from block.to_pylist()


def _gather_crops(fovs: list[dict], p: IngestParams, ch: dict, stats: dict, staging: Path) -> dict:
    """Run the crop pass (its tasks write their shards into `staging`); gather its small rows.

    Returns the accounting: the FOV rejects (a FOV no row came back for is `lost`), the cell and
    FOV counts, the crop checks, and the part records of the shards written, sorted by file name.
    """
    import ray

    by_id = {f["fov_id"]: f for f in fovs}
    got = {
        "seen": set(),
        "rejects": [],
        "parts": [],
        "n_ok": 0,
        "n_cells": 0,
        "diameter": [],
        "seconds": [],
        "cpu_seconds": 0.0,
        "separate": {},
        "all_zero": np.zeros(len(ch["names"]), np.int64),
        "saturated": np.zeros(len(ch["names"]), np.int64),
        "per_fov": {},  # fields that gave cells: their cell count and diameter (overlays)
    }
    got["diameter_ref"] = stats.get("diameter_ref", {})
    if not fovs:
        return got
    need = stats["illum"] or stats["lohi"] or stats.get("diameter_ref")
    stats_ref = [ray.put(stats)] if need else None
    kw = {
        "p": p,
        "ch": ch,
        "stats_ref": stats_ref,
        "out": str(staging),
        "rows_per_shard": _rows_cap(p, ch),  # a task's file is never cut into many shards
    }
    # cellpose on a GPU: the crop tasks (which segment) request one; known before any task starts
    cluster_gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else None
    gpus = cellpose_gpus(p, cluster_gpus)
    ds = map_fovs(fov_dataset(fovs, p), crop_batch, p, kw, num_gpus=gpus)
    for r in _result_rows(ds):
        if r["fov_id"] in got["seen"]:  # never expected: a FOV counted twice breaks the accounting
            raise RuntimeError(f"ingest bug: field of view {r['fov_id']!r} came back twice")
        fov = by_id[r["fov_id"]]
        got["seen"].add(r["fov_id"])
        if r["parts"]:
            got["parts"] += pickle.loads(r["parts"])
        info = json.loads(r["info"] or "{}")
        if "diameter" in info:
            got["diameter"].append(info["diameter"])
        if r["status"] != "ok":
            files = [f["relpath"] for f in fov["files"]]
            got["rejects"].append(
                reject_row("fov", r["code"], r["reason"], r["fov_id"], files, fov["meta"])
            )
            continue
        got["n_ok"] += 1
        got["n_cells"] += r["n_cells"]
        got["per_fov"][r["fov_id"]] = {
            "n_cells": r["n_cells"],
            "diameter": info.get("diameter", 0.0),
        }
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
    got["parts"].sort(key=lambda part: tuple(part["key"]))
    rows = sum(part["rows"] for part in got["parts"])
    if rows != got["n_cells"]:  # never expected: the shards must hold exactly the ok FOVs' cells
        raise RuntimeError(f"ingest bug: shards hold {rows} cells, the ok fields {got['n_cells']}")
    return got


def _rows_cap(p: IngestParams, ch: dict) -> int:
    """Rows per shard: `ingest.rows_per_shard`, fewer when `ingest.shard_mb` binds first."""
    from raycell.formats.compact import cell_bytes, rows_cap

    shape = (len(ch["names"]), p.crop_size, p.crop_size)
    return rows_cap(p.rows_per_shard, p.shard_mb, cell_bytes(shape, p.dtype))


def _compact(staging: Path, parts: list[dict], p: IngestParams, ch: dict) -> list[dict]:
    """Rewrite the crop tasks' files (`staging/parts/`) as the data set's shards; the shard list.

    Shards of `ingest.rows_per_shard` rows (and at most `ingest.shard_mb` of image bytes), whatever
    the number of fields: the tasks' files follow the task size (one field's ~20 cells by
    default), and every later stage pays per file. Why a pass at the end rather than tasks that
    group fields into big files: a task's files are its own (named after its first field, rewritten
    whole by a retry), which is what keeps each field in the data set exactly once; a pass over
    the gathered parts, in plan order, keeps that and gives the same shards whichever task finished
    first. Only the parts gathered are read: a lost task's file or a killed writer's temporary file
    goes with the parts folder, which is removed. This is the one pass in the driver over every
    cell: a copy of bytes, no image decoded, in a few threads (`write_compacted`).
    """
    import shutil

    from raycell.formats.compact import write_compacted

    files = [str(staging / PARTS / part["file"]) for part in parts]
    shards = write_compacted(files, [part["rows"] for part in parts], staging, _rows_cap(p, ch))
    shutil.rmtree(staging / PARTS)
    return shards


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


def _summary(p: IngestParams, plan: dict, got: dict, rej: pd.DataFrame, seconds: dict) -> dict:
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
        "out": p.out,
        "input": p.input,
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


def _manifest_extra(
    p: IngestParams, plan: dict, stats: dict, summary: dict, illum_files: dict
) -> dict:
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
            "params": p.record(),
            "fingerprint": plan["fingerprint"],
            "normalization": {
                "mode": p.normalization,
                "percentiles": p.norm_percentiles,
                "ranges": stats["lohi"],
                "units": "input intensity after illumination correction",
                "dtype": p.dtype,
            },
            "illumination": {
                "enabled": p.illum_correction,
                "downscale": p.illum_downscale,
                "functions": illum_files,
            },
            "scale_check": {
                "mode": p.scale_check,
                "fold": p.scale_fold,
                "plates": stats.get("scale_ref", {}),
                "n_rejected": summary["rejects_by_code"].get("out-of-scale", 0),
                "normalised_alone": summary["fields_normalised_alone"],
            },
            "crop_checks": summary["crop_checks"],
            "z_projection": p.z_projection,
            # physical pixel size from OME-TIFF / OME-Zarr metadata (None: the files do not say)
            "pixel_size": plan.get("pixel_size"),
            "segmentation": p.segmentation,
            "channel_roles": {
                "nucleus": summary["nucleus_channel"],
                "cytoplasm": summary["cytoplasm_channel"],
            },
            "morph_units": "pixels (areas px^2); morph_mean_* in input intensity units",
            "accounting": {k: summary[k] for k in counts},
            "rejects": {"file": REJECTS, "by_code": summary["rejects_by_code"]},
        }
    }


def ingest_fields(cfg) -> dict:
    """`_ingest_fields`, holding the lock of `ingest.out` (a second ingest into it refuses)."""
    from raycell.utils.locks import writing

    if not cfg.ingest.out:
        return _ingest_fields(cfg)
    with writing(cfg.ingest.out, "ingest.out"):
        return _ingest_fields(cfg)


def _ingest_fields(cfg) -> dict:
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

    from raycell.formats.shards import ManifestBuilder
    from raycell.utils.io import atomic_write_json, atomic_write_parquet
    from raycell.utils.outputs import DATASET, staging_dir, swap_in

    t0 = time.perf_counter()
    check_params(cfg.ingest)
    p = IngestParams.from_config(cfg.ingest)
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
    (partial / PARTS / K.SHARD_DIR).mkdir(parents=True)
    got = _gather_crops(plan["fovs"], p, plan["channels"], stats, partial / PARTS)
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
    builder = ManifestBuilder(partial, plan["channels"]["names"])
    for part in got["parts"]:  # sorted by file name
        builder.add(part)
    t_compact = time.perf_counter()
    builder.relist(_compact(partial, got["parts"], p, plan["channels"]))
    summary["n_shards"] = len(builder.shards)
    summary["seconds"]["compact"] = round(time.perf_counter() - t_compact, 2)
    builder.write(
        params={"stage": "ingest", "input": p.input},
        extra=_manifest_extra(p, plan, stats, summary, illum_files),
    )
    # a few fields per plate with their outlines (overlays/), for the eye and `raycell report`
    plates = write_overlays(
        partial, plan["fovs"], got["per_fov"], rej.to_dict("records"), p, plan["channels"], stats
    )
    if plates:
        summary["overlays"] = f"{OVERLAY_DIR}/{OVERLAY_INDEX}"
    atomic_write_json(partial / SUMMARY, summary)
    swap_in(partial, out)
    return summary


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s) or "plate"
