"""CellProfiler-style hand-made features of single-cell crops: shape, intensity, texture.

Computed from the crops alone (no segmentation masks needed): the Otsu object at the centre of the
first (nucleus) channel and of the channel mean (the cell); regionprops shape of each; per channel the
mean and s.d. intensity inside and outside the cell, and grey-level co-occurrence texture inside it.
Used by the hand-made-feature baseline (`raycell.eval.baseline`) and, with `ingest.crop_features`,
stored at ingest as `feat_*` columns (computed where the crops are made, in parallel).
"""

from __future__ import annotations

import warnings

import numpy as np

from raycell import constants as K

_GLCM_LEVELS = 16
_TEXTURE = ("contrast", "homogeneity", "energy", "correlation")
_SHAPE = ("area", "perimeter", "eccentricity", "solidity", "major_axis", "minor_axis")


def otsu_masks(a: np.ndarray) -> np.ndarray:
    """Per-image Otsu foreground of a (N, H, W) stack, all images at once (256-bin histograms)."""
    n = len(a)
    flat = a.reshape(n, -1).astype(np.float64)
    lo, hi = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    q = np.clip(((flat - lo) / span * 255.0).astype(np.int64), 0, 255)
    hist = np.bincount((q + 256 * np.arange(n)[:, None]).ravel(), minlength=256 * n).reshape(n, 256)
    p = hist / hist.sum(1, keepdims=True)
    omega = np.cumsum(p, 1)
    mu = np.cumsum(p * np.arange(256), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_b = (mu[:, -1:] * omega - mu) ** 2 / (omega * (1.0 - omega))
    k = np.nan_to_num(sigma_b, nan=-1.0, posinf=-1.0).argmax(1)
    mask = q > k[:, None]
    mask[(hi <= lo)[:, 0]] = False  # a flat image has no object
    return mask.reshape(a.shape)


def centre_objects(mask: np.ndarray) -> np.ndarray:
    """The connected object nearest each (N, H, W) mask's centre, holes filled (empty if none)."""
    from scipy import ndimage

    n, h, w = mask.shape
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = True  # 8-connectivity within a crop, none across crops: one label call for all crops
    labels, _ = ndimage.label(mask, structure=plane)
    yy, xx = np.mgrid[:h, :w]
    d2 = (yy - (h - 1) / 2.0) ** 2 + (xx - (w - 1) / 2.0) ** 2
    flat = labels.reshape(n, -1)
    dist = np.where(flat > 0, d2.ravel()[None], np.inf)
    lab = flat[np.arange(n), dist.argmin(1)]  # 0 where a crop has no foreground at all
    obj = (labels == lab[:, None, None]) & (lab[:, None, None] > 0)
    # pad with empty crops so every crop's holes are interior to the stack, then fill in-plane
    filled = ndimage.binary_fill_holes(np.pad(obj, ((1, 1), (0, 0), (0, 0))), structure=plane)
    return filled[1:-1]


def _shape_features(obj: np.ndarray) -> np.ndarray:
    """(N, 6) regionprops shape of each crop's object; NaN for an empty one."""
    from skimage.measure import regionprops

    out = np.full((len(obj), len(_SHAPE)), np.nan)
    for i, m in enumerate(obj):
        if not m.any():
            continue
        r = regionprops(m.astype(np.uint8))[0]
        out[i] = (
            r.area,
            r.perimeter,
            r.eccentricity,
            r.solidity,
            r.axis_major_length,
            r.axis_minor_length,
        )
    return out


def _masked_stats(x: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and s.d. of each (N, H, W) image over its mask (NaN where the mask is empty)."""
    cnt = m.sum((1, 2)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (x * m).sum((1, 2)) / cnt
        var = ((x - mean[:, None, None]) ** 2 * m).sum((1, 2)) / cnt
    return mean, np.sqrt(var)


def _texture_features(x: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """(N, 4) GLCM contrast / homogeneity / energy / correlation inside each crop's object.

    Intensities inside the object are quantised to 16 levels between the object's own min and max
    (so a batch's gain does not move them); level 0 marks outside pixels and is dropped from the
    co-occurrence counts.
    """
    from skimage.feature import graycomatrix, graycoprops

    out = np.full((len(x), len(_TEXTURE)), np.nan)
    angles = [0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    for i in range(len(x)):
        m = obj[i]
        if m.sum() < 4:
            continue
        ys, xs = np.nonzero(m)
        sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        v, mm = x[i][sl], m[sl]
        lo, hi = v[mm].min(), v[mm].max()
        q = 1 + np.clip(
            ((v - lo) / (hi - lo if hi > lo else 1.0) * _GLCM_LEVELS).astype(np.int64),
            0,
            _GLCM_LEVELS - 1,
        )
        q = np.where(mm, q, 0).astype(np.uint8)
        glcm = graycomatrix(q, [1], angles, levels=_GLCM_LEVELS + 1, symmetric=True)[1:, 1:]
        if glcm.sum() == 0:
            continue
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore")
            for j, prop in enumerate(_TEXTURE):
                v = graycoprops(glcm, prop)
                out[i, j] = float(np.nanmean(v)) if np.isfinite(v).any() else np.nan
    return out


def crop_features(
    images: np.ndarray, channel_names: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """CellProfiler-style hand-made features of (N, C, H, W) crops centred on their cells.

    Objects: the Otsu foreground of channel 0 (the nucleus) and, with more than one channel, of the
    channel mean (the cell), each reduced to the connected object nearest the crop centre. Features:
    regionprops shape (area, perimeter, eccentricity, solidity, major/minor axis) of each object;
    per channel the mean and s.d. intensity inside and outside the cell object, and GLCM texture
    inside it. Deterministic; empty objects give NaN (imputed by the baseline's pipeline).

    Returns:
        (features (N, F) float64, feature names).
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"crop_features expects (N, C, H, W) crops, got shape {x.shape}")
    n, c = x.shape[:2]
    names = list(channel_names or [f"ch{i}" for i in range(c)])
    if not n:
        return np.zeros((0, 0)), []
    objects = {"nucleus": centre_objects(otsu_masks(x[:, 0]))}
    if c > 1:
        objects["cell"] = centre_objects(otsu_masks(x.mean(1)))
    ref = objects.get("cell", objects["nucleus"])
    cols, feats = [], []
    for obj_name, obj in objects.items():
        feats.append(_shape_features(obj))
        cols += [f"{obj_name}_{s}" for s in _SHAPE]
    for i, ch in enumerate(names):
        m_in, s_in = _masked_stats(x[:, i], ref)
        m_out, s_out = _masked_stats(x[:, i], ~ref)
        feats.append(np.stack([m_in, s_in, m_out, s_out], 1))
        cols += [f"{ch}_mean_in", f"{ch}_sd_in", f"{ch}_mean_out", f"{ch}_sd_out"]
        feats.append(_texture_features(x[:, i], ref))
        cols += [f"{ch}_glcm_{t}" for t in _TEXTURE]
    return np.concatenate(feats, 1).astype(np.float64), cols


def crop_feature_columns(
    images: np.ndarray, channel_names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """`crop_features` as float32 columns named `feat_<name>` (what ingest stores)."""
    x, names = crop_features(images, channel_names)
    return {f"{K.FEAT_PREFIX}{n}": x[:, i].astype(np.float32) for i, n in enumerate(names)}
