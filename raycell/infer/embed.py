"""`raycell embed`: any checkpoint over any crop shards -> embeddings in the profiling layout.

The forward pass, the Ray Data actor pool, the atomic per-shard writes, resuming and the refusal to mix
runs are `raycell infer`'s (`raycell.infer.batch.predict` with layout='profiles'); this module adds the
well-level profiles (the median of every feature per plate and well, what pycytominer's `aggregate`
gives) once every shard is written. Output: `<out>/shards/part-*.parquet`, `<out>/embeddings.json`,
`<out>/well_profiles.parquet` (see `raycell.infer.predictor` for the columns).
"""

from __future__ import annotations

from pathlib import Path

from raycell import constants as K
from raycell.config import ExperimentConfig
from raycell.utils.io import atomic_write_parquet


def check_embed(cfg: ExperimentConfig):
    """Everything `embed` can check without Ray (infer's checks, with the profiling layout)."""
    from raycell.infer.batch import check_infer

    return check_infer(cfg, layout="profiles")


def write_well_profiles(folder: str | Path) -> Path:
    """`<folder>/well_profiles.parquet`: one row per (Metadata_Plate, Metadata_Well), feature medians."""
    import pyarrow as pa

    from raycell.formats.embeddings import aggregate_wells, read_embeddings

    folder = Path(folder)
    meta, X, names = read_embeddings(folder)
    wells = aggregate_wells(meta, X, names)
    out = folder / K.WELL_PROFILES
    atomic_write_parquet(pa.Table.from_pandas(wells, preserve_index=False), out)
    return out


def embed(cfg: ExperimentConfig) -> dict:
    """Write embeddings for `infer.data` (default `data.path`) with `infer.checkpoint`; needs Ray.

    Returns the embeddings manifest with `out` and, when `embed.well_profiles`, `well_profiles`.
    """
    from raycell.infer.batch import predict

    manifest = predict(cfg, layout="profiles")
    if cfg.embed.well_profiles:
        wp = write_well_profiles(manifest["out"])
        manifest["well_profiles"] = str(wp)
        print(f"[raycell] well profiles -> {wp}", flush=True)
    return manifest
