"""The crop pass: one field of view -> its crops and metadata, or one reject reason.

`fov_result` reads, projects, corrects, segments, drops border objects, crops and measures one
field of view (FOV) and returns exactly one result row (a status, or a reject reason) with its crops
and metadata. One row per FOV in and out is what makes "every input accounted for" a simple set
equality at the end (`raycell.ingest.driver`). `crop_batch` is the Ray Data task around it: it
writes its FOVs' crops into shard files itself (`write_task_shards`) and returns only the small
rows, so no crop passes through the driver.
"""

from __future__ import annotations

import json
import pickle
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from raycell import constants as K
from raycell.features.morphology import crop_feature_columns
from raycell.ingest import images as imio
from raycell.ingest.crops import extract
from raycell.ingest.objects import crops_of_given, read_given
from raycell.ingest.params import IngestParams
from raycell.ingest.segment import nucleus_diameter, plausibility, segment
from raycell.ingest.stats import scale_verdict
from raycell.ingest.tasks import read_fov

_STATS_CACHE: dict = {}


def _get_stats(ref_box: list | None):
    """Resolve the statistics once per worker process (they can be large: a function per plate)."""
    if not ref_box:
        return None
    ref = ref_box[0]
    key = ref.hex() if hasattr(ref, "hex") else id(ref)
    if key not in _STATS_CACHE:
        import ray

        _STATS_CACHE.clear()
        _STATS_CACHE[key] = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
    return _STATS_CACHE[key]


def scale_batch(batch: pa.Table, p: IngestParams, ch: dict, stats_ref: list | None) -> pa.Table:
    """Scale pass: each sampled field's own diameter estimate (no plate reference, no crops).

    Its per-plate median is the reference the crop pass compares each field with: a field whose
    estimate is more than 2x away uses the plate's instead, and one whose objects are far larger
    than the plate's is rejected as implausible (`raycell.ingest.segment.plausibility`).
    """
    stats = _get_stats(stats_ref)
    ids, diam = [], []
    for rec in batch.column("record").to_pylist():
        fov = json.loads(rec)
        try:
            img, _ = read_fov(fov, p, ch)
            func = (stats or {}).get("illum", {}).get(fov["row"][K.PLATE])
            if p.illum_correction and func is not None:
                img = img / imio.upsample(func, img.shape[1:])
            d = nucleus_diameter(img[ch["nucleus"]], p)  # the estimate only: no segmentation
        except Exception:  # noqa: BLE001 - the crop pass reports the reason
            d = 0.0
        ids.append(fov["fov_id"])
        diam.append(float(d))
    return pa.table({"fov_id": pa.array(ids, pa.string()), "diameter": pa.array(diam)})


def fov_result(
    fov: dict, p: IngestParams, ch: dict, stats: dict | None
) -> tuple[dict, np.ndarray | None, pd.DataFrame | None]:
    """The crop pass for one field of view: (result row, crops, metadata), crops None if rejected.

    The row is small (status, code, reason, cell count, info JSON); the crops (N, C, H, W) and their
    metadata go to the shard writer of the task. Any failure of one FOV becomes a reject with a
    reason (a programming error shows up there with its exception type, rather than killing the job
    after hours).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    fid = fov["fov_id"]
    base = {"fov_id": fid, "status": "rejected", "code": "", "reason": "", "n_cells": 0}
    base["info"] = "{}"
    none = (None, None)
    try:
        img, info = read_fov(fov, p, ch)
        plate = fov["row"][K.PLATE]
        odd = scale_verdict(fid, img, info, plate, p, ch, stats)
        if odd and p.scale_check == "reject":
            return {
                **base,
                "code": "out-of-scale",
                "reason": f"{odd}: left out of the normalisation statistics and rejected "
                "(ingest.scale_check=separate keeps it, normalised by itself)",
            }, *none
        if odd:
            info["separate"] = odd
        if p.illum_correction:
            func = stats["illum"].get(plate) if stats else None
            if func is None and not odd:
                raise imio.ImageError("no-illum", f"no illumination function for plate {plate!r}")
            if func is not None:
                img = img / imio.upsample(func, img.shape[1:])
        ref_d = float((stats or {}).get("diameter_ref", {}).get(plate, 0.0))
        qc: dict = {}
        given = read_given(fov, img.shape[1:])  # the lab's masks or object table, if any
        if given is None:
            nuc, cells, d = segment(
                img, ch["nucleus"], ch["cytoplasm"], p, ref_diameter=ref_d, qc=qc
            )
            n_objects = int(nuc.max())
        else:
            nuc, cells, d, n_objects = given.nuclei, given.cells, given.diameter, given.n_objects
        info["diameter"] = round(float(d), 2)
        info["n_objects"] = n_objects
        info["qc"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in qc.items()}
        # a leak or a runaway scale is rejected with its evidence, not cropped into giant "cells"
        # nor (once the area filter has removed the giants) reported as an empty field
        why = plausibility(qc, ref_d, p.implausible_fold) if qc else ""
        if why and p.plausibility_check:
            return {
                **base,
                "code": "implausible-segmentation",
                "reason": why,
                "info": json.dumps(info),
            }, *none
        if n_objects == 0:
            return {
                **base,
                "code": "no-cells",
                "reason": f"no objects found (diameter {d:.1f} px)",
                "info": json.dumps(info),
            }, *none
        lo, hi = p.norm_percentiles
        if p.normalization == "per-image" or odd:
            lohi = imio.percentiles(img, lo, hi)
        else:
            key = fov["row"][K.BATCH] if p.normalization == "per-batch" else ""
            if key not in stats["lohi"]:
                raise imio.ImageError(
                    "no-stats", f"no readable field of view in batch {key!r} to normalise with"
                )
            lohi = np.asarray(stats["lohi"][key])
        img_out = imio.to_dtype(img, lohi, p.dtype)
        objects = cells if cells is not None else nuc
        if given is not None:
            crops, feats = crops_of_given(given, img, img_out, ch["names"], p)
        else:
            crops, feats = extract(
                objects,
                img,
                img_out,
                ch["names"],
                p.crop_size,
                nuclei=nuc if cells is not None else None,
                mask=p.mask_crops,
                mask_blur=p.mask_blur,
            )
        if len(feats) == 0:
            return {
                **base,
                "code": "no-cells",
                "reason": f"all {n_objects} objects touch the image border",
                "info": json.dumps(info),
            }, *none
        info["crop_flags"] = imio.crop_flags(crops)
        if p.crop_features:  # of the crops as stored: the baseline's own features, exactly
            for name, col in crop_feature_columns(crops, ch["names"]).items():
                feats[name] = col
        meta = feats.drop(columns=["label"])
        meta.insert(0, K.CELL_ID, [f"{fid}-c{int(lab):05d}" for lab in feats["label"]])
        for k, v in fov["row"].items():
            meta[k] = v
        meta[K.SPLIT] = K.UNASSIGNED
        meta[K.SOURCE] = fov["source"]
        info["seconds"] = round(time.perf_counter() - t0, 3)
        info["cpu_seconds"] = round(time.process_time() - c0, 3)
        row = {**base, "status": "ok", "n_cells": len(meta), "info": json.dumps(info)}
        return row, crops, meta
    except imio.ImageError as exc:
        return {**base, "code": exc.code, "reason": str(exc)}, *none
    except Exception as exc:  # noqa: BLE001 - see docstring
        return {**base, "code": "error", "reason": f"{type(exc).__name__}: {exc}"}, *none


def process_fov(fov: dict, p: IngestParams, ch: dict, stats: dict | None) -> dict:
    """`fov_result` as one self-contained row: crops as bytes, metadata as an Arrow IPC stream.

    For callers outside the crop pass (the per-core benchmark, tests), which want one dict per FOV.
    """
    row, crops, meta = fov_result(fov, p, ch, stats)
    if crops is None:
        return {**row, "crops": b"", "meta": b""}
    sink = pa.BufferOutputStream()
    table = pa.Table.from_pandas(meta, preserve_index=False)
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return {
        **row,
        "crops": crops.tobytes(),
        "meta": sink.getvalue().to_pybytes(),
        "shape": json.dumps(list(crops.shape)),
    }


def shard_name(first: int, piece: int) -> str:
    """The shard file of the task whose first FOV is number `first` in plan order, piece `piece`.

    Deterministic from the task's FOVs, so a retried task overwrites its own files (atomically) and
    the data set's shard order (by this name) does not depend on which task finished first.
    """
    return f"part-{first:06d}-{piece:03d}.parquet"


def write_task_shards(
    out: str, first: int, crops: list[np.ndarray], metas: list[pd.DataFrame], rows_per_shard: int
) -> list[dict]:
    """Write one task's cells as `shard_name(first, k)` files of at most `rows_per_shard` rows each.

    Returns the part records (`raycell.formats.shards.write_shard_file`), each with its sort `key`
    (first, k). Cell ids are `<fov_id>-c<label>`: unique over the data set because FOV ids are (the
    plan groups files by them) and labels are within a FOV; the check here is the cheap one a task
    can make on its own rows (a clash would mean a bug, so it fails loudly).
    """
    from raycell.formats.shards import write_shard_file

    if not crops:
        return []  # no cell in this task's FOVs: no file
    images = np.concatenate(crops)
    meta = pd.concat(metas, ignore_index=True)
    dup = meta[K.CELL_ID][meta[K.CELL_ID].duplicated()]
    if len(dup):
        raise RuntimeError(f"ingest bug: duplicate cell_id {dup.iloc[0]!r} in one crop task")
    step = rows_per_shard if rows_per_shard > 0 else len(meta)
    parts = []
    for k, s in enumerate(range(0, len(meta), step)):
        rows = slice(s, s + step)
        part = write_shard_file(out, shard_name(first, k), images[rows], meta.iloc[rows])
        parts.append({**part, "key": [first, k]})
    return parts


def crop_batch(
    batch: pa.Table,
    p: IngestParams,
    ch: dict,
    stats_ref: list | None,
    out: str,
    rows_per_shard: int = 0,
) -> pa.Table:
    """The crop pass over one task's FOV records: writes their shards, returns a small row per FOV.

    The shards go to `<out>/shards/` (`write_task_shards`, named after the task's first FOV in plan
    order, the `index` column of `raycell.ingest.tasks.fov_dataset`). The rows carry no crops: the
    status, reject code and reason, cell count and info JSON of each FOV, the task's `task` key, and
    on the task's first row its pickled part records (`parts`) for the driver's manifest.
    """
    stats = _get_stats(stats_ref)
    first = min(batch.column("index").to_pylist(), default=0)
    rows, crops, metas = [], [], []
    for rec in batch.column("record").to_pylist():
        row, c, m = fov_result(json.loads(rec), p, ch, stats)
        rows.append(row)
        if c is not None:
            crops.append(c)
            metas.append(m)
    parts = write_task_shards(out, first, crops, metas, rows_per_shard)
    blob = [b""] * len(rows)
    if parts:
        blob[0] = pickle.dumps(parts, protocol=5)
    cols = ("fov_id", "status", "code", "reason", "info")
    return pa.table(
        {
            **{c: pa.array([r[c] for r in rows], pa.string()) for c in cols},
            "n_cells": pa.array([r["n_cells"] for r in rows], pa.int64()),
            "task": pa.array([first] * len(rows), pa.int64()),
            "parts": pa.array(blob, pa.binary()),
        }
    )
