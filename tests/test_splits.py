import shutil

import pandas as pd
import pytest

from raycell import constants as K
from raycell.data.splits import assign_splits, resolve_val_batches, split_dataset
from raycell.errors import ConfigError
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


def _meta():
    rows = []
    for b in range(4):
        for g in range(3):
            for w in range(10):
                rows += [{K.BATCH: f"b{b}", K.GROUP: f"g{g}", K.WELL: f"w{g}{w}"}] * 5
    return pd.DataFrame(rows)


def test_val_batches_are_held_out_whole():
    meta = _meta()
    plain = assign_splits(meta, ["b3"], K.WELL, [K.GROUP, K.BATCH], [0.7, 0.1, 0.2], seed=1)
    s = assign_splits(meta, ["b3"], K.WELL, [K.GROUP, K.BATCH], [0.7, 0.1, 0.2], seed=1, val_batches=["b1"])
    assert (s[meta[K.BATCH] == "b1"] == K.VALBATCH).all()
    assert (s[meta[K.BATCH] != "b1"] != K.VALBATCH).all()
    assert (s[meta[K.BATCH] == "b3"] == K.UNSEEN).all()
    rest = s[meta[K.BATCH].isin(["b0", "b2"])]
    assert set(rest) == {K.TRAIN, K.VAL, K.TEST}  # the other seen batches are split as before
    assert rest.value_counts(normalize=True)[K.TRAIN] == pytest.approx(0.7, abs=0.05)
    assert K.VALBATCH not in set(plain)  # no val_batches: no valbatch rows


def test_val_batches_auto_is_deterministic_and_seen():
    batches = ["b0", "b1", "b2", "b3", "b4"]
    picks = {tuple(resolve_val_batches(["auto:2"], batches, ["b4"], seed=s)) for s in range(12)}
    assert all(len(p) == 2 and "b4" not in p for p in picks)
    assert len(picks) > 1, "auto:N ignores the seed"
    assert resolve_val_batches(["auto:2"], batches, ["b4"], 3) == resolve_val_batches(["auto:2"], batches,
                                                                                       ["b4"], 3)
    assert resolve_val_batches([], batches, ["b4"]) == []


@pytest.mark.parametrize("val, match", [
    (["b3"], r"split.val_batches: \['b3'\] are held out as unseen"),
    (["nope"], r"split.val_batches: batch\(es\) \['nope'\] are not in the data set"),
    (["b0", "b1", "b2"], "holds out every seen batch, leaving none to train on"),
    (["auto:3"], "auto:3 would hold out all 3 seen batch"),
    (["auto:x"], "give batch names or one 'auto:N'"),
    (["auto:1", "b0"], "give batch names or one 'auto:N'"),
])
def test_bad_val_batches(val, match):
    with pytest.raises(ConfigError, match=match) as e:
        assign_splits(_meta(), ["b3"], K.WELL, [K.GROUP, K.BATCH], [0.7, 0.1, 0.2], val_batches=val)
    assert "\n" not in str(e.value)


def test_split_dataset_records_val_batches(tiny_data, tmp_path):
    copy = tmp_path / "d"
    shutil.copytree(tiny_data, copy)
    m = split_dataset(str(copy), val_batches=["auto:1"])
    (vb,) = m["split_params"]["val_batches"]
    meta = open_dataset(copy).read_metadata()
    assert set(meta[meta[K.SPLIT] == K.VALBATCH][K.BATCH]) == {vb}
    assert (meta[meta[K.BATCH] == vb][K.SPLIT] == K.VALBATCH).all()
    assert m["counts_per_split"][K.VALBATCH] == (meta[K.BATCH] == vb).sum()
    with pytest.raises(ConfigError, match="held out as unseen"):
        split_dataset(str(copy), val_batches=[m["split_params"]["unseen"][0]])
