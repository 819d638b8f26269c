"""Training plans: how each model type is optimised (scvi-tools' module/plan split).

A plan owns the optimiser(s) and turns one batch into parameter updates and named loss values. The loop
in `loop.py` is the same for every model type; everything that differs between types (extra optimisers,
alternating adversary steps, auxiliary classifiers) lives here.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from raycell.config import LossConfig
from raycell.losses import label_loss, reconstruction_mse

GradSync = Callable[[list[torch.nn.Parameter]], None]


def _no_sync(params: list[torch.nn.Parameter]) -> None:
    return None


class TrainingPlan:
    """One optimiser over the whole model: w_recon * MSE + w_cls * label loss (the conventional AEC)."""

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

    def losses(self, out: dict, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms and their weighted sum `loss` (used for training and validation alike)."""
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


# model_type -> plan class; model types not listed use TrainingPlan.
PLANS: dict[str, type[TrainingPlan]] = {}


def build_plan(model: nn.Module, loss: LossConfig, lr: float, weight_decay: float = 0.0,
               n_batches: int = 1, grad_sync: GradSync = _no_sync, bf16: bool = False) -> TrainingPlan:
    """The plan for `model.model_type`."""
    cls = PLANS.get(getattr(model, "model_type", ""), TrainingPlan)
    return cls(model, loss, lr, weight_decay, n_batches=n_batches, grad_sync=grad_sync, bf16=bf16)
