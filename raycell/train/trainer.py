"""`raycell train`: wire a config into a Ray Train `TorchTrainer` fed by Ray Data, and fit it.

The run folder is `<train.runs_dir>/<name>-<timestamp>/` (Ray's storage for this run): it holds the
resolved `config.yaml`, Ray's `checkpoint_*` folders and, at the end, `metrics.json` with every epoch.
`train.resume=<run folder>` re-runs under the same Ray run name, which makes Ray hand the loop its latest
checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from raycell import constants as K
from raycell.config import ConfigError, ExperimentConfig, save_config
from raycell.data.categories import CategoryMap
from raycell.data.dataset import DataSpec, ray_datasets
from raycell.data.shards import open_dataset
from raycell.utils.io import atomic_write_json, new_run_dir


def training_setup(cfg: ExperimentConfig) -> tuple[dict, object]:
    """Data spec and vocabularies for a run (labels from the manifest, batches = training batches)."""
    ds = open_dataset(cfg.data.path)
    counts = ds.manifest.get("counts_per_split", {})
    if not counts.get(K.TRAIN):
        raise ConfigError(f"{ds.root} has no rows with split 'train' (counts: {counts}); run "
                          f"`raycell split --data {ds.root}` first")
    meta = ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH)
    setup = {
        "data_spec": DataSpec.from_dataset(ds).to_dict(),
        "labels": CategoryMap(K.LABEL, ds.manifest["label_vocab"]).to_dict(),
        # The design matrix Z has one column per *training* batch (the reference fits it on train).
        "batches": CategoryMap.fit(K.BATCH, meta.to_pylist()).to_dict(),
        "dataset": str(ds.root),
        # per-channel mean intensity in [0, 1]: initialises the decoder output (see TiedDecoder.init_output)
        "channel_means": [ds.manifest["channel_stats"][c]["mean"] * DataSpec.from_dataset(ds).scale
                          for c in ds.manifest["channel_names"]] if ds.manifest.get("channel_stats") else None,
    }
    return setup, ds


def build_trainer(cfg: ExperimentConfig, run_dir: Path, setup: dict, ds, callbacks: list | None = None):
    """A TorchTrainer for `cfg` writing into `run_dir`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raycell.train.loop import train_loop_per_worker

    datasets = ray_datasets(ds, (K.TRAIN, K.VAL), block_size_mb=cfg.data.block_size_mb)
    sc = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "setup": setup},
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[K.TRAIN]),
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=dict(sc.resources_per_worker) or None),
        run_config=ray.train.RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent), callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )


def _single_node() -> bool:
    import ray

    return len([n for n in ray.nodes() if n.get("Alive")]) == 1


def train(cfg: ExperimentConfig) -> dict:
    """Fit one model; returns {'run_dir', 'checkpoint', 'metrics', 'history'}.

    Needs Ray to be initialised (see `raycell.utils.ray_utils.init_ray`).
    """
    cfg.data.path = str(Path(cfg.data.path).absolute())  # workers chdir; paths must be absolute
    setup, ds = training_setup(cfg)
    if cfg.train.resume:
        run_dir = Path(cfg.train.resume).absolute()
        if not run_dir.is_dir():
            raise ConfigError(f"train.resume: run folder not found: {run_dir}")
    else:
        run_dir = new_run_dir(cfg.train.runs_dir, f"{cfg.name}-{cfg.model.type}")
    if not cfg.train.torch_threads and _single_node():
        # A laptop or one-machine Ray: let the workers use the cores (Ray gives a 0.5-CPU worker 1 thread).
        cfg.train.torch_threads = max(1, (os.cpu_count() or 1) // cfg.scaling.num_workers)
    save_config(cfg, run_dir / "config.yaml")
    print(f"[raycell] training {cfg.model.type} on {ds.root} -> {run_dir}", flush=True)
    result = build_trainer(cfg, run_dir, setup, ds).fit()
    history = []
    if result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict(orient="records")
    out = {"run_dir": str(run_dir), "checkpoint": result.checkpoint.path if result.checkpoint else None,
           "metrics": result.metrics, "history": history, "model_type": cfg.model.type}
    atomic_write_json(run_dir / "metrics.json", out)
    return out
