"""Per-cell rows -> one row per well (or any group of metadata columns): the one aggregation.

`raycell embed`'s `well_profiles.parquet` and `raycell profile` both reduce cells to wells; this
is the implementation they share, kept in formats because formats is the lowest layer both the
inference and profiling stages read. The reduction is pycytominer's `aggregate` (pandas'
group median or mean of each feature as float64), written out here because pycytominer drops
the other metadata and the cell count, which both outputs keep.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from raycell.constants import CELL_COUNT as COUNT
from raycell.constants import Aggregation
from raycell.formats.arrays import is_list_column


def aggregate_rows(
    meta: pd.DataFrame,
    features: pd.DataFrame,
    strata: list[str],
    operation: Aggregation = "median",
) -> pd.DataFrame:
    """One row per `strata` group, sorted by the groups' keys.

    Columns: the `strata`, every other column of `meta` that is constant within every group (list
    columns, whose per-cell arrays cannot be compared, are left out), `Metadata_Count_Cells` (rows
    per group), then the median or mean of each column of `features` (float64). Keys are compared
    as strings, so rows whose key is missing form one group instead of vanishing. The caller
    checks that `strata` are columns of `meta` and that both frames have the same rows.
    """
    meta = meta.reset_index(drop=True)
    keys = pd.DataFrame({k: meta[k].astype("string").fillna("") for k in strata})
    groups = keys.groupby(list(strata), sort=True).ngroup().to_numpy()
    order = np.argsort(groups, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(groups[order])) + 1] if len(order) else order
    first = order[starts]  # one representative row per group, in group order
    out = meta.iloc[first][list(strata)].reset_index(drop=True)
    for c in meta.columns:
        if c in strata or c == COUNT or is_list_column(meta[c]):
            continue
        col = meta[c].astype(object).where(meta[c].notna(), None)
        if (col.groupby(groups).nunique(dropna=False) <= 1).all():
            out[c] = meta[c].iloc[first].to_numpy()
    out[COUNT] = np.bincount(groups, minlength=len(first)).astype(np.int64)
    by = features.reset_index(drop=True).astype(np.float64).groupby(groups)
    reduced = getattr(by, operation)()  # the config loader allows "median" and "mean" only
    return pd.concat([out, reduced.reset_index(drop=True)], axis=1)
