"""Per-cell hand-made features of a crop data set as matrices, split by split.

The `morph_*` columns ingest wrote, the CellProfiler-style crop features (`feat_*` stored at ingest,
else computed here by `raycell.features.morphology`), or both: what the hand-made-feature baseline
fits and what `raycell profile --features handmade` aggregates.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from raycell import constants as K
from raycell.errors import UserError
from raycell.features.morphology import crop_features

FEATURE_SOURCES = K.BASELINE_FEATURES


def _subsample(n: int, max_cells: int, seed: int) -> np.ndarray:
    """Sorted indices of a fixed-seed subsample of at most `max_cells` of `n` rows."""
    if max_cells <= 0 or n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_cells])


def has_morph_columns(data: str | Path, features: str) -> bool:
    """Whether `data`'s shards have `morph_*` columns; refuses a bad `features` value or 'morph'
    without them.
    """
    from raycell.formats.shards import open_dataset

    if features not in FEATURE_SOURCES:
        raise UserError(
            f"eval.baseline_features: {features!r} is not one of {', '.join(FEATURE_SOURCES)}"
        )
    ds = open_dataset(data)
    has_morph = any(c.startswith(K.MORPH_PREFIX) for c in ds.columns())
    if features == "morph" and not has_morph:
        raise UserError(
            f"{ds.root}: eval.baseline_features=morph, but its shards have no "
            f"{K.MORPH_PREFIX}* columns (use 'crops', 'all' or 'auto')"
        )
    return has_morph


def feature_source(data: str | Path, features: str = "auto") -> str:
    """The features `load_features` uses on `data`: 'morph_*', 'crops' or 'morph_*+crops' (reads the
    schema).
    """
    has_morph = has_morph_columns(data, features)
    if not has_morph or features == "crops":
        return "crops"
    return f"{K.MORPH_PREFIX}*+crops" if features == "all" else f"{K.MORPH_PREFIX}*"


def load_features(
    data: str | Path,
    splits: list[str],
    features: str = "auto",
    max_cells: int = 5000,
    seed: int = 0,
) -> dict:
    """Per split, the baseline's feature matrix and metadata (at most `max_cells` cells each).

    Args:
        data: A crop data set folder (`raycell synth` / `ingest` / `import-armed`).
        splits: Splits to load (those with no cells are left out).
        features: 'morph' (the `morph_*` columns), 'crops' (`crop_features`), 'all' (both, side by
            side) or 'auto' (morph_* when the data set has them, else crops).
        max_cells: Cells per split (fixed-seed subsample; <= 0 = all).
        seed: Seed of the subsample.

    Returns:
        {"source" (`feature_source`), "names", "label_vocab", "splits": {split: {"x", "meta"}},
        "seconds"}.
    """
    from raycell.formats.shards import decode_images, open_dataset

    t0 = time.time()
    source = feature_source(data, features)
    use_morph, use_crops = source != "crops", source.endswith("crops")
    ds = open_dataset(data)
    morph = [c for c in ds.columns() if c.startswith(K.MORPH_PREFIX)] if use_morph else []
    stored = [c for c in ds.columns() if c.startswith(K.FEAT_PREFIX)] if use_crops else []
    meta_cols = [c for c in (K.CELL_ID, K.BATCH, K.LABEL, K.SPLIT) if c in ds.columns()]
    out: dict = {"source": source, "label_vocab": list(ds.manifest.label_vocab), "splits": {}}
    for split in splits:
        t = ds.read_table(meta_cols + morph + (stored or ([K.IMAGE] if use_crops else [])), [split])
        if not t.num_rows:
            continue
        t = t.take(_subsample(t.num_rows, max_cells, seed))
        meta = t.select(meta_cols).to_pandas()
        xs, names = [], list(morph)
        if use_morph:
            xs.append(
                np.column_stack(
                    [t.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in morph]
                )
            )
        if use_crops and stored:  # computed at ingest (ingest.crop_features)
            xs.append(
                np.column_stack(
                    [t.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in stored]
                )
            )
            names += [c[len(K.FEAT_PREFIX) :] for c in stored]
        elif use_crops:
            imgs = decode_images(t, ds.shape, ds.dtype, where=str(ds.root))
            x_crops, crop_names = crop_features(imgs, ds.manifest.channel_names)
            xs.append(x_crops)
            names += crop_names
        out["splits"][split] = {"x": np.concatenate(xs, 1), "meta": meta}
        out["names"] = names
    out["seconds"] = round(time.time() - t0, 1)
    return out
