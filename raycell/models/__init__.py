"""Models: `nn.Module` maths only. Importing this package registers every model type.

The interface every model type has (adding one: docs/models.md):

* `latent_dim`, `encode(x, z=None) -> (N, latent_dim)` and `forward(x, z=None) -> ModelOutput`
  (`raycell.losses.ModelOutput`: `latent`, `recon`, `logits` and the optional fields the registry
  entry declares), so the loop, inference and metrics never branch on the type;
* `auxiliary_networks() -> {role: nn.Module}`, only where the type's plan trains networks with their
  own optimisers ("adversary", "image_classifier"); an adversary also needs
  `adversary_inputs(x) -> (latent, block outputs)`.

Files: `registry.py` (the entries, `create_model`, `build_plan`), `layers.py` (shared blocks),
`random_effects.py` (variational per-batch layers and the networks built from them), `aec.py`
(conventional), `armed.py` (adversarial, randomeffects, mixedeffects, and zpredictor: the batch
classifier behind `raycell infer-z`), `timm_models.py` (timm: any timm backbone with weak-label heads;
no reconstruction).
"""

from raycell.forward import ModelOutput
from raycell.models import (
    aec,  # noqa: F401  (registers "conventional")
    armed,  # noqa: F401  (adversarial, randomeffects, mixedeffects, zpredictor)
    timm_models,  # noqa: F401  (timm: weak-label classifiers on timm backbones)
)
from raycell.models.registry import (
    MODEL_REGISTRY,
    ModelEntry,
    build_plan,
    create_model,
    list_models,
    model_entry,
    register_model,
    unregister_model,
)

__all__ = [
    "MODEL_REGISTRY",
    "ModelEntry",
    "ModelOutput",
    "build_plan",
    "create_model",
    "list_models",
    "model_entry",
    "register_model",
    "unregister_model",
]
