"""The adversary of the adversarial and mixed-effects models: what it reads, how it plays, its config.

The toy game below is the mechanism that kept the batch in the adversarial model's latent: batch-effect
augmentation (train.augment) hides the batch in the training cells, so an adversary that only ever reads
augmented cells has nothing to learn, while the cells that are evaluated still carry the batch.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from raycell.config import ConfigError, LossConfig, load_config
from raycell.forward import ModelOutput
from raycell.metrics.latent import batch_probe_accuracy
from raycell.models import create_model
from raycell.models.layers import Adversary, LatentAdversary, standardize_rows
from raycell.plans import AdversarialPlan

NB = 4


class ToyAEC(nn.Module):
    """An MLP autoencoder-classifier with a latent adversary: the plan's protocol at toy size."""

    def __init__(self, d: int = 12, k: int = 6, standardize: bool = True):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, k), nn.BatchNorm1d(k))
        self.dec = nn.Sequential(nn.Linear(k, 32), nn.ReLU(), nn.Linear(32, d))
        self.cls = nn.Linear(k, 1)
        self.adversary = LatentAdversary(k, NB, 32, standardize=standardize)

    def auxiliary_networks(self):
        return {"adversary": self.adversary}

    def adversary_inputs(self, x):
        return self.enc(x), []

    def forward(self, x, z=None):
        lat = self.enc(x)
        return ModelOutput(
            latent=lat,
            recon=self.dec(lat),
            logits=self.cls(lat),
            batch_logits=self.adversary([], lat),
        )


def _toy_data(n=1024, d=12, seed=0):
    """Label in column 0; each batch shifts columns 1-4; 'augmentation' adds a large random shift there."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    b = torch.randint(0, NB, (n,), generator=g)
    x = torch.randn(n, d, generator=g) * 0.3
    x[:, 0] += 1.5 * y
    x[:, 1:5] += torch.randn(NB, 4, generator=g)[b] * 1.5
    return x, y, b, g


def _train_toy(adv_sees: str, steps: int = 300, auroc: list | None = None, **loss):
    torch.manual_seed(0)
    x, y, b, g = _toy_data()
    model = ToyAEC()
    cfg = LossConfig(
        recon=1.0, cls=1.0, adv=1.0, adv_objective="confusion", adv_sees=adv_sees, align=0.0
    )
    for k, v in loss.items():
        setattr(cfg, k, v)
    plan = AdversarialPlan(model, cfg, 3e-3, n_batches=NB)
    plan.set_schedule("constant", steps)
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=g)
        clean = x[i]
        aug = clean.clone()
        aug[:, 1:5] += torch.randn(len(i), 4, generator=g) * 4.0  # hides the batch shift
        z = nn.functional.one_hot(b[i], NB).float()
        plan.training_step(aug, y[i], z, x_clean=clean)
    model.eval()
    with torch.no_grad():
        lat = model.enc(x).numpy()
        if auroc is not None:  # the phenotype the model still tells apart
            from sklearn.metrics import roc_auc_score

            auroc.append(roc_auc_score(y.numpy(), model.cls(model.enc(x))[:, 0].numpy()))
    probe = batch_probe_accuracy(lat, b.numpy(), cv=3)
    return probe["batch_probe_acc"], probe["chance"]


def test_an_adversary_of_the_unaugmented_cells_removes_the_batch_that_augmentation_hid():
    blind, chance = _train_toy("augmented")
    seeing, _ = _train_toy("unaugmented")
    # trained on augmented cells only, the adversary leaves the clean cells' batch readable
    assert blind > chance + 0.3, (blind, chance)
    # reading the cells as they are evaluated, it pushes the linear probe well down (0.99 -> 0.62 on
    # this toy; not to chance: the reconstruction of the augmented cells keeps part of the batch)
    assert seeing < blind - 0.25, (seeing, blind, chance)


def test_batch_mean_alignment_removes_what_the_adversary_left_and_keeps_the_phenotype():
    adv_only, chance = _train_toy("unaugmented")
    kept: list[float] = []
    aligned, _ = _train_toy("unaugmented", auroc=kept, align=1.0)
    # the linear probe reads mean differences between batches, which the term pulls together
    # (0.62 -> 0.39 on this toy, chance 0.26)
    assert aligned < adv_only - 0.15 and aligned < chance + 0.2, (aligned, adv_only, chance)
    assert kept[0] > 0.95, kept  # within each label: the phenotype itself is not pulled together


def test_batch_mean_gap_is_the_batch_share_of_variance_within_each_label():
    from raycell.losses import batch_mean_gap

    g = torch.Generator().manual_seed(0)
    n = 2000
    b = torch.randint(0, NB, (n,), generator=g)
    y = (torch.rand(n, generator=g) < 0.5).long()
    z = nn.functional.one_hot(b, NB).float()
    h = torch.randn(n, 8, generator=g)
    assert batch_mean_gap(h, y, z) < 0.01  # no batch: sampling noise only
    with_label = h.clone()
    with_label[:, 0] += 3 * y  # the phenotype is not batch
    assert batch_mean_gap(with_label, y, z) < 0.01
    with_batch = h.clone()
    with_batch[:, 0] += 3 * b
    gap = batch_mean_gap(with_batch, y, z)
    assert 0.1 < gap < 0.15  # 1 of 8 z-scored dims nearly all batch: about 1/8 of the variance
    assert torch.isclose(batch_mean_gap(with_batch * 100, y, z), gap, rtol=1e-3)  # scale-free
    z[:, :] = 0  # no training batch anywhere: nothing to align
    assert batch_mean_gap(with_batch, y, z) == 0


def test_standardized_adversary_cannot_be_fooled_by_rescaling_the_latent():
    torch.manual_seed(0)
    adv = LatentAdversary(6, NB, 16, standardize=True)
    latent = torch.randn(32, 6)
    scaled = latent * torch.tensor([0.1, 1.0, 5.0, 0.2, 1.0, 2.0]) + 3.0
    torch.testing.assert_close(adv([], latent), adv([], scaled), atol=1e-4, rtol=1e-4)
    raw = LatentAdversary(6, NB, 16, standardize=False)
    assert not torch.allclose(raw([], latent), raw([], scaled), atol=1e-3)
    # the gradient reaches the latent through the statistics (the encoder is pushed, not bypassed)
    latent.requires_grad_(True)
    adv([], latent).sum().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    s = standardize_rows(torch.randn(50, 3) * 7 + 2)
    torch.testing.assert_close(s.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.std(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)


def test_reversal_game_gives_the_encoder_the_reversed_adversary_gradient():
    torch.manual_seed(0)
    model = ToyAEC(standardize=False)
    cfg = LossConfig(recon=0.0, cls=0.0, adv=0.5, adv_game="reversal", align=0.0)
    plan = AdversarialPlan(model, cfg, 1e-3, n_batches=NB)
    plan.set_schedule("constant", 10)
    x, _, b, _ = _toy_data(n=64)
    y = torch.zeros(64, dtype=torch.long)
    z = nn.functional.one_hot(b, NB).float()
    # the gradients both sides should get, from a copy of the model before the step
    ref = ToyAEC(standardize=False)
    ref.load_state_dict(model.state_dict())
    ce = nn.functional.cross_entropy(ref(x).batch_logits, z)
    ce.backward()
    plan.training_step(x, y, z)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if name.startswith("adversary."):  # the adversary descends its cross-entropy
            torch.testing.assert_close(p.grad, q.grad)
        elif name.startswith("enc."):  # the encoder climbs it, scaled by loss.adv
            torch.testing.assert_close(p.grad, -0.5 * q.grad)


def test_ramp_follows_dann_schedule():
    plan = AdversarialPlan(ToyAEC(), LossConfig(adv=2.0, adv_ramp=True), 1e-3, n_batches=NB)
    plan.set_schedule("constant", 100)
    assert plan.adv_weight() == 0.0
    plan.steps_done = 50
    assert math.isclose(plan.adv_weight(), 2.0 * (2 / (1 + math.exp(-5.0)) - 1))
    plan.steps_done = 100
    assert plan.adv_weight() > 1.99
    assert plan.load_state_dict(plan.state_dict()) is None and plan.steps_done == 100
    flat = AdversarialPlan(ToyAEC(), LossConfig(adv=2.0), 1e-3, n_batches=NB)
    assert flat.adv_weight() == 2.0


def test_adversary_learning_rate_is_scaled():
    plan = AdversarialPlan(ToyAEC(), LossConfig(adv_lr_scale=10.0), 1e-3, n_batches=NB)
    assert plan.optimizers["adversary"].param_groups[0]["lr"] == pytest.approx(1e-2)
    assert plan.optimizers["main"].param_groups[0]["lr"] == pytest.approx(1e-3)


def test_new_runs_record_the_adversary_settings_and_old_metas_keep_theirs():
    from raycell.formats.categories import CategoryMap
    from raycell.formats.spec import DataSpec
    from raycell.train.loop import model_kwargs

    cfg = load_config(
        None, ["model.type=adversarial", "model.preset=tiny", "model.adversary_reads=latent"]
    )
    spec = DataSpec(("a", "b"), (2, 32, 32), "uint8")
    kw = model_kwargs(
        cfg, spec, CategoryMap("label", ("x", "y")), CategoryMap("batch", tuple("abc"))
    )
    assert kw["adversary_reads"] == "latent" and kw["adversary_standardize"] is True
    new = create_model("adversarial", **kw)
    assert isinstance(new.adversary, LatentAdversary) and new.adversary.standardize
    # a meta written before these settings existed has neither key: the reference's adversary
    old = {k: v for k, v in kw.items() if not k.startswith("adversary_")}
    assert isinstance(create_model("adversarial", **old).adversary, Adversary)
    # model.args still overrides, and types without an adversary get neither key
    cfg = load_config(None, ["model.type=adversarial", "model.args={adversary_reads: all}"])
    assert (
        model_kwargs(cfg, spec, CategoryMap("label", ("x", "y")), CategoryMap("batch", ("a", "b")))[
            "adversary_reads"
        ]
        == "all"
    )
    cfg = load_config(None, ["model.type=conventional"])
    kw = model_kwargs(cfg, spec, CategoryMap("label", ("x", "y")), CategoryMap("batch", ("a", "b")))
    assert not any(k.startswith("adversary_") for k in kw)


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.adv_game=dann", "loss.adv_game must be alternating or reversal, got 'dann'"),
        ("loss.adv_lr_scale=0", "loss.adv_lr_scale must be between 0 and 1000, got 0.0"),
        ("loss.adv_lr_scale=5000", "loss.adv_lr_scale must be between 0 and 1000, got 5000.0"),
        ("loss.adv_sees=both", "loss.adv_sees must be unaugmented or augmented, got 'both'"),
        (
            "model.adversary_reads=blocks",
            "model.adversary_reads must be latent or all, got 'blocks'",
        ),
    ],
)
def test_bad_adversary_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert str(exc.value) == f"--set {override}: {message}"


def test_toy_data_carries_the_batch():
    """The toy's clean cells do carry the batch (else the first test would prove nothing)."""
    x, _, b, _ = _toy_data()
    assert batch_probe_accuracy(x.numpy(), b.numpy(), cv=3)["batch_probe_acc"] > 0.9
    assert np.unique(b.numpy()).size == NB
