"""The training loop: one readable loop for every model type, run on each Ray Train worker.

Per epoch: stream the worker's training minibatches through the plan's `training_step`, `validate` on
the whole validation split (and on the held-out validation batches, split `valbatch`, when the data set
has them), then report metrics (every term of the plan's `LossOutput`, by name) and a checkpoint (model,
optimiser state, model args, data spec, category maps, config). Rank 0 also appends the epoch's metrics
to the run's `history.jsonl` (`raycell.train.history`): Ray keeps only the checkpointed reports. Under an
early-stopping rule (`RunSetup.early_stopping`) the loop ends after the report that spends its patience.
On start it resumes from the latest checkpoint if Ray Train hands it one (a worker-group restart after a
failure, or `raycell train --resume`).

`val_auroc` is `raycell.metrics.classification.auroc`, the AUROC `raycell evaluate` reports for the same
predictions (macro one-vs-rest for more than two classes).

Model-selection metrics (what a search can optimise), besides `val_auroc`:
* `valbatch_auroc`, `valbatch_loss`, ...: the `val_*` metrics on whole seen batches never trained on
  (leave-one-batch-out validation); their Z rows are all zeros, as for unseen batches.
* `val_batch_probe`: cross-validated accuracy of a logistic regression predicting the training batch from
  the val latents (<= 2000 cells), `val_batch_probe_chance` its majority-batch level;
* `val_composite = val_auroc - train.composite_weight * (val_batch_probe - val_batch_probe_chance)`.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from raycell.config import ExperimentConfig
from raycell.data.augment import augment_batch, parse_augment
from raycell.data.dataset import CropCollate
from raycell.formats.categories import CategoryMap
from raycell.formats.checkpoint import load_plan_state
from raycell.formats.spec import DataSpec
from raycell.losses import heads_prob, label_prob
from raycell.metrics.classification import auroc
from raycell.models import build_plan, create_model
from raycell.models.checkpoint import save_checkpoint
from raycell.models.random_effects import one_hot_design
from raycell.models.registry import model_entry
from raycell.plans import TrainingPlan
from raycell.train.context import RayTrainContext, TrainContext
from raycell.train.history import append_epoch, read_history
from raycell.train.setup import RunSetup
from raycell.train.stopping import EarlyStopper
from raycell.utils.memory import trimming

PROBE_MAX_CELLS = 2000  # the per-epoch batch probe stays cheap (a few 3-fold logistic regressions)


def model_kwargs(
    cfg: ExperimentConfig,
    spec: DataSpec,
    labels: CategoryMap,
    batch_map: CategoryMap,
    heads: Sequence[CategoryMap] = (),
    channel_means: Sequence[float] | None = None,
) -> dict:
    """Builder arguments: data-derived sizes, then the preset, then the user's `model.args`.

    `heads`: a weak-label model type's heads (`RunSetup.heads`); `channel_means`: initialises a
    decoder's output (`RunSetup.channel_means`).
    """
    kw = {
        "in_channels": spec.shape[0],
        "n_classes": len(labels),
        "n_batches": len(batch_map),
        "preset": cfg.model.preset,
        "image_size": spec.shape[1],
    }
    if channel_means:
        kw["output_mean"] = list(channel_means)
    if heads:
        kw.update(head_names=[h.column for h in heads], head_sizes=[len(h) for h in heads])
    # the adversary's settings for the types that have one; written into the model's arguments (and
    # so into each checkpoint's meta), while older metas without them rebuild with the builder's
    # defaults, the adversary they were trained with
    takes = inspect.signature(model_entry(cfg.model.type).builder).parameters
    for key in ("adversary_reads", "adversary_standardize"):
        if key in takes:
            kw[key] = getattr(cfg.model, key)
    return {**kw, **cfg.model.args}


def make_collate(setup: RunSetup) -> CropCollate:
    """The collate of a run: its data spec, label, batch and (weak-label models) head vocabularies.

    A balanced Z-predictor (`setup.balance`) also collates the label column, as y's last column: the
    plan weights each cell by (batch, label); the model and its metrics see the batch head only.
    """
    heads = list(setup.heads)
    if heads and setup.balance is not None:
        heads.append(setup.balance.by)
    return CropCollate(setup.data_spec, setup.labels, setup.batches, heads or None)


def validate(
    model: torch.nn.Module,
    plan: TrainingPlan,
    minibatches,
    spec: DataSpec,
    n_batches: int,
    prefix: str = "val",
    latents: list | None = None,
    heads: list[CategoryMap] | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Mean loss terms, AUROC and accuracy over an iterable of minibatches (model in eval mode).

    Metric names are `<prefix>_<term>`, `<prefix>_acc`, `<prefix>_auroc`. With `latents` (a list), the
    latents and batch codes of the cells are appended to it as (N, D) / (N,) array pairs. With weak-label
    `heads`, also `<prefix>_<head>_acc` / `_auroc` per head; `_acc` and `_auroc` are then their means.
    """
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    ys, ps = [], []
    for batch in minibatches:
        x, y = spec.to_float(batch["x"]), batch["y"]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        losses, out = plan.validation_step(x, y, one_hot_design(batch["b"], n_batches))
        k = len(y)
        for key, v in losses.values().items():
            sums[key] = sums.get(key, 0.0) + v * k
        n += k
        ys.append(y.cpu().numpy())
        if heads:
            probs = heads_prob(out.logits, [len(h) for h in heads])
            ps.append(np.concatenate([q.cpu().numpy() for q in probs], 1))
        else:
            ps.append(label_prob(out.logits).cpu().numpy())
        if latents is not None:
            latents.append((out.latent.detach().float().cpu().numpy(), batch["b"].cpu().numpy()))
    if n == 0:
        return {}
    res = {f"{prefix}_{k}": v / n for k, v in sums.items()}
    y, p = np.concatenate(ys), np.concatenate(ps)
    if heads:
        blocks = np.split(p, np.cumsum([len(h) for h in heads])[:-1], axis=1)
        for i, (h, ph) in enumerate(zip(heads, blocks)):
            res[f"{prefix}_{h.column}_acc"] = float((ph.argmax(1) == y[:, i]).mean())
            res[f"{prefix}_{h.column}_auroc"] = auroc(y[:, i], ph)
        res[f"{prefix}_acc"] = float(np.mean([res[f"{prefix}_{h.column}_acc"] for h in heads]))
        res[f"{prefix}_auroc"] = float(
            np.nanmean([res[f"{prefix}_{h.column}_auroc"] for h in heads])
            if any(np.isfinite(res[f"{prefix}_{h.column}_auroc"]) for h in heads)
            else float("nan")
        )
        return res
    pred = p >= 0.5 if p.ndim == 1 else p.argmax(1)
    res[f"{prefix}_acc"] = float((pred == y).mean())
    res[f"{prefix}_auroc"] = auroc(y, p)
    return res


def batch_probe(latents: list, seed: int = 0, max_cells: int = PROBE_MAX_CELLS) -> dict[str, float]:
    """How well the val latents predict their training batch: `val_batch_probe` and its chance level.

    A model that keeps the batch in its latents can use it as a shortcut for the phenotype; this is the
    latent metric `raycell evaluate` reports (`batch_probe_accuracy`), on a fixed-seed subsample.
    """
    from raycell.metrics.latent import batch_probe_accuracy

    if not latents:
        return {}
    z = np.concatenate([a for a, _ in latents])
    b = np.concatenate([c for _, c in latents])
    if len(b) > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(len(b), size=max_cells, replace=False))
        z, b = z[keep], b[keep]
    probe = batch_probe_accuracy(z, b, cv=3, seed=seed)
    return {"val_batch_probe": probe["batch_probe_acc"], "val_batch_probe_chance": probe["chance"]}


CHAOS_MARKER = ".chaos-fired"  # in the run folder: the fault drill has fired once for this run


def fault_drill(run_dir: Path, steps: int) -> None:
    """`train.chaos_kill_after_steps`: exit this worker process abruptly, once per run folder.

    `os._exit` is what a crash or an OOM kill looks like to Ray (no exception, no clean-up); Ray Train
    then restarts the worker group from the last checkpoint when `train.max_failures` allows. The marker
    file is written first, so the restarted run does not fire again.
    """
    marker = run_dir / CHAOS_MARKER
    if marker.exists():
        return
    # Ray Train collects reports when its controller polls the workers (every
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): a crash less than one poll after a report loses that
    # report and its checkpoint, and the epoch is re-run (the history keeps its last run). Wait two
    # polls, so that the drill checks the recovery from the last checkpoint, as a crash minutes later would.
    time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")) + 0.5)
    marker.write_text(f"fired after {steps} steps at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    print(
        f"[raycell] fault drill: rank 0 exits abruptly after {steps} steps (train.chaos_kill_after_steps)",
        flush=True,
    )
    os._exit(1)


def timed(batches, waited: list[float]):
    """Yield from `batches`, adding the seconds spent waiting for each one to `waited[0]`.

    The loop syncs with the device every step (the logged losses), so this is the time the model sat
    idle waiting on the data path (`data_wait_s` in each epoch's metrics).
    """
    it = iter(batches)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            waited[0] += time.perf_counter() - t
        yield batch


def run_training(
    ctx: TrainContext, cfg: ExperimentConfig, setup: RunSetup, history_file: str | None = None
) -> dict:
    """Train `cfg.model.type` for `cfg.train.epochs`, reporting through `ctx`; returns the last metrics.

    `setup.valbatch`: also validate on the `valbatch` split. `setup.early_stopping`: after each epoch's
    report, stop once the rule's patience is spent. `history_file`: rank 0 appends each epoch's
    metrics there (JSON lines); a resumed run's early stopping counts the epochs recorded in it.
    """
    spec, labels = setup.data_spec, setup.labels
    batch_map = setup.batches  # imaging batches: the columns of Z
    heads = list(setup.heads) or None
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(
        cfg.seed
    )  # same initial weights on every worker (and broadcast below to be sure)
    kwargs = model_kwargs(cfg, spec, labels, batch_map, setup.heads, setup.channel_means)
    model = create_model(cfg.model.type, **kwargs).to(ctx.device)
    on_cuda = ctx.device.type == "cuda"
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    plan = build_plan(
        model,
        cfg.loss,
        cfg.train.lr,
        cfg.train.weight_decay,
        n_batches=len(batch_map),
        grad_sync=ctx.sync_gradients,
        bf16=cfg.train.bf16 and on_cuda,
        layer_decay=cfg.train.layer_decay,
    )
    plan.set_schedule(cfg.train.schedule, setup.steps_per_epoch * cfg.train.epochs)
    if setup.balance is not None:  # infer.z_mode balanced: (batch, label) weights from the driver
        plan.set_balance(setup.balance.weights)

    start = 0
    resume = ctx.resume_from()
    if resume is not None:
        from raycell.utils.io import read_json

        model.load_state_dict(
            torch.load(resume / "model.pt", map_location=ctx.device, weights_only=True)
        )
        state = load_plan_state(resume)
        if state:
            plan.load_state_dict(state)
        start = int(read_json(resume / "meta.json")["epoch"]) + 1
        if ctx.rank == 0:
            print(f"[raycell] resuming from {resume} at epoch {start}", flush=True)
    ctx.broadcast_parameters(model)
    stopper = None
    if setup.early_stopping is not None:  # a resumed run counts the epochs it has recorded
        done = [r for r in read_history(history_file) if r["epoch"] < start] if history_file else []
        stopper = EarlyStopper(setup.early_stopping, done)

    augment = parse_augment(cfg.train.augment)
    aug_gen = torch.Generator(device=ctx.device) if augment else None
    drill = cfg.train.chaos_kill_after_steps if ctx.rank == 0 and history_file else 0
    done_steps = 0  # steps taken by this process (the drill's clock)
    metrics: dict = {}
    for epoch in range(start, cfg.train.epochs):
        t0 = time.time()
        if (
            cfg.data.shuffle_seed >= 0
        ):  # the model's random draws too: an epoch replays after a restart
            torch.manual_seed(cfg.data.shuffle_seed * 1_000_003 + epoch)
        model.train()
        sums: dict[str, float] = {}
        steps = 0
        waited = [0.0]  # seconds this epoch spent waiting for the next training batch
        for step, batch in enumerate(timed(ctx.minibatches("train", epoch, train=True), waited)):
            if cfg.train.max_steps_per_epoch and step >= cfg.train.max_steps_per_epoch:
                break
            # model input as the spec says (data.normalize: global scale, or per crop and channel; the
            # reconstruction losses then compare against this normalised input); augmentation after it
            x = clean = spec.to_float(batch["x"])
            if augment:  # reproducible per (seed, epoch, step, rank)
                aug_gen.manual_seed(
                    (cfg.seed * 1_000_003 + epoch * 100_003 + step * 101 + ctx.rank) % 2**62
                )
                x = augment_batch(x, augment, aug_gen, cfg.train.augment_strength)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
                clean = clean.contiguous(memory_format=torch.channels_last)
            logs = plan.training_step(
                x,
                batch["y"],
                one_hot_design(batch["b"], len(batch_map)),
                x_clean=clean if augment else None,  # an adversary reads the un-augmented cells
            ).values()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            done_steps += 1
            if drill and done_steps == drill:
                fault_drill(Path(history_file).parent, done_steps)
            if cfg.train.log_every and ctx.rank == 0 and steps % cfg.train.log_every == 0:
                print(f"[raycell] epoch {epoch} step {steps} loss {logs['loss']:.4f}", flush=True)
        if steps == 0:
            raise RuntimeError(
                "no training minibatches: the training split has fewer rows per worker than "
                f"data.batch_size ({cfg.data.batch_size}); lower it or add data"
            )
        metrics = {
            "epoch": epoch,
            "steps": steps,
            **{f"train_{k}": v / steps for k, v in sums.items()},
            "data_wait_s": waited[0],
            "train_time_s": time.time() - t0,
        }
        if on_cuda:  # the run's peak so far: the driver cannot read the worker's allocator
            metrics["gpu_peak_mem_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        # the validation passes hand freed heap pages back as they go (raycell/utils/memory.py)
        val = trimming(ctx.minibatches("val", epoch, train=False))
        # Only rank 0's metrics are reported: the other ranks skip the probe's regressions.
        lat: list | None = [] if ctx.rank == 0 else None
        metrics.update(
            validate(
                model,
                plan,
                val,
                spec,
                len(batch_map),
                latents=lat,
                heads=heads,
                channels_last=cfg.train.channels_last,
            )
        )
        if lat:
            metrics.update(batch_probe(lat, seed=cfg.seed))
            if "val_auroc" in metrics and "val_batch_probe" in metrics:
                excess = metrics["val_batch_probe"] - metrics["val_batch_probe_chance"]
                metrics["val_composite"] = (
                    metrics["val_auroc"] - cfg.train.composite_weight * excess
                )
        if setup.valbatch:  # whole seen batches never trained on: codes -1, Z rows all zero
            vb = trimming(ctx.minibatches("valbatch", epoch, train=False))
            metrics.update(
                validate(
                    model,
                    plan,
                    vb,
                    spec,
                    len(batch_map),
                    prefix="valbatch",
                    heads=heads,
                    channels_last=cfg.train.channels_last,
                )
            )
        metrics["epoch_time_s"] = time.time() - t0
        with tempfile.TemporaryDirectory(prefix="raycell-ckpt-") as d:
            ck = None
            if ctx.rank == 0:
                ck = str(
                    save_checkpoint(
                        d,
                        model,
                        plan.state_dict(),
                        epoch=epoch,
                        spec=spec,
                        labels=labels,
                        batches=batch_map,
                        config=cfg.to_dict(),
                        metrics=metrics,
                        extra={"heads": [h.to_dict() for h in heads]} if heads else None,
                    )
                )
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
                print(f"[raycell] {shown}", flush=True)
                if history_file:  # before the report: a run killed in between re-runs the epoch
                    append_epoch(history_file, metrics)
            ctx.report(metrics, ck)
        # rank 0 decides and every rank follows: a rank that stopped alone would leave the others
        # waiting in the next report (their val metrics can differ: BatchNorm statistics are per rank)
        if stopper is not None and ctx.agree(stopper.after_epoch(metrics)):
            if ctx.rank == 0:
                print(stopper.message(epoch), flush=True)
            break
    return metrics


def ray_context(config: dict) -> tuple[ExperimentConfig, RunSetup, RayTrainContext]:
    """In a Ray Train worker: the config, the setup and the Ray context of the run (`config` as passed)."""
    cfg = ExperimentConfig.from_dict(config["cfg"])
    setup = RunSetup.from_dict(config["setup"])
    d = cfg.data
    ctx = RayTrainContext(
        make_collate(setup),
        d.batch_size,
        d.eval_batch_size,
        d.shuffle_buffer,
        d.prefetch_batches,
        shuffle_seed=d.shuffle_seed,
        fetch_batches=d.fetch_batches,
    )
    return cfg, setup, ctx


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train entry point: rebuild the config, make the Ray context, run the loop."""
    cfg, setup, ctx = ray_context(config)
    return run_training(ctx, cfg, setup, history_file=config.get("history_file"))
