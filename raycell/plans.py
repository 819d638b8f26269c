"""Training plans: how each model type is optimised (scvi-tools' module/plan split).

A plan owns the optimiser(s) and turns one batch into parameter updates and a `LossOutput` (the
objective and every named term). The loop in `raycell/train/loop.py` is the same for every model type;
everything that differs between types (extra optimisers, alternating adversary steps, auxiliary
classifiers) lives here. Each model type names its plan class in its registry entry
(`raycell.models.registry.register_model(..., plan=...)`); a plan never imports `raycell.models`.

A plan knows what its model type produces: `required_outputs()` lists the optional `ModelOutput`
fields its loss reads (registration checks the model type declares them), so the loss never asks
which outputs exist. A plan that trains an auxiliary network with its own optimiser gets it from the
model's `auxiliary_networks()` (by role: "adversary", "image_classifier"), checked when the plan is
built.

The ARMED plans (spec/armed-aec.md section 3) share one class, `ArmedPlan`, switched by three flags:

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
* fixed-effects branch (`mixedeffects`): both reconstructions (w_recon each) and both phenotype
  losses (ŷ_M and ŷ_F, w_cls each), as the paper-level objective sums "the reconstruction losses" and
  "the classification losses".

"Frozen" means no parameter update and no gradient accumulation (requires_grad off during the main
step); gradients still flow *through* the frozen network to the encoder/decoder, and its BatchNorm
layers stay in training mode, as in the reference where they run inside the model's training call.
All optimisers share `train.lr` and `train.weight_decay` (the reference: Adam 1e-4 for each).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from raycell.config import LossConfig, Schedule
from raycell.losses import (
    LossOutput,
    ModelOutput,
    batch_accuracy,
    batch_mean_gap,
    cluster_ce,
    confusion_ce,
    heads_loss,
    label_loss,
    reconstruction_mse,
)

GradSync = Callable[[list[torch.nn.Parameter]], None]


def no_sync(params: list[torch.nn.Parameter]) -> None:
    """The gradient synchronisation of a single process: nothing to do."""
    return None


class TrainingPlan:
    """One optimiser over the whole model: w_recon * MSE + w_cls * label loss (conventional AEC).

    `layer_decay` > 0 (`train.layer_decay`): layer-wise learning rates, lr * layer_decay^(depth from the
    top) per parameter group, from the model's `layer_groups(lr, weight_decay, layer_decay)` (the timm
    backbones have it); the main optimiser's schedule is set by `set_schedule` (`train.schedule`).
    """

    needs_recon = True  # the loss reads ModelOutput.recon: the model type must reconstruct
    main_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW  # the main step's optimiser

    def __init__(
        self,
        model: nn.Module,
        loss: LossConfig,
        lr: float,
        weight_decay: float = 0.0,
        n_batches: int = 1,
        grad_sync: GradSync = no_sync,
        bf16: bool = False,
        layer_decay: float = 0.0,
    ):
        self.model = model
        self.w = loss
        self.n_batches = n_batches
        self.grad_sync = grad_sync
        self.bf16 = bf16
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self._setup()
        if layer_decay:
            if not hasattr(model, "layer_groups"):
                mt = getattr(model, "model_type", type(model).__name__)
                raise TypeError(
                    f"train.layer_decay: model type {mt!r} has no layer groups (layer-wise "
                    "learning rates are for the timm backbones); set train.layer_decay=0"
                )
            groups = model.layer_groups(lr, weight_decay, layer_decay)
            main_ids = [id(p) for p in self.main_parameters()]
            if sorted(id(p) for g in groups for p in g["params"]) != sorted(main_ids):
                raise TypeError("layer_groups() must cover exactly the main parameters")
            main = self.main_optimizer(groups, lr=lr, weight_decay=weight_decay)
        else:
            main = self.main_optimizer(self.main_parameters(), lr=lr, weight_decay=weight_decay)
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "main": main,
            **self._auxiliary_optimizers(lr, weight_decay),
        }

    def _setup(self) -> None:
        """What a subclass prepares before the optimisers are built (`main_parameters` may read it)."""

    def _auxiliary_optimizers(
        self, lr: float, weight_decay: float
    ) -> dict[str, torch.optim.Optimizer]:
        """The optimisers of networks trained beside the main step, by role (none here)."""
        return {}

    def set_schedule(self, kind: Schedule, total_steps: int) -> None:
        """The main optimiser's learning-rate schedule: 'constant', or 'onecycle' (the blog's one-cycle
        policy: warm up to each parameter group's lr over the first 30% of `total_steps`, then anneal).
        """
        self.scheduler = None
        if kind == "onecycle":
            opt = self.optimizers["main"]
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                opt,
                max_lr=[g["lr"] for g in opt.param_groups],
                total_steps=max(2, int(total_steps)),
            )

    @classmethod
    def required_outputs(cls) -> tuple[str, ...]:
        """The optional `ModelOutput` fields this plan's loss reads (none: latent, recon, logits only)."""
        return ()

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
        # a planned step count can be a step short of the stream's (drop_last per worker): hold the end
        if (
            name == "main"
            and self.scheduler is not None
            and self.scheduler.last_epoch + 1 < self.scheduler.total_steps
        ):
            self.scheduler.step()

    def compute_loss(
        self, out: ModelOutput, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor
    ) -> LossOutput:
        """The weighted objective and its named terms (for training and validation alike)."""
        mse = reconstruction_mse(out.recon, x)
        cls = label_loss(out.logits, y)
        return LossOutput(self.w.recon * mse + self.w.cls * cls, {"mse": mse, "cls": cls})

    def training_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        z: torch.Tensor,
        x_clean: torch.Tensor | None = None,
    ) -> LossOutput:
        """One update from one batch; returns the detached losses.

        `x_clean`: the same cells before augmentation (None: not augmented); only an adversary reads it.
        """
        with self.autocast(x.device):
            out = self.model(x, z)
            lo = self.compute_loss(out, x, y, z)
        self._step("main", lo.loss, self.main_parameters())
        return _detached(lo)

    @torch.no_grad()
    def validation_step(
        self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor
    ) -> tuple[LossOutput, ModelOutput]:
        """Losses and model outputs in eval mode (the caller sets model.eval())."""
        with self.autocast(x.device):
            out = self.model(x, z)
            lo = self.compute_loss(out, x, y, z)
        return lo, out

    def state_dict(self) -> dict:
        """Optimiser (and schedule) states, for checkpoints."""
        state = {k: o.state_dict() for k, o in self.optimizers.items()}
        if self.scheduler is not None:
            state["_scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore optimiser (and schedule) states."""
        for k, o in self.optimizers.items():
            if k in state:
                o.load_state_dict(state[k])
        if self.scheduler is not None and "_scheduler" in state:
            self.scheduler.load_state_dict(state["_scheduler"])


def _detached(lo: LossOutput, **extra: torch.Tensor) -> LossOutput:
    """A LossOutput without its graph (the loop only logs it), with auxiliary-step losses added."""
    return LossOutput(lo.loss.detach(), {**{k: v.detach() for k, v in lo.terms.items()}, **extra})


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


class ArmedPlan(TrainingPlan):
    """Main step plus the adversary step and/or the image-classifier step (see the module doc).

    Subclasses switch three flags: `adversarial` (the model's `auxiliary_networks()` has an
    "adversary", which reads `model.adversary_inputs(x) -> (latent, block outputs)`, and forward
    fills `batch_logits`), `random_effects` (an "image_classifier"; `cluster_logits`,
    `cluster_image_logits`, `kl`) and `fixed_effects_branch` (a second reconstruction and phenotype
    head beside the random-effects ones: `recon_fe`, `logits_fe`).
    """

    adversarial = False
    random_effects = False
    fixed_effects_branch = False

    @classmethod
    def required_outputs(cls) -> tuple[str, ...]:
        """The optional `ModelOutput` fields the flags make the loss read."""
        return (
            (("recon_fe", "logits_fe") if cls.fixed_effects_branch else ())
            + (("batch_logits",) if cls.adversarial else ())
            + (("cluster_logits", "cluster_image_logits", "kl") if cls.random_effects else ())
        )

    @classmethod
    def required_networks(cls) -> tuple[str, ...]:
        """The roles in `model.auxiliary_networks()` this plan trains with their own optimisers."""
        return (("adversary",) if cls.adversarial else ()) + (
            ("image_classifier",) if cls.random_effects else ()
        )

    def _setup(self) -> None:
        """The auxiliary networks (main_parameters() leaves them out) and whether the adversary runs."""
        self.steps_done = 0  # training steps taken: the adversarial ramp's clock
        self.aux = self._auxiliary_networks(self.model)
        self.use_adversary = self.adversarial and self.n_batches >= 2
        if self.adversarial and not self.use_adversary:
            mt = getattr(self.model, "model_type", "?")
            warnings.warn(
                f"model type {mt!r}: the training data has "
                f"only {self.n_batches} batch, so there is no batch effect to remove: the "
                "adversary is disabled (no adversary step, no adversarial loss term)",
                UserWarning,
                stacklevel=3,  # the caller that builds the plan
            )

    def _auxiliary_optimizers(
        self, lr: float, weight_decay: float
    ) -> dict[str, torch.optim.Optimizer]:
        """Each auxiliary network's own optimiser (none for an adversary that is disabled)."""
        return {
            r: torch.optim.AdamW(
                net.parameters(),
                lr=lr * (self.w.adv_lr_scale if r == "adversary" else 1.0),
                weight_decay=weight_decay,
            )
            for r, net in self.aux.items()
            if r != "adversary" or self.use_adversary
        }

    def set_schedule(self, kind: Schedule, total_steps: int) -> None:
        """The main optimiser's schedule, and the length of training the adversarial ramp spans."""
        super().set_schedule(kind, total_steps)
        self.total_steps = max(1, int(total_steps))

    def state_dict(self) -> dict:
        """The optimisers' states and the ramp's step count."""
        return {**super().state_dict(), "_steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        """Restore the optimisers and the ramp's step count (0 in checkpoints that lack it)."""
        super().load_state_dict(state)
        self.steps_done = int(state.get("_steps_done", 0))

    def adv_weight(self) -> float:
        """loss.adv now: constant, or (loss.adv_ramp) DANN's 2 / (1 + exp(-10 p)) - 1 times it."""
        if not self.w.adv_ramp:
            return self.w.adv
        p = min(1.0, self.steps_done / max(1, getattr(self, "total_steps", 1)))
        return self.w.adv * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)

    @classmethod
    def _auxiliary_networks(cls, model: nn.Module) -> dict[str, nn.Module]:
        """The networks of `required_networks()`, from the model; a one-line error names what is missing."""
        mt = getattr(model, "model_type", type(model).__name__)
        nets = model.auxiliary_networks() if hasattr(model, "auxiliary_networks") else {}
        missing = [r for r in cls.required_networks() if r not in nets]
        if cls.adversarial and not hasattr(model, "adversary_inputs"):
            missing.append("adversary_inputs() (what the adversary reads)")
        if missing:
            raise TypeError(
                f"model type {mt!r} lacks {missing} that {cls.__name__} trains: its "
                "auxiliary_networks() must return them by role (see docs/models.md)"
            )
        return {r: nets[r] for r in cls.required_networks()}

    def main_parameters(self) -> list[nn.Parameter]:
        """Everything but the adversary and the image classifier (own optimisers)."""
        skip = {id(p) for m in self.aux.values() for p in m.parameters()}
        return [p for p in self.model.parameters() if id(p) not in skip]

    def _adversary_logits(
        self, out: ModelOutput, x_adv: torch.Tensor | None
    ) -> tuple[ModelOutput, torch.Tensor]:
        """`out` with the adversary's logits on `x_adv` (the un-augmented cells) when given, and the
        latent the adversary judged (of `x_adv`, else `out.latent`).
        """
        if x_adv is None:
            return out, out.latent
        latent, feats = self.model.adversary_inputs(x_adv)
        return dataclasses.replace(out, batch_logits=self.aux["adversary"](feats, latent)), latent

    def adversary_step(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Fit the adversary to the current encoder's outputs (no gradient reaches the encoder)."""
        adv = self.aux["adversary"]
        with torch.no_grad(), self.autocast(x.device):
            latent, feats = self.model.adversary_inputs(x)
        with self.autocast(x.device):
            logits = adv([f.detach() for f in feats], latent.detach())
            loss = cluster_ce(logits, z)
        self._step("adversary", loss, list(adv.parameters()))
        return loss.detach()

    def image_classifier_step(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Fit the image cluster classifier to real images -> batch."""
        clf = self.aux["image_classifier"]
        with self.autocast(x.device):
            loss = cluster_ce(clf(x), z)
        self._step("image_classifier", loss, list(clf.parameters()))
        return loss.detach()

    def main_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        z: torch.Tensor,
        x_adv: torch.Tensor | None = None,
    ) -> LossOutput:
        """Update encoder(s), decoder(s) and heads with the auxiliary networks frozen.

        `x_adv`: the cells whose encoding the adversarial term judges (None: `x`).
        """
        with frozen(*self.aux.values()), self.autocast(x.device):
            out, judged = self._adversary_logits(self.model(x, z), x_adv)
            lo = self.compute_loss(out, x, y, z, judged)
        self._step("main", lo.loss, self.main_parameters())
        return _detached(lo)

    def reversal_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        z: torch.Tensor,
        x_adv: torch.Tensor | None = None,
    ) -> LossOutput:
        """One simultaneous step of the main networks and the adversary (loss.adv_game=reversal).

        The adversary descends its cross-entropy; the main networks descend the main objective, in
        which the adversarial term enters with its sign (a gradient-reversal layer in effect: the
        encoder receives -w_adv times the gradient the adversary gets). Two `autograd.grad` calls on
        one forward give each side its own gradient without a custom autograd function.
        """
        adv = self.aux["adversary"]
        others = [m for r, m in self.aux.items() if r != "adversary"]
        with frozen(*others), self.autocast(x.device):
            out, judged = self._adversary_logits(self.model(x, z), x_adv)
            lo = self.compute_loss(out, x, y, z, judged)
            adv_ce = cluster_ce(out.batch_logits, z)
        main, adv_params = self.main_parameters(), list(adv.parameters())
        main_grads = torch.autograd.grad(lo.loss, main, retain_graph=True, allow_unused=True)
        adv_grads = torch.autograd.grad(adv_ce, adv_params, allow_unused=True)
        for name, params, grads in (
            ("main", main, main_grads),
            ("adversary", adv_params, adv_grads),
        ):
            opt = self.optimizers[name]
            opt.zero_grad(set_to_none=True)
            for p, g in zip(params, grads):
                p.grad = g
            self.grad_sync(params)
            opt.step()
        if (
            self.scheduler is not None
            and self.scheduler.last_epoch + 1 < self.scheduler.total_steps
        ):
            self.scheduler.step()
        return _detached(lo, adversary=adv_ce.detach())

    def training_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        z: torch.Tensor,
        x_clean: torch.Tensor | None = None,
    ) -> LossOutput:
        """Adversary step, image-classifier step (as applicable), then the main step.

        The auxiliary steps' losses are logged as the terms `adversary` and `image_classifier`.
        `x_clean` (the cells before augmentation): with loss.adv_sees=unaugmented the adversary reads
        their encoding. Batch-effect augmentation hides the batch in the training cells it sees, so an
        adversary trained on them has nothing to find, while the evaluated (never augmented) cells
        still carry it.
        """
        aux: dict[str, torch.Tensor] = {}
        x_adv = x_clean if self.w.adv_sees == "unaugmented" else None
        reversal = self.use_adversary and self.w.adv_game == "reversal"
        if self.use_adversary and not reversal:
            for _ in range(max(1, self.w.adv_steps)):
                aux["adversary"] = self.adversary_step(x if x_adv is None else x_adv, z)
        if self.random_effects:
            aux["image_classifier"] = self.image_classifier_step(x, z)
        if not self.use_adversary:
            lo = self.main_step(x, y, z)
        elif reversal:
            lo = self.reversal_step(x, y, z, x_adv)
        else:
            lo = self.main_step(x, y, z, x_adv)
        self.steps_done += 1
        return _detached(lo, **aux)

    def compute_loss(
        self,
        out: ModelOutput,
        x: torch.Tensor,
        y: torch.Tensor,
        z: torch.Tensor,
        judged: torch.Tensor | None = None,
    ) -> LossOutput:
        """Named terms and the main objective (see the module docstring for the signs).

        `judged`: the latent the adversary read (the un-augmented cells'), where `loss.align` acts.
        """
        w = self.w
        t = {"mse": reconstruction_mse(out.recon, x), "cls": label_loss(out.logits, y)}
        loss = w.recon * t["mse"] + w.cls * t["cls"]
        if self.fixed_effects_branch:
            t["mse_fe"] = reconstruction_mse(out.recon_fe, x)
            loss = loss + w.recon * t["mse_fe"]
            t["cls_fe"] = label_loss(out.logits_fe, y)
            loss = loss + w.cls * t["cls_fe"]
        if self.use_adversary:
            t["adv"] = cluster_ce(out.batch_logits, z)
            t["adv_acc"] = batch_accuracy(out.batch_logits.detach(), z)
            w_adv = self.adv_weight()
            if w.adv_objective == "confusion":
                # CE against the uniform distribution, minimal when the adversary cannot tell the
                # batches apart; subtracting CE(batch) is also served by an adversary that is
                # confidently wrong, which leaves the batch readable to any other classifier.
                t["adv_confusion"] = confusion_ce(out.batch_logits, z)
                loss = loss + w_adv * t["adv_confusion"]
            else:
                loss = loss - w_adv * t["adv"]
        if self.use_adversary and w.align > 0:
            t["align"] = batch_mean_gap(out.latent if judged is None else judged, y, z)
            loss = loss + w.align * t["align"]
        if self.random_effects:
            t["cluster_latent"] = cluster_ce(out.cluster_logits, z)
            t["cluster_image"] = cluster_ce(out.cluster_image_logits, z)
            t["kl"] = out.kl
            loss = (
                loss
                + w.cluster_latent * t["cluster_latent"]
                + w.cluster_image * t["cluster_image"]
                + w.kl * t["kl"]
            )
        return LossOutput(loss, t)


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
    fixed_effects_branch = True


class WeakLabelPlan(TrainingPlan):
    """Weak-label classification (the timm backbones): one optimiser, the heads' summed loss.

    The model has `head_names` and `head_sizes` (one head per metadata column: time, dose, ...) and puts
    the heads' logits side by side; y is (N, H) class codes. `loss.heads`: softmax (one cross-entropy
    per head) or multilabel (the blog's sigmoid BCE over all heads' one-hot targets). Each head's term
    is logged as `cls_<head>`. No reconstruction.
    """

    needs_recon = False

    def compute_loss(
        self, out: ModelOutput, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor
    ) -> LossOutput:
        """Sum over heads (see the class docstring)."""
        total, terms = heads_loss(
            out.logits, y, self.model.head_sizes, self.w.heads == "multilabel"
        )
        return LossOutput(total, {f"cls_{n}": t for n, t in zip(self.model.head_names, terms)})


class ZPredictorPlan(WeakLabelPlan):
    """The Z-predictor (spec 2.6, `melanoma_aec/infer_design_matrix.py`): images -> batch.

    The reference's recipe: NAdam (`train.lr`; infer-z passes `infer.z_lr`, 1e-4) and the categorical
    cross-entropy of the one head (the batch column), whatever `loss.heads` says: its softmax is the
    soft design matrix Z, which the multi-label sigmoid would not calibrate.

    Balanced (`infer.z_mode: balanced`, `set_balance`): the cross-entropy of each cell is weighted by a
    table W[batch, label] computed on the driver (`raycell.zpredictor.balanced_weights`), and y
    then carries the label code as its last column. Within every batch each label has the same total
    weight, so the label no longer predicts the batch and the soft Z stops importing label priors.
    """

    main_optimizer = torch.optim.NAdam
    balance: torch.Tensor | None = None  # the weight table of `set_balance` (None: unweighted)

    def set_balance(self, weights: torch.Tensor | list) -> None:
        """Weight each cell's loss by `weights[batch code, label code]` ((n_batches, n_labels), mean 1
        over the training cells); y must then be (N, 2): batch head code, label code.
        """
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.ndim != 2 or w.shape[0] != self.model.head_sizes[0]:
            raise ValueError(
                f"balanced Z-predictor: weight table of shape {tuple(w.shape)}, expected "
                f"({self.model.head_sizes[0]}, n_labels)"
            )
        self.balance = w

    def compute_loss(
        self, out: ModelOutput, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor
    ) -> LossOutput:
        """Softmax cross-entropy of the batch head (logged as `cls_batch`), weighted when balanced."""
        if self.balance is None:
            total, terms = heads_loss(out.logits, y, self.model.head_sizes, False)
            return LossOutput(total, {f"cls_{n}": t for n, t in zip(self.model.head_names, terms)})
        if self.balance.device != y.device:
            self.balance = self.balance.to(y.device)
        w = self.balance[y[:, 0], y[:, -1]]
        # mean (not sum / sum(w)) of the weighted terms: the weights average 1 over the training cells,
        # so a minibatch's loss is an unbiased estimate of the balanced training loss
        total = (w * F.cross_entropy(out.logits.float(), y[:, 0], reduction="none")).mean()
        return LossOutput(total, {f"cls_{self.model.head_names[0]}": total})
