"""`raycell infer-z`: the Z-predictor, a soft design matrix for batches a model never saw (2.6).

Random- and mixed-effects models need a design-matrix row Z for every cell. For an unseen batch
there is no one-hot row; ARMED trains an image classifier on the *training* images to predict their
batch and uses its softmax on the unseen cells as a soft Z: each unseen cell then gets a mix of the
random effects of the seen batches it looks like.

As in the reference (`melanoma_aec/infer_design_matrix.py`): the `ImageClassifier` network of the
random-effects AEC, raw training images -> one-hot batch, categorical cross-entropy, NAdam
(lr 1e-4), batch 32, at most 10 epochs, early stopping on validation accuracy (patience 3) restoring
the best weights. It runs as a plain single-process PyTorch loop over the shards: an image
classifier of a few hundred thousand parameters trains in seconds to minutes per epoch on a CPU, and
the training split must fit in memory (as in the reference).

Outputs, in `infer.z_out` (written atomically):
* `inferred_z.parquet`: `cell_id`, `batch`, `split` and `z` (fixed-size list of float32, one entry
  per training batch, in the model's Z column order) for the cells of `infer.z_splits` (default:
  unseen);
* `inferred_z.json`: the batch vocabulary (Z column order), validation accuracy, training history
  and the mean Z per batch (which seen batches each unseen batch resembles);
* `zpredictor.pt`: the classifier's weights.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from raycell import constants as K
from raycell.config import ConfigError, ExperimentConfig
from raycell.data.dataset import TRAIN_COLUMNS, CropCollate
from raycell.formats.categories import CategoryMap
from raycell.formats.shards import ShardDataset, open_dataset
from raycell.formats.spec import DataSpec
from raycell.utils.io import atomic_write_json, atomic_write_parquet, read_json

Z_PARQUET, Z_JSON, Z_WEIGHTS = "inferred_z.parquet", "inferred_z.json", "zpredictor.pt"


def _z_paths(source: str | Path) -> tuple[Path, Path]:
    p = Path(source)
    if p.suffix == ".parquet":
        return p, p.with_suffix(".json")
    return p / Z_PARQUET, p / Z_JSON


def read_inferred_z(source: str | Path, batches: list[str] | None = None
                    ) -> tuple[pa.Array, np.ndarray]:
    """Read an infer-z output: (cell_id array, Z (N, n_batches) float32).

    Checked here, on the driver as well as in every inference actor, so a wrong `infer.z_source`
    is one line naming it rather than a Ray actor trace.

    Args:
        source: The infer-z output folder, or its `inferred_z.parquet`.
        batches: The model's training batches (Z column order), checked against the file's.

    Raises:
        FileNotFoundError: No inferred Z there (names `raycell infer-z`).
        ConfigError: Not a Z table (unreadable, wrong columns), or its batch vocabulary differs from
            the model's.
    """
    import pyarrow.parquet as pq

    p = Path(source)
    if p.is_file() and p.suffix != ".parquet":
        raise ConfigError(f"infer.z_source {p} is a file but not a Z table: give the folder written by "
                          "`raycell infer-z` (or its inferred_z.parquet)")
    pq_path, js_path = _z_paths(source)
    if not pq_path.is_file():
        raise FileNotFoundError(f"inferred Z not found at {pq_path} (infer.z_source): run "
                                "`raycell infer-z` first; it writes inferred_z.parquet into "
                                "infer.z_out")
    not_z = (f"infer.z_source {pq_path} is not a Z table written by `raycell infer-z` "
             f"(expected columns {K.CELL_ID!r} and 'z', a fixed-size list of floats)")
    try:
        schema = pq.read_schema(pq_path)
        if K.CELL_ID not in schema.names or "z" not in schema.names:
            raise ConfigError(f"{not_z}; it has columns {schema.names}")
        if not pa.types.is_fixed_size_list(schema.field("z").type):
            raise ConfigError(f"{not_z}; its 'z' column is {schema.field('z').type}")
        t = pq.read_table(pq_path, columns=[K.CELL_ID, "z"])
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConfigError(f"{not_z}; it cannot be read: {exc}") from None
    n = t.column("z").type.list_size
    z = np.asarray(t.column("z").combine_chunks().flatten(), dtype=np.float32)
    z = z.reshape(t.num_rows, n)
    if js_path.is_file():
        try:
            vocab = read_json(js_path, "inferred Z metadata")["batches"]["values"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"infer.z_source: {js_path} is not an infer-z summary ({exc}); re-run "
                              "`raycell infer-z`") from None
        if batches is not None and list(vocab) != list(batches):
            raise ConfigError(f"inferred Z at {pq_path} (infer.z_source) has columns for batches "
                              f"{vocab}, but the model was trained on {list(batches)}: re-run "
                              "`raycell infer-z` with infer.checkpoint set to this model")
    if batches is not None and n != len(batches):
        raise ConfigError(f"inferred Z at {pq_path} (infer.z_source) has {n} columns, the model has "
                          f"{len(batches)} batches: re-run `raycell infer-z` with infer.checkpoint set "
                          "to this model")
    return t.column(K.CELL_ID).combine_chunks(), z


def z_fingerprint(source: str | Path) -> dict:
    """Where an inferred Z is and a hash of its parquet: recorded by `infer` with every prediction shard."""
    from raycell.formats.checkpoint import file_sha256

    pq_path, _ = _z_paths(source)
    pq_path = pq_path.absolute()
    return {"path": str(pq_path), "sha256": file_sha256(pq_path)}


def _batches_of(ds: ShardDataset, checkpoint: str) -> CategoryMap:
    """The Z column order: the checkpoint's training batches, or the data set's training batches."""
    if checkpoint:
        from raycell.formats.checkpoint import find_checkpoint, read_meta

        return CategoryMap.from_dict(read_meta(find_checkpoint(checkpoint))["batches"])
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
        raise ConfigError(f"infer-z trains on the train split, but data set {ds.root} has none "
                          f"(its splits: {counts}); run `raycell split` first")
    bad = [s for s in cfg.infer.z_splits if s not in counts]
    if bad:
        raise ConfigError(f"infer.z_splits: {bad} not among the splits of data set {ds.root} "
                          f"({sorted(counts)})")
    if cfg.infer.checkpoint:
        from raycell.formats.checkpoint import load_checkpoint

        _, meta = load_checkpoint(cfg.infer.checkpoint)  # the Z is for this model: it must load
        meta["data_spec_obj"].check_compatible(ds, f"checkpoint {meta['path']}")
        train_batches = set(ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH).to_pylist())
        extra = sorted(train_batches - set(meta["batches"]["values"]))
        if extra:
            raise ConfigError(f"infer-z: the train split of {ds.root} has batch(es) {extra} that "
                              f"checkpoint {meta['path']} was not trained on: infer.data must be the "
                              "data set the model was trained on")
    if cfg.infer.z_out and Path(cfg.infer.z_out).is_file():
        raise ConfigError(f"infer.z_out {Path(cfg.infer.z_out).absolute()} is a file, not a folder")
    return ds


def _iterate(t: pa.Table, collate: CropCollate, batch_size: int,
             rng: np.random.Generator | None = None):
    """Collated batches of an in-memory table (shuffled when an rng is given)."""
    if rng is not None:
        t = t.take(pa.array(rng.permutation(t.num_rows)))
    for s in range(0, t.num_rows, batch_size):
        yield collate(t.slice(s, batch_size))


def _accuracy(model: torch.nn.Module, t: pa.Table, collate: CropCollate, spec: DataSpec,
              device: torch.device) -> float:
    model.eval()
    hit = n = 0
    with torch.no_grad():
        for b in _iterate(t, collate, 256):
            known = b["b"] >= 0
            if not known.any():
                continue
            pred = model(spec.to_float(b["x"].to(device))).argmax(1).cpu()
            hit += int((pred[known] == b["b"][known]).sum())
            n += int(known.sum())
    return hit / n if n else float("nan")


def train_z_predictor(ds: ShardDataset, batches: CategoryMap, *, epochs: int = 10,
                      patience: int = 3, lr: float = 1e-4, batch_size: int = 32, seed: int = 0,
                      device: torch.device | None = None, log: bool = True
                      ) -> tuple[torch.nn.Module, list[dict]]:
    """Fit the ImageClassifier to training images -> batch, early-stopped on val accuracy.

    Returns:
        The classifier with the best validation weights (eval mode) and the per-epoch history.
    """
    from raycell.models.layers import ImageClassifier

    device = device or torch.device("cpu")
    spec = DataSpec.from_dataset(ds)
    collate = CropCollate(spec, CategoryMap(K.LABEL, ds.manifest["label_vocab"]), batches)
    train_t = ds.read_table(TRAIN_COLUMNS, splits=[K.TRAIN])
    val_t = ds.read_table(TRAIN_COLUMNS, splits=[K.VAL])
    if val_t.num_rows == 0:  # no validation split: select on the training accuracy instead
        val_t = train_t
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ImageClassifier(spec.shape[0], len(batches), spec.shape[1]).to(device)
    opt = torch.optim.NAdam(model.parameters(), lr=lr)
    best, best_acc, since, history = None, -1.0, 0, []
    for epoch in range(epochs):
        t0 = time.time()
        model.train()
        total = steps = 0
        for b in _iterate(train_t, collate, batch_size, rng):
            logits = model(spec.to_float(b["x"].to(device)))
            loss = torch.nn.functional.cross_entropy(logits, b["b"].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        acc = _accuracy(model, val_t, collate, spec, device)
        history.append({"epoch": epoch, "train_loss": total / max(steps, 1), "val_accuracy": acc,
                        "seconds": round(time.time() - t0, 2)})
        if log:
            print(f"[raycell] infer-z epoch {epoch}: loss {total / max(steps, 1):.4f}, "
                  f"val accuracy {acc:.4f}", flush=True)
        if acc > best_acc:
            best, best_acc, since = copy.deepcopy(model.state_dict()), acc, 0
        else:
            since += 1
            if since >= patience:
                break
    if best is not None:
        model.load_state_dict(best)
    return model.eval(), history


def run_infer_z(cfg: ExperimentConfig) -> dict:
    """Train the Z-predictor and write the soft Z of the cells in `cfg.infer.z_splits`.

    Uses `cfg.infer.data` (default `cfg.data.path`); the Z columns follow `cfg.infer.checkpoint`'s
    training batches when a checkpoint is given (else the data set's training batches). Needs no
    Ray.

    Returns:
        A summary: out folder, parquet path, number of cells, best validation accuracy, epochs,
        batches.
    """
    t0 = time.time()
    ds = check_infer_z_config(cfg)
    batches = _batches_of(ds, cfg.infer.checkpoint)
    if len(batches) < 2:
        raise ConfigError(f"infer-z needs at least 2 training batches in {ds.root}, found "
                          f"{list(batches.values)}")
    if cfg.infer.z_out:
        out = Path(cfg.infer.z_out).absolute()
    elif cfg.infer.checkpoint:
        from raycell.formats.checkpoint import find_checkpoint

        out = find_checkpoint(cfg.infer.checkpoint).parent / "inferred_z"
    else:
        out = ds.root / "inferred_z"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"[raycell] infer-z: training the Z-predictor on {ds.root} ({len(batches)} batches) -> "
          f"{out}", flush=True)
    ic = cfg.infer
    model, history = train_z_predictor(ds, batches, epochs=ic.z_epochs, patience=ic.z_patience,
                                       lr=ic.z_lr, batch_size=ic.z_batch_size, seed=cfg.seed,
                                       device=device)
    spec = DataSpec.from_dataset(ds)
    collate = CropCollate(spec, CategoryMap(K.LABEL, ds.manifest["label_vocab"]), batches)
    t = ds.read_table(TRAIN_COLUMNS + [K.SPLIT], splits=list(cfg.infer.z_splits))
    zs = []
    with torch.no_grad():
        for b in _iterate(t.drop_columns([K.SPLIT]), collate, 256):
            logits = model(spec.to_float(b["x"].to(device))).float()
            zs.append(torch.softmax(logits, 1).cpu().numpy())
    z = np.concatenate(zs) if zs else np.zeros((0, len(batches)), np.float32)
    out.mkdir(parents=True, exist_ok=True)
    zcol = pa.FixedSizeListArray.from_arrays(pa.array(z.astype(np.float32).ravel()), len(batches))
    table = pa.table({K.CELL_ID: t.column(K.CELL_ID), K.BATCH: t.column(K.BATCH),
                      K.SPLIT: t.column(K.SPLIT), "z": zcol})
    atomic_write_parquet(table, out / Z_PARQUET)
    torch.save(model.state_dict(), out / Z_WEIGHTS)
    per_batch = {}
    bcol = np.asarray(t.column(K.BATCH).to_pylist(), dtype=object)
    for name in sorted(set(bcol.tolist())):
        per_batch[name] = dict(zip(batches.values, np.round(z[bcol == name].mean(0), 4).tolist()))
    best = max((h["val_accuracy"] for h in history), default=float("nan"))
    summary = {"out": str(out), "parquet": str(out / Z_PARQUET), "dataset": str(ds.root),
               "checkpoint": cfg.infer.checkpoint or None, "splits": list(cfg.infer.z_splits),
               "n_cells": int(t.num_rows), "val_accuracy": best, "epochs": len(history),
               "batches": batches.to_dict(), "mean_z_per_batch": per_batch, "history": history,
               "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out / Z_JSON, summary)
    print(f"[raycell] infer-z: best val accuracy {best:.4f} after {len(history)} epoch(s); soft Z "
          f"for {t.num_rows} cell(s) -> {out / Z_PARQUET}", flush=True)
    return summary
