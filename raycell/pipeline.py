"""The stages as functions of one `ExperimentConfig`, and the end-to-end demo that chains them.

The CLI (`raycell.__main__`) and the `jobs/` scripts call these; they only add argument parsing and
`ray.init`. Functions that need Ray expect it initialised (`raycell.utils.ray_utils.init_ray`).
`train_infer_evaluate` is the one path from a config to an evaluated model, shared by `run_demo` and
`raycell experiment` (`raycell.experiments`, which imports this module, never the other way).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from raycell.config import ExperimentConfig, save_config
from raycell.utils.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from raycell.formats.manifest import DatasetManifest


def run_synth(cfg: ExperimentConfig, overwrite: bool = False) -> DatasetManifest | dict:
    """`_run_synth`, holding the lock of `synth.out` (a second synth into it refuses)."""
    from raycell.utils.locks import writing

    with writing(cfg.synth.out, "synth.out"):
        return _run_synth(cfg, overwrite)


def _run_synth(cfg: ExperimentConfig, overwrite: bool = False) -> DatasetManifest | dict:
    """Generate the synthetic data set into `cfg.synth.out` (raw fields of view with `synth.raw`).

    Returns the data set's manifest, or with `synth.raw` the summary of the raw fields written.
    """
    from raycell.data.synthetic import AUTO_RAY_CELLS, write_synthetic

    s = cfg.synth
    if s.raw:
        from raycell.data.synthetic_raw import from_config

        res = from_config(cfg, overwrite=overwrite)
        print(
            f"[raycell] synth --raw -> {Path(s.out).absolute()}: "
            f"{ {k: v for k, v in res.items() if isinstance(v, (int, float, str))} }",
            flush=True,
        )
        return res
    t0 = time.time()
    # synth.num_workers -1: Ray tasks from 200,000 cells (raycell.data.synthetic.AUTO_RAY_CELLS)
    chunking = dict(
        chunk_cells=s.chunk_cells or None, num_workers=None if s.num_workers < 0 else s.num_workers
    )
    if s.num_workers > 0 or (s.num_workers < 0 and s.n_cells >= AUTO_RAY_CELLS):
        from raycell.utils.ray_utils import init_ray_from

        init_ray_from(cfg.ray)
    # the arguments both crop designs take (the others in the order the manifest records them)
    common = dict(
        n_cells=s.n_cells,
        crop_size=s.crop_size,
        rows_per_shard=s.rows_per_shard,
        overwrite=overwrite,
        seed=cfg.seed,
        effects=s.crop_effects,
        unseen_extreme=s.unseen_extreme,
        **chunking,
    )
    if s.design == "timedose":
        from raycell.data.synthetic_timedose import write_timedose

        m = write_timedose(
            str(Path(s.out).absolute()),
            times=list(s.times),
            doses=list(s.doses),
            n_batches=s.n_batches,
            n_unseen=s.n_unseen,
            replicates=s.replicates,
            batch_strength=s.batch_strength,
            effect_strength=s.effect_strength,
            **common,
        )
    else:
        m = write_synthetic(
            str(Path(s.out).absolute()),
            n_lines=s.n_lines,
            n_batches=s.n_batches,
            n_unseen=s.n_unseen,
            lines_per_batch=s.lines_per_batch,
            wells_per_line=s.wells_per_line,
            confounding=s.confounding,
            batch_strength=s.batch_strength,
            phenotype_strength=s.phenotype_strength,
            **common,
        )
    print(
        f"[raycell] synth: {m.n_cells} cells, {len(m.batch_vocab)} batches "
        f"(suggested unseen: {m.suggested_unseen}), {len(m.shards)} shard(s) -> "
        f"{Path(s.out).absolute()} in {time.time() - t0:.1f}s",
        flush=True,
    )
    return m


def run_split(cfg: ExperimentConfig) -> DatasetManifest:
    """Assign splits in `cfg.data.path`; returns the updated manifest."""
    from raycell.data.splits import split_dataset
    from raycell.utils.locks import writing

    with writing(cfg.data.path, "data.path (split rewrites its shards)", make_parent=False):
        m = _split(cfg, split_dataset)
    vb = m.split_params["val_batches"]
    print(
        f"[raycell] split {Path(cfg.data.path).absolute()}: {m.counts_per_split} "
        f"(unseen batches: {m.split_params['unseen']}"
        f"{f'; validation batches: {vb}' if vb else ''})",
        flush=True,
    )
    return m


def _split(cfg: ExperimentConfig, split_dataset) -> DatasetManifest:
    """`split_dataset` with the `split.*` keys (under the data set's lock)."""
    return split_dataset(
        cfg.data.path,
        unseen=list(cfg.split.unseen),
        group_by=cfg.split.group_by,
        stratify=list(cfg.split.stratify),
        fractions=list(cfg.split.fractions),
        seed=cfg.seed,
        val_batches=list(cfg.split.val_batches),
        progress=bool(cfg.ray.progress),
    )


def run_train(cfg: ExperimentConfig) -> dict:
    """Train one model on Ray Train."""
    from raycell.train.trainer import train

    return train(cfg)


def run_tune(cfg: ExperimentConfig) -> dict:
    """Hyperparameter search over `cfg.tune.space` (Ray Tune: Optuna + ASHA, one Ray Train run per trial).

    Returns {"out", "trials_csv", "best_yaml", "plot", "best", "trials"}; see `raycell.tune.run_search`.
    """
    from raycell.tune import run_search

    return run_search(cfg)


def run_infer(cfg: ExperimentConfig) -> dict:
    """Batch inference with Ray Data."""
    from raycell.infer.batch import predict

    return predict(cfg)


def run_embed(cfg: ExperimentConfig) -> dict:
    """Embeddings in the profiling layout, plus well profiles (Ray Data, infer's machinery)."""
    from raycell.infer.embed import embed

    return embed(cfg)


def run_export(cfg: ExperimentConfig) -> dict:
    """Embeddings -> .h5ad (AnnData) or the CytoTable layout (parquet/csv), per cell or per well."""
    from raycell.config import ConfigError
    from raycell.profiling.export import export

    e = cfg.export
    if not e.embeddings or not e.out:
        raise ConfigError(
            "export needs export.embeddings and export.out (--embeddings DIR --out FILE)"
        )
    s = export(
        e.embeddings,
        e.out,
        fmt=e.format,
        level=e.level,
        top_k=e.top_k,
        drop_zero_variance=e.drop_zero_variance,
        with_morph=e.with_morph,
        umap=e.umap,
        seed=cfg.seed,
        overwrite=e.overwrite,
    )
    print(
        f"[raycell] exported {s['n_obs']} {s['level']} rows x {s['n_vars']} features "
        f"({s['n_dropped']} dropped) -> {s['path']}",
        flush=True,
    )
    return s


def run_profile(cfg: ExperimentConfig) -> dict:
    """Features -> control-normalised well profiles + copairs retrieval metrics (no Ray)."""
    from raycell.profiling.profile_folder import ProfileSettings, profile, summary_lines
    from raycell.utils.locks import writing

    settings = ProfileSettings.from_config(cfg)
    import contextlib

    # one writer per output folder (an empty profile.out is refused by `profile` itself)
    with writing(settings.out, "profile.out") if settings.out else contextlib.nullcontext():
        res = profile(settings)
    print(
        f"[raycell] profile: {res['n_profiles']} profiles x {res['n_features']} features -> "
        f"{res['out']}",
        flush=True,
    )
    for line in res["notes"] + summary_lines(res["retrieval"] or {}):
        print(f"[raycell]   {line}", flush=True)
    return res


def run_report(cfg: ExperimentConfig) -> dict:
    """The HTML report of `cfg.report.folder` (no Ray)."""
    from raycell.config import ConfigError
    from raycell.report import build_report

    if not cfg.report.folder:
        raise ConfigError("report needs a folder: raycell report FOLDER (report.folder)")
    from raycell.utils.locks import writing

    with writing(
        cfg.report.out or Path(cfg.report.folder) / "report", "report.out", make_parent=False
    ):
        page = build_report(
            cfg.report.folder, cfg.report.out or None, max_cells=cfg.report.max_cells, seed=cfg.seed
        )
    print(f"[raycell] report: {page}", flush=True)
    return {"html": str(page)}


def run_ingest(cfg: ExperimentConfig) -> dict:
    """Raw images -> crop shards + rejects table (Ray Data, one task per field of view)."""
    from raycell.ingest.driver import ingest_fields

    s = ingest_fields(cfg)
    print(
        f"[raycell] ingest {s.get('input')}: {s.get('n_fovs_in')} field(s) of view -> "
        f"{s.get('n_cells')} cells from {s.get('n_fovs_with_cells')} field(s), "
        f"{s.get('n_fovs_rejected')} rejected {s.get('rejects_by_code') or ''} -> {s.get('out')}",
        flush=True,
    )
    for note in s.get("notes", []):
        print(f"[raycell] note: {note}", flush=True)
    return s


def run_infer_z(cfg: ExperimentConfig) -> dict:
    """Train the Z-predictor and write soft Z for unseen-batch cells."""
    from raycell.zpredictor import infer_z

    return infer_z(cfg)


def run_evaluate(cfg: ExperimentConfig) -> dict:
    """Metrics from a predictions folder."""
    from raycell.eval.evaluate import evaluate_predictions

    if cfg.eval.profiles:
        return _evaluate_profiles(cfg)
    if not cfg.eval.predictions:
        from raycell.config import ConfigError

        raise ConfigError("evaluate needs eval.predictions (--predictions FOLDER)")
    return evaluate_predictions(
        cfg.eval.predictions,
        cfg.eval.out or None,
        max_cells=cfg.eval.max_cells,
        seed=cfg.seed,
        baseline=cfg.eval.baseline,
        baseline_features=cfg.eval.baseline_features,
    )


def _evaluate_profiles(cfg: ExperimentConfig) -> dict:
    """`evaluate --profiles`: copairs retrieval metrics of well profiles as given, into eval.out."""
    import dataclasses

    from raycell.config import ConfigError
    from raycell.profiling.profile_folder import ProfileSettings, score_profiles, summary_lines

    if not cfg.eval.out:
        raise ConfigError("evaluate --profiles needs an output folder: --out (eval.out)")
    s = dataclasses.replace(
        ProfileSettings.from_config(cfg), input=cfg.eval.profiles, out=cfg.eval.out
    )
    res = score_profiles(cfg.eval.profiles, s)
    print(f"[raycell] evaluate --profiles {cfg.eval.profiles} -> {res['out']}", flush=True)
    for line in summary_lines(res["retrieval"]):
        print(f"[raycell]   {line}", flush=True)
    return res


@dataclass(frozen=True)
class Inference:
    """One output of a shared inference pass: a checkpoint, how its cells get Z, where it goes."""

    checkpoint: str
    out: Path  # predictions go to out/predictions, the evaluation to out/eval
    z_source: str = ""
    randomize_z: bool = False


def infer_evaluate_all(
    cfg: ExperimentConfig, inferences: list[Inference], quiet: bool = False
) -> list[dict]:
    """Infer every `Inference` in one Ray Data pass (one actor pool, each checkpoint loaded once per
    actor: `raycell.infer.batch.predict_many`), then evaluate each into its out/eval.

    Inference takes everything else from `cfg.infer` (splits, actors); a model type whose registry
    entry uses Z gets a soft Z for its unseen batches from the Z-predictor: its `z_source` when given,
    else one trained now for its checkpoint into out/inferred_z (before the pass: the pass reads it).
    Returns the evaluate reports, in order.
    """
    from raycell.eval.evaluate import evaluate_predictions
    from raycell.formats.checkpoint import find_checkpoint, read_meta
    from raycell.infer.batch import predict_many
    from raycell.models import model_entry

    cfgs = []
    for inf in inferences:
        out = Path(inf.out)
        c = copy.deepcopy(cfg)
        c.infer.checkpoint = str(inf.checkpoint)
        c.infer.out = str(out / "predictions")
        c.infer.z_source, c.infer.randomize_z = inf.z_source, inf.randomize_z
        uses_z = model_entry(read_meta(find_checkpoint(inf.checkpoint)).model_type).uses_z
        if uses_z and not inf.z_source and not inf.randomize_z:
            c.infer.z_out = str(out / "inferred_z")
            run_infer_z(c)
            c.infer.z_source = c.infer.z_out
        cfgs.append(c)
    predict_many(cfgs)
    return [
        evaluate_predictions(
            Path(inf.out) / "predictions",
            Path(inf.out) / "eval",
            max_cells=cfg.eval.max_cells,
            seed=cfg.seed,
            quiet=quiet,
        )
        for inf in inferences
    ]


def infer_evaluate(
    cfg: ExperimentConfig,
    checkpoint: str | Path,
    out: str | Path,
    z_source: str = "",
    quiet: bool = False,
) -> dict:
    """Infer `checkpoint` (a checkpoint or run folder) into `out`/predictions and evaluate it into `out`/eval
    (`infer_evaluate_all` with one output, `infer.randomize_z` from `cfg`).
    """
    one = Inference(str(checkpoint), Path(out), z_source, bool(cfg.infer.randomize_z))
    return infer_evaluate_all(cfg, [one], quiet=quiet)[0]


def train_model(cfg: ExperimentConfig, out: str | Path | None = None) -> dict:
    """Train a model of type `cfg.model.type` (with its training curves) for inference into `out`.

    Returns {"run_dir", "checkpoint" (the best epoch's with early stopping, else the run's latest),
    "train_seconds", "metrics", "history", "out" (default: the run folder)}.
    """
    import shutil

    from raycell.plots import training_curves

    t0 = time.time()
    res = run_train(cfg)
    run_dir = Path(res["run_dir"])
    train_seconds = round(time.time() - t0, 1)
    if res["history"]:
        training_curves(res["history"], run_dir / "training_curves.png", title=cfg.model.type)
    out = Path(out) if out else run_dir
    # a fresh model: predictions left by an interrupted earlier attempt in `out` are another model's
    shutil.rmtree(out / "predictions", ignore_errors=True)
    # Model selection: with early stopping (train.early_stopping_patience), the best epoch's checkpoint by
    # train.early_stopping_metric (e.g. valbatch_auroc on held-out seen batches), else the latest one.
    return {
        "run_dir": str(run_dir),
        "checkpoint": str(res.get("best_checkpoint") or run_dir),
        "train_seconds": train_seconds,
        "metrics": res["metrics"],
        "history": res["history"],
        "out": str(out),
    }


def train_infer_evaluate(
    cfg: ExperimentConfig, out: str | Path | None = None, z_source: str = "", quiet: bool = False
) -> dict:
    """Train a model of type `cfg.model.type` (`train_model`), then `infer_evaluate` it into `out`
    (default: its run folder).

    Returns {"run_dir", "checkpoint", "train_seconds", "metrics", "history" (from training), "eval" (the
    evaluate report)}.
    """
    trained = train_model(cfg, out)
    ev = infer_evaluate(
        cfg, trained["checkpoint"], trained.pop("out"), z_source=z_source, quiet=quiet
    )
    return {**trained, "eval": ev}


def check_demo(cfg: ExperimentConfig) -> None:
    """What the demo can check before Ray starts: its model types (the config checked the rest)."""
    from raycell.config import ConfigError
    from raycell.models import list_models

    bad = [m for m in cfg.demo.models if m not in list_models()]
    if bad or not cfg.demo.models:
        raise ConfigError(
            f"demo.models: {f'unknown model type(s) {bad}' if bad else 'empty'}; registered: "
            f"{', '.join(list_models())}"
        )


def run_demo(cfg: ExperimentConfig) -> dict:
    """Synth -> split -> (train -> infer -> evaluate) per model type -> comparison table, on local Ray."""
    from raycell.eval.evaluate import format_table

    check_demo(cfg)
    t0 = time.time()
    out = Path(cfg.demo.out).absolute()
    from raycell.formats.shards import ShardError
    from raycell.utils.outputs import DATASET, check_output

    # the data folder is regenerated (overwrite) on every demo: refuse a user's folder before anything runs
    check_output(out / "data", what="demo.out data folder", kind=DATASET, error=ShardError)
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    cfg.synth.out = str(out / "data")
    cfg.data.path = cfg.synth.out
    cfg.train.runs_dir = str(out / "runs")
    save_config(cfg, out / "config.yaml")
    run_synth(cfg, overwrite=True)
    run_split(cfg)
    rows, seen_unseen = {}, {}
    for model_type in cfg.demo.models:
        c = copy.deepcopy(cfg)
        c.name = "demo"
        c.model.type = model_type
        res = train_infer_evaluate(c)  # into the run folder: predictions/, eval/ (+ inferred_z/)
        ev = res["eval"]
        for split, r in ev["splits"].items():
            rows[f"{model_type}/{split}"] = r
        seen_unseen[model_type] = {
            "run_dir": res["run_dir"],
            "pca_plot": ev.get("pca_plot"),
            "seen_test": ev["splits"].get("test", {}),
            "unseen": ev["splits"].get("unseen", {}),
        }
    keep = {k: v for k, v in rows.items() if k.endswith("/test") or k.endswith("/unseen")}
    table = format_table(
        keep, title="raycell demo: seen-batch test split vs unseen batches", first="model/split"
    )
    summary = {"out": str(out), "seconds": round(time.time() - t0, 1), "models": seen_unseen}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.txt", table + "\n")
    from raycell.report import (
        build_report,  # after summary.json: the report recognises a demo by it
    )

    summary["report"] = str(build_report(out, max_cells=cfg.report.max_cells, seed=cfg.seed))
    atomic_write_json(out / "summary.json", summary)
    print("\n" + table)
    print(f"\n[raycell] demo finished in {summary['seconds']}s. Everything is under {out}:")
    print(f"  data set      {out / 'data'}")
    for m, s in seen_unseen.items():
        print(f"  {m:<13} run {s['run_dir']}\n  {'':<13} PCA {s['pca_plot']}")
    print(f"  summary       {out / 'summary.json'}, {out / 'summary.txt'}")
    print(f"  report        {summary['report']}  (open it in a browser)", flush=True)
    return summary
