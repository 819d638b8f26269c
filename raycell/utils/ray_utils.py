"""Starting or joining Ray the same way from the CLI, the jobs and the tests."""

from __future__ import annotations

import os

# Quieter, and fixes duplicated worker prints (spec/ray-2.60.md section 6). Set before Ray starts.
_QUIET_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SCHEDULER_EVENTS": "0",
}


def init_ray(address: str = "", num_cpus: int = 0, object_store_mb: int = 0, progress: bool = True) -> None:
    """Join a cluster (`address`, or RAY_ADDRESS as under `ray job submit`) or start a private local Ray.

    A local Ray gets more logical CPUs than the machine has (max(4, 2 x cores)): Ray Data read tasks need
    CPU slots while train workers hold theirs, and on 2 cores they otherwise starve and `fit()` hangs.
    """
    import ray

    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS", "")
        if addr:
            ray.init(address=addr, log_to_driver=True)
        else:
            kw = {"num_cpus": num_cpus or max(4, 2 * (os.cpu_count() or 1)), "include_dashboard": True,
                  "dashboard_host": "127.0.0.1"}
            if object_store_mb:
                kw["object_store_memory"] = object_store_mb << 20
            # address="local": always a private instance. A bare ray.init() would join any `ray start`
            # cluster on this machine (or a stale one named in /tmp/ray/ray_current_cluster) instead.
            ray.init(address="local", **kw)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = progress
