"""`raycell` / `python -m raycell`: parse, build the config, start Ray when the verb needs it, dispatch.

Each verb is one `COMMANDS` entry: the function it runs (a `raycell.pipeline` stage, or a config-free
tool below), whether it needs Ray, what it checks first and what it writes. Errors a user can fix
(bad config key, missing data set, wrong shard, unknown label) print one line naming the file or key
and exit with status 2; anything else is a bug and keeps its traceback. Each verb checks what it can
without Ray (`preflight`) before Ray starts, so bad input costs no Ray start-up.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raycell import pipeline
from raycell.cli import build_parser, config_overrides
from raycell.config import defaults_yaml, load_config
from raycell.errors import user_errors

if TYPE_CHECKING:
    from raycell.formats.manifest import DatasetManifest


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
    import json
    from pathlib import Path

    from raycell.errors import UserError
    from raycell.ingest.params import IngestParams
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
        params = IngestParams.from_config(load_config(None, args.set).ingest)
        res = evaluate_pairs(
            args.images,
            args.masks,
            group_by=args.group_by,
            pair_regex=args.pair_regex,
            iou=args.iou,
            channel=args.channel,
            method=args.method,
            params=params,
        )
        print(json.dumps({k: v for k, v in res.items() if k != "per_image"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return res


def _perturb(args) -> dict:
    """`segmentation-eval --perturb --images G`: robustness of the segmentation to simulated plate effects."""
    from raycell.errors import UserError
    from raycell.ingest.params import IngestParams
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
    params = IngestParams.from_config(load_config(None, args.set).ingest)
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
        params=params,
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


def run_config(args) -> None:
    """`raycell config [--defaults]`: the merged configuration (or every key's default) as YAML."""
    if args.defaults:
        print(defaults_yaml(), end="")
        return None
    import yaml

    print(yaml.safe_dump(_load(args).to_dict(), sort_keys=False), end="")
    return None


def run_experiment(cfg, args) -> dict:
    """`raycell experiment medl`: every ARMED model x seed, inferred and evaluated (`experiments`)."""
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
        command="raycell " + " ".join(args.argv),
    )


# What each verb checks without Ray, before Ray starts (a Ray start-up costs 5-20 s). Each returns
# the config to run with: `train --resume` / `tune.resume` take the run's recorded one.


def _check_train(args, cfg):
    from raycell.train.trainer import check_train, resume_config

    if cfg.train.resume:
        cfg = resume_config(cfg, _explicit(args))
    check_train(cfg)
    return cfg


def _check_tune(args, cfg):
    from raycell.tune import check_tune, local_ray_cpus, resume_search_config

    if cfg.tune.resume:
        cfg = resume_search_config(cfg, _explicit(args))
    check_tune(cfg)
    cfg.ray.num_cpus = local_ray_cpus(cfg, cfg.tune.folds)
    return cfg


def _check_with(module: str, name: str) -> Callable:
    """The stage's own pre-Ray check `module.name(cfg)` as a command's `check`, imported only when
    its verb runs (so `raycell models` does not import ingest or Ray Data).
    """

    def check(args, cfg):
        getattr(importlib.import_module(module), name)(cfg)
        return cfg

    return check


def _check_profile(args, cfg):
    from raycell.profiling.profile_folder import ProfileSettings, check_settings

    check_settings(ProfileSettings.from_config(cfg))
    return cfg


def _profile_needs_ray(cfg) -> bool:
    from raycell.profiling.streamed import source, use_ray

    p = cfg.profile
    return use_ray(p.engine, source(p.engine, p.input), p.features)


def _check_experiment(args, cfg):
    """Also parses `--seeds` and fills `--models` into `args`, for `run_experiment`."""
    from raycell.experiments import MEDL_MODELS, check_medl, parse_seeds

    args.seeds = parse_seeds(args.seeds)
    args.models = args.models or MEDL_MODELS
    check_medl(cfg, args.seeds, args.models, args.tune, args.tune_samples, args.tune_folds)
    if args.tune:
        from raycell.tune import local_ray_cpus

        cfg.ray.num_cpus = local_ray_cpus(cfg, args.tune_folds)
    return cfg


def _explicit(args) -> set:
    """The keys the user gave on this command line (they win over a resumed run's record)."""
    from raycell.cli import overrides_from_args
    from raycell.config import explicit_keys

    return explicit_keys(args.config, overrides_from_args(args))


def _stage(fn):
    """A pipeline stage `fn(cfg)` as a command's `run(cfg, args)`."""
    return lambda cfg, args: fn(cfg)


@dataclass(frozen=True)
class Command:
    """One verb's wiring: adding a verb is one `COMMANDS` entry (plus its flags in `raycell.cli`).

    Attributes:
        run: `run(cfg, args)` for a verb that takes the configuration, `run(args)` for a tool.
        uses_config: False for the tools that read only their flags (no config, no Ray).
        needs_ray: whether Ray is started (or joined: `ray.address`) before `run`; a function of
            the checked config where the input decides (`profile.engine`).
        check: what is checked before Ray, `check(args, cfg) -> cfg`.
        writes: (what, the output path from the config): a second run into an output that a live run
            is writing refuses in one line before Ray starts (`raycell.utils.locks`); infer and embed
            check in their `check`, where their default output is known.
    """

    run: Callable
    uses_config: bool = True
    needs_ray: bool | Callable = False
    check: Callable | None = None
    writes: tuple[str, Callable] | None = None


COMMANDS: dict[str, Command] = {
    "synth": Command(
        lambda cfg, args: pipeline.run_synth(cfg, overwrite=args.overwrite),
        writes=("synth.out", lambda c: c.synth.out),
    ),
    "split": Command(
        _stage(pipeline.run_split),
        writes=("data.path (split rewrites its shards)", lambda c: c.data.path),
    ),
    "ingest": Command(
        _stage(pipeline.run_ingest),
        needs_ray=True,
        check=_check_with("raycell.ingest.plan", "check_ingest"),
        writes=("ingest.out", lambda c: c.ingest.out),
    ),
    "train": Command(
        _stage(pipeline.run_train),
        needs_ray=True,
        check=_check_train,
        writes=("train.resume run folder", lambda c: c.train.resume),
    ),
    "tune": Command(
        _stage(pipeline.run_tune),
        needs_ray=True,
        check=_check_tune,
        writes=("tune.out", lambda c: c.tune.out),
    ),
    "infer": Command(
        _stage(pipeline.run_infer),
        needs_ray=True,
        check=_check_with("raycell.infer.batch", "check_infer"),
    ),
    "infer-z": Command(_stage(pipeline.run_infer_z)),
    "evaluate": Command(_stage(pipeline.run_evaluate)),
    "embed": Command(
        _stage(pipeline.run_embed),
        needs_ray=True,
        check=_check_with("raycell.infer.embed", "check_embed"),
    ),
    "export": Command(
        _stage(pipeline.run_export), writes=("export output", lambda c: c.export.out)
    ),
    "profile": Command(
        _stage(pipeline.run_profile),
        needs_ray=_profile_needs_ray,
        check=_check_profile,
        writes=("profile.out", lambda c: c.profile.out),
    ),
    "report": Command(
        _stage(pipeline.run_report),
        writes=(
            "report.out",
            lambda c: c.report.out or (c.report.folder and f"{c.report.folder}/report"),
        ),
    ),
    "demo": Command(
        _stage(pipeline.run_demo),
        needs_ray=True,
        check=_check_with("raycell.pipeline", "check_demo"),
    ),
    "experiment": Command(run_experiment, needs_ray=True, check=_check_experiment),
    "config": Command(run_config, uses_config=False),
    "import-armed": Command(run_import_armed, uses_config=False),
    "segmentation-eval": Command(run_segmentation_eval, uses_config=False),
    "models": Command(run_models, uses_config=False),
    "check-cluster": Command(run_check_cluster, uses_config=False),
}


def _load(args):
    """The configuration: file, then flags and `--set` (errors name the flag or `--set` typed)."""
    given = config_overrides(args)  # (key=value, what the user typed)
    return load_config(args.config, [ov for ov, _ in given], [typed for _, typed in given])


def run(argv: list[str] | None = None) -> dict | None:
    """Run one verb; returns its result (for tests and jobs)."""
    global _started_ray
    _started_ray = False
    args = build_parser().parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    cmd = COMMANDS[args.command]
    if not cmd.uses_config:
        return cmd.run(args)
    cfg = preflight(args, _load(args))
    if cmd.needs_ray(cfg) if callable(cmd.needs_ray) else cmd.needs_ray:
        import ray

        from raycell.utils.ray_utils import init_ray_from, keep_native_logs_off_terminal

        _started_ray = not ray.is_initialized()  # an interruption stops only a Ray started here
        init_ray_from(cfg.ray)
        if not cfg.ray.verbose:
            keep_native_logs_off_terminal()
    return cmd.run(cfg, args)


def preflight(args, cfg):
    """Everything a verb can check without Ray: its output is not being written, then its `check`."""
    from raycell.utils.locks import check_free

    cmd = COMMANDS[args.command]
    if cmd.writes:
        what, get = cmd.writes
        if get(cfg):
            check_free(get(cfg), what)
    return cmd.check(args, cfg) if cmd.check else cfg


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
