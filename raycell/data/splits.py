"""`raycell split`: assign train / val / test / unseen.

Chosen batches are held out whole as `unseen`. The rest is split into train/val/test by *units* (values of
`group_by`, e.g. a well or a cell), so no unit straddles two splits, stratified on the unit's
(group, batch) combination so every line-batch pair is spread over the splits as evenly as its unit count
allows. Written by hand because scikit-learn's `StratifiedGroupKFold` gives folds, not a three-way split
with given fractions, and ARMED's own `StratifiedGroupShuffleSplit` is two nested two-way splits.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from raycell import constants as K
from raycell.formats.shards import ShardDataset, ShardError, open_dataset, rewrite_shards


def assign_splits(meta: pd.DataFrame, unseen: list[str], group_by: str, stratify: list[str],
                  fractions: list[float], seed: int = 0) -> pd.Series:
    """Return the split of every row of `meta` (same index).

    Args:
        meta: one row per cell with the `batch`, `group_by` and `stratify` columns.
        unseen: batches held out whole.
        group_by: column whose values are kept within one split.
        stratify: columns defining strata; each unit takes its most frequent stratum.
        fractions: train, val, test fractions (normalised to sum to 1).
        seed: shuffling seed.
    """
    for col in [K.BATCH, group_by, *stratify]:
        if col not in meta.columns:
            raise ShardError(f"split: column '{col}' is not in the data set (columns: "
                             f"{sorted(meta.columns)})")
    known = set(meta[K.BATCH].astype(str))
    missing = [b for b in unseen if b not in known]
    if missing:
        raise ShardError(f"split: unseen batch(es) {missing} are not in the data set (batches: "
                         f"{sorted(known)})")
    if known and known <= set(unseen):
        raise ShardError(f"split: every batch is held out as unseen (split.unseen = {sorted(set(unseen))}), "
                         "so nothing is left to train on; hold out fewer batches (--unseen)")
    fr = np.asarray(fractions, float) / np.sum(fractions)
    rng = np.random.default_rng(seed)
    split = pd.Series(K.TEST, index=meta.index, dtype=object)
    is_unseen = meta[K.BATCH].astype(str).isin(unseen)
    split[is_unseen] = K.UNSEEN
    seen = meta[~is_unseen]
    # A unit is (batch, group_by value): the same well name on two plates/batches is two units.
    unit = seen[K.BATCH].astype(str) + "\x1f" + seen[group_by].astype(str)
    stratum = seen[stratify].astype(str).agg("\x1f".join, axis=1) if stratify else pd.Series("", seen.index)
    unit_stratum = stratum.groupby(unit).agg(lambda s: s.value_counts().index[0])
    unit_size = unit.value_counts()
    unit_split = {}
    names = (K.TRAIN, K.VAL, K.TEST)
    # Greedy by cell count, stratum after stratum: each unit goes to the split furthest below its
    # target share of everything assigned so far. Carrying the shortfall across strata lets a split
    # with a small fraction (val) still receive units when each stratum has only a few.
    got = np.zeros(3)
    done = 0.0
    for _, units in unit_stratum.groupby(unit_stratum):
        u = units.index.to_numpy()
        for name in u[rng.permutation(len(u))]:
            done += unit_size[name]
            k = int(np.argmax(fr * done - got))
            unit_split[name] = names[k]
            got[k] += unit_size[name]
    split[~is_unseen] = unit.map(unit_split).to_numpy()
    return split


def split_dataset(path: str, unseen: list[str] | None = None, group_by: str = K.WELL,
                  stratify: list[str] | None = None, fractions: list[float] | None = None,
                  seed: int = 0) -> dict:
    """Assign splits in place in a data set folder and return the updated manifest.

    With `unseen` empty, the manifest's `suggested_unseen` batches (from `synth`) are held out.
    """
    ds: ShardDataset = open_dataset(path)
    unseen = list(unseen or ds.manifest.get("suggested_unseen", []))
    stratify = [K.GROUP, K.BATCH] if stratify is None else list(stratify)
    fractions = fractions or [0.7, 0.1, 0.2]
    cols = list(dict.fromkeys([K.CELL_ID, K.BATCH, group_by, *stratify]))
    have = ds.columns()  # one schema read, not one per column
    missing = [c for c in cols if c not in have]
    if missing:
        raise ShardError(f"split: column '{missing[0]}' is not in the data set {ds.root} (columns: "
                         f"{', '.join(c for c in have if c != K.IMAGE)})")
    meta = ds.read_table(cols).to_pandas()
    # Splits are written back by cell id: a repeated id would get one split for several cells.
    counts = meta[K.CELL_ID].value_counts()
    dup = counts[counts > 1]
    if len(dup):
        raise ShardError(f"split: {ds.root}: cell_id {dup.index[0]!r} appears {int(dup.iloc[0])} times "
                         f"({len(dup)} duplicated id(s), {int(dup.sum() - len(dup))} extra row(s)); cell "
                         "ids must be unique: rebuild the data set or drop the duplicate rows")
    split = assign_splits(meta, unseen, group_by, stratify, fractions, seed)
    lookup = dict(zip(meta[K.CELL_ID], split))

    def _set(t: pa.Table, where: str) -> pa.Table:
        ids = t.column(K.CELL_ID).to_pylist()
        col = pa.array([lookup[i] for i in ids], pa.string())
        return t.set_column(t.column_names.index(K.SPLIT), K.SPLIT, col)

    return rewrite_shards(ds, _set, {"split_params": {"unseen": unseen, "group_by": group_by,
                                                      "stratify": stratify, "fractions": fractions,
                                                      "seed": seed}})
