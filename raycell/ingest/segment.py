"""Segmentation of a field of view into nuclei and cell bodies, and scoring against true masks.

The default backend needs no weights: scikit-image only, in the spirit of CellProfiler's
IdentifyPrimaryObjects / IdentifySecondaryObjects:

1. **Nuclei** (primary objects) on the nucleus channel: subtraction of a smooth background floor (a
   robust 2nd-order polynomial surface: no object scale needed), Gaussian smoothing (sigma max(1,
   d/20) px), a global threshold (Otsu on log intensities by default; fluorescence intensities are
   closer to log-normal, so a few very bright mitotic nuclei do not drag the threshold up), or a
   local threshold for uneven images, each object's edge refined to its half-maximum (so the
   threshold decides *which* objects, not how big), objects fainter than `min_snr` pixel-noise sds
   dropped (an empty field gives nothing), hole filling, then **declumping**: a distance-transform
   watershed whose markers are the maxima of the distance map that stand out by at least `declump_h`
   x the expected radius (h-maxima). A threshold relative to the object's own size, not a pixel
   count, so the same setting splits 10 px and 60 px nuclei alike.
2. **Cell bodies** (secondary objects, when a cytoplasm channel is named): a foreground mask from
   the same thresholding on that channel, then a marker watershed seeded by the nuclei on the
   gradient magnitude of the smoothed cytoplasm image, with a small compactness (per nucleus
   diameter) so that touching cells with no visible edge between them are split near the midline
   (this approximates CellProfiler's "Propagation").
3. Objects smaller than `min_area` or larger than `max_area` are removed (both default to multiples
   of the expected object area).

Scale: everything is expressed in units of the expected nucleus (or object) **diameter** `d`. If it
is not given (0) it is estimated from the image: the median equivalent diameter of the thresholded
components that look like single objects (solidity >= 0.9); if those hold less than half the
foreground, twice the inscribed radius of each component (the maximum of its distance transform, the
size of the largest object inside a clump); medians are area-weighted so specks do not count.
Nothing is tuned to a particular data set. Images whose objects do not separate at threshold
(confluent cytoplasm-only stains) should set the diameter.

`cellpose` is an optional backend, imported lazily, used only with a local model file (never a
download).

`match_instances` scores a predicted label image against a ground-truth label image (precision,
recall, F1 at an IoU threshold, as in the cell-segmentation literature), and `evaluate_segmentation`
runs the pipeline's segmentation on a synthetic raw data set (`raycell synth --raw`) and scores it
against its true masks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from raycell.errors import UserError

METHODS = ("classical", "cellpose")
THRESHOLDS = ("otsu", "li", "local")


class SegmentationError(UserError, RuntimeError):
    """The segmentation backend cannot run (missing package or model file, bad parameters)."""


# --------------------------------------------------------------------------------------------------
# Thresholding and scale
# --------------------------------------------------------------------------------------------------


def _smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    return ndi.gaussian_filter(img.astype(np.float32, copy=False), sigma) if sigma > 0 else img


def noise_sigma(img: np.ndarray) -> float:
    """Standard deviation of the pixel noise (Immerkaer 1996, with a median for robustness).

    The 3x3 kernel below cancels any locally linear signal, so smooth structure (cells,
    illumination) hardly contributes; on white noise of sd s its output has sd 6 s.
    """
    k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    r = ndi.convolve(img.astype(np.float32, copy=False), k, mode="reflect")[1:-1, 1:-1]
    return float(1.4826 * np.median(np.abs(r)) / 6.0)


def background_surface(img: np.ndarray, order: int = 2, iters: int = 4) -> np.ndarray:
    """A smooth background floor: a polynomial surface fitted to the pixels that are not objects.

    The fit is robust (iterated, keeping pixels less than one robust sd above the current surface),
    on a subsample of about 64 x 64 points; a 2nd-order surface follows gradients and vignetting but
    cannot follow anything the size of a cell, so it needs no object scale (unlike a rolling ball).
    """
    h, w = img.shape
    sy, sx = max(1, h // 64), max(1, w // 64)
    sub = img[::sy, ::sx].astype(np.float64)
    yy, xx = np.mgrid[0:h:sy, 0:w:sx]
    yy, xx = (yy / max(h - 1, 1)) * 2 - 1, (xx / max(w - 1, 1)) * 2 - 1
    terms = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    design = np.stack([(yy**i * xx**j).ravel() for i, j in terms], axis=1)
    v = sub.ravel()
    keep = v <= np.percentile(v, 50)  # start from the darker half: objects are bright
    for _ in range(iters):
        coef, *_ = np.linalg.lstsq(design[keep], v[keep], rcond=None)
        r = v - design @ coef
        sd = 1.4826 * np.median(np.abs(r[keep] - np.median(r[keep]))) + 1e-12
        keep = r < sd
    gy = np.linspace(-1, 1, h)[:, None]
    gx = np.linspace(-1, 1, w)[None, :]
    return sum(c * gy**i * gx**j for c, (i, j) in zip(coef, terms)).astype(np.float32)


def foreground(
    img: np.ndarray,
    method: str = "otsu",
    scale: float = 1.0,
    log: bool = True,
    block: int = 0,
    refine: int = 2,
    noise: float = 0.0,
    min_snr: float = 3.0,
) -> np.ndarray:
    """Binary foreground of a (smoothed) image by a global or local threshold, refined per object.

    Args:
        img: 2-D float image.
        method: 'otsu', 'li' (minimum cross entropy) or 'local' (Gaussian-weighted local mean,
            floored by half the global threshold so that empty background tiles do not light up).
        scale: multiplies the threshold (CellProfiler's "threshold correction factor"), applied in
            intensity units.
        log: threshold log intensities: robust to a few very bright objects (it finds dim objects
            next to bright ones), at the price of a threshold close to the background, which makes
            objects too big.
        block: block size in pixels for 'local' (odd; 0 = whole image / 4).
        refine: rounds of boundary refinement: each connected component is re-thresholded at half
            way between the background (median outside the mask) and the component's median
            intensity, the "half maximum" edge of a blurred object, so the detection threshold does
            not decide the object's size. 0 = off.
        noise: pixel-noise sd of the raw image (`noise_sigma`); with it, components whose median is
            not at least `min_snr` noise sds above the background are dropped. Otsu always splits an
            image in two, so without this an empty field (background and noise only) would give
            "cells".
        min_snr: see `noise`.
    """
    from skimage import filters

    if method not in THRESHOLDS:
        raise SegmentationError(f"unknown threshold method {method!r}; use one of {THRESHOLDS}")
    x = img - float(img.min())
    if not np.any(x > 0):
        return np.zeros(img.shape, bool)
    med = max(float(np.median(x)), 1e-6)
    t_in = np.log1p(x / med) if log else x
    # fit the threshold in the transformed domain, then map it back so `scale` acts on intensities
    fn = filters.threshold_li if method == "li" else filters.threshold_otsu
    t = float(fn(t_in))
    if log:
        t = float(np.expm1(t) * med)
    if method == "local":
        b = block or max(3, (min(img.shape) // 4) | 1)
        local = filters.threshold_local(x, block_size=b | 1, method="gaussian")
        mask = x > np.maximum(local * scale, 0.5 * t)
    else:
        mask = x > t * scale
    if refine <= 0 or not mask.any() or mask.all():
        return mask
    bg = float(np.median(x[~mask]))
    lab, n = ndi.label(mask)
    index = np.arange(1, n + 1)
    if noise > 0:
        level = np.asarray(ndi.median(x, lab, index=index), np.float64)
        faint = np.concatenate([[False], level < bg + min_snr * noise])
        if faint.any():
            mask = mask & ~faint[lab]
            lab[~mask] = 0
    cur = mask
    for _ in range(refine):
        level = np.asarray(ndi.median(x, np.where(cur, lab, 0), index=index), np.float64)
        level = np.nan_to_num(level, nan=np.inf)  # a component refined away stays away
        cut = np.concatenate([[np.inf], bg + 0.5 * (level - bg)])
        cur = mask & (x > cut[lab])
    return cur


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2)])


def estimate_diameter(mask: np.ndarray, min_px: int = 9) -> float:
    """Typical object diameter (px) from a foreground mask; 0 if there are no objects.

    Medians are weighted by area (the size of the object a typical foreground pixel belongs to), so
    specks and debris do not pull the estimate down. Components that look like single objects
    (solidity >= 0.9) give their equivalent diameter when they hold at least half of the foreground;
    otherwise (clumps, ragged cells) twice the inscribed radius of each component is used, which for
    a clump is the size of its largest member rather than of the clump.
    """
    from skimage import measure

    lab, n = ndi.label(mask)
    if n == 0:
        return 0.0
    props = measure.regionprops_table(
        lab, properties=("area", "solidity", "equivalent_diameter_area")
    )
    area = props["area"].astype(np.float64)
    big = area >= min_px
    if not big.any():
        return 0.0
    single = big & (props["solidity"] >= 0.9)
    if area[single].sum() >= 0.5 * area[big].sum():
        return _weighted_median(props["equivalent_diameter_area"][single], area[single])
    inscribed = 2 * ndi.maximum(ndi.distance_transform_edt(mask), lab, index=np.arange(1, n + 1))
    return _weighted_median(np.asarray(inscribed)[big], area[big])


def _area_limits(d: float, min_area: float, max_area: float) -> tuple[float, float]:
    a = np.pi * (d / 2) ** 2
    # defaults: a quarter of the typical area (debris, fragments) up to 8x (large clumps /
    # multinucleate);
    # both are relative to the image's own scale, see module docstring
    return (min_area if min_area > 0 else 0.25 * a), (max_area if max_area > 0 else 8.0 * a)


def _filter_sizes(labels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Remove labels with area outside [lo, hi] and renumber 1..n."""
    from skimage.segmentation import relabel_sequential

    if labels.max() == 0:
        return labels
    area = np.bincount(labels.ravel())
    bad = (area < lo) | (area > hi)
    bad[0] = False
    out = labels.copy()
    out[bad[labels]] = 0
    return relabel_sequential(out)[0].astype(np.int32)


# --------------------------------------------------------------------------------------------------
# Classical backend
# --------------------------------------------------------------------------------------------------


def segment_nuclei(
    img: np.ndarray,
    diameter: float = 0.0,
    threshold: str = "otsu",
    threshold_scale: float = 1.0,
    log_threshold: bool = True,
    declump: str = "shape",
    declump_h: float = 0.2,
    min_area: float = 0.0,
    max_area: float = 0.0,
    min_snr: float = 3.0,
    flatten: bool = True,
) -> tuple[np.ndarray, float]:
    """Primary objects (nuclei, or whole cells when there is one stain) by threshold + watershed.

    Args:
        img: 2-D float image of the nucleus (primary) channel.
        diameter: expected object diameter in px; 0 = estimate from the image.
        threshold: 'otsu', 'li' or 'local' (see `foreground`).
        threshold_scale: threshold correction factor.
        log_threshold: threshold log intensities.
        declump: 'shape' (distance-transform maxima), 'intensity' (maxima of the image smoothed at
            the object scale, for objects brighter in the middle, e.g. cytoplasm-only stains) or
            'none'.
        declump_h: how far (as a fraction of the expected radius) a maximum must stand above the
            saddle to its neighbour to seed its own object.
        min_area: smallest kept area in px (0 = a quarter of the expected area).
        max_area: largest kept area in px (0 = 8x the expected area).
        min_snr: objects must be this many pixel-noise sds brighter than the background (see
            `foreground`); an empty field then gives no objects.
        flatten: subtract `background_surface` first, so an uneven background (illumination
            gradient, vignetting, offset) is not mistaken for objects when there is no illumination
            correction.

    Returns:
        (labels int32 HxW with 0 = background, the diameter used).
    """
    from skimage import morphology, segmentation

    if declump not in ("shape", "intensity", "none"):
        raise SegmentationError(f"unknown declump method {declump!r}; use shape, intensity or none")
    noise = noise_sigma(img)
    if flatten:
        img = img - background_surface(img)

    def mask_at(sigma: float, d: float) -> np.ndarray:
        fg = foreground(
            _smooth(img, sigma),
            threshold,
            threshold_scale,
            log_threshold,
            block=int(4 * d) | 1 if d > 0 else 0,
            noise=noise,
            min_snr=min_snr,
        )
        return ndi.binary_fill_holes(ndi.binary_opening(fg))

    # pixel-noise smoothing first (sigma 1); large objects are re-thresholded at sigma d/20, so that
    # the
    # texture inside big cells does not fray their outline
    fg = mask_at(max(1.0, diameter / 20), diameter)
    d = diameter if diameter > 0 else estimate_diameter(fg)
    if diameter <= 0 and d / 20 > 1.5:
        fg = mask_at(d / 20, d)
    if d <= 0 or not fg.any():
        return np.zeros(img.shape, np.int32), float(d)
    lo, hi = _area_limits(d, min_area, max_area)
    r = d / 2
    comp, _ = ndi.label(fg)
    if declump == "none":
        return _filter_sizes(comp.astype(np.int32), lo, hi), float(d)
    if declump == "shape":
        # distance map smoothed at a small fraction of the radius: keeps one maximum per convex lobe
        surf = ndi.gaussian_filter(ndi.distance_transform_edt(fg), max(1.0, r / 6))
        h = declump_h * r
    else:
        surf = _smooth(
            img, max(1.0, d / 7)
        )  # CellProfiler's auto smoothing: sigma = min size / 3.5
        surf = (
            (surf - surf[fg].min()) / max(float(np.ptp(surf[fg])), 1e-6) * r
        )  # same units as 'shape'
        h = declump_h * r
    peaks = morphology.h_maxima(surf, h) & fg
    markers, _ = ndi.label(peaks)
    # components without any marker still become one object each
    missing = np.setdiff1d(np.unique(comp[fg]), np.unique(comp[markers > 0]))
    if missing.size:
        extra = np.isin(comp, missing)
        markers[extra] = comp[extra] + markers.max()
    labels = segmentation.watershed(-surf, markers, mask=fg)
    return _filter_sizes(labels.astype(np.int32), lo, hi), float(d)


def segment_cells(
    nuclei: np.ndarray,
    cyto: np.ndarray,
    diameter: float,
    threshold: str = "otsu",
    threshold_scale: float = 1.0,
    log_threshold: bool = True,
    compactness: float = 0.05,
    max_area: float = 0.0,
    flatten: bool = True,
) -> np.ndarray:
    """Secondary objects: grow each nucleus into the cytoplasm channel (marker watershed).

    Args:
        nuclei: label image of the primary objects (the seeds; labels are kept, so cell k holds
            nucleus k).
        cyto: 2-D float image of the cytoplasm channel.
        diameter: the nuclei's diameter (sets the smoothing scale and, with max_area, the size
            limit).
        threshold: as in `foreground`, on the cytoplasm channel.
        threshold_scale: as in `foreground`.
        log_threshold: as in `foreground`.
        compactness: watershed compactness per nucleus diameter (0 = a pure gradient watershed); it
            makes featureless contacts split near the midline between the two nuclei instead of
            wherever the noise puts the weakest edge.
        max_area: largest cell area in px (0 = no limit beyond the foreground).
        flatten: subtract `background_surface` from the cytoplasm image first.

    Returns:
        int32 label image of cells with the nuclei's label numbers (a nucleus whose cell would be
        empty keeps at least its own pixels).
    """
    from skimage import filters, segmentation

    if nuclei.max() == 0:
        return nuclei.copy()
    noise = noise_sigma(cyto)
    if flatten:
        cyto = cyto - background_surface(cyto)
    sm = _smooth(cyto, max(1.0, diameter / 20))
    fg = foreground(sm, threshold, threshold_scale, log_threshold, noise=noise) | (nuclei > 0)
    fg = ndi.binary_fill_holes(ndi.binary_opening(fg) | (nuclei > 0))
    grad = filters.sobel(sm / max(float(np.percentile(sm[fg], 99)), 1e-6))
    # compactness is given per nucleus diameter, so that the same value means the same trade-off
    # between
    # following edges and staying round at any magnification (skimage's is per pixel of distance)
    cells = segmentation.watershed(
        grad, nuclei, mask=fg, compactness=compactness / max(diameter, 1.0)
    ).astype(np.int32)
    if max_area > 0:
        area = np.bincount(cells.ravel(), minlength=nuclei.max() + 1)
        big = np.flatnonzero(area > max_area)
        big = big[big > 0]
        if big.size:  # a runaway cell (foreground leak) falls back to its nucleus
            sel = np.isin(cells, big)
            cells[sel] = nuclei[sel]
    return cells


# --------------------------------------------------------------------------------------------------
# Cellpose backend (optional; never downloads)
# --------------------------------------------------------------------------------------------------


def _cellpose_model(model_path: str):
    try:
        from cellpose import models  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise SegmentationError(
            "ingest.segmentation=cellpose needs the 'cellpose' package, which is not "
            "installed (pip install cellpose), or use segmentation=classical"
        ) from None
    if not model_path or not Path(model_path).is_file():
        raise SegmentationError(
            f"ingest.cellpose_model must name a local cellpose model file; "
            f"{model_path or '(empty)'} does not exist (raycell never downloads weights)"
        )
    return models.CellposeModel(gpu=False, pretrained_model=str(model_path))


def segment_cellpose(img: np.ndarray, model_path: str, diameter: float = 0.0) -> np.ndarray:
    """Label image from a local cellpose model on a (C, H, W) or (H, W) image."""
    model = _cellpose_model(model_path)
    out = model.eval(img, diameter=diameter or None, channel_axis=0 if img.ndim == 3 else None)
    return np.asarray(out[0], np.int32)


def check_backend(method: str, model_path: str = "") -> None:
    """Raise SegmentationError early (before any task starts) if the backend cannot run."""
    if method not in METHODS:
        raise SegmentationError(f"unknown segmentation method {method!r}; use one of {METHODS}")
    if method == "cellpose":
        _cellpose_model(model_path)


def segment(
    img: np.ndarray, nucleus: int, cytoplasm: int | None, p: dict
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Segment one field of view with the configured backend.

    Args:
        img: (C, H, W) float image (projected, illumination-corrected, not yet normalised).
        nucleus: channel index of the primary objects.
        cytoplasm: channel index to grow cell bodies into, or None.
        p: the ingest parameters (`IngestConfig` as a dict).

    Returns:
        (nuclei labels, cell labels or None, diameter used in px).
    """
    if p.get("segmentation", "classical") == "cellpose":
        chans = [nucleus] if cytoplasm is None else [cytoplasm, nucleus]
        cells = segment_cellpose(img[chans], p.get("cellpose_model", ""), p.get("diameter", 0.0))
        d = 2 * np.sqrt(np.bincount(cells.ravel())[1:].mean() / np.pi) if cells.max() else 0.0
        return cells, None, float(d)
    nuc, d = segment_nuclei(
        img[nucleus],
        diameter=p.get("diameter", 0.0),
        threshold=p.get("threshold", "otsu"),
        threshold_scale=p.get("threshold_scale", 1.0),
        log_threshold=p.get("log_threshold", True),
        declump=p.get("declump", "shape"),
        declump_h=p.get("declump_h", 0.2),
        min_area=p.get("min_area", 0.0),
        max_area=p.get("max_area", 0.0),
        min_snr=p.get("min_snr", 3.0),
        flatten=p.get("flatten", True),
    )
    cells = None
    if cytoplasm is not None:
        cells = segment_cells(
            nuc,
            img[cytoplasm],
            d,
            threshold=p.get("threshold", "otsu"),
            threshold_scale=p.get("threshold_scale", 1.0),
            log_threshold=p.get("log_threshold", True),
            compactness=p.get("cell_compactness", 0.05),
            max_area=p.get("max_cell_area", 0.0),
            flatten=p.get("flatten", True),
        )
    return nuc, cells, d


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


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
    from raycell.ingest.images import load_fov_image
    from raycell.ingest.sources import discover, group_fovs
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


if __name__ == "__main__":  # python -m raycell.ingest.segment RAW_DIR [best-focus|max|mean|middle]
    import json
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python -m raycell.ingest.segment RAW_DIR [z_projection]")
    res = evaluate_segmentation(
        sys.argv[1], z_projection=sys.argv[2] if len(sys.argv) > 2 else "best-focus"
    )
    res.pop("per_fov")
    print(json.dumps(res, indent=2))
