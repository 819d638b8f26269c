"""Ray Jobs on a real head (`ray start --head`): a train job, an infer job on its run, a bad config.

What `ray job submit --working-dir . -- python jobs/X.py ...` does on a cluster, here: the head is
a `ray start --head --block` subprocess on free ports with its own short temp dir (its address file
and unix sockets are its own, so a bare `ray.init()` elsewhere never joins it); the jobs go through
the Jobs SDK with this repository as the working dir, and the entry points are relative paths, so
they only run from the uploaded copy. Never `ray stop` here: it kills every Ray on the machine (this
session's `ray_local` and other people's); teardown kills the head's process group and every
process that inherited this head's marker variable.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
MARKER = "RAYCELL_TEST_JOBS_HEAD"  # in the head's environment; every process it starts inherits it
# Ray 2.60 already skips .git and .venv and honours .gitignore; jobs need no docs or results.
EXCLUDES = [
    ".git/",
    ".venv/",
    "runs/",
    "/data/",
    ".pytest_cache/",
    "__pycache__/",
    "*.egg-info/",
    "bench/results/",
    "docs/",
]
HEAD_START_S, JOB_TIMEOUT_S = 600, 1200  # generous bounds of polls: a busy machine is slow
MISSING = "/does/not/exist.yaml"

pytestmark = pytest.mark.ray


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held together while asked, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _marked_pids(token: str) -> list[int]:
    """Processes whose environment holds this head's marker (the head's own, the jobs' drivers)."""
    needle = f"{MARKER}={token}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:  # gone, or not ours to read
                pass
    return pids


def _kill_head(proc: subprocess.Popen, token: str) -> None:
    """SIGTERM the head's group and its jobs; SIGKILL what is left after 5 s (raylets are slow)."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for pid in _marked_pids(token):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and (proc.poll() is None or _marked_pids(token)):
            time.sleep(0.2)
        if proc.poll() is not None and not _marked_pids(token):
            return


@pytest.fixture(scope="module")
def head():
    """A private Ray head (4 CPUs, dashboard, Jobs API) for this module: a JobSubmissionClient."""
    from ray.job_submission import JobSubmissionClient

    token = uuid.uuid4().hex
    tmp = Path(tempfile.mkdtemp(prefix="rcj-", dir="/tmp"))  # short: Ray's unix sockets are in it
    gcs, dash, client, agent, agent_grpc, renv, metrics, nm, om = _free_ports(9)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }  # never another cluster's address
    env.update(
        {
            MARKER: token,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            # the jobs' `python` is this venv's, as after `source .venv/bin/activate`
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    cmd = [
        str(RAY),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={renv}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        "--num-cpus=4",
        "--include-dashboard=true",
        f"--temp-dir={tmp}",
        "--disable-usage-stats",
    ]
    log = open(tmp / "head.log", "w+")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + HEAD_START_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(
                    f"`ray start --head` exited with {proc.returncode}:\n{log.read()[-4000:]}"
                )
            try:
                jobs = JobSubmissionClient(url)
                break
            except Exception:  # the dashboard's HTTP server is not up yet
                if time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(
                        f"Jobs API at {url} not up after {HEAD_START_S} s:\n{log.read()[-4000:]}"
                    )
                time.sleep(1)
        yield jobs
        for job in jobs.list_jobs():  # a job a failed test left running must not outlive the head
            if not job.status.is_terminal() and job.submission_id:
                jobs.stop_job(job.submission_id)
    finally:
        _kill_head(proc, token)
        log.close()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def _submit(jobs, argv: list[str]) -> str:
    """Submit `python <argv>` with this repository as the working dir (`--working-dir .`)."""
    return jobs.submit_job(
        entrypoint=shlex.join(["python", *argv]),
        entrypoint_num_cpus=0,
        runtime_env={
            "working_dir": str(ROOT),
            "excludes": EXCLUDES,
            "env_vars": {"OMP_NUM_THREADS": "1"},
        },
    )


def _wait(jobs, job_id: str, timeout_s: float = JOB_TIMEOUT_S):
    """The job's final JobStatus and its logs (the job is stopped if it outlives `timeout_s`)."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while not (status := jobs.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            jobs.stop_job(job_id)
            logs = jobs.get_job_logs(job_id)
            return JobStatus.PENDING, f"(timed out after {timeout_s} s)\n{logs}"
        time.sleep(1)
    return status, jobs.get_job_logs(job_id)


def _expect_succeeded(jobs, job_id: str) -> str:
    from ray.job_submission import JobStatus

    status, logs = _wait(jobs, job_id)
    info = jobs.get_job_info(job_id)
    assert status == JobStatus.SUCCEEDED, f"{job_id} ended {status}: {info.message}\n{logs[-6000:]}"
    took = (info.end_time - info.start_time) / 1000
    print(f"job {info.entrypoint.split()[1]}: {status} in {took:.1f} s")
    return logs


def _over(overrides: list[str]) -> list[str]:
    return [a for kv in overrides for a in ("--set", kv)]


@pytest.mark.slow
def test_train_then_infer_jobs(head, tiny_data, tmp_path):
    import pyarrow.parquet as pq

    from raycell import constants as K
    from raycell.formats.predictions import read_predictions

    runs, pred = tmp_path / "runs", tmp_path / "pred"
    common = _over(tiny_overrides(tiny_data, runs, epochs=1))
    logs = _expect_succeeded(head, _submit(head, ["jobs/train.py", *common, "--set", "name=job"]))
    assert "[raycell] training conventional" in logs
    (run,) = runs.iterdir()  # one run folder, where the config says (not in the job's working dir)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run_dir"] == str(run) and [h["epoch"] for h in metrics["history"]] == [0]
    assert (run / "config.yaml").is_file() and (Path(metrics["checkpoint"]) / "meta.json").is_file()
    assert 0.0 <= metrics["metrics"]["val_auroc"] <= 1.0

    splits = [K.TEST, K.UNSEEN]
    infer = [
        "jobs/infer.py",
        *common,
        "--checkpoint",
        str(run),
        "--data",
        str(tiny_data),
        "--out",
        str(pred),
        "--splits",
        ",".join(splits),
    ]
    _expect_succeeded(head, _submit(head, infer))
    data = pq.read_table(tiny_data / K.SHARD_DIR, columns=[K.CELL_ID, K.SPLIT]).to_pydict()
    want = {c for c, s in zip(data[K.CELL_ID], data[K.SPLIT]) if s in splits}
    got = read_predictions(pred)
    ids = got.column(K.CELL_ID).to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == want and want
    assert set(got.column(K.SPLIT).to_pylist()) == set(splits)
    assert (pred / K.PREDICTIONS_MANIFEST).is_file()
    assert list((pred / K.SHARD_DIR).glob("*.parquet"))


def test_missing_config_job_fails_in_one_line(head):
    from ray.job_submission import JobStatus

    job_id = _submit(head, ["jobs/train.py", "--config", MISSING])
    status, logs = _wait(head, job_id)
    assert status == JobStatus.FAILED, logs
    lines = [ln for ln in logs.splitlines() if ln.strip()]
    assert lines and lines[-1] == f"raycell: error: config file not found: {MISSING}", logs
    assert "Traceback" not in logs and head.get_job_info(job_id).driver_exit_code == 2
