"""One output, one writer: a second run into an output being written refuses in one line.

The first writer is another live process holding the lock (a subprocess), as a second terminal
would be; none of these start Ray (the refusal comes first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest

from raycell.__main__ import main
from raycell.utils.locks import BusyError, lock_path, read_lock, writing
from raycell.utils.outputs import EMBEDDINGS, PREDICTIONS, mark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    import raycell.utils.ray_utils as ru

    def _fail(*_a, **_k):
        raise AssertionError("Ray was started: the busy output should have been refused before")

    monkeypatch.setattr(ru, "init_ray", _fail)


@contextmanager
def held_by_another_process(out: Path):
    """A live process that holds the lock of `out` until the block ends; yields its pid."""
    code = textwrap.dedent(f"""
        import sys, time
        from raycell.utils.locks import writing
        with writing({str(out)!r}):
            print("ready", flush=True)
            sys.stdin.read()
    """)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert p.stdout.readline().strip() == "ready"
        yield p.pid
    finally:
        p.stdin.close()
        p.wait(timeout=30)


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raycell: error: "), err
    return err[0]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_records_who_writes_and_is_removed_after(tmp_path):
    out = tmp_path / "out"
    with writing(out) as path:
        info = read_lock(path)
        assert info.pid == os.getpid() and info.host and info.started
        with writing(out):  # re-entrant in one process (a verb calling another)
            pass
        assert path.exists()
    assert not path.exists() and not list(tmp_path.iterdir())


def test_second_writer_refuses_while_the_first_lives(tmp_path):
    out = tmp_path / "out"
    with held_by_another_process(out) as pid:
        with pytest.raises(BusyError) as ei:
            with writing(out, "ingest.out"):
                pass
        msg = str(ei.value)
        assert f"ingest.out {out} is being written by pid {pid} since " in msg
        assert "\n" not in msg
    with writing(out):  # the first run ended: free again
        pass


def test_only_a_dead_writers_lock_is_a_leftover(tmp_path):
    out = tmp_path / "out"
    path = lock_path(out)
    path.write_text(
        json.dumps(
            {
                "pid": _dead_pid(),
                "host": os.uname().nodename,
                "started": "2026-01-01T00:00:00",
                "command": "raycell ingest",
            }
        )
    )
    with writing(out):
        assert read_lock(path).pid == os.getpid()
    # a live pid whose start time differs from the record: the pid was recycled, the run is gone
    path.write_text(
        json.dumps(
            {
                "pid": os.getppid(),
                "host": os.uname().nodename,
                "started": "2026-01-01T00:00:00",
                "command": "raycell ingest",
                "proc_start": "1",
            }
        )
    )
    with writing(out):
        assert read_lock(path).pid == os.getpid()
    # another host's lock is never judged from here: refused, naming the file to delete
    path.write_text(
        json.dumps(
            {
                "pid": 1,
                "host": "elsewhere",
                "started": "2026-01-01T00:00:00",
                "command": "raycell ingest",
            }
        )
    )
    with pytest.raises(BusyError, match=f"on host elsewhere .*delete {path}"):
        with writing(out):
            pass


def test_two_ingests_into_one_out(tmp_path, capsys):
    images = tmp_path / "raw"
    images.mkdir()
    (images / "A01_s0_nucleus.tif").write_bytes(b"II*\x00" + b"\x00" * 100)
    out = tmp_path / "data"
    with held_by_another_process(out) as pid:
        assert main(["ingest", "--input", str(images), "--out", str(out)]) == 2
        assert f"is being written by pid {pid}" in _err_line(capsys)
    assert not out.exists()


def test_two_resumes_of_one_run(tiny_data, tmp_path, capsys):
    from conftest import tiny_overrides

    from raycell.config import load_config, save_config

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path / "runs"))
    save_config(cfg, run / "config.yaml")
    (run / "history.jsonl").write_text("")
    before = sorted(p.name for p in run.iterdir())
    with held_by_another_process(run) as pid:
        assert main(["train", "--resume", str(run)]) == 2
        line = _err_line(capsys)
        assert f"train.resume run folder {run} is being written by pid {pid}" in line
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize("verb", ["infer", "embed"])
def test_second_infer_refuses_and_keeps_the_first_runs_staging(verb, tiny_data, tmp_path, capsys):
    ck = _checkpoint(tiny_data, tmp_path)
    out = tmp_path / "preds"
    (out / "shards").mkdir(parents=True)
    mark(out, EMBEDDINGS if verb == "embed" else PREDICTIONS)
    live = out / ".staging-0123abcd"  # the first run's round being written
    live.mkdir()
    (live / "part.parquet").write_bytes(b"half")
    with held_by_another_process(out) as pid:
        argv = [verb, "--checkpoint", str(ck), "--data", str(tiny_data), "--out", str(out)]
        assert main(argv) == 2
        assert f"is being written by pid {pid}" in _err_line(capsys)
    assert (live / "part.parquet").read_bytes() == b"half"


def test_two_exports_into_one_file(tmp_path, capsys):
    from test_output_safety import _embeddings

    emb = _embeddings(tmp_path / "emb")
    out = tmp_path / "cells.csv"
    with held_by_another_process(out) as pid:
        assert main(["export", "--embeddings", str(emb), "--out", str(out), "--format", "csv"]) == 2
        assert f"is being written by pid {pid}" in _err_line(capsys)
    assert not out.exists()


def _checkpoint(tiny_data: Path, tmp_path: Path) -> Path:
    """An untrained checkpoint for the tiny data set."""
    import torch

    from raycell import constants as K
    from raycell.formats.categories import CategoryMap
    from raycell.formats.checkpoint import save_checkpoint
    from raycell.formats.shards import open_dataset
    from raycell.formats.spec import DataSpec
    from raycell.models import create_model

    ds = open_dataset(tiny_data)
    spec = DataSpec.from_dataset(ds)
    torch.manual_seed(0)
    seen = tuple(f"batch{i:02d}" for i in range(6))
    model = create_model(
        "conventional",
        in_channels=spec.shape[0],
        n_classes=2,
        n_batches=len(seen),
        preset="tiny",
        image_size=spec.shape[1],
    )
    labels = CategoryMap(K.LABEL, tuple(ds.manifest.label_vocab))
    return save_checkpoint(
        tmp_path / "run" / "checkpoint",
        model,
        None,
        epoch=0,
        spec=spec,
        labels=labels,
        batches=CategoryMap(K.BATCH, seen),
        config={},
        metrics={},
    )


def test_split_of_a_data_set_being_written_refuses(tiny_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = (data / "dataset.json").read_bytes()
    with held_by_another_process(data) as pid:
        assert main(["split", "--data", str(data)]) == 2
        assert f"is being written by pid {pid}" in _err_line(capsys)
    assert (data / "dataset.json").read_bytes() == manifest


def test_a_missing_input_creates_no_folder_for_a_lock(tmp_path, capsys):
    assert main(["split", "--data", str(tmp_path / "no" / "data")]) == 2
    assert "not found" in _err_line(capsys)
    assert not (tmp_path / "no").exists()
