"""raycell: batch-robust single-cell image representations at cluster scale, on Ray.

Public surface: `load_config`, `create_model`, `list_models`, `__version__`. Model functions import torch
lazily so `raycell --help` and config validation stay fast.
"""

from __future__ import annotations

from raycell.config import ExperimentConfig, load_config

__version__ = "0.1.0"


def create_model(model_type: str, **kwargs):
    """Build a registered model (see `raycell.models.registry.create_model`)."""
    from raycell.models import create_model as _create

    return _create(model_type, **kwargs)


def list_models() -> list[str]:
    """Registered model types."""
    from raycell.models import list_models as _list

    return _list()


__all__ = ["ExperimentConfig", "__version__", "create_model", "list_models", "load_config"]
