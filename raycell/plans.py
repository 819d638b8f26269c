"""Training plans: how each model type is optimised (scvi-tools' module/plan split).

A plan owns the optimiser(s) and turns one batch into parameter updates and named loss values. The
loop in `loop.py` is the same for every model type; everything that differs between types (extra
optimisers, alternating adversary steps, auxiliary classifiers) lives here.

The ARMED plans (spec/armed-aec.md section 3) share one class, `ArmedPlan`, switched by two flags:

* adversarial (`adversarial`, `mixedeffects`): per batch, first an **adversary step** (its own
  optimiser) on the encoder's outputs computed without gradient, so the encoder cannot move; then
  the **main step** with the adversary frozen: w_recon MSE + w_cls BCE - w_adv L_adv. There is no
  gradient-reversal layer; the adversary's loss is *subtracted* (the `+` in the reference's ME code
  is a bug, spec section 3). L_adv is the categorical cross-entropy of ẑ_A against the one-hot Z
  (the class default of the reference; its main.py passed a binary cross-entropy on the one-hot
  vector, which we do not copy). With fewer than 2 training batches there is nothing to be
  invariant to: the adversary is disabled with a warning (its parameters keep their initial values).
* random effects (`randomeffects`, `mixedeffects`): first an **image-classifier step** on the *real*
  images -> batch (its own optimiser; the reference reused the main Adam instance, which mixes the
  two networks' moment estimates for no benefit); then the main step with the image classifier
  frozen: + w_cluster_latent CE(ẑ_L) + w_cluster_image CE(ẑ_I on the reconstruction) + w_kl KL.
  The `+` signs push batch information *into* the RE latent and reconstruction.
* mixedeffects adds both reconstructions (w_recon each) and both phenotype losses (ŷ_M and ŷ_F,
  w_cls each), as the paper-level objective sums "the reconstruction losses" and "the classification
  losses".

"Frozen" means no parameter update and no gradient accumulation (requires_grad off during the main
step); gradients still flow *through* the frozen network to the encoder/decoder, and its BatchNorm
layers stay in training mode, as in the reference where they run inside the model's training call.
All optimisers share `train.lr` and `train.weight_decay` (the reference: Adam 1e-4 for each).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator

import torch
from torch import nn

from raycell.config import LossConfig
from raycell.losses import cluster_ce, label_loss, reconstruction_mse

GradSync = Callable[[list[torch.nn.Parameter]], None]


def _no_sync(params: list[torch.nn.Parameter]) -> None:
    return None


class TrainingPlan:
    """One optimiser over the whole model: w_recon * MSE + w_cls * label loss (conventional AEC)."""

    def __init__(self, model: nn.Module, loss: LossConfig, lr: float, weight_decay: float = 0.0,
                 n_batches: int = 1, grad_sync: GradSync = _no_sync, bf16: bool = False):
        self.model = model
        self.w = loss
        self.n_batches = n_batches
        self.grad_sync = grad_sync
        self.bf16 = bf16
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "main": torch.optim.AdamW(self.main_parameters(), lr=lr, weight_decay=weight_decay)}

    def main_parameters(self) -> list[nn.Parameter]:
        """Parameters updated by the main step."""
        return list(self.model.parameters())

    def autocast(self, device: torch.device):
        """bf16 autocast on CUDA when enabled; a no-op elsewhere."""
        if self.bf16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _step(self, name: str, loss: torch.Tensor, params: list[nn.Parameter]) -> None:
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.grad_sync(params)
        opt.step()

    def losses(self, out: dict, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """Named loss terms and their weighted sum `loss` (for training and validation alike)."""
        mse = reconstruction_mse(out["recon"], x)
        cls = label_loss(out["logits"], y)
        return {"loss": self.w.recon * mse + self.w.cls * cls, "mse": mse, "cls": cls}

    def training_step(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> dict[str, float]:
        """One update from one batch; returns detached loss values."""
        with self.autocast(x.device):
            out = self.model(x, z)
            terms = self.losses(out, x, y, z)
        self._step("main", terms["loss"], self.main_parameters())
        return {k: float(v.detach()) for k, v in terms.items()}

    @torch.no_grad()
    def validation_step(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor
                        ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Loss values and model outputs in eval mode (the caller sets model.eval())."""
        with self.autocast(x.device):
            out = self.model(x, z)
            terms = self.losses(out, x, y, z)
        return {k: float(v) for k, v in terms.items()}, out

    def state_dict(self) -> dict:
        """Optimiser states, for checkpoints."""
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore optimiser states."""
        for k, o in self.optimizers.items():
            if k in state:
                o.load_state_dict(state[k])


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Turn off requires_grad for the modules' parameters inside the block (restored afterwards)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _batch_accuracy(logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Accuracy of batch logits against Z, over rows with a known batch (non-zero Z rows)."""
    known = z.sum(1) > 0
    if not known.any():
        return torch.zeros((), device=z.device)
    return (logits[known].argmax(1) == z[known].argmax(1)).float().mean()


class ArmedPlan(TrainingPlan):
    """Main step plus the adversary step and/or the image-classifier step (see the module doc).

    Subclasses set `adversarial` and `random_effects`. The model must provide `adversary` and
    `adversary_inputs(x) -> (latent, block outputs)` when adversarial, and `image_classifier` plus
    outputs `cluster_logits`, `cluster_image_logits` and `kl` when random effects.
    """

    adversarial = False
    random_effects = False

    def __init__(self, model: nn.Module, loss: LossConfig, lr: float, weight_decay: float = 0.0,
                 n_batches: int = 1, grad_sync: GradSync = _no_sync, bf16: bool = False):
        # Set before TrainingPlan.__init__, which calls main_parameters().
        self.model = model
        self.aux: dict[str, nn.Module] = {}
        if self.adversarial:
            self.aux["adversary"] = model.adversary
        if self.random_effects:
            self.aux["image_classifier"] = model.image_classifier
        self.use_adversary = self.adversarial and n_batches >= 2
        if self.adversarial and not self.use_adversary:
            mt = getattr(model, "model_type", "?")
            warnings.warn(f"model type {mt!r}: the training data has "
                          f"only {n_batches} batch, so there is no batch effect to remove: the "
                          "adversary is disabled (no adversary step, no adversarial loss term)",
                          UserWarning, stacklevel=2)
        super().__init__(model, loss, lr, weight_decay, n_batches=n_batches, grad_sync=grad_sync,
                         bf16=bf16)
        if self.use_adversary:
            self.optimizers["adversary"] = torch.optim.AdamW(
                self.aux["adversary"].parameters(), lr=lr, weight_decay=weight_decay)
        if self.random_effects:
            self.optimizers["image_classifier"] = torch.optim.AdamW(
                self.aux["image_classifier"].parameters(), lr=lr, weight_decay=weight_decay)

    def main_parameters(self) -> list[nn.Parameter]:
        """Everything but the adversary and the image classifier (own optimisers)."""
        skip = {id(p) for m in self.aux.values() for p in m.parameters()}
        return [p for p in self.model.parameters() if id(p) not in skip]

    def adversary_step(self, x: torch.Tensor, z: torch.Tensor) -> dict[str, float]:
        """Fit the adversary to the current encoder's outputs (no gradient reaches the encoder)."""
        adv = self.aux["adversary"]
        with torch.no_grad(), self.autocast(x.device):
            latent, feats = self.model.adversary_inputs(x)
        with self.autocast(x.device):
            logits = adv([f.detach() for f in feats], latent.detach())
            loss = cluster_ce(logits, z)
        self._step("adversary", loss, list(adv.parameters()))
        return {"adversary": float(loss.detach())}

    def image_classifier_step(self, x: torch.Tensor, z: torch.Tensor) -> dict[str, float]:
        """Fit the image cluster classifier to real images -> batch."""
        clf = self.aux["image_classifier"]
        with self.autocast(x.device):
            loss = cluster_ce(clf(x), z)
        self._step("image_classifier", loss, list(clf.parameters()))
        return {"image_classifier": float(loss.detach())}

    def main_step(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> dict[str, float]:
        """Update encoder(s), decoder(s) and heads with the auxiliary networks frozen."""
        with frozen(*self.aux.values()), self.autocast(x.device):
            out = self.model(x, z)
            terms = self.losses(out, x, y, z)
        self._step("main", terms["loss"], self.main_parameters())
        return {k: float(v.detach()) for k, v in terms.items()}

    def training_step(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> dict[str, float]:
        """Adversary step, image-classifier step (as applicable), then the main step."""
        logs: dict[str, float] = {}
        if self.use_adversary:
            logs.update(self.adversary_step(x, z))
        if self.random_effects:
            logs.update(self.image_classifier_step(x, z))
        logs.update(self.main_step(x, y, z))
        return logs

    def losses(self, out: dict, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """Named terms and the main objective `loss` (see the module docstring for the signs)."""
        w = self.w
        t = {"mse": reconstruction_mse(out["recon"], x), "cls": label_loss(out["logits"], y)}
        loss = w.recon * t["mse"] + w.cls * t["cls"]
        if "recon_fe" in out:
            t["mse_fe"] = reconstruction_mse(out["recon_fe"], x)
            loss = loss + w.recon * t["mse_fe"]
        if "logits_fe" in out:
            t["cls_fe"] = label_loss(out["logits_fe"], y)
            loss = loss + w.cls * t["cls_fe"]
        if self.use_adversary:
            t["adv"] = cluster_ce(out["batch_logits"], z)
            t["adv_acc"] = _batch_accuracy(out["batch_logits"].detach(), z)
            loss = loss - w.adv * t["adv"]
        if self.random_effects:
            t["cluster_latent"] = cluster_ce(out["cluster_logits"], z)
            t["cluster_image"] = cluster_ce(out["cluster_image_logits"], z)
            t["kl"] = out["kl"]
            loss = (loss + w.cluster_latent * t["cluster_latent"]
                    + w.cluster_image * t["cluster_image"] + w.kl * t["kl"])
        t["loss"] = loss
        return t


class AdversarialPlan(ArmedPlan):
    """DA-AEC: adversary step, then MSE + w_cls BCE - w_adv L_adv."""

    adversarial = True


class RandomEffectsPlan(ArmedPlan):
    """Domain-enhancing AEC: image-classifier step, then MSE + BCE + CE(ẑ_L) + CE(ẑ_I) + KL."""

    random_effects = True


class MixedEffectsPlan(ArmedPlan):
    """ARMED-AEC: adversary step, image-classifier step, then the FE, RE and mixed terms."""

    adversarial = True
    random_effects = True


# model_type -> plan class; model types not listed use TrainingPlan.
PLANS: dict[str, type[TrainingPlan]] = {
    "adversarial": AdversarialPlan,
    "randomeffects": RandomEffectsPlan,
    "mixedeffects": MixedEffectsPlan,
}


def build_plan(model: nn.Module, loss: LossConfig, lr: float, weight_decay: float = 0.0,
               n_batches: int = 1, grad_sync: GradSync = _no_sync, bf16: bool = False
               ) -> TrainingPlan:
    """The plan for `model.model_type`."""
    cls = PLANS.get(getattr(model, "model_type", ""), TrainingPlan)
    return cls(model, loss, lr, weight_decay, n_batches=n_batches, grad_sync=grad_sync, bf16=bf16)
