"""`raycell export`: an embeddings folder as AnnData (.h5ad, for scanpy) or a CytoTable-style table.

The table layout is the one pycytominer and copairs read: `Metadata_*` columns first, then one
float column per feature with a compartment prefix (`Cells_Embedding_0000`, `Cells_Morph_area`), so
`infer_cp_features` finds the features, and the metadata, without options. Every file is written
under a temporary name beside the target and renamed into place, so an interrupted export never
leaves a truncated file behind.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from raycell.errors import UserError
from raycell.profiling import profiles as P
from raycell.utils.outputs import write_file

FORMATS = ("h5ad", "parquet", "csv")
EXPORT_KEY = b"raycell.export"  # parquet schema metadata: the settings; marks the file as raycell's
LEVELS = ("cell", "well")
MORPH_FEATURE_PREFIX = "Cells_Morph_"


class ExportError(UserError, ValueError):
    """An export option or output path that cannot work; the message names it."""


def morph_feature_name(column: str) -> str:
    """`morph_area` -> `Cells_Morph_area`, a name pycytominer's `infer_cp_features` selects."""
    return MORPH_FEATURE_PREFIX + column[len(P.MORPH_PREFIX) :]


def _check_args(fmt: str, level: str, top_k, umap: bool) -> None:
    """Every option checked before any data is read, so a typo costs no time."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (use one of {', '.join(FORMATS)})")
    if level not in LEVELS:
        raise ExportError(f"unknown export level {level!r} (use 'cell' or 'well')")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
        raise ExportError(f"top_k must be an integer >= 0 (0 keeps every feature), got {top_k!r}")
    if umap and fmt != "h5ad":
        raise ExportError(
            f"umap coordinates go to obsm['X_umap'] of an .h5ad; format {fmt!r} "
            "has no place for them (use format h5ad)"
        )


def _check_out(embeddings: Path, out: Path, overwrite: bool) -> Path:
    """The output file, refused when raycell must not write it (raycell.utils.outputs rules)."""
    from raycell.utils.outputs import prepare_file

    inputs = [("embeddings folder", embeddings)]
    try:
        dataset = json.loads((embeddings / P.MANIFEST).read_text()).get("dataset")
    except (OSError, ValueError, AttributeError):
        dataset = None
    if isinstance(dataset, str) and dataset:
        inputs.append(("data set", dataset))
    return prepare_file(
        out,
        inputs,
        overwrite,
        "export output",
        ExportError,
        "--overwrite",
        ours=_exported_by_raycell,
    )


def _exported_by_raycell(path: Path) -> bool:
    """An .h5ad with `uns/raycell_export` or a parquet file with the `raycell.export` key."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head == b"\x89HDF\r\n\x1a\n":
        import h5py

        with h5py.File(path, "r") as h:
            return "uns/raycell_export" in h
    if head[:4] == b"PAR1":
        import pyarrow.parquet as pq

        return EXPORT_KEY in (pq.read_schema(path).metadata or {})
    return False


def _check_cells(meta: pd.DataFrame, embeddings: Path) -> None:
    """Refuse embeddings whose cells repeat (a shard copied twice): each cell must be one row."""
    cid = "Metadata_CellID"
    shards = embeddings / "shards"
    listed = json.loads((embeddings / P.MANIFEST).read_text()).get("shards")
    if isinstance(listed, list) and shards.is_dir():
        names = {Path(str(s.get("file", ""))).name for s in listed if isinstance(s, dict)}
        extra = sorted(f.name for f in shards.glob(P.SHARD_GLOB) if f.name not in names)
        if names and extra:
            raise ExportError(
                f"{shards} holds shard(s) {', '.join(extra[:3])} that "
                f"{embeddings / P.MANIFEST} does not list (a copied shard?): move "
                "them out, then export again"
            )
    if cid in meta.columns:
        dup = meta[cid].astype(str).duplicated()
        if dup.any():
            raise ExportError(
                f"{shards}: {int(dup.sum())} row(s) repeat a {cid} (e.g. "
                f"{meta[cid].astype(str)[dup].iloc[0]!r}; {meta[cid].nunique()} "
                f"distinct cells in {len(meta)} rows): a shard is duplicated; remove "
                "the copy, then export again"
            )


def _standardised(frame: pd.DataFrame) -> tuple[np.ndarray, int]:
    """Morph features z-scored per column (constant ones only centred), NaN set to the mean (0).

    Shape features live on very different scales (area in px^2, eccentricity in [0, 1]); without
    this one of them would dominate the deep features in PCA. Returns (float32, NaNs filled).
    """
    a = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64, copy=True)
    a[~np.isfinite(a)] = np.nan
    n_nan = int(np.isnan(a).sum())
    if not len(a):
        return a.astype(np.float32), 0
    with warnings.catch_warnings():  # an all-NaN column: its mean is NaN, handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        mu, sd = np.nanmean(a, axis=0), np.nanstd(a, axis=0)
    mu = np.where(np.isfinite(mu), mu, 0.0)
    sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    z = (a - mu) / sd
    z[np.isnan(z)] = 0.0
    return z.astype(np.float32), n_nan


def _array_column(col: pd.Series) -> np.ndarray | None:
    """Equal-length per-row arrays as an (N, K) float32 matrix; None when ragged or not numeric."""
    from raycell.formats.arrays import ListColumnError, object_matrix

    try:
        return object_matrix(col, str(col.name))
    except ListColumnError:
        return None


def _obs_names(meta: pd.DataFrame) -> pd.Index:
    """AnnData obs names: unique cell ids, plate_well for wells, else row numbers."""
    cid = "Metadata_CellID"
    if cid in meta.columns and meta[cid].notna().all() and meta[cid].astype(str).is_unique:
        return pd.Index(meta[cid].astype(str).to_numpy())
    if P.PLATE in meta.columns and P.WELL in meta.columns and P.COUNT in meta.columns:
        keys = meta[P.PLATE].astype(str) + "_" + meta[P.WELL].astype(str)
        if keys.is_unique:
            return pd.Index(keys.to_numpy())
    return pd.Index([str(i) for i in range(len(meta))])


def _obs(meta: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """AnnData obs (strings as categoricals) and obsm (list columns such as Prob_* as matrices)."""
    obs, obsm = {}, {}
    for c in meta.columns:
        col = meta[c]
        if P.is_list_column(col):
            mat = _array_column(col)
            if mat is not None:  # ragged or non-numeric lists fit neither obs nor obsm: left out
                obsm[str(c)] = mat
        elif col.dtype == object or pd.api.types.is_string_dtype(col.dtype):
            obs[str(c)] = pd.Categorical(col.where(col.isna(), col.astype(str)))
        else:
            obs[str(c)] = col.to_numpy()
    return pd.DataFrame(obs, index=_obs_names(meta)), obsm


def _uns_value(v):
    """A manifest value in a form h5py can store (no None, no mixed lists)."""
    if isinstance(v, dict):
        return {str(k): _uns_value(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        if v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return np.asarray(v)
        return np.asarray(
            [json.dumps(x) if isinstance(x, (dict, list)) else str(x) for x in v], dtype=object
        )
    return v


def _table_frame(meta: pd.DataFrame, X: np.ndarray, names: list[str], heads: dict) -> pd.DataFrame:
    """CytoTable layout: `Metadata_*`, then the other columns renamed `Metadata_*`, then features.

    `Pred_<h>` becomes `Metadata_Pred_<h>`, `morph_x` `Metadata_morph_x` and the list `Prob_<h>`
    one column per class, `Metadata_Prob_<h>_<class>`.
    """
    first, rest = {}, {}
    for c in map(str, meta.columns):
        col = meta[c]
        if c.startswith(P.META_PREFIX):
            first[c] = col.to_numpy()
        elif P.is_list_column(col):
            mat = _array_column(col)
            if mat is None:
                continue
            head = c[len(P.PROB_PREFIX) :] if c.startswith(P.PROB_PREFIX) else None
            classes = heads.get(head, [])
            if len(classes) != mat.shape[1]:
                classes = [str(i) for i in range(mat.shape[1])]
            for j, cls in enumerate(classes):
                rest[f"{P.META_PREFIX}{c}_{cls}"] = mat[:, j]
        else:
            rest[P.META_PREFIX + c] = col.to_numpy()
    clash = sorted((set(first) & set(rest)) | ((set(first) | set(rest)) & set(names)))
    if clash:
        raise ExportError(
            f"column name clash in the CytoTable layout ({', '.join(clash[:3])}): "
            "rename that metadata column"
        )
    frame = pd.DataFrame({**first, **rest}, index=pd.RangeIndex(len(meta)))
    feats = pd.DataFrame(np.asarray(X, dtype=np.float32), columns=names, index=frame.index)
    return pd.concat([frame, feats], axis=1)


def export(
    embeddings: str | Path,
    out: str | Path,
    fmt: str = "h5ad",
    level: str = "cell",
    top_k: int = 0,
    drop_zero_variance: bool = True,
    with_morph: bool = False,
    umap: bool = False,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write the embeddings (cells or well medians) as .h5ad, parquet or csv; return a summary.

    Args:
        embeddings: folder written by `raycell embed` (embeddings.json + shards/).
        out: output file (its folder must exist). An existing file is replaced only when raycell
            wrote it and `overwrite` is set (atomically); any other file is refused, as is a path
            inside the embeddings, its data set or any folder raycell wrote.
        fmt: "h5ad" (AnnData: X = features, obs = metadata, obsm = X_pca / X_umap / Prob_<head>,
            uns = the manifest), "parquet" or "csv" (CytoTable layout, see the module docstring).
        level: "cell" (one row per cell) or "well" (median per Metadata_Plate x Metadata_Well).
        top_k: keep the k highest-variance features (0 = all), after dropping constant ones.
        drop_zero_variance: drop features that are constant over the exported rows.
        with_morph: add the standardised morph_* columns as features `Cells_Morph_<name>`.
        umap: also compute obsm["X_umap"] (h5ad only; needs umap-learn).
        seed: random state of PCA and UMAP.
        overwrite: replace an earlier raycell export at `out`.

    Returns:
        {"path", "format", "level", "n_obs", "n_vars", "obsm" (keys, h5ad only), "n_embedding",
        "n_morph" (features of each kind kept), "n_dropped", "morph_filled" (NaNs set to 0)}.
    """
    from raycell.utils.locks import writing

    embeddings, out = Path(embeddings), Path(out)
    _check_args(fmt, level, top_k, umap)
    _check_out(embeddings, out, overwrite)
    with writing(out, "export output", make_parent=False):
        return _export(
            embeddings,
            out,
            fmt,
            level,
            top_k,
            drop_zero_variance,
            with_morph,
            umap,
            seed,
            overwrite,
        )


def _export(
    embeddings: Path,
    out: Path,
    fmt: str,
    level: str,
    top_k: int,
    drop_zero_variance: bool,
    with_morph: bool,
    umap: bool,
    seed: int,
    overwrite: bool,
) -> dict:
    """`export`'s work, under the output's lock (checked again: another run may have written it)."""
    _check_out(embeddings, out, overwrite)
    meta, X, names = P.read_embeddings(embeddings)
    _check_cells(meta, embeddings)
    manifest = meta.attrs.get("manifest", {})
    filled = 0
    if with_morph:
        mcols = P.morph_columns(meta)
        if not mcols:
            raise ExportError(
                f"with_morph: the embeddings in {embeddings} have no morph_* "
                "columns (their crop shards had no shape features)"
            )
        M, filled = _standardised(meta[mcols])
        X = np.hstack([X, M])
        names = names + [morph_feature_name(c) for c in mcols]
        meta = meta.drop(columns=mcols)
    if level == "well":  # aggregate first, then select on the wells, as pycytominer orders it
        wells = P.aggregate_wells(meta, X, names)
        X = wells[names].to_numpy(dtype=np.float32)
        meta = wells.drop(columns=names)
    n_all = len(names)
    X, names = P.select_features(X, names, top_k, drop_zero_variance)
    n_morph = sum(n.startswith(MORPH_FEATURE_PREFIX) for n in names)
    summary = {
        "path": str(out),
        "format": fmt,
        "level": level,
        "n_obs": int(X.shape[0]),
        "n_vars": len(names),
        "obsm": [],
        "n_embedding": len(names) - n_morph,
        "n_morph": n_morph,
        "n_dropped": n_all - len(names),
        "morph_filled": filled,
    }
    settings = {
        "level": level,
        "top_k": int(top_k),
        "drop_zero_variance": bool(drop_zero_variance),
        "with_morph": bool(with_morph),
        "seed": int(seed),
        "embeddings": str(embeddings.absolute()),
    }
    if fmt == "h5ad":
        summary["obsm"] = _write_h5ad(out, meta, X, names, manifest, settings, umap, seed)
    else:
        frame = _table_frame(meta, X, names, manifest.get("heads", {}))
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            table = table.replace_schema_metadata(
                {**(table.schema.metadata or {}), EXPORT_KEY: json.dumps(settings).encode()}
            )
            write_file(out, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        else:
            write_file(out, lambda tmp: frame.to_csv(tmp, index=False), record=True)
    return summary


def _write_h5ad(
    out: Path,
    meta: pd.DataFrame,
    X: np.ndarray,
    names: list[str],
    manifest: dict,
    settings: dict,
    umap: bool,
    seed: int,
) -> list[str]:
    """AnnData with obs/obsm/var/uns as `export` documents, written atomically; its obsm keys."""
    import anndata

    obs, obsm = _obs(meta)
    uns = {k: _uns_value(v) for k, v in manifest.items() if k != "features" and v is not None}
    uns["raycell_export"] = settings
    n_pc = min(2, *X.shape)
    if X.shape[0] >= 2:
        coords, ratio = P.pca_coordinates(X, n_pc, seed)
        obsm["X_pca"] = coords
        uns["pca"] = {"variance_ratio": np.asarray(ratio, dtype=np.float64)}
    if umap:
        obsm["X_umap"] = P.reduce(X, "umap", 2, seed)
    source = ["morph" if n.startswith(MORPH_FEATURE_PREFIX) else "embedding" for n in names]
    var = pd.DataFrame({"source": pd.Categorical(source)}, index=pd.Index(names))
    with warnings.catch_warnings():  # anndata's index-conversion notes are not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        adata = anndata.AnnData(
            X=np.asarray(X, dtype=np.float32), obs=obs, var=var, obsm=obsm, uns=uns
        )
        write_file(out, lambda tmp: adata.write_h5ad(tmp))
    return list(obsm)
