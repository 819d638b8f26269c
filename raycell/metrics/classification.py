"""Phenotype classification metrics: AUROC (binary or macro one-vs-rest), balanced accuracy, F1.

`auroc` is the one AUROC of raycell: the training loop's `val_auroc` and `raycell evaluate`'s `auroc`
both call it, so the same predictions give the same number. Binary AUROC also gets a DeLong confidence
interval. Pure numpy / scipy / scikit-learn (no torch, no Ray). Undefined values (a single class) are
NaN, not errors, so a split with one label still gets a row in the evaluate table.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

__all__ = ["auroc", "auroc_ci", "classification_metrics"]

NAN = float("nan")


def _positive_scores(prob: np.ndarray) -> np.ndarray:
    """A binary classifier's scores for class 1: (N,) as given, or column 1 of (N, 2) probabilities."""
    return prob[:, 1] if prob.ndim == 2 and prob.shape[1] == 2 else prob


def auroc(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Area under the ROC curve of class probabilities; NaN when fewer than two classes are present.

    Binary: `prob` is (N,) (the probability of class 1) or (N, 2); the AUROC is the probability that a
    random positive scores above a random negative (ties count one half). Multi-class (N, K > 2):
    the macro one-vs-rest AUROC, the mean over the classes present in `y_true` of the binary AUROC of
    that class's probability against all other cells. A class absent from the split has no AUROC
    and is left out of the mean (scikit-learn's `multi_class="ovr"` would refuse the split).

    Args:
        y_true: Class codes 0..K-1, shape (N,).
        prob: Class probabilities, shape (N,) for binary or (N, K).
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).ravel().astype(int)
    p = _positive_scores(np.asarray(prob, dtype=np.float64))
    present = np.unique(y)
    if len(present) < 2:
        return NAN
    if p.ndim == 1:
        return float(roc_auc_score(y, p))
    # one column per present class: sklearn's multilabel form averages their binary AUROCs (macro)
    onehot = (y[:, None] == present[None, :]).astype(int)
    return float(roc_auc_score(onehot, p[:, present], average="macro"))


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
    _, var = _delong_auc_var(y, s)
    auc = auroc(y, s)  # the point estimate the loop reports too (DeLong's equals it to rounding)
    z = float(stats.norm.ppf(1.0 - alpha / 2.0))
    half = z * np.sqrt(max(var, 0.0))
    out.update(
        auroc=auc,
        ci_low=float(np.clip(auc - half, 0.0, 1.0)),
        ci_high=float(np.clip(auc + half, 0.0, 1.0)),
    )
    return out


def classification_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict:
    """Classification metrics from predicted class probabilities, binary or multi-class.

    Definitions (binary predictions are ``prob >= threshold``, multi-class ones the arg-max):

    * ``auroc``: see :func:`auroc` (macro one-vs-rest for more than two classes). Higher is better.
    * ``auroc_ci_low`` / ``auroc_ci_high`` (binary only): the DeLong interval of :func:`auroc_ci`
      (DeLong 1988, Sun & Xu 2014).
    * ``balanced_accuracy``: mean per-class recall (for two classes, the mean of sensitivity and
      specificity); Brodersen et al. (2010), The balanced accuracy and its posterior distribution,
      ICPR. Higher is better; 1 / K = chance.
    * ``f1``: binary, the harmonic mean of precision and recall of class 1, ``2TP / (2TP + FP + FN)``
      (van Rijsbergen 1979); multi-class, the mean of the per-class F1 (macro). 0 when undefined.
      Higher is better.
    * ``accuracy``: fraction of correct predictions. Higher is better.

    Args:
        y_true: Class codes 0..K-1, shape (N,).
        prob: Probability of class 1, shape (N,), or class probabilities, shape (N, K).
        threshold: Decision threshold of a binary classifier.

    Returns:
        Dict with keys ``auroc, balanced_accuracy, f1, accuracy, n`` (binary: also ``auroc_ci_low,
        auroc_ci_high``). With a single class present AUROC and its CI are NaN; the rest is still
        computed.
    """
    y = np.asarray(y_true).ravel().astype(int)
    p = _positive_scores(np.asarray(prob, dtype=np.float64))
    binary = p.ndim == 1
    pred = (p >= threshold).astype(int) if binary else p.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bacc = float(balanced_accuracy_score(y, pred)) if len(y) else NAN
        f1 = (
            float(f1_score(y, pred, average="binary" if binary else "macro", zero_division=0))
            if len(y)
            else NAN
        )
    out: dict[str, Any] = {"auroc": auroc(y, p)}
    if binary:
        a = auroc_ci(y, p)
        out.update(auroc_ci_low=a["ci_low"], auroc_ci_high=a["ci_high"])
    acc = float(accuracy_score(y, pred)) if len(y) else NAN
    out.update(balanced_accuracy=bacc, f1=f1, accuracy=acc, n=int(len(y)))
    return out
