"""Ray job entry point for the MEDL experiment: conventional vs adversarial vs random/mixed effects.

    python jobs/experiment_medl.py --config configs/experiments/medl_small.yaml --seeds 0,1,2 \
        --out bench/runs/medl_small
    ray job submit --working-dir . -- python jobs/experiment_medl.py \
        --config configs/experiments/medl_armed_gpu.yaml --seeds 0,1,2 --out /mnt/results/medl_armed

Trains every model for every seed through Ray Train, infers a soft Z for the unseen batches, runs
Ray Data inference and the evaluation, and writes `table.md`, `table.csv` and `results.json` into
`--out` (re-running the same command continues an interrupted experiment; seeds started as separate
processes into one `--out` are combined by a final run over all of them). Exit status 2 on a config
error.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _start_local_ray(cfg) -> None:
    """Start a private local Ray when no cluster is named.

    A plain `ray.init()` joins any Ray already running on the machine (e.g. another user's
    `ray start`), sharing its CPUs with its jobs; `address="local"` always starts a new instance
    sized as `init_ray` would size it. `init_ray` then finds Ray initialised and only applies the
    Data settings.
    """
    import os

    import ray

    from raycell.utils.ray_utils import _QUIET_ENV

    if cfg.ray.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    kw = {"num_cpus": cfg.ray.num_cpus or max(4, 2 * (os.cpu_count() or 1)),
          "include_dashboard": True, "dashboard_host": "127.0.0.1"}
    if cfg.ray.object_store_mb:
        kw["object_store_memory"] = cfg.ray.object_store_mb << 20
    ray.init(address="local", **kw)


def main(argv: list[str] | None = None) -> int:
    """Parse --config/--set/--seeds/--models/--out, start or join Ray, run the experiment."""
    from raycell.experiments import MEDL_MODELS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", "-c", help="YAML config (see configs/experiments/)")
    ap.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.epochs=4 (repeatable)")
    ap.add_argument("--seeds", type=_csv, default=["0", "1", "2"],
                    help="comma-separated training seeds")
    ap.add_argument("--models", type=_csv, default=list(MEDL_MODELS),
                    help=f"comma-separated model list (default: {','.join(MEDL_MODELS)})")
    ap.add_argument("--out", default="runs/medl",
                    help="output folder (re-use it to continue a run)")
    args = ap.parse_args(argv)

    from raycell.config import ConfigError, load_config
    from raycell.experiments import run_medl_experiment
    from raycell.utils.ray_utils import init_ray

    try:
        seeds = [int(s) for s in args.seeds]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {','.join(args.seeds)!r}")
    try:
        cfg = load_config(args.config, args.overrides)
        _start_local_ray(cfg)
        init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_mb, cfg.ray.progress)
        command = "python jobs/experiment_medl.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        run_medl_experiment(cfg, seeds, args.models, args.out, command=command)
    except ConfigError as exc:
        print(f"raycell experiment medl: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
