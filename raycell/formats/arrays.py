"""List columns as matrices: latents, probabilities, embeddings and Z rows are stored one list per row.

Every reader of such a column goes through here, so a ragged, null or non-list column is refused the
same way (naming the column and where it was read) wherever it is read.
"""

from __future__ import annotations

import numpy as np

from raycell.errors import UserError


class ListColumnError(UserError, ValueError):
    """A list column that is not one equal-length list of numbers per row."""


def list_matrix(col, name: str = "", where: str = "", error: type[Exception] = ListColumnError):
    """An Arrow list column (fixed-size or not, chunked or not) as an (N, D) float32 matrix.

    Args:
        col: `pa.Array` or `pa.ChunkedArray` of lists.
        name: the column, for messages.
        where: the file or folder it was read from, for messages.
        error: the caller's user error class.

    Raises:
        error: not a list column, null rows, or rows of different lengths.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    at = f"column {name!r}" + (f" in {where}" if where else "")
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise error(f"{at} must be a list of numbers per row, got {t}")
    if col.null_count:
        raise error(f"{at} has {col.null_count} null row(s)")
    n = len(col)
    if n == 0:
        return np.zeros((0, t.list_size if pa.types.is_fixed_size_list(t) else 0), np.float32)
    if pa.types.is_fixed_size_list(t):
        d = t.list_size
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        d = int(lengths[0])
        if (lengths != d).any():
            bad = int(np.flatnonzero(lengths != d)[0])
            raise error(
                f"{at} is ragged: row 0 has {d} values but row {bad} has {int(lengths[bad])}; "
                "every row needs one length"
            )
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(n, d)


def object_matrix(values, name: str = "", error: type[Exception] = ListColumnError) -> np.ndarray:
    """Per-row arrays (a pandas object column, or any sequence of them) as (N, D) float32."""
    values = list(values)
    if not values:
        return np.zeros((0, 0), np.float32)
    try:
        return np.stack([np.asarray(v, dtype=np.float32) for v in values])
    except (ValueError, TypeError) as exc:
        raise error(
            f"column {name!r} is not one equal-length list of numbers per row ({exc})"
        ) from None


def is_list_column(col) -> bool:
    """True for an object column of per-row arrays or lists (an Arrow list column in pandas)."""
    if col.dtype != object:
        return False
    values = col.dropna()
    return len(values) > 0 and isinstance(values.iloc[0], (np.ndarray, list, tuple))
