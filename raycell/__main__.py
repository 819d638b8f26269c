"""`raycell` / `python -m raycell`: parse, build the config, start Ray when the verb needs it, dispatch.

Each verb runs one named function: the `raycell.pipeline` stages (`STAGES`), or the config-free tools
below. Errors a user can fix (bad config key, missing data set, wrong shard, unknown label) print one line
naming the file or key and exit with status 2; anything else is a bug and keeps its traceback. Each verb
checks what it can without Ray (`preflight`) before Ray starts, so bad input costs no Ray start-up.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from raycell import pipeline
from raycell.cli import build_parser, config_overrides
from raycell.config import defaults_yaml, load_config
from raycell.errors import user_errors

if TYPE_CHECKING:
    from raycell.formats.manifest import DatasetManifest

# verb -> the pipeline stage it runs on the config (`synth` and `experiment` take flags too: see `run`)
STAGES = {
    "split": pipeline.run_split,
    "train": pipeline.run_train,
    "infer": pipeline.run_infer,
    "infer-z": pipeline.run_infer_z,
    "evaluate": pipeline.run_evaluate,
    "ingest": pipeline.run_ingest,
    "demo": pipeline.run_demo,
    "tune": pipeline.run_tune,
    "embed": pipeline.run_embed,
    "export": pipeline.run_export,
    "report": pipeline.run_report,
    "profile": pipeline.run_profile,
}
NEEDS_RAY = {"train", "infer", "demo", "ingest", "experiment", "tune", "embed"}


def run_import_armed(args) -> DatasetManifest:
    """`raycell import-armed SRC --out DST`: ARMED .npz/.csv -> crop shards (no config, no Ray)."""
    from raycell.ingest.armed_npz import import_armed
    from raycell.utils.locks import writing

    with writing(args.out, "--out"):
        m = import_armed(args.src, args.out, overwrite=args.overwrite)
    print(f"[raycell] import-armed: {m.n_cells} cells, splits {m.counts_per_split} -> {args.out}")
    return m


def run_segmentation_eval(args) -> dict:
    """`raycell segmentation-eval RAW_DIR | --images G --masks G`: scored against true masks (no Ray)."""
    import dataclasses
    import json
    from pathlib import Path

    from raycell.errors import UserError
    from raycell.ingest.segmentation_eval import evaluate_pairs, evaluate_segmentation

    if not 0 < args.iou <= 1:  # an IoU threshold; 0 or > 1 would match everything or nothing
        raise UserError(
            f"segmentation-eval --iou {args.iou:g}: the IoU threshold must be in (0, 1] "
            "(0.5 is the usual one)"
        )
    if args.perturb:
        return _perturb(args)
    if bool(args.images) != bool(args.masks) or bool(args.raw_dir) == bool(args.images):
        raise UserError(
            "segmentation-eval: give either RAW_DIR or both --images and --masks "
            "(or --perturb --images for images without masks)"
        )
    if args.raw_dir:
        res = evaluate_segmentation(args.raw_dir, iou=args.iou, method=args.method)
        print(json.dumps({k: v for k, v in res.items() if k != "per_fov"}, indent=2, default=str))
    else:
        over = dataclasses.asdict(load_config(None, args.set).ingest)
        res = evaluate_pairs(
            args.images,
            args.masks,
            group_by=args.group_by,
            pair_regex=args.pair_regex,
            iou=args.iou,
            channel=args.channel,
            method=args.method,
            overrides=over,
        )
        print(json.dumps({k: v for k, v in res.items() if k != "per_image"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return res


def _perturb(args) -> dict:
    """`segmentation-eval --perturb --images G`: robustness of the segmentation to simulated plate effects."""
    import dataclasses

    from raycell.errors import UserError
    from raycell.ingest.robustness import LEVELS, perturbation_robustness, write_robustness

    if not args.images or args.masks or args.raw_dir:
        raise UserError(
            "segmentation-eval --perturb: give --images only (the clean segmentation is the "
            "reference; no masks, no RAW_DIR)"
        )
    try:
        seeds = [int(x) for x in args.seeds]
    except ValueError:
        raise UserError(f"segmentation-eval --seeds: {args.seeds} are not integers") from None
    over = dataclasses.asdict(load_config(None, args.set).ingest)
    x = args.crosstalk_from
    kw = {"effects": args.effects} if args.effects else {}
    res = perturbation_robustness(
        args.images,
        seeds=seeds,
        levels=args.levels or LEVELS,
        unseen_extreme=args.unseen_extreme,
        iou=args.iou,
        channel=args.channel,
        crosstalk_from=int(x) if x.isdigit() else (x or None),
        overrides=over,
        progress=True,
        **kw,
    )
    print(res["table"])
    if args.out:
        write_robustness(res, args.out)
        print(f"[raycell] segmentation-eval --perturb -> {args.out}")
    return res


def run_models(args) -> None:
    """`raycell models`: the registered model types, one a line."""
    from raycell.models import list_models

    print("\n".join(list_models()))


def run_check_cluster(args) -> dict:
    """`raycell check-cluster FILE...`: each file checked offline; the first problem is one line."""
    from raycell.cluster_config import check_cluster_file

    kinds = {}
    for f in args.files:
        kinds[f], _ = check_cluster_file(f)
        what = "KubeRay RayJob" if kinds[f] == "rayjob" else "Ray cluster launcher config"
        print(f"[raycell] {f}: OK ({what})")
    return kinds


# verbs that need no config (and no Ray)
TOOLS = {
    "import-armed": run_import_armed,
    "segmentation-eval": run_segmentation_eval,
    "models": run_models,
    "check-cluster": run_check_cluster,
}


def run(argv: list[str] | None = None) -> dict | None:
    """Run one verb; returns its result (for tests and jobs)."""
    global _started_ray
    _started_ray = False
    args = build_parser().parse_args(argv)
    if args.command in TOOLS:
        return TOOLS[args.command](args)
    if args.command == "config" and args.defaults:
        print(defaults_yaml(), end="")
        return None
    given = config_overrides(
        args
    )  # (key=value, what the user typed): errors name the flag or --set
    cfg = load_config(args.config, [ov for ov, _ in given], [typed for _, typed in given])
    if args.command == "config":
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return None
    cfg = preflight(args, cfg)
    if args.command in NEEDS_RAY:
        import ray

        from raycell.utils.ray_utils import init_ray, keep_native_logs_off_terminal

        _started_ray = not ray.is_initialized()  # an interruption stops only a Ray started here
        init_ray(
            cfg.ray.address,
            cfg.ray.num_cpus,
            cfg.ray.object_store_mb,
            cfg.ray.progress,
            cfg.ray.connect_timeout_s,
            verbose=cfg.ray.verbose,
            start_timeout_s=cfg.ray.start_timeout_s,
        )
        if not cfg.ray.verbose:
            keep_native_logs_off_terminal()
    if args.command == "synth":
        return pipeline.run_synth(cfg, overwrite=args.overwrite)
    if args.command == "experiment":
        from raycell.experiments import run_medl_experiment

        return run_medl_experiment(
            cfg,
            args.seeds,
            args.models,
            args.out,
            randomized_z=args.randomized_z,
            baseline=args.baseline,
            z_modes=args.z_modes,
            tune=args.tune,
            tune_samples=args.tune_samples,
            tune_folds=args.tune_folds,
            command="raycell " + " ".join(argv if argv is not None else sys.argv[1:]),
        )
    return STAGES[args.command](cfg)


def preflight(args, cfg):
    """Everything a verb can check without Ray, before Ray starts (a Ray start-up costs 5-20 s).

    Returns the config to run with (`train --resume` takes the run's recorded one); `experiment`'s seeds
    and models are parsed into `args` in place.
    """
    busy_check(args.command, cfg)
    if args.command == "train":
        from raycell.cli import overrides_from_args
        from raycell.config import explicit_keys
        from raycell.train.trainer import check_train, resume_config

        if cfg.train.resume:
            cfg = resume_config(cfg, explicit_keys(args.config, overrides_from_args(args)))
        check_train(cfg)
    elif args.command == "ingest":
        from raycell.ingest.plan import check_config

        check_config(cfg)
    elif args.command == "infer":
        from raycell.infer.batch import check_config

        check_config(cfg)
    elif args.command == "embed":
        from raycell.profiling.embed import check_embed

        check_embed(cfg)
    elif args.command == "profile":
        from raycell.profiling.profile_folder import ProfileSettings, check_settings

        check_settings(ProfileSettings.from_config(cfg))
    elif args.command == "tune":
        from raycell.cli import overrides_from_args
        from raycell.config import explicit_keys
        from raycell.tune import check_tune, resume_search_config

        if cfg.tune.resume:
            cfg = resume_search_config(cfg, explicit_keys(args.config, overrides_from_args(args)))
        check_tune(cfg)
    elif args.command == "demo":
        pipeline.check_demo(cfg)
    elif args.command == "experiment":
        from raycell.experiments import MEDL_MODELS, check_medl, parse_seeds

        args.seeds = parse_seeds(args.seeds)
        args.models = args.models or MEDL_MODELS
        check_medl(cfg, args.seeds, args.models, args.tune, args.tune_samples, args.tune_folds)
    return cfg


# verb -> (the output it writes, its key): a second run into an output being written refuses before
# Ray starts (infer and embed check in `check_config`, where their default output is known)
_WRITES = {
    "ingest": ("ingest.out", lambda c: c.ingest.out),
    "train": ("train.resume run folder", lambda c: c.train.resume),
    "tune": ("tune.out", lambda c: c.tune.out),
    "synth": ("synth.out", lambda c: c.synth.out),
    "export": ("export output", lambda c: c.export.out),
    "split": ("data.path (split rewrites its shards)", lambda c: c.data.path),
    "profile": ("profile.out", lambda c: c.profile.out),
    "report": (
        "report.out",
        lambda c: c.report.out or (c.report.folder and f"{c.report.folder}/report"),
    ),
}


def busy_check(command: str, cfg) -> None:
    """Refuse, in one line, a verb whose output a live run is writing (`raycell.utils.locks`)."""
    from raycell.utils.locks import check_free

    if command in _WRITES:
        what, get = _WRITES[command]
        if get(cfg):
            check_free(get(cfg), what)


def main(argv: list[str] | None = None) -> int:
    """Console entry point.

    Exit status: 0, 2 for an error the user can fix (a disk that is full, read-only or not theirs
    included: `raycell.errors.environment_problem`), 130 / 143 after Ctrl-C / SIGTERM (one line,
    `raycell.utils.interrupts`); anything else is a bug and keeps its traceback.
    """
    from raycell.errors import environment_problem
    from raycell.utils.interrupts import exit_status, raise_on_sigterm, resume_hint

    try:
        with raise_on_sigterm():
            run(argv)
    except user_errors() as exc:
        # KeyError's str() is the repr of its message (quoted): unwrap it, keep every other quote
        msg = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
        print(f"raycell: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        _stop_ray()
        command = next(
            (a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), ""
        )
        print(f"\nraycell: {resume_hint(command, exc)}", file=sys.stderr, flush=True)
        return exit_status(exc)
    except Exception as exc:
        problem = environment_problem(exc)
        if problem is None:
            raise
        print(f"raycell: error: {problem}", file=sys.stderr)
        return 2
    return 0


_started_ray = False  # whether `run` started this process's Ray (not a caller's, e.g. a notebook's)


def _stop_ray() -> None:
    """Stop the Ray this command started (a local instance's processes end with it) after an
    interruption; a Ray the caller had started before (a notebook, a test session) is left running.
    """
    ray = sys.modules.get("ray")
    try:
        if _started_ray and ray is not None and ray.is_initialized():
            ray.shutdown()
    except BaseException:  # noqa: BLE001 - a second Ctrl-C or a dying Ray: exit anyway
        pass


if __name__ == "__main__":
    sys.exit(main())
