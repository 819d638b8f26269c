"""timm backbones with weak-label heads: layer-wise learning rates, the one loop, checkpoints, bad inputs."""

import pytest
import torch
from conftest import tiny_overrides

from raycell.config import ConfigError, LossConfig, load_config
from raycell.formats.categories import CategoryMap
from raycell.formats.checkpoint import find_checkpoint
from raycell.losses import heads_loss
from raycell.models import build_plan, create_model
from raycell.models.checkpoint import load_checkpoint
from raycell.models.timm_models import TimmModelError
from raycell.train.context import LocalContext
from raycell.train.loop import make_collate, run_training
from raycell.train.trainer import check_train, training_setup

TIMM = ["model.type=timm", "model.args={backbone: resnet18}", "data.heads=[label, group]"]


def _small(heads=(2, 8)):
    return create_model(
        "timm",
        in_channels=2,
        n_classes=2,
        backbone="resnet18",
        head_names=["label", "group"][: len(heads)],
        head_sizes=list(heads),
    )


def test_layer_groups_cover_every_parameter_once_with_lower_rates_below():
    m = _small()
    groups = m.layer_groups(1e-3, 0.01, 0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())  # each parameter exactly once
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert lr_of[id(named["heads.weight"])] == pytest.approx(1e-3)  # the heads train at train.lr
    stem, l1, l4 = (
        lr_of[id(named[n])]
        for n in (
            "backbone.conv1.weight",
            "backbone.layer1.0.conv1.weight",
            "backbone.layer4.0.conv1.weight",
        )
    )
    assert stem < l1 < l4 < 1e-3
    assert stem == pytest.approx(1e-3 * 0.5**5)  # stem, 4 stages, heads: 6 groups
    # biases and norms get no weight decay (timm's grouping), weights do
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert (
        wd_of[id(named["backbone.bn1.weight"])] == 0
        and wd_of[id(named["backbone.conv1.weight"])] == 0.01
    )
    plan = build_plan(m, LossConfig(), 1e-3, 0.01, layer_decay=0.5)
    assert len(plan.optimizers["main"].param_groups) == len(groups)


def test_one_cycle_schedule_warms_up_then_anneals_and_resumes():
    m = _small()
    plan = build_plan(m, LossConfig(), 1e-3)
    plan.set_schedule("onecycle", 10)
    x, y = torch.rand(4, 2, 32, 32), torch.tensor([[0, 1], [1, 2], [0, 3], [1, 4]])
    lrs = []
    for _ in range(6):
        plan.training_step(x, y, torch.zeros(4, 1))
        lrs.append(plan.optimizers["main"].param_groups[0]["lr"])
    assert lrs[0] < lrs[2] and lrs[-1] < max(lrs)  # up over the first 30% of the steps, then down
    plan2 = build_plan(_small(), LossConfig(), 1e-3)
    plan2.set_schedule("onecycle", 10)
    plan2.load_state_dict(plan.state_dict())
    assert plan2.optimizers["main"].param_groups[0]["lr"] == pytest.approx(lrs[-1])


def test_heads_loss_softmax_and_multilabel():
    logits = torch.randn(5, 2 + 3)
    y = torch.tensor([[0, 2], [1, 0], [1, 1], [0, 0], [1, 2]])
    total, terms = heads_loss(logits, y, [2, 3])
    ce = torch.nn.functional.cross_entropy
    assert terms[0] == pytest.approx(ce(logits[:, :2], y[:, 0]).item())
    assert total == pytest.approx((terms[0] + terms[1]).item())
    total_ml, _ = heads_loss(logits, y, [2, 3], multilabel=True)
    target = torch.cat(
        [torch.nn.functional.one_hot(y[:, 0], 2), torch.nn.functional.one_hot(y[:, 1], 3)], 1
    )
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float())
    assert total_ml == pytest.approx(bce.item(), rel=1e-5)  # the blog's BCE over all heads' classes


def test_numeric_weak_labels_are_ordinal():
    import pyarrow as pa

    m = CategoryMap.fit_column("dose", pa.array([10.0, 0.1, 1.0, 0.0, 0.1]))
    assert m.values == ("0", "0.1", "1", "10")  # numeric order, spelt as encode spells them
    assert list(m.encode(pa.array([1.0, 10.0]))) == [2, 3]


def test_weak_label_training_checkpoint_round_trip(tiny_data, tmp_path):
    cfg = load_config(
        None,
        tiny_overrides(tiny_data, tmp_path, epochs=2)
        + TIMM
        + ["train.schedule=onecycle", "train.layer_decay=0.7", "train.augment=flip,rot90,gain"],
    )
    setup, ds = training_setup(cfg)
    assert [h.column for h in setup.heads] == ["label", "group"]
    ctx = LocalContext(
        ds, make_collate(setup), cfg.data.batch_size, cfg.data.eval_batch_size, tmp_path
    )
    run_training(ctx, cfg, setup)
    last = ctx.history[-1]
    for k in (
        "train_cls_label",
        "train_cls_group",
        "val_label_acc",
        "val_group_auroc",
        "val_auroc",
    ):
        assert k in last
    assert ctx.history[-1]["train_loss"] < ctx.history[0]["train_loss"]
    model, meta = load_checkpoint(find_checkpoint(tmp_path))
    assert meta.model_type == "timm" and [h.column for h in meta.heads] == [
        "label",
        "group",
    ]
    assert model.head_sizes == [2, 8] and meta.model_args["backbone"] == "resnet18"
    x = torch.rand(3, 2, 32, 32)
    again, _ = load_checkpoint(find_checkpoint(tmp_path))
    assert torch.equal(model(x).logits, again(x).logits)  # the weights round-trip exactly


def test_bad_weak_label_inputs_are_one_line(tiny_data, tmp_path):
    base = tiny_overrides(tiny_data, tmp_path)
    with pytest.raises(
        ConfigError, match=r"data.heads: column\(s\) \['dose'\] are not in data set"
    ):
        check_train(load_config(None, base + ["model.type=timm", "data.heads=[dose]"]))
    with pytest.raises(
        TimmModelError, match="'resnet5O' is not a timm model name; close names: resnet50"
    ):
        check_train(
            load_config(None, base + ["model.type=timm", "model.args={backbone: resnet5O}"])
        )
    with pytest.raises(ConfigError, match="model type 'conventional' has one phenotype head"):
        check_train(load_config(None, base + ["data.heads=[group]"]))
    with pytest.raises(
        ConfigError, match="train.layer_decay: model type 'conventional' has no layer groups"
    ):
        check_train(load_config(None, base + ["train.layer_decay=0.5"]))
    # a local weights file of another architecture: named, with what does not fit
    f = tmp_path / "r34.pth"
    torch.save(
        create_model("timm", in_channels=3, n_classes=2, backbone="resnet34").backbone.state_dict(),
        f,
    )
    with pytest.raises(
        TimmModelError, match=r"r34.pth does not fit timm model ResNet: .*unexpected key"
    ):
        check_train(
            load_config(
                None, base + ["model.type=timm", f"model.args={{backbone: resnet18, weights: {f}}}"]
            )
        )


def test_local_weights_load_with_adapted_input_channels(tmp_path):
    src = create_model(
        "timm", in_channels=3, n_classes=2, backbone="resnet18"
    ).backbone.state_dict()
    f = tmp_path / "r18.pth"
    torch.save(src, f)
    m = create_model("timm", in_channels=2, n_classes=2, backbone="resnet18", weights=str(f))
    got = m.backbone.state_dict()
    assert torch.equal(got["layer3.1.conv2.weight"], src["layer3.1.conv2.weight"])
    assert (
        got["conv1.weight"].shape[1] == 2
    )  # the stem adapted to 2 channels (timm's adapt_input_conv)
