"""Evaluation metrics for single-cell image representation learning.

Everything here is pure numpy / scipy / scikit-learn / scikit-image (no torch, no ray), so it can
be used by the evaluate stage, by inference (one value per cell) and in tests alike.

Contents:

* **Classification** -- :func:`auroc_ci` (AUROC with a DeLong confidence interval, fast midrank
  algorithm of Sun & Xu 2014) and :func:`classification_metrics` (AUROC + CI, balanced accuracy,
  F1, accuracy).
* **Reconstruction** -- :func:`reconstruction_metrics`, :func:`per_cell_mse` and
  :func:`per_cell_ssim` (a vectorised SSIM that reproduces
  ``skimage.metrics.structural_similarity``).
* **Batch effects in latent space** -- :func:`batch_clustering` (Davies-Bouldin and
  Calinski-Harabasz, as in the ARMED reference), :func:`batch_silhouette` (scib),
  :func:`ilisi` (kNN inverse Simpson's index), :func:`batch_probe_accuracy` (linear probe).
* **Biology preserved in latent space** -- :func:`label_silhouette` and
  :func:`nsb_1nn_accuracy` (1-NN label accuracy restricted to neighbours from another batch).
* **Batch effects in (reconstructed) images** -- :func:`per_batch_image_stats` (brightness,
  contrast, sharpness) and :func:`image_stats_anova` (one-way ANOVA F across batches).
* :func:`latent_metrics` bundles the latent-space metrics into one flat dict.

All functions return plain Python floats / dicts (or numpy arrays / a DataFrame where stated) and
return NaN instead of raising where a metric is undefined (e.g. a single class or a single batch).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage, stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    f1_score,
    silhouette_samples,
    silhouette_score,
)
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = [
    "auroc_ci",
    "classification_metrics",
    "reconstruction_metrics",
    "per_cell_mse",
    "per_cell_ssim",
    "zscore",
    "batch_clustering",
    "batch_silhouette",
    "ilisi",
    "batch_probe_accuracy",
    "label_silhouette",
    "nsb_1nn_accuracy",
    "per_batch_image_stats",
    "image_stats_anova",
    "latent_metrics",
]

NAN = float("nan")
_MAX_SILHOUETTE_CELLS = 5000
_SUBSAMPLE_SEED = 0


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _subsample_idx(
    n: int, max_n: int = _MAX_SILHOUETTE_CELLS, seed: int = _SUBSAMPLE_SEED
) -> np.ndarray:
    """Indices of a fixed-seed random subsample of at most ``max_n`` of ``n`` items (sorted)."""
    if n <= max_n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_n, replace=False))


def _as_2d(latents: np.ndarray) -> np.ndarray:
    x = np.asarray(latents, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    return x.reshape(len(x), -1)


def _as_nchw(images: np.ndarray) -> np.ndarray:
    """Accept (N, H, W) or (N, C, H, W); return (N, C, H, W)."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W) or (N, H, W), got {x.shape}")
    return x


def _n_unique(a: np.ndarray) -> int:
    return len(np.unique(np.asarray(a)))


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def _midrank(x: np.ndarray) -> np.ndarray:
    """Midranks (1-based, ties get the average rank), as in Sun & Xu (2014)."""
    return stats.rankdata(x, method="average")


def _delong_auc_var(y_true: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """AUC and its DeLong variance via the fast midrank algorithm (Sun & Xu 2014)."""
    pos = score[y_true == 1]
    neg = score[y_true == 0]
    m, n = len(pos), len(neg)
    tx = _midrank(pos)
    ty = _midrank(neg)
    tz = _midrank(np.concatenate([pos, neg]))
    auc = tz[:m].sum() / (m * n) - (m + 1.0) / (2.0 * n)
    # Structural components (placement values).
    v10 = (tz[:m] - tx) / n  # for each positive: fraction of negatives it beats
    v01 = 1.0 - (tz[m:] - ty) / m  # for each negative: fraction of positives that beat it
    s10 = np.var(v10, ddof=1) if m > 1 else 0.0
    s01 = np.var(v01, ddof=1) if n > 1 else 0.0
    var = s10 / m + s01 / n
    return float(auc), float(var)


def auroc_ci(y_true: np.ndarray, score: np.ndarray, alpha: float = 0.05) -> dict:
    """Area under the ROC curve with a DeLong confidence interval.

    Definition: AUROC is the probability that a randomly chosen positive scores higher than a
    randomly chosen negative (ties count one half), i.e. the Mann-Whitney U statistic divided by
    ``n_pos * n_neg``. Its variance is DeLong's nonparametric estimate
    ``var = S10 / n_pos + S01 / n_neg``, where ``S10`` (``S01``) is the sample variance of the
    per-positive (per-negative) placement values, computed with the fast midrank algorithm. The
    ``1 - alpha`` CI is ``auroc +/- z_{1-alpha/2} * sqrt(var)`` on the AUC scale, clipped to
    [0, 1]. Higher AUROC is better (0.5 = chance, 1 = perfect ranking).

    References:
        DeLong ER, DeLong DM, Clarke-Pearson DL (1988). Comparing the areas under two or more
        correlated receiver operating characteristic curves: a nonparametric approach.
        Biometrics 44(3):837-845.
        Sun X, Xu W (2014). Fast implementation of DeLong's algorithm for comparing the areas
        under correlated receiver operating characteristic curves. IEEE Signal Processing
        Letters 21(11):1389-1393.

    Args:
        y_true: Binary labels (0/1), shape (N,).
        score: Scores / probabilities for class 1, shape (N,). Higher means more positive.
        alpha: Two-sided significance level of the interval (0.05 -> 95% CI).

    Returns:
        ``{"auroc", "ci_low", "ci_high", "n", "n_pos"}``. If only one class is present the first
        three are NaN.
    """
    y = np.asarray(y_true).ravel().astype(int)
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true and score have different shapes: {y.shape} vs {s.shape}")
    n = int(len(y))
    n_pos = int((y == 1).sum())
    out: dict[str, Any] = {"auroc": NAN, "ci_low": NAN, "ci_high": NAN, "n": n, "n_pos": n_pos}
    if n_pos == 0 or n_pos == n:
        return out
    auc, var = _delong_auc_var(y, s)
    z = float(stats.norm.ppf(1.0 - alpha / 2.0))
    half = z * np.sqrt(max(var, 0.0))
    out.update(
        auroc=auc,
        ci_low=float(np.clip(auc - half, 0.0, 1.0)),
        ci_high=float(np.clip(auc + half, 0.0, 1.0)),
    )
    return out


def classification_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict:
    """Binary classification metrics from predicted probabilities.

    Definitions (predictions are ``prob >= threshold``):

    * ``auroc`` (+ ``auroc_ci_low`` / ``auroc_ci_high``): see :func:`auroc_ci` (DeLong 1988,
      Sun & Xu 2014). Higher is better.
    * ``balanced_accuracy``: mean of sensitivity and specificity (mean per-class recall);
      Brodersen et al. (2010), The balanced accuracy and its posterior distribution, ICPR.
      Higher is better; 0.5 = chance.
    * ``f1``: harmonic mean of precision and recall of class 1, ``2TP / (2TP + FP + FN)``
      (van Rijsbergen 1979); 0 when undefined. Higher is better.
    * ``accuracy``: fraction of correct predictions. Higher is better.

    Args:
        y_true: Binary labels (0/1), shape (N,).
        prob: Predicted probability of class 1, shape (N,).
        threshold: Decision threshold.

    Returns:
        Dict with keys ``auroc, auroc_ci_low, auroc_ci_high, balanced_accuracy, f1, accuracy,
        n``. With a single class present AUROC and its CI are NaN; the rest is still computed.
    """
    y = np.asarray(y_true).ravel().astype(int)
    p = np.asarray(prob, dtype=np.float64).ravel()
    pred = (p >= threshold).astype(int)
    a = auroc_ci(y, p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bacc = float(balanced_accuracy_score(y, pred)) if len(y) else NAN
        f1 = float(f1_score(y, pred, zero_division=0)) if len(y) else NAN
    acc = float(accuracy_score(y, pred)) if len(y) else NAN
    return {
        "auroc": a["auroc"],
        "auroc_ci_low": a["ci_low"],
        "auroc_ci_high": a["ci_high"],
        "balanced_accuracy": bacc,
        "f1": f1,
        "accuracy": acc,
        "n": int(len(y)),
    }


# --------------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------------


def _ssim_win_size(h: int, w: int, default: int = 7) -> int:
    """Largest odd window <= ``default`` that fits an (h, w) image (7 for 16x16 crops)."""
    win = min(default, h, w)
    if win % 2 == 0:
        win -= 1
    if win < 3:
        raise ValueError(f"images of size {h}x{w} are too small for SSIM (need >= 3x3)")
    return win


def per_cell_mse(images: np.ndarray, recons: np.ndarray) -> np.ndarray:
    """Per-cell mean squared error.

    Definition: for each cell, the mean over channels and pixels of ``(image - recon)**2``.
    Lower is better (0 = perfect reconstruction). Reference: standard (e.g. Wang & Bovik 2009,
    Mean squared error: love it or leave it?, IEEE Signal Processing Magazine 26(1):98-117).

    Args:
        images: Originals, shape (N, C, H, W) (or (N, H, W)).
        recons: Reconstructions, same shape.

    Returns:
        Array of shape (N,), float64.
    """
    x = _as_nchw(images)
    y = _as_nchw(recons)
    if x.shape != y.shape:
        raise ValueError(f"images and recons have different shapes: {x.shape} vs {y.shape}")
    out = np.empty(len(x), dtype=np.float64)
    chunk = 2048
    for i in range(0, len(x), chunk):
        d = x[i : i + chunk].astype(np.float64) - y[i : i + chunk].astype(np.float64)
        out[i : i + chunk] = (d * d).reshape(len(d), -1).mean(axis=1)
    return out


def per_cell_ssim(images: np.ndarray, recons: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-cell structural similarity index (SSIM), vectorised over cells.

    Definition: for every pixel window, ``SSIM = ((2 mu_x mu_y + C1)(2 s_xy + C2)) /
    ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with local means, sample variances and
    covariance from a uniform ``w x w`` window (``w = 7``, reduced to the largest odd size that
    fits smaller images), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` and ``L = data_range``. The
    SSIM map is averaged over pixels away from the border (``(w - 1) / 2`` cropped) and then
    over channels. Higher is better (1 = identical images).

    This is a vectorised re-implementation using ``scipy.ndimage.uniform_filter`` over the whole
    (N, C, H, W) stack (processed in chunks, float64). It agrees with
    ``skimage.metrics.structural_similarity(im, rec, channel_axis=0, data_range=data_range,
    gaussian_weights=False, win_size=w, use_sample_covariance=True)`` applied cell by cell to
    within 1e-4 on random data (checked in ``tests/test_metrics.py``; in practice ~1e-12).

    Reference:
        Wang Z, Bovik AC, Sheikh HR, Simoncelli EP (2004). Image quality assessment: from error
        visibility to structural similarity. IEEE Transactions on Image Processing
        13(4):600-612.

    Args:
        images: Originals, shape (N, C, H, W) (or (N, H, W)), values in [0, data_range].
        recons: Reconstructions, same shape.
        data_range: Dynamic range of the images (``L``).

    Returns:
        Array of shape (N,), float64.
    """
    x_all = _as_nchw(images)
    y_all = _as_nchw(recons)
    if x_all.shape != y_all.shape:
        raise ValueError(
            f"images and recons have different shapes: {x_all.shape} vs {y_all.shape}"
        )
    n, _, h, w = x_all.shape
    win = _ssim_win_size(h, w)
    npix = win * win
    cov_norm = npix / (npix - 1.0)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    pad = (win - 1) // 2
    size = (1, 1, win, win)
    out = np.empty(n, dtype=np.float64)
    chunk = 512
    for i in range(0, n, chunk):
        x = x_all[i : i + chunk].astype(np.float64)
        y = y_all[i : i + chunk].astype(np.float64)
        ux = ndimage.uniform_filter(x, size=size)
        uy = ndimage.uniform_filter(y, size=size)
        uxx = ndimage.uniform_filter(x * x, size=size)
        uyy = ndimage.uniform_filter(y * y, size=size)
        uxy = ndimage.uniform_filter(x * y, size=size)
        vx = cov_norm * (uxx - ux * ux)
        vy = cov_norm * (uyy - uy * uy)
        vxy = cov_norm * (uxy - ux * uy)
        num = (2.0 * ux * uy + c1) * (2.0 * vxy + c2)
        den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
        s = (num / den)[:, :, pad : h - pad, pad : w - pad]
        out[i : i + chunk] = s.mean(axis=(2, 3)).mean(axis=1)
    return out


def reconstruction_metrics(images: np.ndarray, recons: np.ndarray, data_range: float = 1.0) -> dict:
    """Dataset-level reconstruction quality.

    Definitions:

    * ``mse``: mean squared error over all cells, channels and pixels. Lower is better.
    * ``ssim``: mean over cells of the per-cell SSIM (channel axis 0, uniform 7x7 window or the
      largest odd window that fits, sample covariance; identical to skimage's
      ``structural_similarity``, see :func:`per_cell_ssim`). Higher is better (max 1).
      Reference: Wang et al. (2004), IEEE TIP 13(4):600-612.

    Args:
        images: Originals, float array (N, C, H, W) in [0, data_range].
        recons: Reconstructions, same shape.
        data_range: Dynamic range of the images.

    Returns:
        ``{"mse": float, "ssim": float}`` (NaN for empty input).
    """
    x = _as_nchw(images)
    if len(x) == 0:
        return {"mse": NAN, "ssim": NAN}
    mse = per_cell_mse(images, recons)
    ssim = per_cell_ssim(images, recons, data_range=data_range)
    # All cells have the same number of pixels, so the mean of per-cell MSEs is the global MSE.
    return {"mse": float(mse.mean()), "ssim": float(ssim.mean())}


# --------------------------------------------------------------------------------------------
# Latent-space batch / label metrics
# --------------------------------------------------------------------------------------------


def zscore(x: np.ndarray) -> np.ndarray:
    """Standardise each column to mean 0 and standard deviation 1.

    Definition: ``(x - mean) / sd`` per dimension (population sd); dimensions with ``sd == 0``
    are only centred. Not a quality metric (no direction). Reference: standard z-score.

    Args:
        x: Array of shape (N, D) (or (N,)).

    Returns:
        Float64 array of the same shape.
    """
    a = np.asarray(x, dtype=np.float64)
    mu = a.mean(axis=0)
    sd = a.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return (a - mu) / sd


def batch_clustering(latents: np.ndarray, batches: np.ndarray) -> dict:
    """Davies-Bouldin and Calinski-Harabasz indices of batch clusters in latent space.

    Definitions (computed on z-scored latents with the batch as the cluster label):

    * ``db`` (Davies-Bouldin): mean over batches of the maximum over other batches of
      ``(s_i + s_j) / d_ij`` (``s`` = mean distance to the batch centroid, ``d`` = centroid
      distance). **Higher = less batch clustering** (better for batch removal).
    * ``ch`` (Calinski-Harabasz): ratio of between-batch to within-batch dispersion, each
      divided by its degrees of freedom. **Lower = less batch clustering** (better).

    These are the latent batch-effect metrics used for ARMED.

    References:
        Davies DL, Bouldin DW (1979). A cluster separation measure. IEEE TPAMI 1(2):224-227.
        Calinski T, Harabasz J (1974). A dendrite method for cluster analysis. Communications
        in Statistics 3(1):1-27.
        Nguyen KP, Treacher AH, Montillo AA (2023). Adversarially-regularized mixed effects
        deep learning (ARMED) models improve interpretability, performance, and
        generalization on clustered (non-iid) data. IEEE TPAMI 45(7):8081-8093.

    Args:
        latents: (N, D) embeddings.
        batches: (N,) batch labels.

    Returns:
        ``{"db": float, "ch": float}``; NaN if fewer than 2 batches (or every cell is its own
        batch).
    """
    x = _as_2d(latents)
    b = np.asarray(batches)
    nb = _n_unique(b)
    if nb < 2 or nb >= len(x):
        return {"db": NAN, "ch": NAN}
    z = zscore(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        db = float(davies_bouldin_score(z, b))
        ch = float(calinski_harabasz_score(z, b))
    return {"db": db, "ch": ch}


def batch_silhouette(latents: np.ndarray, batches: np.ndarray) -> float:
    """Batch-mixing silhouette (scib's ``silhouette_batch`` without cell-type grouping).

    Definition: for each cell the silhouette width ``s = (b - a) / max(a, b)`` with the batch as
    the label (``a`` = mean euclidean distance to cells of the same batch, ``b`` = mean distance
    to the nearest other batch) is transformed to ``1 - |s|`` and averaged over cells. **Higher
    is better**: 1 = batches perfectly mixed, 0 = batches perfectly separated. At most 5000
    cells (fixed seed 0) are used. scib additionally stratifies by cell-type label; here all
    cells form one group.

    References:
        Luecken MD et al. (2022). Benchmarking atlas-level data integration in single-cell
        genomics. Nature Methods 19:41-50.
        Rousseeuw PJ (1987). Silhouettes: a graphical aid to the interpretation and validation
        of cluster analysis. J Comput Appl Math 20:53-65.

    Args:
        latents: (N, D) embeddings.
        batches: (N,) batch labels.

    Returns:
        Mean of ``1 - |s|``; NaN if fewer than 2 batches in the (subsampled) data.
    """
    x = _as_2d(latents)
    b = np.asarray(batches)
    idx = _subsample_idx(len(x))
    x, b = x[idx], b[idx]
    nb = _n_unique(b)
    if nb < 2 or nb >= len(x):
        return NAN
    s = silhouette_samples(x, b, metric="euclidean")
    return float(np.mean(1.0 - np.abs(s)))


def ilisi(latents: np.ndarray, batches: np.ndarray, k: int = 30) -> dict:
    """Integration local inverse Simpson's index (iLISI) of batch labels.

    Definition: for each cell take its ``k`` nearest neighbours (euclidean, the cell itself
    excluded), compute the batch proportions ``p_b`` in that neighbourhood and the inverse
    Simpson's index ``1 / sum_b p_b^2`` (the effective number of batches); iLISI is the mean
    over cells. ``ilisi_norm = (iLISI - 1) / (n_batches - 1)`` rescales it to [0, 1]. **Higher
    is better** (more batch mixing). Note: this uses a plain kNN neighbourhood with uniform
    weights, not the Gaussian-kernel, perplexity-calibrated weights of Korsunsky et al.
    (2019); values are similar but not identical to the ``lisi`` / ``scib`` packages.

    Reference:
        Korsunsky I et al. (2019). Fast, sensitive and accurate integration of single-cell data
        with Harmony. Nature Methods 16:1289-1296.

    Args:
        latents: (N, D) embeddings.
        batches: (N,) batch labels.
        k: Neighbourhood size (capped at N - 1).

    Returns:
        ``{"ilisi": float, "ilisi_norm": float}``; ``ilisi_norm`` is NaN with fewer than 2
        batches, both are NaN with fewer than 2 cells.
    """
    x = _as_2d(latents)
    _, codes = np.unique(np.asarray(batches), return_inverse=True)
    codes = codes.ravel()
    n = len(x)
    nb = int(codes.max()) + 1 if n else 0
    k = min(int(k), n - 1)
    if n < 2 or k < 1:
        return {"ilisi": NAN, "ilisi_norm": NAN}
    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    _, ind = nn.kneighbors(x)
    # Drop self: remove the query index from each row if present, else the farthest neighbour.
    self_mask = ind == np.arange(n)[:, None]
    no_self = ~self_mask.any(axis=1)
    self_mask[no_self, -1] = True
    neigh = ind[~self_mask].reshape(n, k)
    nb_codes = codes[neigh]
    counts = np.zeros((n, nb), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(n), k), nb_codes.ravel()), 1.0)
    p = counts / k
    simpson = 1.0 / (p * p).sum(axis=1)
    val = float(simpson.mean())
    norm = (val - 1.0) / (nb - 1.0) if nb >= 2 else NAN
    return {"ilisi": val, "ilisi_norm": float(norm)}


def batch_probe_accuracy(
    latents: np.ndarray, batches: np.ndarray, cv: int = 5, seed: int = 0
) -> dict:
    """Linear-probe batch prediction accuracy from the latents.

    Definition: mean cross-validated accuracy of a ``StandardScaler + LogisticRegression
    (max_iter=1000)`` pipeline predicting the batch from the latent code, with stratified
    ``cv``-fold splits (shuffled with ``seed``; ``cv`` is reduced to the size of the smallest
    batch if needed). ``chance`` is the frequency of the majority batch. **Lower is better**
    for batch removal; an accuracy close to ``chance`` means the batch is not linearly
    decodable.

    Reference:
        Alain G, Bengio Y (2016). Understanding intermediate layers using linear classifier
        probes. arXiv:1610.01644. (Batch-prediction accuracy as a batch-effect measure is also
        used for ARMED, Nguyen et al. 2023, IEEE TPAMI 45(7):8081-8093.)

    Args:
        latents: (N, D) embeddings.
        batches: (N,) batch labels.
        cv: Number of folds.
        seed: Shuffle seed of the folds.

    Returns:
        ``{"batch_probe_acc": float, "chance": float}``; accuracy is NaN with fewer than 2
        batches or when the smallest batch has fewer than 2 cells.
    """
    x = _as_2d(latents)
    b = np.asarray(batches)
    if len(b) == 0:
        return {"batch_probe_acc": NAN, "chance": NAN}
    _, counts = np.unique(b, return_counts=True)
    chance = float(counts.max() / counts.sum())
    n_splits = min(int(cv), int(counts.min()))
    if len(counts) < 2 or n_splits < 2:
        return {"batch_probe_acc": NAN, "chance": chance}
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = cross_val_score(pipe, x, b, cv=folds, scoring="accuracy")
    return {"batch_probe_acc": float(np.mean(scores)), "chance": chance}


def label_silhouette(latents: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette width of the biological labels in latent space.

    Definition: mean over cells of ``s = (b - a) / max(a, b)`` with euclidean distances and the
    label as cluster assignment (``a`` = mean distance to the own label, ``b`` = mean distance to
    the nearest other label). Range [-1, 1]; **higher is better** (labels well separated). At
    most 5000 cells (fixed seed 0) are used.

    Reference:
        Rousseeuw PJ (1987). Silhouettes: a graphical aid to the interpretation and validation
        of cluster analysis. J Comput Appl Math 20:53-65.

    Args:
        latents: (N, D) embeddings.
        labels: (N,) labels.

    Returns:
        Silhouette score; NaN with fewer than 2 labels.
    """
    x = _as_2d(latents)
    y = np.asarray(labels)
    idx = _subsample_idx(len(x))
    x, y = x[idx], y[idx]
    nl = _n_unique(y)
    if nl < 2 or nl >= len(x):
        return NAN
    return float(silhouette_score(x, y, metric="euclidean"))


def nsb_1nn_accuracy(latents: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float:
    """Not-same-batch 1-nearest-neighbour label accuracy.

    Definition: for each cell find its nearest neighbour (euclidean) among cells of *other*
    batches; the metric is the fraction of cells whose neighbour has the same label. This is
    the analogue of the not-same-compound / not-same-compound-or-batch (NSC / NSCB) matching
    used in image-based profiling: it rewards biology that survives across batches and cannot
    be inflated by batch-specific signal. **Higher is better.**

    Reference:
        Ljosa V, Caie PD, Ter Horst R, et al. (2013). Comparison of methods for image-based
        profiling of cellular morphological responses to small-molecule treatment. Journal of
        Biomolecular Screening 18(10):1321-1329.

    Args:
        latents: (N, D) embeddings.
        labels: (N,) labels.
        batches: (N,) batch labels.

    Returns:
        Accuracy in [0, 1]; NaN with fewer than 2 batches (no cross-batch neighbour exists).
    """
    x = _as_2d(latents)
    y = np.asarray(labels)
    b = np.asarray(batches)
    ub = np.unique(b)
    if len(ub) < 2:
        return NAN
    correct = np.zeros(len(x), dtype=bool)
    for batch in ub:
        q = b == batch
        ref = np.flatnonzero(~q)
        nn = NearestNeighbors(n_neighbors=1).fit(x[ref])
        _, ind = nn.kneighbors(x[q])
        correct[q] = y[ref[ind[:, 0]]] == y[q]
    return float(correct.mean())


# --------------------------------------------------------------------------------------------
# Image statistics (batch effects in images / reconstructions)
# --------------------------------------------------------------------------------------------


def per_batch_image_stats(images: np.ndarray, batches: np.ndarray) -> pd.DataFrame:
    """Per-image brightness, contrast and sharpness, with the batch of each image.

    Definitions (per image; for multichannel images computed per channel then averaged over
    channels):

    * ``brightness``: mean pixel intensity.
    * ``contrast``: standard deviation of pixel intensities (RMS contrast).
    * ``sharpness``: variance of the Laplacian of each H x W plane (``scipy.ndimage.laplace``,
      i.e. the sum of ``[1, -2, 1]`` second differences along H and W with reflect boundary;
      computed here vectorised with ``correlate1d``, which is numerically identical).

    These are descriptors, not metrics: they feed :func:`image_stats_anova`.

    References:
        Pech-Pacheco JL, Cristobal G, Chamorro-Martinez J, Fernandez-Valdivia J (2000). Diatom
        autofocusing in brightfield microscopy: a comparative study. ICPR 2000, 3:314-317
        (variance of the Laplacian).
        Nguyen KP et al. (2023). ARMED. IEEE TPAMI 45(7):8081-8093 (image statistics of
        reconstructions per batch).

    Args:
        images: (N, C, H, W) (or (N, H, W)) images.
        batches: (N,) batch labels.

    Returns:
        DataFrame with columns ``batch, brightness, contrast, sharpness`` (one row per image).
    """
    x_all = _as_nchw(images)
    b = np.asarray(batches)
    if len(b) != len(x_all):
        raise ValueError(f"{len(x_all)} images but {len(b)} batch labels")
    n = len(x_all)
    bright = np.empty(n)
    contrast = np.empty(n)
    sharp = np.empty(n)
    chunk = 1024
    for i in range(0, n, chunk):
        x = x_all[i : i + chunk].astype(np.float64)
        bright[i : i + chunk] = x.mean(axis=(2, 3)).mean(axis=1)
        contrast[i : i + chunk] = x.std(axis=(2, 3)).mean(axis=1)
        lap = ndimage.correlate1d(x, [1.0, -2.0, 1.0], axis=2, mode="reflect")
        lap += ndimage.correlate1d(x, [1.0, -2.0, 1.0], axis=3, mode="reflect")
        sharp[i : i + chunk] = lap.var(axis=(2, 3)).mean(axis=1)
    return pd.DataFrame(
        {"batch": b, "brightness": bright, "contrast": contrast, "sharpness": sharp}
    )


def image_stats_anova(df: pd.DataFrame) -> dict:
    """One-way ANOVA of image statistics across batches.

    Definition: for each of brightness, contrast and sharpness (columns of
    :func:`per_batch_image_stats`), the one-way ANOVA F statistic (``scipy.stats.f_oneway``):
    between-batch mean square divided by within-batch mean square. **Lower F = less batch
    effect** (as used for ARMED reconstructions).

    References:
        Fisher RA (1925). Statistical Methods for Research Workers. Oliver & Boyd.
        Nguyen KP et al. (2023). ARMED. IEEE TPAMI 45(7):8081-8093.

    Args:
        df: DataFrame with columns ``batch, brightness, contrast, sharpness``.

    Returns:
        ``{"anova_f_brightness", "anova_f_contrast", "anova_f_sharpness"}``; NaN with fewer
        than 2 batches.
    """
    out = {}
    groups = [g for _, g in df.groupby("batch", sort=True)]
    for col in ("brightness", "contrast", "sharpness"):
        key = f"anova_f_{col}"
        if len(groups) < 2:
            out[key] = NAN
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = stats.f_oneway(*[g[col].to_numpy(dtype=np.float64) for g in groups]).statistic
        out[key] = float(f)
    return out


# --------------------------------------------------------------------------------------------
# Bundle
# --------------------------------------------------------------------------------------------


def latent_metrics(latents: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> dict:
    """All latent-space batch-effect and label metrics in one flat dict.

    See the individual functions for definitions, directions and references:
    :func:`batch_clustering` (``db`` higher better, ``ch`` lower better),
    :func:`batch_silhouette` (higher better), :func:`ilisi` (higher better),
    :func:`batch_probe_accuracy` (``batch_probe_acc`` lower / closer to ``batch_probe_chance``
    better), :func:`label_silhouette` (higher better), :func:`nsb_1nn_accuracy` (higher better).

    Args:
        latents: (N, D) embeddings.
        labels: (N,) biological labels.
        batches: (N,) batch labels.

    Returns:
        Dict with keys ``db, ch, batch_silhouette, ilisi, ilisi_norm, batch_probe_acc,
        batch_probe_chance, label_silhouette, nsb_1nn_acc``.
    """
    x = _as_2d(latents)
    out: dict[str, float] = {}
    out.update(batch_clustering(x, batches))
    out["batch_silhouette"] = batch_silhouette(x, batches)
    out.update(ilisi(x, batches))
    probe = batch_probe_accuracy(x, batches)
    out["batch_probe_acc"] = probe["batch_probe_acc"]
    out["batch_probe_chance"] = probe["chance"]
    out["label_silhouette"] = label_silhouette(x, labels)
    out["nsb_1nn_acc"] = nsb_1nn_accuracy(x, labels, batches)
    return out
