"""Early stopping: the rule a run is given, and the per-epoch check the training loop makes with it.

The loop reports each epoch, then asks `EarlyStopper.after_epoch` whether to go on; rank 0 decides and
every rank follows (`TrainContext.agree`), so no rank waits alone in the next report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raycell.config import ConfigError


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


@dataclass(frozen=True)
class EarlyStopping:
    """Stop a run once `metric` has not improved for `patience` epochs; the best epoch is its result.

    The run keeps enough checkpoints to hold the best epoch's (`train` returns it as
    `best_checkpoint`). The Z-predictor's recipe: val_acc, patience 3.

    Attributes:
        patience: Epochs without improvement after which the run stops (at least 1).
        metric: The epoch metric watched (any key the loop reports, e.g. `val_acc`, `valbatch_auroc`).
        mode: "max" when higher is better, "min" for a loss.
    """

    patience: int = 3
    metric: str = "val_acc"
    mode: str = "max"

    def __post_init__(self):
        if self.patience < 1:
            raise ConfigError(
                f"early stopping: patience must be at least 1 epoch, got {self.patience}"
            )
        if self.mode not in ("max", "min"):
            raise ConfigError(f"early stopping: mode must be 'max' or 'min', got {self.mode!r}")

    @classmethod
    def from_config(cls, patience: int, metric: str) -> EarlyStopping | None:
        """`train.early_stopping_patience` / `_metric` (names with 'loss' are minimised); None when off."""
        if not patience:
            return None
        return cls(patience, metric, "min" if "loss" in metric else "max")

    def improves(self, value: float, best: float | None) -> bool:
        """Whether `value` beats `best` (None: nothing to beat yet)."""
        return best is None or (value > best if self.mode == "max" else value < best)

    def best(self, history: list[dict]) -> dict | None:
        """The best epoch's record of a history (the first of equals); None when none has the metric."""
        scored = [r for r in history if _finite(r.get(self.metric))]
        if not scored:
            return None
        sign = 1.0 if self.mode == "max" else -1.0
        return max(scored, key=lambda r: (sign * r[self.metric], -r["epoch"]))


class EarlyStopper:
    """The state of one run under an `EarlyStopping` rule: its best value so far and the epochs since.

    `history`: the epochs a resumed run has already recorded, so that patience spans the interruption.
    An epoch without the metric (or with NaN, e.g. an empty val split) neither improves nor counts.
    """

    def __init__(self, rule: EarlyStopping, history: list[dict] = ()):
        self.rule = rule
        self.best: float | None = None
        self.best_epoch = -1
        self.since = 0
        for rec in history:
            self.after_epoch(rec)

    def after_epoch(self, metrics: dict) -> bool:
        """Take one epoch's metrics; True when the patience is spent and the run should stop."""
        v = metrics.get(self.rule.metric)
        if not _finite(v):
            return False
        if self.rule.improves(v, self.best):
            self.best, self.best_epoch, self.since = float(v), int(metrics["epoch"]), 0
        else:
            self.since += 1
        return self.since >= self.rule.patience

    def message(self, epoch: int) -> str:
        """The line printed when the run stops after `epoch`."""
        return (
            f"[raycell] early stopping after epoch {epoch}: {self.rule.metric} has not "
            f"improved on {self.best:.4f} (epoch {self.best_epoch}) for {self.since} epoch(s)"
        )


__all__ = ["EarlyStopper", "EarlyStopping"]
