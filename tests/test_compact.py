"""Shards of a useful size: compaction of many small files into shards sized by rows and bytes.

What a user relies on: ingest gives a handful of shards whatever the number of fields, holding
every cell of the fields accounted as ok exactly once, in plan order, with the same bytes the crop
tasks computed; a run killed while compacting leaves the previous data set whole and a re-run gives
every cell once; an existing data set of many small shards can be compacted into the same cells;
and data sets written before compaction (one shard per field) still open.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import CELL_KEYS, raw_ingest_config

from raycell import constants as K
from raycell.formats.compact import (
    Piece,
    compact_dataset,
    plan_shards,
    rows_cap,
    write_compacted,
)
from raycell.formats.shards import ShardError, ShardWriter, open_dataset


def test_plan_cuts_sources_into_full_shards_in_order():
    plan = plan_shards([3, 0, 5, 1], 4)
    assert plan == [
        [Piece(0, 0, 3), Piece(2, 0, 1)],
        [Piece(2, 1, 5)],
        [Piece(3, 0, 1)],
    ]
    assert plan_shards([], 4) == [] and plan_shards([0, 0], 4) == []
    # every row once, in order
    rows = [7, 1, 13, 2, 2]
    flat = [
        (p.source, r)
        for shard in plan_shards(rows, 5)
        for p in shard
        for r in range(p.start, p.stop)
    ]
    assert flat == [(i, r) for i, n in enumerate(rows) for r in range(n)]
    with pytest.raises(ValueError):
        plan_shards([1], 0)


def test_rows_cap_takes_the_smaller_bound():
    cell = 3 * 64 * 64  # uint8 bytes of one crop
    assert rows_cap(2000, 128, cell) == 2000
    assert rows_cap(2000, 16, cell) == 16 * 2**20 // cell  # 1365
    assert rows_cap(0, 16, cell) == 1365 and rows_cap(10, 0, cell) == 10
    assert rows_cap(0, 0, cell) > 10**12  # no bound: one shard
    assert rows_cap(5, 0.001, cell) == 1  # never below one row


def _write_small(root: Path, sizes: list[int], channels: int = 2, size: int = 8) -> ShardWriter:
    """A data set whose shards hold `sizes` cells each (one per field, the small-file case)."""
    w = ShardWriter(root, [f"ch{i}" for i in range(channels)], rows_per_shard=10**6)
    k = 0
    for f, n in enumerate(sizes):
        imgs = (np.arange(n * channels * size * size) + k).reshape(n, channels, size, size)
        meta = pd.DataFrame(
            {
                K.CELL_ID: [f"f{f:03d}-c{i:05d}" for i in range(n)],
                K.BATCH: f"b{f % 3}",
                K.LABEL: "hi" if f % 2 else "lo",
                K.PLATE: "p",
                K.WELL: "A01",
                K.FIELD: str(f),
                K.CENTROID_Y: 1.0,
                K.CENTROID_X: 2.0,
            }
        )
        w.write_shard((imgs % 251).astype(np.uint8), meta)
        k += n
    return w


def test_write_compacted_copies_rows_in_order(tmp_path):
    w = _write_small(tmp_path / "small", [3, 1, 4, 1, 5, 9, 2, 6])
    w.close()
    ds = open_dataset(tmp_path / "small")
    rows = [s["rows"] for s in ds.manifest.shards]
    shards = write_compacted(ds.shard_paths, rows, tmp_path / "big", cap=10, workers=2)
    assert [s["rows"] for s in shards] == [10, 10, 10, 1]
    assert [s["file"] for s in shards] == [f"shards/part-{k:05d}.parquet" for k in range(4)]
    want = ds.read_table()
    got = pa.concat_tables([pq.read_table(tmp_path / "big" / s["file"]) for s in shards])
    assert got.equals(want)
    # a source that is not what the caller said is an error naming it, not a silent mix-up
    with pytest.raises(ShardError, match="part-00001.parquet has 1 rows, expected 2"):
        write_compacted(ds.shard_paths, [3, 2, 4, 1, 5, 9, 2, 6], tmp_path / "bad", cap=10)


def test_compact_dataset_keeps_cells_and_old_layout_still_opens(tmp_path):
    sizes = [19] * 40 + [7]
    _write_small(tmp_path / "per_field", sizes).close()
    old = open_dataset(tmp_path / "per_field", check=True)  # the one-shard-per-field layout
    assert len(old.shard_paths) == 41
    m = compact_dataset(tmp_path / "per_field", tmp_path / "compact", rows_per_shard=300)
    new = open_dataset(tmp_path / "compact", check=True)
    assert [s["rows"] for s in new.manifest.shards] == [300, 300, 167]
    assert m.compaction["source_shards"] == 41
    for k in CELL_KEYS:
        assert getattr(new.manifest, k) == getattr(old.manifest, k), k
    i0, m0 = old.load_images()
    i1, m1 = new.load_images()
    assert np.array_equal(i0, i1)
    pd.testing.assert_frame_equal(m0, m1)
    # the byte bound: 2 channels x 8 x 8 uint8 = 128 bytes a cell, 0.01 MiB -> 81 rows a shard
    compact_dataset(tmp_path / "per_field", tmp_path / "mb", rows_per_shard=0, shard_mb=0.01)
    rows = [s["rows"] for s in open_dataset(tmp_path / "mb").manifest.shards]
    assert set(rows[:-1]) == {81} and sum(rows) == sum(sizes)
    # an existing data set is replaced only when asked, and the source is never the output
    with pytest.raises(ShardError, match="already holds"):
        compact_dataset(tmp_path / "per_field", tmp_path / "compact")
    with pytest.raises(ShardError, match="input"):
        compact_dataset(tmp_path / "per_field", tmp_path / "per_field", overwrite=True)
    compact_dataset(
        tmp_path / "per_field", tmp_path / "compact", rows_per_shard=500, overwrite=True
    )
    assert len(open_dataset(tmp_path / "compact").shard_paths) == 2
    assert not list(tmp_path.glob("*.partial-*"))


# --- ingest: many fields -> a handful of shards --------------------------------------------------


@pytest.fixture(scope="module")
def many_fields(tmp_path_factory) -> tuple[Path, Path]:
    """40 small synthetic raw fields (2 plates x 4 wells x 5 fields) of a few cells each."""
    from raycell.data.synthetic_raw import write_synthetic_raw

    root = tmp_path_factory.mktemp("many") / "raw"
    write_synthetic_raw(
        root,
        seed=5,
        n_batches=2,
        n_lines=4,
        wells=4,
        fields=5,
        fov_size=96,
        cells_per_fov=6,
        effects="basic",
        progress=False,
    )
    return root / "images", root / "platemap.csv"


def _cfg(src: Path, out: Path, platemap: Path, **ingest):
    return raw_ingest_config(src, out, platemap, crop_size=24, normalization="per-image", **ingest)


@pytest.mark.ray
def test_ingest_of_many_fields_gives_a_handful_of_shards(
    ray_local, many_fields, tmp_path, monkeypatch
):
    from raycell.ingest import driver

    src, pm = many_fields
    seen = {}
    real = driver._compact

    def keep_parts(staging, parts, p, ch):
        """The tasks' files as they were before compaction: one per field, in plan order."""
        seen["parts"] = [pq.read_table(staging / driver.PARTS / q["file"]) for q in parts]
        seen["stray"] = staging / driver.PARTS / K.SHARD_DIR / ".part-999999-000.parquet.x.tmp"
        seen["stray"].write_bytes(b"a killed writer's temporary file")
        return real(staging, parts, p, ch)

    monkeypatch.setattr(driver, "_compact", keep_parts)
    out = tmp_path / "crops"
    s = driver.ingest_fields(_cfg(src, out, pm, rows_per_shard=50))
    assert s["n_fovs_in"] == 40 == s["n_fovs_with_cells"] + s["n_fovs_rejected"]
    assert len(seen["parts"]) == s["n_fovs_with_cells"] > 30  # one file per field from the tasks
    ds = open_dataset(out, check=True)
    rows = [x["rows"] for x in ds.manifest.shards]
    assert len(rows) == s["n_shards"] == -(-s["n_cells"] // 50) <= 5
    assert set(rows[:-1]) == {50} and sum(rows) == s["n_cells"] == ds.manifest.n_cells
    # every cell exactly once, the same rows and bytes the tasks wrote, in plan order
    before = pa.concat_tables(seen["parts"])
    after = ds.read_table()
    assert after.equals(before)
    assert after.column(K.CELL_ID).to_pandas().is_unique
    # nothing but the shards: no parts folder, no stray file, no staging folder
    assert sorted(p.name for p in (out / K.SHARD_DIR).iterdir()) == [
        Path(x["file"]).name for x in ds.manifest.shards
    ]
    assert not (out / driver.PARTS).exists() and not list(tmp_path.glob("crops.partial-*"))

    # killed while compacting: the data set above stays whole; the re-run gives every cell once
    from raycell.formats import compact

    calls = {"n": 0}
    real_write = compact.atomic_write_parquet

    def die_on_second(table, path, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed while compacting")
        return real_write(table, path, **kw)

    monkeypatch.setattr(driver, "_compact", real)
    monkeypatch.setattr(compact, "atomic_write_parquet", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        driver.ingest_fields(_cfg(src, out, pm, rows_per_shard=40, overwrite="true"))
    assert open_dataset(out, check=True).read_table().equals(after)  # the old one, untouched
    monkeypatch.setattr(compact, "atomic_write_parquet", real_write)
    s2 = driver.ingest_fields(_cfg(src, out, pm, rows_per_shard=40, overwrite="true"))
    again = open_dataset(out, check=True)
    assert [x["rows"] for x in again.manifest.shards][:-1] == [40] * (s2["n_shards"] - 1)
    assert again.read_table().equals(after)  # same cells, same order, once each
    assert not list(tmp_path.glob("crops.partial-*")) and not list(tmp_path.glob("crops.old-*"))


def test_manifest_relist_keeps_counts_and_refuses_other_rows(tmp_path):
    from raycell.formats.shards import ManifestBuilder, write_shard_file

    b = ManifestBuilder(tmp_path, ["a"])
    for k, n in enumerate((3, 4)):
        meta = pd.DataFrame(
            {K.CELL_ID: [f"f{k}-c{i}" for i in range(n)], K.BATCH: "b0", K.LABEL: "x"}
        )
        b.add(
            write_shard_file(
                tmp_path, f"part-00000{k}-000.parquet", np.full((n, 1, 4, 4), k, np.uint8), meta
            )
        )
    with pytest.raises(ShardError, match="hold 6 rows, the parts added 7"):
        b.relist([{"file": "shards/part-00000.parquet", "rows": 6}])
    b.relist([{"file": "shards/part-00000.parquet", "rows": 7}])
    m = b.write()
    assert m.shards == [{"file": "shards/part-00000.parquet", "rows": 7}]
    assert m.n_cells == 7 and m.counts_per_batch == {"b0": 7}


def test_negative_shard_bounds_are_refused_naming_the_key():
    from raycell.config import ConfigError, load_config

    for key in ("rows_per_shard", "shard_mb"):
        with pytest.raises(
            ConfigError, match=rf"ingest.{key} must be >= 0 \(0 = no bound\), got -1"
        ):
            load_config(None, [f"ingest.{key}=-1"])
