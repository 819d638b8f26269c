"""CellProfiler-style hand-made features of a crop data set, as a per-cell table `profile` reads.

The features are the baseline's (`raycell.eval.baseline.load_features`): the `morph_*` columns when
the shards carry them, the `feat_*` columns ingest stored, else shape, intensity and GLCM texture
computed from the crops (`raycell.ingest.features.crop_features`). They are named
`Cells_Hand_<name>` so pycytominer's `infer_cp_features` finds them, and the metadata follows
`raycell embed`'s naming (`Metadata_Plate`, `Metadata_Well`, `Metadata_<column>`), so the wells
of an embedding and of its hand-made features are the same rows after aggregation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from raycell import constants as K
from raycell.profiling.wellprofiles import ProfileError, ProfileTable

PREFIX = "Cells_Hand_"


def handmade_table(data: str | Path) -> ProfileTable:
    """Per-cell hand-made features and metadata of every cell of the crop data set `data`."""
    from raycell.eval.baseline import load_features
    from raycell.formats.shards import open_dataset
    from raycell.infer.predictor import PROFILE_NAMES

    ds = open_dataset(data)
    meta_cols = [c for c in ds.columns() if c not in set(K.IMAGE_COLUMNS) | {"path"}
                 and not c.startswith((K.MORPH_PREFIX, K.FEAT_PREFIX))]
    meta = ds.read_table(meta_cols).to_pandas()
    if K.SPLIT not in meta.columns:
        raise ProfileError(f"hand-made features: the data set {data} has no split column; run "
                           "`raycell split` on it first")
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
        raise ProfileError(f"hand-made features: {int((order < 0).sum())} cell(s) of {data} got "
                           "no features")
    frame = meta.rename(columns=lambda c: PROFILE_NAMES.get(c, f"Metadata_{c}"))
    frame = pd.concat([frame.reset_index(drop=True),
                       pd.DataFrame(x[order], columns=names)], axis=1)
    return ProfileTable(frame, names, [f"hand-made features ({feats['source']}) of {data}"])
