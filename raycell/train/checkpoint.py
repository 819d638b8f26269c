"""Checkpoint format: a folder with `model.pt` (weights), `optim.pt` (plan state) and `meta.json`.

`meta.json` carries everything needed to rebuild and use the model without the training config: model
type and arguments, the data spec (channels, crop shape, dtype), the label and batch vocabularies (class
and Z column order), the epoch, its metrics, the resolved config and software versions.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from raycell.data.categories import CategoryMap
from raycell.data.dataset import DataSpec
from raycell.utils.io import atomic_write_json, read_json, software_versions

META, MODEL, OPTIM = "meta.json", "model.pt", "optim.pt"


def save_checkpoint(path: str | os.PathLike, model: nn.Module, plan_state: dict | None, *, epoch: int,
                    spec: DataSpec, labels: CategoryMap, batches: CategoryMap, config: dict,
                    metrics: dict, extra: dict | None = None) -> Path:
    """Write a checkpoint folder (meta.json last, so a folder with meta.json is complete)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path / MODEL)
    if plan_state is not None:
        torch.save(plan_state, path / OPTIM)
    atomic_write_json(path / META, {
        "model_type": model.model_type, "model_args": model.model_args, "epoch": epoch,
        "uses_z": bool(getattr(model, "uses_z", False)),
        "data_spec": spec.to_dict(), "labels": labels.to_dict(), "batches": batches.to_dict(),
        "metrics": metrics, "config": config, "software": software_versions(), **(extra or {})})
    return path


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or the latest checkpoint (highest epoch) inside a run folder."""
    p = Path(path).absolute()
    if (p / META).is_file():
        return p
    cands = [c.parent for c in p.glob("checkpoint_*/" + META)] if p.is_dir() else []
    if not cands:
        raise FileNotFoundError(f"no checkpoint at {p}: expected a checkpoint folder with {META} or a "
                                "run folder containing checkpoint_* folders (made by `raycell train`)")
    return max(cands, key=lambda c: (read_json(c / META).get("epoch", -1), c.name))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint (eval mode) and return it with its meta dict."""
    from raycell.models import create_model

    ck = find_checkpoint(path)
    meta = read_json(ck / META, "checkpoint meta")
    model = create_model(meta["model_type"], **meta["model_args"])
    state = torch.load(ck / MODEL, map_location=device, weights_only=True)
    model.load_state_dict(state)
    meta["path"] = str(ck)
    meta["data_spec_obj"] = DataSpec.from_dict(meta["data_spec"])
    meta["labels_obj"] = CategoryMap.from_dict(meta["labels"])
    meta["batches_obj"] = CategoryMap.from_dict(meta["batches"])
    return model.to(device).eval(), meta


def load_plan_state(path: str | os.PathLike) -> dict | None:
    """Optimiser state of a checkpoint, if it has one."""
    f = Path(path) / OPTIM
    return torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None
