"""Phenotype classification metrics: AUROC with a DeLong confidence interval, balanced accuracy, F1.

Pure numpy / scipy / scikit-learn (no torch, no Ray). Undefined values (a single class) are NaN, not
errors, so a split with one label still gets a row in the evaluate table.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

__all__ = ["auroc_ci", "classification_metrics"]

NAN = float("nan")


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
