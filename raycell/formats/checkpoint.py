"""Checkpoint format: a folder with `model.pt` (weights), `optim.pt` (plan state) and `meta.json`.

`meta.json` carries everything needed to rebuild and use the model without the training config: model
type and arguments, the data spec (channels, crop shape, dtype), the label and batch vocabularies (class
and Z column order), the epoch, its metrics, the resolved config and software versions. `uses_z` copies
the model type's registry entry, for readers that do not import the models; `load_checkpoint` fills it
from the entry for checkpoints written before it was recorded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from raycell.errors import UserError
from raycell.formats.categories import CategoryMap
from raycell.formats.spec import DataSpec
from raycell.utils.io import atomic_write_json, read_json, software_versions

META, MODEL, OPTIM = "meta.json", "model.pt", "optim.pt"
_META_KEYS = ("model_type", "model_args", "data_spec", "labels", "batches")


class CheckpointError(UserError, ValueError):
    """A checkpoint folder whose meta.json or weights cannot be used (truncated, corrupt, incomplete)."""


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    plan_state: dict | None,
    *,
    epoch: int,
    spec: DataSpec,
    labels: CategoryMap,
    batches: CategoryMap,
    config: dict,
    metrics: dict,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint folder (meta.json last, so a folder with meta.json is complete)."""
    from raycell.models import model_entry

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path / MODEL)
    if plan_state is not None:
        torch.save(plan_state, path / OPTIM)
    atomic_write_json(
        path / META,
        {
            "model_type": model.model_type,
            "model_args": model.model_args,
            "epoch": epoch,
            "uses_z": model_entry(model.model_type).uses_z,
            "data_spec": spec.to_dict(),
            "labels": labels.to_dict(),
            "batches": batches.to_dict(),
            "metrics": metrics,
            "config": config,
            "software": software_versions(),
            **(extra or {}),
        },
    )
    return path


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
    return max(cands, key=lambda c: (read_meta(c).get("epoch", -1), c.name))


def read_meta(ck: str | os.PathLike) -> dict:
    """A checkpoint folder's meta.json, with one-line errors naming the file when it is unusable."""
    f = Path(ck) / META
    try:
        meta = read_json(f, "checkpoint meta")
    except ValueError as exc:  # malformed JSON (read_json names the file)
        raise CheckpointError(
            f"{exc}; the checkpoint is damaged: use another checkpoint or re-train"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"checkpoint meta {f} is not a JSON object: the checkpoint is damaged"
        )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(
            f"checkpoint meta {f} is missing key(s) {missing}: not a raycell checkpoint, "
            "or a damaged one"
        )
    return meta


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint (eval mode) and return it with its meta dict.

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointError: meta.json or model.pt is truncated, corrupt or does not fit the model.
    """
    from raycell.models import create_model, model_entry
    from raycell.models.registry import UnknownModelError

    ck = find_checkpoint(path)
    meta = read_meta(ck)
    try:
        model = create_model(meta["model_type"], **meta["model_args"])
        meta.setdefault("uses_z", model_entry(meta["model_type"]).uses_z)  # older checkpoints
        spec = DataSpec.from_dict(meta["data_spec"])
        labels, batches = (
            CategoryMap.from_dict(meta["labels"]),
            CategoryMap.from_dict(meta["batches"]),
        )
    except UnknownModelError:  # already a one-line user error naming the type
        raise
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint meta {ck / META} cannot rebuild the model: {type(exc).__name__}: {exc}"
        ) from None
    if not (ck / MODEL).is_file():
        raise CheckpointError(
            f"checkpoint {ck} has no weights file {MODEL}: the checkpoint is incomplete"
        )
    try:
        # weights_only: any failure here is the file's (truncated zip, not a state dict, ...)
        state = torch.load(ck / MODEL, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/EOFError/UnpicklingError/...
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot load the weights {ck / MODEL} ({type(exc).__name__}: {first}): the "
            "file is truncated or corrupt; use another checkpoint or re-train"
        ) from None
    meta["path"] = str(ck)
    meta["data_spec_obj"] = spec
    meta["labels_obj"] = labels
    meta["batches_obj"] = batches
    return model.to(device).eval(), meta


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
