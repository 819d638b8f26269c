"""The statistics pass: illumination functions, normalisation ranges and the out-of-scale check.

One Ray Data task per few FOVs reads each field and returns a block-mean downscaled copy (for the
per-plate illumination functions) plus a fixed random sample of full-resolution pixels (for the
global / per-batch normalisation percentiles, taken after illumination correction). The driver
reduces them in `compute_stats`. The pass is skipped for `normalization=per-image` without
illumination correction.

Fields whose scale is far outside their plate's (`images.scale_problem`) are left out of both
statistics; `scale_verdict` gives the crop pass the same verdict for every field, sampled or not.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pyarrow as pa

from raycell import constants as K
from raycell.ingest import images as imio
from raycell.ingest.params import IngestParams
from raycell.ingest.tasks import fov_dataset, map_fovs, read_fov

_SAMPLE = 2048  # full-resolution pixels per FOV and channel kept for normalisation percentiles


def _stats_batch(batch: pa.Table, p: IngestParams, ch: dict) -> pa.Table:
    """Statistics pass: downscaled image + pixel sample per FOV (unusable FOVs are skipped here)."""
    out = {
        "fov_id": [],
        "ok": [],
        "shape": [],
        "scale": [],
        "small": [],
        "sample": [],
        "sample_idx": [],
    }
    f = p.illum_downscale
    for rec in batch.column("record").to_pylist():
        fov = json.loads(rec)
        try:
            img, info = read_fov(fov, p, ch)
        except Exception:  # noqa: BLE001 - the crop pass reports the reason
            for k, v in zip(out, (fov["fov_id"], False, "", "", b"", b"", b"")):
                out[k].append(v)
            continue
        small = imio.downscale(img, f)
        grid = img[:, : small.shape[1] * f : f, : small.shape[2] * f : f] if f > 1 else img
        rng = np.random.default_rng(zlib.crc32(fov["fov_id"].encode()))
        idx = rng.choice(
            grid.shape[1] * grid.shape[2],
            min(_SAMPLE, grid.shape[1] * grid.shape[2]),
            replace=False,
        ).astype(np.int64)
        sample = grid.reshape(grid.shape[0], -1)[:, idx]
        out["fov_id"].append(fov["fov_id"])
        out["ok"].append(True)
        out["shape"].append(json.dumps(list(small.shape)))
        out["scale"].append(json.dumps(imio.field_scale(img, info["dtypes"])))
        out["small"].append(small.astype(np.float32).tobytes())
        out["sample"].append(sample.astype(np.float32).tobytes())
        out["sample_idx"].append(idx.tobytes())
    return pa.table(
        {
            "fov_id": pa.array(out["fov_id"], pa.string()),
            "ok": pa.array(out["ok"], pa.bool_()),
            "shape": pa.array(out["shape"], pa.string()),
            "scale": pa.array(out["scale"], pa.string()),
            **{k: pa.array(out[k], pa.binary()) for k in ("small", "sample", "sample_idx")},
        }
    )


def _stats_fovs(fovs: list[dict], p: IngestParams) -> list[dict]:
    """FOVs the statistics pass reads: all for illumination, else up to stats_fovs per batch."""
    if p.illum_correction or not p.stats_fovs:
        return fovs
    by_batch: dict[str, list] = {}
    for f in fovs:
        by_batch.setdefault(f["row"][K.BATCH], []).append(f)
    rng = np.random.default_rng(0)
    out = []
    for group in by_batch.values():
        take = rng.choice(len(group), min(len(group), p.stats_fovs), replace=False)
        out += [group[i] for i in sorted(take)]
    return out


def compute_stats(fovs: list[dict], p: IngestParams, ch: dict) -> dict:
    """Run the statistics pass and reduce it to illumination functions and normalisation ranges.

    Fields whose scale is far outside their plate's (`imio.scale_problem`) are left out of both, so
    one field at another scale cannot turn every other field's crops to zero; the crop pass then
    rejects them, or normalises them by themselves (`ingest.scale_check`). The per-plate references
    go to the crop pass too, which checks the fields this pass did not sample.
    """
    empty = {"illum": {}, "lohi": {}, "scale_ref": {}, "out_of_scale": {}}
    need = p.illum_correction or p.normalization != "per-image"
    if not need or not fovs:
        return empty
    by_id = {f["fov_id"]: f for f in fovs}
    ds = map_fovs(fov_dataset(_stats_fovs(fovs, p), p), _stats_batch, p, {"p": p, "ch": ch})
    rows = []  # (fov_id, plate, batch, small, sample (C, k), idx (k,), small shape, scale)
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in block.to_pylist():
            if not r["ok"]:
                continue
            shape = tuple(json.loads(r["shape"]))
            row = by_id[r["fov_id"]]["row"]
            rows.append(
                (
                    r["fov_id"],
                    row[K.PLATE],
                    row[K.BATCH],
                    np.frombuffer(r["small"], np.float32).reshape(shape),
                    np.frombuffer(r["sample"], np.float32).reshape(shape[0], -1),
                    np.frombuffer(r["sample_idx"], np.int64),
                    shape,
                    json.loads(r["scale"]),
                )
            )
    refs, odd = {}, {}
    if p.scale_check != "ignore":
        by_plate: dict[str, list] = {}
        for r in rows:
            by_plate.setdefault(r[1], []).append(r[7])
        refs = {pl: imio.scale_reference(v, p.scale_fold) for pl, v in by_plate.items()}
        for fid, plate, *_, scale in rows:
            why = imio.scale_problem(scale, refs[plate], ch["names"])
            if why:
                odd[fid] = why
    rows = [r for r in rows if r[0] not in odd]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for _, plate, _, small, *_ in rows:
        if plate in sums and sums[plate].shape != small.shape:
            small = imio.upsample(small, sums[plate].shape[1:])  # odd-sized image on the plate
        sums[plate] = sums.get(plate, 0) + small
        counts[plate] = counts.get(plate, 0) + 1
    illum = {}
    if p.illum_correction:
        illum = {
            pl: imio.illumination_function(s / counts[pl], p.illum_filter) for pl, s in sums.items()
        }
    lo, hi = p.norm_percentiles
    pooled: dict[str, list] = {}
    for _, plate, batch, _, sample, idx, shape, _ in rows:
        if illum:
            func = illum[plate]
            if func.shape[1:] != tuple(shape[1:]):
                func = imio.upsample(func, shape[1:])
            sample = sample / func.reshape(func.shape[0], -1)[:, idx]
        key = batch if p.normalization == "per-batch" else ""
        pooled.setdefault(key, []).append(sample)
    lohi = {
        k: imio.percentiles(np.concatenate(v, axis=1), lo, hi).tolist() for k, v in pooled.items()
    }
    return {
        "illum": illum,
        "lohi": lohi,
        "n_fovs": len(rows),
        "scale_ref": {pl: r for pl, r in refs.items() if r is not None},
        "out_of_scale": odd,
    }


def scale_verdict(
    fid: str, img: np.ndarray, info: dict, plate: str, p: IngestParams, ch: dict, stats: dict | None
) -> str:
    """Why this field is out of its plate's scale ('' if it is not, or nothing to compare with)."""
    if p.scale_check == "ignore" or not stats:
        return ""
    if fid in stats.get("out_of_scale", {}):
        return stats["out_of_scale"][fid]
    ref = stats.get("scale_ref", {}).get(plate)
    if ref is None:
        return ""
    return imio.scale_problem(imio.field_scale(img, info["dtypes"]), ref, ch["names"])
