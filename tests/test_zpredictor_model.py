"""The Z-predictor as a registered model type trained by the one loop on Ray (`raycell infer-z`): the model
and its plan, the batch head and its forced validation mode, early stopping, and infer-z end to end."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_overrides

from raycell import constants as K
from raycell.config import ConfigError, LossConfig, load_config
from raycell.formats.categories import CategoryMap
from raycell.formats.shards import open_dataset
from raycell.models import build_plan, create_model, model_entry
from raycell.plans import ZPredictorPlan


def _model(n=3, size=32):
    torch.manual_seed(0)
    return create_model(
        "zpredictor",
        in_channels=2,
        n_classes=2,
        n_batches=n,
        preset="tiny",
        image_size=size,
        head_names=[K.BATCH],
        head_sizes=[n],
    )


def test_registered_as_a_batch_head_classifier_with_imageclassifier_weights():
    from raycell.models.layers import ImageClassifier

    e = model_entry("zpredictor")
    assert (
        e.plan is ZPredictorPlan
        and e.weak_labels
        and e.batch_head
        and not e.reconstructs
        and not e.uses_z
    )
    m = _model(4)
    x = torch.rand(5, 2, 32, 32)
    out = m(x)
    assert (
        out.logits.shape == (5, 4) and out.recon is None and out.latent.shape == (5, m.latent_dim)
    )
    assert m.head_names == [K.BATCH] and m.head_sizes == [4]
    out.logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    # zpredictor.pt keeps today's contract: the ImageClassifier's parameter names
    ic = ImageClassifier(2, 4, 32)
    ic.load_state_dict(m.state_dict())
    torch.testing.assert_close(ic(x), m(x).logits)
    with pytest.raises(ValueError, match="one head"):
        create_model(
            "zpredictor",
            in_channels=2,
            n_classes=2,
            preset="tiny",
            head_names=["a", "b"],
            head_sizes=[2, 2],
        )


def test_plan_is_nadam_softmax_ce_and_learns_a_batch():
    m = _model(3)
    plan = build_plan(m, LossConfig(heads="multilabel"), 1e-2, n_batches=3)
    assert isinstance(plan.optimizers["main"], torch.optim.NAdam)
    assert plan.optimizers["main"].param_groups[0]["lr"] == 1e-2
    torch.manual_seed(1)
    b = torch.tensor([0, 1, 2] * 4)
    x = torch.rand(12, 2, 32, 32) * 0.2 + b.view(-1, 1, 1, 1) * 0.3  # batch = brightness
    y = b.view(-1, 1)
    first = plan.training_step(x, y, None).values()
    # softmax cross-entropy whatever loss.heads says (the softmax is the soft Z)
    assert first["cls_batch"] == pytest.approx(first["loss"])
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(m(x).logits, b).item()
    for _ in range(8):
        last = plan.training_step(x, y, None).values()
    assert last["loss"] < ce


def test_setup_uses_the_training_batches_as_head_and_never_valbatch(
    tiny_valbatch_data, tmp_path, capsys
):
    from raycell.train.trainer import training_setup

    cfg = load_config(
        None, tiny_overrides(tiny_valbatch_data, tmp_path) + ["model.type=zpredictor"]
    )
    setup, ds = training_setup(cfg)
    assert ds.manifest.counts_per_split[K.VALBATCH] > 0
    assert setup.valbatch is False  # forced: a batch classifier cannot score held-out batches
    assert "split 'val'" in capsys.readouterr().out
    train_batches = sorted(
        set(ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH).to_pylist())
    )
    assert setup.heads == (setup.batches,)
    assert list(setup.heads[0].values) == train_batches and setup.heads[0].column == K.BATCH
    # the other model types keep validating on the held-out batches
    setup2, _ = training_setup(load_config(None, tiny_overrides(tiny_valbatch_data, tmp_path)))
    assert setup2.valbatch is True


def test_bad_heads_and_splits_are_one_line_errors(tiny_data, tmp_path):
    from raycell.data.splits import split_dataset
    from raycell.train.trainer import check_train

    base = tiny_overrides(tiny_data, tmp_path) + ["model.type=zpredictor"]
    with pytest.raises(ConfigError, match=r"data.heads \['label'\].*one head, the 'batch' column"):
        check_train(load_config(None, base + ["data.heads=[label]"]))
    check_train(
        load_config(None, base + ["data.heads=[batch]"])
    )  # its own head, said explicitly: fine
    nval = tmp_path / "noval"
    shutil.copytree(tiny_data, nval)
    split_dataset(str(nval), fractions=[0.8, 0.0, 0.2])
    with pytest.raises(
        ConfigError, match=r"held-out cells of the training batches \(split 'val'\).*no 'val'"
    ):
        check_train(load_config(None, tiny_overrides(nval, tmp_path) + ["model.type=zpredictor"]))


def test_early_stopping_stops_after_patience_and_picks_the_first_best(tmp_path):
    from raycell.train.stopping import EarlyStopper, EarlyStopping

    accs = [0.5, 0.7, 0.7, 0.6, 0.9]
    stopper = EarlyStopper(EarlyStopping(2, "val_acc", "max"))
    hist = [{"epoch": e, "val_acc": a} for e, a in enumerate(accs)]
    stops = [stopper.after_epoch(r) for r in hist[:4]]
    assert stops == [False, False, False, True] and stopper.best_epoch == 1  # the first of equals
    assert "val_acc has not improved on 0.7000 (epoch 1) for 2 epoch(s)" in stopper.message(3)
    assert not stopper.after_epoch(hist[4]) and stopper.best_epoch == 4  # an improvement resets
    assert EarlyStopping(2).best(hist[:4])["epoch"] == 1
    assert (
        EarlyStopping(2, "val_loss", "min").best(
            [{"epoch": 0, "val_loss": 2.0}, {"epoch": 1, "val_loss": float("nan")}]
        )["epoch"]
        == 0
    )
    # a resumed run counts the epochs in its history: one more non-improving epoch stops it
    resumed = EarlyStopper(EarlyStopping(2), hist[:3])
    assert resumed.after_epoch({"epoch": 3, "val_acc": 0.6})
    with pytest.raises(ConfigError, match="patience"):
        EarlyStopping(0)


def _served_checkpoint(path, ds, batches):
    """An untrained conventional model 'trained' on `batches` (their order is its Z column order)."""
    from raycell.formats.spec import DataSpec
    from raycell.models.checkpoint import save_checkpoint

    spec = DataSpec.from_dataset(ds)
    m = create_model(
        "conventional",
        in_channels=spec.shape[0],
        n_classes=2,
        n_batches=len(batches),
        preset="tiny",
        image_size=spec.shape[1],
    )
    return save_checkpoint(
        path,
        m,
        None,
        epoch=0,
        spec=spec,
        labels=CategoryMap(K.LABEL, tuple(ds.manifest.label_vocab)),
        batches=CategoryMap(K.BATCH, tuple(batches)),
        config={},
        metrics={},
    )


def test_bad_inputs_fail_before_ray(tiny_data, tmp_path):
    from raycell.zpredictor import infer_z

    ds = open_dataset(tiny_data)
    train_b = sorted(set(ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH).to_pylist()))
    ck = _served_checkpoint(tmp_path / "ck", ds, train_b + ["batch99"])
    cfg = load_config(
        None, [f"data.path={tiny_data}", f"infer.z_out={tmp_path / 'z'}", f"infer.checkpoint={ck}"]
    )
    with pytest.raises(ConfigError, match=r"batch99.*lacks.*infer.data"):
        infer_z(cfg)
    cfg = load_config(
        None, [f"data.path={tiny_data}", f"infer.z_out={tmp_path / 'z'}", "infer.z_splits=[nope]"]
    )
    with pytest.raises(ConfigError, match=r"infer.z_splits.*nope"):
        infer_z(cfg)
    assert not (tmp_path / "z").exists()


@pytest.fixture(scope="module")
def z_run(tiny_data, ray_local, tmp_path_factory):
    """infer-z on Ray for a served model whose batch vocabulary is in reverse order, on seen and unseen."""
    from raycell.zpredictor import infer_z

    root = tmp_path_factory.mktemp("zrun")
    ds = open_dataset(tiny_data)
    served = sorted(set(ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH).to_pylist()))[
        ::-1
    ]
    ck = _served_checkpoint(root / "ck", ds, served)
    cfg = load_config(
        None,
        tiny_overrides(tiny_data, root)
        + [
            f"infer.z_out={root / 'z'}",
            f"infer.checkpoint={ck}",
            "infer.z_splits=[test,unseen]",
            "infer.z_epochs=3",
            "infer.z_patience=2",
            "infer.z_lr=1e-3",
            "infer.z_batch_size=8",
        ],
    )
    return infer_z(cfg), served


@pytest.mark.ray
def test_infer_z_trains_on_ray_and_writes_todays_contract(z_run, tiny_data):
    from raycell.models.layers import ImageClassifier
    from raycell.zpredictor import read_inferred_z

    s, served = z_run
    t = pq.read_table(s["parquet"])
    counts = open_dataset(tiny_data).manifest.counts_per_split
    assert t.num_rows == counts["test"] + counts["unseen"] == s["n_cells"]
    ids, z = read_inferred_z(s["out"], served)  # the readers of infer / predictor, unchanged
    assert z.shape == (t.num_rows, len(served)) and list(s["batches"]["values"]) == served
    np.testing.assert_allclose(z.sum(1), 1.0, atol=1e-5)
    assert (z >= 0).all()
    # trained by the one loop through Ray Train, early-stopped on val accuracy, best epoch kept
    assert s["zpredictor_run"].startswith(s["out"]) and 1 <= s["epochs"] <= 3
    accs = [h["val_accuracy"] for h in s["history"]]
    assert s["val_accuracy"] == pytest.approx(max(accs)) and s["history"][s["best_epoch"]][
        "val_accuracy"
    ] == max(accs)
    ic = ImageClassifier(2, len(served), 32)
    ic.load_state_dict(torch.load(f"{s['out']}/zpredictor.pt", weights_only=True))
    # the columns follow the served model's order: the Z-predictor's own (sorted) order, reversed
    pred = pq.read_table(f"{s['zpredictor_run']}/predictions/shards")
    own = dict(
        zip(pred.column(K.CELL_ID).to_pylist(), pred.column(f"{K.PROB}_{K.BATCH}").to_pylist())
    )
    np.testing.assert_allclose(z, np.asarray([own[i][::-1] for i in ids.to_pylist()]), atol=1e-6)


@pytest.mark.ray
def test_seen_batch_cells_favour_their_batch(z_run):
    s, served = z_run
    t = pq.read_table(s["parquet"])
    z = np.stack(t.column("z").to_numpy(zero_copy_only=False))
    test = np.asarray(t.column(K.SPLIT).to_pylist()) == "test"
    own = np.asarray([served.index(b) for b in np.asarray(t.column(K.BATCH).to_pylist())[test]])
    # held-out cells of the seen batches: their own batch gets more than the chance share of Z
    assert z[test][np.arange(test.sum()), own].mean() > 1.5 / len(served)
    assert set(s["mean_z_per_batch"]) == set(t.column(K.BATCH).to_pylist())
