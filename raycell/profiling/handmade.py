"""CellProfiler-style hand-made features of a crop data set, as a per-cell table `profile` reads.

The features are the baseline's (`raycell.eval.baseline.load_features`): the `morph_*` columns when
the shards carry them, the `feat_*` columns ingest stored, else shape, intensity and GLCM texture
computed from the crops (`raycell.features.morphology.crop_features`). They are named
`Cells_Hand_<name>` so pycytominer's `infer_cp_features` finds them, and the metadata follows
`raycell embed`'s naming (`Metadata_Plate`, `Metadata_Well`, `Metadata_<column>`), so the wells
of an embedding and of its hand-made features are the same rows after aggregation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from raycell import constants as K
from raycell.profiling.table import ProfileError, ProfileTable

PREFIX = "Cells_Hand_"


def handmade_table(data: str | Path) -> ProfileTable:
    """Per-cell hand-made features and metadata of every cell of the crop data set `data`."""
    from raycell.features.table import load_features
    from raycell.formats.embeddings import PROFILE_NAMES
    from raycell.formats.shards import open_dataset

    ds = open_dataset(data)
    meta_cols = [
        c
        for c in ds.columns()
        if c not in set(K.IMAGE_COLUMNS) | {"path"}
        and not c.startswith((K.MORPH_PREFIX, K.FEAT_PREFIX))
    ]
    meta = ds.read_table(meta_cols).to_pandas()
    if K.SPLIT not in meta.columns:
        raise ProfileError(
            f"hand-made features: the data set {data} has no split column; run "
            "`raycell split` on it first"
        )
    splits = sorted(meta[K.SPLIT].astype(str).unique())
    feats = load_features(data, splits, "auto", max_cells=0)
    parts = [f for f in feats["splits"].values()]
    if not parts:
        raise ProfileError(f"hand-made features: the data set {data} has no cells")
    x = np.concatenate([p["x"] for p in parts])
    ids = pd.concat([p["meta"][K.CELL_ID] for p in parts], ignore_index=True)
    names = [PREFIX + n for n in feats["names"]]
    order = pd.Index(ids.astype(str)).get_indexer(meta[K.CELL_ID].astype(str))
    if (order < 0).any():
        raise ProfileError(
            f"hand-made features: {int((order < 0).sum())} cell(s) of {data} got no features"
        )
    frame = meta.rename(columns=lambda c: PROFILE_NAMES.get(c, f"Metadata_{c}"))
    frame = pd.concat([frame.reset_index(drop=True), pd.DataFrame(x[order], columns=names)], axis=1)
    return ProfileTable(frame, names, [f"hand-made features ({feats['source']}) of {data}"])


CPM_PREFIX = "Cells_CPM_"
CPM_SHAPE, CPM_PER_CHANNEL = ("sizeshape",), ("intensity", "texture")


def cpmeasure_features(
    images: np.ndarray, channel_names: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """CellProfiler's own measurements (cp-measure) of each crop's centre cell.

    The object is the one the hand-written features measure (Otsu foreground of the channel mean,
    the connected object nearest the centre), so the two feature sets describe the same cell; then
    cp-measure's size/shape of that object and, per channel, its intensity and texture, under
    CellProfiler's names (`Area`, `Intensity_MeanIntensity`, `Contrast_3_00_256`, ...). A crop
    without an object gets NaN. cp-measure measures one labelled image at a time, so this is a
    Python loop over crops: ~84 ms a crop of 64 px with 2 channels on this 2-core machine under
    load, against ~9.5 ms for `raycell.features.morphology.crop_features` (which is why ingest keeps
    the hand-written features by default).
    """
    from cp_measure.bulk import get_core_measurements

    from raycell.features.morphology import centre_objects, otsu_masks

    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise ProfileError(f"cp-measure features need (N, C, H, W) crops, got shape {x.shape}")
    n, c = x.shape[:2]
    chans = list(channel_names or [f"ch{i}" for i in range(c)])
    lo = x.min(axis=(2, 3), keepdims=True)
    span = np.maximum(x.max(axis=(2, 3), keepdims=True) - lo, 1e-12)
    x01 = (x - lo) / span  # cp-measure's texture bins intensities in [0, 1], as CellProfiler does
    objects = centre_objects(otsu_masks(x.mean(1)))
    measure = get_core_measurements()
    names: list[str] | None = None
    rows = []
    for i in range(n):
        mask = objects[i].astype(np.int32)
        if not mask.any():
            rows.append(None)
            continue
        feats: dict[str, float] = {}
        for k in CPM_SHAPE:
            for name, v in measure[k](mask, x01[i, 0]).items():
                feats[name] = float(np.asarray(v).ravel()[0])
        for j, ch in enumerate(chans):
            for k in CPM_PER_CHANNEL:
                for name, v in measure[k](mask, x01[i, j]).items():
                    feats[f"{ch}_{name}"] = float(np.asarray(v).ravel()[0])
        names = names or list(feats)
        rows.append([feats.get(f, np.nan) for f in names])
    if names is None:
        raise ProfileError(f"cp-measure features: none of the {n} crops has an object")
    out = np.array([r if r is not None else [np.nan] * len(names) for r in rows], np.float64)
    return out, [CPM_PREFIX + f for f in names]


def cpmeasure_table(data: str | Path, where: str = "") -> ProfileTable:
    """Per-cell cp-measure features of the crop data set `data` (rows of `where` only, if given)."""
    from raycell.formats.embeddings import PROFILE_NAMES
    from raycell.formats.shards import decode_images, open_dataset

    ds = open_dataset(data)
    meta_cols = [
        c
        for c in ds.columns()
        if c not in set(K.IMAGE_COLUMNS) | {"path"}
        and not c.startswith((K.MORPH_PREFIX, K.FEAT_PREFIX))
    ]
    table = ds.read_table(meta_cols + [K.IMAGE])
    frame = (
        table.drop_columns([K.IMAGE])
        .to_pandas()
        .rename(columns=lambda c: PROFILE_NAMES.get(c, f"Metadata_{c}"))
    )
    keep = np.arange(len(frame))
    if where:
        try:
            keep = np.flatnonzero(frame.eval(where).to_numpy(dtype=bool))
        except Exception as exc:  # pandas raises UndefinedVariableError, SyntaxError, ...
            raise ProfileError(
                f"profile.where {where!r} does not work on {data}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from None
    imgs = decode_images(table.take(keep), ds.shape, ds.dtype, where=str(ds.root))
    x, names = cpmeasure_features(imgs, ds.manifest.channel_names)
    frame = pd.concat(
        [frame.iloc[keep].reset_index(drop=True), pd.DataFrame(x, columns=names)], axis=1
    )
    return ProfileTable(frame, names, [f"cp-measure features of {len(keep)} cells of {data}"])
