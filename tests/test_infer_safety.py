"""Inference and evaluation never mix, drop or silently corrupt results.

Checkpoints here are untrained models saved for the tiny data set (no Ray Train needed); the tests that
run a Ray Data job share `ray_local` and are marked `ray`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_overrides
from helpers import SEEN, untrained_checkpoint

from raycell import constants as K
from raycell.config import ConfigError, load_config
from raycell.formats.shards import ShardError, open_dataset, rewrite_shards
from raycell.models import list_models


@pytest.fixture(scope="module")
def cks(tiny_data, tmp_path_factory) -> dict:
    """One untrained checkpoint per registered model type."""
    root = tmp_path_factory.mktemp("cks")
    return {m: untrained_checkpoint(tiny_data, root / m, m) for m in list_models()}


def _cfg(data, out, ck, *extra):
    runs = Path(out).parent / "runs"
    return load_config(
        None, tiny_overrides(data, runs) + [f"infer.checkpoint={ck}", f"infer.out={out}", *extra]
    )


def _cli(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in-process: (exit status, stderr)."""
    from raycell.__main__ import main

    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def _infer_z(capsys, checkpoint: Path, data: Path, out: Path) -> tuple[int, str]:
    """`raycell infer-z` in-process: (exit status, stderr)."""
    return _cli(
        capsys, "infer-z", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)
    )


def _one_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raycell: error:"), err[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- 9b: empty batches never reach the model -------------------------------------------------------


@pytest.mark.parametrize("model_type", list_models())
def test_empty_batch_never_reaches_the_model(model_type, cks, tiny_data):
    from raycell.infer.predictor import CropPredictor

    t = pq.read_table(open_dataset(tiny_data).shard_paths[0])
    t = t.filter(pa.array([b in SEEN for b in t.column(K.BATCH).to_pylist()]))
    t = t.append_column("path", pa.array(["x/part-00000.parquet"] * t.num_rows))
    pred = CropPredictor(
        str(cks[model_type]), device="cpu", passthrough=[K.CELL_ID, K.SPLIT, "path"]
    )
    full = pred(t.slice(0, 5))
    empty = pred(t.slice(0, 0))  # a block with no rows of the requested splits
    assert empty.num_rows == 0 and full.num_rows == 5
    assert empty.schema == full.schema  # blocks of one Ray Data job must share a schema


# --- 10 / 2 / 8: check_infer validates an infer run without Ray ------------------------------------


def test_check_config_accepts_a_good_run_and_writes_nothing(cks, tiny_data, tmp_path):
    from raycell.infer.batch import check_infer

    plan = check_infer(
        _cfg(tiny_data, tmp_path / "pred", cks["conventional"], "infer.splits=[test]")
    )
    assert plan.pending == open_dataset(tiny_data).shard_paths
    assert plan.producer["splits"] == ["test"] and len(plan.producer["weights_sha256"]) == 64
    assert not (tmp_path / "pred").exists()
    with pytest.raises(ConfigError, match="infer.checkpoint"):
        check_infer(_cfg(tiny_data, tmp_path / "pred", ""))


def test_unknown_split_names_the_key_the_value_and_the_valid_splits(cks, tiny_data, tmp_path):
    from raycell.infer.batch import check_infer

    with pytest.raises(ConfigError) as e:
        check_infer(
            _cfg(tiny_data, tmp_path / "pred", cks["conventional"], "infer.splits=[test,tset]")
        )
    msg = str(e.value)
    assert "infer.splits" in msg and "'tset'" in msg and "'test'" not in msg.split("splits are")[0]
    assert all(s in msg for s in ("train", "val", "unseen"))


def test_corrupt_checkpoint_is_one_line_naming_the_file(cks, tiny_data, tmp_path, capsys):
    ck = _copy(cks["conventional"], tmp_path / "ck")
    weights = ck / "model.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # infer-z checks its inputs before it starts Ray: the CLI contract is checked end to end
    rc, err = _infer_z(capsys, ck, tiny_data, tmp_path / "z")
    assert rc == 2
    _one_line(err, str(weights), "truncated or corrupt")
    assert not (tmp_path / "z").exists()
    # a damaged meta.json: one line naming it
    ck2 = _copy(cks["conventional"], tmp_path / "ck2")
    (ck2 / "meta.json").write_text('{"model_type": "conventional", "model_ar')
    rc, err = _infer_z(capsys, ck2, tiny_data, tmp_path / "z")
    assert rc == 2
    _one_line(err, str(ck2 / "meta.json"))
    # the same errors from load_checkpoint and the infer pre-flight
    from raycell.formats.checkpoint import CheckpointError
    from raycell.infer.batch import check_infer
    from raycell.models.checkpoint import load_checkpoint

    for fn in (
        lambda: load_checkpoint(ck),
        lambda: check_infer(_cfg(tiny_data, tmp_path / "p", ck)),
    ):
        with pytest.raises(CheckpointError, match=r"model\.pt.*truncated or corrupt"):
            fn()
    with pytest.raises(CheckpointError, match="meta.json"):
        check_infer(_cfg(tiny_data, tmp_path / "p", ck2))


def test_crop_size_of_the_data_differing_from_the_models_is_one_line(tiny_data, tmp_path, capsys):
    ck = untrained_checkpoint(tiny_data, tmp_path / "ck64", shape=(2, 64, 64))
    rc, err = _infer_z(capsys, ck, tiny_data, tmp_path / "z")
    assert rc == 2
    _one_line(err, str(tiny_data), "crop size 32x32 vs 64x64")
    from raycell.infer.batch import check_infer

    with pytest.raises(ShardError, match=r"crop size 32x32 vs 64x64"):
        check_infer(_cfg(tiny_data, tmp_path / "pred", ck))


def test_truncated_or_foreign_input_shard_fails_before_ray(cks, tiny_data, tmp_path):
    from raycell.infer.batch import check_infer

    data = _copy(tiny_data, tmp_path / "d")
    ds = open_dataset(data)
    victim = Path(ds.shard_paths[2])
    victim.write_bytes(victim.read_bytes()[:5000])
    with pytest.raises(ShardError, match=f"cannot read shard {victim}.*truncated"):
        check_infer(_cfg(data, tmp_path / "pred", cks["conventional"]))
    # a row that declares another crop size than the manifest's
    data2 = _copy(tiny_data, tmp_path / "d2")
    p = open_dataset(data2).shard_paths[1]
    t = pq.read_table(p)
    h = t.column(K.HEIGHT).to_numpy().copy()
    h[7] = 31
    pq.write_table(t.set_column(t.schema.get_field_index(K.HEIGHT), K.HEIGHT, pa.array(h)), p)
    with pytest.raises(ShardError, match=rf"{p}: row 7 .*height=31"):
        check_infer(_cfg(data2, tmp_path / "pred", cks["conventional"]))


def _z_table(path: Path, ids: list[str], n: int = len(SEEN)) -> Path:
    z = np.full((len(ids), n), 1.0 / n, np.float32)
    pq.write_table(
        pa.table(
            {
                K.CELL_ID: pa.array(ids),
                "z": pa.FixedSizeListArray.from_arrays(pa.array(z.ravel()), n),
            }
        ),
        path,
    )
    return path


def test_z_source_is_checked_on_the_driver(cks, tiny_data, tmp_path):
    from raycell.infer.batch import check_infer
    from raycell.infer.predictor import MissingDesignMatrixError

    ck = cks["mixedeffects"]
    unseen = (
        open_dataset(tiny_data)
        .read_table([K.CELL_ID], splits=[K.UNSEEN])
        .column(K.CELL_ID)
        .to_pylist()
    )

    def check(z):
        return check_infer(_cfg(tiny_data, tmp_path / "pred", ck, f"infer.z_source={z}"))

    with pytest.raises(FileNotFoundError, match=r"infer.z_source.*raycell infer-z"):
        check(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"infer.z_source .* is not a Z table"):
        check(open_dataset(tiny_data).shard_paths[0])  # a crop shard, not a Z table
    (tmp_path / "z.csv").write_text("cell_id,z\n")
    with pytest.raises(ConfigError, match=r"infer.z_source .*z.csv is a file but not a Z table"):
        check(tmp_path / "z.csv")
    with pytest.raises(ConfigError, match=r"has 4 columns, the model has 6 batches"):
        check(_z_table(tmp_path / "narrow.parquet", unseen, n=4))
    with pytest.raises(MissingDesignMatrixError, match=r"^10 cell\(s\).*no row in the inferred Z"):
        check(_z_table(tmp_path / "partial.parquet", unseen[10:]))
    assert check(_z_table(tmp_path / "full.parquet", unseen)).producer["z_source"]["sha256"]


# --- Ray: what infer writes, what a re-run does with it, evaluate's checks --------------------------


@pytest.fixture(scope="module")
def predicted(cks, tiny_data, ray_local, tmp_path_factory) -> dict:
    """A conventional checkpoint's predictions for every row of a copy of the tiny set."""
    from raycell.infer.batch import predict

    root = tmp_path_factory.mktemp("pred")
    data = _copy(tiny_data, root / "data")
    cfg = _cfg(data, root / "pred", cks["conventional"])
    return {"data": data, "out": root / "pred", "cfg": cfg, "manifest": predict(cfg)}


@pytest.mark.ray
def test_predictions_record_what_produced_them(predicted, cks):
    from raycell.formats.predictions import PROVENANCE_KEY
    from raycell.infer.batch import check_infer

    m = json.loads((predicted["out"] / K.PREDICTIONS_MANIFEST).read_text())
    ds = open_dataset(predicted["data"])
    assert m["n_rows"] == ds.manifest.n_cells == sum(s["rows"] for s in m["shards"])
    assert [s["file"] for s in m["shards"]] == [f"shards/{Path(p).name}" for p in ds.shard_paths]
    assert (
        m["producer"]["checkpoint"] == str(cks["conventional"]) and m["producer"]["splits"] == "all"
    )
    rec = json.loads(
        pq.read_schema(predicted["out"] / m["shards"][0]["file"]).metadata[PROVENANCE_KEY]
    )
    assert rec["run_key"] == m["run_key"] and rec["input"]["file"] == ds.shard_paths[0]
    assert check_infer(predicted["cfg"]).pending == []  # the same run again: nothing to do


@pytest.mark.ray
def test_rerun_into_a_folder_of_another_run_refuses_in_one_line(
    predicted, cks, tiny_data, tmp_path, capsys
):
    data, out, ck = predicted["data"], tmp_path / "pred", cks["conventional"]
    shutil.copytree(predicted["out"], out)
    before = {f: f.stat().st_mtime_ns for f in (out / "shards").iterdir()}
    base = ["infer", "--checkpoint", str(ck), "--out", str(out), "--set", "ray.progress=false"]
    # another data set (same shard names), other splits, another checkpoint
    cases = [
        (["--data", str(tiny_data)], "dataset was"),
        (["--data", str(data), "--splits", "unseen"], "splits was 'all', now ['unseen']"),
        (["--data", str(data), "--checkpoint", str(cks["adversarial"])], "checkpoint was"),
    ]
    for extra, why in cases:
        rc, err = _cli(capsys, *base, *extra)
        assert rc == 2, err[-2000:]
        _one_line(err, f"infer.out {out} holds predictions of a different run", why, "delete")
    # an input shard rewritten since its predictions were made
    shard = Path(open_dataset(data).shard_paths[3])
    st = shard.stat()
    try:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        rc, err = _cli(capsys, *base, "--data", str(data))
        assert rc == 2
        _one_line(err, f"input shard {shard} changed")
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    # a prediction shard with no input shard of that name (another, larger data set's) is not counted
    shutil.copy(out / "shards" / "part-00000.parquet", out / "shards" / "part-00099.parquet")
    rc, err = _cli(capsys, *base, "--data", str(data))
    assert rc == 2
    _one_line(err, "part-00099.parquet", "no input shard of that name")
    assert {f: f.stat().st_mtime_ns for f in before} == before  # nothing was rewritten


def _evaluate(capsys, pred: Path, tmp_path: Path) -> tuple[int, str]:
    return _cli(
        capsys, "evaluate", "--predictions", str(pred), "--set", f"eval.out={tmp_path / 'ev'}"
    )


@pytest.mark.ray
def test_evaluate_refuses_missing_changed_or_duplicated_rows(predicted, tmp_path, capsys):
    src = predicted["out"]
    rc, err = _evaluate(capsys, src, tmp_path)
    assert rc == 0, err
    # a deleted prediction shard
    p1 = _copy(src, tmp_path / "p1")
    (p1 / "shards" / "part-00001.parquet").unlink()
    rc, err = _evaluate(capsys, p1, tmp_path)
    assert rc == 2
    _one_line(err, "part-00001.parquet", "missing", "raycell infer")
    # a truncated prediction shard
    p2 = _copy(src, tmp_path / "p2")
    f = p2 / "shards" / "part-00002.parquet"
    f.write_bytes(f.read_bytes()[:3000])
    rc, err = _evaluate(capsys, p2, tmp_path)
    assert rc == 2
    _one_line(err, f"cannot read prediction shard {f}")
    # duplicated cell ids (as a data set with duplicate ids gives): consistent manifest, same row counts
    p3 = _copy(src, tmp_path / "p3")
    f = p3 / "shards" / "part-00001.parquet"
    t, t0 = pq.read_table(f), pq.read_table(p3 / "shards" / "part-00000.parquet")
    ids = t.column(K.CELL_ID).to_pylist()
    ids[:90] = t0.column(K.CELL_ID).to_pylist()[:90]
    pq.write_table(t.set_column(t.schema.get_field_index(K.CELL_ID), K.CELL_ID, pa.array(ids)), f)
    rc, err = _evaluate(capsys, p3, tmp_path)
    assert rc == 2
    _one_line(err, "90 duplicated cell_id(s)")
    # a stray shard that predictions.json does not list
    p4 = _copy(src, tmp_path / "p4")
    shutil.copy(p4 / "shards" / "part-00000.parquet", p4 / "shards" / "part-00007.parquet")
    rc, err = _evaluate(capsys, p4, tmp_path)
    assert rc == 2
    _one_line(err, "part-00007.parquet", "does not list")


def test_infer_errors_are_one_line_before_ray_starts(cks, tiny_data, tmp_path, capsys):
    base = [
        "infer",
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "pred"),
        "--set",
        "ray.progress=false",
    ]
    ck = _copy(cks["conventional"], tmp_path / "ck")
    (ck / "model.pt").write_bytes((ck / "model.pt").read_bytes()[:1000])
    rc, err = _cli(capsys, *base, "--checkpoint", str(ck))
    assert rc == 2
    _one_line(err, str(ck / "model.pt"))
    rc, err = _cli(
        capsys,
        *base,
        "--checkpoint",
        str(cks["mixedeffects"]),
        "--set",
        f"infer.z_source={tmp_path / 'nowhere'}",
    )
    assert rc == 2
    _one_line(err, "infer.z_source", str(tmp_path / "nowhere"))
    ck64 = untrained_checkpoint(tiny_data, tmp_path / "ck64", shape=(2, 64, 64))
    rc, err = _cli(capsys, *base, "--checkpoint", str(ck64))
    assert rc == 2
    _one_line(err, "crop size 32x32 vs 64x64")
    # a misspelt split: refused in a fresh process before Ray starts (no 0-row output that no re-run redoes)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "raycell",
            *base,
            "--checkpoint",
            str(cks["conventional"]),
            "--splits",
            "test,tset",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 2
    _one_line(r.stderr, "infer.splits", "'tset'")
    assert not (tmp_path / "pred").exists()


@pytest.mark.ray
def test_image_bytes_disagreeing_with_the_manifest_inside_ray_is_one_line(
    cks, tiny_data, ray_local, tmp_path, capsys
):
    data = _copy(tiny_data, tmp_path / "d")
    p = open_dataset(data).shard_paths[1]
    t = pq.read_table(p)
    imgs = t.column(K.IMAGE).to_pylist()
    imgs[5] = imgs[5][:-10]
    pq.write_table(
        t.set_column(t.schema.get_field_index(K.IMAGE), K.IMAGE, pa.array(imgs, pa.binary())), p
    )
    cell = t.column(K.CELL_ID)[5].as_py()
    rc, err = _cli(
        capsys,
        "infer",
        "--data",
        str(data),
        "--checkpoint",
        str(cks["conventional"]),
        "--out",
        str(tmp_path / "pred"),
        "--set",
        "ray.progress=false",
    )
    assert rc == 2
    _one_line(err, p, f"cell_id={cell}", "2038 image bytes")


@pytest.mark.ray
def test_a_shard_without_rows_of_the_requested_split_is_skipped_for_mixed_effects(
    cks, tiny_data, ray_local, tmp_path
):
    from raycell.formats.predictions import read_predictions
    from raycell.infer.batch import predict

    data = _copy(tiny_data, tmp_path / "d")
    ds = open_dataset(data)
    empty = ds.shard_paths[2]

    def no_test_rows(t, path):
        if path != empty:
            return t
        split = pa.array(["train" if s == K.TEST else s for s in t.column(K.SPLIT).to_pylist()])
        return t.set_column(t.schema.get_field_index(K.SPLIT), K.SPLIT, split)

    counts = rewrite_shards(ds, no_test_rows, {}).counts_per_split
    m = predict(
        _cfg(
            data,
            tmp_path / "pred",
            cks["mixedeffects"],
            "infer.splits=[test]",
            "data.eval_batch_size=32",
        )
    )
    t = read_predictions(tmp_path / "pred")
    assert m["n_rows"] == t.num_rows == counts[K.TEST]
    assert set(t.column(K.SPLIT).to_pylist()) == {K.TEST} and K.LATENT_RE in t.column_names
    assert [s["rows"] for s in m["shards"]][2] == 0


def test_z_models_refuse_valbatch_cells_without_an_inferred_z(tiny_valbatch_data):
    """Held-out validation batches were never trained on: a Z model has no Z column for them."""
    from raycell import constants as K
    from raycell.formats.categories import CategoryMap
    from raycell.formats.checkpoint import CheckpointMeta
    from raycell.formats.shards import open_dataset
    from raycell.formats.spec import DataSpec
    from raycell.infer.batch import _check_design_matrix
    from raycell.infer.predictor import MissingDesignMatrixError

    ds = open_dataset(tiny_valbatch_data)
    train_batches = sorted(
        set(ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH).to_pylist())
    )
    held = ds.manifest.split_params["val_batches"]
    meta = CheckpointMeta(
        model_type="mixedeffects",
        model_args={},
        data_spec=DataSpec.from_dataset(ds),
        labels=CategoryMap(K.LABEL, tuple(ds.manifest.label_vocab)),
        batches=CategoryMap(K.BATCH, tuple(train_batches)),
        uses_z=True,
    )
    cfg = load_config(None, [f"data.path={tiny_valbatch_data}", "infer.splits=[valbatch]"])
    import re

    with pytest.raises(
        MissingDesignMatrixError, match=re.escape(f"batch(es) {held!r} are not among its training")
    ):
        _check_design_matrix(cfg, ds, meta)
    cfg = load_config(None, [f"data.path={tiny_valbatch_data}", "infer.splits=[val, test]"])
    _check_design_matrix(cfg, ds, meta)  # seen batches only: fine
