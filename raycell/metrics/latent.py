"""Latent-space metrics: how much batch is left in the latents, and how much biology.

* **Batch effects** -- :func:`batch_clustering` (Davies-Bouldin and Calinski-Harabasz, as in
  the ARMED reference), :func:`batch_silhouette` (scib), :func:`ilisi` (kNN inverse Simpson's
  index), :func:`batch_probe_accuracy` (linear probe) and :func:`batch_probe_within_label` (the
  probe among cells of one phenotype: the batch signal a confounded phenotype does not explain).
* **Biology preserved** -- :func:`label_silhouette` and :func:`nsb_1nn_accuracy` (1-NN label
  accuracy restricted to neighbours from another batch).
* :func:`latent_metrics` bundles them into one flat dict (what `raycell evaluate` reports).

Pure numpy / scikit-learn. Every function returns NaN instead of raising where a metric is undefined
(e.g. a single batch), so a split with one batch still gets a row.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    calinski_harabasz_score,
    davies_bouldin_score,
    silhouette_samples,
    silhouette_score,
)
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = [
    "zscore",
    "batch_clustering",
    "batch_silhouette",
    "ilisi",
    "batch_probe_accuracy",
    "batch_probe_within_label",
    "label_silhouette",
    "nsb_1nn_accuracy",
    "latent_metrics",
]

NAN = float("nan")
_MAX_SILHOUETTE_CELLS = 5000
_SUBSAMPLE_SEED = 0


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


def _n_unique(a: np.ndarray) -> int:
    return len(np.unique(np.asarray(a)))


def _silhouette_input(
    latents: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray]:
    """The fixed-seed subsample a silhouette is computed on; (None, groups) when it is undefined.

    A silhouette needs at least 2 groups and fewer groups than points.
    """
    x = _as_2d(latents)
    g = np.asarray(groups)
    idx = _subsample_idx(len(x))
    x, g = x[idx], g[idx]
    n = _n_unique(g)
    return (x, g) if 2 <= n < len(x) else (None, g)


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
    x, b = _silhouette_input(latents, batches)
    if x is None:
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


def batch_probe_within_label(
    latents: np.ndarray, labels: np.ndarray, batches: np.ndarray, cv: int = 5, seed: int = 0
) -> dict:
    """The batch probe run among cells of one phenotype at a time: batch information the phenotype
    does not explain.

    Why: where phenotype and batch are confounded (a batch mostly of one label, as in the ARMED
    paper's designs and raycell's synthetic data), a latent that holds the phenotype and nothing else
    still predicts the batch above the majority-batch level, so :func:`batch_probe_accuracy` cannot
    reach its chance there. Within one label the phenotype carries no batch information, so the probe's
    excess over that label's majority batch is batch signal alone.

    Definition: :func:`batch_probe_accuracy` on the cells of each label with >= 2 batches (each holding
    >= 2 cells), averaged over those labels weighted by their cell counts; ``chance`` the same average of
    each label's majority-batch frequency. **Lower is better**; close to ``chance``: nothing but the
    phenotype tells the batches apart.

    Returns:
        ``{"batch_probe_acc": float, "chance": float}``; NaN where no label has two batches.
    """
    x = _as_2d(latents)
    y, b = np.asarray(labels), np.asarray(batches)
    accs, chances, weights = [], [], []
    for lab in np.unique(y):
        sel = y == lab
        _, counts = np.unique(b[sel], return_counts=True)
        keep = np.isin(b[sel], np.unique(b[sel])[counts >= 2])
        if keep.sum() < 4:
            continue
        r = batch_probe_accuracy(x[sel][keep], b[sel][keep], cv=cv, seed=seed)
        if np.isfinite(r["batch_probe_acc"]):
            accs.append(r["batch_probe_acc"])
            chances.append(r["chance"])
            weights.append(int(keep.sum()))
    if not weights:
        return {"batch_probe_acc": NAN, "chance": NAN}
    w = np.asarray(weights, dtype=float)
    return {
        "batch_probe_acc": float(np.average(accs, weights=w)),
        "chance": float(np.average(chances, weights=w)),
    }


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
    x, y = _silhouette_input(latents, labels)
    if x is None:
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


def latent_metrics(latents: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> dict:
    """All latent-space batch-effect and label metrics in one flat dict.

    See the individual functions for definitions, directions and references:
    :func:`batch_clustering` (``db`` higher better, ``ch`` lower better),
    :func:`batch_silhouette` (higher better), :func:`ilisi` (higher better),
    :func:`batch_probe_accuracy` (``batch_probe_acc`` lower / closer to ``batch_probe_chance``
    better), :func:`batch_probe_within_label` (the same among cells of one label),
    :func:`label_silhouette` (higher better), :func:`nsb_1nn_accuracy` (higher better).

    Args:
        latents: (N, D) embeddings.
        labels: (N,) biological labels.
        batches: (N,) batch labels.

    Returns:
        Dict with keys ``db, ch, batch_silhouette, ilisi, ilisi_norm, batch_probe_acc,
        batch_probe_chance, batch_probe_within_label, batch_probe_within_label_chance,
        label_silhouette, nsb_1nn_acc``.
    """
    x = _as_2d(latents)
    out: dict[str, float] = {}
    out.update(batch_clustering(x, batches))
    out["batch_silhouette"] = batch_silhouette(x, batches)
    out.update(ilisi(x, batches))
    probe = batch_probe_accuracy(x, batches)
    out["batch_probe_acc"] = probe["batch_probe_acc"]
    out["batch_probe_chance"] = probe["chance"]
    within = batch_probe_within_label(x, labels, batches)
    out["batch_probe_within_label"] = within["batch_probe_acc"]
    out["batch_probe_within_label_chance"] = within["chance"]
    out["label_silhouette"] = label_silhouette(x, labels)
    out["nsb_1nn_acc"] = nsb_1nn_accuracy(x, labels, batches)
    return out
