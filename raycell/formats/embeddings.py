"""The embeddings folder (`raycell embed`'s output, the profiling layout): its names and its reader.

The folder holds `embeddings.json` (the manifest) and `shards/part-*.parquet`, one row per cell:
`Metadata_*` columns, `morph_*` hand-made features, `Pred_<head>` / `Prob_<head>` per weak-label head,
then the deep features as `Cells_Embedding_XXXX` columns (layout "columns") or one fixed-size list
column `embedding` (layout "list"). The names are pycytominer's and CytoTable's, so their tools read
the shards as they are. Written by `raycell.infer` and read by profiling, export and the report:
Ray-free, like every format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from raycell import constants as K
from raycell.errors import UserError
from raycell.formats.arrays import list_matrix, object_matrix
from raycell.formats.wells import aggregate_rows

MANIFEST = K.EMBEDDINGS_MANIFEST
SHARD_GLOB = K.SHARD_GLOB
META_PREFIX = "Metadata_"
PRED_PREFIX = "Pred_"
PROB_PREFIX = "Prob_"
MORPH_PREFIX = K.MORPH_PREFIX
EMBEDDING_PREFIX = "Cells_Embedding_"
LIST_COLUMN = "embedding"
PLATE, WELL = "Metadata_Plate", "Metadata_Well"
COUNT = K.CELL_COUNT
# pycytominer's `infer_cp_features` compartments: a column with one of these prefixes is a feature.
FEATURE_PREFIXES = ("Cells_", "Cytoplasm_", "Nuclei_")
_LAYOUTS = ("columns", "list")
# crop-shard column -> profiling name (the other columns become Metadata_<column>)
PROFILE_NAMES = {
    K.PLATE: "Metadata_Plate",
    K.WELL: "Metadata_Well",
    K.FIELD: "Metadata_Site",
    K.CELL_ID: "Metadata_CellID",
    K.BATCH: "Metadata_Batch",
    K.SPLIT: "Metadata_Split",
    K.LABEL: "Metadata_Label",
    K.GROUP: "Metadata_Group",
    K.SOURCE: "Metadata_Source",
}


class EmbeddingsError(UserError, ValueError):
    """An embeddings folder, manifest or shard that does not follow the `raycell embed` contract."""


def embedding_name(i: int) -> str:
    """The pycytominer-style name of deep feature `i` (`Cells_Embedding_0007`)."""
    return f"{EMBEDDING_PREFIX}{i:04d}"


def feature_columns(names: Iterable[str]) -> list[str]:
    """The names pycytominer treats as features (prefix `Cells_`, `Cytoplasm_`, `Nuclei_`)."""
    return [str(n) for n in names if str(n).startswith(FEATURE_PREFIXES)]


def morph_columns(frame: pd.DataFrame | Iterable[str]) -> list[str]:
    """The hand-made shape feature columns (`morph_*`) of a frame or a list of names, in order."""
    names = frame.columns if isinstance(frame, pd.DataFrame) else frame
    return [str(n) for n in names if str(n).startswith(MORPH_PREFIX)]


def head_names(meta: pd.DataFrame) -> list[str]:
    """Weak-label heads with a prediction column (`Pred_<head>`), in column order."""
    return [str(c)[len(PRED_PREFIX) :] for c in meta.columns if str(c).startswith(PRED_PREFIX)]


def prob_matrix(meta: pd.DataFrame, head: str) -> np.ndarray:
    """The (N, K) float32 class probabilities of `head`, from its `Prob_<head>` list column."""
    col = PROB_PREFIX + head
    if col not in meta.columns:
        raise EmbeddingsError(f"no column {col} in the embeddings (heads: {head_names(meta)})")
    if not len(meta):
        return np.zeros((0, 0), np.float32)
    return object_matrix(meta[col], col, EmbeddingsError)


def read_manifest(folder: str | Path) -> dict:
    """embeddings.json of a folder, checked for the keys every reader needs."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise EmbeddingsError(
            f"embeddings manifest not found: {path} (give the folder written by "
            "`raycell embed`, the one that holds embeddings.json)"
        )
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EmbeddingsError(f"embeddings manifest {path} is not valid JSON ({exc})") from None
    if not isinstance(m, dict):
        raise EmbeddingsError(f"embeddings manifest {path} must hold a JSON object")
    layout = m.get("layout", "columns")
    if layout not in _LAYOUTS:
        raise EmbeddingsError(
            f"embeddings manifest {path}: layout {layout!r} is not one of {list(_LAYOUTS)}"
        )
    feats = m.get("features")
    if not isinstance(feats, list) or not feats or not all(isinstance(f, str) for f in feats):
        raise EmbeddingsError(
            f"embeddings manifest {path}: 'features' must be a non-empty list of column names"
        )
    if layout == "list" and len(feats) != 1:
        raise EmbeddingsError(
            f"embeddings manifest {path}: layout 'list' needs exactly one column "
            f"in 'features', got {len(feats)}"
        )
    heads = m.get("heads") or {}
    if not isinstance(heads, dict) or not all(isinstance(v, list) for v in heads.values()):
        raise EmbeddingsError(
            f"embeddings manifest {path}: 'heads' must map head names to lists of class names"
        )
    heads = {str(k): [str(c) for c in v] for k, v in heads.items()}
    return {**m, "layout": layout, "heads": heads}


def _read_shards(folder: Path):
    """Every shard of `folder/shards` as one Arrow table (schema metadata dropped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = folder / "shards"
    files = sorted(where.glob(SHARD_GLOB)) if where.is_dir() else []
    if not files:
        raise EmbeddingsError(
            f"no embedding shards in {where} (expected {SHARD_GLOB}; did `raycell embed` finish?)"
        )
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f).replace_schema_metadata(None))
        except (OSError, pa.ArrowInvalid) as exc:
            raise EmbeddingsError(f"cannot read embedding shard {f} ({exc})") from None
    try:
        return pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise EmbeddingsError(
            f"embedding shards in {where} have different columns or types ({exc})"
        ) from None


def read_embeddings(folder: str | Path) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """(metadata, X, feature names) of an embeddings folder, every shard read and checked.

    The metadata frame holds every non-feature column in shard order (`Metadata_*`, `Pred_*`,
    `Prob_*` as one array per cell, `morph_*`); `meta.attrs["manifest"]` is embeddings.json, whose
    `heads` give the class order. X is float32 (N, D); layout "list" is expanded to
    `Cells_Embedding_XXXX` names.

    Raises:
        EmbeddingsError: missing or malformed manifest, no shards, a missing, null, non-finite or
            ragged feature column, or a row count that differs from the manifest's `n_cells`.
    """
    import pyarrow as pa

    folder = Path(folder)
    manifest = read_manifest(folder)
    where = folder / "shards"
    table = _read_shards(folder)
    feats = manifest["features"]
    missing = [f for f in feats if f not in table.column_names]
    if missing:
        raise EmbeddingsError(
            f"feature column {missing[0]!r} listed in {folder / MANIFEST} is "
            f"missing from the shards in {where} ({len(missing)} of "
            f"{len(feats)} missing)"
        )
    if manifest["layout"] == "list":
        X = list_matrix(table.column(feats[0]), feats[0], str(where), EmbeddingsError)
        names = [embedding_name(i) for i in range(X.shape[1])]
    else:
        X = np.empty((table.num_rows, len(feats)), dtype=np.float32)
        for j, f in enumerate(feats):
            col = table.column(f)
            if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
                raise EmbeddingsError(
                    f"feature column {f!r} in {where} must be numeric, got {col.type}"
                )
            if col.null_count:
                raise EmbeddingsError(
                    f"feature column {f!r} in {where} has {col.null_count} null value(s)"
                )
            X[:, j] = col.to_numpy()
        names = list(feats)
    finite = np.isfinite(X).all(axis=0)
    if not finite.all():
        raise EmbeddingsError(
            f"feature {names[int(np.flatnonzero(~finite)[0])]!r} in {where} "
            "holds NaN or infinite values"
        )
    n_cells = manifest.get("n_cells")
    if isinstance(n_cells, int) and n_cells != table.num_rows:
        raise EmbeddingsError(
            f"{where} holds {table.num_rows} rows but {folder / MANIFEST} "
            f"records n_cells={n_cells}: shards are missing or were changed"
        )
    meta = table.drop_columns(feats).to_pandas()
    meta.attrs["manifest"] = manifest
    return meta, X, names


def aggregate_wells(meta: pd.DataFrame, X: np.ndarray, names: list[str]) -> pd.DataFrame:
    """One row per (Metadata_Plate, Metadata_Well), sorted by both, with medians of the features.

    Columns: the plate and well, every other `Metadata_*` column that is constant within every
    well, `Metadata_Count_Cells`, then the median of each feature (same names, float32). Medians,
    as pycytominer's default `aggregate`, so a few debris objects do not move a well's profile;
    the reduction is `raycell profile`'s (`raycell.formats.wells.aggregate_rows`).
    """
    missing = [c for c in (PLATE, WELL) if c not in meta.columns]
    if missing:
        raise UserError(f"cannot aggregate wells: the embeddings have no {missing[0]} column")
    if len(meta) != len(X):
        raise UserError(
            f"cannot aggregate wells: {len(meta)} metadata rows but {len(X)} feature rows"
        )
    metas = [c for c in meta.columns if str(c).startswith(META_PREFIX)]
    wells = aggregate_rows(meta[metas], pd.DataFrame(X, columns=list(names)), [PLATE, WELL])
    return wells.astype(dict.fromkeys(names, np.float32))
