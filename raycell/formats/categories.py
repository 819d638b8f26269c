"""Category maps: the label and batch vocabularies that fix a model's class and Z column order.

A map is saved with every checkpoint; encoding a value outside it is an error that names the column, the
value and the vocabulary, unless the caller asks for -1 (e.g. unseen batches at inference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raycell.errors import UserError


class UnknownCategoryError(UserError, ValueError):
    """A value is not in the vocabulary the model was trained with."""


@dataclass(frozen=True)
class CategoryMap:
    """An ordered vocabulary for one column (`label`, `batch`, ...)."""

    column: str
    values: tuple[str, ...]

    def __post_init__(self):
        vals = tuple(str(v) for v in self.values)
        if len(set(vals)) != len(vals):
            raise ValueError(f"category map for '{self.column}' has duplicate values: {vals}")
        object.__setattr__(self, "values", vals)

    @classmethod
    def fit(cls, column: str, values) -> "CategoryMap":
        """Vocabulary = sorted unique values."""
        return cls(column, tuple(sorted({str(v) for v in values})))

    @classmethod
    def fit_column(cls, column: str, values: pa.Array | pa.ChunkedArray) -> "CategoryMap":
        """Vocabulary of an Arrow column, spelt as `encode` spells it (Arrow's cast to string: 1.0 is
        '1'); numeric columns in numeric order (a dose or time head's classes are ordinal), others sorted.
        Nulls are not a class (`encode` then rejects them by name).
        """
        uniq = pc.unique(values.drop_null() if hasattr(values, "drop_null") else values)
        if pa.types.is_integer(uniq.type) or pa.types.is_floating(uniq.type):
            uniq = uniq.take(pc.sort_indices(uniq))
            return cls(column, tuple(pc.cast(uniq, pa.string()).to_pylist()))
        return cls(column, tuple(sorted(pc.cast(uniq, pa.string()).to_pylist())))

    def __len__(self) -> int:
        return len(self.values)

    def encode(self, values, allow_unknown: bool = False) -> np.ndarray:
        """Values (array-like or Arrow array) -> int64 codes; unknown values raise (or give -1)."""
        arr = (
            values
            if isinstance(values, (pa.Array, pa.ChunkedArray))
            else pa.array(np.asarray(values, dtype=object).astype(str))
        )
        if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
            arr = pc.cast(arr, pa.string())
        idx = pc.index_in(arr, value_set=pa.array(self.values, pa.string()))
        codes = np.asarray(pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
        if not allow_unknown and (codes < 0).any():
            bad = arr[int(np.flatnonzero(codes < 0)[0])]
            bad = bad.as_py() if hasattr(bad, "as_py") else bad
            raise UnknownCategoryError(
                f"{self.column} value {bad!r} is not in the training vocabulary "
                f"{list(self.values)} ({int((codes < 0).sum())} row(s) affected)"
            )
        return codes

    def decode(self, codes) -> np.ndarray:
        """Codes -> values (object array)."""
        return np.asarray(self.values, dtype=object)[np.asarray(codes)]

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return {"column": self.column, "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: dict) -> "CategoryMap":
        """Inverse of `to_dict`."""
        return cls(d["column"], tuple(d["values"]))
