"""`raycell infer-z`: the Z-predictor, a soft design matrix for batches a model never saw (2.6).

Random- and mixed-effects models need a design-matrix row Z for every cell. For an unseen batch
there is no one-hot row; ARMED trains an image classifier on the *training* images to predict their
batch and uses its softmax on the unseen cells as a soft Z: each unseen cell then gets a mix of the
random effects of the seen batches it looks like.

The classifier is the registered model type `zpredictor` (`raycell/models/armed.py`: the
`ImageClassifier` network, one head = the batch column over the training batches, `ZPredictorPlan`),
trained by the one loop through Ray Train like every other model, so it scales out with
`scaling.num_workers`. The recipe of the reference (`melanoma_aec/infer_design_matrix.py`) comes from
the `infer.z_*` keys: NAdam lr 1e-4, batch 32, at most 10 epochs, early stopping on validation
accuracy (patience 3) with the best epoch's weights. Validation is on held-out cells of the training
batches (split 'val'); held-out batches (split 'valbatch') are not used, since a batch classifier has no
class for them. The soft Z is then the batch head's probabilities (`prob_batch`) from the batch
inference (`raycell.infer.batch.predict`) on the cells of `infer.z_splits`, its columns in the order of
the batch vocabulary of the model being served (`infer.checkpoint`; else the data set's training
batches).

`infer.z_mode` chooses how the Z is made:
* `predicted` (the reference): the Z-predictor's softmax, as above. An unseen cell that looks like
  label X gets the Z of the batches where X is common: the classifier also learns the seen batches'
  label priors;
* `balanced`: the same Z-predictor trained with each training cell's cross-entropy weighted by
  1 / count(batch, label) (normalised to mean 1, `balanced_weights`, computed here on the driver from
  the train split and handed to the plan): within every batch each label has the same total weight, so
  the label no longer predicts the batch;
* `uniform`: no Z-predictor; every cell gets Z = 1 / n_seen_batches for each seen batch (the average
  random effect). Same output files (no `zpredictor.pt`), so everything downstream is unchanged;
* `zero`: no Z-predictor; every cell gets Z = 0, so every random effect sits at its prior mean 0: what a
  (generalised) linear mixed model predicts for a group it has never seen, the fixed effects alone.

Outputs, in `infer.z_out` (written atomically):
* `inferred_z.parquet`: `cell_id`, `batch`, `split` and `z` (fixed-size list of float32, one entry
  per training batch, in the model's Z column order) for the cells of `infer.z_splits` (default:
  unseen);
* `inferred_z.json`: the batch vocabulary (Z column order), validation accuracy, training history,
  the mean Z per batch (which seen batches each unseen batch resembles), and the Z-predictor's run;
* `zpredictor.pt`: the classifier's weights (`ImageClassifier` parameter names);
* `runs/infer-z-zpredictor-<timestamp>/`: the Z-predictor's training run (checkpoints, history) and
  its predictions.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from raycell import constants as K
from raycell.config import ConfigError, ExperimentConfig
from raycell.formats.categories import CategoryMap

# the Z table's format (re-exported here: `from raycell.zpredictor import read_inferred_z`
# keeps working)
from raycell.formats.inferred_z import (  # noqa: F401
    Z_JSON,
    Z_PARQUET,
    Z_WEIGHTS,
    read_inferred_z,
    z_fingerprint,
)
from raycell.formats.shards import ShardDataset, open_dataset
from raycell.utils.io import atomic_write_json, atomic_write_parquet

if TYPE_CHECKING:
    from raycell.train.setup import Balance

ZPREDICTOR = "zpredictor"  # the model type (raycell/models/armed.py)


def balanced_weights(
    batch_codes: np.ndarray, label_codes: np.ndarray, n_batches: int, n_labels: int
) -> np.ndarray:
    """Loss weights W[batch, label] = N / (P * count(batch, label)) for the balanced Z-predictor.

    N cells, P the (batch, label) pairs that occur: every pair then has the same total weight N / P (so
    within each batch every label weighs the same, and the label does not predict the batch) and the
    weights average 1 over the cells, so the loss keeps its scale. Pairs that do not occur get 0.
    """
    counts = np.zeros((n_batches, n_labels), np.float64)
    np.add.at(counts, (np.asarray(batch_codes), np.asarray(label_codes)), 1.0)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def balance_setup(cfg: ExperimentConfig, ds: ShardDataset) -> Balance:
    """The balanced Z-predictor's weights from the train split's (batch, label) counts (on the driver).

    Rows of the table in the order of the Z-predictor's batch head, as
    `raycell.train.trainer.train(balance=...)` takes it.
    """
    from raycell.train.setup import Balance
    from raycell.train.trainer import batch_head_vocab

    vocab = batch_head_vocab(cfg, ds)  # the Z-predictor's head: the rows of the table
    labels = CategoryMap(K.LABEL, ds.manifest.label_vocab)
    t = ds.read_table([K.BATCH, K.LABEL], splits=[K.TRAIN])
    w = balanced_weights(
        vocab.encode(t.column(K.BATCH)), labels.encode(t.column(K.LABEL)), len(vocab), len(labels)
    )
    return Balance(labels, tuple(map(tuple, w.tolist())))


def uniform_z(n_cells: int, n_batches: int) -> np.ndarray:
    """`infer.z_mode: uniform`: Z = 1 / n_batches for every seen batch, for every cell (rows sum to 1)."""
    return np.full((n_cells, n_batches), 1.0 / n_batches, np.float32)


# Modes whose Z is fixed in advance (no Z-predictor, no Ray): mode -> (n_cells, n_batches) -> Z.
FIXED_Z = {"uniform": uniform_z, "zero": lambda n, b: np.zeros((n, b), np.float32)}


def _batches_of(ds: ShardDataset, checkpoint: str) -> CategoryMap:
    """The Z column order: the checkpoint's training batches, or the data set's training batches."""
    if checkpoint:
        from raycell.formats.checkpoint import find_checkpoint, read_meta

        return read_meta(find_checkpoint(checkpoint)).batches
    col = ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH)
    return CategoryMap.fit(K.BATCH, col.to_pylist())


def check_infer_z_config(cfg: ExperimentConfig) -> ShardDataset:
    """Validate an infer-z run before any training: data set, checkpoint, splits, output folder.

    Returns:
        The opened data set.
    """
    from raycell.formats.shards import split_counts

    ds = open_dataset(cfg.infer.data or cfg.data.path)
    counts = split_counts(ds)
    if not counts.get(K.TRAIN):
        raise ConfigError(
            f"infer-z trains on the train split, but data set {ds.root} has none "
            f"(its splits: {counts}); run `raycell split` first"
        )
    bad = [s for s in cfg.infer.z_splits if s not in counts]
    if bad:
        raise ConfigError(
            f"infer.z_splits: {bad} not among the splits of data set {ds.root} ({sorted(counts)})"
        )
    if cfg.infer.checkpoint:
        from raycell.models.checkpoint import load_checkpoint

        _, meta = load_checkpoint(cfg.infer.checkpoint)  # the Z is for this model: it must load
        meta.data_spec.check_compatible(ds, f"checkpoint {meta.path}")
        train_batches = set(ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH).to_pylist())
        missing = sorted(set(meta.batches.values) - train_batches)
        if missing:
            raise ConfigError(
                f"infer-z: checkpoint {meta.path} was trained on batch(es) {missing} that "
                f"the train split of {ds.root} lacks, so the Z-predictor could not give them "
                "a Z column: infer.data must be the data set the model was trained on"
            )
        extra = sorted(train_batches - set(meta.batches.values))
        if extra:
            raise ConfigError(
                f"infer-z: the train split of {ds.root} has batch(es) {extra} that "
                f"checkpoint {meta.path} was not trained on: infer.data must be the "
                "data set the model was trained on"
            )
    if cfg.infer.z_out and Path(cfg.infer.z_out).is_file():
        raise ConfigError(f"infer.z_out {Path(cfg.infer.z_out).absolute()} is a file, not a folder")
    if cfg.infer.z_mode in FIXED_Z:  # no Z-predictor to train
        return ds
    from raycell.train.trainer import check_train

    check_train(
        zpredictor_config(cfg, ds, Path(cfg.infer.z_out or ds.root))
    )  # val split, >= 2 batches
    return ds


def zpredictor_config(cfg: ExperimentConfig, ds: ShardDataset, out: Path) -> ExperimentConfig:
    """The training config of the Z-predictor: `cfg` with the model, data and recipe of infer-z.

    The reference's recipe from the `infer.z_*` keys; no augmentation, no schedule; the user's
    `model.args` are the served model's, not the classifier's. Scaling, Ray and data streaming settings
    (workers, blocks, materialize, `train.max_steps_per_epoch`) stay the user's.
    """
    c = copy.deepcopy(cfg)
    ic = cfg.infer
    c.name = "infer-z"
    c.model.type, c.model.args = ZPREDICTOR, {}
    c.data.path, c.data.heads, c.data.batch_size = str(ds.root), [], ic.z_batch_size
    t = c.train
    t.epochs, t.lr, t.weight_decay = ic.z_epochs, ic.z_lr, 0.0
    t.schedule, t.layer_decay, t.augment, t.resume, t.chaos_kill_after_steps = (
        "constant",
        0.0,
        "",
        "",
        0,
    )
    t.runs_dir = str(Path(out).absolute() / "runs")
    return c.validate()


def _out_folder(cfg: ExperimentConfig, ds: ShardDataset) -> Path:
    if cfg.infer.z_out:
        return Path(cfg.infer.z_out).absolute()
    if cfg.infer.checkpoint:
        from raycell.formats.checkpoint import find_checkpoint

        return find_checkpoint(cfg.infer.checkpoint).parent / "inferred_z"
    return ds.root / "inferred_z"


def _read_soft_z(pred_out: str | Path, manifest: dict) -> pa.Table:
    """cell_id, batch, split and the batch head's probabilities from an infer predictions folder.

    Shards without a row of the Z splits (an ingest writes one shard per field, so most hold no unseen
    cell) are written with a `cell_id` column only; they are skipped, as `read_predictions` does.
    """
    import pyarrow.parquet as pq

    col = f"{K.PROB}_{K.BATCH}"
    parts = [
        pq.read_table(Path(pred_out) / sh["file"], columns=[K.CELL_ID, K.BATCH, K.SPLIT, col])
        for sh in manifest["shards"]
        if sh.get("rows", 1)
    ]
    return pa.concat_tables(parts).combine_chunks() if parts else pa.table({})


def _write_z(out: Path, t: pa.Table, z: np.ndarray, served: CategoryMap) -> dict:
    """Write inferred_z.parquet (atomically); returns the mean Z per batch (for the summary)."""
    n = len(served)
    out.mkdir(parents=True, exist_ok=True)
    zcol = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(z, np.float32).ravel()), n
    )
    table = pa.table(
        {
            K.CELL_ID: t.column(K.CELL_ID),
            K.BATCH: t.column(K.BATCH),
            K.SPLIT: t.column(K.SPLIT),
            "z": zcol,
        }
    )
    atomic_write_parquet(table, out / Z_PARQUET)
    per_batch = {}
    bcol = np.asarray(t.column(K.BATCH).to_pylist(), dtype=object)
    for name in sorted(set(bcol.tolist())):
        per_batch[name] = dict(zip(served.values, np.round(z[bcol == name].mean(0), 4).tolist()))
    return per_batch


def _empty_cells() -> pa.Table:
    return pa.table(
        {
            K.CELL_ID: pa.array([], pa.string()),
            K.BATCH: pa.array([], pa.string()),
            K.SPLIT: pa.array([], pa.string()),
        }
    )


def _z_summary(
    cfg: ExperimentConfig,
    ds: ShardDataset,
    out: Path,
    served: CategoryMap,
    n_cells: int,
    per_batch: dict,
    t0: float,
    *,
    val_accuracy: float | None = None,
    history: list | None = None,
    best_epoch: int | None = None,
    run: str | None = None,
    checkpoint: str | None = None,
) -> dict:
    """inferred_z.json's record; the Z-predictor's fields stay empty for a fixed Z (`FIXED_Z`)."""
    history = history or []
    return {
        "out": str(out),
        "parquet": str(out / Z_PARQUET),
        "dataset": str(ds.root),
        "checkpoint": cfg.infer.checkpoint or None,
        "splits": list(cfg.infer.z_splits),
        "z_mode": cfg.infer.z_mode,
        "n_cells": n_cells,
        "val_accuracy": val_accuracy,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "batches": served.to_dict(),
        "mean_z_per_batch": per_batch,
        "history": history,
        "zpredictor_run": run,
        "zpredictor_checkpoint": checkpoint,
        "seconds": round(time.time() - t0, 1),
    }


def run_fixed_z(cfg: ExperimentConfig) -> dict:
    """`infer.z_mode` uniform or zero (`FIXED_Z`): a Z fixed in advance for `cfg.infer.z_splits`, no Ray.

    Returns:
        The same summary as `infer_z` (no Z-predictor: its run, checkpoint and accuracy are empty).
    """
    t0 = time.time()
    mode = cfg.infer.z_mode
    ds = check_infer_z_config(cfg)
    served = _batches_of(ds, cfg.infer.checkpoint)  # the Z column order
    out = _out_folder(cfg, ds)
    t = ds.read_table(
        [K.CELL_ID, K.BATCH, K.SPLIT], splits=list(cfg.infer.z_splits)
    ).combine_chunks()
    if not t.num_rows:
        t = _empty_cells()
    z = FIXED_Z[mode](t.num_rows, len(served))
    per_batch = _write_z(out, t, z, served)
    (out / Z_WEIGHTS).unlink(missing_ok=True)  # a Z-predictor's weights left by an earlier mode
    summary = _z_summary(cfg, ds, out, served, int(t.num_rows), per_batch, t0)
    atomic_write_json(out / Z_JSON, summary)
    what = (
        f"1/{len(served)} for each seen batch"
        if mode == "uniform"
        else "0: random effects at their prior mean"
    )
    print(
        f"[raycell] infer-z: {mode} Z ({what}, infer.z_mode {mode}) for {t.num_rows} cell(s) -> "
        f"{out / Z_PARQUET}",
        flush=True,
    )
    return summary


def infer_z(cfg: ExperimentConfig) -> dict:
    """Train the Z-predictor on Ray and write the soft Z of the cells in `cfg.infer.z_splits`.

    Uses `cfg.infer.data` (default `cfg.data.path`); the Z columns follow `cfg.infer.checkpoint`'s
    training batches when a checkpoint is given (else the data set's training batches). Everything is
    checked before Ray starts; Ray is started (`ray.*` keys) unless it already runs. `infer.z_mode`:
    predicted (the reference), balanced (label-balanced loss weights), uniform or zero (`run_fixed_z`,
    no training, no Ray).

    Returns:
        A summary: out folder, parquet path, number of cells, best validation accuracy, epochs,
        batches, the Z-predictor's run folder and checkpoint.
    """
    mode = cfg.infer.z_mode
    if mode in FIXED_Z:
        return run_fixed_z(cfg)
    import torch

    from raycell.formats.checkpoint import read_meta
    from raycell.infer.batch import predict
    from raycell.train.stopping import EarlyStopping
    from raycell.train.trainer import train
    from raycell.utils.ray_utils import init_ray_from

    t0 = time.time()
    ds = check_infer_z_config(cfg)
    served = _batches_of(ds, cfg.infer.checkpoint)  # the Z column order
    out = _out_folder(cfg, ds)
    zcfg = zpredictor_config(cfg, ds, out)
    balance = balance_setup(zcfg, ds) if mode == "balanced" else None
    init_ray_from(cfg.ray)
    print(
        f"[raycell] infer-z: training the Z-predictor ({mode}) on {ds.root} ({len(served)} batches) "
        f"-> {out}",
        flush=True,
    )
    res = train(
        zcfg,
        early_stopping=EarlyStopping(patience=cfg.infer.z_patience, metric="val_acc"),
        balance=balance,
    )
    ck = res.get("best_checkpoint")
    if not ck:
        raise ConfigError(
            f"infer-z: the Z-predictor run {res['run_dir']} kept no checkpoint of its best "
            "epoch (no val accuracy was reported); see its history.jsonl"
        )
    learned = list(read_meta(ck).heads[0].values)
    if sorted(learned) != sorted(
        served.values
    ):  # check_infer_z_config makes them equal: a safeguard
        raise ConfigError(
            f"infer-z: the Z-predictor learned batches {learned}, but the model's Z has "
            f"columns {list(served.values)}: infer.data must be the model's data set"
        )
    # the soft Z: the batch head's probabilities for the cells of z_splits (the one batch inference)
    icfg = copy.deepcopy(zcfg)
    ic = icfg.infer
    ic.checkpoint, ic.data, ic.out, ic.splits = str(ck), str(ds.root), "", list(cfg.infer.z_splits)
    ic.z_source, ic.randomize_z, ic.write_recon = "", False, False
    manifest = predict(icfg)
    from raycell.formats.arrays import list_matrix

    t = _read_soft_z(manifest["out"], manifest)
    col = f"{K.PROB}_{K.BATCH}"
    n = len(served)
    if t.num_rows:
        prob = list_matrix(t.column(col), col, manifest["out"])
        z = prob[:, [learned.index(b) for b in served.values]]  # the served model's column order
    else:
        z = np.zeros((0, n), np.float32)
        t = _empty_cells()
    per_batch = _write_z(out, t, z, served)
    tmp = out / f".{Z_WEIGHTS}.tmp"
    torch.save(torch.load(Path(ck) / "model.pt", map_location="cpu", weights_only=True), tmp)
    os.replace(tmp, out / Z_WEIGHTS)
    history = [
        {
            "epoch": h["epoch"],
            "train_loss": h.get("train_loss"),
            "val_accuracy": h.get("val_acc"),
            "seconds": round(float(h.get("epoch_time_s", 0.0)), 2),
        }
        for h in res["history"]
    ]
    best = float(read_meta(ck).metrics.get("val_acc", float("nan")))
    summary = _z_summary(
        cfg,
        ds,
        out,
        served,
        int(t.num_rows),
        per_batch,
        t0,
        val_accuracy=best,
        history=history,
        best_epoch=res.get("best_epoch"),
        run=res["run_dir"],
        checkpoint=str(ck),
    )
    if balance is not None:
        summary["balance_weights"] = {
            "labels": balance["by"]["values"],
            "weights": balance["weights"],
        }
    atomic_write_json(out / Z_JSON, summary)
    stopped = (
        f", stopped early (no better val accuracy for {cfg.infer.z_patience} epoch(s))"
        if len(history) < cfg.infer.z_epochs
        else ""
    )
    print(
        f"[raycell] infer-z: best val accuracy {best:.4f} (epoch {res.get('best_epoch')}) after "
        f"{len(history)} epoch(s){stopped}; soft Z for {t.num_rows} cell(s) -> {out / Z_PARQUET}",
        flush=True,
    )
    return summary
