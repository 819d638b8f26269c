"""The model registry: `model_type` -> builder function (timm's `_registry.py` idea, one flat dict).

Builders are registered with `@register_model("name")` and imported by `raycell/models/__init__.py`.
`create_model` drops `None` arguments (YAML keys left unset never override builder defaults) and rejects
arguments the builder does not take, naming the valid ones.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

from raycell.errors import UserError


@dataclass(frozen=True)
class ModelEntry:
    """Everything raycell knows about a model type, in one place (its registration)."""

    name: str
    builder: Callable[..., nn.Module]
    uses_z: bool = False  # needs a design matrix Z (one-hot batch) at training and inference


MODEL_REGISTRY: dict[str, ModelEntry] = {}


class UnknownModelError(UserError, KeyError):
    """A model type that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_model(name: str, *, uses_z: bool = False) -> Callable:
    """Decorator: register `fn` as the builder of model type `name` (duplicates raise)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model type {name!r} is registered twice")
        MODEL_REGISTRY[name] = ModelEntry(name, fn, uses_z=uses_z)
        return fn

    return deco


def model_entry(model_type: str) -> ModelEntry:
    """The registry entry of a model type (UnknownModelError lists the registered ones)."""
    if model_type not in MODEL_REGISTRY:
        raise UnknownModelError(f"unknown model type {model_type!r}; registered: {', '.join(list_models())}")
    return MODEL_REGISTRY[model_type]


def list_models() -> list[str]:
    """Registered model types, sorted."""
    return sorted(MODEL_REGISTRY)


def create_model(model_type: str, **kwargs) -> nn.Module:
    """Build a registered model; the built module keeps its arguments in `.model_args` for checkpoints."""
    fn = model_entry(model_type).builder
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    params = inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        bad = [k for k in kwargs if k not in params]
        if bad:
            raise TypeError(f"model type {model_type!r} does not take argument(s) {bad}; valid: "
                            f"{', '.join(params)}")
    model = fn(**kwargs)
    model.model_type = model_type
    model.model_args = dict(kwargs)
    return model
