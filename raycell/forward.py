"""What a forward pass returns: `ModelOutput` (a model's) and `LossOutput` (a plan's loss).

The typed contract between models, losses, plans, the loop and inference. It sits below all of them
because both sides of each contract import it: models build a `ModelOutput` and the losses and plans
(which must not import `raycell.models`) read it; plans build a `LossOutput` and the loop logs it
without knowing the model type.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

Tensor = torch.Tensor


@dataclass
class ModelOutput:
    """What every model's `forward(x, z)` returns (N cells in the minibatch).

    Every model fills `latent` and `logits`, and `recon` unless its registry entry says it does not
    reconstruct (`reconstructs=False`: a classifier such as the timm backbones, which passes
    `recon=None`); a model type fills the optional fields named in its registry entry's `outputs` (and
    no others), so the plan and the predictor know them before the forward pass.

    Attributes:
        latent: (N, D) the representation that is evaluated (the batch-invariant one where there are two).
        recon: (N, C, H, W) the reconstruction in [0, 1]; None for models that do not reconstruct.
        logits: (N, 1) phenotype logit for two classes, (N, K) for K > 2; for weak-label models the
            heads' logits side by side, (N, K_1 + ... + K_H) (`raycell.losses.split_heads`).
        latent_re: (N, D) the random-effects latent (batch-specific), beside a fixed-effects `latent`.
        recon_fe: (N, C, H, W) the fixed-effects reconstruction, beside a random-effects `recon`.
        logits_fe: (N, 1 or K) the fixed-effects phenotype logits, beside mixed `logits`.
        batch_logits: (N, n_batches) the adversary's batch prediction from the encoder (ẑ_A).
        cluster_logits: (N, n_batches) batch prediction from the random-effects latent (ẑ_L).
        cluster_image_logits: (N, n_batches) batch prediction from the reconstruction (ẑ_I).
        kl: () KL divergence of the random-effects posterior from its prior.
    """

    latent: Tensor
    recon: Tensor | None
    logits: Tensor
    latent_re: Tensor | None = None
    recon_fe: Tensor | None = None
    logits_fe: Tensor | None = None
    batch_logits: Tensor | None = None
    cluster_logits: Tensor | None = None
    cluster_image_logits: Tensor | None = None
    kl: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.latent.shape[0] if isinstance(self.latent, Tensor) else None
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name not in OPTIONAL_OUTPUTS and f.name != "recon":
                raise TypeError(f"ModelOutput.{f.name} is required")
            if v is None:
                continue
            if not isinstance(v, Tensor):
                raise TypeError(f"ModelOutput.{f.name} must be a tensor, got {type(v).__name__}")
            if f.name == "kl":
                if v.dim() != 0:
                    raise ValueError(f"ModelOutput.kl must be a scalar, got shape {tuple(v.shape)}")
            elif v.dim() == 0 or v.shape[0] != n:
                raise ValueError(
                    f"ModelOutput.{f.name} has shape {tuple(v.shape)}; expected {n} rows "
                    "(one per cell, as latent)"
                )

    def present(self) -> dict[str, Tensor]:
        """The fields that are set, by name (for comparisons and tests)."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


REQUIRED_OUTPUTS = ("latent", "recon", "logits")
OPTIONAL_OUTPUTS = tuple(f.name for f in fields(ModelOutput) if f.name not in REQUIRED_OUTPUTS)


@dataclass
class LossOutput:
    """What a training plan's loss (and each of its steps) returns (scvi-tools' `LossOutput` idea).

    Attributes:
        loss: The scalar that is back-propagated (the main objective).
        terms: Every named scalar to log, the objective's terms and any auxiliary step's loss; the loop
            logs them as `train_<name>` / `val_<name>` beside `train_loss` / `val_loss`.
    """

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.loss, Tensor) or self.loss.dim() != 0:
            raise ValueError(f"LossOutput.loss must be a scalar tensor, got {_describe(self.loss)}")
        if "loss" in self.terms:
            raise ValueError("LossOutput.terms must not hold 'loss' (it is the `loss` field)")
        for k, v in self.terms.items():
            if not isinstance(v, Tensor) or v.dim() != 0:
                raise ValueError(
                    f"LossOutput.terms[{k!r}] must be a scalar tensor, got {_describe(v)}"
                )

    def values(self) -> dict[str, float]:
        """`loss` and every term as Python floats, for logging (one copy from the device for all)."""
        vals = torch.stack([t.detach().float() for t in (self.loss, *self.terms.values())]).tolist()
        return dict(zip(["loss", *self.terms], vals))


def _describe(v: object) -> str:
    return f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
