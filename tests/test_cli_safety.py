"""Resume keeps a run's record, bad input fails in one line before
Ray starts.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
from conftest import tiny_overrides

from raycell import constants as K
from raycell.__main__ import main
from raycell.config import ConfigError, load_config, save_config


@pytest.fixture
def no_ray(monkeypatch):
    """Make starting Ray a test failure: these errors must come before it."""
    import ray

    import raycell.utils.ray_utils as ru

    def refuse(*a, **k):
        raise AssertionError("Ray was started before the bad input was reported")

    monkeypatch.setattr(ru, "init_ray", refuse)
    was = ray.is_initialized()
    yield
    if not was:
        assert not ray.is_initialized()


def one_error_line(capsys) -> str:
    """The single `raycell: error:` line on stderr (no traceback, nothing else)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("raycell: error: "), err
    return lines[0]


def _set(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _fake_run(tiny_data: Path, runs: Path) -> Path:
    """A run folder as `train` leaves it (config.yaml), without training."""
    run = runs / "raycell-conventional-20260101-000000"
    run.mkdir(parents=True)
    cfg = load_config(None, tiny_overrides(tiny_data, runs, epochs=1))
    cfg.data.path = str(Path(cfg.data.path).absolute())
    save_config(cfg, run / "config.yaml")
    return run


# --- config errors: closing quotes, --set named, invalid numbers --------------------------------------


def test_error_message_keeps_its_closing_quote(capsys):
    assert main(["config", "--set", "train.epochs=three"]) == 2
    assert one_error_line(capsys).endswith("got 'three'")


def test_set_error_names_the_override_not_the_file(tmp_path, capsys):
    f = tmp_path / "my.yaml"
    f.write_text("train:\n  epochs: 2\n")
    assert main(["config", "--config", str(f), "--set", "train.lr=abc"]) == 2
    line = one_error_line(capsys)
    assert "--set train.lr=abc" in line and str(f) not in line
    # a bad value in the file still names the file
    f.write_text("train:\n  lr: abc\n")
    assert main(["config", "--config", str(f), "--set", "train.epochs=3"]) == 2
    line = one_error_line(capsys)
    assert str(f) in line and "--set" not in line


def test_flag_error_names_the_flag_the_user_typed(no_ray, capsys):
    assert main(["train", "--epochs", "0"]) == 2
    line = one_error_line(capsys)
    assert line == "raycell: error: --epochs 0: train.epochs must be >= 1, got 0"
    assert main(["infer", "--gpus", "-1", "--set", "infer.num_actors=2"]) == 2
    assert one_error_line(capsys).startswith(
        "raycell: error: --gpus -1: infer.num_gpus must be >= 0"
    )
    assert main(["split", "--set", "split.unseen=3"]) == 2  # a --set value is still named as typed
    assert "--set split.unseen=3: " in one_error_line(capsys)


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=0",
        "train.lr=-1e-3",
        "train.lr=.nan",
        "data.eval_batch_size=0",
        "train.weight_decay=-0.1",
        "infer.cpus_per_actor=0",
        "loss.cls=-1",
    ],
)
def test_invalid_numbers_are_refused(override, capsys):
    assert main(["config", "--set", override]) == 2
    key = override.split("=")[0]
    assert f"{key} must be" in one_error_line(capsys)
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_experiment_seeds_must_be_integers(no_ray, capsys):
    assert main(["experiment", "medl", "--seeds", "a,b"]) == 2
    line = one_error_line(capsys)
    assert "--seeds" in line and "'a'" in line


# --- train: before Ray, before a run folder ---------------------------------------------------------


def test_unknown_model_type_fails_before_ray_and_run_folder(no_ray, tiny_data, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert (
        main(["train", "--data", str(tiny_data), "--model", "nope", "--runs-dir", str(runs)]) == 2
    )
    line = one_error_line(capsys)
    assert "model.type" in line and "'nope'" in line and "conventional" in line
    assert not runs.exists()  # and no Ray start (no_ray)


def test_resume_of_a_missing_run_says_so(no_ray, tmp_path, capsys):
    missing = tmp_path / "runs" / "raycell-conventional-nope"
    assert main(["train", "--resume", str(missing)]) == 2
    line = one_error_line(capsys)
    assert "run folder not found" in line and str(missing) in line and "data set" not in line


def test_resume_with_a_conflicting_model_leaves_the_record_alone(
    no_ray, tiny_data, tmp_path, capsys, monkeypatch
):
    run = _fake_run(tiny_data, tmp_path / "runs")
    record = (run / "config.yaml").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert (
        main(["train", "--resume", str(run), "--model", "adversarial", "--set", "loss.cls=0.5"])
        == 2
    )
    line = one_error_line(capsys)
    assert "model.type" in line and "'adversarial'" in line and "loss.cls" in line
    assert (run / "config.yaml").read_bytes() == record
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name]
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_resume_takes_the_run_config_and_allows_harmless_changes(tiny_data, tmp_path, monkeypatch):
    from raycell.config import explicit_keys
    from raycell.train.trainer import resume_config

    run = _fake_run(tiny_data, tmp_path / "runs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the run's relative defaults must not matter
    given = [f"train.resume={run}", "train.epochs=5", "scaling.num_workers=2", "name=other"]
    cfg = resume_config(load_config(None, given), explicit_keys(None, given))
    assert cfg.data.path == str(tiny_data.absolute()) and cfg.model.preset == "tiny"
    assert cfg.train.epochs == 5 and cfg.scaling.num_workers == 2 and cfg.name == "raycell"
    assert cfg.train.resume == str(run)
    assert cfg.ray.progress is True  # Ray settings are this invocation's (the run recorded false)


# --- split --------------------------------------------------------------------------------------------


def test_split_with_every_batch_unseen_is_refused(tiny_data, tmp_path, capsys):
    from raycell.formats.shards import open_dataset

    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    batches = open_dataset(data).manifest.batch_vocab
    assert main(["split", "--data", str(data), "--unseen", ",".join(batches)]) == 2
    line = one_error_line(capsys)
    assert "unseen" in line and "every batch" in line


def test_split_refuses_duplicate_cell_ids(tiny_data, tmp_path, capsys):
    from raycell.formats.shards import open_dataset, rewrite_shards

    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    ds = open_dataset(data)
    first = ds.shard_paths[0]

    def dup(t: pa.Table, where) -> pa.Table:
        if where != first:
            return t
        ids = t.column(K.CELL_ID).to_pylist()
        ids[1:4] = [ids[0]] * 3  # one id on 4 rows
        return t.set_column(t.column_names.index(K.CELL_ID), K.CELL_ID, pa.array(ids, pa.string()))

    rewrite_shards(ds, dup, {})
    victim = open_dataset(data).read_table([K.CELL_ID]).column(K.CELL_ID)[0].as_py()
    assert main(["split", "--data", str(data)]) == 2
    line = one_error_line(capsys)
    assert repr(victim) in line and "4 times" in line


# --- Ray address: bounded wait ---------------------------------------------------------------------------


def test_address_with_nothing_listening_fails_in_bounded_time(tiny_data, tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import raycell

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the raycell under test, whatever the working directory
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(raycell.__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "raycell",
            "train",
            "--data",
            str(tiny_data),
            "--address",
            f"127.0.0.1:{port}",
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=600,  # Ray's own connect retries forever: a hang ends here
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("raycell: error:")]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "Traceback" not in r.stderr
    # raycell's own probe answered (not Ray after its retries): one try, no wait
    assert "cannot reach Ray at" in lines[0] and "waited up to 5 s per step" in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


def test_address_that_accepts_but_never_answers_fails_in_bounded_time():
    from raycell.utils.ray_utils import check_reachable

    with socket.socket() as srv:  # listens (the kernel accepts connections) but never speaks gRPC
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        addr = f"127.0.0.1:{srv.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=f"{addr}.*timed out; waited up to 1 s per step"):
            check_reachable(addr, timeout_s=1)
        assert time.monotonic() - t0 < 120  # without the timeout it would wait forever


# --- resume's checkpoint copy -------------------------------------------------------------------------


def _ray_context(monkeypatch, ck):
    """A RayTrainContext outside a Ray Train worker: get_context/get_checkpoint/report faked."""
    import ray.train
    import ray.train.torch
    import torch

    from raycell.train.context import RayTrainContext

    monkeypatch.setattr(
        ray.train,
        "get_context",
        lambda: SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1),
    )
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ck)
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: None)
    return RayTrainContext(
        collate=None, batch_size=2, eval_batch_size=2, shuffle_buffer=0, prefetch_batches=1
    )


def _checkpoint(tmp_path, local: bool):
    import pyarrow.fs

    src = tmp_path / "checkpoint_000000"
    src.mkdir()
    (src / "meta.json").write_text("{}")
    fs = (
        pyarrow.fs.LocalFileSystem()
        if local
        else pyarrow.fs.SubTreeFileSystem("/", pyarrow.fs.LocalFileSystem())
    )
    return SimpleNamespace(
        path=str(src),
        filesystem=fs,
        to_directory=lambda d: shutil.copytree(src, d, dirs_exist_ok=True),
    )


def test_resume_reads_a_local_checkpoint_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    ctx = _ray_context(monkeypatch, _checkpoint(tmp_path, local=True))
    assert ctx.resume_from() == tmp_path / "checkpoint_000000"
    assert not list((tmp_path / "tmp").iterdir())  # no copy made


def test_resume_copy_of_a_remote_checkpoint_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    ctx = _ray_context(monkeypatch, _checkpoint(tmp_path, local=False))
    copy = ctx.resume_from()
    assert copy != tmp_path / "checkpoint_000000" and (copy / "meta.json").is_file()
    ctx.report({"epoch": 0}, None)  # the loop has loaded the checkpoint by its first report
    assert not copy.exists() and not list((tmp_path / "tmp").iterdir())


# --- a real resume through Ray, from another working directory -------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_resume_from_another_directory_with_only_the_run_folder(
    ray_local, tiny_data, tmp_path, monkeypatch, capsys
):
    from raycell.__main__ import run

    first = run(["train", *_set(tiny_overrides(tiny_data, tmp_path / "runs", epochs=1))])
    run_dir = Path(first["run_dir"])
    assert first["metrics"]["epoch"] == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = set(Path(tempfile.gettempdir()).glob("raycell-resume-*"))
    assert main(["train", "--resume", str(run_dir), "--epochs", "2"]) == 0, capsys.readouterr().err
    res = load_config(run_dir / "config.yaml")
    assert res.train.epochs == 2 and res.model.preset == "tiny"
    import json

    assert json.loads((run_dir / "metrics.json").read_text())["metrics"]["epoch"] == 1  # continued
    assert set(Path(tempfile.gettempdir()).glob("raycell-resume-*")) == before
    assert not list(elsewhere.iterdir())


def test_every_verb_is_wired_once():
    """Each subcommand the parser offers has one `COMMANDS` entry, and every entry is a verb."""
    import argparse

    from raycell.__main__ import COMMANDS
    from raycell.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    ray_verbs = {v for v, c in COMMANDS.items() if c.needs_ray is True}
    assert ray_verbs == {"ingest", "train", "tune", "infer", "embed", "demo", "experiment"}
    assert callable(COMMANDS["profile"].needs_ray)  # by the input's size (profile.engine)
    assert not any(c.needs_ray for c in COMMANDS.values() if not c.uses_config)
