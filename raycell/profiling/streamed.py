"""Per-cell features larger than memory -> one row per well, aggregated by Ray Data.

`raycell profile` reads its input into one pandas frame (`wellprofiles.read_input`), which is right
for well tables and for a plate's cells, but a screen's per-cell embeddings (10^7 cells x 2,048
features) do not fit in one process. Here Ray Data reads the parquet shards in blocks, filters them
with `profile.where`, groups by `profile.strata` (a hash shuffle: each well's cells end up in one
block) and reduces each well to its median or mean, so no process holds more than a few wells'
cells. The result is the same `ProfileTable` the in-memory `aggregate` gives (same values, same
`Metadata_Count_Cells`, metadata columns kept where constant within every well); everything after
aggregation (normalisation, selection, retrieval) runs on the small well table as before.

Engine choice (`profile.engine`): `memory`, `ray`, or `auto`, which streams when the features
would take more than half the memory available now (rows x features x 8 bytes, read from the
parquet footers and embeddings.json, no data read).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from raycell import constants as K
from raycell.constants import Aggregation, ProfileEngine
from raycell.formats.arrays import object_matrix
from raycell.profiling import profiles as P
from raycell.profiling.table import ProfileError, ProfileTable

STREAMED_FEATURE_SETS = ("embedding", "morph", "all")
_KEY = "__raycell_key_"  # string group keys (a null key is "", as in the in-memory aggregate)
_VARIES = "__raycell_varies_"  # per well: does a metadata column take more than one value?


@dataclass
class ParquetInput:
    """A streamable input, looked at once per command: its parquet files and embeddings manifest.

    Its size (`estimated_bytes`) reads every file's footer, so it is read on first use and kept:
    the engine choice and the `profile.compare` feature sets then share one look at the input.
    """

    path: Path
    files: list[Path]
    manifest: dict | None  # embeddings.json, or None for a plain parquet file or folder

    @property
    def list_layout(self) -> bool:
        """True for embeddings whose features are one fixed-size list column."""
        return self.manifest is not None and self.manifest.get("layout") == "list"

    @functools.cached_property
    def estimated_bytes(self) -> int:
        """Rough in-memory size of the features (a float64 frame): rows x values per row x 8."""
        import pyarrow.parquet as pq

        rows = 0
        for f in self.files:
            st = f.stat()
            rows += _num_rows(str(f), st.st_size, st.st_mtime_ns)
        if self.list_layout:
            cols = _list_dim(self.files[0], self.manifest["features"][0])
        else:
            cols = len(pq.read_schema(self.files[0]).names)
        return rows * cols * 8


@functools.lru_cache(maxsize=1 << 16)
def _num_rows(file: str, size: int, mtime_ns: int) -> int:
    """Rows of one parquet file, from its footer; kept per (file, size, mtime), so that the CLI's
    Ray decision and the command it starts read each footer once.
    """
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).metadata.num_rows


def scan(path: str | os.PathLike) -> ParquetInput:
    """The parquet files (and embeddings manifest) of an input Ray Data can stream.

    Raises:
        ProfileError: not an embeddings folder, a parquet file or a folder of them.
    """
    path = Path(path)
    if path.is_dir() and (path / K.MANIFEST).is_file():
        raise ProfileError(
            f"profile input {path} is a crop data set: its features are computed from the crops "
            "(give profile.engine=memory)"
        )
    if path.is_dir() and (path / P.MANIFEST).is_file():
        files = sorted((path / "shards").glob(P.SHARD_GLOB))
        if not files:
            raise ProfileError(
                f"no embedding shards in {path / 'shards'} (did `raycell embed` finish?)"
            )
        return ParquetInput(path, files, P.read_manifest(path))
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise ProfileError(f"profile input {path}: no parquet files to stream")
        return ParquetInput(path, files, None)
    if path.suffix == ".parquet":
        return ParquetInput(path, [path], None)
    raise ProfileError(
        f"profile.engine=ray reads parquet (an embeddings folder, a parquet file or a folder of "
        f"them); {path} is not (give profile.engine=memory for CSV)"
    )


def source(engine: ProfileEngine, path: str | os.PathLike) -> ParquetInput | None:
    """The input Ray Data may aggregate (scanned once per command), or None when it stays in memory.

    Raises:
        ProfileError: `engine` is "ray" and the input is not parquet.
    """
    if engine == "memory":
        return None
    try:
        return scan(path)
    except ProfileError:
        if engine == "ray":
            raise
        return None  # auto: CSV, a crop data set, a missing path: the in-memory reader says why


def _list_dim(file: Path, column: str) -> int:
    """Values per row of a list column: the schema's size for a fixed-size list (what `raycell
    embed` writes), else the first row's length.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_schema(file).field(column).type
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    col = pq.ParquetFile(file).read_row_group(0, columns=[column]).column(column)
    return len(col[0].as_py()) if len(col) else 0


def _available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil ships with Ray; without it assume the page count
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def use_ray(engine: ProfileEngine, src: ParquetInput | None, feature_set: str) -> bool:
    """Whether `raycell profile` aggregates `src` (from `source`) with Ray Data (module docstring)."""
    if src is None:
        return False
    if engine == "ray":
        if feature_set not in STREAMED_FEATURE_SETS:
            raise ProfileError(
                f"profile.engine=ray streams per-cell features ({', '.join(STREAMED_FEATURE_SETS)}); "
                f"profile.features={feature_set} is computed from the crops: use profile.engine=memory"
            )
        return True
    if feature_set not in STREAMED_FEATURE_SETS:
        return False
    return src.estimated_bytes > _available_bytes() // 2


def _columns(src: ParquetInput, feature_set: str) -> tuple[list, list]:
    """(metadata columns, feature columns) to read, by the input's schema."""
    import pyarrow.parquet as pq

    files, manifest = src.files, src.manifest
    names = pq.read_schema(files[0]).names
    meta = [c for c in names if c.startswith(P.META_PREFIX)]
    if manifest is None:
        feats = P.feature_columns(names)
        if not feats:
            raise ProfileError(
                f"profile input {files[0]}: no feature columns (names starting with "
                f"{', '.join(P.FEATURE_PREFIXES)})"
            )
        return meta, feats
    feats = list(manifest["features"]) if feature_set in ("embedding", "all") else []
    morph = P.morph_columns(names) if feature_set in ("morph", "all") else []
    if feature_set != "embedding" and not morph:
        raise ProfileError(
            f"profile.features={feature_set}: the embeddings in {files[0].parent.parent} have no "
            "morph_* columns"
        )
    return meta, feats + morph


def _feature_frame(df: pd.DataFrame, feats: list[str], list_layout: bool) -> pd.DataFrame:
    """The features of one well as float64 columns with their profile names."""
    from raycell.profiling.export import morph_feature_name

    parts = []
    for f in feats:
        if f.startswith(P.MORPH_PREFIX):
            parts.append(
                pd.DataFrame({morph_feature_name(f): pd.to_numeric(df[f], errors="coerce")})
            )
        elif list_layout:
            X = object_matrix(df[f], f, ProfileError)
            parts.append(pd.DataFrame(X, columns=[P.embedding_name(i) for i in range(X.shape[1])]))
        else:
            parts.append(df[[f]])
    return pd.concat([p.reset_index(drop=True) for p in parts], axis=1)


def streamed_table(
    src: ParquetInput,
    feature_set: str,
    strata: list[str],
    operation: Aggregation = "median",
    where: str = "",
) -> ProfileTable:
    """One row per `strata` group of a parquet input, aggregated by Ray Data (module docstring)."""
    import ray.data

    files = src.files
    meta, feats = _columns(src, feature_set)
    missing = [c for c in strata if c not in meta]
    if missing:
        raise ProfileError(
            f"profile.strata: no column {missing[0]!r} in {files[0]} (metadata columns: "
            f"{', '.join(meta[:12])})"
        )
    list_layout = src.list_layout
    keys = [_KEY + str(i) for i in range(len(strata))]

    def prepare(df: pd.DataFrame) -> pd.DataFrame:
        if where:
            try:
                df = df.query(where)
            except Exception as exc:  # pandas raises several types for a bad query
                raise ProfileError(
                    f"profile.where {where!r} does not work on {files[0].parent}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                ) from None
        for k, c in zip(keys, strata):
            df[k] = df[c].astype("string").fillna("")
        return df

    def reduce(df: pd.DataFrame) -> pd.DataFrame:
        X = _feature_frame(df, feats, list_layout)
        agg = X.median() if operation == "median" else X.mean()
        row = {k: df[k].iloc[0] for k in keys}
        for c in meta:
            col = df[c].astype(object).where(df[c].notna(), None)
            row[c] = df[c].iloc[0]
            row[_VARIES + c] = col.nunique(dropna=False) > 1
        row[P.COUNT] = len(df)
        row.update(agg.to_dict())
        return pd.DataFrame([row])

    ds = ray.data.read_parquet([str(f) for f in files], columns=meta + feats)
    ds = ds.map_batches(prepare, batch_format="pandas")
    wells = ds.groupby(keys).map_groups(reduce, batch_format="pandas").to_pandas()
    if wells.empty:
        raise ProfileError(f"profile.where {where!r} matches none of the cells in {src.path}")
    wells = wells.sort_values(keys, kind="stable").reset_index(drop=True)
    keep = [c for c in meta if c in strata or not wells[_VARIES + c].any()]
    names = [c for c in wells.columns if not c.startswith((_KEY, _VARIES)) and c not in meta]
    names.remove(P.COUNT)
    frame = pd.concat(
        [wells[keep], wells[[P.COUNT]], wells[names].astype(np.float64)], axis=1
    ).reset_index(drop=True)
    notes = [
        f"aggregated {int(frame[P.COUNT].sum())} cells into {len(frame)} profiles with Ray Data "
        f"(profile.engine; {operation})"
    ]
    if where:
        notes.append(f"kept the cells where {where}")
    return ProfileTable(frame, names, notes)
