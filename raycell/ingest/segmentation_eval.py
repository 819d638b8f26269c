"""Scoring a segmentation against true masks (`raycell segmentation-eval`).

`match_instances` scores a predicted label image against a ground-truth label image (precision,
recall, F1 at an IoU threshold, as in the cell-segmentation literature), and `evaluate_segmentation`
runs the pipeline's own segmentation on a synthetic raw data set (`raycell synth --raw`) and scores
it against its true masks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from raycell.ingest.images import load_fov_image
from raycell.ingest.segment import segment
from raycell.ingest.sources import discover, group_fovs


def match_instances(pred: np.ndarray, truth: np.ndarray, iou: float = 0.5) -> dict:
    """Match predicted to true instances at an IoU threshold and return precision, recall and F1.

    With a threshold >= 0.5 each object can match at most one other, so a pair counts as a true
    positive when its IoU exceeds the threshold; no assignment problem needs solving. Computed from
    one contingency table (`np.bincount` over label pairs), without a loop over objects.

    Args:
        pred: predicted label image (0 = background).
        truth: ground-truth label image of the same shape.
        iou: IoU threshold (>= 0.5).

    Returns:
        dict with tp, fp, fn, precision, recall, f1, mean_matched_iou, n_pred, n_true.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"match_instances: shapes differ, {pred.shape} vs {truth.shape}")
    if iou < 0.5:
        raise ValueError("match_instances needs iou >= 0.5 (matches are then unique)")
    from skimage.segmentation import relabel_sequential

    p = relabel_sequential(np.asarray(pred, np.int64))[0]
    t = relabel_sequential(np.asarray(truth, np.int64))[0]
    n_p, n_t = int(p.max()), int(t.max())
    inter = np.bincount((t * (n_p + 1) + p).ravel(), minlength=(n_t + 1) * (n_p + 1))
    inter = inter.reshape(n_t + 1, n_p + 1)[1:, 1:].astype(np.float64)
    area_t = np.bincount(t.ravel(), minlength=n_t + 1)[1:].astype(np.float64)
    area_p = np.bincount(p.ravel(), minlength=n_p + 1)[1:].astype(np.float64)
    union = area_t[:, None] + area_p[None, :] - inter
    ious = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    hit = ious > iou
    tp = int(hit.sum())
    fp, fn = n_p - tp, n_t - tp
    prec = tp / n_p if n_p else float(n_t == 0)
    rec = tp / n_t if n_t else 1.0
    f1 = 2 * tp / (n_p + n_t) if (n_p + n_t) else 1.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": prec,
        "recall": rec,
        "f1": f1,
        "mean_matched_iou": float(ious[hit].mean()) if tp else 0.0,
        "n_pred": n_p,
        "n_true": n_t,
    }


def _sum_scores(rows: list[dict]) -> dict:
    tp = sum(r["tp"] for r in rows)
    n_p = sum(r["n_pred"] for r in rows)
    n_t = sum(r["n_true"] for r in rows)
    return {
        "tp": tp,
        "fp": n_p - tp,
        "fn": n_t - tp,
        "n_pred": n_p,
        "n_true": n_t,
        "precision": tp / n_p if n_p else 0.0,
        "recall": tp / n_t if n_t else 0.0,
        "f1": 2 * tp / (n_p + n_t) if (n_p + n_t) else 0.0,
    }


def evaluate_segmentation(
    raw_dir: str | os.PathLike,
    iou: float = 0.5,
    z_projection: str = "best-focus",
    overrides: dict | None = None,
    max_fovs: int = 0,
) -> dict:
    """Segment every field of view of a synthetic raw data set and score it against the true masks.

    Uses the same file discovery, Z projection and segmentation as `raycell ingest` (with the data
    set's default pattern and channel roles), so the score is the pipeline's, not a special path's.
    Objects are pooled over all fields (micro-averaged precision, recall, F1).

    Args:
        raw_dir: folder written by `write_synthetic_raw` (with `raw.json`, `images/`, `masks/`).
        iou: IoU threshold for a match.
        z_projection: projection used before segmenting.
        overrides: ingest parameters to change (e.g. {"threshold": "li"}).
        max_fovs: score only the first N fields (0 = all).

    Returns:
        {"nuclei": {...}, "cells": {...}, "n_fovs": int, "iou": float, "per_fov": [...]}.
    """
    import dataclasses

    import tifffile

    from raycell.config import IngestConfig
    from raycell.utils.io import read_json

    raw_dir = Path(raw_dir).absolute()
    info = read_json(raw_dir / "raw.json", "synthetic raw description")
    p = dataclasses.asdict(IngestConfig())
    p.update(info["ingest"])
    p.update({"z_projection": z_projection, **(overrides or {})})
    files, _ = discover(raw_dir / info["ingest"]["input"], p["pattern"])
    fovs, rejects = group_fovs(files, channels=p["channels"])
    if rejects:
        raise ValueError(
            f"{raw_dir}: {len(rejects)} field(s) of view incomplete, e.g. {rejects[0]}"
        )
    if max_fovs:
        fovs = fovs[:max_fovs]
    chans = p["channels"]
    nuc_i = chans.index(p["nucleus_channel"])
    cyt_i = chans.index(p["cytoplasm_channel"]) if p["cytoplasm_channel"] else None
    per_fov, nuc_rows, cell_rows = [], [], []
    for fov in fovs:
        img, _ = load_fov_image(fov, chans, p["z_projection"])
        nuc, cells, d = segment(img, nuc_i, cyt_i, p)
        stem = raw_dir / "masks" / fov["fov_id"]
        tn = tifffile.imread(f"{stem}_nuclei.tif")
        sn = match_instances(nuc, tn, iou)
        row = {"fov": fov["fov_id"], "diameter": d, "nuclei_f1": sn["f1"]}
        nuc_rows.append(sn)
        if cells is not None:
            sc = match_instances(cells, tifffile.imread(f"{stem}_cells.tif"), iou)
            cell_rows.append(sc)
            row["cells_f1"] = sc["f1"]
        per_fov.append(row)
    out = {
        "n_fovs": len(fovs),
        "iou": iou,
        "z_projection": p["z_projection"],
        "nuclei": _sum_scores(nuc_rows),
        "per_fov": per_fov,
    }
    if cell_rows:
        out["cells"] = _sum_scores(cell_rows)
    return out


# python -m raycell.ingest.segmentation_eval RAW_DIR [best-focus|max|mean|middle]: the CLI verb
# with a choice of Z projection (the table in docs/ingest.md)
if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python -m raycell.ingest.segmentation_eval RAW_DIR [z_projection]")
    res = evaluate_segmentation(
        sys.argv[1], z_projection=sys.argv[2] if len(sys.argv) > 2 else "best-focus"
    )
    res.pop("per_fov")
    print(json.dumps(res, indent=2))
