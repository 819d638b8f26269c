"""`raycell train`: wire a config into a Ray Train `TorchTrainer` fed by Ray Data, and fit it.

The run folder is `<train.runs_dir>/<name>-<timestamp>/` (Ray's storage for this run): it holds the
resolved `config.yaml`, Ray's `checkpoint_*` folders, `history.jsonl` (every epoch's metrics, appended by
the loop's rank 0 as it goes) and, at the end, `metrics.json` with every epoch.
`train.resume=<run folder>` re-runs under the same Ray run name, which makes Ray hand the loop its latest
checkpoint. A resumed run keeps the config recorded in its `config.yaml` (`resume_config`): only the keys
in `RESUME_MAY_CHANGE` may differ, and the record is rewritten only after the resumed run succeeds.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict
from pathlib import Path

from raycell import constants as K
from raycell.config import ConfigError, ExperimentConfig, save_config
from raycell.data.augment import parse_augment
from raycell.data.dataset import choose_materialize, ray_datasets, split_nbytes
from raycell.errors import UserError
from raycell.formats.categories import CategoryMap
from raycell.formats.shards import open_dataset
from raycell.formats.spec import DataSpec
from raycell.train.history import HISTORY_FILE, EpochPrinter, read_history
from raycell.train.setup import Balance, RunSetup
from raycell.train.stopping import EarlyStopping
from raycell.utils.io import atomic_write_json, atomic_write_text, new_run_dir
from raycell.utils.ray_utils import link_ray_logs, single_node

# Keys a resumed run may change (prefixes end with "."): how long and where it runs, not what it learns.
RESUME_MAY_CHANGE = (
    "train.epochs",
    "train.max_failures",
    "train.checkpoints_to_keep",
    "train.log_every",
    "train.torch_threads",
    "train.composite_weight",
    "train.chaos_kill_after_steps",
    "ray.",
    "scaling.",
)
# Keys training does not read: a resume ignores them and keeps the run's values.
RESUME_IGNORED = (
    "name",
    "train.runs_dir",
    "train.resume",
    "synth.",
    "ingest.",
    "split.",
    "infer.",
    "eval.",
    "demo.",
)


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and prefix + k not in ("model.args", "scaling.resources_per_worker"):
            out += _leaf_keys(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


def resume_config(cfg: ExperimentConfig, given: list[str] | None = None) -> ExperimentConfig:
    """The config of the run `cfg.train.resume` continues: its recorded `config.yaml`, plus allowed changes.

    Args:
        cfg: The config the user asked for (`train.resume` set).
        given: Dotted keys the user set explicitly (`raycell.config.explicit_keys`); None compares every key
            (the Python API, where set and default values cannot be told apart).

    Raises:
        ConfigError: the run folder or its config.yaml is missing, or a given key that a resume may not
            change (anything but `RESUME_MAY_CHANGE`) differs from the run's value. Nothing is written.
    """
    from raycell.config import load_config

    run_dir = Path(cfg.train.resume).absolute()
    if not run_dir.is_dir():
        raise ConfigError(
            f"train.resume: run folder not found: {run_dir} (give a folder that "
            f"`raycell train` created under train.runs_dir)"
        )
    record = run_dir / "config.yaml"
    if not record.is_file():
        raise ConfigError(f"train.resume: {run_dir} is not a raycell run folder (no config.yaml)")
    recorded = load_config(record)
    keys = _leaf_keys(cfg.to_dict()) if given is None else given
    conflicts = []
    for key in dict.fromkeys(keys):
        if _matches(key, RESUME_IGNORED):
            continue
        mine, theirs = cfg.get(key), recorded.get(key)
        if key == "data.path":
            mine, theirs = str(Path(mine).absolute()), str(Path(theirs).absolute())
        if mine == theirs:
            continue
        if _matches(key, RESUME_MAY_CHANGE):
            recorded.set(key, mine)
        else:
            conflicts.append(f"{key} ({theirs!r} in the run, {mine!r} given)")
    if conflicts:
        allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESUME_MAY_CHANGE)
        raise ConfigError(
            f"train.resume: {'; '.join(conflicts)}: a resumed run keeps its recorded config "
            f"({record}); drop the conflicting option(s), or start a new run without --resume "
            f"(a resume may change only {allowed})"
        )
    recorded.train.resume = str(run_dir)
    recorded.ray = copy.deepcopy(cfg.ray)  # how to reach Ray is about this invocation, not the run
    return recorded.validate()


def _training_data(cfg: ExperimentConfig):
    """The data set of `data.path`, which must have a train split."""
    ds = open_dataset(cfg.data.path)
    counts = ds.manifest.counts_per_split
    if not counts.get(K.TRAIN):
        raise ConfigError(
            f"{ds.root} has no rows with split 'train' (counts: {counts}); run "
            f"`raycell split --data {ds.root}` first"
        )
    return ds


def check_train(cfg: ExperimentConfig) -> None:
    """What `train` can check without Ray, before any folder is created: model type, data set.

    A bad model type used to fail inside a Ray Train worker (a retry, ~40 s, and an empty run folder).
    """
    from raycell.models import list_models

    if cfg.model.type not in list_models():
        raise ConfigError(
            f"model.type: unknown model type {cfg.model.type!r}; registered: "
            f"{', '.join(list_models())} (see `raycell models`)"
        )
    try:  # here, not in config.validate: the config module stays below raycell.data in the imports
        parse_augment(cfg.train.augment)
    except ValueError as exc:
        raise ConfigError(f"train.augment: {exc}") from None
    ds = _training_data(cfg)
    heads = weak_label_heads(cfg, ds)
    if heads:
        # build it once here: a wrong backbone name or weights file is one line, not a worker trace
        from raycell.models import create_model
        from raycell.train.loop import model_kwargs

        spec = DataSpec.from_dataset(ds)
        labels, batches = CategoryMap(K.LABEL, ("a", "b")), CategoryMap(K.BATCH, ("a",))
        try:
            create_model(cfg.model.type, **model_kwargs(cfg, spec, labels, batches, heads=heads))
        except TypeError as exc:  # an argument the builder does not take
            raise ConfigError(f"model.args: {exc}") from None
    if cfg.train.layer_decay:
        from raycell.models import model_entry

        if not model_entry(cfg.model.type).weak_labels:
            raise ConfigError(
                f"train.layer_decay: model type {cfg.model.type!r} has no layer groups "
                "(layer-wise learning rates are for the timm backbones); set it to 0"
            )
    _warn_degenerate_train_split(cfg, ds)
    if cfg.train.resume and any(Path(cfg.train.resume).glob("checkpoint_*/meta.json")):
        from raycell.formats.checkpoint import load_plan_state
        from raycell.models.checkpoint import load_checkpoint

        # the worker would load it after Ray starts, where a corrupt file is a worker trace, not one line
        _, meta = load_checkpoint(cfg.train.resume)
        load_plan_state(meta.path)


_warned: set[tuple] = set()  # (data set, model type): each warning once per process


def _warn_degenerate_train_split(cfg: ExperimentConfig, ds) -> None:
    """Warn when the train split cannot teach what the model is for.

    One label class (nothing to classify), or one imaging batch for a model type that corrects
    batches (nothing to remove). A warning, not a refusal: a smoke test may want exactly that.
    """
    import sys

    from raycell.models import model_entry

    entry = model_entry(cfg.model.type)
    if (str(ds.root), cfg.model.type) in _warned or entry.batch_head:
        return
    _warned.add((str(ds.root), cfg.model.type))
    t = ds.read_table([K.LABEL, K.BATCH], splits=[K.TRAIN])
    labels = sorted(set(t.column(K.LABEL).to_pylist()))
    batches = sorted(set(t.column(K.BATCH).to_pylist()))
    if len(labels) == 1 and not entry.weak_labels:
        print(
            f"[raycell] warning: the train split of {ds.root} has one label class "
            f"({labels[0]!r}): the classifier cannot learn anything (check `raycell split` and "
            "the data set's labels)",
            file=sys.stderr,
            flush=True,
        )
    if len(batches) == 1 and (entry.uses_z or "batch_logits" in entry.outputs):
        print(
            f"[raycell] warning: the train split of {ds.root} has one imaging batch "
            f"({batches[0]!r}): model type {cfg.model.type!r} has no batch effect to remove "
            "(its batch terms learn nothing)",
            file=sys.stderr,
            flush=True,
        )


def weak_label_heads(cfg: ExperimentConfig, ds) -> list[CategoryMap] | None:
    """The vocabularies of `data.heads` for a weak-label model type (None for the others).

    One head per column (default: the label column), each fitted on every row of the data set, numeric
    columns in numeric order. A column that is missing or has fewer than 2 values is a one-line error.
    """
    from raycell.models import model_entry

    entry = model_entry(cfg.model.type)
    cols = [str(c) for c in cfg.data.heads]
    if entry.batch_head:
        return [batch_head_vocab(cfg, ds)]
    if not entry.weak_labels:
        if cols and cols != [K.LABEL]:
            raise ConfigError(
                f"data.heads {cols}: model type {cfg.model.type!r} has one phenotype head (the "
                f"'{K.LABEL}' column); weak-label heads need a model type with heads (timm)"
            )
        return None
    cols = cols or [K.LABEL]
    import pyarrow.parquet as pq

    have = pq.read_schema(ds.shard_paths[0]).names
    missing = [c for c in cols if c not in have]
    if missing:
        meta = [c for c in have if c not in K.IMAGE_COLUMNS and not c.startswith(K.MORPH_PREFIX)]
        raise ConfigError(
            f"data.heads: column(s) {missing} are not in data set {ds.root}; its metadata "
            f"columns are {meta}"
        )
    t = ds.read_table(cols)
    maps = [CategoryMap.fit_column(c, t.column(c)) for c in cols]
    for c, m in zip(cols, maps):
        _refuse_continuous_head(c, t.column(c), len(m), ds.root)
        if t.column(c).null_count:
            raise ConfigError(
                f"data.heads: column {c!r} of data set {ds.root} has "
                f"{t.column(c).null_count} empty value(s); every cell needs a class"
            )
        if len(m) < 2:
            raise ConfigError(
                f"data.heads: column {c!r} of data set {ds.root} has {len(m)} distinct "
                f"value(s) {list(m.values)}; a head needs at least 2 classes"
            )
    return maps


def _refuse_continuous_head(column: str, values, n_classes: int, root) -> None:
    """Refuse a head column whose values do not repeat.

    A measurement (float values) or a per-cell column would become one class per cell, which no
    model can learn (validation accuracy 0).
    """
    import pyarrow as pa

    n = len(values)
    floats = pa.types.is_floating(values.type)
    if n_classes > 20 and (floats or n_classes > n // 2):
        kind = "continuous numbers" if floats else "nearly one value per cell"
        raise ConfigError(
            f"data.heads: column {column!r} of data set {root} holds {kind} "
            f"({n_classes} distinct values in {n} cells); a head needs classes: "
            "use a column of categories (e.g. bin the values into levels first)"
        )


def batch_head_vocab(cfg: ExperimentConfig, ds) -> CategoryMap:
    """The one head of a batch-head model type (the Z-predictor): the training batches, Z's columns.

    A batch classifier is validated on held-out cells of the batches it learns (split 'val'): it
    cannot score cells of batches it has no class for. So the data set needs val rows, all of them
    from training batches, and at least 2 training batches; each is a one-line error.
    """
    cols = [str(c) for c in cfg.data.heads]
    if cols not in ([], [K.BATCH]):
        raise ConfigError(
            f"data.heads {cols}: model type {cfg.model.type!r} has one head, the "
            f"'{K.BATCH}' column (the imaging batch); leave data.heads empty"
        )
    t = ds.read_table([K.BATCH, K.SPLIT], splits=[K.TRAIN, K.VAL])
    split = t.column(K.SPLIT).to_pylist()
    batch = t.column(K.BATCH).to_pylist()
    vocab = CategoryMap.fit(K.BATCH, [b for b, s in zip(batch, split) if s == K.TRAIN])
    if len(vocab) < 2:
        raise ConfigError(
            f"model type {cfg.model.type!r} predicts the imaging batch, but the train split of "
            f"{ds.root} has {len(vocab)} batch(es) {list(vocab.values)}; it needs at least 2"
        )
    val = {b for b, s in zip(batch, split) if s == K.VAL}
    if not val:
        raise ConfigError(
            f"model type {cfg.model.type!r} validates on held-out cells of the training "
            f"batches (split '{K.VAL}'), but {ds.root} has no '{K.VAL}' rows (its splits: "
            f"{ds.manifest.counts_per_split}); re-split it with a val fraction > 0 "
            "(split.fractions)"
        )
    extra = sorted(val - set(vocab.values))
    if extra:
        raise ConfigError(
            f"model type {cfg.model.type!r}: the '{K.VAL}' split of {ds.root} has cells of "
            f"batch(es) {extra} that have no training cells, which a batch classifier cannot "
            "score; re-split it so that every val batch has training cells"
        )
    return vocab


def refuse_batch_head_fold(model_type: str) -> None:
    """Refuse a cross-batch fold (`tune.folds`) of a model type that predicts the training batches.

    Its head has no class for the batch a fold holds out, so the fold could neither train on that
    batch's label nor score its cells.

    Raises:
        ConfigError: `model_type` has a batch head.
    """
    from raycell.models import model_entry

    if model_entry(model_type).batch_head:
        raise ConfigError(
            f"tune.folds: model type {model_type!r} predicts the training batches, so it "
            "cannot be validated on a batch it has not seen; set tune.folds=0"
        )


def training_setup(
    cfg: ExperimentConfig,
    fold: list[str] | None = None,
    balance: Balance | None = None,
    early_stopping: EarlyStopping | None = None,
) -> tuple[RunSetup, object]:
    """The run setup of `cfg` (the only place one is built) and its data set.

    Labels come from the manifest, batches are the training batches. `valbatch` is true when the data
    set has held-out validation batches (`split.val_batches`): the loop then validates on them too, and
    `build_trainer` hands Ray Train that split. `fold`: the batches a cross-batch fold holds out
    (`tune.folds`): their train and val cells become the run's `valbatch` instead
    (`raycell.data.dataset.split_filter`), and they leave the design matrix's batches. `balance`: a
    batch-head model type only (the balanced Z-predictor, `ZPredictorPlan.set_balance`).
    `early_stopping`: the rule the loop checks after each epoch.
    """
    from raycell.models import model_entry

    ds = _training_data(cfg)
    meta = ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH)
    if fold:
        import pyarrow as pa
        import pyarrow.compute as pc

        meta = meta.filter(pc.invert(pc.is_in(meta, value_set=pa.array(list(fold)))))
        if not len(meta):
            raise ConfigError(f"a fold holding out {fold} leaves no training cells")
    heads = weak_label_heads(cfg, ds)
    entry = model_entry(cfg.model.type)
    if balance is not None and not entry.batch_head:
        raise ConfigError(
            f"balanced loss weights are for the Z-predictor (a batch-head model type), "
            f"not model type {cfg.model.type!r}"
        )
    if fold:
        refuse_batch_head_fold(cfg.model.type)
    valbatch = bool(fold) or bool(ds.manifest.counts_per_split.get(K.VALBATCH))
    if valbatch and entry.batch_head:
        # held-out batches have no class in a batch classifier's head: validate on val only
        n = ds.manifest.counts_per_split[K.VALBATCH]
        print(
            f"[raycell] model type {cfg.model.type!r} predicts the training batches, so it validates on "
            f"held-out cells of those batches (split '{K.VAL}') only; the {n} cells of held-out batches "
            f"(split '{K.VALBATCH}', split.val_batches) are not used",
            flush=True,
        )
        valbatch = False
    # the model input's normalisation travels with the model (saved in every checkpoint's spec)
    spec = DataSpec.from_dataset(ds, cfg.data.normalize)
    stats = ds.manifest.channel_stats
    # the one-cycle schedule's length (steps per worker per epoch, as the loop counts them)
    steps = max(1, len(meta) // (cfg.data.batch_size * max(1, cfg.scaling.num_workers)))
    setup = RunSetup(
        data_spec=spec,
        labels=CategoryMap(K.LABEL, ds.manifest.label_vocab),
        batches=CategoryMap.fit(K.BATCH, meta.to_pylist()),
        steps_per_epoch=min(steps, cfg.train.max_steps_per_epoch or steps),
        valbatch=valbatch,
        fold_batches=tuple(fold or ()),
        channel_means=tuple(stats[c]["mean"] * spec.scale for c in ds.manifest.channel_names)
        if stats
        else None,
        heads=tuple(heads or ()),
        balance=balance,
        early_stopping=early_stopping,
    )
    return setup, ds


def best_checkpoint(run_dir: str | Path, epoch: int) -> Path | None:
    """The checkpoint folder of `epoch` in a run folder (None when it was not kept)."""
    from raycell.formats.checkpoint import read_meta

    for ck in sorted(Path(run_dir).glob("checkpoint_*")):
        try:
            if read_meta(ck).epoch == epoch:
                return ck
        except (UserError, OSError, ValueError):  # a partial checkpoint: not the one
            continue
    return None


def stream_options(cfg: ExperimentConfig, held: bool) -> dict | None:
    """Ray Data options for a streamed training split: read ahead at most `data.stream_buffer_mb` per worker.

    Ray bounds the read-ahead itself (measured, `tiny` AEC: ~1 GiB of blocks waiting on 1 M cells, flat
    through the epoch; ~0.1 GiB on 100 k, where the whole split is smaller); a bound here trades memory
    for speed (256 MiB: 0.14 GiB waiting, epoch 1.33x slower on 2 cores, the split coordinator's
    scheduler busy while throttled). The validation splits keep Ray's defaults: a bound throttled their
    many small read tasks (a 72 k-cell pass 1.4x slower). Held (materialised) splits are in the store.
    """
    if held or cfg.data.stream_buffer_mb <= 0:
        return None
    import copy

    from ray.data import DataContext

    # Train's default_ingest_options() is this copy, minus a deprecated argument that warns on the terminal
    o = copy.deepcopy(DataContext.get_current().execution_options)
    o.resource_limits = o.resource_limits.copy(
        object_store_memory=(cfg.data.stream_buffer_mb << 20) * max(1, cfg.scaling.num_workers)
    )
    return {K.TRAIN: o}


def build_trainer(
    cfg: ExperimentConfig,
    run_dir: Path,
    setup: RunSetup,
    ds,
    callbacks: list | None = None,
    keep_best: tuple[str, str] | None = None,
):
    """A TorchTrainer for `cfg` writing into `run_dir` (every epoch's metrics to `run_dir/history.jsonl`).

    `keep_best` = (metric, mode): the checkpoints kept are the best by that metric (Ray always keeps the
    latest too, which resuming needs) instead of the latest ones.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from raycell.train.loop import make_collate, train_loop_per_worker

    rule = setup.early_stopping
    keep = cfg.train.checkpoints_to_keep
    if rule is not None:
        # at most `patience` epochs follow the best one: the latest patience + 1 hold it
        keep = max(keep, rule.patience + 1)
    splits = (K.TRAIN, K.VAL, K.VALBATCH) if setup.valbatch else (K.TRAIN, K.VAL)
    import ray

    columns = make_collate(setup).columns
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    held = choose_materialize(ds, splits, cfg.data.materialize, store, columns)
    print(
        f"[raycell] "
        f"data: {'held in the object store (read once)' if held else 'streamed from the shards every epoch'} "
        f"({sum(split_nbytes(ds, s, columns) for s in splits) / 2**20:.0f} MiB for {', '.join(splits)}; "
        f"object store {store / 2**30:.1f} GiB; data.materialize={cfg.data.materialize})",
        flush=True,
    )
    datasets = ray_datasets(
        ds,
        splits,
        columns=columns,
        block_size_mb=cfg.data.block_size_mb,
        shuffle_seed=cfg.data.shuffle_seed,
        materialize=held,
        parquet_reader=cfg.data.parquet_reader,
        fold=list(setup.fold_batches),
    )
    sc = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "setup": setup.to_dict(),
            "history_file": str(Path(run_dir).absolute() / HISTORY_FILE),
        },
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[K.TRAIN],  # val, valbatch: all rows each
            execution_options=stream_options(cfg, held),
        ),
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=dict(sc.resources_per_worker) or None,
        ),
        run_config=ray.train.RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=keep,
                checkpoint_score_attribute=keep_best[0] if keep_best else None,
                checkpoint_score_order=keep_best[1] if keep_best else "max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def run_history(run_dir: str | Path, result=None) -> list[dict]:
    """Every epoch's metrics of a run, in epoch order: its `history.jsonl`, completed from Ray's result.

    `result.metrics_dataframe` holds only the epochs whose checkpoints are kept; it fills epochs the file
    lacks (a run folder from before the file existed, or a rank 0 whose writes did not reach `run_dir`).
    """
    by_epoch = {}
    if result is not None and result.metrics_dataframe is not None:
        for rec in result.metrics_dataframe.to_dict(orient="records"):
            if (
                isinstance(rec.get("epoch"), (int, float)) and rec["epoch"] == rec["epoch"]
            ):  # not NaN
                by_epoch[int(rec["epoch"])] = rec
    for rec in read_history(Path(run_dir) / HISTORY_FILE):
        by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


class TrainingFailed(UserError):
    """The run failed more often than `train.max_failures` allows (a worker died or raised)."""


def _failure_summary(exc: BaseException) -> str:
    """The line of a Ray Train failure that says what happened (Ray's message spans many lines)."""
    import re

    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for pattern in (
        r"^\w*(Error|Exception)\b.*:",
        r"(died|killed|exited|lost|health check failed)",
    ):
        # a line ending in ':' is a heading ("Training failed due to worker errors:"), not the cause
        hits = [ln for ln in lines if re.search(pattern, ln) and not ln.endswith(":")]
        if hits:
            return hits[-1][:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


_RESUME_HINT = "resume with `raycell train --resume {run_dir}` (from its latest checkpoint)"


def fit_or_explain(trainer, cfg: ExperimentConfig, run_dir: Path):
    """`trainer.fit()`; a failure past `train.max_failures` becomes one line, with Ray's full report kept
    in `<run_dir>/failure.txt` (nothing is lost, the terminal stays readable).
    """
    import contextlib

    import ray.train

    from raycell.errors import environment_problem
    from raycell.utils.interrupts import graceful
    from raycell.utils.ray_private import replace_train_sigint_handler

    caught = []

    def register(controller) -> None:
        # In place of Ray Train's own SIGINT handler, which aborts the run and then lets `fit`
        # return as if it had finished (raycell would record an interrupted run as done): abort the
        # same way, on SIGTERM too, and raise KeyboardInterrupt once `fit` is back.
        caught.append(stack.enter_context(graceful(lambda signum: controller.abort.remote())))

    try:
        with contextlib.ExitStack() as stack:
            replace_train_sigint_handler(trainer, register)
            result = trainer.fit()
    except Exception as exc:
        if caught and caught[0].signum:  # an abort we asked for, whatever Ray made of it
            caught[0].reraise(_RESUME_HINT.format(run_dir=run_dir))
        problem = environment_problem(exc)  # a worker's full or read-only disk, not a "failure"
        if problem is not None:
            raise problem from None
        if not isinstance(exc, ray.train.TrainingFailedError):
            raise
        report = run_dir / "failure.txt"
        atomic_write_text(report, f"{type(exc).__name__}: {exc}\n")
        raise TrainingFailed(
            f"training failed after {cfg.train.max_failures} restart(s) (train.max_failures): "
            f"{_failure_summary(exc)}; Ray's report: {report}; the run keeps its checkpoints: continue "
            f"with `raycell train --resume {run_dir}`"
        ) from None
    if caught:
        caught[0].reraise(_RESUME_HINT.format(run_dir=run_dir))
    return result


def train(
    cfg: ExperimentConfig,
    early_stopping: EarlyStopping | None = None,
    balance: Balance | None = None,
) -> dict:
    """`_train`, holding the run folder's lock when resuming it (two resumes would mix epochs)."""
    if not cfg.train.resume:
        return _train(cfg, early_stopping, balance)
    from raycell.utils.locks import writing

    with writing(cfg.train.resume, "train.resume run folder", make_parent=False):
        return _train(cfg, early_stopping, balance)


def _train(
    cfg: ExperimentConfig,
    early_stopping: EarlyStopping | None = None,
    balance: Balance | None = None,
) -> dict:
    """Fit one model; returns {'run_dir', 'checkpoint', 'metrics', 'history'}.

    With `early_stopping`, the run stops once its metric has not improved for `patience` epochs, and
    the result also has 'best_epoch' and 'best_checkpoint' (that epoch's checkpoint folder; 'checkpoint'
    stays the latest, which a resume continues from); without it, `train.early_stopping_patience`
    decides. `balance`: a batch-head model type only (the balanced Z-predictor of `raycell infer-z`).
    Needs Ray to be initialised (see `raycell.utils.ray_utils.init_ray`).
    """
    if cfg.train.resume:
        cfg = resume_config(cfg)  # the run's recorded config; raises on a conflicting change
    cfg.data.path = str(Path(cfg.data.path).absolute())  # workers chdir; paths must be absolute
    check_train(cfg)
    if early_stopping is None:
        t = cfg.train
        early_stopping = EarlyStopping.from_config(
            t.early_stopping_patience, t.early_stopping_metric
        )
    setup, ds = training_setup(cfg, balance=balance, early_stopping=early_stopping)
    if not cfg.train.torch_threads and single_node():
        # A laptop or one-machine Ray: let the workers use the cores (Ray gives a 0.5-CPU worker 1 thread).
        cfg.train.torch_threads = max(1, (os.cpu_count() or 1) // cfg.scaling.num_workers)
    if cfg.train.resume:
        run_dir = Path(cfg.train.resume)
    else:  # only now: a run that fails its checks leaves no folder behind
        run_dir = new_run_dir(cfg.train.runs_dir, f"{cfg.name}-{cfg.model.type}")
        save_config(cfg, run_dir / "config.yaml")
    print(f"[raycell] training {cfg.model.type} on {ds.root} -> {run_dir}", flush=True)
    link_ray_logs(run_dir)
    if cfg.ray.verbose:  # the workers print their own epoch lines (and everything else)
        result = fit_or_explain(build_trainer(cfg, run_dir, setup, ds), cfg, run_dir)
    else:
        with EpochPrinter(run_dir / HISTORY_FILE, cfg.train.epochs):
            result = fit_or_explain(build_trainer(cfg, run_dir, setup, ds), cfg, run_dir)
    if (
        cfg.train.resume
    ):  # the record changes only when the resumed run succeeded (e.g. more epochs)
        save_config(cfg, run_dir / "config.yaml")
    history = run_history(run_dir, result)
    out = {
        "run_dir": str(run_dir),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": result.metrics,
        "history": history,
        "model_type": cfg.model.type,
    }
    if early_stopping is not None:
        best = early_stopping.best(history)
        ck = best_checkpoint(run_dir, best["epoch"]) if best else None
        out.update(
            best_epoch=best["epoch"] if best else None,
            best_checkpoint=str(ck) if ck else None,
            early_stopping=asdict(early_stopping),
        )
    atomic_write_json(run_dir / "metrics.json", out)
    return out
