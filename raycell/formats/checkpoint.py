"""Checkpoint format: a folder with `model.pt` (weights), `optim.pt` (plan state) and `meta.json`.

`meta.json` carries everything needed to rebuild and use the model without the training config
(`CheckpointMeta`). `CheckpointMeta.from_dict` is the one place that reads it and `_upgrade` the one place
that fills the keys that checkpoints written by earlier versions lack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from raycell.errors import UserError
from raycell.formats.categories import CategoryMap
from raycell.formats.spec import DataSpec
from raycell.utils.io import read_json

META, MODEL, OPTIM = "meta.json", "model.pt", "optim.pt"
_META_KEYS = ("model_type", "model_args", "data_spec", "labels", "batches")


class CheckpointError(UserError, ValueError):
    """A checkpoint folder whose meta.json or weights cannot be used (truncated, corrupt, incomplete)."""


@dataclass
class CheckpointMeta:
    """A checkpoint's `meta.json`: how to rebuild the model and read its outputs.

    Attributes:
        model_type: registry name of the model (`raycell models`).
        model_args: keyword arguments of the model's constructor.
        data_spec: channels, crop shape, dtype and input normalisation the model was trained on.
        labels: the phenotype classes, in the order of the model's class outputs.
        batches: the training batches, in the order of the design matrix Z's columns.
        epoch: the epoch the weights are from (0-based); default -1 (unknown).
        uses_z: whether the model needs a design matrix Z (its registry entry's `uses_z`, copied so
            that readers need not import the models); default None (not recorded: the oldest
            files), which `raycell.models.checkpoint.load_checkpoint` fills from the registry.
        heads: weak-label heads (`data.heads`), one category map per head, in output order;
            default [] (the model has the one phenotype head, `labels`).
        metrics: the epoch's training and validation metrics; default {}.
        config: the resolved training config, as a dict; default {}.
        software: versions of the packages that wrote it; default {}.
        extra: keys this version does not know, kept as they were.
        path: the checkpoint folder it was read from (not stored in the file); None when built in
            memory.
    """

    model_type: str
    model_args: dict
    data_spec: DataSpec
    labels: CategoryMap
    batches: CategoryMap
    epoch: int = -1
    uses_z: bool | None = None
    heads: list[CategoryMap] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    software: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def from_dict(cls, raw: dict, where: str | os.PathLike = META) -> CheckpointMeta:
        """The meta from its JSON object, as written by this or an earlier version.

        Raises:
            CheckpointError: not a JSON object or a required key missing.
            TypeError, KeyError, ValueError: a key holds a value of the wrong shape.
        """
        if not isinstance(raw, dict):
            raise CheckpointError(
                f"checkpoint meta {where} is not a JSON object: the checkpoint is damaged"
            )
        missing = [k for k in _META_KEYS if k not in raw]
        if missing:
            raise CheckpointError(
                f"checkpoint meta {where} is missing key(s) {missing}: not a raycell checkpoint, "
                "or a damaged one"
            )
        d = _upgrade(raw)
        known = {f.name for f in fields(cls)} - {"extra", "path"}
        return cls(
            model_type=str(d["model_type"]),
            model_args=dict(d["model_args"]),
            data_spec=DataSpec.from_dict(d["data_spec"]),
            labels=CategoryMap.from_dict(d["labels"]),
            batches=CategoryMap.from_dict(d["batches"]),
            epoch=int(d["epoch"]),
            uses_z=None if d["uses_z"] is None else bool(d["uses_z"]),
            heads=[CategoryMap.from_dict(h) for h in d["heads"]],
            metrics=d["metrics"],
            config=d["config"],
            software=d["software"],
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict:
        """The JSON object of `meta.json` (`heads` only for models that have them)."""
        d = {
            "model_type": self.model_type,
            "model_args": self.model_args,
            "epoch": self.epoch,
            "uses_z": self.uses_z,
            "data_spec": self.data_spec.to_dict(),
            "labels": self.labels.to_dict(),
            "batches": self.batches.to_dict(),
            "metrics": self.metrics,
            "config": self.config,
            "software": self.software,
        }
        if self.heads:
            d["heads"] = [h.to_dict() for h in self.heads]
        d.update(self.extra)
        return d

    @property
    def output_heads(self) -> list[CategoryMap]:
        """The class vocabularies of the model's outputs: its weak-label heads, or `labels`."""
        return self.heads or [self.labels]


def _upgrade(raw: dict) -> dict:
    """A copy of a meta.json object of any earlier version with every key this version reads.

    The defaults of the optional keys are here and nowhere else (see `CheckpointMeta`).
    """
    d = dict(raw)
    d.setdefault("epoch", -1)
    d.setdefault("uses_z", None)  # written before it was recorded: the registry knows (models)
    d["heads"] = list(d.get("heads") or [])
    for key in ("metrics", "config", "software"):
        d[key] = dict(d.get(key) or {})
    return d


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or the latest checkpoint (highest epoch) inside a run folder."""
    p = Path(path).absolute()
    if (p / META).is_file():
        return p
    cands = [c.parent for c in p.glob("checkpoint_*/" + META)] if p.is_dir() else []
    if not cands:
        raise FileNotFoundError(
            f"no checkpoint at {p}: expected a checkpoint folder with {META} or a "
            "run folder containing checkpoint_* folders (made by `raycell train`)"
        )
    return max(cands, key=lambda c: (read_meta(c).epoch, c.name))


def read_meta(ck: str | os.PathLike) -> CheckpointMeta:
    """A checkpoint folder's meta.json, with one-line errors naming the file when it is unusable.

    Raises:
        CheckpointError: the file is malformed JSON, not an object, lacks keys or holds bad values.
    """
    f = Path(ck) / META
    try:
        raw = read_json(f, "checkpoint meta")
    except ValueError as exc:  # malformed JSON (read_json names the file)
        raise CheckpointError(
            f"{exc}; the checkpoint is damaged: use another checkpoint or re-train"
        ) from None
    try:
        meta = CheckpointMeta.from_dict(raw, f)
    except CheckpointError:  # already one line naming the file
        raise
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint meta {f} cannot rebuild the model: {type(exc).__name__}: {exc}"
        ) from None
    meta.path = Path(ck).absolute()
    return meta


def weights_fingerprint(ck: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint's model.pt: what inference records to tell one model's results from
    another's.
    """
    return file_sha256(Path(ck) / MODEL)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks (the 250 MB model.pt of the armed preset: about 0.2 s)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_plan_state(path: str | os.PathLike) -> dict | None:
    """Optimiser state of a checkpoint, if it has one."""
    f = Path(path) / OPTIM
    if not f.is_file():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - as for model.pt: the file is at fault
        raise CheckpointError(
            f"cannot load the optimiser state {f} ({type(exc).__name__}): the file is "
            "truncated or corrupt; resume from another checkpoint"
        ) from None
