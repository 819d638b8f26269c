import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from raycell import constants as K
from raycell.formats.shards import ShardError, ShardWriter, decode_images, open_dataset


def _meta(n, start=0):
    return pd.DataFrame(
        {
            K.CELL_ID: [f"c{i}" for i in range(start, start + n)],
            K.BATCH: ["b0", "b1"] * (n // 2),
            K.LABEL: ["x", "y", "y", "x"] * (n // 4),
            K.WELL: "A01",
            "dose": np.linspace(0, 1, n),
            "morph_area": np.arange(n, dtype=float),
        }
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, np.iinfo(dtype).max, (40, 3, 8, 10), dtype=dtype)
    w = ShardWriter(tmp_path / "ds", ["a", "b", "c"], rows_per_shard=16)
    w.add(imgs[:25], _meta(24)[:25] if False else _meta(28)[:25])
    w.add(imgs[25:], _meta(16, start=25)[:15])
    m = w.close(params={"p": 1}).to_dict()
    assert [s["rows"] for s in m["shards"]] == [16, 16, 8]
    assert m["n_cells"] == 40 and m["crop_size"] == [8, 10] and m["channels"] == 3
    assert m["label_vocab"] == ["x", "y"] and m["batch_vocab"] == ["b0", "b1"]
    assert m["counts_per_split"] == {"unassigned": 40} and "dose" in m["weak_label_columns"]
    st = m["channel_stats"]["a"]
    assert st["min"] == imgs[:, 0].min() and st["max"] == imgs[:, 0].max()
    assert st["mean"] == pytest.approx(imgs[:, 0].mean())
    ds = open_dataset(tmp_path / "ds", check=True)
    back, meta = ds.load_images()
    np.testing.assert_array_equal(back, imgs)
    assert meta[K.CELL_ID].tolist() == [f"c{i}" for i in range(40)]
    # the shard really is zstd parquet with the contract's columns, readable by plain pyarrow
    f = pq.ParquetFile(ds.shard_paths[0])
    assert f.metadata.row_group(0).column(0).compression == "ZSTD"
    assert set(K.REQUIRED_COLUMNS) <= set(f.schema_arrow.names)


def test_folder_without_manifest(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(ShardError, match="has no dataset.json"):
        open_dataset(tmp_path)
    with pytest.raises(ShardError, match="not found"):
        open_dataset(tmp_path / "nope")


def _small(tmp_path):
    w = ShardWriter(tmp_path / "ds", ["a"], rows_per_shard=8)
    w.add(np.zeros((8, 1, 4, 4), np.uint8), _meta(8))
    w.close()
    return tmp_path / "ds"


def test_manifest_missing_key_and_missing_shard(tmp_path):
    root = _small(tmp_path)
    m = json.loads((root / K.MANIFEST).read_text())
    del m["label_vocab"]
    (root / K.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ShardError, match="missing key.*label_vocab"):
        open_dataset(root)
    m["label_vocab"] = ["x", "y"]
    m["shards"].append({"file": "shards/part-00099.parquet", "rows": 1})
    (root / K.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ShardError, match="part-00099.parquet, which does not exist"):
        open_dataset(root)


def test_shape_disagreeing_with_manifest_names_the_cell(tmp_path):
    root = _small(tmp_path)
    m = json.loads((root / K.MANIFEST).read_text())
    m["crop_size"] = [5, 5]
    (root / K.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(
        ShardError, match=r"row 0 \(cell_id=c0\) has height=4, but the manifest says 5"
    ):
        open_dataset(root, check=True)
    ds = open_dataset(root)
    t = ds.read_table()
    with pytest.raises(ShardError, match=r"cell_id=c0\) has 16 image bytes.*25 bytes"):
        decode_images(t, (1, 5, 5), "uint8")


def test_writer_rejects_bad_input(tmp_path):
    w = ShardWriter(tmp_path / "ds", ["a"], rows_per_shard=8)
    with pytest.raises(ShardError, match="uint8 or uint16"):
        w.add(np.zeros((2, 1, 4, 4), np.float32), _meta(4)[:2])
    with pytest.raises(ShardError, match="duplicate cell_id"):
        w.add(np.zeros((2, 1, 4, 4), np.uint8), pd.concat([_meta(4)[:1]] * 2))
    with pytest.raises(ShardError, match="missing column 'label'"):
        w.add(np.zeros((4, 1, 4, 4), np.uint8), _meta(4).drop(columns=[K.LABEL]))
    root = _small(tmp_path / "other")
    with pytest.raises(ShardError, match="already holds a data set"):
        ShardWriter(root, ["a"])
    shutil.rmtree(root)


def test_parts_written_apart_give_the_writers_manifest(tmp_path):
    """Shards written by separate processes (write_shard_file) + one ManifestBuilder == one ShardWriter."""
    from raycell.formats.shards import ManifestBuilder, write_shard_file

    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 255, (40, 2, 6, 6), dtype=np.uint8)
    meta = _meta(40)
    w = ShardWriter(tmp_path / "one", ["a", "b"], rows_per_shard=16)
    w.add(imgs, meta)
    one = w.close(params={"p": 1}).to_dict()
    (tmp_path / "two" / K.SHARD_DIR).mkdir(parents=True)
    parts = [
        write_shard_file(
            tmp_path / "two", f"part-{i:05d}.parquet", imgs[s : s + 16], meta[s : s + 16]
        )
        for i, s in enumerate(range(0, 40, 16))
    ]
    b = ManifestBuilder(tmp_path / "two", ["a", "b"])
    for part in parts:
        b.add(part)
    two = b.write(params={"p": 1}).to_dict()
    for k in (
        "n_cells",
        "label_vocab",
        "batch_vocab",
        "counts_per_split",
        "counts_per_batch",
        "channel_stats",
        "shards",
        "weak_label_columns",
        "crop_size",
        "dtype",
    ):
        assert one[k] == two[k], k
    np.testing.assert_array_equal(open_dataset(tmp_path / "two", check=True).load_images()[0], imgs)
    other = write_shard_file(
        tmp_path / "two", "odd.parquet", np.zeros((2, 2, 5, 6), np.uint8), meta[:2]
    )
    with pytest.raises(ShardError, match="odd.parquet.*differs"):
        b.add(other)
