"""Lose a worker node mid-training on a simulated multi-node Ray; a JSON summary is the last line.

Run by `tests/test_fault_tolerance.py` in a subprocess: a process can be connected to one Ray
only, and the pytest session may already hold its local one. The script builds a
`ray.cluster_utils.Cluster` (a CPU-less head, where the driver and the Train controller live, and
two 2-CPU worker nodes), then trains the tiny data set for 3 epochs twice through
`raycell.train.trainer.train`. In each run a thread waits for the first checkpoint Ray Train
registers in the run folder, then removes the node hosting the `RayTrainWorker` actor, as a lost
machine would. With `train.max_failures=1` the run must finish; with 0 it must fail in one line.
The cluster is reused: a fresh worker node is added between the runs.

Usage: python tests/fault_cluster_script.py WORK_DIR [DEADLINE_S]
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

# Before any Ray process starts: the cluster's processes inherit the driver's environment.
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
from raycell.utils.ray_utils import _QUIET_ENV  # noqa: E402

for _k, _v in _QUIET_ENV.items():
    os.environ.setdefault(_k, _v)

from conftest import TINY, tiny_overrides  # noqa: E402 - run as a script, tests/ is sys.path[0]

# The GCS declares a SIGKILLed node dead after `failure_threshold` failed health checks, one per
# `period_ms`: ~15-30 s by default. A restart within that window can be placed on the dead node: Ray
# Data's FooterReader actors (scheduling "SPREAD") were, and the restarted attempt failed too
# (ActorDiedError), which exhausted train.max_failures=1 in 1 of 2 runs here. A dead raylet refuses
# connections, so each check fails at once: ~3 s here; a slow live node still has the default 10 s
# per check (timeout_ms) before a check counts as failed.
HEALTH_CHECK = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
WAIT_CHECKPOINT_S = 900  # longest wait for the first checkpoint before giving up on the removal


def _log(msg: str) -> None:
    print(f"[fault] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def _free_port() -> int:
    """A free port for the head's dashboard (the State API): 8265 may be another Ray's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_worker_node(address: str) -> str | None:
    """Node id of the live `RayTrainWorker` actor (the one train worker); None while there is none.

    `address` is explicit: other Rays run on this machine, and "auto" would pick the latest one.
    """
    from ray.util.state import list_actors

    try:
        actors = list_actors(
            address=address,
            timeout=10,
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        )
    except Exception as exc:  # noqa: BLE001 - the State API may be briefly unavailable: ask again
        _log(f"list_actors failed ({type(exc).__name__}); retrying")
        return None
    return actors[0].node_id if actors else None


def _node_alive(node_id: str) -> bool:
    """Whether the GCS still counts the node as alive."""
    import ray

    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def _registered_checkpoints(runs: Path) -> list[str]:
    """Checkpoints Ray Train has registered (its snapshot file in the run folder), oldest first.

    A `checkpoint_*` folder appears before the report reaches the controller; a worker lost in
    between restarts from scratch (seen: epoch 0 trained twice), so the registered one counts.
    """
    for snap in runs.glob("*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snap.read_text())["checkpoint_results"]
            return [c["checkpoint_dir_name"] for c in results]
        except (OSError, ValueError, KeyError, TypeError):
            return []  # being written: ask again
    return []


class NodeKiller(threading.Thread):
    """Remove the node that hosts the train worker once the run's first checkpoint is registered."""

    def __init__(self, cluster, runs: Path):
        super().__init__(daemon=True)
        self.cluster, self.runs = cluster, runs
        self.info: dict = {"removed": False}
        self.stop = threading.Event()

    def run(self) -> None:
        from raycell.train.history import read_history

        deadline = time.time() + WAIT_CHECKPOINT_S
        node_id, ckpts = None, []
        while not self.stop.is_set() and time.time() < deadline:
            # Find the worker's node while waiting, so the removal follows the checkpoint closely.
            node_id = node_id or _train_worker_node(self.cluster.address)
            ckpts = _registered_checkpoints(self.runs)
            if ckpts and node_id:
                break
            time.sleep(0.1)
        else:
            self.info["error"] = (
                "run ended first"
                if self.stop.is_set()
                else f"no registered checkpoint and train worker within {WAIT_CHECKPOINT_S} s"
            )
            return
        run_dir = next(self.runs.glob("*/checkpoint_manager_snapshot.json")).parent
        epochs_done = [h["epoch"] for h in read_history(run_dir / "history.jsonl")]
        # Node.node_id is what the State API reports (Node.unique_id is "ip:plasma socket" in 2.60).
        victim = next((n for n in self.cluster.worker_nodes if n.node_id == node_id), None)
        if victim is None:
            self.info["error"] = f"train worker on node {node_id}, not a removable worker node"
            return
        _log(f"removing node {node_id[:8]} (train worker's) after epochs {epochs_done}")
        self.cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: a lost machine
        t_removed = time.time()
        self.info.update(
            removed=True, node=node_id, epochs_before=epochs_done, checkpoints_before=ckpts
        )
        # When does the GCS declare the node dead, and where does the worker restart (if allowed)?
        while not self.stop.is_set() and time.time() < deadline + 60:
            if "declared_dead_after_s" not in self.info and not _node_alive(node_id):
                self.info["declared_dead_after_s"] = round(time.time() - t_removed, 1)
            new = _train_worker_node(self.cluster.address)
            if new and new != node_id:
                self.info["restarted_on"] = new
                self.info["restarted_after_s"] = round(time.time() - t_removed, 1)
            if "restarted_on" in self.info and "declared_dead_after_s" in self.info:
                return
            time.sleep(0.5)


def run_case(cluster, data: Path, runs: Path, max_failures: int) -> dict:
    """Train 3 epochs while a node is removed; what happened, as a JSON-able dict."""
    from raycell.config import load_config
    from raycell.train.history import read_history
    from raycell.train.trainer import TrainingFailed, train

    over = [
        f"train.max_failures={max_failures}",
        f"name=mf{max_failures}",
        "train.checkpoints_to_keep=3",
    ]
    cfg = load_config(None, tiny_overrides(data, runs, epochs=3) + over)
    killer = NodeKiller(cluster, runs)
    killer.start()
    out: dict = {"max_failures": max_failures}
    t0 = time.time()
    try:
        res = train(cfg)
        out.update(
            outcome="finished", run_dir=res["run_dir"], epochs=[h["epoch"] for h in res["history"]]
        )
    except TrainingFailed as exc:
        out.update(outcome="TrainingFailed", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        out.update(outcome=type(exc).__name__, message=str(exc)[-2000:])
    out["seconds"] = round(time.time() - t0, 1)
    killer.stop.set()
    killer.join(timeout=15)
    out["kill"] = killer.info
    run_dirs = sorted(p for p in runs.iterdir() if p.is_dir())
    if run_dirs:
        run = run_dirs[-1]
        hist = run / "history.jsonl"
        raw = hist.read_text().splitlines() if hist.is_file() else []
        lines = [json.loads(ln) for ln in raw if ln.strip()]
        fail = run / "failure.txt"
        out.update(
            run_dir=str(run),
            history_epochs=[h["epoch"] for h in read_history(hist)],
            history_lines=[h.get("epoch") for h in lines],
            metrics_json=(run / "metrics.json").is_file(),
            failure_txt=fail.read_text()[:4000] if fail.is_file() else None,
        )
    _log(f"max_failures={max_failures}: {out['outcome']} in {out['seconds']} s")
    return out


def main(work: Path, deadline_s: float) -> dict:
    """Build the cluster, run both cases on it, always take it down."""
    import ray
    from ray.cluster_utils import Cluster

    from raycell.data.splits import split_dataset
    from raycell.data.synthetic import write_synthetic
    from raycell.utils.ray_utils import init_ray

    summary: dict = {}
    data = work / "tiny"
    write_synthetic(str(data), **TINY)
    split_dataset(str(data))

    # Cluster() records its address in Ray's "current cluster" file, which a bare ray.init()
    # elsewhere on this machine would join: put the previous content back afterwards.
    from ray._private.utils import get_ray_address_file

    addr_file = Path(get_ray_address_file(None))
    addr_before = addr_file.read_text() if addr_file.is_file() else None

    cluster = None
    done, expired = threading.Event(), threading.Event()

    def take_down() -> None:
        if addr_before is None:
            addr_file.unlink(missing_ok=True)
        else:
            addr_file.write_text(addr_before)
        ray.shutdown()  # first: Cluster.shutdown refuses to remove the node the driver is on
        if cluster is not None:
            cluster.shutdown()

    def watchdog() -> None:
        if not done.wait(deadline_s):
            expired.set()  # the main thread starts nothing new
            _log(f"deadline of {deadline_s} s passed: taking the cluster down")
            print(json.dumps({"error": f"timed out after {deadline_s} s", **summary}), flush=True)
            try:
                take_down()
            finally:
                os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    t0 = time.time()
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "dashboard_port": _free_port(),
                "_system_config": HEALTH_CHECK,
            },
        )
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        init_ray(address=cluster.address, progress=False)
        summary["cluster_start_s"] = round(time.time() - t0, 1)
        _log(f"cluster up: {len(ray.nodes())} nodes in {summary['cluster_start_s']} s")
        summary["finish"] = run_case(cluster, data, work / "runs-mf1", max_failures=1)
        if expired.is_set():  # the watchdog takes the cluster down and ends the process
            threading.Event().wait()
        cluster.add_node(num_cpus=2)  # back to two worker nodes: the next removal leaves one
        cluster.wait_for_nodes()
        summary["fail"] = run_case(cluster, data, work / "runs-mf0", max_failures=0)
    except Exception:  # noqa: BLE001 - the test shows it
        summary["error"] = traceback.format_exc()[-3000:]
    finally:
        t1 = time.time()
        take_down()
        summary["shutdown_s"] = round(time.time() - t1, 1)
        summary["total_s"] = round(time.time() - t0, 1)
        done.set()
    return summary


if __name__ == "__main__":
    deadline = float(sys.argv[2]) if len(sys.argv) > 2 else 1500.0
    result = main(Path(sys.argv[1]).absolute(), deadline)
    print(json.dumps(result), flush=True)
