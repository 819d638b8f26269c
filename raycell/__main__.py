"""`raycell` / `python -m raycell`: parse, build the config, start Ray when the verb needs it, dispatch.

Errors a user can fix (bad config key, missing data set, wrong shard, unknown label) print one line
naming the file or key and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from raycell.cli import build_parser, overrides_from_args

NEEDS_RAY = {"train", "infer", "demo", "ingest", "experiment"}


def _user_errors() -> tuple[type[BaseException], ...]:
    from raycell.config import ConfigError
    from raycell.data.categories import UnknownCategoryError
    from raycell.data.shards import ShardError
    from raycell.infer.predictor import MissingDesignMatrixError
    from raycell.ingest.segment import SegmentationError
    from raycell.ingest.sources import IngestError
    from raycell.models.registry import UnknownModelError

    return (ConfigError, ShardError, UnknownCategoryError, UnknownModelError, IngestError,
            SegmentationError, MissingDesignMatrixError, FileNotFoundError)


def run(argv: list[str] | None = None) -> dict | None:
    """Run one verb; returns its result (for tests and jobs)."""
    args = build_parser().parse_args(argv)
    if args.command == "import-armed":
        from raycell.ingest.armed import import_armed

        m = import_armed(args.src, args.out, overwrite=args.overwrite)
        print(f"[raycell] import-armed: {m['n_cells']} cells, splits {m['counts_per_split']} -> {args.out}")
        return m
    if args.command == "segmentation-eval":
        import json

        from raycell.ingest.segment import evaluate_segmentation

        res = evaluate_segmentation(args.raw_dir, iou=args.iou)
        print(json.dumps({k: v for k, v in res.items() if k != "per_fov"}, indent=2, default=str))
        return res
    if args.command == "models":
        from raycell.models import list_models

        print("\n".join(list_models()))
        return None
    from raycell import pipeline
    from raycell.config import defaults_yaml, load_config

    if args.command == "config" and args.defaults:
        print(defaults_yaml(), end="")
        return None
    cfg = load_config(args.config, overrides_from_args(args))
    if args.command == "config":
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return None
    if args.command == "ingest":
        from raycell.ingest.run import check_config

        check_config(cfg)  # bad ingest options fail before Ray starts
    if args.command in NEEDS_RAY:
        from raycell.utils.ray_utils import init_ray

        init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_mb, cfg.ray.progress)
    if args.command == "synth":
        return pipeline.run_synth(cfg, overwrite=args.overwrite)
    if args.command == "experiment":
        from raycell.experiments import MEDL_MODELS, run_medl_experiment

        models = args.models or MEDL_MODELS
        return run_medl_experiment(cfg, [int(s) for s in args.seeds], models, args.out,
                                   command="raycell " + " ".join(argv if argv is not None else sys.argv[1:]))
    return getattr(pipeline, f"run_{args.command.replace('-', '_')}")(cfg)


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    try:
        run(argv)
    except _user_errors() as exc:
        msg = str(exc).strip("'\"")
        print(f"raycell: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
