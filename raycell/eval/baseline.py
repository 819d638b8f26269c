"""A hand-made-feature baseline: logistic regression on per-cell features, scored like a deep model.

Every comparison needs it: a deep model that does not beat a linear model on shape and intensity
features on the unseen batches has not learnt anything the features do not already give.

* Features: the data set's `morph_*` columns when it has them (written by `raycell ingest`), else
  features computed from the crops themselves (:func:`crop_features`: Otsu object at the centre of
  the first (nucleus) channel and of the channel mean (cell); regionprops shape; per-channel
  intensity inside / outside the cell; grey-level co-occurrence texture inside the cell); or both
  ('all': the ingest's shape columns and the CellProfiler-style intensity and texture of the crops).
  `baseline_sources` gives an experiment's rows: with 'auto' and `morph_*` present, two rows, the
  shape columns alone and the richer set, so a table shows whether a deep model beats either.
* Model: median imputation + standardisation + `LogisticRegression(class_weight="balanced")`,
  fitted on the `train` split (at most `max_cells` cells, fixed-seed subsample).
* Metrics per evaluated split (`test` = seen batches, `unseen`): the same keys `raycell evaluate`
  gives a deep model (AUROC with DeLong CI, balanced accuracy, F1 from
  `raycell.eval.classification`; DB / CH / batch probe etc. from `raycell.eval.latent` on the
  standardised features, i.e. how much batch the features carry); `mse` / `ssim` are NaN.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from raycell import constants as K
from raycell.errors import UserError

__all__ = ["BASELINE_MODEL", "baseline_label", "baseline_sources", "crop_features", "feature_source",
           "load_features", "fit_baseline", "baseline_metrics", "evaluate_baseline", "baseline_row"]

BASELINE_MODEL = "baseline"  # the `model` of a baseline row (its table label: `baseline_label`)
FEATURE_SOURCES = K.BASELINE_FEATURES
_GLCM_LEVELS = 16
_TEXTURE = ("contrast", "homogeneity", "energy", "correlation")
_SHAPE = ("area", "perimeter", "eccentricity", "solidity", "major_axis", "minor_axis")


def baseline_label(source: str) -> str:
    """The table row name of the baseline on features from `source` ('morph_*', 'crops' or both)."""
    return f"logreg on hand-made features ({source})"


# ------------------------------------------------------------------------------------------------
# Features from crops


def _otsu_masks(a: np.ndarray) -> np.ndarray:
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


def _centre_objects(mask: np.ndarray) -> np.ndarray:
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
        out[i] = (r.area, r.perimeter, r.eccentricity, r.solidity, r.axis_major_length,
                  r.axis_minor_length)
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
        q = 1 + np.clip(((v - lo) / (hi - lo if hi > lo else 1.0) * _GLCM_LEVELS).astype(np.int64),
                        0, _GLCM_LEVELS - 1)
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


def crop_features(images: np.ndarray, channel_names: list[str] | None = None
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
    objects = {"nucleus": _centre_objects(_otsu_masks(x[:, 0]))}
    if c > 1:
        objects["cell"] = _centre_objects(_otsu_masks(x.mean(1)))
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


# ------------------------------------------------------------------------------------------------
# Data set -> features -> fitted baseline -> metrics


def _subsample(n: int, max_cells: int, seed: int) -> np.ndarray:
    """Sorted indices of a fixed-seed subsample of at most `max_cells` of `n` rows."""
    if max_cells <= 0 or n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_cells])


def _has_morph(data: str | Path, features: str) -> bool:
    from raycell.formats.shards import open_dataset

    if features not in FEATURE_SOURCES:
        raise UserError(f"eval.baseline_features: {features!r} is not one of "
                        f"{', '.join(FEATURE_SOURCES)}")
    ds = open_dataset(data)
    has_morph = any(c.startswith(K.MORPH_PREFIX) for c in ds.columns())
    if features == "morph" and not has_morph:
        raise UserError(f"{ds.root}: eval.baseline_features=morph, but its shards have no "
                        f"{K.MORPH_PREFIX}* columns (use 'crops', 'all' or 'auto')")
    return has_morph


def feature_source(data: str | Path, features: str = "auto") -> str:
    """The features `load_features` uses on `data`: 'morph_*', 'crops' or 'morph_*+crops' (reads the
    schema)."""
    has_morph = _has_morph(data, features)
    if not has_morph or features == "crops":
        return "crops"
    return f"{K.MORPH_PREFIX}*+crops" if features == "all" else f"{K.MORPH_PREFIX}*"


def baseline_sources(data: str | Path, features: str = "auto") -> list[str]:
    """The `features` value of each baseline row of an experiment on `data`.

    'auto' with `morph_*` columns gives two rows, 'morph' (the ingest's shape columns) and 'all' (those
    plus the crops' intensity and texture: a richer, CellProfiler-style set); 'auto' without them one
    'crops' row; any other value one row of its own.
    """
    if features != "auto":
        _has_morph(data, features)  # checks the value and that morph_* exist for 'morph'
        return [features]
    return ["morph", "all"] if _has_morph(data, features) else ["crops"]


def load_features(data: str | Path, splits: list[str], features: str = "auto",
                  max_cells: int = 5000, seed: int = 0) -> dict:
    """Per split, the baseline's feature matrix and metadata (at most `max_cells` cells each).

    Args:
        data: A crop data set folder (`raycell synth` / `ingest` / `import-armed`).
        splits: Splits to load (those with no cells are left out).
        features: 'morph' (the `morph_*` columns), 'crops' (`crop_features`), 'all' (both, side by
            side) or 'auto' (morph_* when the data set has them, else crops).
        max_cells: Cells per split (fixed-seed subsample; <= 0 = all).
        seed: Seed of the subsample.

    Returns:
        {"source" (`feature_source`), "names", "label_vocab", "splits": {split: {"x", "meta"}},
        "seconds"}.
    """
    from raycell.formats.shards import decode_images, open_dataset

    t0 = time.time()
    source = feature_source(data, features)
    use_morph, use_crops = source != "crops", source.endswith("crops")
    ds = open_dataset(data)
    morph = [c for c in ds.columns() if c.startswith(K.MORPH_PREFIX)] if use_morph else []
    meta_cols = [c for c in (K.CELL_ID, K.BATCH, K.LABEL, K.SPLIT) if c in ds.columns()]
    out: dict = {"source": source, "label_vocab": list(ds.manifest["label_vocab"]), "splits": {}}
    for split in splits:
        t = ds.read_table(meta_cols + morph + ([K.IMAGE] if use_crops else []), [split])
        if not t.num_rows:
            continue
        t = t.take(_subsample(t.num_rows, max_cells, seed))
        meta = t.select(meta_cols).to_pandas()
        xs, names = [], list(morph)
        if use_morph:
            xs.append(np.column_stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                                       for c in morph]))
        if use_crops:
            imgs = decode_images(t, ds.shape, ds.dtype, where=str(ds.root))
            x_crops, crop_names = crop_features(imgs, ds.manifest.get("channel_names"))
            xs.append(x_crops)
            names += crop_names
        out["splits"][split] = {"x": np.concatenate(xs, 1), "meta": meta}
        out["names"] = names
    out["seconds"] = round(time.time() - t0, 1)
    return out


def fit_baseline(x: np.ndarray, y: np.ndarray, seed: int = 0):
    """Median imputation + standardisation + balanced logistic regression, fitted on (x, y)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True),
                         StandardScaler(),
                         LogisticRegression(class_weight="balanced", max_iter=2000,
                                            random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.fit(np.where(np.isfinite(x), x, np.nan), y)
    return pipe


def baseline_metrics(pipe, x: np.ndarray, meta: pd.DataFrame, label_vocab: list[str]) -> dict:
    """The metrics `raycell evaluate` gives a deep model's split, for the fitted baseline on x."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from raycell.eval.classification import classification_metrics
    from raycell.eval.latent import latent_metrics

    res: dict = {"n": int(len(meta))}
    known = meta[K.LABEL].isin(label_vocab).to_numpy()
    if not known.all():
        res["n_unknown_label"] = int((~known).sum())
    y = pd.Categorical(meta[K.LABEL], categories=label_vocab).codes
    x = np.where(np.isfinite(x), x, np.nan)
    if known.any():
        prob = np.zeros((len(x), len(label_vocab)))
        prob[:, pipe.classes_] = pipe.predict_proba(x)  # a class absent from train keeps prob 0
        if len(label_vocab) == 2:
            res.update(classification_metrics(y[known], prob[known, 1]))
        else:
            pred = prob[known].argmax(1)
            res.update({"balanced_accuracy": float(balanced_accuracy_score(y[known], pred)),
                        "f1": float(f1_score(y[known], pred, average="macro")),
                        "accuracy": float((pred == y[known]).mean())})
    res["mse"] = math.nan  # no reconstruction: keeps the deep rows' keys
    res["ssim"] = math.nan
    z = pipe[:-1].transform(x)  # imputed, standardised with the train statistics
    res.update(latent_metrics(z, meta[K.LABEL].to_numpy(), meta[K.BATCH].to_numpy()))
    return res


def evaluate_baseline(feats: dict, splits: list[str], seed: int = 0) -> dict:
    """Fit on the `train` features of `load_features`' output, score `splits`: {split: metrics}."""
    if K.TRAIN not in feats["splits"]:
        raise UserError("baseline: the data set has no 'train' cells; run `raycell split` on it")
    tr = feats["splits"][K.TRAIN]
    labels = tr["meta"][K.LABEL]
    keep = labels.isin(feats["label_vocab"]).to_numpy()
    y = pd.Categorical(labels[keep], categories=feats["label_vocab"]).codes
    if len(np.unique(y)) < 2:
        raise UserError("baseline: the 'train' split has a single label; nothing to classify")
    pipe = fit_baseline(tr["x"][keep], y, seed)
    return {s: baseline_metrics(pipe, feats["splits"][s]["x"], feats["splits"][s]["meta"],
                                feats["label_vocab"])
            for s in splits if s in feats["splits"]}


def baseline_row(data: str | Path, seed: int = 0, features: str = "auto", max_cells: int = 5000,
                 feats: dict | None = None) -> dict:
    """One experiment-table row of the baseline (the keys of a deep model's row; no checkpoint).

    Args:
        data: The crop data set (split).
        seed: The row's seed (logistic regression's `random_state`; the cells and features do not
            depend on it, so rows of different seeds agree up to solver noise).
        features: See `load_features`.
        max_cells: Cells per split.
        feats: `load_features(data, [train, test, unseen], ...)` computed earlier (reused across
            seeds).
    """
    t0 = time.time()
    if feats is None:
        feats = load_features(data, [K.TRAIN, K.TEST, K.UNSEEN], features, max_cells)
    ev = evaluate_baseline(feats, [K.TEST, K.UNSEEN], seed)
    return {"model": BASELINE_MODEL, "label": baseline_label(feats["source"]), "seed": seed,
            "run_dir": "", "checkpoint": "", "train_seconds": 0.0,
            "final_metrics": {"features": feats["source"],
                              "n_features": len(feats.get("names", [])),
                              "feature_names": feats.get("names", []),
                              "n_train": int(len(feats["splits"][K.TRAIN]["meta"])),
                              "feature_seconds": feats.get("seconds")},
            "seconds": round(time.time() - t0 + feats.get("seconds", 0.0), 1),
            "test": ev.get(K.TEST, {}), "unseen": ev.get(K.UNSEEN, {})}
