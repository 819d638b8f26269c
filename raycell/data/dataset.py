"""From crop shards to model batches: the vectorised collate, Ray Data pipelines and a local iterator.

The collate turns an Arrow batch into tensors in one `np.frombuffer` (see `shards.decode_images`); images
stay uint8/uint16 until they reach the device, where `DataSpec.to_float` scales them to [0, 1]. The same
collate serves Ray Train workers (`iter_torch_batches`), Ray Data inference and the Ray-free local iterator
used by unit tests and benchmarks.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from raycell import constants as K
from raycell.data.collate import collate_crops
from raycell.formats.categories import CategoryMap
from raycell.formats.shards import ShardDataset
from raycell.formats.spec import DataSpec

TRAIN_COLUMNS = [K.CELL_ID, K.IMAGE, K.LABEL, K.BATCH]


class CropCollate(ArrowBatchCollateFn):
    """Arrow batch -> {'x': uint8/int32 (N,C,H,W), 'y': label codes, 'b': batch codes (-1 = unseen)}.

    With weak-label `heads`, 'y' is (N, H) codes of those columns.

    Labels outside the vocabulary raise (training data must be covered); batches outside it become -1,
    because inference on unseen batches is a normal use.
    """

    def __init__(
        self,
        spec: DataSpec,
        labels: CategoryMap,
        batches: CategoryMap,
        heads: list[CategoryMap] | None = None,
    ):
        super().__init__()
        self.spec, self.labels, self.batches, self.heads = spec, labels, batches, heads

    @property
    def columns(self) -> list[str]:
        """The shard columns this collate reads (the weak-label columns too, when it has heads)."""
        return list(dict.fromkeys(TRAIN_COLUMNS + [h.column for h in self.heads or []]))

    def __call__(self, t: pa.Table) -> dict[str, torch.Tensor]:
        """Collate one batch."""
        return collate_crops(t, self.spec, self.labels, self.batches, self.heads)


def split_nbytes(ds: ShardDataset, split: str, columns: list[str] | None = None) -> int:
    """Bytes a split takes in memory, estimated from the manifest: crops plus ~64 bytes per other column."""
    c, h, w = ds.shape
    per_row = c * h * w * (2 if ds.dtype == "uint16" else 1) + 64 * len(columns or TRAIN_COLUMNS)
    return int(ds.manifest.counts_per_split.get(split, 0)) * per_row


def choose_materialize(
    ds: ShardDataset,
    splits: tuple[str, ...],
    mode: str,
    store_bytes: float,
    columns: list[str] | None = None,
    fraction: float = 0.25,
) -> bool:
    """Whether to hold the splits in Ray's object store (`data.materialize`: auto, always, never).

    auto: when all of them take at most `fraction` of the object store. Materialised, an epoch streams
    blocks already in memory instead of reading and filtering every shard again (Ray Data re-executes
    the whole read -> filter pipeline each epoch); data that does not fit is streamed as before.
    """
    if mode in ("always", "never"):
        return mode == "always"
    need = sum(split_nbytes(ds, s, columns) for s in splits)
    return need <= fraction * store_bytes


def read_shards(paths: list[str], reader: str = "v1", **kw):
    """`ray.data.read_parquet(paths, **kw)` with the parquet reader `data.parquet_reader` names.

    Why not Ray's default reader: in 2.60 `read_parquet` goes through DataSourceV2, which starts 32
    footer-reading actors (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS) for every read whatever the cluster: on 2
    cores materialising the demo's 6 shards took 2.98 s with it and 0.33 s with the V1 reader
    (`bench/bench_cpu_choices.py`), a start paid by each split, each streamed epoch and each inference
    round. V1
    would split the files into at least 200 blocks of a few crops each (1.5x slower batches at 256 px):
    one block per shard here, which Ray still splits at `target_max_block_size`. V1 samples a few
    files' footers on the driver when called, with a progress bar of its own: hidden here (it is not a
    stage of the user's job).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = reader == "v2"
    if (
        reader == "v1"
    ):  # V1 splits files into >= 200 blocks (a few crops each); blocks per shard instead
        kw.setdefault("override_num_blocks", len(paths))
    shown, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        return ray.data.read_parquet(paths, **kw)
    finally:
        ctx.enable_progress_bars = shown


def split_filter(name: str, fold: list[str] | None = None) -> str:
    """The Ray Data filter expression that selects split `name`, optionally in a cross-batch fold.

    `fold`: the seen batches a cross-batch fold holds out (`tune.folds`): their train and val cells form its
    `valbatch` split and leave its train and val splits. Test and unseen cells never move, so a fold
    never validates on cells that are kept for the final test.
    """
    if not fold:
        return f"{K.SPLIT} == '{name}'"
    batches = "[" + ", ".join(repr(str(b)) for b in fold) + "]"
    if name == K.VALBATCH:
        return f"({K.SPLIT} == '{K.TRAIN}' or {K.SPLIT} == '{K.VAL}') and {K.BATCH} in {batches}"
    if name in (K.TRAIN, K.VAL):
        return f"{K.SPLIT} == '{name}' and {K.BATCH} not in {batches}"
    return f"{K.SPLIT} == '{name}'"


def ray_datasets(
    ds: ShardDataset,
    splits: tuple[str, ...] = (K.TRAIN, K.VAL),
    columns: list[str] | None = None,
    block_size_mb: int = 8,
    shuffle_seed: int = -1,
    materialize: bool = False,
    parquet_reader: str = "v1",
    fold: list[str] | None = None,
) -> dict:
    """One Ray Dataset per split, streaming the shards (file order shuffled for the training split).

    Small data sets need small blocks: Ray 2.60 packs files into 128 MiB blocks by default, and a data set
    that is one block cannot be shuffled or split across workers.
    `shuffle_seed >= 0`: a fixed file order and Ray Data's `preserve_order`, so that the rows reach the
    workers in the same order every epoch and every run; the loop then varies the order per epoch with a
    local shuffle seeded by (seed, epoch), which a restarted run reproduces (Ray's own per-execution
    reseeding would not: its counter starts again after a restart).
    `materialize`: read and filter each split once into the object store (`choose_materialize`); the
    training split's block order is still randomised every epoch (on blocks in memory). Streamed (not
    materialised), nothing waits for the whole split: no all-to-all operator, so data larger than memory
    flows through. `parquet_reader`: `data.parquet_reader` (`read_shards`). `fold`: the batches a
    cross-batch fold holds out (`split_filter`).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = block_size_mb << 20
    seeded = shuffle_seed >= 0
    if seeded:
        ctx.execution_options.preserve_order = True
    out = {}
    for name in splits:
        shuffle = None
        if name == K.TRAIN:
            shuffle = (
                ray.data.FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=False)
                if seeded
                else "files"
            )
        # SPLIT is only needed for the filter: select it, filter, drop it.
        rd = read_shards(ds.shard_paths, parquet_reader, shuffle=shuffle)
        keep = list(dict.fromkeys((columns or TRAIN_COLUMNS)))
        rd = rd.select_columns(list(dict.fromkeys(keep + [K.SPLIT, K.BATCH])))
        rd = rd.filter(expr=split_filter(name, fold))
        rd = rd.drop_columns([c for c in (K.SPLIT, K.BATCH) if c not in keep])
        if materialize:
            rd = rd.materialize()
        # Block order: shuffled on the blocks in memory when materialised; when streamed, the file order
        # ("files", reshuffled every execution) and the iterator's local shuffle do it, because
        # randomize_block_order is an all-to-all that waits for (and holds) the whole split every epoch
        # (measured: the streamed path 0.12x a plain pyarrow read, 0.27 cores busy).
        out[name] = (
            rd.randomize_block_order() if name == K.TRAIN and not seeded and materialize else rd
        )
    return out


def sliced(
    batches: Iterator[dict[str, torch.Tensor]], batch_size: int, drop_last: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """Cut bigger batches into `batch_size`-row views (no copy); a last short slice is dropped with
    `drop_last`. Rows arrive already shuffled (the iterator's local shuffle), so the slices are as random
    as batches drawn one by one.
    """
    for big in batches:
        n = len(next(iter(big.values())))
        stop = n - (n % batch_size if drop_last else 0)
        for s in range(0, stop, batch_size):
            yield {k: v[s : s + batch_size] for k, v in big.items()}


FETCH_MAX_BYTES = 4 << 20  # a fetched (uncut) batch's images at most this big; see `train_batches`


def fetch_factor(fetch: int, batch_size: int, spec: DataSpec | None) -> int:
    """`data.fetch_batches`, capped so that a fetched batch's images stay within FETCH_MAX_BYTES."""
    if spec is None or fetch <= 1:
        return max(1, fetch)
    row = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
    return max(1, min(fetch, FETCH_MAX_BYTES // max(1, batch_size * row)))


def train_batches(
    it,
    batch_size: int,
    collate: CropCollate,
    fetch: int = 1,
    shuffle_buffer: int = 0,
    shuffle_seed: int | None = None,
    prefetch: int = 2,
    pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches from a Ray `DataIterator` (or Dataset): `fetch` batches' rows at a time through
    Ray's `iter_torch_batches`, cut into `batch_size` in the worker (`data.fetch_batches`).

    Why: Ray's iterator costs about as much CPU per batch as reading and decoding a 64-row 64 px batch;
    fetching 4 batches at once paid it once per 4 (64 px: 93k vs 47k images/s on 2 cores). Large crops
    lose: at 256 px (8 MiB per 64-row batch) fetching 4 halved the rate (3.2k vs 6.9k images/s), so the
    factor is capped where a fetched batch would pass FETCH_MAX_BYTES (4 MiB, between the two measured
    sizes, not tuned further; bench/README.md). The last incomplete batch is dropped.
    """
    fetch = fetch_factor(fetch, batch_size, getattr(collate, "spec", None))
    big = batch_size * fetch
    return sliced(
        it.iter_torch_batches(
            batch_size=big,
            collate_fn=collate,
            local_shuffle_buffer_size=max(shuffle_buffer, big) if shuffle_buffer else None,
            local_shuffle_seed=shuffle_seed,
            prefetch_batches=max(1, -(-prefetch // fetch)),
            drop_last=False,
            pin_memory=pin_memory,
        ),
        batch_size,
        drop_last=True,
    )


def local_batches(
    ds: ShardDataset,
    split: str,
    batch_size: int,
    collate: CropCollate,
    shuffle: bool = False,
    seed: int = 0,
    columns: list[str] | None = None,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Ray-free iterator over one split (unit tests, benchmarks, small local jobs)."""
    t = ds.read_table(columns or getattr(collate, "columns", TRAIN_COLUMNS), splits=[split])
    if shuffle:
        t = t.take(pa.array(np.random.default_rng(seed).permutation(t.num_rows)))
    stop = t.num_rows - (t.num_rows % batch_size if drop_last else 0)
    for s in range(0, stop, batch_size):
        yield collate(t.slice(s, batch_size))
