"""When the machine is the problem: a full or read-only disk, Ctrl-C, SIGTERM.

Each gives one line and a documented exit status (2 for the disk, 130 / 143 for the signals), leaves
nothing half-written that a later run would trust, and a re-run after the condition clears
completes with every cell exactly once. Disk faults are injected into the writer (a test cannot
fill a real disk or remount one read-only); the signals are real, sent to a `raycell` subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raycell import __main__ as cli
from raycell.__main__ import main
from raycell.errors import environment_problem

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ["--set", "synth.crop_size=32", "--set", "synth.rows_per_shard=500"]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raycell: "), err
    return err[0]


def _cells_once(out: Path, n: int) -> None:
    """The data set at `out` is complete: n rows, every cell id once, the manifest agreeing."""
    m = json.loads((out / "dataset.json").read_text())
    ids = []
    for s in m["shards"]:
        ids += pq.read_table(out / s["file"], columns=["cell_id"]).column("cell_id").to_pylist()
    assert len(ids) == n == len(set(ids))
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        Path(s["file"]).name for s in m["shards"]
    )


# ---- a full or read-only disk ---------------------------------------------------------------


def test_disk_full_during_synth_is_one_line_and_a_rerun_completes(tmp_path, capsys, monkeypatch):
    import raycell.formats.shards as shards

    real, calls = shards.atomic_write_parquet, []

    def filling_up(table, path, *a, **k):
        calls.append(path)
        if len(calls) == 3:  # the disk fills up while the third shard is written
            Path(path).parent.joinpath(".half.tmp").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(table, path, *a, **k)

    monkeypatch.setattr(shards, "atomic_write_parquet", filling_up)
    out = tmp_path / "synth"
    argv = ["synth", "--out", str(out), "--set", "synth.n_cells=2000", *SYNTH]
    assert main(argv) == 2
    line = _err_line(capsys)
    assert line.startswith("raycell: error: no space left on the device at ")
    assert "free space" in line
    assert str(tmp_path) in line
    assert not out.exists()  # nothing at the output a later run (or `train`) would read
    monkeypatch.setattr(shards, "atomic_write_parquet", real)  # space was freed
    assert main(argv) == 0
    _cells_once(out, 2000)
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]  # the failed run's staging is gone


def test_synth_that_cannot_fit_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, 9 << 20, 1 << 20))
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--set", "synth.n_cells=20000", *SYNTH]) == 2
    line = _err_line(capsys)
    assert f"synth.out {out}: needs about 20 MiB, only 1 MiB free" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "code,words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")]
)
def test_read_only_or_forbidden_export_is_one_line(tmp_path, capsys, monkeypatch, code, words):
    import anndata
    from test_output_safety import _embeddings

    emb = _embeddings(tmp_path / "emb")
    out = tmp_path / "cells.h5ad"

    def refused(self, path, *a, **k):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", refused)
    assert main(["export", "--embeddings", str(emb), "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert words in line and str(tmp_path) in line and "--out" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]  # no file, no temporary


def test_library_and_ray_wrapped_disk_errors_are_recognised():
    h5 = OSError(
        "Can't write data (file write failed: time = Mon, filename = "
        "'/data/x/cells.h5ad', file descriptor = 5, errno = 28, error message = 'No "
        "space left on device')"
    )
    assert "no space left on the device at /data/x" in str(environment_problem(h5))

    class RayTaskError(RuntimeError):
        pass

    remote = RayTaskError(
        "ray::map() (pid=1)\n  File ...\nOSError: [Errno 30] Read-only file "
        "system: '/mnt/ro/preds/shards/part-00000.parquet'"
    )
    assert "read-only file system at /mnt/ro/preds/shards" in str(environment_problem(remote))
    assert environment_problem(ValueError("a bug")) is None


OOM_TEXT = (
    "Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.0.0.2, "
    "ID: 3f2a) was 22.51GB used / 23.47GB limit (0.959092)\nRay killed 1 worker(s) based on the "
    "killing policy"
)


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_worker_killed_for_memory_is_one_line(monkeypatch, capsys, wrapped):
    """Ray's OutOfMemoryError, raised as itself or as text inside a Train/Tune error."""
    from ray.exceptions import OutOfMemoryError

    exc = (
        RuntimeError(f"Training failed.\nray.exceptions.OutOfMemoryError: {OOM_TEXT}")
        if wrapped
        else OutOfMemoryError(OOM_TEXT)
    )

    def boom(argv):
        raise exc

    monkeypatch.setattr(cli, "run", boom)
    assert main(["train"]) == 2
    line = _err_line(capsys)
    assert "ran out of memory (22.51 GB of 23.47 GB in use)" in line
    assert "data.batch_size" in line and "re-run" in line


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(cfg):
        raise ValueError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "report", cli.Command(lambda cfg, args: bug(cfg)))
    with pytest.raises(ValueError, match="a bug"):
        main(["report", "somewhere"])


# ---- Ctrl-C and SIGTERM -----------------------------------------------------------------------


@pytest.mark.parametrize("exc,status", [(KeyboardInterrupt, 130), ("terminated", 143)])
def test_interrupt_is_one_line_and_its_exit_status(capsys, monkeypatch, exc, status):
    from raycell.utils.interrupts import Terminated

    def interrupted(cfg):
        raise Terminated() if exc == "terminated" else exc()

    monkeypatch.setitem(
        cli.COMMANDS, "embed", cli.Command(lambda cfg, args: interrupted(cfg), needs_ray=True)
    )
    monkeypatch.setattr(cli, "preflight", lambda args, cfg: cfg)
    monkeypatch.setattr("raycell.utils.ray_utils.init_ray", lambda *a, **k: None)
    monkeypatch.setattr("raycell.utils.ray_utils.keep_native_logs_off_terminal", lambda: None)
    assert main(["embed", "--checkpoint", "x"]) == status
    assert (
        _err_line(capsys) == "raycell: interrupted; re-run the same command to resume "
        "(finished shards are kept)"
    )


def test_graceful_lets_the_caller_stop_then_raises():
    from raycell.utils.interrupts import graceful

    asked = []
    with graceful(asked.append) as caught:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs between bytecodes of the main thread
    assert asked == [signal.SIGINT]  # e.g. Ray Tune told to stop and save the search
    with pytest.raises(KeyboardInterrupt):
        caught.reraise()


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_synth(tmp_path, sig, status):
    out = tmp_path / "synth"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [
        sys.executable,
        "-m",
        "raycell",
        "synth",
        "--out",
        str(out),
        "--set",
        "synth.n_cells=20000",
        *SYNTH,
    ]
    # a shell that starts the suite in the background ignores SIGINT, and a child inherits that
    # (Python then installs no KeyboardInterrupt handler): give the child Ctrl-C as a terminal would
    p = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 1200  # generous: a poll that ends when the shards appear
    while time.monotonic() < deadline and p.poll() is None:  # wait until shards are being written
        if any(tmp_path.glob("synth.partial-*/shards/part-*.parquet")):
            break
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()
    p.send_signal(sig)
    _, err = p.communicate(timeout=600)
    assert p.returncode == status, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "raycell: interrupted; re-run the same command to "
        "start again (nothing earlier was replaced)"
    )
    assert not out.exists()


# ---- a busy machine -----------------------------------------------------------------------------


def test_local_ray_start_is_retried_then_one_line(monkeypatch):
    import ray

    from raycell.config import ConfigError
    from raycell.utils import ray_utils as ru

    timeout = Exception("The current node timed out during startup. This could happen because ...")
    calls = []

    def slow_start(**kw):
        calls.append(kw)
        if len(calls) < 3:
            raise timeout

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", slow_start)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ru._start_local(lambda: ray.init(address="local"), timeout_s=600)
    assert len(calls) == 3  # started on the third try

    def never(**kw):
        raise timeout

    monkeypatch.setattr(ray, "init", never)
    with pytest.raises(ConfigError) as ei:
        ru._start_local(lambda: ray.init(address="local"), timeout_s=0.01)
    msg = str(ei.value)
    assert "\n" not in msg and "raise ray.start_timeout_s" in msg and "did not start" in msg
    monkeypatch.setattr(ray, "init", lambda **kw: (_ for _ in ()).throw(ValueError("bad option")))
    with pytest.raises(ValueError, match="bad option"):  # not a timeout: not retried, not hidden
        ru._start_local(lambda: ray.init(address="local"), timeout_s=600)


@pytest.mark.ray
def test_workers_find_their_own_state_api_beside_another_local_ray(ray_local, tmp_path):
    """Ray Train frees a stopped trial's workers only if its cleaner (a worker) reaches the State API;
    with a second local Ray on the machine Ray's own lookup fails ("multiple active Ray instances"),
    the cleaner dies and a search hangs on reserved CPUs. Our workers must reach their own Ray's API.
    """
    import ray

    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ray, sys, time; ray.init(address='local', num_cpus=1, include_dashboard=False); "
            "print('up', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "up"  # two Ray instances on this machine now

        @ray.remote(num_cpus=0)
        def controller_alive(actor_id: str) -> bool:
            from ray.train.v2._internal.state.util import is_actor_alive

            return is_actor_alive(actor_id=actor_id, timeout=30)

        @ray.remote(num_cpus=0)
        class Marker:
            def ping(self) -> int:
                return 1

        m = Marker.remote()
        ray.get(m.ping.remote())
        actor_id = m._actor_id.hex()
        assert ray.get(controller_alive.remote(actor_id)) is True
        ray.kill(m)
        deadline = time.time() + 30
        while ray.get(controller_alive.remote(actor_id)) and time.time() < deadline:
            time.sleep(0.5)
        assert ray.get(controller_alive.remote(actor_id)) is False  # a dead one is seen dead
    finally:
        other.kill()
        other.wait()


def test_start_wait_grows_with_the_load(monkeypatch):
    from raycell.utils import ray_utils as ru

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert ru.start_wait_s() == 60
    monkeypatch.setattr(os, "getloadavg", lambda: (10.0, 10.0, 10.0))
    assert ru.start_wait_s() == 300


# ---- also silently wrong before ------------------------------------------------------------------


@pytest.mark.parametrize("iou", ["1.5", "0", "-0.2", "nan"])
def test_iou_outside_0_1_is_refused(capsys, iou):
    assert main(["segmentation-eval", "--iou", iou, "somewhere"]) == 2
    assert "the IoU threshold must be in (0, 1]" in _err_line(capsys)


@pytest.mark.parametrize(
    "column,words", [("centroid_x", "continuous numbers"), ("cell_id", "nearly one value per cell")]
)
def test_a_head_that_is_not_a_category_is_refused(tiny_data, column, words):
    from raycell.config import ConfigError, load_config
    from raycell.formats.shards import open_dataset
    from raycell.train.trainer import weak_label_heads

    cfg = load_config(None, [f"data.path={tiny_data}", "model.type=timm", f"data.heads=[{column}]"])
    with pytest.raises(ConfigError) as ei:
        weak_label_heads(cfg, open_dataset(tiny_data))
    assert f"column {column!r}" in str(ei.value) and words in str(ei.value)
    cfg = load_config(None, [f"data.path={tiny_data}", "model.type=timm", "data.heads=[label]"])
    assert len(weak_label_heads(cfg, open_dataset(tiny_data))[0]) == 2  # a real category passes


@pytest.mark.parametrize(
    "model_type,labels,batches,warned",
    [
        ("conventional", ["a", "a"], ["b1", "b2"], ["one label class ('a')"]),
        ("adversarial", ["a", "b"], ["b1", "b1"], ["one imaging batch ('b1')"]),
        ("conventional", ["a", "b"], ["b1", "b1"], []),  # no batch terms: one batch is fine
        ("mixedeffects", ["a", "a"], ["b1", "b1"], ["one label class", "one imaging batch"]),
    ],
)
def test_a_train_split_that_cannot_teach_is_warned(
    capsys, tmp_path, model_type, labels, batches, warned
):
    import pyarrow as pa

    from raycell.config import load_config
    from raycell.train import trainer

    class DataSet:
        root = tmp_path / model_type

        def read_table(self, cols, splits=None):
            return pa.table({"label": labels, "batch": batches})

    cfg = load_config(None, [f"model.type={model_type}"])
    trainer._warn_degenerate_train_split(cfg, DataSet())
    err = capsys.readouterr().err
    assert err.count("[raycell] warning:") == len(warned), err
    for w in warned:
        assert w in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_during_training_is_an_interruption_not_a_finished_run(tmp_path, sig):
    """Ray Train aborts the run on Ctrl-C and `fit` then returns normally: raycell must not record
    that as a finished run."""
    from raycell.config import load_config
    from raycell.train.trainer import fit_or_explain

    aborted = []

    class Controller:
        class abort:  # noqa: N801 - the shape of a Ray actor method
            @staticmethod
            def remote():
                aborted.append(True)

    class Trainer:
        def _register_sigint_handler(self, controller):
            raise AssertionError("raycell's handler should be used")

        def fit(self):
            self._register_sigint_handler(Controller())
            os.kill(os.getpid(), sig)
            time.sleep(0.2)
            return "a result that looks finished"

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match=f"raycell train --resume {tmp_path}"):
        fit_or_explain(Trainer(), load_config(None, []), tmp_path)
    assert aborted == [True]
    assert signal.getsignal(signal.SIGINT) == before  # the handler is not left behind
    t = Trainer()
    t.fit = lambda: t._register_sigint_handler(Controller()) or "finished"
    assert fit_or_explain(t, load_config(None, []), tmp_path) == "finished"  # no signal: the result


def test_a_full_disk_in_a_training_worker_is_one_line(tmp_path):
    """Ray carries only the worker's traceback text; its disk problem is what the user sees."""
    import ray.train

    from raycell.config import load_config
    from raycell.errors import EnvironmentProblem
    from raycell.train.trainer import fit_or_explain

    class Trainer:
        def fit(self):
            raise ray.train.TrainingFailedError(
                "Training failed.\n  File worker.py\nOSError: [Errno 28] No space left on device: "
                f"'{tmp_path}/runs/r1/checkpoint_000001/model.pt'"
            )

    with pytest.raises(EnvironmentProblem, match=f"no space left on the device at {tmp_path}/runs"):
        fit_or_explain(Trainer(), load_config(None, []), tmp_path)
