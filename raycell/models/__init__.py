"""Models: `nn.Module` maths only. Importing this package registers every model type.

Every model exposes `latent_dim`, `encode(x, z=None)` and `forward(x, z=None) -> dict` with at least
`latent`, `recon` and `logits`, so training plans, inference and metrics never branch on the type.
"""

from raycell.models import (
    aec,  # noqa: F401  (registers "conventional")
    armed,  # noqa: F401  (adversarial, randomeffects, mixedeffects)
)
from raycell.models.registry import (
    MODEL_REGISTRY,
    create_model,
    list_models,
    model_entry,
    register_model,
)

__all__ = ["MODEL_REGISTRY", "create_model", "list_models", "model_entry", "register_model"]
