"""Faults mid-run: a worker node lost during Ray Train, an inference job SIGKILLed and re-run.

Both run Ray in a subprocess with a session of its own (`start_new_session`): the node-loss test
needs a multi-node `ray.cluster_utils.Cluster` (tests/fault_cluster_script.py), which this process
cannot join while it holds the session's local Ray, and a killed job must take its whole process
group with it. Whatever a subprocess leaves running in its session is killed by pid afterwards.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raycell import constants as K
from raycell.utils.outputs import MARKER

ROOT = Path(__file__).resolve().parents[1]
# generous bounds (a busy machine slows every step), not time budgets: the polls end on events
SCRIPT_DEADLINE_S = 1500  # the node-loss script takes its cluster down and exits after this
SCRIPT_TIMEOUT_S = 1560  # then the test kills it


def _env() -> dict:
    """The subprocess environment: no RAY_ADDRESS (it starts or builds a Ray of its own)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1")
    return env


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (a subprocess started with start_new_session=True)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid and _alive(int(entry)):
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def _reap_session(sid: int, grace_s: float = 10.0) -> list[int]:
    """Give the session's processes `grace_s` to exit, then SIGKILL the rest; the pids killed."""
    end = time.time() + grace_s
    while _session_pids(sid) and time.time() < end:
        time.sleep(0.2)
    left = _session_pids(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout_s: float, what: str) -> str:
    """Wait for `proc` (its process group is killed on timeout), clean its session; its output."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        _reap_session(proc.pid, grace_s=2)
        pytest.fail(f"{what} did not finish within {timeout_s} s; output tail:\n{out[-4000:]}")
    _reap_session(proc.pid)
    return out


# --- (a) the train worker's node is lost mid-training ---------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_losing_the_train_workers_node(tmp_path):
    """max_failures=1: the worker restarts on another node from the checkpoint, all epochs run;
    max_failures=0: one line naming failure.txt, which holds Ray's full report."""
    t0 = time.time()
    proc = _start(
        [
            sys.executable,
            str(ROOT / "tests" / "fault_cluster_script.py"),
            str(tmp_path),
            str(SCRIPT_DEADLINE_S),
        ]
    )
    out = _finish(proc, SCRIPT_TIMEOUT_S, "tests/fault_cluster_script.py")
    last = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert last, f"no JSON summary (exit {proc.returncode}); output tail:\n{out[-4000:]}"
    s = json.loads(last[-1])
    tail = f"\nsummary: {json.dumps(s, indent=1)[:6000]}\noutput tail:\n{out[-3000:]}"
    assert "error" not in s and proc.returncode == 0, tail
    print(
        f"node loss: {time.time() - t0:.0f} s (cluster up {s['cluster_start_s']} s, restart case "
        f"{s['finish']['seconds']} s, failure case {s['fail']['seconds']} s)"
    )

    ok, kill = s["finish"], s["finish"]["kill"]
    assert kill["removed"], f"the train worker's node was never removed: {kill}{tail}"
    assert kill["epochs_before"] != [0, 1, 2], f"the node went after the last epoch{tail}"
    assert kill.get("restarted_on") not in (None, kill["node"]), f"no restart elsewhere{tail}"
    assert ok["outcome"] == "finished" and ok["epochs"] == [0, 1, 2], tail
    assert ok["history_epochs"] == [0, 1, 2] and ok["metrics_json"], tail
    # resumed from the checkpoint: epoch 0 trained once (an epoch cut short may be logged twice)
    assert ok["history_lines"].count(0) == 1, tail

    bad = s["fail"]
    assert bad["kill"]["removed"], f"the train worker's node was never removed: {bad['kill']}{tail}"
    assert bad["outcome"] == "TrainingFailed", tail
    msg = bad["message"]
    assert "\n" not in msg and msg.startswith("training failed after 0 restart(s)"), msg
    assert str(Path(bad["run_dir"]) / "failure.txt") in msg and "--resume" in msg, msg
    report = bad["failure_txt"] or ""
    assert len(report.splitlines()) > 1 and "Error" in report.splitlines()[0], tail  # all of it
    assert not bad["metrics_json"] and bad["history_epochs"][:1] == [0], tail


# --- (b) inference SIGKILLed mid-way, then re-run -------------------------------------------------

N_CELLS, ROWS_PER_SHARD, PER_ROUND = 2000, 50, 10  # 40 input shards, 4 rounds
SPLITS = ("test", "unseen")


def _checkpoint(ds, path: Path) -> Path:
    """An untrained model saved as a raycell checkpoint (its weights do not matter here)."""
    import torch

    from raycell.formats.categories import CategoryMap
    from raycell.formats.spec import DataSpec
    from raycell.models import create_model
    from raycell.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    spec = DataSpec.from_dataset(ds)
    batches = sorted(set(ds.read_table([K.BATCH], splits=["train"]).column(K.BATCH).to_pylist()))
    labels = CategoryMap(K.LABEL, tuple(ds.manifest.label_vocab))
    model = create_model(
        "conventional",
        in_channels=spec.shape[0],
        n_classes=len(labels),
        n_batches=len(batches),
        preset="tiny",
        image_size=spec.shape[1],
    )
    return save_checkpoint(
        path,
        model,
        None,
        epoch=0,
        spec=spec,
        labels=labels,
        batches=CategoryMap(K.BATCH, tuple(batches)),
        config={},
        metrics={},
    )


def _shards(shard_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Prediction shard name -> (mtime_ns, content)."""
    return {
        f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted(shard_dir.glob(K.SHARD_GLOB))
    }


@pytest.mark.ray
@pytest.mark.slow
def test_killed_inference_rerun_predicts_every_cell_once(tmp_path):
    from raycell.data.splits import split_dataset
    from raycell.data.synthetic import write_synthetic
    from raycell.formats.predictions import load_predictions
    from raycell.formats.shards import open_dataset

    data, out = tmp_path / "cells", tmp_path / "pred"
    write_synthetic(str(data), n_cells=N_CELLS, crop_size=32, rows_per_shard=ROWS_PER_SHARD, seed=0)
    split_dataset(str(data))
    ds = open_dataset(data)
    n_inputs = len(ds.shard_paths)
    ck = _checkpoint(ds, tmp_path / "ck")
    want = ds.read_table([K.CELL_ID], splits=list(SPLITS)).column(K.CELL_ID).to_pylist()
    assert n_inputs == N_CELLS // ROWS_PER_SHARD and len(want) > 100

    cmd = [
        sys.executable,
        "-m",
        "raycell",
        "infer",
        "--checkpoint",
        str(ck),
        "--data",
        str(data),
        "--out",
        str(out),
        "--splits",
        ",".join(SPLITS),
        "--set",
        "ray.progress=false",
        "--set",
        f"infer.shards_per_round={PER_ROUND}",
    ]
    shard_dir = out / "shards"
    t0 = time.time()
    proc = _start(cmd)
    try:  # kill when the first round's shards land: three rounds are still to come
        while (
            proc.poll() is None
            and time.time() - t0 < 1800
            and not any(shard_dir.glob(K.SHARD_GLOB))
        ):
            time.sleep(0.02)
        ended_first = proc.poll() is not None
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        ended_first = True
    first_out, _ = proc.communicate()
    _reap_session(proc.pid, grace_s=2)
    t_kill = time.time() - t0
    assert not ended_first, (
        f"inference ended (exit {proc.returncode}) before it could be killed:"
        f" lower infer.shards_per_round or add shards\n{first_out[-3000:]}"
    )
    before = _shards(shard_dir)
    assert 0 < len(before) < n_inputs, f"{len(before)} of {n_inputs} shards at the kill"
    assert not (out / K.PREDICTIONS_MANIFEST).exists(), "predictions.json: the run had completed"
    left_by_kill = sorted(p.name for p in out.rglob(".*"))

    t1 = time.time()
    rerun = _finish(_start(cmd), 1800, "the re-run of inference")
    assert f"{len(before)} shard(s) already done" in rerun, rerun[-3000:]
    print(
        f"inference killed after {t_kill:.0f} s with {len(before)}/{n_inputs} shards written "
        f"(left behind: {left_by_kill}); re-run {time.time() - t1:.0f} s"
    )

    # every requested cell exactly once in the union of the shards, and no other cell
    ids = []
    for f in sorted(shard_dir.glob(K.SHARD_GLOB)):
        ids += pq.read_table(f, columns=[K.CELL_ID]).column(K.CELL_ID).to_pylist()
    repeated = [c for c, n in Counter(ids).items() if n > 1]
    assert not repeated, f"{len(repeated)} cell(s) predicted twice, e.g. {repeated[:3]}"
    assert sorted(ids) == sorted(want)
    pm, table = load_predictions(out)  # predictions.json agrees with the shards
    assert pm["n_rows"] == len(want) == table.num_rows and pm["n_shards"] == n_inputs
    # the shards written before the kill were kept as they were, not redone
    after = _shards(shard_dir)
    assert {n: after[n] for n in before} == before
    # nothing but results: no staging folder or temporary file of the killed run either
    extra = sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p != shard_dir
        and p.name not in (K.PREDICTIONS_MANIFEST, MARKER)
        and not (p.parent == shard_dir and p.match(K.SHARD_GLOB))
    )
    assert not extra, (
        f"left in {out} after the re-run: {extra} (the killed run's staging or "
        "temporary files; the re-run should remove them)"
    )
