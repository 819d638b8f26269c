"""Compaction: many small shard files -> few shards of a target size, the same rows, same order.

Every stage after ingest pays per file (a parquet footer, a Ray Data read task, an inference round's
output file), so a data set of 10^4-10^6 files of a few cells each is slow to split, train on, infer
and embed, whatever its size in bytes. Compaction rewrites such files as shards of at most
`rows_per_shard` rows and `shard_mb` MiB of image bytes.

Why a separate pass over finished files rather than writers that group rows: a writer whose unit of
work is small (ingest's crop task, a few fields of view) keeps that unit's exactness only if its
output is its own file, named after it, rewritten whole by a retry; grouping units would make a
retried or lost unit touch another unit's file. Compaction runs once every unit is accounted for, in
a fixed order, so the output does not depend on which unit finished first.

The pass copies rows, never decodes an image: each output shard is the concatenation of slices of
its sources (planned up front from their row counts, `plan_shards`) written atomically; output
shards are independent, so they are written by a few threads (Parquet reads and writes release the
GIL). Memory: one output shard per thread (bounded by `shard_mb`) plus the source files it is cut
from.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycell import constants as K
from raycell.formats.manifest import DatasetManifest
from raycell.utils.io import atomic_write_parquet

MIB = 2**20


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of source file number `source` (its position in the source list)."""

    source: int
    start: int
    stop: int


def rows_cap(rows_per_shard: int, shard_mb: float, cell_bytes: int) -> int:
    """The most rows per output shard: `rows_per_shard`, `shard_mb` MiB of images (0 = no bound).

    `cell_bytes` is one crop's image bytes (channels x height x width x item size); metadata columns
    are small beside it and not counted. At least 1 row, whatever the bounds.
    """
    caps = []
    if rows_per_shard > 0:
        caps.append(int(rows_per_shard))
    if shard_mb > 0 and cell_bytes > 0:
        caps.append(int(shard_mb * MIB // cell_bytes))
    return max(1, min(caps)) if caps else 2**62


def plan_shards(rows: list[int], cap: int) -> list[list[Piece]]:
    """Cut the sources (`rows` rows each), end to end, into shards of `cap` rows (the last: fewer).

    Deterministic from the row counts alone; a source may span several shards, and sources without
    rows are skipped.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    shards: list[list[Piece]] = []
    cur: list[Piece] = []
    room = cap
    for i, n in enumerate(rows):
        at = 0
        while at < n:
            take = min(room, n - at)
            cur.append(Piece(i, at, at + take))
            at += take
            room -= take
            if room == 0:
                shards.append(cur)
                cur, room = [], cap
    if cur:
        shards.append(cur)
    return shards


def compacted_name(k: int) -> str:
    """Output shard k's file name (5 digits, as `ShardWriter` names its shards)."""
    return f"part-{k:05d}.parquet"


def _read_source(path: str) -> pa.Table:
    from raycell.formats.shards import ShardError

    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ShardError(f"cannot read shard {path} while compacting: {exc}") from None


def write_compacted(
    sources: list[str], rows: list[int], out_dir: str | os.PathLike, cap: int, workers: int = 0
) -> list[dict]:
    """Write the rows of `sources` (in that order) as `<out_dir>/shards/part-NNNNN.parquet` files.

    Args:
        sources: parquet files, in the order their rows should come.
        rows: the row count of each source (known to the caller from its manifest or part records;
            checked against each file read).
        out_dir: the data set folder to write into (its `shards/` folder is created).
        cap: the most rows per output shard (`rows_cap`).
        workers: threads (0 = the cores, at most 4).

    Returns:
        The shard list for the manifest, in order: [{"file": "shards/part-00000.parquet", "rows"}].
    """
    from raycell.formats.shards import ShardError

    if len(sources) != len(rows):
        raise ValueError("sources and rows must have the same length")
    plan = plan_shards(rows, cap)
    shard_dir = Path(out_dir) / K.SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)

    def one(k: int) -> dict:
        tables = []
        for piece in plan[k]:  # each source gives one piece to a shard (two, if cut, to two shards)
            t = _read_source(sources[piece.source])
            if t.num_rows != rows[piece.source]:
                raise ShardError(
                    f"{sources[piece.source]} has {t.num_rows} rows, expected "
                    f"{rows[piece.source]}: it changed while being compacted"
                )
            tables.append(t.slice(piece.start, piece.stop - piece.start))
        table = pa.concat_tables(tables, promote_options="default")
        atomic_write_parquet(table, shard_dir / compacted_name(k))
        return {"file": f"{K.SHARD_DIR}/{compacted_name(k)}", "rows": int(table.num_rows)}

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, min(workers, len(plan) or 1))) as pool:
        try:
            return list(pool.map(one, range(len(plan))))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def cell_bytes(shape: tuple[int, int, int] | list[int], dtype: str) -> int:
    """Image bytes of one crop of `shape` (channels, height, width) and `dtype`."""
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def compact_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    rows_per_shard: int = 2000,
    shard_mb: float = 128.0,
    overwrite: bool = False,
    workers: int = 0,
) -> DatasetManifest:
    """Copy the data set `src` to `out` as compacted shards; the new manifest.

    The cells, their order, the vocabularies, counts and channel statistics are `src`'s (its
    manifest is kept, only its shard list replaced and `compaction` recorded). `out` is built in a
    staging folder and swapped in, so a killed run leaves `out` as it was.

    Raises:
        ShardError: `src` is not a data set or a shard cannot be read.
        OutputError: `out` is not a place raycell may write (it is `src`, holds other files, ...).
    """
    from raycell.formats.shards import ShardError, open_dataset
    from raycell.utils.outputs import DATASET, prepare_output, staging_dir, swap_in

    ds = open_dataset(src)
    target = prepare_output(
        out,
        [("source data set", str(ds.root))],
        overwrite,
        "compaction out",
        DATASET,
        ShardError,
        "overwrite=True",
    )
    cap = rows_cap(rows_per_shard, shard_mb, cell_bytes(ds.shape, ds.dtype))
    staged = staging_dir(target, DATASET)
    try:
        rows = [
            int(s["rows"]) if "rows" in s else pq.ParquetFile(path).metadata.num_rows
            for s, path in zip(ds.manifest.shards, ds.shard_paths)
        ]
        shards = write_compacted(ds.shard_paths, rows, staged, cap, workers)
        compaction = {
            "from": str(ds.root),
            "source_shards": len(rows),
            "rows_per_shard": cap,
            "shard_mb": shard_mb,
        }
        m = replace(ds.manifest, shards=shards, compaction=compaction)
        m.write(staged)
    except BaseException:
        import shutil

        shutil.rmtree(staged, ignore_errors=True)
        raise
    swap_in(staged, target)
    return m
