"""`infer.z_mode`: a Z for unseen batches that does not import the seen batches' label priors.

'balanced' (the Z-predictor's loss weighted by 1 / count(batch, label)) and 'uniform' (1 / n_seen_batches,
no Z-predictor); 'predicted' stays today's (tests/test_zpredictor_model.py). No Ray here: the balanced
Z-predictor is trained by the loop without Ray, and 'uniform' needs none.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_overrides

from raycell import constants as K
from raycell.config import ConfigError, LossConfig, load_config
from raycell.formats.shards import open_dataset
from raycell.zpredictor import balance_setup, balanced_weights, infer_z, uniform_z


def _confounded(n=200, major=0.9, seed=0):
    """Two batches, two labels; in batch 0 label 0 is common, in batch 1 label 1: the label
    predicts the batch.
    """
    rng = np.random.default_rng(seed)
    b = np.repeat([0, 1], n // 2)
    lab = np.where(rng.random(n) < major, b, 1 - b)
    return b, lab


def test_balanced_weights_give_every_label_of_a_batch_the_same_total_weight():
    b, lab = _confounded()
    w = balanced_weights(b, lab, 2, 2)
    cell_w = w[b, lab]
    assert cell_w.mean() == pytest.approx(1.0)  # normalised: the loss keeps its scale
    totals = np.array([[cell_w[(b == i) & (lab == j)].sum() for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(totals, totals[0, 0])  # each (batch, label) weighs the same
    # weighted, the label no longer predicts the batch: P(batch | label) = 1/2 for both labels
    for j in range(2):
        p_b0 = cell_w[(lab == j) & (b == 0)].sum() / cell_w[lab == j].sum()
        assert p_b0 == pytest.approx(0.5)
    # unweighted it did (the shortcut the balanced Z-predictor removes)
    assert (b[lab == 0] == 0).mean() > 0.8


def test_balanced_weights_absent_pairs_get_zero_and_the_rest_still_average_one():
    b = np.array([0, 0, 0, 1, 1, 2])
    lab = np.array([0, 0, 1, 0, 0, 1])  # batch 1 has no label 1, batch 2 no label 0
    w = balanced_weights(b, lab, 3, 2)
    assert w[1, 1] == 0 and w[2, 0] == 0
    assert w[b, lab].mean() == pytest.approx(1.0)
    assert w[0, 0] * 2 == pytest.approx(w[0, 1]) == pytest.approx(w[2, 1])


def test_balance_setup_from_the_train_split(tiny_data, tmp_path):
    from raycell.train.trainer import batch_head_vocab

    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path) + ["model.type=zpredictor"])
    ds = open_dataset(tiny_data)
    bal = balance_setup(cfg, ds)
    vocab = batch_head_vocab(cfg, ds)
    w = np.asarray(bal.weights)
    assert w.shape == (len(vocab), len(ds.manifest.label_vocab))
    assert bal.by.values == tuple(ds.manifest.label_vocab)
    t = ds.read_table([K.BATCH, K.LABEL], splits=[K.TRAIN])
    bc = np.asarray([vocab.values.index(v) for v in t.column(K.BATCH).to_pylist()])
    lc = np.asarray([bal.by.values.index(v) for v in t.column(K.LABEL).to_pylist()])
    assert w[bc, lc].mean() == pytest.approx(1.0) and (w[bc, lc] > 0).all()


def test_balanced_plan_is_the_weighted_cross_entropy():
    from raycell.models import build_plan, create_model

    torch.manual_seed(0)
    m = create_model(
        "zpredictor",
        in_channels=2,
        n_classes=2,
        n_batches=2,
        preset="tiny",
        image_size=32,
        head_names=[K.BATCH],
        head_sizes=[2],
    )
    plan = build_plan(m, LossConfig(), 1e-3, n_batches=2)
    w = torch.tensor([[0.5, 2.0], [3.0, 0.25]])
    plan.set_balance(w)
    x = torch.rand(6, 2, 32, 32)
    y = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [0, 1], [1, 0]])  # batch code, label code
    with torch.no_grad():
        logits = m(x).logits
        want = (
            w[y[:, 0], y[:, 1]]
            * torch.nn.functional.cross_entropy(logits, y[:, 0], reduction="none")
        ).mean()
    losses, _ = plan.validation_step(x, y, None)
    assert losses.values()["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert losses.values()["cls_batch"] == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="weight table"):
        plan.set_balance(torch.ones(3, 2))  # 3 batch rows for a 2-batch head


def test_balanced_zpredictor_trains_in_the_loop_and_serves_the_batch_head_only(tiny_data, tmp_path):
    from raycell.models.checkpoint import load_checkpoint
    from raycell.train.context import LocalContext
    from raycell.train.loop import make_collate, run_training
    from raycell.train.trainer import training_setup

    cfg = load_config(
        None,
        tiny_overrides(tiny_data, tmp_path, epochs=1)
        + ["model.type=zpredictor", "train.max_steps_per_epoch=3", "data.heads=[]"],
    )
    setup, ds = training_setup(cfg, balance=balance_setup(cfg, open_dataset(tiny_data)))
    col = make_collate(setup)
    assert [h.column for h in col.heads] == [
        K.BATCH,
        K.LABEL,
    ]  # y carries the label for the weights
    ctx = LocalContext(ds, col, cfg.data.batch_size, cfg.data.eval_batch_size, tmp_path)
    run_training(ctx, cfg, setup)
    h = ctx.history[-1]
    assert np.isfinite(h["train_loss"]) and 0 <= h["val_acc"] <= 1 and "val_label_acc" not in h
    _, meta = load_checkpoint(tmp_path)
    assert [x.column for x in meta.heads] == [K.BATCH]  # the served model: the batch head only


def test_balance_only_for_the_zpredictor_before_ray(tiny_data, tmp_path):
    from raycell.train.trainer import train

    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path))
    with pytest.raises(ConfigError, match="Z-predictor.*not model type 'conventional'"):
        train(
            cfg, balance={"by": {"column": "label", "values": ["high", "low"]}, "weights": [[1.0]]}
        )
    assert not list(tmp_path.glob("*conventional*"))  # no run folder


def test_uniform_z_rows_sum_to_one_in_the_models_batch_order(tiny_data, tmp_path):
    from raycell.formats.inferred_z import read_inferred_z

    np.testing.assert_allclose(uniform_z(4, 3), 1 / 3)
    ds = open_dataset(tiny_data)
    seen = sorted(set(ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH).to_pylist()))
    served = seen[::-1]  # a served model whose Z columns are in reverse order
    from test_zpredictor_model import _served_checkpoint

    ck = _served_checkpoint(tmp_path / "ck", ds, served)
    cfg = load_config(
        None,
        [
            f"data.path={tiny_data}",
            f"infer.z_out={tmp_path / 'z'}",
            f"infer.checkpoint={ck}",
            "infer.z_splits=[test,unseen]",
        ],
    )
    cfg.infer.z_mode = "uniform"
    s = infer_z(cfg)
    counts = ds.manifest.counts_per_split
    ids, z = read_inferred_z(s["out"], served)  # what infer / the predictor read, unchanged
    assert (
        z.shape == (counts["test"] + counts["unseen"], len(served)) == (s["n_cells"], len(served))
    )
    np.testing.assert_allclose(z.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(z, 1 / len(served))
    t = pq.read_table(s["parquet"])
    assert t.column_names == [K.CELL_ID, K.BATCH, K.SPLIT, "z"]
    assert set(t.column(K.SPLIT).to_pylist()) == {"test", "unseen"}
    meta = json.loads((tmp_path / "z" / "inferred_z.json").read_text())
    assert meta["z_mode"] == "uniform" and meta["batches"]["values"] == served
    assert meta["zpredictor_run"] is None and meta["val_accuracy"] is None
    assert set(meta["mean_z_per_batch"]) == set(t.column(K.BATCH).to_pylist())
    assert not (tmp_path / "z" / "zpredictor.pt").exists()


def test_uniform_z_without_checkpoint_uses_the_training_batches(tiny_data, tmp_path):
    ds = open_dataset(tiny_data)
    seen = sorted(set(ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH).to_pylist()))
    cfg = load_config(None, [f"data.path={tiny_data}", f"infer.z_out={tmp_path / 'z'}"])
    cfg.infer.z_mode = "uniform"
    s = infer_z(cfg)
    assert s["batches"]["values"] == seen and s["n_cells"] == ds.manifest.counts_per_split["unseen"]


def test_zero_z_puts_every_random_effect_at_its_prior_mean(tiny_data, tmp_path):
    """'zero': Z = 0 rows, the same files as 'uniform'; the random-effects layers then add nothing."""
    from raycell.formats.inferred_z import read_inferred_z
    from raycell.models.random_effects import ClusterScaleBias

    ds = open_dataset(tiny_data)
    seen = sorted(set(ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH).to_pylist()))
    cfg = load_config(
        None, [f"data.path={tiny_data}", f"infer.z_out={tmp_path / 'z'}", "infer.z_mode=zero"]
    )
    s = infer_z(cfg)
    ids, z = read_inferred_z(s["out"], seen)
    assert z.shape == (ds.manifest.counts_per_split["unseen"], len(seen)) and not z.any()
    meta = json.loads((tmp_path / "z" / "inferred_z.json").read_text())
    assert meta["z_mode"] == "zero" and meta["zpredictor_run"] is None
    assert not (tmp_path / "z" / "zpredictor.pt").exists()
    # why zero is the mixed model's prediction for a new group: a random-effects layer at Z = 0 is the
    # fixed-effects normalisation alone, whatever the random effects learnt
    torch.manual_seed(0)
    layer = ClusterScaleBias(4, len(seen)).eval()
    with torch.no_grad():
        for re in layer.re_layers():
            for prm in re.parameters():
                prm.add_(torch.randn_like(prm))
        x = torch.randn(3, 4, 5, 5)
        zero = layer(x, torch.zeros(3, len(seen)))
        np.testing.assert_allclose(zero.numpy(), layer.norm(x).numpy(), atol=1e-6)
        one_hot = torch.eye(len(seen))[[0, 1, 0]]
        assert not torch.allclose(layer(x, one_hot), zero)


def test_bad_z_mode_is_one_line_before_anything(tiny_data, tmp_path):
    over = [f"data.path={tiny_data}", f"infer.z_out={tmp_path / 'z'}", "infer.z_mode=mean"]
    with pytest.raises(
        ConfigError,
        match=r"^--set infer.z_mode=mean: infer.z_mode must be predicted, balanced, uniform "
        r"or zero, got 'mean'$",
    ):
        infer_z(load_config(None, over))
    assert not (tmp_path / "z").exists()


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
def test_experiment_z_modes_rows_reuse_the_checkpoint(tiny_data, monkeypatch, tmp_path):
    """`experiment medl --z-modes uniform,balanced`: one more row per mode, same checkpoint, that mode's Z."""
    from test_baseline import _cheap_latent_metrics, _fake_deep

    from raycell import experiments
    from raycell.config import ConfigError

    _fake_deep(monkeypatch)
    _cheap_latent_metrics(monkeypatch)
    made, served = [], []

    def fake_z(cfg, seed, z_dir, mode=None):
        mode = mode or cfg.infer.z_mode
        made.append((z_dir.name, mode))
        z_dir.mkdir(parents=True, exist_ok=True)
        (z_dir / "inferred_z.json").write_text(json.dumps({"z_mode": mode, "val_accuracy": 0.5}))
        return z_dir

    def fake_infer_evaluate_all(cfg, todo, quiet=False):
        served.extend((inf.checkpoint, Path(inf.z_source).name) for inf in todo)
        return [{"splits": {}} for _ in todo]

    monkeypatch.setattr(experiments, "_unseen_z", fake_z)
    monkeypatch.setattr(experiments, "infer_evaluate_all", fake_infer_evaluate_all)
    cfg = load_config(None, [f"data.path={tiny_data}", "eval.max_cells=80"])
    res = experiments.run_medl_experiment(
        cfg,
        [0],
        ["conventional", "mixedeffects"],
        str(tmp_path / "out"),
        randomized_z=False,
        baseline=False,
        z_modes=["uniform", "predicted"],
    )
    assert list(res["summary"]) == ["conventional", "mixedeffects", "mixedeffects (Z uniform)"]
    assert made == [("zpredictor", "predicted"), ("zpredictor_uniform", "uniform")]
    # one pass for the seed: every row's output, the Z-mode row with the trained row's checkpoint
    # ("c" in the fake) and that mode's Z
    assert served == [
        ("c", ""),
        ("c", "zpredictor"),
        ("c", "zpredictor_uniform"),
    ]
    with pytest.raises(ConfigError, match="z-modes"):
        experiments.run_medl_experiment(
            cfg, [0], ["mixedeffects"], str(tmp_path / "o2"), z_modes=["bogus"]
        )


def test_soft_z_reader_skips_shards_without_z_cells(tmp_path):
    """A predictions folder whose shards mostly hold no unseen cell (one shard per ingested field)."""
    from raycell.zpredictor import _read_soft_z

    (tmp_path / "shards").mkdir()
    col = f"{K.PROB}_{K.BATCH}"
    full = pa.table(
        {
            K.CELL_ID: ["a", "b"],
            K.BATCH: ["u", "u"],
            K.SPLIT: ["unseen"] * 2,
            col: pa.array([[0.2, 0.8], [0.5, 0.5]], pa.list_(pa.float32())),
        }
    )
    pq.write_table(
        pa.table({K.CELL_ID: pa.array([], pa.string())}), tmp_path / "shards" / "p0.parquet"
    )
    pq.write_table(full, tmp_path / "shards" / "p1.parquet")
    manifest = {
        "shards": [
            {"file": "shards/p0.parquet", "rows": 0},
            {"file": "shards/p1.parquet", "rows": 2},
        ]
    }
    t = _read_soft_z(tmp_path, manifest)
    assert t.column(K.CELL_ID).to_pylist() == ["a", "b"]
