"""Ingest written by the crop tasks: each Ray task writes its own shard files and
returns small per-field rows; the driver only gathers them into the manifest, the rejects table and
the summary.

What a user relies on: the data set is the same whatever the task size (the same cells, image bytes,
manifest counts, vocabularies and channel statistics, and the same rejects table), the manifest
equals what the one-process `ShardWriter` gives for the same rows, a shard left behind by a task
whose result was lost is not in the data set, and no crop travels to the driver.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import CELL_KEYS, raw_ingest_config, write_small_raw

from raycell import constants as K
from raycell.formats.shards import ShardWriter, open_dataset
from raycell.ingest.params import IngestParams


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, Path]:
    """The small synthetic raw set (`write_small_raw`, 8 fields) with two fields broken: one
    truncated file (unreadable) and one empty field (no-cells). Returns (images, plate map)."""
    root = write_small_raw(tmp_path_factory.mktemp("tw") / "raw")
    src = root / "images"
    f = src / "batch00" / "SYN00_A01_s0_nucleus_z1.tif"
    f.write_bytes(f.read_bytes()[:2000])
    rng = np.random.default_rng(0)
    import tifffile

    for z in range(3):
        for c in ("nucleus", "cytoplasm"):
            tifffile.imwrite(
                src / "batch01" / f"SYN01_A01_s7_{c}_z{z}.tif",
                (300 + rng.normal(0, 20, (160, 160))).astype(np.uint16),
            )
    return src, root / "platemap.csv"


def _cells(out: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """All cells of a data set sorted by cell_id: images and metadata."""
    imgs, meta = open_dataset(out, check=True).load_images()
    order = np.argsort(meta[K.CELL_ID].to_numpy(), kind="stable")
    return imgs[order], meta.iloc[order].reset_index(drop=True)


def _rejects(out: Path) -> pd.DataFrame:
    rej = pd.read_parquet(out / "rejects.parquet")
    return rej.sort_values(["kind", "fov_id", "files"]).reset_index(drop=True)


@pytest.mark.ray
def test_task_size_does_not_change_the_data_set(ray_local, raw, tmp_path):
    from raycell.ingest.driver import ingest_fields

    src, pm = raw
    one = ingest_fields(raw_ingest_config(src, tmp_path / "one", pm, fovs_per_task=1))
    # three fields per task, files of at most 7 rows: every task splits its cells over files
    three = ingest_fields(
        raw_ingest_config(src, tmp_path / "three", pm, fovs_per_task=3, rows_per_shard=7)
    )
    assert one["rejects_by_code"] == three["rejects_by_code"] == {"unreadable": 1, "no-cells": 1}
    assert one["n_fovs_in"] == 9 and three["n_fovs_with_cells"] == 7
    for k in ("n_cells", "n_fovs_with_cells", "n_fovs_rejected", "crop_checks", "notes"):
        assert one[k] == three[k], k
    im1, m1 = _cells(tmp_path / "one")
    im3, m3 = _cells(tmp_path / "three")
    pd.testing.assert_frame_equal(m1, m3)
    assert np.array_equal(im1, im3) and m1[K.CELL_ID].is_unique
    pd.testing.assert_frame_equal(_rejects(tmp_path / "one"), _rejects(tmp_path / "three"))
    man1 = open_dataset(tmp_path / "one").manifest.to_dict()
    man3 = open_dataset(tmp_path / "three").manifest.to_dict()
    for k in CELL_KEYS:
        assert man1[k] == man3[k], k
    assert man1["ingest"]["accounting"] == man3["ingest"]["accounting"]
    # shards: sized by rows, not by task: every shard but the last has exactly rows_per_shard
    # rows (2000 by default: all of this small set in one), whatever the number of fields
    assert [s["rows"] for s in man1["shards"]] == [one["n_cells"]]
    rows3 = [s["rows"] for s in man3["shards"]]
    assert set(rows3[:-1]) == {7} and 0 < rows3[-1] <= 7 and sum(rows3) == three["n_cells"]
    assert one["n_shards"] == 1 and three["n_shards"] == len(rows3)
    for out, man in ((tmp_path / "one", man1), (tmp_path / "three", man3)):
        on_disk = sorted(p.name for p in (out / K.SHARD_DIR).iterdir())
        assert on_disk == [Path(s["file"]).name for s in man["shards"]]
        assert not (out / "parts").exists()  # the tasks' files went with the compaction
    # the same cells in the same order (plan order) whatever the task size
    order1 = open_dataset(tmp_path / "one").read_metadata()[K.CELL_ID].tolist()
    assert open_dataset(tmp_path / "three").read_metadata()[K.CELL_ID].tolist() == order1

    # the manifest equals the one the one-process writer gives for the same rows
    ref = ShardWriter(tmp_path / "ref", man3["channel_names"], rows_per_shard=50)
    meta = m3.drop(columns=[K.HEIGHT, K.WIDTH, K.CHANNELS, K.DTYPE])
    for s in range(0, len(meta), 13):
        ref.add(im3[s : s + 13], meta.iloc[s : s + 13])
    want = ref.close().to_dict()
    for k in CELL_KEYS:
        assert man3[k] == want[k], k


@pytest.mark.ray
def test_lost_task_shard_is_left_out_and_no_crop_reaches_the_driver(
    ray_local, raw, tmp_path, monkeypatch
):
    from raycell.ingest import driver

    src, pm = raw
    out = tmp_path / "crops"
    seen = {"columns": set(), "bytes": 0, "stray": []}

    def lose_first_task(ds):
        """What the driver gathers, with the rows of the task of the first field dropped (as if
        its result never came back after it had written its file)."""
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            seen["columns"].update(block.column_names)
            seen["bytes"] += block.nbytes
            yield from (r for r in block.to_pylist() if r["task"] != 0)
        staged = next(tmp_path.glob("crops.partial-*"))
        parts = staged / "parts" / K.SHARD_DIR
        seen["stray"] = sorted(p.name for p in parts.glob("part-000000-*"))

    monkeypatch.setattr(driver, "_result_rows", lose_first_task)
    s = driver.ingest_fields(
        raw_ingest_config(src, out, pm, fovs_per_task=2, normalization="per-image")
    )

    # the driver got small rows only: no crops, no per-cell metadata
    assert not {"crops", "meta", K.IMAGE} & seen["columns"], seen["columns"]
    assert seen["bytes"] < 100_000, seen["bytes"]
    # the first task (fields 0 and 1 in plan order) had written its shard, then was lost
    assert seen["stray"] == ["part-000000-000.parquet"]
    assert s["n_fovs_in"] == s["n_fovs_with_cells"] + s["n_fovs_rejected"] == 9
    assert s["rejects_by_code"].get("lost") == 2, s["rejects_by_code"]
    rej = pd.read_parquet(out / "rejects.parquet")
    lost = set(rej.loc[rej.code == "lost", "fov_id"])
    ds = open_dataset(out, check=True)
    names = [Path(p).name for p in ds.shard_paths]
    assert sorted(p.name for p in (out / K.SHARD_DIR).iterdir()) == sorted(names)
    assert not (out / "parts").exists()
    meta = ds.read_metadata()
    assert len(meta) == s["n_cells"] == ds.manifest.n_cells and meta[K.CELL_ID].is_unique
    assert not meta[K.CELL_ID].str.rsplit("-c", n=1).str[0].isin(lost).any()
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert summary["n_cells"] == s["n_cells"]
    assert not list(tmp_path.glob("crops.partial-*"))


def _meta(fid: str, n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            K.CELL_ID: [f"{fid}-c{i:05d}" for i in range(1, n + 1)],
            K.BATCH: "b0",
            K.LABEL: "x",
            K.PLATE: "p",
            K.WELL: "A01",
            K.FIELD: "0",
            K.CENTROID_Y: 1.0,
            K.CENTROID_X: 2.0,
        }
    )


def test_task_shards_named_by_first_field_and_split_by_rows(tmp_path):
    from raycell.ingest.fov import write_task_shards

    imgs = [np.full((n, 2, 8, 8), i, np.uint8) for i, n in enumerate((4, 3))]
    parts = write_task_shards(str(tmp_path), 12, imgs, [_meta("f1", 4), _meta("f2", 3)], 3)
    assert [p["file"] for p in parts] == [f"shards/part-000012-00{k}.parquet" for k in range(3)]
    assert [p["rows"] for p in parts] == [3, 3, 1] and [p["key"] for p in parts][-1] == [12, 2]
    # a task whose fields gave no cell writes nothing
    assert write_task_shards(str(tmp_path), 15, [], [], 3) == []
    # rows_per_shard 0: one file per task
    assert len(write_task_shards(str(tmp_path), 20, imgs, [_meta("g1", 4), _meta("g2", 3)], 0)) == 1
    with pytest.raises(RuntimeError, match="duplicate cell_id 'f1-c00001'"):
        write_task_shards(str(tmp_path), 30, imgs, [_meta("f1", 4), _meta("f1", 3)], 3)


def test_crop_batch_rows_carry_no_crops(tmp_path, monkeypatch):
    """The task's result: one small row per field, the part records once, the crops on disk."""
    import pickle

    import pyarrow as pa

    from raycell.ingest import fov as F

    def fake(fov, p, ch, stats):
        fid = fov["fov_id"]
        if fid == "bad":
            return (
                {
                    "fov_id": fid,
                    "status": "rejected",
                    "code": "no-cells",
                    "reason": "none",
                    "n_cells": 0,
                    "info": "{}",
                },
                None,
                None,
            )
        row = {"fov_id": fid, "status": "ok", "code": "", "reason": "", "n_cells": 2, "info": "{}"}
        return row, np.ones((2, 2, 8, 8), np.uint8), _meta(fid, 2)

    monkeypatch.setattr(F, "fov_result", fake)
    batch = pa.table(
        {
            "fov_id": ["a", "bad", "c"],
            "index": [7, 8, 9],
            "record": [json.dumps({"fov_id": f}) for f in ("a", "bad", "c")],
        }
    )
    t = F.crop_batch(batch, IngestParams(), {}, None, out=str(tmp_path), rows_per_shard=100)
    assert t.column_names == [
        "fov_id",
        "status",
        "code",
        "reason",
        "info",
        "n_cells",
        "task",
        "parts",
    ]
    assert t.column("task").to_pylist() == [7, 7, 7]
    assert t.column("n_cells").to_pylist() == [2, 0, 2]
    blobs = t.column("parts").to_pylist()
    assert blobs[1:] == [b"", b""]
    (part,) = pickle.loads(blobs[0])
    assert part["file"] == "shards/part-000007-000.parquet" and part["rows"] == 4
    assert (tmp_path / part["file"]).is_file()
    empty = F.crop_batch(batch.slice(0, 0), IngestParams(), {}, None, out=str(tmp_path / "e"))
    assert empty.num_rows == 0 and not (tmp_path / "e").exists()
