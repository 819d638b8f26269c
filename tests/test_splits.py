import shutil

import pandas as pd
import pytest

from raycell import constants as K
from raycell.data.splits import assign_splits, split_dataset
from raycell.formats.shards import ShardError, open_dataset


def test_split_dataset_groups_and_holds_out(tiny_data, tmp_path):
    ds = open_dataset(tiny_data)
    meta = ds.read_metadata()
    unseen = set(ds.manifest["split_params"]["unseen"])
    assert unseen == set(ds.manifest["suggested_unseen"])
    assert (meta[meta[K.BATCH].isin(unseen)][K.SPLIT] == K.UNSEEN).all()
    assert not (meta[~meta[K.BATCH].isin(unseen)][K.SPLIT] == K.UNSEEN).any()
    per_unit = meta[meta[K.SPLIT] != K.UNSEEN].groupby([K.BATCH, K.WELL])[K.SPLIT].nunique()
    assert per_unit.max() == 1, "a well straddles two splits"
    counts = ds.manifest["counts_per_split"]
    assert set(counts) == {K.TRAIN, K.VAL, K.TEST, K.UNSEEN} and sum(counts.values()) == len(meta)


def test_fractions_and_determinism():
    rows = []
    for b in range(4):
        for g in range(3):
            for w in range(10):
                rows += [{K.BATCH: f"b{b}", K.GROUP: f"g{g}", K.WELL: f"w{g}{w}"}] * 5
    meta = pd.DataFrame(rows)
    s1 = assign_splits(meta, ["b3"], K.WELL, [K.GROUP, K.BATCH], [0.7, 0.1, 0.2], seed=1)
    s2 = assign_splits(meta, ["b3"], K.WELL, [K.GROUP, K.BATCH], [0.7, 0.1, 0.2], seed=1)
    assert s1.equals(s2)
    seen = s1[meta[K.BATCH] != "b3"].value_counts(normalize=True)
    assert seen[K.TRAIN] == pytest.approx(0.7, abs=0.05)
    assert seen[K.VAL] == pytest.approx(0.1, abs=0.05)
    assert seen[K.TEST] == pytest.approx(0.2, abs=0.05)
    # stratified: every (group, batch) stratum with 10 wells reaches train and test
    both = pd.concat([meta, s1.rename("split")], axis=1)
    per = both[both[K.BATCH] != "b3"].groupby([K.GROUP, K.BATCH])["split"].agg(set)
    assert all({K.TRAIN, K.TEST} <= s for s in per)


def test_bad_split_requests(tiny_data, tmp_path):
    copy = tmp_path / "d"
    shutil.copytree(tiny_data, copy)
    with pytest.raises(ShardError, match=r"unseen batch\(es\) \['nope'\] are not in the data set"):
        split_dataset(str(copy), unseen=["nope"])
    with pytest.raises(ShardError, match="column 'plate_row' is not in the data set"):
        split_dataset(str(copy), group_by="plate_row")
