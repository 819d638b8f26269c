"""`raycell tune`: a Ray Tune search over any config keys, Optuna proposing and ASHA stopping early.

The space is `tune.space` (dotted config key -> distribution, checked by `ExperimentConfig.validate`). Each
Tune trial is a light driver function (`_trial`) that applies its sampled values to the config and fits
one Ray Train `TorchTrainer` (`raycell.train.trainer.build_trainer`, the same trainer `raycell train`
builds) with `TuneReportCallback`, so every epoch the loop reports is a Tune result that ASHA and Optuna
see (the Ray 2.60 Train V2 pattern; `Tuner(trainer)` is refused by Train V2). Each trial's Train run is named
`train-<trial id>` with no timestamp, so a restored search finds its runs again.

The search folder (`tune.out`) holds Tune's storage (`search/`), the trials' Train runs (`trials/`), and at
the end `trials.csv` (one row per trial: sampled values, objective, epochs run, status), `best.yaml` (the
best trial's full config: `raycell train --config best.yaml` reproduces it) and `tune_objective.png`.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raycell import constants as K
from raycell.config import ConfigError, ExperimentConfig, _set_nested, save_config, tune_key_type
from raycell.errors import UserError
from raycell.train.history import HISTORY_FILE, read_history

if TYPE_CHECKING:
    from raycell.train.setup import RunSetup

SEARCH = "search"  # Tune's experiment folder under tune.out
TRIALS = "trials"  # the trials' Train runs under tune.out
# Keys Tune adds to every result: left out when listing what the loop reported
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its actor names in error texts


def _first_line(error) -> str:
    """A trial error's first line for trials.csv, without the terminal colour codes Ray adds."""
    return _ANSI.sub("", str(error or "")).strip().split("\n", 1)[0][:200]


_TUNE_KEYS = {
    "training_iteration",
    "time_this_iter_s",
    "done",
    "timestamp",
    "trial_id",
    "date",
    "hostname",
    "node_ip",
    "pid",
    "time_total_s",
    "time_since_restore",
    "iterations_since_restore",
    "checkpoint_dir_name",
    "checkpoint_path",
    "should_checkpoint",
    "experiment_tag",
    "timesteps_total",
    "episodes_total",
    "timesteps_since_restore",
    "episode_reward_mean",
    "experiment_id",
}


def apply_params(cfg: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """A copy of `cfg` with the dotted keys of `params` set, type-checked and validated like a config file.

    Raises:
        ConfigError: a value does not fit its key (wrong type or range).
    """
    d = cfg.to_dict()
    for key, value in params.items():
        if hasattr(value, "item"):  # numpy scalars from a sampler
            value = value.item()
        _set_nested(d, key.split("."), value)
    return ExperimentConfig.from_dict(d)


def _probe_values(spec: dict) -> list:
    """The values of a space entry that bound what it can sample (choice: all of them)."""
    if spec["dist"] == "choice":
        return list(spec["values"])
    if spec["dist"] == "randint":
        return [spec["low"], spec["high"] - 1]
    return [spec["low"], spec["high"]]


def check_tune(cfg: ExperimentConfig) -> Path:
    """What `tune` can check before Ray starts; returns the absolute search folder.

    The space is not empty; every value it can sample fits its key (type and range); the model, preset and
    data set are usable (`check_train`); `tune.out` is new or empty.

    Raises:
        ConfigError: naming the key and what to do.
    """
    from raycell.train.trainer import check_train

    t = cfg.tune
    if not t.space:
        raise ConfigError(
            "tune.space is empty: declare at least one searched key, e.g. "
            "tune.space: {loss.adv: {dist: loguniform, low: 0.01, high: 1.0}}"
        )
    if cfg.train.resume:
        raise ConfigError(
            "train.resume is set: a search trains new models; drop train.resume (--resume)"
        )
    for key, spec in t.space.items():
        tune_key_type(key)
        for v in _probe_values(spec):
            try:
                apply_params(cfg, {key: v})
            except ConfigError as exc:
                raise ConfigError(
                    f"tune.space.{key}: {spec['dist']} can sample {v!r}, which the config "
                    f"refuses: {exc}"
                ) from None
    check_train(cfg)
    for v in _probe_values(t.space.get("model.type", {"dist": "choice", "values": []})):
        check_train(apply_params(cfg, {"model.type": v}))
    check_model_values(cfg)
    if t.folds:
        from raycell.formats.shards import open_dataset

        cross_batch_folds(cfg, open_dataset(cfg.data.path))
    out = Path(os.path.abspath(os.path.expanduser(t.out)))
    data = Path(os.path.abspath(cfg.data.path))
    if out == data or data in out.parents or out in data.parents:
        raise ConfigError(
            f"tune.out {out} overlaps the data set {data}; choose a folder outside it"
        )
    near = out
    while not near.exists():
        near = near.parent
    if not near.is_dir():
        raise ConfigError(f"tune.out {out}: {near} is a file, not a folder; choose a folder path")
    if t.resume:
        return out
    if out.is_dir() and any(out.iterdir()):
        if (out / SEARCH).exists():
            raise ConfigError(
                f"tune.out {out} already holds a search (search/); continue it with "
                f"`raycell tune --resume {out}`, or choose a new or empty folder (--out)"
            )
        raise ConfigError(
            f"tune.out {out} already holds files raycell did not write; choose a new or empty "
            "folder (--out)"
        )
    return out


def check_model_values(cfg: ExperimentConfig) -> None:
    """Build the model for every value a `model.*` key of the space can sample, before Ray starts.

    One key at a time (the others at their base values), on the CPU.

    Why: the config cannot type `model.args.*` (builder arguments); a value the builder rejects
    (an unknown argument, "sixteen" for a size, `true` for a number) would otherwise fail every
    trial inside Ray, after the start-up. A value whose type differs from the builder default's is
    refused too: `true` is an int to Python but never meant as a layer size.

    Raises:
        ConfigError: naming the key, the value and the builder's complaint, in one line.
    """
    import typing

    from raycell.models import create_model, model_entry
    from raycell.train.loop import model_kwargs
    from raycell.train.trainer import _training_data, weak_label_heads

    keys = [k for k in cfg.tune.space if k.startswith("model.") and k != "model.type"]
    if not keys:
        return
    import torch

    from raycell import constants as K
    from raycell.formats.categories import CategoryMap
    from raycell.formats.spec import DataSpec

    ds = _training_data(cfg)
    spec = DataSpec.from_dataset(ds)
    heads = weak_label_heads(cfg, ds)
    labels, batches = CategoryMap(K.LABEL, ("a", "b")), CategoryMap(K.BATCH, ("a",))
    for key in keys:
        space = cfg.tune.space[key]
        for v in _probe_values(space):
            c = apply_params(cfg, {key: v})
            where = f"tune.space.{key}: {space['dist']} can sample {v!r}"
            arg = key[len("model.args.") :] if key.startswith("model.args.") else None
            try:
                hints = typing.get_type_hints(model_entry(c.model.type).builder)
            except Exception:  # noqa: BLE001 - unresolvable annotations: the build below decides
                hints = {}
            if arg in hints and not _fits(v, hints[arg]):
                raise ConfigError(
                    f"{where}, a {type(v).__name__}, but model type "
                    f"{c.model.type!r} takes {_type_words(hints[arg])} for {arg}"
                )
            try:
                with torch.device("cpu"):
                    create_model(
                        c.model.type, **model_kwargs(c, spec, labels, batches, heads or ())
                    )
            except Exception as exc:  # noqa: BLE001 - whatever the builder raises is the answer
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise ConfigError(
                    f"{where}, which model type {c.model.type!r} rejects when built: {why}"
                ) from None


def _fits(v: Any, tp: Any) -> bool:
    """Whether value `v` fits the annotation `tp` (a bool is no int here; an int is a float)."""
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(v, a) for a in typing.get_args(tp))
    if tp is type(None):
        return v is None
    if tp in (bool, int, str):
        return type(v) is tp
    if tp is float:
        return type(v) in (int, float)
    if origin in (list, tuple, dict):
        return isinstance(v, origin)
    return True  # Any, or a type a YAML value cannot be: the build decides


def _type_words(tp: Any) -> str:
    """`int | None` -> "an int (or None)", for messages."""
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    return f"{'an' if names[0] in 'aeiou' else 'a'} {names}" + (
        " (or None)" if type(None) in typing.get_args(tp) else ""
    )


# Keys a resumed search may change: how to reach Ray. Everything else, concurrency included, comes back
# with Tune's pickled experiment state (`Tuner.restore` takes no new TuneConfig).
TUNE_RESUME_MAY_CHANGE = ("tune.resume", "ray.")


def resume_search_config(cfg: ExperimentConfig, given: list[str] | None = None) -> ExperimentConfig:
    """The config of the search `cfg.tune.resume` continues: its recorded `config.yaml`, plus allowed changes.

    Args:
        cfg: The config the user asked for (`tune.resume` set).
        given: Dotted keys the user set explicitly; None compares every key (the Python API).

    Raises:
        ConfigError: the folder is missing or holds no search Tune can restore, or a given key other
            than `TUNE_RESUME_MAY_CHANGE` differs from the search's recorded value.
    """
    from raycell.config import load_config
    from raycell.train.trainer import _matches

    out = Path(os.path.abspath(os.path.expanduser(cfg.tune.resume)))
    if not out.is_dir():
        raise ConfigError(
            f"tune.resume: search folder not found: {out} (give the tune.out folder of an "
            "earlier `raycell tune`)"
        )
    record = out / "config.yaml"
    state = out / SEARCH
    if not record.is_file() or not state.is_dir() or not any(state.glob("experiment_state*.json")):
        raise ConfigError(
            f"tune.resume: {out} holds no raycell search (needs config.yaml and Tune's "
            f"experiment state under {SEARCH}/); give the tune.out folder of an earlier "
            "`raycell tune`"
        )
    recorded = load_config(record)
    if given is None:  # every section.key (dict-valued keys such as tune.space compare whole)
        given = [
            f"{sec}.{k}" if isinstance(v, dict) else sec
            for sec, v in cfg.to_dict().items()
            for k in (v if isinstance(v, dict) else [None])
        ]
    conflicts = []
    for key in dict.fromkeys(given):
        if key == "tune.out" or _matches(key, TUNE_RESUME_MAY_CHANGE):
            continue
        mine, theirs = cfg.get(key), recorded.get(key)
        if key == "data.path":
            mine, theirs = os.path.abspath(mine), os.path.abspath(theirs)
        if mine != theirs:
            conflicts.append(f"{key} ({theirs!r} in the search, {mine!r} given)")
    if conflicts:
        raise ConfigError(
            f"tune.resume: {'; '.join(conflicts)}: a resumed search keeps its recorded config "
            f"({record}); drop the conflicting option(s) or start a new search (a resume may "
            "change only ray.*)"
        )
    recorded.ray = copy.deepcopy(cfg.ray)
    recorded.tune.out = str(out)
    recorded.tune.resume = str(out)
    return recorded.validate()


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one trial holds while it trains: its driver plus its Train workers (as Ray Train asks for
    them), for each of its `tune.folds` trainings.
    """
    sc = cfg.scaling
    per_worker = dict(sc.resources_per_worker) or {"CPU": 1.0}
    per_worker.setdefault("CPU", 1.0)
    if sc.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    runs = max(1, cfg.tune.folds)
    res = {k: float(v) * sc.num_workers * runs for k, v in per_worker.items() if v}
    res["CPU"] = res.get("CPU", 0.0) + cfg.tune.trial_cpus
    return res


def max_concurrent(cfg: ExperimentConfig, cluster: dict[str, float]) -> tuple[int, int]:
    """(trials to run at once, how many the cluster fits); each trial counts 1 more CPU for its data reads.

    Raises:
        ConfigError: not even one trial fits the cluster.
    """
    need = trial_resources(cfg)
    need["CPU"] += max(1, cfg.tune.folds)  # Ray Data read tasks: without slack they starve and hang
    fits = min(int(cluster.get(k, 0.0) // v) for k, v in need.items() if v > 0)
    if fits < 1:
        have = {k: cluster.get(k, 0.0) for k in need}
        raise ConfigError(
            f"one trial needs {need} (scaling.* x workers + tune.trial_cpus + 1 CPU for data "
            f"reads) but the cluster has {have}; lower scaling.num_workers or "
            "scaling.resources_per_worker, or add nodes"
        )
    want = cfg.tune.max_concurrent_trials or fits
    return max(1, min(want, fits, cfg.tune.num_samples)), fits


def local_ray_cpus(cfg: ExperimentConfig, folds: int) -> int:
    """`ray.num_cpus` for a private local Ray that fits one trial of `folds` cross-batch folds.

    A folded trial holds its workers K times and its data reads need K CPU slots (`max_concurrent`), so
    K=3 at the small configs' 0.5 CPU per worker needs 4.51 logical CPUs, more than the default
    max(4, 2 x cores) of a 2-core machine. Logical CPUs are only Ray's bookkeeping (the cores are
    shared by `train.torch_threads`), so a larger count lets the folds run side by side. Returns the
    configured `ray.num_cpus`, or 0 (the default) when a cluster is joined or the default fits.
    """
    from raycell.utils.ray_utils import default_local_cpus

    if cfg.ray.num_cpus or cfg.ray.address or os.environ.get("RAY_ADDRESS") or not folds:
        return cfg.ray.num_cpus
    c = copy.deepcopy(cfg)
    c.tune.folds = folds
    need = math.ceil(trial_resources(c)["CPU"] + folds)  # + 1 CPU per fold for its reads
    return need if need > default_local_cpus() else 0


def search_space(space: dict) -> dict:
    """`tune.space` as Ray Tune domains."""
    import ray.tune

    make = {
        "loguniform": lambda s: ray.tune.loguniform(s["low"], s["high"]),
        "uniform": lambda s: ray.tune.uniform(s["low"], s["high"]),
        "randint": lambda s: ray.tune.randint(s["low"], s["high"]),
        "choice": lambda s: ray.tune.choice(s["values"]),
    }
    return {key: make[spec["dist"]](spec) for key, spec in space.items()}


def cross_batch_folds(cfg: ExperimentConfig, ds) -> list[list[str]]:
    """`tune.folds` folds, each holding out one seen batch, drawn by `seed` from the training batches.

    Raises:
        ConfigError: fewer training batches than folds + 1, or a model type that predicts the batch.
    """
    import numpy as np

    from raycell.train.trainer import refuse_batch_head_fold

    k = cfg.tune.folds
    refuse_batch_head_fold(cfg.model.type)
    batches = sorted(set(ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH).to_pylist()))
    if len(batches) < k + 1:
        raise ConfigError(
            f"tune.folds={k} needs at least {k + 1} training batches (one held out per fold, "
            f"the rest to train on); {ds.root} has {len(batches)}: {batches}"
        )
    order = np.random.default_rng(cfg.seed).permutation(len(batches))
    return [[batches[i]] for i in order[:k]]


def fold_metrics(rows: list[dict], metric: str) -> dict:
    """One epoch of K fold trainings as one Tune result: the mean of every metric all folds report,
    plus `<metric>_fold_sd` and `<metric>_fold<k>` for the objective.
    """
    import numpy as np

    keys = [k for k in rows[0] if all(_finite(r.get(k)) for r in rows)]
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out["epoch"] = int(rows[0].get("epoch", 0))
    vals = [r.get(metric) for r in rows]
    if all(_finite(v) for v in vals):
        out[f"{metric}_fold_sd"] = float(np.std(vals))
        out.update({f"{metric}_fold{i}": float(v) for i, v in enumerate(vals)})
    return out


def fold_spread(result: dict, metric: str) -> dict:
    """The objective's spread over the folds of one epoch's result (`fold_metrics`), as trials.csv
    columns: `objective_fold_sd` and `objective_fold<k>`; empty without folds.
    """
    if f"{metric}_fold_sd" not in result:
        return {}
    out = {"objective_fold_sd": result[f"{metric}_fold_sd"]}
    k = 0
    while f"{metric}_fold{k}" in result:
        out[f"objective_fold{k}"] = result[f"{metric}_fold{k}"]
        k += 1
    return out


def _fit_folds(cfg: ExperimentConfig, run_dir: Path, setups: list[RunSetup], ds) -> None:
    """Fit one TorchTrainer per fold side by side (threads: each fit only waits on its Ray actors) and
    report each epoch to Tune once every fold has finished it.
    """
    import json
    import threading
    import time

    import ray.tune

    from raycell.train.trainer import build_trainer

    errors: list[BaseException] = []

    def fit(trainer) -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the trial's thread below
            errors.append(exc)

    dirs = [run_dir / f"fold-{k}" for k in range(len(setups))]
    threads = []
    for d, st in zip(dirs, setups):
        d.mkdir(parents=True, exist_ok=True)
        save_config(cfg, d / "config.yaml")
        trainer = build_trainer(cfg, d, st, ds, keep_best=(cfg.tune.metric, cfg.tune.mode))
        threads.append(threading.Thread(target=fit, args=(trainer,), daemon=True))
    for t in threads:
        t.start()
    done = len(read_history(run_dir / HISTORY_FILE))  # a restored trial: epochs reported before
    while True:
        alive = any(t.is_alive() for t in threads)
        hists = [read_history(d / HISTORY_FILE) for d in dirs]
        while done < min(len(h) for h in hists):
            res = fold_metrics([h[done] for h in hists], cfg.tune.metric)
            with open(run_dir / HISTORY_FILE, "a") as f:
                f.write(json.dumps(res) + "\n")
            ray.tune.report(res)
            done += 1
        if errors:
            raise errors[0]
        if not alive:
            return
        time.sleep(0.5)


def _trial(params: dict, base: dict, setup: RunSetup | list[RunSetup], trials_dir: str) -> None:
    """One Tune trial: apply the sampled values and fit one TorchTrainer (one per fold with
    `tune.folds`), reporting every epoch to Tune.

    The Train run's name is `train-<trial id>`: stable across a restored search, so that Ray Train finds
    the run's checkpoints again (no timestamp in it).
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raycell.formats.shards import open_dataset
    from raycell.train.trainer import build_trainer

    cfg = apply_params(ExperimentConfig.from_dict(base), params)
    run_dir = Path(trials_dir) / f"train-{ray.tune.get_context().get_trial_id()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    done = read_history(run_dir / HISTORY_FILE)
    if isinstance(setup, list):  # cross-batch folds
        if len(done) >= cfg.train.epochs:
            ray.tune.report(done[-1])
            return
        _fit_folds(cfg, run_dir, setup, open_dataset(cfg.data.path))
        return
    if len(done) >= cfg.train.epochs and any(run_dir.glob("checkpoint_*")):
        # A restored search re-runs a trial whose Train run had already finished (Tune's saved state was
        # a few seconds older than the kill): fitting again would report nothing, so report its result.
        ray.tune.report(done[-1])
        return
    # keep the best epoch's checkpoint (by the search's metric) besides the latest, for <search>/best
    build_trainer(
        cfg,
        run_dir,
        setup,
        open_dataset(cfg.data.path),
        callbacks=[TuneReportCallback()],
        keep_best=(cfg.tune.metric, cfg.tune.mode),
    ).fit()


class SearchFailed(UserError):
    """Every trial failed for one shared reason (named in the message)."""


def _metric_watch(metric: str):
    """A Tune stopper that ends the whole search at the first result without `metric` (a typo'd metric
    would otherwise cost the full search before the error).
    """
    import ray.tune

    class MetricWatch(ray.tune.Stopper):
        def __init__(self):
            self.missing = False

        def __call__(self, trial_id, result):
            if metric not in result and not result.get(
                "done"
            ):  # a trial's closing result may be bare
                self.missing = True
            return self.missing

        def stop_all(self):
            return self.missing

    return MetricWatch()


def _failure_watch(num_samples: int):
    """A Tune stopper and callback that ends the search when its first trials all fail the same way.

    Only before any trial reported a result: such a cause is shared by every trial, so stopping
    early saves the rest of the search. `.reason` is the failure's last line (`Type: message`).
    """
    import ray.tune

    class FailureWatch(ray.tune.Stopper, ray.tune.Callback):
        def __init__(self):
            self.reasons: list[str] = []
            self.reported = False
            self.reason = ""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.reported = True

        def on_trial_error(self, iteration, trials, trial, **info):
            text = str(trial.get_error() or "")
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            errs = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Failed)\b", ln)]
            self.reasons.append((errs or lines or ["unknown error"])[-1][:300])
            shared = len(set(self.reasons)) == 1 and len(self.reasons) >= min(2, num_samples)
            if shared and not self.reported:
                self.reason = self.reasons[0]

        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return bool(self.reason)

    return FailureWatch()


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _trial_rows(
    grid,
    keys: list[str],
    metric: str,
    mode: str,
    max_epochs: int,
    trials_dir: str | Path | None = None,
) -> tuple[list[dict], set]:
    """One row per trial (in trial order) and every metric name the trials reported."""
    rows, reported = [], set()
    for r in grid:
        df = r.metrics_dataframe
        hist = df.to_dict(orient="records") if df is not None else []
        ident = re.search(r"_trial_([0-9a-f]+_\d+)_", Path(r.path).name)
        trial_id = (r.metrics or {}).get("trial_id") or (
            ident.group(1) if ident else Path(r.path).name
        )
        # The trial's Train run keeps every epoch (history.jsonl); Tune's record of a trial restored after
        # an interruption holds only the epochs reported since.
        own = (
            read_history(Path(trials_dir) / f"train-{trial_id}" / HISTORY_FILE)
            if trials_dir
            else []
        )
        if len(own) > len(hist):
            hist = own
        for h in hist:
            reported.update(k for k in h if k not in _TUNE_KEYS and not k.startswith("config/"))
        scored = [
            (int(h.get("epoch", i)), h[metric], h)
            for i, h in enumerate(hist)
            if _finite(h.get(metric))
        ]
        epochs = len(hist)
        status = "error" if r.error else "completed" if epochs >= max_epochs else "stopped"
        best_of = max if mode == "max" else min
        top = best_of(scored, key=lambda ev: ev[1]) if scored else (None, float("nan"), {})
        num = re.match(
            r"_?trial_[0-9a-f]+_(\d+)_", Path(r.path).name
        )  # Tune numbers trials as it starts them
        row = {
            "trial": int(num.group(1)) if num else 10**9,
            "trial_id": trial_id,
            **{k: r.config.get(k) for k in keys},
            "objective": top[1],
            **fold_spread(top[2], metric),
            "best_epoch": top[0],
            "last_epoch_objective": hist[-1].get(metric, float("nan")) if hist else float("nan"),
            "epochs_run": epochs,
            "status": status,
            "error": _first_line(r.error),
            "tune_dir": r.path,
        }
        rows.append(row)
    rows.sort(key=lambda row: (row["trial"], row["trial_id"]))
    for i, row in enumerate(rows, 1):
        row["trial"] = i
    return rows, reported


def select_best(rows: list[dict], select: str, mode: str) -> dict | None:
    """The best trial under the rule `select` (TuneConfig.select); marks each row's `eligible`.

    Every trial is scored at its best epoch (`objective`), the epoch `best.yaml` reproduces and whose
    checkpoint `<search>/best` points at. ASHA stops trials at different budgets, and a trial's best over
    2 epochs is not comparable with another's best over 6: 'budget' therefore lets only the trials that ran
    the most epochs compete (those ASHA judged best at every rung), 'best_epoch' lets every trial compete.
    A trial that failed never competes.
    """
    ok = [r for r in rows if r["status"] != "error" and _finite(r["objective"])]
    budget = max((r["epochs_run"] for r in ok), default=0)
    for r in rows:
        r["eligible"] = r in ok and (select == "best_epoch" or r["epochs_run"] == budget)
    eligible = [r for r in rows if r["eligible"]]
    if not eligible:
        return None
    return (max if mode == "max" else min)(eligible, key=lambda r: r["objective"])


def _link_best(out: Path, best: dict) -> Path | None:
    """`<search>/best`: a relative link to the best trial's checkpoint of its best epoch (None if
    not kept).
    """
    from raycell.train.trainer import best_checkpoint

    ck = best_checkpoint(out / TRIALS / f"train-{best['trial_id']}", int(best["best_epoch"]))
    if ck is None:
        return None
    link, tmp = out / "best", out / f".best-{os.getpid()}"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.relpath(ck, out), tmp)
    os.replace(tmp, link)  # atomic: a reader sees the old link or the new one
    return link


def objective_plot(
    rows: list[dict], space: dict, metric: str, mode: str, path: Path, best: dict | None
) -> Path:
    """Objective over trials (with the best so far) and against each searched key; the best trial starred."""
    import numpy as np

    from raycell.plots import pyplot, save_figure

    plt = pyplot()
    keys = list(space)
    n = 1 + len(keys)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.6 * nrows), squeeze=False)
    axes = axes.ravel()
    colors = {"completed": "tab:blue", "stopped": "tab:orange", "error": "tab:red"}
    y = np.array([r["objective"] if _finite(r["objective"]) else np.nan for r in rows], dtype=float)
    ax = axes[0]
    idx = np.array([r["trial"] for r in rows])
    for status, c in colors.items():
        m = np.array([r["status"] == status for r in rows]) & np.isfinite(y)
        if m.any():
            ax.scatter(idx[m], y[m], c=c, label=status, zorder=3)
    if np.isfinite(y).any():
        fill = np.where(np.isfinite(y), y, -np.inf if mode == "max" else np.inf)
        so_far = np.maximum.accumulate(fill) if mode == "max" else np.minimum.accumulate(fill)
        ok = np.isfinite(so_far)
        ax.step(idx[ok], so_far[ok], where="post", color="0.4", lw=1, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} (last epoch)")
    ax.set_title(f"{metric} over trials ({mode})")
    ax.set_xticks(idx)
    ax.legend(fontsize=8)
    for ax, key in zip(axes[1:], keys, strict=False):
        spec = space[key]
        xs = [r[key] for r in rows]
        if spec["dist"] == "choice":
            labels = [str(v) for v in spec["values"]]
            pos = [labels.index(str(v)) if str(v) in labels else np.nan for v in xs]
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            pos = [float(v) if v is not None else np.nan for v in xs]
            lo, hi = float(spec["low"]), float(spec["high"])
            if spec["dist"] == "loguniform":
                ax.set_xscale("log")
                ticks = np.geomspace(lo, hi, 4)
                pad = (hi / lo) ** 0.04
                ax.set_xlim(lo / pad, hi * pad)
            else:
                ticks = np.linspace(lo, hi, 4)
                pad = (hi - lo) * 0.04
                ax.set_xlim(lo - pad, hi + pad)
            ax.minorticks_off()  # log axes label minor ticks over a narrow range: unreadable
            ax.set_xticks(ticks, [f"{v:.2g}" for v in ticks])
        pos = np.array(pos, dtype=float)
        for status, c in colors.items():
            m = np.array([r["status"] == status for r in rows]) & np.isfinite(y) & np.isfinite(pos)
            if m.any():
                ax.scatter(pos[m], y[m], c=c, zorder=3)
        if best is not None and best.get(key) is not None:
            bx = labels.index(str(best[key])) if spec["dist"] == "choice" else float(best[key])
            ax.scatter(
                [bx],
                [best["objective"]],
                marker="*",
                s=220,
                facecolor="gold",
                edgecolor="k",
                zorder=4,
                label="best",
            )
            ax.legend(fontsize=8, loc="best")
        ax.set_xlabel(f"{key} ({spec['dist']}, searched range)")
        ax.set_ylabel(metric)
        ax.set_title(key)
    for ax in axes[n:]:
        ax.axis("off")
    return save_figure(
        plt, fig, path, f"raycell tune: {len(rows)} trials, objective {metric} ({mode})"
    )


def run_search(cfg: ExperimentConfig) -> dict:
    """`_run_search`, holding the lock of `tune.out` (two searches there would mix trials)."""
    from raycell.utils.locks import writing

    with writing(cfg.tune.out, "tune.out"):
        return _run_search(cfg)


def _run_search(cfg: ExperimentConfig) -> dict:
    """Run the search of `cfg.tune` (Ray initialised).

    Returns {out, trials_csv, best_yaml, plot, best, trials}.

    Raises:
        ConfigError: the space, data or folder fail `check_tune`; no trial fits the cluster; the metric
            `tune.metric` was never reported (the message lists what was).
    """
    import pandas as pd
    import ray
    import ray.train
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.stopper import CombinedStopper

    from raycell.train.trainer import training_setup
    from raycell.utils.interrupts import graceful, stop_ray_tune
    from raycell.utils.io import atomic_write_text

    cfg = resume_search_config(cfg) if cfg.tune.resume else copy.deepcopy(cfg)
    cfg.data.path = str(
        Path(cfg.data.path).absolute()
    )  # trials and workers chdir: paths must be absolute
    out = check_tune(cfg)
    t = cfg.tune
    conc, fits = max_concurrent(cfg, ray.cluster_resources())
    if t.max_concurrent_trials > fits:
        print(
            f"[raycell] tune.max_concurrent_trials={t.max_concurrent_trials} lowered to {fits}: the cluster "
            f"fits {fits} trial(s) of {trial_resources(cfg)} (+1 CPU each for data reads)",
            flush=True,
        )
    setup, ds = training_setup(cfg)
    if t.folds:
        folds = cross_batch_folds(cfg, ds)
        setup = [training_setup(cfg, fold)[0] for fold in folds]
        print(
            f"[raycell] tune: {t.folds} cross-batch folds per trial, holding out "
            f"{', '.join('/'.join(f) for f in folds)}: the objective is the mean {t.metric} over them",
            flush=True,
        )
    base = copy.deepcopy(cfg)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if (
        not base.train.torch_threads and len(nodes) == 1
    ):  # one machine: share its cores between trials
        runs = conc * cfg.scaling.num_workers * max(1, t.folds)
        base.train.torch_threads = max(1, (os.cpu_count() or 1) // runs)
    out.mkdir(parents=True, exist_ok=True)
    if not t.resume:
        save_config(cfg, out / "config.yaml")
    print(
        f"[raycell] tune: {t.num_samples} trial(s) of {cfg.model.type} over {', '.join(t.space)}, "
        f"{conc} at once, objective {t.metric} ({t.mode}) -> {out}",
        flush=True,
    )

    # Tune's strict check raises a bare ValueError from its controller on a result without the metric;
    # MetricWatch stops the search instead and the missing metric is reported below in one line.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    watch = _metric_watch(t.metric)
    fails = _failure_watch(t.num_samples)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            _trial, base=base.to_dict(), setup=setup, trials_dir=str(out / TRIALS)
        ),
        {"CPU": t.trial_cpus},
    )
    if t.resume:
        # Finished trials keep their results; unfinished ones restart, and their Train run (same name)
        # continues from its last checkpoint. Optuna's state and the stopper come back with the search.
        print(f"[raycell] tune: resuming the search in {out / SEARCH}", flush=True)
        tuner = ray.tune.Tuner.restore(
            str(out / SEARCH), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space=search_space(t.space),
            tune_config=ray.tune.TuneConfig(
                metric=t.metric,
                mode=t.mode,
                num_samples=t.num_samples,
                max_concurrent_trials=conc,
                search_alg=OptunaSearch(seed=cfg.seed),
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=cfg.train.epochs,
                    grace_period=min(t.grace_period, cfg.train.epochs),
                    reduction_factor=t.reduction_factor,
                ),
            ),
            run_config=ray.tune.RunConfig(
                name=SEARCH,
                storage_path=str(out),
                stop=CombinedStopper(watch, fails),
                callbacks=[fails],
                failure_config=ray.tune.FailureConfig(max_failures=0),
                verbose=1,
            ),
        )
    # Ctrl-C / SIGTERM: Tune stops and saves the search (for --resume); then no ranking, no
    # best.yaml from an interrupted trial, and the CLI says "interrupted" (exit 130 / 143)
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    with graceful(stop_ray_tune) as caught:
        grid = tuner.fit()
    caught.reraise(f"resume with `raycell tune --resume {out}` (finished trials are kept)")
    if fails.reason:
        raise SearchFailed(
            f"the first {len(fails.reasons)} trial(s) all failed the same way "
            f"before any reported a result, so the search was stopped: "
            f"{fails.reason} (logs under {out / SEARCH})"
        )

    keys = list(t.space)
    rows, reported = _trial_rows(grid, keys, t.metric, t.mode, cfg.train.epochs, out / TRIALS)
    if t.metric not in reported:
        if not reported and all(r["status"] == "error" for r in rows):
            raise SearchFailed(
                f"every trial failed; the first: {rows[0]['error'] if rows else '?'} "
                f"(logs under {out / SEARCH})"
            )
        raise ConfigError(
            f"tune.metric {t.metric!r} was never reported by the training loop; it reported: "
            f"{', '.join(sorted(reported)) or 'nothing'} (set tune.metric to one of them)"
        )
    best = select_best(rows, t.select, t.mode)
    pd.DataFrame([{k: v for k, v in r.items() if k != "tune_dir"} for r in rows]).to_csv(
        out / "trials.csv", index=False
    )

    best_yaml = None
    if best is not None:
        best_cfg = apply_params(cfg, {k: best[k] for k in keys})
        best_cfg.train.epochs = (
            int(best["best_epoch"]) + 1
        )  # train up to the chosen epoch, no further
        best_cfg.name = f"{cfg.name}-best"
        best_yaml = out / "best.yaml"
        import yaml

        link = None if t.folds else _link_best(out, best)
        no_link = "none: each of its fold models misses a batch" if t.folds else "not kept"
        rule = (
            "among the trials that ran the most epochs"
            if t.select == "budget"
            else "among all trials"
        )
        sampled = ", ".join(f"{k}={best[k]!r}" for k in keys)
        value = f"{best['objective']:.4f}"
        if _finite(best.get("objective_fold_sd")):
            each = ", ".join(f"{best[f'objective_fold{k}']:.4f}" for k in range(t.folds))
            value += (
                f" (mean over {t.folds} cross-batch folds, s.d. {best['objective_fold_sd']:.4f}; "
                f"folds: {each})"
            )
        head = (
            f"# Best trial {best['trial_id']} of the search in {out}: {t.metric} = {value} "
            f"at epoch {best['best_epoch']} (of {best['epochs_run']} run), each trial at its best epoch, "
            f"{rule} (tune.select={t.select})\n# sampled: {sampled}\n"
            f"# its run: {out / TRIALS / ('train-' + best['trial_id'])}\n"
            f"# its checkpoint: {link or no_link}\n"
            f"# reproduce: raycell train --config {best_yaml}\n"
        )
        atomic_write_text(best_yaml, head + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    plot = objective_plot(rows, t.space, t.metric, t.mode, out / "tune_objective.png", best)
    n_by = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "error")}
    print(
        f"[raycell] tune finished: {len(rows)} trial(s) {n_by}; best {t.metric} = "
        f"{best['objective'] if best else float('nan'):.4f} ({best['trial_id'] if best else '-'}): "
        f"{ {k: best[k] for k in keys} if best else {} }",
        flush=True,
    )
    print(f"  trials   {out / 'trials.csv'}\n  best     {best_yaml}\n  plot     {plot}", flush=True)
    if best is not None and (out / "best").is_dir():
        print(
            f"  checkpoint {out / 'best'} (raycell infer --checkpoint {out / 'best'})", flush=True
        )
    return {
        "out": str(out),
        "trials_csv": str(out / "trials.csv"),
        "best_yaml": str(best_yaml) if best_yaml else None,
        "plot": str(plot),
        "best": best,
        "trials": rows,
    }
