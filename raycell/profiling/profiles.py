"""Profiles from an embeddings folder: select, aggregate per well, reduce, score the heads.

The folder's layout and reader are a format (`raycell.formats.embeddings`, re-used here by name).
Everything here takes a metadata frame and a float32 matrix, so the report, `raycell export` and
`raycell embed` (well profiles) share one implementation of the steps the blog took by hand: drop
constant features, keep the top-k by variance, PCA, colour by each weak label.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from raycell.errors import UserError
from raycell.formats.arrays import is_list_column  # noqa: F401 - used via `P.`
from raycell.formats.embeddings import (  # noqa: F401 - the layout, used here and via `P.`
    COUNT,
    EMBEDDING_PREFIX,
    FEATURE_PREFIXES,
    LIST_COLUMN,
    MANIFEST,
    META_PREFIX,
    MORPH_PREFIX,
    PLATE,
    PRED_PREFIX,
    PROB_PREFIX,
    PROFILE_NAMES,
    SHARD_GLOB,
    WELL,
    EmbeddingsError,
    aggregate_wells,
    embedding_name,
    feature_columns,
    head_names,
    morph_columns,
    prob_matrix,
    read_embeddings,
    read_manifest,
)


def select_features(
    X: np.ndarray, names: list[str], top_k: int = 0, drop_zero_variance: bool = True
) -> tuple[np.ndarray, list[str]]:
    """Drop constant features, then keep the `top_k` highest-variance ones (0 = all), in order.

    The blog's selection before PCA: a constant feature carries no information, and a standardised
    PCA would otherwise give it the same weight as an informative one.
    """
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
        raise UserError(f"top_k must be an integer >= 0 (0 keeps every feature), got {top_k!r}")
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != len(names):
        raise UserError(f"features: X has shape {X.shape} but {len(names)} names were given")
    keep = np.ones(X.shape[1], dtype=bool)
    if drop_zero_variance and len(X):
        keep &= np.ptp(X, axis=0) > 0  # exact: one repeated value, not merely a small variance
        if not keep.any():
            raise UserError(
                f"every one of the {X.shape[1]} features is constant over the "
                f"{len(X)} rows: nothing to profile"
            )
    if top_k and top_k < int(keep.sum()):
        var = X.astype(np.float64).var(axis=0)
        var[~keep] = -np.inf
        keep = np.zeros_like(keep)
        keep[np.argsort(-var, kind="stable")[:top_k]] = True
    idx = np.flatnonzero(keep)
    return X[:, idx], [names[i] for i in idx]


def pca_coordinates(
    X: np.ndarray, n_components: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Standardised PCA: (coordinates as float32, explained variance ratio)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    Z = StandardScaler().fit_transform(np.asarray(X, dtype=np.float64))
    pca = PCA(n_components=n_components, random_state=seed)
    return pca.fit_transform(Z).astype(np.float32), pca.explained_variance_ratio_


def reduce(X: np.ndarray, method: str = "pca", n_components: int = 2, seed: int = 0) -> np.ndarray:
    """Coordinates (N, n_components) of the standardised features by "pca" or "umap".

    UMAP runs on the first 50 principal components, as scanpy does, so that it stays fast on
    2048-wide ResNet features; it needs the optional umap-learn package (imported only here; its
    first call in a process compiles numba code, about 20 s).
    """
    X = np.asarray(X)
    if method not in ("pca", "umap"):
        raise UserError(f"unknown reduction method {method!r} (use 'pca' or 'umap')")
    if X.ndim != 2:
        raise UserError(f"features must be a 2-d matrix (cells x features), got shape {X.shape}")
    limit = min(X.shape) if method == "pca" else X.shape[0] - 1
    if not 1 <= n_components <= limit:
        raise UserError(
            f"{method}: n_components={n_components} is not possible for {X.shape[0]} "
            f"rows x {X.shape[1]} features (at most {max(limit, 0)})"
        )
    if method == "pca":
        return pca_coordinates(X, n_components, seed)[0]
    try:
        import umap
    except ImportError:
        raise UserError(
            "UMAP needs the umap-learn package, which is not installed: "
            "pip install umap-learn (or use PCA)"
        ) from None
    import warnings

    pcs = pca_coordinates(X, min(50, *X.shape), seed)[0]
    with warnings.catch_warnings():  # "n_jobs overridden by random_state": wanted (reproducible)
        warnings.simplefilter("ignore", UserWarning)
        model = umap.UMAP(
            n_components=n_components, n_neighbors=min(15, len(X) - 1), random_state=seed
        )
        return np.asarray(model.fit_transform(pcs), dtype=np.float32)


def _label(v) -> str | None:
    """A metadata value as embed names a class (str(value)); None when missing."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, np.generic):
        v = v.item()
    return str(v)


def truth_column(meta: pd.DataFrame, head: str) -> str | None:
    """The truth column of `head`: `Metadata_<head>`, else its case-insensitive match.

    The AECs' single head `label` is scored against `Metadata_Label` that way.
    """
    if META_PREFIX + head in meta.columns:
        return META_PREFIX + head
    want = (META_PREFIX + head).lower()
    return next((str(c) for c in meta.columns if str(c).lower() == want), None)


def head_metrics(meta: pd.DataFrame, heads: dict | None = None) -> dict:
    """Accuracy, balanced accuracy and confusion of every head with `Pred_<h>` and `Metadata_<h>`.

    Truth values are compared as `str(value)` (dose 0.1 -> "0.1", time 24 -> "24"), as embed names
    the classes. Classes follow `heads` (default: the manifest in `meta.attrs`), with any truth
    value the head does not know appended; without it they are sorted. Cells missing a truth value
    or a prediction are left out. Confusion rows are the truth; `chance` is the balanced accuracy
    of a constant guess (1 / classes present).
    """
    if heads is None:
        heads = (meta.attrs.get("manifest") or {}).get("heads") or {}
    out = {}
    for h in head_names(meta):
        truth_col = truth_column(meta, h)
        if truth_col is None:
            continue
        # Labels per distinct value, then per cell by code: no Python loop over millions of cells.
        t_codes, t_uniq = pd.factorize(meta[truth_col].astype(object), use_na_sentinel=True)
        p_codes, p_uniq = pd.factorize(meta[PRED_PREFIX + h].astype(object), use_na_sentinel=True)
        t_lab = [_label(v) for v in t_uniq]
        p_lab = [_label(v) for v in p_uniq]
        known = [str(c) for c in heads.get(h, [])]
        if known:
            # An int column read back as float (a null turns int64 into float64): "24.0" -> "24".
            t_lab = [
                t[:-2]
                if t is not None and t.endswith(".0") and t not in known and t[:-2] in known
                else t
                for t in t_lab
            ]
            classes = known + sorted(set(t_lab) - {None} - set(known))
        else:
            classes = sorted((set(t_lab) | set(p_lab)) - {None})
        ok = (t_codes >= 0) & (p_codes >= 0)
        ok[ok] &= np.array([t is not None for t in t_lab], bool)[t_codes[ok]]
        ok[ok] &= np.array([p is not None for p in p_lab], bool)[p_codes[ok]]
        # A prediction outside the vocabulary (should not happen) still gets a column.
        used = {p_lab[i] for i in np.unique(p_codes[ok])}
        classes += sorted(used - set(classes))
        index = {c: i for i, c in enumerate(classes)}
        t_idx = np.array([index.get(t, -1) for t in t_lab], np.int64)[t_codes[ok]]
        p_idx = np.array([index.get(p, -1) for p in p_lab], np.int64)[p_codes[ok]]
        k = len(classes)
        conf = np.bincount(t_idx * k + p_idx, minlength=k * k).reshape(k, k).astype(np.int64)
        n = int(conf.sum())
        rows = conf.sum(axis=1)
        present = rows > 0
        out[h] = {
            "accuracy": float(np.trace(conf) / n) if n else float("nan"),
            "balanced_accuracy": float((np.diag(conf)[present] / rows[present]).mean())
            if n
            else float("nan"),
            "chance": 1.0 / int(present.sum()) if n else float("nan"),
            "classes": classes,
            "confusion": conf.tolist(),
            "n": n,
        }
    return out


def numeric_column(meta: pd.DataFrame, column: str) -> np.ndarray:
    """A metadata column as float64 (numbers stored as strings are parsed; missing -> NaN)."""
    if column not in meta.columns:
        cols = [str(c) for c in meta.columns if str(c).startswith(META_PREFIX)]
        raise UserError(
            f"no column {column!r} in the embeddings (metadata columns: {', '.join(cols)})"
        )
    col = meta[column]
    values = pd.to_numeric(col.astype(object).where(col.notna(), None), errors="coerce")
    bad = col.notna() & values.isna()
    if bad.any():
        raise UserError(f"column {column!r} is not numeric (e.g. {col[bad].iloc[0]!r})")
    return values.to_numpy(dtype=np.float64)


def pc1_spearman(meta: pd.DataFrame, X: np.ndarray, column: str) -> float:
    """|Spearman rho| between the first principal component of X and a numeric metadata column.

    The sign of a principal component is arbitrary, so only the size of rho means anything: 1 when
    PC1 orders the cells exactly as the column does (e.g. the doses), near 0 when it ignores it.
    Cells without a value are left out.
    """
    from scipy.stats import spearmanr

    y = numeric_column(meta, column)
    ok = np.isfinite(y)
    if len(np.unique(y[ok])) < 2:
        raise UserError(f"column {column!r} needs two different values to rank against PC1")
    X = np.asarray(X)[ok]
    if X.shape[0] < 3:
        raise UserError(f"PC1 vs {column}: needs 3 cells with a value, got {X.shape[0]}")
    rho = spearmanr(reduce(X, "pca", 1)[:, 0], y[ok]).statistic
    return float(abs(rho)) if np.isfinite(rho) else float("nan")
