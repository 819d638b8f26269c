"""Crop shards: the parquet + manifest format every stage reads and writes (SPEC "Crop shards").

A data set is a folder with `dataset.json` (the manifest) and `shards/part-*.parquet` (zstd), one row per
cell, the crop stored as the raw bytes of a C-order `channels x height x width` uint8/uint16 array. Images are
decoded for a whole batch at once from the Arrow buffer (`decode_images`), never per row in Python.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycell import constants as K
from raycell.formats.manifest import DatasetManifest, ShardError, read_dataset_manifest
from raycell.utils.io import atomic_write_parquet, software_versions
from raycell.utils.progress import quiet_bar

_STRING_COLS = (K.CELL_ID, K.BATCH, K.PLATE, K.WELL, K.FIELD, K.GROUP, K.LABEL, K.SPLIT, K.SOURCE)
_DTYPES = {"uint8": np.uint8, "uint16": np.uint16}


def image_dtype(name: str) -> np.dtype:
    """The numpy dtype for a manifest dtype name, with a clear error for anything else."""
    if name not in _DTYPES:
        raise ShardError(f"image dtype {name!r} is not supported (use one of {sorted(_DTYPES)})")
    return np.dtype(_DTYPES[name])


def _as_binary_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_large_binary(col.type):
        return col
    if not pa.types.is_binary(col.type):
        raise ShardError(f"column '{K.IMAGE}' must be binary, got {col.type}")
    return col


def decode_images(
    table: pa.Table, shape: tuple[int, int, int], dtype: str, where: str = ""
) -> np.ndarray:
    """Decode the `image` column of a table into one (N, C, H, W) array without a per-row Python loop.

    The rows' bytes are contiguous in the Arrow data buffer, so a single `np.frombuffer` over that buffer
    is the whole decode; the offsets are checked first so a crop of the wrong size is reported by cell_id.

    Args:
        table: rows with an `image` column (and `cell_id` for error messages).
        shape: (channels, height, width) that every crop must have (from the manifest).
        dtype: 'uint8' or 'uint16'.
        where: file name used in error messages.
    """
    dt = image_dtype(dtype)
    n = table.num_rows
    c, h, w = shape
    nbytes = c * h * w * dt.itemsize
    if n == 0:
        return np.empty((0, c, h, w), dt)
    arr = _as_binary_array(table.column(K.IMAGE))
    if arr.null_count:
        bad = pc.index(pc.is_null(arr), True).as_py()
        raise ShardError(f"{_locate(table, bad, where)} has no image")
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(
        arr.buffers()[1],
        off_type,
        count=len(arr) + 1,
        offset=arr.offset * np.dtype(off_type).itemsize,
    )
    lengths = np.diff(offsets)
    wrong = np.flatnonzero(lengths != nbytes)
    if wrong.size:
        i = int(wrong[0])
        raise ShardError(
            f"{_locate(table, i, where)} has {lengths[i]} image bytes, but the manifest says "
            f"{c}x{h}x{w} {dtype} = {nbytes} bytes; {wrong.size} row(s) disagree: the shard is damaged "
            "or does not belong to this data set"
        )
    data = arr.buffers()[2]
    flat = np.frombuffer(data, dt, count=n * c * h * w, offset=int(offsets[0]))
    return flat.reshape(n, c, h, w)


def _locate(table: pa.Table, i: int, where: str) -> str:
    """Name row i for an error: '<file>: row i (cell_id=...)', taking the file from a `path` column
    (Ray Data's include_paths) when no `where` is given, since one batch can span several files.
    """
    if not where and "path" in table.column_names:
        return f"{table.column('path')[i].as_py()}: cell_id={_cell_id(table, i)}"
    return f"{where or 'shard'}: row {i} (cell_id={_cell_id(table, i)})"


def _first_mismatch(table, wants) -> tuple[int, str, object] | None:
    """(row, column, wanted value) of the first row whose column differs from `wants`, or None."""
    for col, want in wants:
        bad = pc.not_equal(table.column(col), want)
        if pc.any(bad).as_py():
            return pc.index(bad, True).as_py(), col, want
    return None


def _cell_id(table: pa.Table, i: int) -> str:
    if K.CELL_ID in table.column_names:
        return str(table.column(K.CELL_ID)[i].as_py())
    return "?"


def encode_images(images: np.ndarray) -> pa.Array:
    """(N, C, H, W) uint8/uint16 array -> Arrow binary array, built from one buffer (no per-row bytes)."""
    images = np.ascontiguousarray(images)
    n = images.shape[0]
    per = int(np.prod(images.shape[1:])) * images.dtype.itemsize
    offsets = np.arange(n + 1, dtype=np.int64) * per
    if offsets[-1] < 2**31 - 1:
        return pa.Array.from_buffers(
            pa.binary(),
            n,
            [
                None,
                pa.py_buffer(offsets.astype(np.int32)),
                pa.py_buffer(images.reshape(-1).view(np.uint8)),
            ],
        )
    return pa.Array.from_buffers(
        pa.large_binary(),
        n,
        [None, pa.py_buffer(offsets), pa.py_buffer(images.reshape(-1).view(np.uint8))],
    )


class ChannelStats:
    """Running per-channel intensity statistics (mean, sd, min, max, 1st/99th percentile).

    Percentiles come from an exact integer histogram, which is cheap for 8/16-bit images and mergeable.
    """

    def __init__(self, channels: int, dtype: np.dtype):
        self.nbins = 256 if dtype == np.uint8 else 65536
        self.hist = np.zeros((channels, self.nbins), np.int64)

    def update(self, images: np.ndarray) -> None:
        """Add a (N, C, H, W) batch."""
        for ch in range(images.shape[1]):
            self.hist[ch] += np.bincount(images[:, ch].reshape(-1), minlength=self.nbins)

    def summary(self, names: list[str]) -> dict:
        """Per-channel dict of statistics in raw intensity units."""
        out = {}
        v = np.arange(self.nbins, dtype=np.float64)
        for ch, name in enumerate(names):
            h = self.hist[ch]
            n = h.sum()
            if n == 0:
                continue
            mean = float((h * v).sum() / n)
            sd = float(np.sqrt(max((h * (v - mean) ** 2).sum() / n, 0.0)))
            cdf = np.cumsum(h) / n
            nz = np.flatnonzero(h)
            out[name] = {
                "mean": mean,
                "std": sd,
                "min": int(nz[0]),
                "max": int(nz[-1]),
                "p01": int(np.searchsorted(cdf, 0.01)),
                "p99": int(np.searchsorted(cdf, 0.99)),
            }
        return out


def _meta_to_arrow(meta: pd.DataFrame) -> pa.Table:
    meta = meta.copy()
    for col in _STRING_COLS:
        if col not in meta.columns:
            meta[col] = K.UNASSIGNED if col == K.SPLIT else ""
        meta[col] = meta[col].astype(str)
    for col in (K.CENTROID_Y, K.CENTROID_X):
        meta[col] = meta[col].astype(np.float32) if col in meta.columns else np.float32(np.nan)
    for col in meta.columns:
        if col.startswith(K.MORPH_PREFIX):
            meta[col] = meta[col].astype(np.float32)
    t = pa.Table.from_pandas(meta.reset_index(drop=True), preserve_index=False)
    # pandas 3 gives large_string; use plain string everywhere so every shard has one schema
    for i, f in enumerate(t.schema):
        if pa.types.is_large_string(f.type):
            t = t.set_column(i, f.name, t.column(i).cast(pa.string()))
    return t


def shard_table(images: np.ndarray, meta: pd.DataFrame) -> pa.Table:
    """One shard's Arrow table: the metadata columns, then the image bytes and their declared shape/dtype."""
    c, h, w = images.shape[1:]
    table = _meta_to_arrow(meta)
    n = len(meta)
    return (
        table.append_column(K.IMAGE, encode_images(images))
        .append_column(K.HEIGHT, pa.array(np.full(n, h, np.int32)))
        .append_column(K.WIDTH, pa.array(np.full(n, w, np.int32)))
        .append_column(K.CHANNELS, pa.array(np.full(n, c, np.int32)))
        .append_column(K.DTYPE, pa.array([str(images.dtype)] * n))
    )


def summarize_meta(meta: pd.DataFrame) -> dict:
    """What the manifest needs from a shard's metadata: row count, columns and the value counts of the
    split, batch, label and group columns. Small and mergeable, so the process that writes the manifest
    never holds every cell's metadata (tasks writing their own shards send only this).
    """
    return {
        "n": int(len(meta)),
        "columns": [c for c in meta.columns if not c.startswith(K.MORPH_PREFIX)],
        "counts": {
            col: {str(k): int(v) for k, v in meta[col].astype(str).value_counts().items()}
            for col in (K.SPLIT, K.BATCH, K.LABEL, K.GROUP)
            if col in meta.columns
        },
    }


def check_crops(images: np.ndarray, meta: pd.DataFrame, where: str) -> None:
    """Refuse crops a shard cannot hold: not (N, C, H, W) with one metadata row each, or not uint8/16."""
    if images.ndim != 4 or len(images) != len(meta):
        raise ShardError(
            f"{where}: images must be (N, C, H, W) with one metadata row each, got "
            f"{images.shape} and {len(meta)} rows"
        )
    if images.dtype not in (np.uint8, np.uint16):
        raise ShardError(f"{where}: images must be uint8 or uint16, got {images.dtype}")


def write_shard_file(
    out_dir: str | os.PathLike, name: str, images: np.ndarray, meta: pd.DataFrame
) -> dict:
    """Write `<out_dir>/shards/<name>` atomically and return its part record for `ManifestBuilder.add`.

    Callable from any process (a Ray task writes where it computes); the record carries the shard's row
    count, crop shape and dtype, its exact per-channel histograms (sparse: only non-empty bins) and
    `summarize_meta` of its rows.
    """
    check_crops(images, meta, f"shard {name}")
    atomic_write_parquet(shard_table(images, meta), Path(out_dir) / K.SHARD_DIR / name)
    stats = ChannelStats(images.shape[1], images.dtype)
    stats.update(images)
    hist = []
    for h in stats.hist:
        nz = np.flatnonzero(h)
        hist.append((nz.astype(np.int32), h[nz]))
    return {
        "file": f"{K.SHARD_DIR}/{name}",
        "rows": int(len(meta)),
        "shape": list(images.shape[1:]),
        "dtype": str(images.dtype),
        "hist": hist,
        "meta": summarize_meta(meta),
    }


class ManifestBuilder:
    """Gathers shard part records (from `write_shard_file`, in any process) into the manifest.

    Checks that every part has the same crop shape and dtype; the shards are listed in the order added.
    """

    def __init__(self, out_dir: str | os.PathLike, channel_names: list[str]):
        self.out = Path(out_dir)
        self.channel_names = list(channel_names)
        self.shards: list[dict] = []
        self.shape: tuple[int, int, int] | None = None
        self.dtype: np.dtype | None = None
        self.stats: ChannelStats | None = None
        self.n = 0
        self.columns: dict[str, None] = {}
        self.counts: dict[str, dict[str, int]] = {}

    def add(self, part: dict) -> None:
        """Account for one written shard."""
        shape, dtype = tuple(part["shape"]), np.dtype(part["dtype"])
        if shape[0] != len(self.channel_names):
            raise ShardError(f"{part['file']}: {shape[0]} channels but names {self.channel_names}")
        if self.shape is None:
            self.shape, self.dtype = shape, dtype
            self.stats = ChannelStats(shape[0], dtype)
        elif shape != self.shape or dtype != self.dtype:
            raise ShardError(
                f"{part['file']}: crop shape {shape} {dtype} differs from the data set's "
                f"{self.shape} {self.dtype}"
            )
        for ch, (idx, cnt) in enumerate(part["hist"]):
            self.stats.hist[ch, np.asarray(idx, np.int64)] += np.asarray(cnt, np.int64)
        meta = part["meta"]
        self.n += meta["n"]
        self.columns.update(dict.fromkeys(meta["columns"]))
        for col, vc in meta["counts"].items():
            acc = self.counts.setdefault(col, {})
            for k, v in vc.items():
                acc[k] = acc.get(k, 0) + v
        self.shards.append({"file": part["file"], "rows": part["rows"]})

    def relist(self, shards: list[dict]) -> None:
        """List `shards` ({"file", "rows"}) instead of the parts added: the same rows rewritten as
        other files (`raycell.formats.compact`). The statistics and counts stay those of the parts.
        """
        n = sum(int(s["rows"]) for s in shards)
        if n != self.n:
            raise ShardError(f"{self.out}: the new shards hold {n} rows, the parts added {self.n}")
        self.shards = [{"file": s["file"], "rows": int(s["rows"])} for s in shards]

    def write(self, params: dict | None = None, extra: dict | None = None) -> DatasetManifest:
        """Write the manifest (atomically, last: a folder with a manifest is complete) and return it.

        `extra`: the producer's sections (`DatasetManifest` fields such as `suggested_unseen`).
        """
        if not self.shards:
            raise ShardError(f"no cells were written to {self.out}")
        for col in (K.BATCH, K.LABEL):
            if col not in self.counts:
                raise ShardError(f"{self.out}: the shards have no '{col}' column")
        manifest = build_manifest(
            self.n,
            list(self.columns),
            self.counts,
            self.shards,
            self.channel_names,
            self.shape,
            str(self.dtype),
            self.stats.summary(self.channel_names),
            params or {},
            extra or {},
        )
        manifest.write(self.out)
        return manifest


class ShardWriter:
    """Write crops + metadata into a data set folder, `rows_per_shard` rows per parquet file.

    Shards are written atomically as they fill; the manifest is written last by `close`, so a folder with
    a manifest is complete. For shards written by many processes use `write_shard_file` in each and one
    `ManifestBuilder` in the driver.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        channel_names: list[str],
        rows_per_shard: int = 1000,
        overwrite: bool = False,
    ):
        from raycell.utils.outputs import DATASET, mark, prepare_output

        self.out = Path(out_dir).absolute()
        # a file, a folder of someone else's files or an unwritable place is refused, even with overwrite
        prepare_output(
            self.out,
            overwrite=overwrite,
            what="data set folder",
            kind=DATASET,
            error=ShardError,
            hint="overwrite",
        )
        (self.out / K.SHARD_DIR).mkdir(parents=True, exist_ok=True)
        mark(self.out, DATASET)
        # the old manifest goes first: a run killed from here on leaves an incomplete folder, never a
        # manifest that lists shards which are gone or were rewritten
        (self.out / K.MANIFEST).unlink(missing_ok=True)
        for old in (self.out / K.SHARD_DIR).glob(K.SHARD_GLOB):
            old.unlink()
        self.channel_names = list(channel_names)
        self.rows_per_shard = rows_per_shard
        self._pending: list[tuple[np.ndarray, pd.DataFrame]] = []
        self._npending = 0
        self.builder = ManifestBuilder(self.out, self.channel_names)
        self._ids: set[str] = set()

    @property
    def shards(self) -> list[dict]:
        """The shards written so far ({"file", "rows"})."""
        return self.builder.shards

    def add(self, images: np.ndarray, meta: pd.DataFrame) -> None:
        """Queue a batch of crops (N, C, H, W) with one metadata row each (must include cell_id,
        batch, label).
        """
        check_crops(images, meta, "add()")
        if images.shape[1] != len(self.channel_names):
            raise ShardError(f"add(): {images.shape[1]} channels but names {self.channel_names}")
        b = self.builder
        first = self._pending[0][0] if self._pending else None
        shape = b.shape or (tuple(first.shape[1:]) if first is not None else None)
        dtype = b.dtype or (first.dtype if first is not None else None)
        if shape is not None and (tuple(images.shape[1:]) != shape or images.dtype != dtype):
            raise ShardError(
                f"add(): crop shape {images.shape[1:]} {images.dtype} differs from the data "
                f"set's {shape} {dtype}"
            )
        for col in (K.CELL_ID, K.BATCH, K.LABEL):
            if col not in meta.columns:
                raise ShardError(f"add(): metadata is missing column '{col}'")
        ids = meta[K.CELL_ID].astype(str)
        dup = ids[ids.duplicated()].tolist() or [i for i in ids if i in self._ids][:1]
        if dup:
            raise ShardError(f"add(): duplicate cell_id {dup[0]!r}")
        self._ids.update(ids)
        self._pending.append((images, meta))
        self._npending += len(meta)
        while self._npending >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        imgs = np.concatenate([p[0] for p in self._pending])
        meta = pd.concat([p[1] for p in self._pending], ignore_index=True)
        take_i, rest_i = imgs[:n], imgs[n:]
        take_m, rest_m = meta.iloc[:n], meta.iloc[n:]
        self._pending = [(rest_i, rest_m)] if len(rest_m) else []
        self._npending = len(rest_m)
        self.write_shard(take_i, take_m)

    def write_shard(self, images: np.ndarray, meta: pd.DataFrame) -> None:
        """Write one shard file now (atomic)."""
        name = f"part-{len(self.builder.shards):05d}.parquet"
        self.builder.add(write_shard_file(self.out, name, images, meta))

    def close(self, params: dict | None = None, extra: dict | None = None) -> DatasetManifest:
        """Flush the last shard, write the manifest, return it."""
        if self._npending:
            self._flush(self._npending)
        return self.builder.write(params, extra)


def build_manifest(
    n_cells: int,
    columns: list[str],
    counts: dict[str, dict[str, int]],
    shards: list[dict],
    channel_names: list[str],
    shape: tuple[int, int, int],
    dtype: str,
    channel_stats: dict,
    params: dict,
    extra: dict,
) -> DatasetManifest:
    """The manifest (SPEC): schema version, channels, crop size, vocabularies, counts, stats, provenance.

    `columns` and `counts` (value counts of split, batch, label, group) come from `summarize_meta`.
    """
    split = counts.get(K.SPLIT) or {K.UNASSIGNED: n_cells}
    weak = [
        c
        for c in columns
        if c not in K.METADATA_COLUMNS and c != K.CELL_ID and not c.startswith(K.MORPH_PREFIX)
    ]
    m = {
        "schema_version": K.SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "n_cells": int(n_cells),
        "channel_names": list(channel_names),
        "channels": int(shape[0]),
        "crop_size": [int(shape[1]), int(shape[2])],
        "dtype": dtype,
        "label_vocab": sorted(counts[K.LABEL]),
        "batch_vocab": sorted(counts[K.BATCH]),
        "group_vocab": sorted(counts.get(K.GROUP, {})),
        "weak_label_columns": weak,
        "counts_per_split": {k if k else "unassigned": int(v) for k, v in sorted(split.items())},
        "counts_per_batch": {k: int(v) for k, v in sorted(counts[K.BATCH].items())},
        "channel_stats": channel_stats,
        "shards": shards,
        "params": params,
        "software": software_versions(),
    }
    m.update(extra)
    return DatasetManifest.from_dict(m)


@dataclass
class ShardDataset:
    """An opened data set folder: its manifest and absolute shard paths."""

    root: Path
    manifest: DatasetManifest

    @property
    def shard_paths(self) -> list[str]:
        """Absolute paths of the shards, in manifest order."""
        return [str(self.root / s["file"]) for s in self.manifest.shards]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every crop."""
        return self.manifest.shape

    @property
    def dtype(self) -> str:
        """Image dtype name ('uint8' or 'uint16')."""
        return self.manifest.dtype

    def read_table(
        self, columns: list[str] | None = None, splits: Iterable[str] | None = None
    ) -> pa.Table:
        """Read all shards (optionally only some columns / splits) into one Arrow table."""
        tables = [self.read_shard(p, columns, splits) for p in self.shard_paths]
        return pa.concat_tables(tables)

    def read_shard(
        self, path: str, columns: list[str] | None = None, splits: Iterable[str] | None = None
    ) -> pa.Table:
        """Read one shard with a clear error naming the file if it is unreadable."""
        try:
            t = pq.read_table(
                path,
                columns=None
                if columns is None
                else list(dict.fromkeys(list(columns) + ([K.SPLIT] if splits else []))),
            )
        except (OSError, pa.ArrowInvalid) as exc:
            raise ShardError(f"cannot read shard {path}: {exc}") from None
        if splits:
            t = t.filter(pc.is_in(t.column(K.SPLIT), pa.array(list(splits))))
        return t

    def columns(self) -> list[str]:
        """Column names of the shards (from the first shard's schema)."""
        return pq.read_schema(self.shard_paths[0]).names

    def read_metadata(self, splits: Iterable[str] | None = None) -> pd.DataFrame:
        """All non-image columns as a DataFrame."""
        schema = pq.read_schema(self.shard_paths[0])
        cols = [c for c in schema.names if c != K.IMAGE]
        return self.read_table(cols, splits).to_pandas()

    def load_images(self, splits: Iterable[str] | None = None) -> tuple[np.ndarray, pd.DataFrame]:
        """Whole split in memory: (N, C, H, W) images and metadata (small data sets, tests, benchmarks)."""
        t = self.read_table(None, splits)
        imgs = decode_images(t, self.shape, self.dtype, where=str(self.root))
        return imgs, t.drop_columns([K.IMAGE]).to_pandas()

    def check_shard(self, table: pa.Table, where: str) -> None:
        """Validate a shard's columns and crop shapes against the manifest."""
        missing = [c for c in K.REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ShardError(f"{where}: missing column(s) {missing}")
        c, h, w = self.shape
        bad = _first_mismatch(table, ((K.CHANNELS, c), (K.HEIGHT, h), (K.WIDTH, w)))
        if bad:
            i, col, want = bad
            raise ShardError(
                f"{where}: row {i} (cell_id={_cell_id(table, i)}) has {col}="
                f"{table.column(col)[i].as_py()}, but the manifest says {want}"
            )
        decode_images(table, self.shape, self.dtype, where=where)

    def check_shard_file(self, path: str) -> None:
        """Cheap driver-side check of one shard before a Ray job reads it: the file is a readable parquet
        file (a truncated one has no footer), has the required columns, and every row declares the
        manifest's crop shape and dtype. Reads only the footer and four small columns, not the images.
        """
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ShardError(
                f"cannot read shard {path} (truncated or not parquet: {exc}); restore it or "
                "re-create the data set"
            ) from None
        missing = [c for c in K.REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            raise ShardError(f"shard {path}: missing column(s) {missing}")
        t = self.read_shard(path, [K.CELL_ID, K.CHANNELS, K.HEIGHT, K.WIDTH, K.DTYPE])
        c, h, w = self.shape
        bad = _first_mismatch(
            t, ((K.CHANNELS, c), (K.HEIGHT, h), (K.WIDTH, w), (K.DTYPE, self.dtype))
        )
        if bad:
            i, col, want = bad
            raise ShardError(
                f"shard {path}: row {i} (cell_id={_cell_id(t, i)}) has {col}="
                f"{t.column(col)[i].as_py()}, but the manifest {self.root / K.MANIFEST} "
                f"says {want}: the shard does not belong to this data set"
            )


def open_dataset(path: str | os.PathLike, check: bool = False) -> ShardDataset:
    """Open a data set folder, checking the manifest (and with `check`, every shard) against the contract.

    Raises:
        ShardError: no manifest, a manifest missing keys, a missing shard file, a bad shard.
    """
    root = Path(path).absolute()
    if not root.is_dir():
        raise ShardError(f"data set folder not found: {root}")
    mpath = root / K.MANIFEST
    if not mpath.is_file():
        raise ShardError(
            f"{root} has no {K.MANIFEST}: not a raycell data set (make one with "
            "`raycell synth`, `raycell ingest` or `raycell import-armed`)"
        )
    ds = ShardDataset(root, read_dataset_manifest(mpath))
    image_dtype(ds.dtype)
    for p in ds.shard_paths:
        if not os.path.isfile(p):
            raise ShardError(f"{mpath} lists shard {p}, which does not exist")
    if check:
        for p in ds.shard_paths:
            ds.check_shard(ds.read_shard(p), where=p)
    return ds


def rewrite_shards(
    ds: ShardDataset,
    fn: Callable[[pa.Table, str], pa.Table],
    manifest_update: dict,
    progress: bool = False,
    workers: int | None = None,
) -> DatasetManifest:
    """Apply `fn(table, path)` to every shard (each rewritten atomically), then update the manifest.

    `manifest_update` maps `DatasetManifest` fields to their new values (the split counts are set here).

    Used by `split` to set the split column in place without copying the images elsewhere. Shards are
    rewritten by `workers` threads (default: the cores, at most 8; Parquet reads and writes release the
    GIL: 1.7-1.9x faster with 2 threads on 2 cores), each holding one shard; only per-split row counts are
    kept. On an error the shards not yet started are left as they were. `progress`: a bar if it is slow.
    """

    def one(p: str) -> list[dict]:
        t = fn(ds.read_shard(p), p)
        atomic_write_parquet(t, p)
        return pc.value_counts(t.column(K.SPLIT)).to_pylist()

    counts: dict[str, int] = {}
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        try:
            for vc in quiet_bar(
                pool.map(one, ds.shard_paths),
                "split: write",
                enabled=progress,
                total=len(ds.shard_paths),
            ):
                for d in vc:
                    key = d["values"] or "unassigned"
                    counts[key] = counts.get(key, 0) + int(d["counts"])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    m = replace(ds.manifest, counts_per_split=dict(sorted(counts.items())), **manifest_update)
    m.write(ds.root)
    ds.manifest = m
    return m


def split_counts(ds: ShardDataset) -> dict[str, int]:
    """Rows per split from the manifest (falls back to reading the split column)."""
    counts = ds.manifest.counts_per_split
    if counts:
        return dict(counts)
    col = ds.read_table([K.SPLIT]).column(K.SPLIT)
    vc = pc.value_counts(col).to_pylist()
    return {d["values"]: d["counts"] for d in vc}
