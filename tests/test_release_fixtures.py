"""Data sets and checkpoints written by an earlier release still load, predict and evaluate as they did.

The fixtures in tests/data/release_fixtures were written by that release (see its README); the hand-written
dicts below stand for still older files that lack keys added since.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from raycell import constants as K
from raycell.formats.checkpoint import (
    META,
    CheckpointError,
    CheckpointMeta,
    find_checkpoint,
    read_meta,
)
from raycell.formats.manifest import DatasetManifest, read_dataset_manifest
from raycell.formats.shards import ShardError, open_dataset, split_counts
from raycell.models.checkpoint import load_checkpoint, save_checkpoint

FIXTURES = Path(__file__).parent / "data" / "release_fixtures"
DATASET, RUN = FIXTURES / "dataset", FIXTURES / "run"


def _json(path: Path):
    return json.loads(path.read_text())


def _canonical(obj) -> str:
    """JSON text with sorted keys: equal for the same content whatever the key order (and NaN == NaN)."""
    return json.dumps(obj, sort_keys=True)


def test_release_dataset_opens_with_its_manifest_as_attributes():
    ds = open_dataset(DATASET, check=True)
    m = ds.manifest
    assert m.n_cells == 48 and ds.shape == (2, 16, 16) and ds.dtype == "uint8"
    assert m.channel_names == ["nucleus", "cytoplasm"] and m.label_vocab == ["high", "low"]
    assert m.batch_vocab == [f"batch0{i}" for i in range(8)]
    assert m.suggested_unseen == ["batch06", "batch07"]
    assert m.split_params["unseen"] == m.suggested_unseen and m.split_params["val_batches"] == []
    assert sum(m.counts_per_split.values()) == 48 and m.counts_per_split[K.UNSEEN] == 12
    imgs, meta = ds.load_images(splits=[K.TRAIN])
    assert imgs.shape == (m.counts_per_split[K.TRAIN], 2, 16, 16) and len(meta) == len(imgs)
    # the JSON keeps its format: reading and writing back gives the release's file
    raw = _json(DATASET / K.MANIFEST)
    assert _canonical(DatasetManifest.from_dict(raw).to_dict()) == _canonical(raw)


def test_release_checkpoint_meta_reads_and_writes_back_unchanged():
    ck = find_checkpoint(RUN)
    meta = read_meta(ck)
    assert meta.model_type == "conventional" and meta.uses_z is False and meta.epoch == 0
    assert meta.labels.values == ("high", "low") and len(meta.batches) == 6
    assert meta.data_spec.shape == (2, 16, 16) and meta.data_spec.normalize == "crop"
    assert meta.heads == [] and meta.output_heads == [meta.labels]
    assert meta.path == ck and meta.config["train"]["epochs"] == 1
    raw = _json(ck / META)
    assert _canonical(CheckpointMeta.from_dict(raw).to_dict()) == _canonical(raw)


def test_release_checkpoint_predicts_and_evaluates_as_it_did():
    import pyarrow as pa

    from raycell.eval.evaluate import split_metrics
    from raycell.infer.predictor import CropPredictor

    ds = open_dataset(DATASET)
    t = ds.read_table()
    model, meta = load_checkpoint(RUN)
    assert not model.training and meta.path == find_checkpoint(RUN)
    pred = CropPredictor(str(RUN), device="cpu")(t)
    want = np.load(FIXTURES / "expected_predictions.npz")
    assert pred.column(K.CELL_ID).to_pylist() == want["cell_id"].tolist()
    np.testing.assert_allclose(np.asarray(pred.column(K.PROB).to_pylist()), want["prob"], atol=1e-5)
    latents = np.asarray(pred.column(K.LATENT).to_pylist())
    np.testing.assert_allclose(latents, want["latent"], atol=1e-5)
    test = np.asarray(pred.column(K.SPLIT).to_pylist()) == K.TEST
    df = pred.filter(pa.array(test)).drop_columns([K.LATENT]).to_pandas()
    res = split_metrics(df, latents[test], list(meta.labels.values))
    assert res["n"] == ds.manifest.counts_per_split[K.TEST] and 0 <= res["auroc"] <= 1


# a manifest of the first schema version: only the keys every version has, shards without row counts
OLD_MANIFEST = {
    "schema_version": 1,
    "channel_names": ["nucleus", "cytoplasm"],
    "channels": 2,
    "crop_size": [16, 16],
    "dtype": "uint8",
    "label_vocab": ["high", "low"],
    "batch_vocab": [f"batch0{i}" for i in range(8)],
    "shards": [{"file": "shards/part-00000.parquet"}],
    "split_params": {"unseen": ["batch06", "batch07"], "seed": 0},
    "made_by": "a custom producer",
}


def test_an_old_manifest_gets_the_documented_defaults():
    m = DatasetManifest.from_dict(dict(OLD_MANIFEST))
    assert m.created == "" and m.n_cells == 0  # no row counts to add up
    assert m.group_vocab == [] and m.weak_label_columns == [] and m.suggested_unseen == []
    assert m.counts_per_split == {} and m.channel_stats == {} and m.params == {}
    assert m.split_params["val_batches"] == [] and m.ground_truth is None and m.ingest is None
    assert m.crop_size == (16, 16) and m.shape == (2, 16, 16)
    # a key this version does not know is kept, and written back
    assert m.extra == {"made_by": "a custom producer"}
    assert m.to_dict()["made_by"] == "a custom producer"
    rows = dict(OLD_MANIFEST, shards=[{"file": "a", "rows": 30}, {"file": "b", "rows": 18}])
    assert DatasetManifest.from_dict(rows).n_cells == 48


def test_a_data_set_with_an_old_manifest_opens_and_counts_its_splits(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(DATASET, old)
    (old / K.MANIFEST).write_text(json.dumps(OLD_MANIFEST))
    ds = open_dataset(old, check=True)
    assert ds.shape == (2, 16, 16) and read_dataset_manifest(old).shards == ds.manifest.shards
    # no counts in the manifest: they come from the split column, as the release's manifest has them
    assert split_counts(ds) == _json(DATASET / K.MANIFEST)["counts_per_split"]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.pop("label_vocab"), r"missing key\(s\) \['label_vocab'\]"),
        (lambda d: d.update(schema_version=K.SCHEMA_VERSION + 1), "newer than this raycell"),
        (lambda d: d.update(crop_size=[16]), "malformed value"),
    ],
)
def test_a_manifest_this_version_cannot_read_is_one_line(tmp_path, change, match):
    bad = tmp_path / "bad"
    shutil.copytree(DATASET, bad)
    raw = _json(DATASET / K.MANIFEST)
    change(raw)
    (bad / K.MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ShardError, match=match) as err:
        open_dataset(bad)
    assert str(bad / K.MANIFEST) in str(err.value) and "\n" not in str(err.value)


def _old_meta(model_type: str = "conventional") -> dict:
    """The release's meta.json as a checkpoint written before uses_z, heads and normalize existed."""
    raw = _json(find_checkpoint(RUN) / META)
    for k in ("uses_z", "epoch", "metrics", "config", "software"):
        raw.pop(k)
    raw["data_spec"].pop("normalize")
    raw["model_type"] = model_type
    return raw


def test_an_old_checkpoint_meta_gets_the_documented_defaults():
    meta = CheckpointMeta.from_dict(_old_meta())
    assert meta.uses_z is None and meta.epoch == -1 and meta.heads == []  # not recorded
    assert meta.metrics == {} and meta.config == {} and meta.path is None
    assert (
        meta.data_spec.normalize == "global"
    )  # what every model was fed before the choice existed


def test_an_old_meta_without_uses_z_gets_it_from_the_registry():
    """The format layer leaves an unrecorded uses_z open; the model layer fills it in."""
    from raycell.models.checkpoint import with_registry_defaults

    for model_type, uses_z in (("conventional", False), ("mixedeffects", True)):
        meta = with_registry_defaults(CheckpointMeta.from_dict(_old_meta(model_type)))
        assert meta.uses_z is uses_z


def test_a_checkpoint_with_an_old_meta_loads(tmp_path):
    ck = tmp_path / "checkpoint_old"
    shutil.copytree(find_checkpoint(RUN), ck)
    raw = _old_meta()
    raw["data_spec"]["normalize"] = "crop"  # the weights were trained on crop-normalised input
    (ck / META).write_text(json.dumps(raw))
    model, meta = load_checkpoint(tmp_path)  # the run folder: the only checkpoint in it
    assert meta.path == ck and meta.epoch == -1 and meta.uses_z is False and not model.training


def test_a_meta_missing_a_required_key_is_one_line(tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(find_checkpoint(RUN), ck)
    raw = _old_meta()
    raw.pop("batches")
    (ck / META).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['batches'\]") as err:
        load_checkpoint(ck)
    assert str(ck / META) in str(err.value)


def test_what_this_version_writes_has_the_release_keys(tmp_path):
    from raycell.data.synthetic import write_synthetic
    from raycell.models import create_model

    release = _json(DATASET / K.MANIFEST)
    m = write_synthetic(str(tmp_path / "ds"), n_cells=48, crop_size=16, rows_per_shard=48, seed=0)
    # the release's file was also split afterwards
    assert set(m.to_dict()) | {"split_params"} == set(release)
    assert set(_json(tmp_path / "ds" / K.MANIFEST)) == set(m.to_dict())
    old = read_meta(find_checkpoint(RUN))
    model = create_model(old.model_type, **old.model_args)
    save_checkpoint(
        tmp_path / "ck",
        model,
        None,
        epoch=0,
        spec=old.data_spec,
        labels=old.labels,
        batches=old.batches,
        config=old.config,
        metrics=old.metrics,
    )
    assert set(_json(tmp_path / "ck" / META)) == set(_json(find_checkpoint(RUN) / META))
