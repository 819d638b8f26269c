"""The model registry: one entry per model type, with everything raycell knows about it (timm's idea).

A model type is a builder function and one decorator (see docs/models.md):

    @register_model("mixedeffects", plan=MixedEffectsPlan, uses_z=True, outputs=("latent_re", ...))
    def mixedeffects(in_channels, n_classes, n_batches=1, preset="small", ...) -> nn.Module: ...

The entry carries the builder, the training plan class (`raycell.plans`, `TrainingPlan` unless given),
whether the model needs a design matrix Z, and which optional `ModelOutput` fields its forward fills.
Registration checks that these fit together (the plan's required outputs are declared), so a mismatch
fails at import, not in the middle of training. `create_model` drops `None` arguments (YAML keys left
unset never override builder defaults) and rejects arguments the builder does not take, naming the
valid ones; `build_plan` builds the entry's plan for a model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

from raycell.errors import UserError
from raycell.forward import OPTIONAL_OUTPUTS
from raycell.plans import TrainingPlan


@dataclass(frozen=True)
class ModelEntry:
    """Everything raycell knows about a model type, in one place (its registration)."""

    name: str
    builder: Callable[..., nn.Module]
    plan: type[TrainingPlan] = TrainingPlan  # how it is optimised (raycell/plans.py)
    uses_z: bool = False  # needs a design matrix Z (one-hot batch) at training and inference
    outputs: tuple[str, ...] = ()  # the optional ModelOutput fields its forward fills
    reconstructs: bool = True  # forward fills ModelOutput.recon (False: a classifier, recon=None)
    weak_labels: bool = False  # one head per metadata column (builder takes head_names, head_sizes)
    batch_head: bool = (
        False  # its one head is the imaging batch over the training batches (zpredictor)
    )


MODEL_REGISTRY: dict[str, ModelEntry] = {}


class UnknownModelError(UserError, KeyError):
    """A model type that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_model(
    name: str,
    *,
    plan: type[TrainingPlan] = TrainingPlan,
    uses_z: bool = False,
    outputs: tuple[str, ...] = (),
    reconstructs: bool = True,
    weak_labels: bool = False,
    batch_head: bool = False,
) -> Callable:
    """Decorator: register `fn` as the builder of model type `name`.

    Args:
        name: The `model.type` users select.
        plan: Its training plan class (the default `TrainingPlan`: one optimiser, MSE + label loss).
        uses_z: Whether forward needs the design matrix Z (random effects): inference then refuses
            cells of batches outside the training batches unless an inferred Z is given.
        outputs: The optional `ModelOutput` fields forward fills (e.g. "batch_logits").
        reconstructs: Whether forward fills `recon` (inference then writes per-cell reconstruction
            metrics); a plan whose loss reads it (`needs_recon`) needs a model that reconstructs.
        weak_labels: The builder takes `head_names` and `head_sizes`: one classification head per
            metadata column (`data.heads`), the logits side by side.
        batch_head: (with `weak_labels`) the single head is the imaging batch, its classes the
            training batches in the order of the design matrix Z (the Z-predictor): `data.heads` must
            be empty or [batch], and the run validates on held-out cells of the training batches
            (split 'val'), never on held-out batches (`valbatch`), which such a head cannot score.

    Raises:
        ValueError: a duplicate name, an unknown output field, or outputs that lack what `plan` reads.
    """
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in OPTIONAL_OUTPUTS]
    if unknown:
        raise ValueError(
            f"model type {name!r}: outputs {unknown} are not optional ModelOutput fields "
            f"({', '.join(OPTIONAL_OUTPUTS)})"
        )
    lacking = [o for o in plan.required_outputs() if o not in outputs]
    if lacking:
        raise ValueError(
            f"model type {name!r}: its plan {plan.__name__} reads outputs {lacking}, which "
            "are not among its declared outputs"
        )

    if plan.needs_recon and not reconstructs:
        raise ValueError(
            f"model type {name!r}: its plan {plan.__name__} reads the reconstruction, but the "
            "model does not reconstruct (reconstructs=False)"
        )
    if batch_head and not weak_labels:
        raise ValueError(
            f"model type {name!r}: batch_head=True is a weak-label head (weak_labels=True)"
        )

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model type {name!r} is registered twice")
        MODEL_REGISTRY[name] = ModelEntry(
            name,
            fn,
            plan=plan,
            uses_z=uses_z,
            outputs=outputs,
            reconstructs=reconstructs,
            weak_labels=weak_labels,
            batch_head=batch_head,
        )
        return fn

    return deco


def unregister_model(name: str) -> ModelEntry:
    """Remove a model type (tests that register a toy type remove it again); returns its entry."""
    entry = model_entry(name)
    del MODEL_REGISTRY[name]
    return entry


def model_entry(model_type: str) -> ModelEntry:
    """The registry entry of a model type (UnknownModelError lists the registered ones)."""
    if model_type not in MODEL_REGISTRY:
        raise UnknownModelError(
            f"unknown model type {model_type!r}; registered: {', '.join(list_models())}"
        )
    return MODEL_REGISTRY[model_type]


def list_models() -> list[str]:
    """Registered model types, sorted."""
    return sorted(MODEL_REGISTRY)


def create_model(model_type: str, **kwargs) -> nn.Module:
    """Build a registered model; the built module keeps `.model_type` and its arguments in `.model_args`."""
    fn = model_entry(model_type).builder
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    params = inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        bad = [k for k in kwargs if k not in params]
        if bad:
            raise TypeError(
                f"model type {model_type!r} does not take argument(s) {bad}; valid: "
                f"{', '.join(params)}"
            )
    model = fn(**kwargs)
    model.model_type = model_type
    model.model_args = dict(kwargs)
    return model


def build_plan(model: nn.Module, *args, **kwargs) -> TrainingPlan:
    """The training plan of the model's registry entry, for `model` (built by `create_model`).

    The other arguments are the plan's (`raycell.plans.TrainingPlan`: loss, lr, weight_decay,
    n_batches, grad_sync, bf16, layer_decay), passed on as they are.
    """
    model_type = getattr(model, "model_type", None)
    if model_type is None:
        raise TypeError(
            f"build_plan: {type(model).__name__} has no model_type; build it with create_model"
        )
    return model_entry(model_type).plan(model, *args, **kwargs)
