"""The profile table that every profiling step takes and returns, and its error (no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raycell.errors import UserError


class ProfileError(UserError, ValueError):
    """A profile input or setting that cannot work; the message names the file, column or key."""


@dataclass
class ProfileTable:
    """Profiles in the CytoTable layout: `frame` holds metadata columns, then `features`."""

    frame: pd.DataFrame
    features: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def meta_columns(self) -> list[str]:
        """Every column that is not a feature, in order."""
        feats = set(self.features)
        return [c for c in self.frame.columns if c not in feats]

    def matrix(self) -> np.ndarray:
        """The features as a float64 (rows, features) matrix."""
        return self.frame[self.features].to_numpy(dtype=np.float64)
