"""The run setup: what the driver derives from the config and the data set once, for every worker.

`raycell.train.trainer.training_setup` builds it (the only place); the loop and the trainer read its
fields. It crosses into Ray Train's workers inside `train_loop_config` as plain data (`to_dict` /
`from_dict`), like the config beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from raycell.formats.categories import CategoryMap
from raycell.formats.spec import DataSpec
from raycell.train.stopping import EarlyStopping


@dataclass(frozen=True)
class Balance:
    """Loss weights of the balanced Z-predictor (`infer.z_mode: balanced`), computed on the driver.

    Attributes:
        by: The label vocabulary: the columns of `weights`. The collate adds this column to y so that
            the plan can weight each cell by its (batch, label) pair.
        weights: (n_batches, n_labels) table, rows in the order of the Z-predictor's batch head, mean 1
            over the training cells (`raycell.zpredictor.balanced_weights`).
    """

    by: CategoryMap
    weights: tuple[tuple[float, ...], ...]

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return {"by": self.by.to_dict(), "weights": [list(r) for r in self.weights]}

    @classmethod
    def from_dict(cls, d: dict) -> Balance:
        """Inverse of `to_dict`."""
        return cls(
            CategoryMap.from_dict(d["by"]), tuple(tuple(map(float, r)) for r in d["weights"])
        )


@dataclass(frozen=True)
class RunSetup:
    """Data spec, vocabularies and run-wide choices of one training run.

    Attributes:
        data_spec: The model input: channels, crop shape, dtype and `data.normalize` (saved in every
            checkpoint, so the model's normalisation travels with it).
        labels: The phenotype label vocabulary (the data set manifest's `label_vocab`).
        batches: The training batches, the columns of the design matrix Z (fitted on the train split,
            as the reference does; a cross-batch fold's held-out batches are left out).
        steps_per_epoch: Training steps per worker per epoch as the loop counts them (capped by
            `train.max_steps_per_epoch`): the length unit of the one-cycle learning-rate schedule.
        valbatch: Whether the loop also validates on split `valbatch` (whole seen batches never trained
            on, `split.val_batches`, or a fold's held-out batches); never for a batch classifier.
        fold_batches: The seen batches a cross-batch fold holds out (`tune.folds`); empty outside folds.
        channel_means: Per-channel mean intensity in [0, 1] from the manifest's channel statistics, which
            initialises a decoder's output bias (`TiedDecoder.init_output`); None when the data set has
            no statistics.
        heads: The vocabularies of a weak-label or batch-head model type's heads, one per column
            (`data.heads`); empty for model types with one phenotype head.
        balance: Per-(batch, label) loss weights of the balanced Z-predictor; None otherwise.
        early_stopping: The rule the loop checks after each epoch; None runs every epoch.
    """

    data_spec: DataSpec
    labels: CategoryMap
    batches: CategoryMap
    steps_per_epoch: int
    valbatch: bool = False
    fold_batches: tuple[str, ...] = ()
    channel_means: tuple[float, ...] | None = None
    heads: tuple[CategoryMap, ...] = ()
    balance: Balance | None = None
    early_stopping: EarlyStopping | None = None

    def to_dict(self) -> dict:
        """Plain data, for Ray Train's `train_loop_config`."""
        es = self.early_stopping
        return {
            "data_spec": self.data_spec.to_dict(),
            "labels": self.labels.to_dict(),
            "batches": self.batches.to_dict(),
            "steps_per_epoch": self.steps_per_epoch,
            "valbatch": self.valbatch,
            "fold_batches": list(self.fold_batches),
            "channel_means": None if self.channel_means is None else list(self.channel_means),
            "heads": [h.to_dict() for h in self.heads],
            "balance": self.balance.to_dict() if self.balance else None,
            "early_stopping": None if es is None else asdict(es),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunSetup:
        """Inverse of `to_dict` (in a Ray Train worker)."""
        means, balance, es = d["channel_means"], d["balance"], d["early_stopping"]
        return cls(
            data_spec=DataSpec.from_dict(d["data_spec"]),
            labels=CategoryMap.from_dict(d["labels"]),
            batches=CategoryMap.from_dict(d["batches"]),
            steps_per_epoch=int(d["steps_per_epoch"]),
            valbatch=bool(d["valbatch"]),
            fold_batches=tuple(d["fold_batches"]),
            channel_means=None if means is None else tuple(means),
            heads=tuple(CategoryMap.from_dict(h) for h in d["heads"]),
            balance=Balance.from_dict(balance) if balance else None,
            early_stopping=EarlyStopping(**es) if es else None,
        )


__all__ = ["Balance", "RunSetup"]
