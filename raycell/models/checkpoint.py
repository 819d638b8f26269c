"""A model to and from a checkpoint folder: the weights beside the meta.json that rebuilds it.

The folder's format (meta.json, `CheckpointMeta`, finding the latest checkpoint) is Ray-free and
model-free in `raycell.formats.checkpoint`; saving and rebuilding need the model registry, so they
live here, above it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from raycell.formats.categories import CategoryMap
from raycell.formats.checkpoint import (
    META,
    MODEL,
    OPTIM,
    CheckpointError,
    CheckpointMeta,
    find_checkpoint,
    read_meta,
)
from raycell.formats.spec import DataSpec
from raycell.models.registry import UnknownModelError, create_model, model_entry
from raycell.utils.io import atomic_write_json, software_versions


def with_registry_defaults(meta: CheckpointMeta) -> CheckpointMeta:
    """`meta` with what only the model registry knows filled in where the file did not record it
    (`uses_z`, absent from the oldest meta.json files).

    Raises:
        UnknownModelError: such a file's model type is not registered.
    """
    if meta.uses_z is None:
        meta.uses_z = model_entry(meta.model_type).uses_z
    return meta


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
    """Write a checkpoint folder (meta.json last, so a folder with meta.json is complete).

    `extra`: more meta keys (`heads`: the weak-label heads as `CategoryMap.to_dict()`s).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path / MODEL)
    if plan_state is not None:
        torch.save(plan_state, path / OPTIM)
    meta = CheckpointMeta.from_dict(
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
        path / META,
    )
    atomic_write_json(path / META, meta.to_dict())
    return path


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model from a checkpoint (eval mode) and return it with its meta.

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointError: meta.json or model.pt is truncated, corrupt or does not fit the model.
    """
    ck = find_checkpoint(path)
    meta = with_registry_defaults(read_meta(ck))
    try:
        model = create_model(meta.model_type, **meta.model_args)
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
    return model.to(device).eval(), meta
