"""The hand-made-feature baseline (raycell.eval.baseline): features, fitted rows, wiring. No Ray."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from raycell import constants as K
from raycell.eval import baseline as B
from raycell.features.morphology import crop_features


@pytest.fixture(scope="module")
def tiny_feats(tiny_data) -> dict:
    """Crop features of the whole tiny data set (train/test/unseen), computed once for this module."""
    return B.load_features(tiny_data, [K.TRAIN, K.TEST, K.UNSEEN])


def _tiny_images(tiny_data, n=12):
    from raycell.formats.shards import open_dataset

    ds = open_dataset(tiny_data)
    imgs, meta = ds.load_images([K.TRAIN])
    return imgs[:n], ds.manifest.channel_names


def test_crop_features_shape_finite_deterministic(tiny_data):
    imgs, names = _tiny_images(tiny_data)
    x, cols = crop_features(imgs, names)
    assert x.shape == (len(imgs), len(cols)) and len(cols) == 28  # 2 objects x 6 + 2 channels x 8
    assert len(set(cols)) == len(cols)
    assert np.isfinite(x).all()
    x2, _ = crop_features(imgs.copy(), names)
    np.testing.assert_array_equal(x, x2)
    # one crop alone gets the same features as in the stack (no leakage between crops)
    x1, _ = crop_features(imgs[3:4], names)
    np.testing.assert_allclose(x1[0], x[3])


def test_crop_features_known_disc_and_empty_crop():
    yy, xx = np.mgrid[:48, :48]
    disc = ((yy - 23.5) ** 2 + (xx - 23.5) ** 2 <= 10**2).astype(np.uint8) * 200 + 10
    speck = np.zeros((48, 48), np.uint8)
    speck[2:4, 2:4] = 255  # an off-centre speck: still the object nearest the centre
    flat = np.full((48, 48), 7, np.uint8)  # nothing to segment: NaN, not an error
    x, cols = crop_features(np.stack([disc, speck, flat])[:, None], ["dna"])
    f = dict(zip(cols, x[0]))
    assert f["nucleus_area"] == pytest.approx(math.pi * 100, rel=0.05)
    assert f["nucleus_eccentricity"] < 0.2 and f["nucleus_solidity"] > 0.95
    assert f["nucleus_major_axis"] == pytest.approx(20, rel=0.1)
    assert f["dna_mean_in"] == pytest.approx(210) and f["dna_mean_out"] == pytest.approx(10)
    assert dict(zip(cols, x[1]))["nucleus_area"] == 4
    assert np.isnan(x[2, cols.index("nucleus_area")])


def _fake_deep(monkeypatch) -> dict:
    """Replace training + inference in `raycell.experiments` by a fixed result; its split dict."""
    from raycell import experiments
    from raycell.eval.evaluate import split_metrics

    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            K.LABEL: ["high", "low"] * 20,
            K.BATCH: ["a", "b", "c", "d"] * 10,
            K.PROB: rng.random(40),
            K.RECON_MSE: 0.1,
            K.RECON_SSIM: 0.9,
        }
    )
    split = split_metrics(df, rng.normal(size=(40, 4)), ["high", "low"])
    fake = {"run_dir": "r", "checkpoint": "c", "train_seconds": 1.0, "metrics": {}, "history": []}
    ev = {"splits": {K.TEST: split, K.UNSEEN: split}}
    monkeypatch.setattr(experiments, "train_model", lambda *a, **k: dict(fake))
    monkeypatch.setattr(
        experiments, "infer_evaluate_all", lambda cfg, todo, quiet=False: [ev for _ in todo]
    )
    return split


def _cheap_latent_metrics(monkeypatch):
    """Skip the latent metrics (the batch probe's cross-validation is slow on 2 shared cores)."""
    import raycell.metrics.latent as L

    keys = L.latent_metrics(
        np.random.default_rng(0).normal(size=(12, 2)), np.arange(12) % 2, np.arange(12) % 3
    )
    monkeypatch.setattr(L, "latent_metrics", lambda *a, **k: dict.fromkeys(keys, math.nan))


def _deep_row_keys(monkeypatch, tmp_path) -> tuple[set, set]:
    """The keys of a deep model's experiment row and of one of its splits, without training."""
    from raycell import experiments
    from raycell.config import load_config

    split = _fake_deep(monkeypatch)
    trained = experiments.train_model(load_config(None, []), tmp_path)
    (ev,) = experiments.infer_evaluate_all(load_config(None, []), [None])
    row = experiments._trained_row(load_config(None, []), trained, ev)
    return set(row), set(split)


def test_baseline_row_on_tiny_data(tiny_data, tiny_feats, monkeypatch, tmp_path):
    row = B.baseline_row(tiny_data, seed=0, feats=tiny_feats)
    assert row["label"] == "logreg on hand-made features (crops)"
    row_keys, split_keys = _deep_row_keys(monkeypatch, tmp_path)
    assert set(row) == row_keys
    for s in (K.TEST, K.UNSEEN):
        assert set(row[s]) == split_keys
        assert 0.0 <= row[s]["auroc"] <= 1.0
        assert row[s]["auroc_ci_low"] <= row[s]["auroc"] <= row[s]["auroc_ci_high"]
        assert 0.0 <= row[s]["batch_probe_acc"] <= 1.0 and math.isnan(row[s]["mse"])
    assert row[K.TEST]["auroc"] > 0.6  # the synthetic phenotype is visible in shape/texture


def _with_morph(tiny_data, tmp_path):
    """A copy of the tiny data set whose shards carry two morph_* columns (one tracks the label)."""
    from raycell.formats.shards import open_dataset, rewrite_shards

    data = tmp_path / "morph"
    shutil.copytree(tiny_data, data)
    ds = open_dataset(data)

    def add(t: pa.Table, path: str) -> pa.Table:
        rng = np.random.default_rng(len(path))
        y = (t.column(K.LABEL).to_numpy(zero_copy_only=False) == "low").astype(np.float32)
        t = t.append_column(
            "morph_area", pa.array(100 + 30 * y + rng.normal(0, 10, len(y)), pa.float32())
        )
        return t.append_column("morph_noise", pa.array(rng.normal(size=len(y)), pa.float32()))

    rewrite_shards(ds, add, {})
    return data


def test_morph_columns_are_used_when_present(tiny_data, tmp_path):
    data = _with_morph(tiny_data, tmp_path)
    assert B.feature_source(data) == "morph_*"
    assert B.feature_source(data, "crops") == "crops"
    feats = B.load_features(data, [K.TRAIN, K.TEST, K.UNSEEN])
    assert feats["names"] == ["morph_area", "morph_noise"]
    assert feats["splits"][K.TRAIN]["x"].shape[1] == 2
    row = B.baseline_row(data, feats=feats)
    assert row["label"] == "logreg on hand-made features (morph_*)"
    assert row[K.UNSEEN]["auroc"] > 0.85  # morph_area carries the label in every batch
    with pytest.raises(B.UserError, match="morph_"):
        B.feature_source(tiny_data, "morph")


def test_all_features_are_morph_and_crops_side_by_side(tiny_data, tmp_path):
    data = _with_morph(tiny_data, tmp_path)
    assert B.feature_source(data, "all") == "morph_*+crops"
    assert B.feature_source(tiny_data, "all") == "crops"  # no morph_* columns: crops alone
    assert B.baseline_sources(data) == ["morph", "all"]  # an experiment's two rows
    assert B.baseline_sources(tiny_data) == ["crops"]
    assert B.baseline_sources(data, "crops") == ["crops"]
    with pytest.raises(B.UserError, match="is not one of auto, morph, crops, all"):
        B.baseline_sources(data, "cellprofiler")
    morph = B.load_features(data, [K.TRAIN, K.UNSEEN], "morph", max_cells=40)
    crops = B.load_features(data, [K.TRAIN, K.UNSEEN], "crops", max_cells=40)
    both = B.load_features(data, [K.TRAIN, K.UNSEEN], "all", max_cells=40)
    assert both["names"] == morph["names"] + crops["names"] and both["source"] == "morph_*+crops"
    for split in (K.TRAIN, K.UNSEEN):  # the same cells, the columns of both sets in order
        np.testing.assert_array_equal(
            both["splits"][split]["x"],
            np.concatenate([morph["splits"][split]["x"], crops["splits"][split]["x"]], 1),
        )
        assert both["splits"][split]["meta"].equals(morph["splits"][split]["meta"])
    assert (
        B.baseline_row(data, feats=both)["label"] == "logreg on hand-made features (morph_*+crops)"
    )


def test_evaluate_baseline_block(tiny_data, monkeypatch, tmp_path):
    from raycell.errors import UserError
    from raycell.eval.evaluate import _baseline

    _cheap_latent_metrics(monkeypatch)
    res = _baseline(
        {"dataset": str(tiny_data)}, tmp_path, [K.TEST, K.UNSEEN, K.TRAIN], 60, 0, "auto"
    )
    assert set(res["splits"]) == {K.TEST, K.UNSEEN}
    assert res["features"] == "crops"
    with pytest.raises(UserError, match="eval.baseline"):
        _baseline({"dataset": str(tmp_path / "gone")}, tmp_path, [K.TEST], 5000, 0, "auto")


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # the stubbed latent metrics are NaN
def test_experiment_table_has_baseline_row(tiny_data, monkeypatch, tmp_path):
    from raycell import experiments
    from raycell.config import load_config

    _fake_deep(monkeypatch)
    _cheap_latent_metrics(monkeypatch)
    cfg = load_config(None, [f"data.path={tiny_data}", "eval.max_cells=80"])
    res = experiments.run_medl_experiment(cfg, [0, 1], ["conventional"], str(tmp_path / "out"))
    label = B.baseline_label("crops")
    assert list(res["summary"]) == ["conventional", label]
    assert res["summary"][label]["n_seeds"] == 2
    assert 0 <= res["summary"][label]["unseen_auroc"] <= 1
    assert f"| {label} | 2 |" in (tmp_path / "out" / "table.md").read_text()
    assert (tmp_path / "out" / "seed1" / "baseline" / "result.json").is_file()
    res2 = experiments.run_medl_experiment(
        cfg, [0, 1], ["conventional"], str(tmp_path / "out"), baseline=False
    )
    assert list(res2["summary"]) == ["conventional"]
    # with morph_* columns: two rows, the shape columns alone and the richer set
    cfg = load_config(None, [f"data.path={_with_morph(tiny_data, tmp_path)}", "eval.max_cells=80"])
    res3 = experiments.run_medl_experiment(cfg, [0], ["conventional"], str(tmp_path / "out3"))
    assert list(res3["summary"]) == [
        "conventional",
        B.baseline_label("morph_*"),
        B.baseline_label("morph_*+crops"),
    ]
    assert (tmp_path / "out3" / "seed0" / "baseline_all" / "result.json").is_file()


def test_experiment_tune_searches_each_type_and_adds_tuned_rows(tiny_data, monkeypatch, tmp_path):
    """--tune: one search per model type over its own loss weights (stubbed here), a '(tuned)' row
    trained with the chosen weights, the weights in the table's notes; a re-run does not search again."""
    import raycell.tune
    from raycell import experiments
    from raycell.config import ConfigError, load_config

    _fake_deep(monkeypatch)
    _cheap_latent_metrics(monkeypatch)
    trained, searched = [], []
    real_train = experiments.train_model
    monkeypatch.setattr(
        experiments, "train_model", lambda c, *a, **k: trained.append(c) or real_train(c, *a, **k)
    )

    def fake_search(c):
        searched.append(c)
        best = {k: spec["high"] / 2 for k, spec in c.tune.space.items()}
        return {
            "best": {**best, "objective": 0.71, "objective_fold_sd": 0.04, "best_epoch": 1},
            "trials": [{}] * c.tune.num_samples,
        }

    monkeypatch.setattr(raycell.tune, "run_search", fake_search)
    cfg = load_config(None, [f"data.path={tiny_data}", "eval.max_cells=80"])
    res = experiments.run_medl_experiment(
        cfg,
        [0],
        ["conventional", "adversarial"],
        str(tmp_path / "out"),
        baseline=False,
        tune=True,
        tune_samples=3,
        tune_folds=2,
    )
    assert list(res["summary"]) == [
        "conventional",
        "conventional (tuned)",
        "adversarial",
        "adversarial (tuned)",
    ]
    assert [
        (c.model.type, sorted(c.tune.space), c.tune.folds, c.tune.metric, c.tune.num_samples)
        for c in searched
    ] == [
        ("conventional", ["loss.cls"], 2, "valbatch_auroc", 3),
        ("adversarial", ["loss.adv", "loss.align", "loss.cls"], 2, "valbatch_auroc", 3),
    ]
    tuned_adv = [c for c in trained if c.model.type == "adversarial" and c.name.endswith("tuned")]
    assert len(tuned_adv) == 1 and tuned_adv[0].loss.adv == 1.5 and tuned_adv[0].loss.cls == 0.5
    assert tuned_adv[0].loss.align == 1.5
    assert [
        c.loss.adv for c in trained if c.model.type == "adversarial" and c not in tuned_adv
    ] == [0.1]
    table = (tmp_path / "out" / "table.md").read_text()
    assert (
        "adversarial (tuned): loss.cls=0.5, loss.adv=1.5, loss.align=1.5, chosen by 3 trials on "
        "mean valbatch_auroc"
        " over 2 cross-batch folds (0.710, fold s.d. 0.040 at epoch 1)" in table
    )
    assert res["tuned"]["adversarial"]["params"] == {
        "loss.cls": 0.5,
        "loss.adv": 1.5,
        "loss.align": 1.5,
    }
    searched.clear()
    experiments.run_medl_experiment(
        cfg, [0], ["conventional", "adversarial"], str(tmp_path / "out"), baseline=False, tune=True
    )
    assert searched == []  # chosen.json kept the choice
    with pytest.raises(ConfigError, match="no search space for \\['timm'\\]"):
        experiments.run_medl_experiment(cfg, [0], ["timm"], str(tmp_path / "o2"), tune=True)
