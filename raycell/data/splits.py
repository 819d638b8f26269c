"""`raycell split`: assign train / val / test / unseen (and valbatch).

Chosen batches are held out whole as `unseen`. With `split.val_batches`, chosen *seen* batches are held
out whole as `valbatch`: a validation batch set for model selection across batches (leave-one-batch-out
validation, as DomainBed recommends for domain generalisation), never trained on. The rest is split
into train/val/test by *units* (values of `group_by`, e.g. a well or a cell), so no unit straddles two
splits, stratified on the unit's (group, batch) combination so every line-batch pair is spread over the
splits as evenly as its unit count allows. Written by hand because scikit-learn's `StratifiedGroupKFold` gives folds, not a three-way split
with given fractions, and ARMED's own `StratifiedGroupShuffleSplit` is two nested two-way splits.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from raycell import constants as K
from raycell.errors import ConfigError
from raycell.formats.shards import ShardDataset, ShardError, open_dataset, rewrite_shards


def resolve_val_batches(val_batches: list[str], batches: list[str], unseen: list[str],
                        seed: int = 0) -> list[str]:
    """The seen batches to hold out as `valbatch`: the names given, or `auto:N` (N picked by `seed`).

    Args:
        val_batches: batch names, or one item `auto:N`.
        batches: every batch of the data set.
        unseen: the batches held out as unseen (never a validation batch).
        seed: picks the `auto:N` batches (the same seed gives the same batches).

    Raises:
        ConfigError: an unknown batch, an unseen one, a bad `auto:N`, or no seen batch left to train on.
    """
    val_batches = [str(v) for v in val_batches]
    seen = sorted(b for b in set(map(str, batches)) if b not in set(unseen))
    autos = [v for v in val_batches if v == "auto" or v.startswith("auto:")]
    if autos:
        n_txt = autos[0].partition(":")[2]
        if len(val_batches) != 1 or not n_txt.isdigit() or int(n_txt) < 1:
            raise ConfigError(f"split.val_batches: {val_batches!r}: give batch names or one 'auto:N' with "
                              "N >= 1 (N seen batches picked by seed)")
        n = int(n_txt)
        if n >= len(seen):
            raise ConfigError(f"split.val_batches: auto:{n} would hold out all {len(seen)} seen batch(es) "
                              f"{seen}, leaving none to train on; use N <= {len(seen) - 1}")
        rng = np.random.default_rng(seed)
        return sorted(seen[i] for i in rng.choice(len(seen), size=n, replace=False))
    val_batches = list(dict.fromkeys(val_batches))
    unknown = [b for b in val_batches if b not in set(map(str, batches))]
    if unknown:
        raise ConfigError(f"split.val_batches: batch(es) {unknown} are not in the data set (batches: "
                          f"{sorted(set(map(str, batches)))})")
    clash = [b for b in val_batches if b in set(unseen)]
    if clash:
        raise ConfigError(f"split.val_batches: {clash} are held out as unseen (split.unseen); a validation "
                          f"batch must be a seen batch: choose among {seen}")
    if val_batches and set(seen) <= set(val_batches):
        raise ConfigError(f"split.val_batches: {val_batches} holds out every seen batch, leaving none to "
                          "train on; hold out fewer")
    return val_batches


def assign_splits(meta: pd.DataFrame, unseen: list[str], group_by: str, stratify: list[str],
                  fractions: list[float], seed: int = 0, val_batches: list[str] | None = None) -> pd.Series:
    """Return the split of every row of `meta` (same index).

    Args:
        meta: one row per cell with the `batch`, `group_by` and `stratify` columns.
        unseen: batches held out whole.
        group_by: column whose values are kept within one split.
        stratify: columns defining strata; each unit takes its most frequent stratum.
        fractions: train, val, test fractions (normalised to sum to 1).
        seed: shuffling seed.
        val_batches: seen batches held out whole as `valbatch` (already resolved, see
            `resolve_val_batches`); the other seen batches are split as without it.
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
    val_batches = resolve_val_batches(list(val_batches or []), list(known), unseen, seed)
    is_valbatch = meta[K.BATCH].astype(str).isin(val_batches)
    split[is_valbatch] = K.VALBATCH
    is_unseen = is_unseen | is_valbatch  # from here on: neither is split into train/val/test
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
                  seed: int = 0, val_batches: list[str] | None = None) -> dict:
    """Assign splits in place in a data set folder and return the updated manifest.

    With `unseen` empty, the manifest's `suggested_unseen` batches (from `synth`) are held out.
    `val_batches` (names or `auto:N`) are seen batches held out whole as `valbatch`.
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
    val_batches = resolve_val_batches(list(val_batches or []), meta[K.BATCH].astype(str).unique().tolist(),
                                      unseen, seed)
    split = assign_splits(meta, unseen, group_by, stratify, fractions, seed, val_batches)
    lookup = dict(zip(meta[K.CELL_ID], split))

    def _set(t: pa.Table, where: str) -> pa.Table:
        ids = t.column(K.CELL_ID).to_pylist()
        col = pa.array([lookup[i] for i in ids], pa.string())
        return t.set_column(t.column_names.index(K.SPLIT), K.SPLIT, col)

    return rewrite_shards(ds, _set, {"split_params": {"unseen": unseen, "group_by": group_by,
                                                      "stratify": stratify, "fractions": fractions,
                                                      "seed": seed, "val_batches": val_batches}})
