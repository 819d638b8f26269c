"""`raycell split`: assign train / val / test / unseen (and valbatch).

Chosen batches are held out whole as `unseen`. With `split.val_batches`, chosen *seen* batches are held
out whole as `valbatch`: a validation batch set for model selection across batches (leave-one-batch-out
validation, as DomainBed recommends for domain generalisation), never trained on. The rest is split
into train/val/test by *units* (values of `group_by`, e.g. a well or a cell), so no unit straddles two
splits, stratified on the unit's (group, batch) combination so every line-batch pair is spread over the
splits as evenly as its unit count allows. Written by hand because scikit-learn's
`StratifiedGroupKFold` gives folds, not a three-way split
with given fractions, and ARMED's own `StratifiedGroupShuffleSplit` is two nested two-way splits.

Memory: `split_dataset` reads one shard at a time and keeps cells per (batch, unit, stratum) plus an
8-byte hash per cell id, so it grows with the number of units (wells), not cells (1 M cells: 251-278 MB
peak over three runs vs 681 MB when every cell's metadata was held; `bench/bench_scale.py --stages
split`). Grouping by cell
(`group_by=cell_id`) makes every cell a unit, and memory per cell again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from raycell import constants as K
from raycell.errors import ConfigError
from raycell.formats.manifest import DatasetManifest
from raycell.formats.shards import ShardDataset, ShardError, open_dataset, rewrite_shards
from raycell.utils.progress import quiet_bar

_SEP = "\x1f"  # joins key parts; a character no batch or well name holds


def resolve_val_batches(
    val_batches: list[str], batches: list[str], unseen: list[str], seed: int = 0
) -> list[str]:
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
            raise ConfigError(
                f"split.val_batches: {val_batches!r}: give batch names or one 'auto:N' with "
                "N >= 1 (N seen batches picked by seed)"
            )
        n = int(n_txt)
        if n >= len(seen):
            raise ConfigError(
                f"split.val_batches: auto:{n} would hold out all {len(seen)} seen batch(es) "
                f"{seen}, leaving none to train on; use N <= {len(seen) - 1}"
            )
        rng = np.random.default_rng(seed)
        return sorted(seen[i] for i in rng.choice(len(seen), size=n, replace=False))
    val_batches = list(dict.fromkeys(val_batches))
    unknown = [b for b in val_batches if b not in set(map(str, batches))]
    if unknown:
        raise ConfigError(
            f"split.val_batches: batch(es) {unknown} are not in the data set (batches: "
            f"{sorted(set(map(str, batches)))})"
        )
    clash = [b for b in val_batches if b in set(unseen)]
    if clash:
        raise ConfigError(
            f"split.val_batches: {clash} are held out as unseen (split.unseen); a validation "
            f"batch must be a seen batch: choose among {seen}"
        )
    if val_batches and set(seen) <= set(val_batches):
        raise ConfigError(
            f"split.val_batches: {val_batches} holds out every seen batch, leaving none to "
            "train on; hold out fewer"
        )
    return val_batches


def _keys(meta: pd.DataFrame | pa.Table, group_by: str, stratify: list[str]) -> dict[str, pa.Array]:
    """Each row's batch, unit and stratum as Arrow strings (the keys the assignment compares).

    A unit is (batch, `group_by` value): the same well name on two plates/batches is two units. Key columns
    are cast to text (a null reads "None", as pandas writes it); an Arrow shard is keyed without pandas
    (about 6x faster per shard), a DataFrame through pandas' `astype(str)`.
    """
    cols = list(dict.fromkeys([K.BATCH, group_by, *stratify]))
    have = meta.column_names if isinstance(meta, pa.Table) else list(meta.columns)
    for col in cols:
        if col not in have:
            raise ShardError(
                f"split: column '{col}' is not in the data set (columns: {sorted(have)})"
            )
    if isinstance(meta, pa.Table):
        text = {
            c: pc.fill_null(pc.cast(meta.column(c).combine_chunks(), pa.string()), "None")
            for c in cols
        }
    else:
        text = {c: pa.array(meta[c].astype(str).to_numpy(dtype=object), pa.string()) for c in cols}
    sep = pa.scalar(_SEP)
    stratum = (
        pc.binary_join_element_wise(*[text[c] for c in stratify], sep)
        if stratify
        else pa.array([""] * len(text[K.BATCH]), pa.string())
    )
    return {
        "batch": text[K.BATCH],
        "unit": pc.binary_join_element_wise(text[K.BATCH], text[group_by], sep),
        "stratum": stratum,
    }


def unit_counts(meta: pd.DataFrame | pa.Table, group_by: str, stratify: list[str]) -> pd.DataFrame:
    """Cells per (batch, unit, stratum) in `meta`: all the assignment needs to know about the cells.

    Counts from several shards add up (`merge_counts`), so a data set of any size is split in memory that
    grows with its units (wells), not its cells.

    Returns:
        columns `batch`, `unit`, `stratum`, `n`.
    """
    n = (
        pa.table(_keys(meta, group_by, stratify))
        .group_by(["batch", "unit", "stratum"])
        .aggregate([([], "count_all")])
    )
    return merge_counts(n.to_pandas().rename(columns={"count_all": "n"}))


def merge_counts(counts: pd.DataFrame) -> pd.DataFrame:
    """Add up `unit_counts` rows that share (batch, unit, stratum), e.g. from several shards."""
    return counts.groupby(["batch", "unit", "stratum"], as_index=False, sort=True)["n"].sum()


@dataclass
class SplitAssignment:
    """Where every cell goes, by key: held-out batches whole, the other cells by their unit."""

    batches: dict[str, str]  # batch -> unseen / valbatch
    units: dict[str, str]  # unit (batch + SEP + group_by value) -> train / val / test
    val_batches: list[str]

    def __post_init__(self):
        # (keys, splits) per lookup, built once and reused for every shard: held-out batches first
        self._lookups = [
            (
                "batch",
                pa.array(list(self.batches), pa.string()),
                np.asarray(list(self.batches.values()), dtype=object),
            ),
            (
                "unit",
                pa.array(list(self.units), pa.string()),
                np.asarray(list(self.units.values()), dtype=object),
            ),
        ]

    def apply(self, meta: pd.DataFrame | pa.Table, group_by: str, where: str = "") -> pa.Array:
        """The split of every row of `meta` (one shard, or a DataFrame with the batch and
        `group_by` columns).
        """
        keys = _keys(meta, group_by, [])
        out = np.empty(len(keys["batch"]), dtype=object)
        done = np.zeros(len(out), bool)
        for col, names, splits in self._lookups:
            at = pc.index_in(keys[col], value_set=names).fill_null(-1).to_numpy()
            hit = (at >= 0) & ~done
            out[hit] = splits[at[hit]]
            done |= hit
        if not done.all():  # the data changed between counting and writing
            b, g = keys["unit"][int(np.flatnonzero(~done)[0])].as_py().split(_SEP, 1)
            raise ShardError(
                f"split: {where or 'data'}: {group_by}={g!r} of batch {b!r} was not there when "
                "the splits were planned; was the data set changed during `split`? run it again"
            )
        return pa.array(out, pa.string())


def plan_splits(
    counts: pd.DataFrame,
    unseen: list[str],
    fractions: list[float],
    seed: int = 0,
    val_batches: list[str] | None = None,
) -> SplitAssignment:
    """Assign held-out batches and units from `unit_counts` (see the module docstring).

    Raises:
        ShardError: an unseen batch not in the data, or every batch held out.
        ConfigError: bad `val_batches` (see `resolve_val_batches`).
    """
    known = set(counts["batch"])
    missing = [b for b in unseen if b not in known]
    if missing:
        raise ShardError(
            f"split: unseen batch(es) {missing} are not in the data set (batches: {sorted(known)})"
        )
    if known and known <= set(unseen):
        raise ShardError(
            f"split: every batch is held out as unseen (split.unseen = {sorted(set(unseen))}), "
            "so nothing is left to train on; hold out fewer batches (--unseen)"
        )
    val_batches = resolve_val_batches(list(val_batches or []), sorted(known), unseen, seed)
    held = {**{b: K.VALBATCH for b in val_batches}, **{b: K.UNSEEN for b in unseen}}
    seen = counts[~counts["batch"].isin(list(held))]
    unit_size = seen.groupby("unit")["n"].sum()
    # Each unit takes its most frequent stratum (ties: the first in sorted order, so the shard order
    # does not matter).
    top = seen.sort_values(["unit", "n", "stratum"], ascending=[True, False, True]).drop_duplicates(
        "unit"
    )
    unit_stratum = top.set_index("unit")["stratum"].sort_index()
    fr = np.asarray(fractions, float) / np.sum(fractions)
    rng = np.random.default_rng(seed)
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
    return SplitAssignment(held, unit_split, val_batches)


def assign_splits(
    meta: pd.DataFrame,
    unseen: list[str],
    group_by: str,
    stratify: list[str],
    fractions: list[float],
    seed: int = 0,
    val_batches: list[str] | None = None,
) -> pd.Series:
    """Return the split of every row of `meta` (same index): `unit_counts` -> `plan_splits` -> apply.

    Args:
        meta: one row per cell with the `batch`, `group_by` and `stratify` columns.
        unseen: batches held out whole.
        group_by: column whose values are kept within one split.
        stratify: columns defining strata; each unit takes its most frequent stratum.
        fractions: train, val, test fractions (normalised to sum to 1).
        seed: shuffling seed.
        val_batches: seen batches held out whole as `valbatch` (names or `auto:N`, see
            `resolve_val_batches`); the other seen batches are split as without it.
    """
    plan = plan_splits(unit_counts(meta, group_by, stratify), unseen, fractions, seed, val_batches)
    return pd.Series(
        plan.apply(meta, group_by).to_numpy(zero_copy_only=False), index=meta.index, dtype=object
    )


def split_dataset(
    path: str,
    unseen: list[str] | None = None,
    group_by: str = K.WELL,
    stratify: list[str] | None = None,
    fractions: list[float] | None = None,
    seed: int = 0,
    val_batches: list[str] | None = None,
    progress: bool = True,
) -> DatasetManifest:
    """Assign splits in place in a data set folder and return the updated manifest.

    With `unseen` empty, the manifest's `suggested_unseen` batches (from `synth`) are held out.
    `val_batches` (names or `auto:N`) are seen batches held out whole as `valbatch`.

    Two passes over the shards, one at a time, so memory grows with the number of units (wells), not
    cells: the first reads the key columns and adds up cells per (batch, unit, stratum) and a 64-bit hash
    of every cell id (8 bytes a cell, for the duplicate check); the second rewrites each shard's split
    column. `progress` shows a bar per pass on stderr when a pass takes more than a few seconds.
    """
    ds: ShardDataset = open_dataset(path)
    unseen = list(unseen or ds.manifest.suggested_unseen)
    stratify = [K.GROUP, K.BATCH] if stratify is None else list(stratify)
    fractions = fractions or [0.7, 0.1, 0.2]
    cols = list(dict.fromkeys([K.CELL_ID, K.BATCH, group_by, *stratify]))
    have = ds.columns()  # one schema read, not one per column
    missing = [c for c in cols if c not in have]
    if missing:
        raise ShardError(
            f"split: column '{missing[0]}' is not in the data set {ds.root} (columns: "
            f"{', '.join(c for c in have if c != K.IMAGE)})"
        )
    parts, hashes = [], []
    for p in quiet_bar(ds.shard_paths, "split: count", enabled=progress):
        meta = ds.read_shard(p, cols)
        parts.append(unit_counts(meta, group_by, stratify))
        hashes.append(_id_hashes(meta.column(K.CELL_ID).to_pandas()))
        if len(parts) >= 64:  # keep the running counts small however many shards
            parts = [merge_counts(pd.concat(parts, ignore_index=True))]
    _refuse_duplicate_ids(ds, np.concatenate(hashes) if hashes else np.zeros(0, np.uint64))
    del hashes
    plan = plan_splits(
        merge_counts(pd.concat(parts, ignore_index=True)), unseen, fractions, seed, val_batches
    )

    def _set(t: pa.Table, where: str) -> pa.Table:
        col = plan.apply(t.select(list(dict.fromkeys([K.BATCH, group_by]))), group_by, where)
        return t.set_column(t.column_names.index(K.SPLIT), K.SPLIT, col)

    return rewrite_shards(
        ds,
        _set,
        {
            "split_params": {
                "unseen": unseen,
                "group_by": group_by,
                "stratify": stratify,
                "fractions": fractions,
                "seed": seed,
                "val_batches": plan.val_batches,
            }
        },
        progress=progress,
    )


def _id_hashes(ids: pd.Series) -> np.ndarray:
    """64-bit hashes of cell ids (pandas' vectorised hash): 8 bytes a cell instead of the id strings."""
    return pd.util.hash_pandas_object(ids, index=False).to_numpy()


def _refuse_duplicate_ids(ds: ShardDataset, hashes: np.ndarray) -> None:
    """Raise if a cell id appears twice. Splits are written back per row, but every later join (predictions,
    embeddings, evaluation) is by cell id, so a repeated id is refused here. Equal hashes are confirmed
    on the ids themselves (a second read of the id column, only when some hash repeats), so a 64-bit
    collision is never reported as a duplicate.
    """
    hashes = np.sort(hashes)
    same = hashes[1:][hashes[1:] == hashes[:-1]]
    if not len(same):
        return
    same = np.unique(same)
    suspects = []
    for p in ds.shard_paths:
        ids = ds.read_shard(p, [K.CELL_ID]).to_pandas()[K.CELL_ID]
        hit = np.isin(_id_hashes(ids), same)
        suspects.append(ids[hit])
    counts = pd.concat(suspects, ignore_index=True).value_counts()
    dup = counts[counts > 1]
    if len(dup):
        raise ShardError(
            f"split: {ds.root}: cell_id {dup.index[0]!r} appears {int(dup.iloc[0])} times "
            f"({len(dup)} duplicated id(s), {int(dup.sum() - len(dup))} extra row(s)); cell "
            "ids must be unique: rebuild the data set or drop the duplicate rows"
        )
