"""`raycell import-armed`: ARMED / MEDL `data_*.npz` + `data_*.csv` -> crop shards.

The ARMED melanoma pipeline (the ARMED paper's reference code, `ARMED_MixedEffectsDL`) saves one
pair of files per split:

* `data_{train,val,test,unseen}.npz` with `images` (N, H, W, 1) float32 = pixel / 255, `label` (N,)
  float32 (1.0 = 'low' metastatic efficiency, 0.0 = 'high') and `cluster` (N, n_dates) float32, the
  one-hot imaging date over the *training* dates in sorted order (all zeros for unseen dates);
* `data_{split}.csv` with an index column and `image` (source PNG path), `date`, `celltype` (PDX),
  `met-eff` (high/low) and `cell` (cell folder id), one row per image in the same order.

Mapping: `batch` = date, `label` = met-eff, `group` = celltype, `split` from the file name,
`cell_id` = ``<split>-<cell>-<csv index>``, `source` = the csv's image path; `cell` and `image_path`
are kept as extra columns. Images are stored back as uint8 (`rint(x * 255)`, lossless for data made
by / 255).

Everything is checked before anything is written: missing keys or columns, array shapes, row counts
that disagree between the npz arrays and the csv, pixel values outside [0, 1] or NaN, and agreement
of `label` with `met-eff` and of `cluster` with `date`. Errors are `ArmedImportError`, one line
naming the file and key.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from raycell import constants as K
from raycell.formats.manifest import DatasetManifest
from raycell.ingest.sources import IngestError

SPLIT_FILES = {"train": K.TRAIN, "val": K.VAL, "test": K.TEST, "unseen": K.UNSEEN}
NPZ_KEYS = ("images", "label", "cluster")
CSV_COLUMNS = ("image", "date", "celltype", "met-eff", "cell")
_NAME_RE = re.compile(r"^data_(train|val|test|unseen)\.npz$")
_CHUNK = 2048  # images converted and written per step (bounds the float32 -> uint8 peak memory)


class ArmedImportError(IngestError):
    """ARMED files that cannot be imported; the message names the file and key."""


def find_armed_files(src: str | os.PathLike) -> dict[str, Path]:
    """Split name -> npz path from a folder or glob (data_unseen_inferred_z.npz is ignored)."""
    s = str(src)
    paths = (
        sorted(Path(s).glob("data_*.npz"))
        if Path(s).is_dir()
        else [Path(p) for p in sorted(glob.glob(s))]
    )
    found = {}
    for p in paths:
        m = _NAME_RE.match(p.name)
        if m:
            found[m.group(1)] = p.absolute()
    if not found:
        raise ArmedImportError(f"no data_{{train,val,test,unseen}}.npz found at {s}")
    return found


def _load_split(split: str, npz: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """Load and check one split's arrays and csv."""
    try:
        z = np.load(npz, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported with the file name
        raise ArmedImportError(f"{npz}: cannot read npz: {type(exc).__name__}: {exc}") from None
    with z:
        missing = [k for k in NPZ_KEYS if k not in z.files]
        if missing:
            raise ArmedImportError(f"{npz}: missing key(s) {missing}; it has {sorted(z.files)}")
        images, label, cluster = z["images"], z["label"], z["cluster"]
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ArmedImportError(f"{npz}: 'images' must be (N, H, W, 1), got {images.shape}")
    n = len(images)
    if label.reshape(len(label), -1).shape[1] != 1:
        raise ArmedImportError(f"{npz}: 'label' must be (N,), got {label.shape}")
    label = label.reshape(-1)
    if cluster.ndim != 2:
        raise ArmedImportError(f"{npz}: 'cluster' must be (N, n_dates), got {cluster.shape}")
    for key, arr in (("label", label), ("cluster", cluster)):
        if len(arr) != n:
            raise ArmedImportError(f"{npz}: 'images' has {n} rows but '{key}' has {len(arr)}")
    csv = npz.with_suffix(".csv")
    if not csv.is_file():
        raise ArmedImportError(f"{npz}: matching csv {csv.name} not found")
    try:
        meta = pd.read_csv(csv, index_col=0, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ArmedImportError(f"{csv}: not a readable csv: {exc}") from None
    missing = [c for c in CSV_COLUMNS if c not in meta.columns]
    if missing:
        raise ArmedImportError(f"{csv}: missing column(s) {missing}; it has {list(meta.columns)}")
    if len(meta) != n:
        raise ArmedImportError(f"{csv}: {len(meta)} rows but {npz.name} has {n} images")
    bad_eff = ~meta["met-eff"].isin(["high", "low"])
    if bad_eff.any():
        i = int(np.flatnonzero(bad_eff)[0])
        raise ArmedImportError(
            f"{csv}: row {i}: met-eff {meta['met-eff'].iloc[i]!r} is not high/low"
        )
    want = (meta["met-eff"].to_numpy() == "low").astype(np.float32)
    wrong = np.flatnonzero(np.abs(label.astype(np.float32) - want) > 1e-6)
    if wrong.size:
        i = int(wrong[0])
        raise ArmedImportError(
            f"{npz}: label[{i}] = {label[i]} but {csv.name} row {i} says met-eff "
            f"{meta['met-eff'].iloc[i]!r} (ARMED: 1 = low, 0 = high); {wrong.size} "
            "row(s) disagree"
        )
    return images, label, cluster, meta


def _check_pixels(images: np.ndarray, where: Path) -> None:
    finite = np.isfinite(images)
    if not finite.all():
        i = int(np.flatnonzero(~finite.reshape(len(images), -1).all(axis=1))[0])
        raise ArmedImportError(f"{where}: image {i} has NaN/inf pixels")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ArmedImportError(
            f"{where}: pixel values span [{lo:.3g}, {hi:.3g}], expected [0, 1] "
            "(ARMED divides by 255)"
        )


def _cluster_order(src_dir: Path, splits: dict) -> list[str]:
    """ARMED's Z column order: cluster_order.txt if present, else the sorted training dates."""
    f = src_dir / "cluster_order.txt"
    if f.is_file():
        return [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
    if "train" in splits:
        return sorted(splits["train"][3]["date"].unique())
    return []


def import_armed(
    src: str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    rows_per_shard: int = 2000,
) -> DatasetManifest:
    """Convert ARMED `data_*.npz` + `data_*.csv` files into a crop-shard data set.

    Args:
        src: folder holding the files, or a glob such as '/data/melanoma/data_*.npz'.
        out: output data set folder.
        overwrite: replace a data set raycell wrote in `out` (never a folder of other files).
        rows_per_shard: cells per parquet shard.

    Returns:
        The manifest (with `armed`: source files, cluster order, per-split counts;
        `suggested_unseen`: the dates of the unseen split).

    Raises:
        ArmedImportError: missing files/keys/columns, mismatched lengths, values outside [0, 1],
            labels or one-hot dates that disagree with the csv.
    """
    from raycell.formats.shards import ShardWriter
    from raycell.utils.outputs import DATASET, prepare_output, staging_dir, swap_in

    files = find_armed_files(src)
    # the output must not be, hold or sit in the source (`import-armed SRC --out SRC`)
    sources = (
        [("ARMED source folder", src)]
        if Path(src).is_dir()
        else [("ARMED file", f) for p in files.values() for f in (p, p.with_suffix(".csv"))]
    )
    out = prepare_output(out, sources, overwrite, "import-armed --out", DATASET, ArmedImportError)
    loaded = {s: _load_split(s, p) for s, p in files.items()}
    shapes = {s: v[0].shape[1:3] for s, v in loaded.items()}
    if len(set(shapes.values())) > 1:
        raise ArmedImportError(f"image sizes differ between splits: {shapes}")
    src_dir = next(iter(files.values())).parent
    order = _cluster_order(src_dir, loaded)
    for s, (_, _, cluster, meta) in loaded.items():
        if s == "unseen" or not order:
            continue
        if cluster.shape[1] != len(order):
            raise ArmedImportError(
                f"{files[s]}: 'cluster' has {cluster.shape[1]} columns but there are "
                f"{len(order)} training dates {order}"
            )
        hot = cluster.sum(axis=1) > 0
        got = np.array(order, dtype=object)[cluster.argmax(axis=1)]
        wrong = np.flatnonzero(hot & (got != meta["date"].to_numpy()))
        if wrong.size:
            i = int(wrong[0])
            raise ArmedImportError(
                f"{files[s]}: cluster row {i} encodes date {got[i]!r} but the csv says "
                f"{meta['date'].iloc[i]!r}; {wrong.size} row(s) disagree"
            )
    for s, (images, *_rest) in loaded.items():
        _check_pixels(images, files[s])
    # written beside `out` and swapped in when complete: a failed import leaves the old data set
    # intact
    partial = staging_dir(out, DATASET)
    writer = ShardWriter(partial, ["gray"], rows_per_shard=rows_per_shard, overwrite=True)
    counts = {}
    for s, (images, _label, _cluster, meta) in loaded.items():
        split = SPLIT_FILES[s]
        idx = meta.index.astype(str)
        if idx.duplicated().any():  # fall back to the row number when the csv index is not unique
            idx = pd.Index([str(i) for i in range(len(meta))])
        rows = pd.DataFrame(
            {
                K.CELL_ID: [f"{split}-{c}-{i}" for c, i in zip(meta["cell"], idx)],
                K.BATCH: meta["date"].to_numpy(),
                K.LABEL: meta["met-eff"].to_numpy(),
                K.GROUP: meta["celltype"].to_numpy(),
                K.SPLIT: split,
                K.SOURCE: meta["image"].to_numpy(),
                K.PLATE: "",
                K.WELL: "",
                K.FIELD: "",
                "cell": meta["cell"].to_numpy(),
                "image_path": meta["image"].to_numpy(),
            }
        )
        for a in range(0, len(images), _CHUNK):
            chunk = np.rint(images[a : a + _CHUNK, ..., 0] * 255).astype(np.uint8)[:, None]
            writer.add(chunk, rows.iloc[a : a + _CHUNK].reset_index(drop=True))
        counts[split] = len(images)
    unseen_dates = sorted(loaded["unseen"][3]["date"].unique()) if "unseen" in loaded else []
    manifest = writer.close(
        params={"stage": "import-armed", "src": str(src)},
        extra={
            "armed": {
                "files": {s: str(p) for s, p in files.items()},
                "cluster_order": order,
                "counts": counts,
                "label_encoding": {"low": 1.0, "high": 0.0},
            },
            "suggested_unseen": unseen_dates,
        },
    )
    swap_in(partial, out)
    return manifest
