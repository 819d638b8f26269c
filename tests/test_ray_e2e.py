"""End to end through a local Ray: Ray Data -> Ray Train (1 and 2 workers) -> resume -> inference -> evaluate.

The CLI's help and its errors before Ray starts (in a fresh process) need no Ray and are not marked `ray`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, tiny_overrides

from raycell import constants as K
from raycell.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_train_writes_run_folder(trained_run):
    run = Path(trained_run["run_dir"])
    assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file()
    hist = trained_run["history"]
    assert [h["epoch"] for h in hist] == [0, 1]
    assert 0.0 <= trained_run["metrics"]["val_auroc"] <= 1.0
    meta = json.loads((Path(trained_run["checkpoint"]) / "meta.json").read_text())
    assert meta["epoch"] == 1 and meta["model_type"] == "conventional"
    assert (
        meta["batches"]["values"] == sorted(meta["batches"]["values"])
        and len(meta["batches"]["values"]) == 6
    )


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_and_resume(tiny_data, ray_local, tmp_path):
    from raycell.train.trainer import train

    over = tiny_overrides(tiny_data, tmp_path, epochs=1) + ["scaling.num_workers=2", "name=two"]
    first = train(load_config(None, over))
    assert first["metrics"]["epoch"] == 0
    again = train(
        load_config(
            None,
            tiny_overrides(tiny_data, tmp_path, epochs=2)
            + ["scaling.num_workers=2", f"train.resume={first['run_dir']}"],
        )
    )
    assert again["run_dir"] == first["run_dir"]
    assert again["metrics"]["epoch"] == 1  # continued at epoch 1, did not start over


@pytest.mark.ray
def test_inference_is_idempotent(trained_run, tiny_data, ray_local, tmp_path):
    from raycell.formats.predictions import read_predictions
    from raycell.infer.batch import predict

    cfg = load_config(
        None,
        tiny_overrides(tiny_data, tmp_path)
        + [f"infer.checkpoint={trained_run['run_dir']}", f"infer.out={tmp_path / 'pred'}"],
    )
    m1 = predict(cfg)
    t1 = read_predictions(tmp_path / "pred")
    assert t1.num_rows == TINY["n_cells"] == m1["n_rows"]
    ids = t1.column(K.CELL_ID).to_pylist()
    assert len(set(ids)) == len(ids)
    assert t1.schema.field(K.LATENT).type.list_size == 8
    for col in (K.PROB, K.PRED, K.RECON_MSE, K.RECON_SSIM, K.BATCH, K.LABEL, K.SPLIT):
        assert col in t1.column_names
    mtimes = {f: f.stat().st_mtime_ns for f in (tmp_path / "pred" / "shards").glob("*.parquet")}
    # run again: nothing to do, same rows; remove one shard: only it is redone
    predict(cfg)
    assert {f: f.stat().st_mtime_ns for f in mtimes} == mtimes
    victim = sorted(mtimes)[1]
    victim.unlink()
    predict(cfg)
    t2 = read_predictions(tmp_path / "pred")
    assert sorted(t2.column(K.CELL_ID).to_pylist()) == sorted(ids)
    assert victim.is_file() and not list((tmp_path / "pred").glob(".staging-*"))
    # a split filter keeps only those rows
    cfg_s = load_config(
        None,
        tiny_overrides(tiny_data, tmp_path)
        + [
            f"infer.checkpoint={trained_run['run_dir']}",
            f"infer.out={tmp_path / 'pred_unseen'}",
            "infer.splits=[unseen]",
        ],
    )
    predict(cfg_s)
    tu = read_predictions(tmp_path / "pred_unseen")
    assert set(tu.column(K.SPLIT).to_pylist()) == {K.UNSEEN}


@pytest.mark.ray
def test_cli_end_to_end(ray_local, tmp_path, capsys):
    from raycell.__main__ import run

    data, runs = tmp_path / "d", tmp_path / "runs"
    smoke = [
        "--config",
        str(ROOT / "configs" / "smoke" / "cpu.yaml"),
    ]  # every smoke config is a test
    run(["synth", "--out", str(data), *smoke])
    run(["split", "--data", str(data), *smoke])
    common = smoke
    res = run(["train", "--data", str(data), "--epochs", "1", "--runs-dir", str(runs), *common])
    # the terminal shows raycell's lines, one per epoch, not Ray's: its logs are named in the run folder
    shown = capsys.readouterr()
    assert "[raycell] epoch 1/1  train_loss" in shown.out
    assert (
        "Execution plan" not in shown.out + shown.err
        and "RayTrainWorker" not in shown.out + shown.err
    )
    assert Path((Path(res["run_dir"]) / "ray_logs.txt").read_text().splitlines()[-1]).is_dir()
    run(["infer", "--checkpoint", res["run_dir"], "--data", str(data), *common])
    ev = run(["evaluate", "--predictions", str(Path(res["run_dir"]) / "predictions")])
    out = capsys.readouterr().out
    assert "auroc" in out and "unseen" in out
    metrics = json.loads((Path(ev["out"]) / "metrics.json").read_text())
    assert {"test", "unseen"} <= set(metrics["splits"])
    for split in ("test", "unseen"):
        r = metrics["splits"][split]
        assert r["ci_low" if "ci_low" in r else "auroc_ci_low"] <= r["auroc"] <= r["auroc_ci_high"]
        assert 0 < r["mse"] < 1 and -1 <= r["ssim"] <= 1 and r["db"] > 0 and r["ch"] > 0
        assert 0 <= r["batch_probe_acc"] <= 1
    assert (Path(ev["out"]) / "metrics.csv").is_file() and (
        Path(ev["out"]) / "latent_pca.png"
    ).is_file()


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "raycell", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def test_cli_help_and_one_line_errors(tmp_path):
    r = _cli("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "infer" in r.stdout
    r = _cli("train", "--help")
    assert r.returncode == 0 and "--resume" in r.stdout
    r = _cli("split", "--set", "split.groupby=well")
    assert r.returncode == 2 and "unknown config key 'split.groupby'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    r = _cli("split", "--data", str(tmp_path / "empty"))
    assert r.returncode == 2 and "has no dataset.json" in r.stderr and "Traceback" not in r.stderr
    r = _cli("evaluate")
    assert r.returncode == 2 and "eval.predictions" in r.stderr


@pytest.mark.parametrize("job", sorted(p.stem for p in (ROOT / "jobs").glob("*.py")))
def test_job_entry_points_parse(job):
    """Each jobs/ script is the CLI verb of the same name (what `ray job submit ... python
    jobs/X.py` runs).
    """
    r = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "--config" in r.stdout and "--set" in r.stdout
