"""Known-answer tests for the metrics in raycell.eval (classification, reconstruction, latent)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from skimage.metrics import structural_similarity
from sklearn.metrics import roc_auc_score

from raycell.metrics import classification as C
from raycell.metrics import latent as L

# ---------------------------------------------------------------------------------------------
# AUROC / DeLong
# ---------------------------------------------------------------------------------------------


def _binormal(n: int, delta: float, rng: np.random.Generator):
    y = rng.integers(0, 2, size=n)
    s = rng.normal(size=n) + delta * y
    return y, s


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=500)
    s = np.round(rng.normal(size=500) + 0.8 * y, 1)  # rounding creates ties
    r = C.auroc_ci(y, s)
    assert r["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert r["n"] == 500 and r["n_pos"] == int(y.sum())
    assert 0.0 <= r["ci_low"] <= r["auroc"] <= r["ci_high"] <= 1.0


def test_auroc_perfect_separation():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    r = C.auroc_ci(y, s)
    assert r["auroc"] == 1.0
    assert r["ci_low"] == r["ci_high"] == 1.0  # every pair ordered: DeLong's variance is 0


def test_auroc_ci_is_delongs_interval_clipped_to_the_auc_scale():
    """Worked by hand: positives 0.35, 0.8 against negatives 0.1, 0.4. AUC 3/4; placements
    V10 = [1/2, 1], V01 = [1, 1/2], each with sample variance 1/8, so var = 1/8/2 + 1/8/2 = 1/8;
    0.75 +/- 1.96 * sqrt(1/8) = [0.057, 1.443], the upper end clipped to 1."""
    r = C.auroc_ci(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert r["auroc"] == 0.75
    assert r["ci_low"] == pytest.approx(0.75 - stats.norm.ppf(0.975) * math.sqrt(1 / 8), abs=1e-12)
    assert r["ci_high"] == 1.0


def test_auroc_single_class_nan():
    r = C.auroc_ci(np.ones(10), np.linspace(0, 1, 10))
    assert math.isnan(r["auroc"]) and math.isnan(r["ci_low"]) and math.isnan(r["ci_high"])
    assert r["n"] == 10 and r["n_pos"] == 10


def test_auroc_ci_covers_truth_and_shrinks():
    delta = 1.0
    true_auc = float(stats.norm.cdf(delta / np.sqrt(2)))
    rng = np.random.default_rng(1)
    covered, widths = 0, {}
    for n in (200, 2000):
        w = []
        for _ in range(40):
            y, s = _binormal(n, delta, rng)
            r = C.auroc_ci(y, s)
            w.append(r["ci_high"] - r["ci_low"])
            if n == 2000:
                covered += r["ci_low"] <= true_auc <= r["ci_high"]
        widths[n] = float(np.mean(w))
    assert covered >= 34  # nominal 95% of 40 = 38
    assert widths[2000] < widths[200] * 0.5  # ~ 1/sqrt(10)


def test_delong_variance_matches_bootstrap():
    rng = np.random.default_rng(2)
    y, s = _binormal(400, 1.0, rng)
    r = C.auroc_ci(y, s)
    se_delong = (r["ci_high"] - r["ci_low"]) / (2 * 1.959963984540054)
    boots = []
    for _ in range(1000):
        i = rng.integers(0, len(y), size=len(y))
        if y[i].min() == y[i].max():
            continue
        boots.append(roc_auc_score(y[i], s[i]))
    var_boot = np.var(boots, ddof=1)
    assert se_delong**2 == pytest.approx(var_boot, rel=0.3)


def test_classification_metrics():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.1, 0.6, 0.7, 0.4, 0.9, 0.2])
    r = C.classification_metrics(y, p)
    assert set(r) == {
        "auroc",
        "auroc_ci_low",
        "auroc_ci_high",
        "balanced_accuracy",
        "f1",
        "accuracy",
        "n",
    }
    assert r["n"] == 6
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["balanced_accuracy"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    assert r["auroc"] == pytest.approx(roc_auc_score(y, p))


def test_classification_metrics_single_class():
    r = C.classification_metrics(np.zeros(5), np.array([0.1, 0.2, 0.7, 0.3, 0.9]))
    assert math.isnan(r["auroc"]) and math.isnan(r["auroc_ci_low"])
    assert r["accuracy"] == pytest.approx(0.6)
    assert not math.isnan(r["balanced_accuracy"])
    assert r["f1"] == 0.0


# ---------------------------------------------------------------------------------------------
# Reconstruction (per-cell MSE / SSIM as inference computes them, on the device in torch)
# ---------------------------------------------------------------------------------------------


class R:
    """The torch per-cell metrics on numpy arrays, as the tests below compare them with skimage."""

    @staticmethod
    def per_cell_ssim(x, y, data_range=1.0):
        import torch

        from raycell.losses import per_cell_ssim

        return per_cell_ssim(
            torch.from_numpy(x), torch.from_numpy(y), data_range=data_range
        ).numpy()

    @staticmethod
    def per_cell_mse(x, y):
        import torch

        from raycell.losses import per_cell_mse

        return per_cell_mse(torch.from_numpy(x), torch.from_numpy(y)).numpy()


@pytest.mark.parametrize("hw", [16, 20, 64])
def test_per_cell_ssim_agrees_with_skimage(hw):
    rng = np.random.default_rng(3)
    x = rng.random((6, 2, hw, hw))
    y = np.clip(x + 0.2 * rng.normal(size=x.shape), 0, 1)
    y[0] = rng.random((2, hw, hw))  # an unrelated image too
    ours = R.per_cell_ssim(x, y, data_range=1.0)
    ref = np.array(
        [
            structural_similarity(
                x[i],
                y[i],
                channel_axis=0,
                data_range=1.0,
                gaussian_weights=False,
                win_size=7,
                use_sample_covariance=True,
            )
            for i in range(len(x))
        ]
    )
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_per_cell_ssim_small_window_and_float32():
    rng = np.random.default_rng(4)
    x = rng.random((3, 1, 6, 6)).astype(np.float32)
    y = rng.random((3, 1, 6, 6)).astype(np.float32)
    ours = R.per_cell_ssim(x, y, data_range=1.0)
    ref = [
        structural_similarity(
            x[i].astype(np.float64),
            y[i].astype(np.float64),
            channel_axis=0,
            data_range=1.0,
            win_size=5,
        )
        for i in range(3)
    ]
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_identical_images_reconstruction():
    rng = np.random.default_rng(5)
    x = rng.random((4, 2, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(R.per_cell_ssim(x, x.copy()), np.ones(4), atol=1e-9)
    np.testing.assert_array_equal(R.per_cell_mse(x, x), np.zeros(4))


def test_per_cell_mse_value():
    x = np.zeros((2, 1, 4, 4))
    y = np.zeros((2, 1, 4, 4))
    y[1] = 0.5
    np.testing.assert_allclose(R.per_cell_mse(x, y), [0.0, 0.25])


# ---------------------------------------------------------------------------------------------
# Latent batch / label metrics
# ---------------------------------------------------------------------------------------------


def _embeddings(shift: float, n_per: int = 300, n_batches: int = 3, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    batches = np.repeat(np.arange(n_batches), n_per)
    x = rng.normal(size=(n_batches * n_per, d))
    x[:, 0] += shift * batches
    labels = rng.integers(0, 2, size=len(x))
    return x, labels, batches


def test_zscore():
    x = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    z = L.zscore(x)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(z[:, 0].std(), 1.0)
    np.testing.assert_array_equal(z[:, 1], 0.0)


def test_batch_metrics_direction():
    xm, lm, bm = _embeddings(shift=0.0)
    xs, ls, bs = _embeddings(shift=8.0)
    mixed = L.latent_metrics(xm, lm, bm)
    sep = L.latent_metrics(xs, ls, bs)
    assert mixed["db"] > sep["db"]
    assert mixed["ch"] < sep["ch"]
    assert mixed["batch_silhouette"] > 0.9 > 0.5 > sep["batch_silhouette"]
    assert mixed["ilisi"] > 2.5 and sep["ilisi"] < 1.2
    assert mixed["ilisi_norm"] > 0.75 and sep["ilisi_norm"] < 0.1
    assert mixed["batch_probe_chance"] == pytest.approx(1 / 3)
    assert abs(mixed["batch_probe_acc"] - 1 / 3) < 0.1
    assert sep["batch_probe_acc"] > 0.95
    assert set(mixed) == {
        "db",
        "ch",
        "batch_silhouette",
        "ilisi",
        "ilisi_norm",
        "batch_probe_acc",
        "batch_probe_chance",
        "batch_probe_within_label",
        "batch_probe_within_label_chance",
        "label_silhouette",
        "nsb_1nn_acc",
    }


def test_single_batch_nan():
    x, labels, _ = _embeddings(0.0, n_per=50, n_batches=1)
    b = np.zeros(len(x))
    assert all(math.isnan(v) for v in L.batch_clustering(x, b).values())
    assert math.isnan(L.batch_silhouette(x, b))
    assert math.isnan(L.ilisi(x, b)["ilisi_norm"])
    assert L.ilisi(x, b)["ilisi"] == pytest.approx(1.0)
    assert math.isnan(L.batch_probe_accuracy(x, b)["batch_probe_acc"])
    assert math.isnan(L.nsb_1nn_accuracy(x, labels, b))


def test_batch_probe_reduces_cv():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 4))
    b = np.array([0] * 20 + [1] * 3)
    r = L.batch_probe_accuracy(x, b, cv=5)
    assert not math.isnan(r["batch_probe_acc"])
    assert r["chance"] == pytest.approx(20 / 23)


def test_ilisi_known_value():
    # Two batches interleaved on a line: each cell's 2 nearest neighbours are of the other batch
    # except at the ends -> inverse Simpson = 1 for pure neighbourhoods.
    x = np.arange(10, dtype=float)[:, None]
    b = np.arange(10) % 2
    r = L.ilisi(x, b, k=2)
    # interior cells: neighbours i-1, i+1 both other batch -> 1; ends: one of each -> 2.
    assert r["ilisi"] == pytest.approx((8 * 1 + 2 * 2) / 10)
    assert r["ilisi_norm"] == pytest.approx(r["ilisi"] - 1)


def test_label_silhouette():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    x = rng.normal(size=(200, 4))
    x[:, 0] += 20 * labels
    assert L.label_silhouette(x, labels) > 0.8
    assert abs(L.label_silhouette(rng.normal(size=(200, 4)), labels)) < 0.1
    assert math.isnan(L.label_silhouette(x, np.zeros(200)))


def test_nsb_1nn_low_when_label_signal_is_batch_specific():
    # Each batch has its own pair of tight label clusters; label clusters of batch 0 sit right
    # next to the *opposite* label of batch 1. Same-batch 1-NN would be perfect, NSB is ~0.
    rng = np.random.default_rng(0)
    n = 50
    centres = {(0, 0): 0.0, (0, 1): 10.0, (1, 1): 0.5, (1, 0): 10.5}
    xs, ys, bs = [], [], []
    for (batch, label), c in centres.items():
        xs.append(c + 0.05 * rng.normal(size=(n, 2)))
        ys += [label] * n
        bs += [batch] * n
    x, y, b = np.vstack(xs), np.array(ys), np.array(bs)
    # sanity: plain 1-NN (any batch, excluding self) is right almost always
    from sklearn.neighbors import NearestNeighbors

    ind = NearestNeighbors(n_neighbors=2).fit(x).kneighbors(x)[1][:, 1]
    assert (y[ind] == y).mean() > 0.95
    assert L.nsb_1nn_accuracy(x, y, b) < 0.05
    # and when labels are shared across batches it is high
    y_shared = np.array([0] * n + [1] * n + [0] * n + [1] * n)
    assert L.nsb_1nn_accuracy(x, y_shared, b) > 0.95


def test_latent_metrics_at_evaluate_size():
    # the size `raycell evaluate` subsamples to (eval.max_cells): every metric defined and in range
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 56)).astype(np.float32)
    labels = rng.integers(0, 4, size=5000)
    batches = rng.integers(0, 8, size=5000)
    r = L.latent_metrics(x, labels, batches)
    assert all(math.isfinite(v) for v in r.values())
    # random latents, random batches and labels: batches mixed, labels not separated
    assert r["batch_silhouette"] > 0.95 and r["ilisi_norm"] > 0.7 and r["ch"] < 2.0
    assert abs(r["batch_probe_acc"] - r["batch_probe_chance"]) < 0.05
    assert abs(r["label_silhouette"]) < 0.05 and abs(r["nsb_1nn_acc"] - 0.25) < 0.05


# ---------------------------------------------------------------------------------------------
# The one AUROC: binary and macro one-vs-rest
# ---------------------------------------------------------------------------------------------


def _three_class(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_multiclass_auroc_is_the_macro_one_vs_rest_auroc():
    y, p = _three_class(300, 0)
    got = C.auroc(y, p)
    assert got == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    per_class = [roc_auc_score(y == k, p[:, k]) for k in range(3)]
    assert got == pytest.approx(np.mean(per_class), abs=1e-12)
    assert 0.6 < got < 1.0


def test_auroc_of_a_class_absent_from_the_split_is_left_out_of_the_mean():
    y, p = _three_class(300, 1)
    keep = y != 2
    got = C.auroc(y[keep], p[keep])
    want = np.mean([roc_auc_score(y[keep] == k, p[keep, k]) for k in (0, 1)])
    assert got == pytest.approx(want, abs=1e-12)
    assert math.isnan(C.auroc(np.zeros(5, int), p[:5]))  # one class: nothing to rank


def test_binary_auroc_is_the_same_from_one_score_or_two_columns():
    y, s = _binormal(200, 1.0, np.random.default_rng(3))
    p = 1 / (1 + np.exp(-s))
    two = np.stack([1 - p, p], 1)
    assert C.auroc(y, p) == C.auroc(y, two) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert C.classification_metrics(y, p)["auroc"] == C.auroc(y, p)


def test_classification_metrics_multiclass_has_auroc_and_no_interval():
    y, p = _three_class(150, 4)
    r = C.classification_metrics(y, p)
    assert set(r) == {"auroc", "balanced_accuracy", "f1", "accuracy", "n"}
    assert r["auroc"] == C.auroc(y, p)
    assert r["accuracy"] == pytest.approx((p.argmax(1) == y).mean())
    assert r["n"] == 150


def test_evaluate_reports_the_multiclass_auroc_of_its_predictions():
    """`raycell evaluate` on a three-label split: the AUROC the training loop computes for the same arrays."""
    import pandas as pd

    from raycell import constants as K
    from raycell.eval.evaluate import split_metrics

    y, p = _three_class(120, 5)
    vocab = ["a", "b", "c"]
    rng = np.random.default_rng(5)
    df = pd.DataFrame(
        {
            K.LABEL: [vocab[k] for k in y],
            K.BATCH: rng.choice(["b1", "b2"], size=len(y)),
            K.PROB: list(p),
        }
    )
    res = split_metrics(df, rng.normal(size=(len(y), 4)), vocab)
    assert res["auroc"] == C.auroc(y, p) and "auroc_ci_low" not in res
    assert res["balanced_accuracy"] > 1 / 3


def test_within_label_probe_sees_batch_signal_not_a_confounded_phenotype():
    """Batches mostly of one label: a latent holding only the label predicts the batch above the
    majority level, but not within a label; a latent holding the batch does both."""
    rng = np.random.default_rng(0)
    n_batches, per = 4, 300
    b = np.repeat(np.arange(n_batches), per)
    major = b % 2  # batches 0, 2 mostly label 0; 1, 3 mostly label 1
    y = np.where(rng.random(len(b)) < 0.85, major, 1 - major)
    label_only = np.c_[y + 0.3 * rng.standard_normal(len(y)), rng.standard_normal((len(y), 3))]
    plain = L.batch_probe_accuracy(label_only, b)
    within = L.batch_probe_within_label(label_only, y, b)
    assert plain["batch_probe_acc"] > plain["chance"] + 0.1  # the confounding alone
    assert abs(within["batch_probe_acc"] - within["chance"]) < 0.06
    with_batch = np.c_[label_only, b + 0.3 * rng.standard_normal(len(b))]
    assert L.batch_probe_within_label(with_batch, y, b)["batch_probe_acc"] > 0.9
    one = L.batch_probe_within_label(label_only, y, np.zeros(len(y)))  # one batch: undefined
    assert math.isnan(one["batch_probe_acc"]) and math.isnan(one["chance"])
