"""The crop pass: one field of view -> its crops and metadata, or one reject reason.

`process_fov` reads, projects, corrects, segments, drops border objects, crops and measures one
field of view (FOV) and returns exactly one row: its crops and metadata, or a reject reason. One row
per FOV in and out is what makes "every input accounted for" a simple set equality at the end
(`raycell.ingest.driver`). `crop_batch` is the Ray Data task around it.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa

from raycell import constants as K
from raycell.ingest import images as imio
from raycell.ingest.crops import extract
from raycell.ingest.segment import plausibility, segment
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


def _param(p: dict, key: str, default):
    """An ingest parameter that older configs (and `IngestConfig` before issue 10) may lack."""
    return p.get(key, default)


def scale_batch(batch: pa.Table, p: dict, ch: dict, stats_ref: list | None) -> pa.Table:
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
            if p["illum_correction"] and func is not None:
                img = img / imio.upsample(func, img.shape[1:])
            d = segment(img, ch["nucleus"], None, p)[2]
        except Exception:  # noqa: BLE001 - the crop pass reports the reason
            d = 0.0
        ids.append(fov["fov_id"])
        diam.append(float(d))
    return pa.table({"fov_id": pa.array(ids, pa.string()), "diameter": pa.array(diam)})


def process_fov(fov: dict, p: dict, ch: dict, stats: dict | None) -> dict:
    """The crop pass for one field of view: returns the result row (crops + metadata, or a reject).

    Any failure of one FOV becomes a reject with a reason (a programming error shows up there with
    its exception type, rather than killing the job after hours).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    fid = fov["fov_id"]
    base = {
        "fov_id": fid,
        "status": "rejected",
        "code": "",
        "reason": "",
        "n_cells": 0,
        "crops": b"",
        "meta": b"",
        "info": "{}",
    }
    try:
        img, info = read_fov(fov, p, ch)
        plate = fov["row"][K.PLATE]
        odd = scale_verdict(fid, img, info, plate, p, ch, stats)
        if odd and p["scale_check"] == "reject":
            return {
                **base,
                "code": "out-of-scale",
                "reason": f"{odd}: left out of the normalisation statistics and rejected "
                "(ingest.scale_check=separate keeps it, normalised by itself)",
            }
        if odd:
            info["separate"] = odd
        if p["illum_correction"]:
            func = stats["illum"].get(plate) if stats else None
            if func is None and not odd:
                raise imio.ImageError("no-illum", f"no illumination function for plate {plate!r}")
            if func is not None:
                img = img / imio.upsample(func, img.shape[1:])
        ref_d = float((stats or {}).get("diameter_ref", {}).get(plate, 0.0))
        qc: dict = {}
        nuc, cells, d = segment(img, ch["nucleus"], ch["cytoplasm"], p, ref_diameter=ref_d, qc=qc)
        info["diameter"] = round(float(d), 2)
        info["n_objects"] = int(nuc.max())
        info["qc"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in qc.items()}
        # a leak or a runaway scale is rejected with its evidence, not cropped into giant "cells"
        # nor (once the area filter has removed the giants) reported as an empty field
        why = plausibility(qc, ref_d, _param(p, "implausible_fold", 4.0)) if qc else ""
        if why and _param(p, "plausibility_check", True):
            return {
                **base,
                "code": "implausible-segmentation",
                "reason": why,
                "info": json.dumps(info),
            }
        if nuc.max() == 0:
            return {
                **base,
                "code": "no-cells",
                "reason": f"no objects found (diameter {d:.1f} px)",
                "info": json.dumps(info),
            }
        lo, hi = p["norm_percentiles"]
        if p["normalization"] == "per-image" or odd:
            lohi = imio.percentiles(img, lo, hi)
        else:
            key = fov["row"][K.BATCH] if p["normalization"] == "per-batch" else ""
            if key not in stats["lohi"]:
                raise imio.ImageError(
                    "no-stats", f"no readable field of view in batch {key!r} to normalise with"
                )
            lohi = np.asarray(stats["lohi"][key])
        img_out = imio.to_dtype(img, lohi, p["dtype"])
        objects = cells if cells is not None else nuc
        crops, feats = extract(
            objects,
            img,
            img_out,
            ch["names"],
            p["crop_size"],
            nuclei=nuc if cells is not None else None,
            mask=p["mask_crops"],
            mask_blur=p["mask_blur"],
        )
        if len(feats) == 0:
            return {
                **base,
                "code": "no-cells",
                "reason": f"all {int(objects.max())} objects touch the image border",
                "info": json.dumps(info),
            }
        info["crop_flags"] = imio.crop_flags(crops)
        meta = feats.drop(columns=["label"])
        meta.insert(0, K.CELL_ID, [f"{fid}-c{int(lab):05d}" for lab in feats["label"]])
        for k, v in fov["row"].items():
            meta[k] = v
        meta[K.SPLIT] = K.UNASSIGNED
        meta[K.SOURCE] = fov["source"]
        info["seconds"] = round(time.perf_counter() - t0, 3)
        info["cpu_seconds"] = round(time.process_time() - c0, 3)
        sink = pa.BufferOutputStream()
        table = pa.Table.from_pandas(meta, preserve_index=False)
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        return {
            **base,
            "status": "ok",
            "n_cells": len(meta),
            "crops": crops.tobytes(),
            "meta": sink.getvalue().to_pybytes(),
            "info": json.dumps(info),
            "shape": json.dumps(list(crops.shape)),
        }
    except imio.ImageError as exc:
        return {**base, "code": exc.code, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - see docstring
        return {**base, "code": "error", "reason": f"{type(exc).__name__}: {exc}"}


def crop_batch(batch: pa.Table, p: dict, ch: dict, stats_ref: list | None) -> pa.Table:
    """The crop pass over one block of FOV records: one result row per FOV (`process_fov`)."""
    stats = _get_stats(stats_ref)
    rows = [process_fov(json.loads(r), p, ch, stats) for r in batch.column("record").to_pylist()]
    cols = ("fov_id", "status", "code", "reason", "info", "shape")
    return pa.table(
        {
            **{c: pa.array([r.get(c, "") for r in rows], pa.string()) for c in cols},
            "n_cells": pa.array([r["n_cells"] for r in rows], pa.int64()),
            "crops": pa.array([r["crops"] for r in rows], pa.large_binary()),
            "meta": pa.array([r["meta"] for r in rows], pa.binary()),
        }
    )
