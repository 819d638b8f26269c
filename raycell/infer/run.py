"""`raycell infer`: run a checkpoint over crop shards with Ray Data and write prediction shards.

One output shard per input shard (`<out>/shards/part-XXXXX.parquet`, same name), each written atomically,
so a re-run skips the shards that are complete and an interrupted job leaves no half file. Work proceeds
in rounds of `infer.shards_per_round` input shards: Ray Data streams a round through the model actors into
a staging folder, then the round's rows are regrouped by source shard and renamed into place.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycell import constants as K
from raycell.config import ExperimentConfig
from raycell.data.dataset import DataSpec
from raycell.data.shards import open_dataset
from raycell.infer.predictor import PASSTHROUGH, CropPredictor
from raycell.train.checkpoint import find_checkpoint, load_checkpoint
from raycell.utils.io import atomic_write_json, atomic_write_parquet, read_json

PATH_COL = "path"  # added by read_parquet(include_paths=True)


class _SplitFilter:
    """Keep only rows of the requested splits (a vectorised Arrow filter in the actor, before decoding)."""

    def __init__(self, splits: list[str], **kw):
        self.splits = pa.array(splits) if splits else None
        self.inner = CropPredictor(**kw)

    def __call__(self, t: pa.Table) -> pa.Table:
        if self.splits is not None:
            t = t.filter(pc.is_in(t.column(K.SPLIT), self.splits))
        return self.inner(t)


def predict(cfg: ExperimentConfig) -> dict:
    """Write predictions for `cfg.infer.data` (default `cfg.data.path`); returns the predictions manifest.

    Needs Ray to be initialised.
    """
    import ray.data

    ck = find_checkpoint(cfg.infer.checkpoint)
    ds = open_dataset(cfg.infer.data or cfg.data.path)
    meta = read_json(ck / "meta.json", "checkpoint meta")
    DataSpec.from_dict(meta["data_spec"]).check_compatible(ds)
    _check_design_matrix(cfg, ds, meta)
    out = Path(cfg.infer.out).absolute() if cfg.infer.out else ck.parent / "predictions"
    shard_out = out / "shards"
    shard_out.mkdir(parents=True, exist_ok=True)
    pending = [p for p in ds.shard_paths if not (shard_out / Path(p).name).exists()]
    print(f"[raycell] infer {meta['model_type']} ({ck}) on {ds.root}: {len(ds.shard_paths) - len(pending)} "
          f"shard(s) already done, {len(pending)} to go -> {out}", flush=True)
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = cfg.data.block_size_mb << 20
    t0 = time.time()
    per = max(1, cfg.infer.shards_per_round)
    for r in range(0, len(pending), per):
        round_paths = pending[r:r + per]
        staging = out / f".staging-{uuid.uuid4().hex[:8]}"
        try:
            rd = ray.data.read_parquet(round_paths, include_paths=True)
            rd = rd.map_batches(
                _SplitFilter, batch_format="pyarrow", batch_size=cfg.data.eval_batch_size,
                fn_constructor_kwargs={"splits": list(cfg.infer.splits), "checkpoint": str(ck),
                                       "write_recon": cfg.infer.write_recon,
                                       "z_source": str(Path(cfg.infer.z_source).absolute())
                                       if cfg.infer.z_source else "", "randomize_z": cfg.infer.randomize_z,
                                       "passthrough": PASSTHROUGH + [PATH_COL]},
                compute=ray.data.ActorPoolStrategy(size=cfg.infer.num_actors),
                num_gpus=cfg.infer.num_gpus, num_cpus=cfg.infer.cpus_per_actor)
            rd.write_parquet(str(staging))
            _finalise_round(staging, round_paths, shard_out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    files = sorted(shard_out.glob(K.SHARD_GLOB))
    n_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    manifest = {"checkpoint": str(ck), "model_type": meta["model_type"], "dataset": str(ds.root),
                "splits": list(cfg.infer.splits) or "all", "n_rows": n_rows, "n_shards": len(files),
                "labels": meta["labels"], "batches": meta["batches"], "data_spec": meta["data_spec"],
                "seconds": round(time.time() - t0, 2)}
    atomic_write_json(out / K.PREDICTIONS_MANIFEST, manifest)
    print(f"[raycell] wrote {n_rows} prediction rows in {len(files)} shard(s) to {out}", flush=True)
    return {**manifest, "out": str(out)}


def _check_design_matrix(cfg: ExperimentConfig, ds, meta: dict) -> None:
    """Fail before Ray starts when a random/mixed-effects model would meet batches it has no Z for."""
    from raycell.infer.predictor import MissingDesignMatrixError
    from raycell.models import create_model

    if cfg.infer.z_source or cfg.infer.randomize_z:
        return
    uses_z = meta["uses_z"] if "uses_z" in meta else \
        getattr(create_model(meta["model_type"], **meta["model_args"]), "uses_z", False)  # older checkpoints
    if not uses_z:
        return
    wanted = set(cfg.infer.splits) if cfg.infer.splits else None
    batches = ds.read_table([K.BATCH, K.SPLIT]).to_pandas()
    if wanted:
        batches = batches[batches[K.SPLIT].isin(wanted)]
    missing = sorted(set(batches[K.BATCH]) - set(meta["batches"]["values"]))
    if missing:
        raise MissingDesignMatrixError(
            f"model type {meta['model_type']!r} needs a design matrix Z for every cell, but batch(es) "
            f"{missing} are not among its training batches and no inferred Z was given: run "
            "`raycell infer-z --checkpoint <run>` and pass its output folder as infer.z_source (or "
            "restrict infer.splits to seen batches, or set infer.randomize_z=true for the ablation)")


def _finalise_round(staging: Path, round_paths: list[str], shard_out: Path) -> None:
    """Regroup a round's staged rows by source shard and write one output file per input shard."""
    files = sorted(staging.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    for src in round_paths:
        name = Path(src).name
        if table is not None:
            # include_paths gives the path as the filesystem saw it (no scheme); match on the file name.
            mask = pc.ends_with(table.column(PATH_COL), "/" + name)
            part = table.filter(mask).drop_columns([PATH_COL])
        else:
            part = pa.table({K.CELL_ID: pa.array([], pa.string())})
        atomic_write_parquet(part, shard_out / name)


def read_predictions(path: str | Path) -> pa.Table:
    """All prediction shards of a folder as one table (empty shards from split filtering are skipped)."""
    root = Path(path)
    files = sorted((root / "shards").glob(K.SHARD_GLOB)) if (root / "shards").is_dir() else []
    if not files:
        raise FileNotFoundError(f"no prediction shards in {root}/shards (run `raycell infer` first)")
    tables = [t for t in (pq.read_table(f) for f in files) if t.num_rows]
    if not tables:
        raise ValueError(f"prediction shards in {root} hold no rows")
    return pa.concat_tables(tables, promote_options="default")


__all__ = ["predict", "read_predictions", "load_checkpoint"]
