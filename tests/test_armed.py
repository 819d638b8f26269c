"""The ARMED family: alternating steps, random effects, checkpoints, Z for unseen batches, training.

Forward/backward with every parameter getting a gradient is covered for every registered type by
tests/test_models.py.
"""

import math

import pytest
import torch
from conftest import tiny_overrides
from torch.distributions import Normal, kl_divergence

from raycell import constants as K
from raycell.config import LossConfig, load_config
from raycell.data.dataset import CropCollate
from raycell.formats.categories import CategoryMap
from raycell.formats.checkpoint import load_plan_state
from raycell.formats.shards import open_dataset
from raycell.formats.spec import DataSpec
from raycell.models import build_plan, create_model
from raycell.models.checkpoint import load_checkpoint, save_checkpoint
from raycell.models.random_effects import ClusterScaleBias, RandomEffects
from raycell.plans import AdversarialPlan, MixedEffectsPlan, RandomEffectsPlan

ARMED = ["adversarial", "randomeffects", "mixedeffects"]
NB = 3


def _model(model_type, n_batches=NB, **kw):
    torch.manual_seed(0)
    return create_model(
        model_type,
        in_channels=2,
        n_classes=2,
        n_batches=n_batches,
        preset="tiny",
        image_size=32,
        **kw,
    )


def _batch(n=12, nb=NB):
    torch.manual_seed(1)
    x = torch.rand(n, 2, 32, 32)
    y = torch.arange(n) % 2
    z = torch.nn.functional.one_hot(torch.arange(n) % nb, nb).float()
    return x, y, z


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _snap(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_plans_are_registered_per_type():
    for model_type, plan_cls in [
        ("adversarial", AdversarialPlan),
        ("randomeffects", RandomEffectsPlan),
        ("mixedeffects", MixedEffectsPlan),
    ]:
        assert type(build_plan(_model(model_type), LossConfig(), 1e-3, n_batches=NB)) is plan_cls


@pytest.mark.parametrize(
    "model_type,aux,prefix",
    [
        ("adversarial", "adversary", "adversary."),
        ("mixedeffects", "adversary", "fe.adversary."),
        ("randomeffects", "image_classifier", "image_classifier."),
        ("mixedeffects", "image_classifier", "re.image_classifier."),
    ],
)
def test_auxiliary_step_moves_only_its_network_and_main_step_leaves_it(model_type, aux, prefix):
    m = _model(model_type)
    plan = build_plan(m, LossConfig(), 1e-2, n_batches=NB)
    x, y, z = _batch()
    before = _snap(m)
    getattr(plan, f"{aux}_step")(x, z)
    changed = _changed(before, m)
    assert changed and all(n.startswith(prefix) for n in changed), sorted(changed)[:5]
    # the encoder that the adversary reads did not move in the adversary step
    assert not any(n.startswith(("encoder.", "fe.encoder.")) for n in changed)
    before = _snap(m)
    plan.main_step(x, y, z)
    changed = _changed(before, m)
    assert not any(n.startswith(prefix) for n in changed)
    assert any("encoder." in n for n in changed) and any("decoder." in n for n in changed)
    # the frozen network's parameters are trainable again after the main step
    assert all(p.requires_grad for p in m.parameters())


def test_main_objective_subtracts_the_adversary_loss():
    m = _model("adversarial")
    plan = build_plan(m, LossConfig(recon=1.0, cls=0.1, adv=0.5), 1e-3, n_batches=NB)
    x, y, z = _batch()
    lo = plan.compute_loss(m(x, z), x, y, z)
    t = lo.terms
    # and adds the batch-mean alignment term (loss.align, default 0.3)
    torch.testing.assert_close(
        lo.loss, t["mse"] + 0.1 * t["cls"] - 0.5 * t["adv"] + 0.3 * t["align"]
    )
    off = build_plan(m, LossConfig(recon=1.0, cls=0.1, adv=0.5, align=0.0), 1e-3, n_batches=NB)
    lo = off.compute_loss(m(x, z), x, y, z)
    assert "align" not in lo.terms
    torch.testing.assert_close(lo.loss, t["mse"] + 0.1 * t["cls"] - 0.5 * t["adv"])


def test_confusion_objective_adds_the_uniform_cross_entropy():
    m = _model("adversarial")
    plan = build_plan(
        m, LossConfig(recon=1.0, cls=0.1, adv=0.5, adv_objective="confusion"), 1e-3, n_batches=NB
    )
    x, y, z = _batch()
    out = m(x, z)
    lo = plan.compute_loss(out, x, y, z)
    t = lo.terms
    uniform = torch.full((len(x), NB), 1.0 / NB)
    torch.testing.assert_close(
        t["adv_confusion"], torch.nn.functional.cross_entropy(out.batch_logits, uniform)
    )
    torch.testing.assert_close(
        lo.loss, t["mse"] + 0.1 * t["cls"] + 0.5 * t["adv_confusion"] + 0.3 * t["align"]
    )
    # the encoder gains nothing from a confidently wrong adversary: the term is smallest when uniform
    from raycell.losses import confusion_ce

    sure = torch.tensor([[9.0] + [0.0] * (NB - 1)] * 4)
    flat = torch.zeros(4, NB)
    z1 = torch.nn.functional.one_hot(torch.tensor([1, 1, 1, 1]), NB).float()
    assert confusion_ce(flat, z1) < confusion_ce(sure, z1)
    assert math.isclose(float(confusion_ce(flat, z1)), math.log(NB), rel_tol=1e-6)


@pytest.mark.parametrize("model_type", ["adversarial", "mixedeffects"])
def test_latent_adversary_reads_only_the_latent(model_type):
    m = _model(model_type, adversary_reads="latent")
    plan = build_plan(m, LossConfig(adv_steps=3), 1e-2, n_batches=NB)
    x, y, z = _batch()
    adversary = m.auxiliary_networks()["adversary"]
    latent, feats = m.adversary_inputs(x)
    # the same logits whatever the block outputs: the latent is all it reads
    a = adversary(feats, latent)
    b = adversary([torch.randn_like(f) for f in feats], latent)
    torch.testing.assert_close(a, b)
    before = _snap(m)
    logs = plan.training_step(x, y, z).values()
    assert "adversary" in logs and _changed(before, m)


def test_batch_conditioned_decoder_reads_z_and_the_latent_does_not():
    m = _model("adversarial", decoder_batch=True)
    m.eval()
    x, _, z = _batch()
    out = m(x, z)
    other = torch.roll(z, 1, dims=1)  # every cell told it is from another batch
    out2 = m(x, other)
    torch.testing.assert_close(out.latent, out2.latent)  # the latent does not see Z
    assert not torch.allclose(out.recon, out2.recon)  # the reconstruction does
    assert m(x).recon.shape == x.shape  # no Z (an unseen batch): still a reconstruction


def test_one_training_batch_disables_the_adversary_with_a_warning():
    for model_type in ("adversarial", "mixedeffects"):
        m = _model(model_type, n_batches=1)
        with pytest.warns(UserWarning, match="adversary is disabled"):
            plan = build_plan(m, LossConfig(), 1e-3, n_batches=1)
        assert "adversary" not in plan.optimizers
        x, y, _ = _batch()
        adversary = m.auxiliary_networks()["adversary"]
        before = {n: p.clone() for n, p in adversary.named_parameters()}
        logs = plan.training_step(x, y, torch.ones(len(x), 1)).values()
        assert "adv" not in logs and "adversary" not in logs
        assert all(torch.equal(before[n], p) for n, p in adversary.named_parameters())


def test_analytic_kl_agrees_with_monte_carlo():
    torch.manual_seed(0)
    # wider posteriors than the AEC's initial ones so that a Monte-Carlo estimate converges fast
    re = RandomEffects(
        4, 5, loc_init_scale=0.3, scale_init_min=0.2, scale_init_range=0.1, prior_scale=0.25
    )
    q, p = Normal(re.loc.detach(), re.scale.detach()), Normal(0.0, 0.25)
    w = q.sample((40000,))
    mc = (q.log_prob(w) - p.log_prob(w)).sum((1, 2)).mean()
    kl = re.kl().detach()
    assert abs(float(mc - kl)) < 0.02 * float(kl) + 0.05, (float(mc), float(kl))
    torch.testing.assert_close(kl, kl_divergence(q, Normal(torch.zeros(4, 5), 0.25)).sum())
    # the reference's initialisation: s.d. between ~5e-5 and 0.01, means ~ N(0, 0.1)
    default = RandomEffects(6, 64)
    s = default.scale.detach()
    assert 4e-5 < float(s.min()) and float(s.max()) < 0.0101


@pytest.mark.parametrize("model_type", ["randomeffects", "mixedeffects"])
def test_posterior_means_in_eval_mode_samples_in_training(model_type):
    m = _model(model_type)
    x, _, z = _batch()
    m.eval()
    with torch.no_grad():
        a, b = m(x, z), m(x, z)
    for k in ("latent", "recon", "logits"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    layers = [mod for mod in m.modules() if isinstance(mod, RandomEffects)]
    assert layers and all(torch.equal(r.weight(), r.loc) for r in layers)
    m.train()
    with torch.no_grad():
        c, d = m(x, z), m(x, z)
    assert not torch.equal(c.recon, d.recon)  # one fresh weight sample per forward


def test_soft_z_is_a_convex_mix_of_batch_rows():
    torch.manual_seed(0)
    re = RandomEffects(3, 4).eval()
    rows = re(torch.eye(3))
    soft = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(re(soft), soft @ rows)
    assert torch.equal(re(torch.zeros(1, 3)), torch.zeros(1, 4))  # no Z: no random effect
    block = ClusterScaleBias(4, 3).eval()
    x = torch.rand(2, 4, 8, 8)
    g, b = soft @ block.gamma.loc, soft @ block.beta.loc
    expected = block.norm(x) * (1 + g[:, :, None, None]) + b[:, :, None, None]
    torch.testing.assert_close(block(x, soft), expected)
    torch.testing.assert_close(block(x, torch.zeros(2, 3)), block.norm(x))


def _save(model, path, ds, batches):
    plan = build_plan(model, LossConfig(), 1e-3, n_batches=len(batches))
    return save_checkpoint(
        path,
        model,
        plan.state_dict(),
        epoch=0,
        spec=DataSpec.from_dataset(ds),
        labels=CategoryMap(K.LABEL, ("high", "low")),
        batches=CategoryMap(K.BATCH, batches),
        config={},
        metrics={},
    )


@pytest.mark.parametrize("model_type", ["conventional"] + ARMED)
def test_checkpoint_round_trip_gives_identical_outputs(model_type, tmp_path):
    m = _model(model_type)
    plan = build_plan(m, LossConfig(), 1e-2, n_batches=NB)
    x, y, z = _batch()
    plan.training_step(x, y, z)  # move weights, BN statistics and optimiser states off their init
    save_checkpoint(
        tmp_path,
        m,
        plan.state_dict(),
        epoch=0,
        spec=DataSpec(("a", "b"), (2, 32, 32), "uint8"),
        labels=CategoryMap(K.LABEL, ("h", "l")),
        batches=CategoryMap(K.BATCH, ("b0", "b1", "b2")),
        config={},
        metrics={},
    )
    m2, meta = load_checkpoint(tmp_path)
    assert meta.model_type == model_type and not m2.training
    m.eval()
    with torch.no_grad():
        o1, o2 = m(x, z).present(), m2(x, z).present()
    assert o1.keys() == o2.keys()
    for k, v in o1.items():
        torch.testing.assert_close(v, o2[k], msg=lambda s: f"{model_type} output {k}: {s}")
    plan2 = build_plan(m2, LossConfig(), 1e-2, n_batches=NB)
    plan2.load_state_dict(load_plan_state(tmp_path))
    assert set(plan2.optimizers) == set(plan.optimizers)


@pytest.fixture(scope="module")
def inferred_z(tiny_data, ray_local, tmp_path_factory):
    from raycell.zpredictor import infer_z

    out = tmp_path_factory.mktemp(
        "z"
    )  # the Z-predictor trains on Ray (tests/test_zpredictor_model.py)
    cfg = load_config(
        None,
        [
            f"data.path={tiny_data}",
            f"infer.z_out={out}",
            "infer.z_epochs=1",
            "infer.z_lr=1e-3",
            "ray.progress=false",
            "data.block_size_mb=1",
        ],
    )
    return infer_z(cfg)


@pytest.mark.ray
def test_infer_z_writes_a_soft_z_per_unseen_cell(inferred_z, tiny_data):
    import numpy as np
    import pyarrow.parquet as pq

    t = pq.read_table(inferred_z["parquet"])
    ds = open_dataset(tiny_data)
    assert t.num_rows == ds.manifest.counts_per_split["unseen"] == inferred_z["n_cells"]
    assert set(t.column(K.SPLIT).to_pylist()) == {"unseen"}
    z = np.stack(t.column("z").to_numpy(zero_copy_only=False))
    assert z.shape[1] == len(inferred_z["batches"]["values"]) == 6 and z.dtype == np.float32
    np.testing.assert_allclose(z.sum(1), 1.0, atol=1e-5)
    assert (z >= 0).all()


@pytest.mark.ray
def test_unseen_batches_need_an_inferred_z(tiny_data, inferred_z, tmp_path):
    from raycell.infer.predictor import CropPredictor, MissingDesignMatrixError

    ds = open_dataset(tiny_data)
    seen = tuple(inferred_z["batches"]["values"])
    t = ds.read_table(None, splits=["unseen", "test"])
    for model_type in ARMED + ["conventional"]:
        _save(_model(model_type, n_batches=len(seen)), tmp_path / model_type, ds, seen)
    # random/mixed effects without a Z for the unseen batches: a clear error naming infer-z
    for model_type in ("randomeffects", "mixedeffects"):
        with pytest.raises(
            MissingDesignMatrixError, match=r"batch06.*raycell infer-z.*infer.z_source"
        ):
            CropPredictor(str(tmp_path / model_type))(t)
    # conventional / adversarial ignore Z: unchanged behaviour
    for model_type in ("conventional", "adversarial"):
        assert CropPredictor(str(tmp_path / model_type))(t).num_rows == t.num_rows
    # with the inferred Z: unseen cells get their soft row, seen cells keep their one-hot row
    p = CropPredictor(str(tmp_path / "mixedeffects"), z_source=inferred_z["out"])
    out = p(t)
    assert {K.LATENT, K.LATENT_RE, K.BATCH_PROB, K.PROB}.issubset(out.column_names)
    z = p.design_matrix(t)
    unseen = torch.tensor([s == "unseen" for s in t.column(K.SPLIT).to_pylist()])
    torch.testing.assert_close(z.sum(1), torch.ones(len(z)))
    assert ((z[~unseen] == 0) | (z[~unseen] == 1)).all() and (z[unseen].max(1).values < 1).any()
    # the ablation: random one-hot rows, the same for a cell on every call
    r = CropPredictor(str(tmp_path / "randomeffects"), randomize_z=True)
    z1, z2 = r.design_matrix(t), r.design_matrix(t)
    assert torch.equal(z1, z2) and torch.equal(z1.sum(1), torch.ones(len(z1)))
    assert (z1.sum(0) > 0).all()


@pytest.mark.parametrize("model_type", ARMED)
def test_short_local_training_lowers_the_loss(model_type, tiny_data, tmp_path):
    from raycell.train.context import LocalContext
    from raycell.train.loop import run_training
    from raycell.train.trainer import training_setup

    cfg = load_config(
        None, tiny_overrides(tiny_data, tmp_path, epochs=3) + [f"model.type={model_type}"]
    )
    setup, ds = training_setup(cfg)
    col = CropCollate(setup.data_spec, setup.labels, setup.batches)
    ctx = LocalContext(ds, col, cfg.data.batch_size, cfg.data.eval_batch_size, tmp_path)
    run_training(ctx, cfg, setup)
    h = ctx.history

    def objective(r):  # without the adversarial term, which rises as the adversary learns
        return r["train_loss"] + cfg.loss.adv * r.get("train_adv", 0.0)

    assert objective(h[-1]) < objective(h[0]) and h[-1]["train_mse"] < h[0]["train_mse"]
    assert "val_auroc" in h[-1]
    if model_type != "randomeffects":
        assert h[-1]["train_adversary"] < h[0]["train_adversary"]  # the adversary learns too
    if model_type != "adversarial":
        assert h[-1]["train_image_classifier"] < h[0]["train_image_classifier"]
