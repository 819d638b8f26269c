"""Experiments comparing model types end to end: `raycell experiment medl` (ARMED Table V analogue).

`run_medl_experiment` generates the synthetic data set at `data.path` when nothing is there yet (and
splits it when it is unsplit), then trains conventional, adversarial, random-effects and
mixed-effects AECs for K seeds on that one data set through the same Ray Train path as
`raycell train`, infers a soft Z for the unseen batches (`raycell infer-z`, once per seed: the
Z-predictor depends on the data only, not on the AEC), runs batch inference (Ray Data) on the
seen-batch test split and the unseen batches, evaluates, and writes a table of mean ± s.d. over
seeds. Each model is trained by `raycell.pipeline.train_model`; then every row of the seed (each model,
its randomized-Z and Z-mode rows, the tuned rows) is inferred in one Ray Data pass
(`raycell.pipeline.infer_evaluate_all`: one actor pool, each checkpoint loaded once per actor) and
evaluated as `raycell demo` evaluates.

Randomized Z (the reference's `--randomize_batch` ablation) is an option of the experiment, not a
model: with `randomized_z` (`--randomized-z`, the default) every checkpoint whose model type uses Z
(its registry entry's `uses_z`: randomeffects, mixedeffects) is inferred a second time with a random
one-hot Z row per cell (`infer.randomize_z`), with no second training, and reported as its own row,
"<model> + randomized Z".

Every table also has hand-made-feature baseline rows (`baseline`, the default; see
`raycell.eval.baseline`): a balanced logistic regression on the data set's `morph_*` columns and one
on those plus the crops' CellProfiler-style intensity and texture (without `morph_*` columns, one row
on features computed from the crops; `eval.baseline_features` picks one set instead), fitted on the
same `train` split and scored with the same metrics, so the table shows whether the deep models beat
features on the unseen batches. Features are computed once per experiment; each seed refits them.

Layout of `out` (a re-run skips every (seed, model) row whose `result.json` exists, so an interrupted
experiment continues where it stopped, and seeds run as separate processes into the same `out` are
combined by one more run over all seeds):

    out/seed<S>/zpredictor/                 inferred_z.parquet/.json for the unseen cells
    out/seed<S>/runs/                       Ray Train run folders (checkpoints, metrics.json)
    out/seed<S>/<model>/                    predictions/, eval/ (metrics.json, latent_pca.png), result.json
    out/seed<S>/<model>/randomized_z/       the same checkpoint inferred with randomized Z (same files)
    out/seed<S>/baseline/result.json        the hand-made-feature baseline row (baseline_all/: the richer set)
    out/tune/<model>/search/, chosen.json   with `tune`: the model type's own search and its chosen weights
    out/seed<S>/<model>_tuned/              the row trained with the chosen weights
    out/results.json, table.csv, table.md

With `tune` (`--tune`), each model type first gets its own small `raycell tune` search over the loss
weights its objective has (`TUNE_SPACES`), judged on held-out seen batches (`tune.folds` cross-batch
folds, `valbatch_auroc`), as the paper tuned its weights; the table then has a "<model> (tuned)" row
beside the row with the configured weights, and notes the chosen weights.
"""

from __future__ import annotations

import copy
import functools
import math
import shutil
import time
from pathlib import Path

import numpy as np

from raycell import constants as K
from raycell.config import ConfigError, ExperimentConfig
from raycell.eval.baseline import BASELINE_MODEL
from raycell.pipeline import Inference, infer_evaluate_all, run_split, run_synth, train_model
from raycell.utils.io import atomic_write_json, atomic_write_text, read_json

MEDL_MODELS = [
    "conventional",
    "adversarial",
    "randomeffects",
    "mixedeffects",
]  # the default --models
BASELINE_DIR = "baseline"  # out/seed<S>/baseline/: the hand-made-feature baseline row
RANDOMIZED_Z_DIR = "randomized_z"  # out/seed<S>/<model>/randomized_z/: the randomized-Z row

# (column, split, metric key, header, format): the table, in order. DB/CH/probe on the seen test
# split, which has every seen batch (the unseen split has only the held-out ones).
COLUMNS = [
    ("seen_auroc", K.TEST, "auroc", "seen AUROC", "{:.3f}"),
    ("unseen_auroc", K.UNSEEN, "auroc", "unseen AUROC", "{:.3f}"),
    ("seen_mse", K.TEST, "mse", "seen MSE", "{:.5f}"),
    ("unseen_mse", K.UNSEEN, "mse", "unseen MSE", "{:.5f}"),
    ("db", K.TEST, "db", "latent DB (batch) ↑", "{:.2f}"),
    ("ch", K.TEST, "ch", "latent CH (batch) ↓", "{:.1f}"),
    ("batch_probe_acc", K.TEST, "batch_probe_acc", "batch-probe acc ↓", "{:.3f}"),
    ("probe_within_label", K.TEST, "batch_probe_within_label", "probe within label ↓", "{:.3f}"),
]


def row_label(model: str, randomize_z: bool) -> str:
    """A row's name in the table: the model type, or "<type> + randomized Z" for the ablation."""
    return f"{model} + randomized Z" if randomize_z else model


def _prepare_data(cfg: ExperimentConfig) -> Path:
    """The data set at `data.path`: generated there with `cfg.synth` if absent, split if unsplit."""
    from raycell.formats.shards import open_dataset

    path = Path(cfg.data.path).absolute()
    if not (path / K.MANIFEST).is_file():
        c = copy.deepcopy(cfg)
        c.synth.out = str(path)
        run_synth(c, overwrite=True)
    counts = open_dataset(path).manifest.counts_per_split
    if not counts.get(K.TRAIN):
        c = copy.deepcopy(cfg)
        c.data.path = str(path)
        run_split(c)
    return path


# The loss weights of each model type's own objective, searched by `experiment medl --tune`:
# log-uniform over about two decades around the reference's values (spec section 3).
_W_CLS = {"dist": "loguniform", "low": 0.01, "high": 1.0}
_W_ADV = {"dist": "loguniform", "low": 0.01, "high": 3.0}
_W_CLUSTER = {"dist": "loguniform", "low": 1e-4, "high": 0.1}
_W_ALIGN = {"dist": "loguniform", "low": 0.03, "high": 3.0}
TUNE_SPACES = {
    "conventional": {"loss.cls": _W_CLS},
    "adversarial": {"loss.cls": _W_CLS, "loss.adv": _W_ADV, "loss.align": _W_ALIGN},
    "randomeffects": {"loss.cls": _W_CLS, "loss.cluster_latent": _W_CLUSTER},
    "mixedeffects": {
        "loss.cls": _W_CLS,
        "loss.adv": _W_ADV,
        "loss.align": _W_ALIGN,
        "loss.cluster_latent": _W_CLUSTER,
    },
}
TUNED = " (tuned)"  # row label suffix


def tune_model(cfg: ExperimentConfig, model: str, out: Path, samples: int, folds: int) -> dict:
    """Search `model`'s own loss weights (`TUNE_SPACES`) and return what was chosen.

    Held-out seen batches judge the trials: `folds` cross-batch folds (`tune.folds`, objective the mean
    `valbatch_auroc`), or, with `folds` 0, the data set's own `valbatch` split if it has one, else
    `val_auroc`. The choice is kept in `out/chosen.json`, so a re-run does not search again; a search
    interrupted before it chose is started again (raycell wrote the folder).
    """
    from raycell.tune import run_search

    done = out / "chosen.json"
    if done.is_file():
        return read_json(done)
    c = copy.deepcopy(cfg)
    c.model.type = model
    c.name = f"medl-tune-{model}"
    c.train.runs_dir = str(out / "runs")
    c.tune.space = copy.deepcopy(TUNE_SPACES[model])
    c.tune.num_samples, c.tune.folds, c.tune.mode = samples, folds, "max"
    from raycell.formats.shards import open_dataset

    has_valbatch = bool(open_dataset(c.data.path).manifest.counts_per_split.get(K.VALBATCH))
    c.tune.metric = "valbatch_auroc" if folds or has_valbatch else "val_auroc"
    c.tune.out = str(out / "search")
    shutil.rmtree(
        out / "search", ignore_errors=True
    )  # an earlier, unfinished search of this experiment
    res = run_search(c)
    best = res["best"]
    if best is None:
        raise ConfigError(f"experiment medl --tune: no trial of {model} finished; see {c.tune.out}")
    chosen = {
        "model": model,
        "params": {k: best[k] for k in c.tune.space},
        "metric": c.tune.metric,
        "objective": best["objective"],
        "objective_fold_sd": best.get("objective_fold_sd"),  # None without folds
        "best_epoch": best["best_epoch"],
        "folds": folds,
        "trials": len(res["trials"]),
        "search": c.tune.out,
    }
    atomic_write_json(done, chosen)
    return chosen


def _model_config(cfg: ExperimentConfig, model: str, seed: int, seed_dir: Path) -> ExperimentConfig:
    """The config of one (seed, model): its training seed and runs folder, inference on test + unseen."""
    c = copy.deepcopy(cfg)
    c.seed = seed
    c.model.type = model
    c.name = f"medl-s{seed}"
    c.train.runs_dir = str(seed_dir / "runs")
    c.infer.data = ""
    c.infer.splits = [K.TEST, K.UNSEEN]
    return c


def _trained_row(c: ExperimentConfig, trained: dict, ev: dict, label: str = "") -> dict:
    """One table row of a freshly trained model (`train_model`) from its evaluation `ev`."""
    return {
        "model": c.model.type,
        "label": label or row_label(c.model.type, False),
        "seed": c.seed,
        "run_dir": trained["run_dir"],
        "checkpoint": trained["checkpoint"],
        "train_seconds": trained["train_seconds"],
        "final_metrics": trained["metrics"],
        "seconds": trained["train_seconds"],  # + its share of the seed's inference pass
        "test": ev["splits"].get(K.TEST, {}),
        "unseen": ev["splits"].get(K.UNSEEN, {}),
    }


def _randomized_z_row(c: ExperimentConfig, run_dir: str, ev: dict) -> dict:
    """The row of the trained (selected) checkpoint `run_dir` inferred with random one-hot Z rows."""
    return {
        "model": c.model.type,
        "label": row_label(c.model.type, True),
        "seed": c.seed,
        "run_dir": run_dir,
        "randomize_z": True,
        "seconds": 0.0,
        "test": ev["splits"].get(K.TEST, {}),
        "unseen": ev["splits"].get(K.UNSEEN, {}),
    }


def z_mode_label(model: str, mode: str) -> str:
    """A row's name for a checkpoint inferred with the unseen cells' Z made in another `infer.z_mode`."""
    return f"{model} (Z {mode})"


def _unseen_z(cfg: ExperimentConfig, seed: int, z_dir: Path, mode: str | None = None) -> Path:
    """The unseen cells' Z for one seed in `z_dir` (`raycell infer-z`), made now unless already there.

    `mode` defaults to the config's `infer.z_mode`; a Z left there by another mode is redone.
    """
    from raycell.zpredictor import Z_PARQUET, infer_z

    mode = mode or cfg.infer.z_mode
    made = (
        read_json(z_dir / "inferred_z.json").get("z_mode", "predicted")
        if (z_dir / "inferred_z.json").is_file()
        else None
    )
    if not (z_dir / Z_PARQUET).is_file() or made != mode:
        c = copy.deepcopy(cfg)
        c.seed = seed
        # Z columns = the data set's training batches, which every model was trained on
        c.infer.checkpoint = ""
        c.infer.data = ""
        c.infer.z_out = str(z_dir)
        c.infer.z_splits = [K.UNSEEN]
        c.infer.z_mode = mode
        infer_z(c)
    return z_dir


def _z_mode_row(c: ExperimentConfig, checkpoint: str, z_dir: Path, mode: str, ev: dict) -> dict:
    """The row of the trained checkpoint inferred with the unseen cells' Z from `z_dir` (`mode`)."""
    zmeta = read_json(z_dir / "inferred_z.json")
    return {
        "model": c.model.type,
        "label": z_mode_label(c.model.type, mode),
        "seed": c.seed,
        "run_dir": checkpoint,
        "z_mode": mode,
        "zpredictor_val_accuracy": zmeta.get("val_accuracy"),
        "seconds": 0.0,
        "test": ev["splits"].get(K.TEST, {}),
        "unseen": ev["splits"].get(K.UNSEEN, {}),
    }


def summarise(rows: list[dict], labels: list[str]) -> dict[str, dict]:
    """Mean, s.d. (ddof 1) and n over seeds of every table column, per row label (`row_label`)."""
    out: dict[str, dict] = {}
    for m in labels:
        rs = [r for r in rows if r.get("label", r["model"]) == m]
        cols: dict = {"n_seeds": len(rs)}
        for col, split, key, _, _ in COLUMNS:
            vals = np.array([float(r.get(split, {}).get(key, math.nan)) for r in rs], dtype=float)
            vals = vals[np.isfinite(vals)]
            cols[col] = float(vals.mean()) if len(vals) else math.nan
            cols[col + "_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        for key in ("batch_probe_chance", "batch_probe_within_label_chance"):
            chance = [float(r.get(K.TEST, {}).get(key, math.nan)) for r in rs]
            cols[key] = float(np.nanmean(chance)) if rs and np.isfinite(chance).any() else math.nan
        out[m] = cols
    return out


def format_markdown(
    summary: dict[str, dict], title: str = "", notes: list[str] | None = None
) -> str:
    """The summary as a Markdown table of `mean ± sd` cells."""
    lines = [f"# {title}", ""] if title else []
    lines += [f"{n}" for n in (notes or [])]
    if notes:
        lines.append("")
    head = ["model", "seeds"] + [h for _, _, _, h, _ in COLUMNS]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for m, s in summary.items():
        cells = [m, str(s["n_seeds"])]
        for col, _, _, _, fmt in COLUMNS:
            # a summary written before a column existed (an older results.json) shows it as "–"
            mean, sd = s.get(col, math.nan), s.get(col + "_sd", math.nan)
            if not math.isfinite(mean):
                cells.append("–")
            elif math.isfinite(sd):
                cells.append(f"{fmt.format(mean)} ± {fmt.format(sd)}")
            else:
                cells.append(fmt.format(mean))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(summary: dict[str, dict]) -> str:
    import pandas as pd

    frame = pd.DataFrame(summary).T
    frame.index.name = "model"
    return frame.to_csv()


def parse_seeds(seeds: list) -> list[int]:
    """Seeds as integers (from `--seeds 0,1,2`); a non-integer or repeated seed is a ConfigError."""
    out = []
    for s in seeds:
        try:
            v = int(str(s).strip())
        except ValueError:
            raise ConfigError(
                f"experiment --seeds: {s!r} is not an integer; give comma-separated "
                "integers, e.g. --seeds 0,1,2"
            ) from None
        if v in out:
            raise ConfigError(f"experiment --seeds: seed {v} is given twice")
        out.append(v)
    if not out:
        raise ConfigError("experiment --seeds: give at least one seed, e.g. --seeds 0,1,2")
    return out


def check_medl(
    cfg: ExperimentConfig,
    seeds: list[int],
    models: list[str],
    tune: bool = False,
    tune_samples: int = 6,
    tune_folds: int = 3,
) -> None:
    """The checks `experiment medl` can make before Ray starts: model names and seeds."""
    from raycell.models import list_models

    bad = [m for m in models if m not in list_models()]
    if bad or not models:
        hint = (
            "; randomized Z is an option now, not a model type: --randomized-z (the default)"
            if any(m.endswith("_randz") for m in bad)
            else ""
        )
        raise ConfigError(
            f"experiment medl --models: unknown model type(s) {bad or models}; registered: "
            f"{', '.join(list_models())}{hint}"
        )
    if not seeds:
        raise ConfigError("experiment --seeds: give at least one seed, e.g. --seeds 0,1,2")
    if tune:
        untunable = [m for m in models if m not in TUNE_SPACES]
        if untunable:
            raise ConfigError(
                f"experiment medl --tune: no search space for {untunable}; --tune searches "
                f"the loss weights of {', '.join(TUNE_SPACES)}"
            )
        if tune_samples < 1 or tune_folds < 0:
            raise ConfigError(
                f"experiment medl: --tune-samples must be >= 1 and --tune-folds >= 0, got "
                f"{tune_samples} and {tune_folds}"
            )


def _baseline_row(cfg: ExperimentConfig, seed: int, features: str, cache: dict) -> dict:
    """The baseline's row for `seed` on `features`; those are loaded once into `cache` and reused."""
    from raycell.eval.baseline import baseline_row, load_features

    if features not in cache:
        cache[features] = load_features(
            cfg.data.path, [K.TRAIN, K.TEST, K.UNSEEN], features, cfg.eval.max_cells
        )
    return baseline_row(cfg.data.path, seed, feats=cache[features])


def _baseline_dir(i: int, features: str) -> str:
    """out/seed<S>/baseline/ for the first baseline row, baseline_<features>/ for the others."""
    return BASELINE_DIR if i == 0 else f"{BASELINE_DIR}_{features}"


def run_medl_experiment(
    cfg: ExperimentConfig,
    seeds: list[int],
    models: list[str],
    out: str,
    command: str = "",
    randomized_z: bool = True,
    baseline: bool = True,
    z_modes: list[str] | None = None,
    tune: bool = False,
    tune_samples: int = 6,
    tune_folds: int = 3,
) -> dict:
    """Train, infer and evaluate each model type for each seed on one data set; write the table.

    Needs Ray to be initialised (`raycell.utils.ray_utils.init_ray`).

    Args:
        cfg: The base config: data (`data.path`; `synth` generates it there when absent), model
            preset, training, loss weights, scaling, inference (`infer.z_*`: the Z-predictor).
        seeds: Training seeds (initialisation, shuffling, Z-predictor); data and split are fixed.
        models: Registered model types (default in the CLI: `MEDL_MODELS`).
        out: Output folder (see the module docstring); re-running continues an interrupted run.
        command: The command line that started the experiment, recorded in the outputs.
        randomized_z: Also infer every model whose type uses Z with randomized Z (one more row each,
            "<model> + randomized Z"; the same checkpoint, no second training).
        z_modes: Also infer every model whose type uses Z with the unseen cells' Z made in each of
            these `infer.z_mode`s (one more row each, "<model> (Z <mode>)"; the same checkpoint, no
            second training), so the ways of making Z are compared on the same models.
        baseline: Also add the hand-made-feature baseline rows (`raycell.eval.baseline`; features
            chosen by `eval.baseline_features`, 'auto' = morph_* columns and morph_* + crop features
            when present, else crops: `baseline_sources`).
        tune: First search each model type's own loss weights (`tune_model`) and add a
            "<model> (tuned)" row trained with them.
        tune_samples: Trials per model type's search.
        tune_folds: Cross-batch folds per trial (`tune.folds`).

    Returns:
        {"out", "summary" (row label -> column means/sds), "rows" (one per seed and row), "table"
        (Markdown), "seconds"}.
    """
    from raycell.constants import Z_MODES
    from raycell.eval.baseline import baseline_label, baseline_sources, feature_source
    from raycell.models import model_entry

    bad = [zm for zm in (z_modes or []) if zm not in Z_MODES]
    if bad:
        raise ConfigError(
            f"experiment medl --z-modes: unknown mode(s) {bad}; use {', '.join(Z_MODES)}"
        )

    seeds = parse_seeds(seeds)
    check_medl(cfg, seeds, models, tune, tune_samples, tune_folds)
    t0 = time.time()
    out_p = Path(out).absolute()
    out_p.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    cfg.data.path = str(_prepare_data(cfg))
    models = list(dict.fromkeys(models))
    uses_z = {m: model_entry(m).uses_z for m in models}
    mode = cfg.infer.z_mode
    extra_modes = [zm for zm in dict.fromkeys(z_modes or []) if zm != mode]
    labels = [
        lab
        for m in models
        for lab in [row_label(m, False)]
        + ([row_label(m, False) + TUNED] if tune else [])
        + ([row_label(m, True)] if randomized_z and uses_z[m] else [])
        + ([z_mode_label(m, zm) for zm in extra_modes] if uses_z[m] else [])
    ]
    sources = baseline_sources(cfg.data.path, cfg.eval.baseline_features) if baseline else []
    base_labels = [baseline_label(feature_source(cfg.data.path, f)) for f in sources]
    chosen: dict[str, dict] = {}
    if tune:
        for m in models:
            print(
                f"[raycell] experiment medl --tune: searching {m}'s loss weights "
                f"({', '.join(TUNE_SPACES[m])}; {tune_samples} trials, {tune_folds} folds)",
                flush=True,
            )
            chosen[m] = tune_model(cfg, m, out_p / "tune" / m, tune_samples, tune_folds)
    labels += base_labels
    rows: list[dict] = []
    feature_cache: dict = {}  # the baseline's features: computed once, reused by every seed
    for seed in seeds:
        seed_dir = out_p / f"seed{seed}"
        z_dir = _unseen_z(cfg, seed, seed_dir / "zpredictor") if any(uses_z.values()) else None
        # every model of the seed is trained first, then all its rows are inferred in one pass
        # (one actor pool, each checkpoint loaded once per actor), then evaluated row by row
        slots: list = []  # per row, in table order: its row, or what makes it after the pass
        todo: list[Inference] = []
        for m in models:
            c = _model_config(cfg, m, seed, seed_dir)
            z_src = str(z_dir) if z_dir is not None and uses_z[m] else ""
            main = seed_dir / m
            row_dirs = [main] + ([main / RANDOMIZED_Z_DIR] if randomized_z and uses_z[m] else [])
            row_dirs += [main / f"z_{zm}" for zm in extra_modes if uses_z[m]]
            trained = None
            if (main / "result.json").is_file():  # finished by an earlier invocation
                done = read_json(main / "result.json")
                ck = done.get("checkpoint") or done.get("run_dir")
            else:  # a fresh checkpoint: rows left from an earlier one are stale
                for d in row_dirs[1:]:
                    shutil.rmtree(d, ignore_errors=True)
                print(f"[raycell] experiment medl: seed {seed}, {row_label(m, False)}", flush=True)
                trained = train_model(c, main)
                ck = trained["checkpoint"]
            for row_dir in row_dirs:
                res_file = row_dir / "result.json"
                if res_file.is_file():
                    slots.append(read_json(res_file))
                    continue
                zm = row_dir.name[2:] if row_dir.name.startswith("z_") and row_dir != main else ""
                if row_dir == main:
                    inf = Inference(ck, row_dir, z_src, bool(c.infer.randomize_z))
                    make = functools.partial(_trained_row, c, trained)
                elif row_dir.name == RANDOMIZED_Z_DIR:  # the checkpoint trained for the first row
                    print(
                        f"[raycell] experiment medl: seed {seed}, {row_label(m, True)}", flush=True
                    )
                    inf = Inference(ck, row_dir, randomize_z=True)
                    make = functools.partial(_randomized_z_row, c, ck)
                else:  # the same checkpoint, the unseen cells' Z made another way
                    print(
                        f"[raycell] experiment medl: seed {seed}, {z_mode_label(m, zm)}", flush=True
                    )
                    zd = _unseen_z(cfg, seed, seed_dir / f"zpredictor_{zm}", zm)
                    inf = Inference(ck, row_dir, str(zd))
                    make = functools.partial(_z_mode_row, c, ck, zd, zm)
                todo.append(inf)
                slots.append((res_file, make, z_dir is not None and not zm, {}))
            if m in chosen:
                res_file = seed_dir / f"{m}_tuned" / "result.json"
                if res_file.is_file():
                    slots.append(read_json(res_file))
                else:
                    from raycell.tune import apply_params

                    print(f"[raycell] experiment medl: seed {seed}, {m}{TUNED}", flush=True)
                    tc = apply_params(c, chosen[m]["params"])
                    tc.name = f"medl-s{seed}-tuned"
                    tuned = train_model(tc, res_file.parent)
                    todo.append(Inference(tuned["checkpoint"], res_file.parent, z_src))
                    make = functools.partial(
                        _trained_row, tc, tuned, label=row_label(m, False) + TUNED
                    )
                    slots.append((res_file, make, False, {"tuned_params": chosen[m]["params"]}))
        t_pass = time.time()
        pass_cfg = _model_config(cfg, models[0], seed, seed_dir)
        evs = iter(infer_evaluate_all(pass_cfg, todo, quiet=True) if todo else [])
        share = (time.time() - t_pass) / max(1, len(todo))  # each row's part of the shared pass
        for slot in slots:
            if isinstance(slot, dict):
                rows.append(slot)
                continue
            res_file, make, z_info, extra = slot
            row = {**make(next(evs)), **extra}
            row["seconds"] = round(row["seconds"] + share, 1)
            if z_info:
                zmeta = read_json(z_dir / "inferred_z.json")
                row["zpredictor_val_accuracy"] = zmeta.get("val_accuracy")
                row["z_mode"] = zmeta.get("z_mode", "predicted")
            atomic_write_json(res_file, row)
            rows.append(row)
        for i, features in enumerate(sources):
            res_file = seed_dir / _baseline_dir(i, features) / "result.json"
            if res_file.is_file():
                row = read_json(res_file)
            else:
                print(f"[raycell] experiment medl: seed {seed}, {base_labels[i]}", flush=True)
                row = _baseline_row(cfg, seed, features, feature_cache)
                res_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(res_file, row)
            rows.append(row)
        _write_tables(out_p, cfg, seeds, models, labels, rows, command, t0, quiet=True)  # partial
    return _write_tables(out_p, cfg, seeds, models, labels, rows, command, t0, chosen=chosen)


def _write_tables(
    out: Path,
    cfg: ExperimentConfig,
    seeds: list[int],
    models: list[str],
    labels: list[str],
    rows: list[dict],
    command: str,
    t0: float,
    quiet: bool = False,
    chosen: dict | None = None,
) -> dict:
    """(Re)write results.json, table.csv and table.md from the rows so far (atomically)."""
    summary = summarise(rows, labels)
    done = sorted({r["seed"] for r in rows})
    notes = [
        f"Command: `{command}`" if command else "",
        f"Data: {cfg.data.path} (preset {cfg.model.preset}, {cfg.train.epochs} epochs, "
        f"lr {cfg.train.lr}, batch {cfg.data.batch_size}); seeds {done} of {seeds}; "
        "mean ± s.d. over seeds.",
        "Seen = the test split of the training batches; unseen = the held-out batches "
        "(random/mixed effects use the Z-predictor's soft Z there). DB/CH/batch probe: "
        "latents of the seen test split by batch, z-scored (DB higher / CH lower / probe "
        "nearer chance = less batch information). mixedeffects latent = the fixed-effects "
        "latent e_F; its MSE is of X̂_R.",
        "+ randomized Z: the same checkpoint inferred with a random one-hot Z row per cell "
        "(infer.randomize_z), no second training."
        if any(lab.endswith("+ randomized Z") for lab in labels)
        else "",
        "logreg on hand-made features: balanced logistic regression on standardised "
        "per-cell features (morph_* columns, or shape/intensity/texture computed from the "
        "crops), fitted on the train split; its DB/CH/probe are of those features."
        if any(r.get("model") == BASELINE_MODEL for r in rows)
        else "",
    ]
    for m, ch in (chosen or {}).items():
        weights = ", ".join(f"{k}={v:.3g}" for k, v in ch["params"].items())
        how = (
            f"mean {ch['metric']} over {ch['folds']} cross-batch folds"
            if ch["folds"]
            else ch["metric"]
        )
        sd = ch.get("objective_fold_sd")
        value = f"{ch['objective']:.3f}" + (f", fold s.d. {sd:.3f}" if sd is not None else "")
        notes.append(
            f"{m}{TUNED}: {weights}, chosen by {ch['trials']} trials on {how} "
            f"({value} at epoch {ch['best_epoch']}); search in {ch['search']}."
        )
    chance = [
        s["batch_probe_chance"] for s in summary.values() if math.isfinite(s["batch_probe_chance"])
    ]
    if chance:
        notes.append(f"Batch-probe chance (majority batch share): {chance[0]:.3f}.")
    within = [
        s["batch_probe_within_label_chance"]
        for s in summary.values()
        if math.isfinite(s.get("batch_probe_within_label_chance", math.nan))
    ]
    if within:
        notes.append(
            f"Probe within label: the batch probe among cells of one phenotype (the batch signal a "
            f"confounded phenotype does not explain); its chance {within[0]:.3f}."
        )
    table = format_markdown(summary, "raycell MEDL experiment", [n for n in notes if n])
    result = {
        "out": str(out),
        "command": command,
        "seeds": seeds,
        "models": models,
        "tuned": chosen or {},
        "config": cfg.to_dict(),
        "summary": summary,
        "rows": rows,
        "table": table,
        # this invocation's wall time; rows keep their own (from earlier invocations too)
        "seconds": round(time.time() - t0, 1),
        "row_seconds_total": round(sum(r.get("seconds", 0.0) for r in rows), 1),
    }
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "table.csv", _csv(summary))
    atomic_write_text(out / "table.md", table)
    if not quiet:
        print("\n" + table, flush=True)
    return result
