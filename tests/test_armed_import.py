"""import-armed: ARMED data_*.npz + data_*.csv -> crop shards, and its one-line errors."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from raycell import constants as K
from raycell.formats.shards import decode_images, open_dataset
from raycell.ingest.armed_npz import ArmedImportError, import_armed

TRAIN_DATES = ["160802", "160808", "161209"]


def _write_split(folder, split, n, dates, seed, order=TRAIN_DATES):
    rng = np.random.default_rng(seed)
    pix = rng.integers(0, 256, (n, 16, 16, 1)).astype(np.float32) / 255
    eff = rng.choice(["high", "low"], n)
    date = rng.choice(dates, n)
    cluster = np.zeros((n, len(order)), np.float32)
    if split != "unseen":  # ARMED: one-hot over sorted training dates; unseen Z is all zeros
        cluster[np.arange(n), [order.index(d) for d in date]] = 1
    np.savez_compressed(
        folder / f"data_{split}.npz",
        images=pix,
        label=(eff == "low").astype(np.float32),
        cluster=cluster,
    )
    pd.DataFrame(
        {
            "image": [
                f"png/{e}/m481/{d}/cell{i % 5}/{i:03d}.png"
                for i, (e, d) in enumerate(zip(eff, date))
            ],
            "date": date,
            "celltype": np.where(eff == "low", "m498", "m481"),
            "met-eff": eff,
            "cell": [f"cell{i % 5}" for i in range(n)],
        },
        index=np.arange(n) + 1000 * seed,
    ).to_csv(folder / f"data_{split}.csv")
    return pix


@pytest.fixture()
def armed(tmp_path):
    src = tmp_path / "armed"
    src.mkdir()
    pix = {}
    for seed, (split, n) in enumerate([("train", 40), ("val", 8), ("test", 12)]):
        pix[split] = _write_split(src, split, n, TRAIN_DATES, seed)
    pix["unseen"] = _write_split(src, "unseen", 10, ["161214"], 9)
    np.savez(src / "data_unseen_inferred_z.npz", z=np.zeros((10, 3)))  # not a split: ignored
    return src, pix


def test_import_armed_round_trip(armed, tmp_path):
    src, pix = armed
    m = import_armed(src, tmp_path / "out").to_dict()
    ds = open_dataset(tmp_path / "out", check=True)
    assert m["n_cells"] == 70 and ds.shape == (1, 16, 16) and m["dtype"] == "uint8"
    assert m["counts_per_split"] == {"train": 40, "val": 8, "test": 12, "unseen": 10}
    assert m["batch_vocab"] == sorted(TRAIN_DATES + ["161214"]) and m["label_vocab"] == [
        "high",
        "low",
    ]
    assert m["armed"]["cluster_order"] == TRAIN_DATES and m["suggested_unseen"] == ["161214"]
    t = pq.read_table(ds.shard_paths[0])
    df = t.to_pandas()
    assert df[K.CELL_ID].is_unique and set(df[K.GROUP]) == {"m481", "m498"}
    train = t.filter(pq.ParquetFile(ds.shard_paths[0]).read().column(K.SPLIT).to_numpy() == "train")
    imgs = decode_images(train, ds.shape, ds.dtype)
    np.testing.assert_array_equal(imgs[:, 0], np.rint(pix["train"][..., 0] * 255).astype(np.uint8))
    csv = pd.read_csv(src / "data_train.csv", index_col=0)
    first = df[df[K.SPLIT] == "train"].iloc[0]
    assert first[K.BATCH] == str(csv["date"].iloc[0]) and first[K.LABEL] == csv["met-eff"].iloc[0]
    assert first[K.CELL_ID] == f"train-{csv['cell'].iloc[0]}-{csv.index[0]}"
    with pytest.raises(ArmedImportError, match="already holds"):
        import_armed(src, tmp_path / "out")
    assert import_armed(str(src / "data_*.npz"), tmp_path / "out", overwrite=True).n_cells == 70


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing_key", r"missing key\(s\) \['cluster'\]"),
        ("short_label", "'images' has 40 rows but 'label' has 39"),
        ("csv_rows", "39 rows but data_train.npz has 40 images"),
        ("csv_column", r"missing column\(s\) \['met-eff'\]"),
        ("label_flip", "label\\[0\\] = .* disagree"),
        ("range", "expected \\[0, 1\\]"),
        ("cluster_date", "encodes date"),
        ("no_csv", "matching csv"),
    ],
)
def test_import_armed_errors(armed, tmp_path, breakage, message):
    src, _ = armed
    npz, csv = src / "data_train.npz", src / "data_train.csv"
    z = dict(np.load(npz))
    meta = pd.read_csv(csv, index_col=0, dtype=str)
    if breakage == "missing_key":
        z.pop("cluster")
    elif breakage == "short_label":
        z["label"] = z["label"][:-1]
    elif breakage == "csv_rows":
        meta = meta.iloc[:-1]
    elif breakage == "csv_column":
        meta = meta.drop(columns=["met-eff"])
    elif breakage == "label_flip":
        z["label"][0] = 1 - z["label"][0]
    elif breakage == "range":
        z["images"] = z["images"] * 255
    elif breakage == "cluster_date":
        z["cluster"][0] = np.roll(z["cluster"][0], 1)
    elif breakage == "no_csv":
        csv.unlink()
    np.savez(npz, **z)
    if breakage != "no_csv":
        meta.to_csv(csv)
    with pytest.raises(ArmedImportError, match=message):
        import_armed(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_armed_nothing_to_import(tmp_path):
    with pytest.raises(ArmedImportError, match="no data_"):
        import_armed(tmp_path, tmp_path / "out")
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
