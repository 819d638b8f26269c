"""Segmentations the lab already has: instance masks and object tables, in place of raycell's own.

Two ways in, both decided at plan time (no pixels read) and attached to each field of view (FOV):

* **Masks** (`ingest.masks`, optional `ingest.cell_masks`): a folder of instance masks, one per
  field, found either with a regex (`ingest.masks_pattern`, whose named groups are a subset of the
  images' FOV groups: the values must agree) or, without one, by name: a mask whose stem, with a
  mask suffix removed (`_cp_masks`, `_masks`, `_mask`, `_labels`, `_label`), equals the stem of one
  of the field's images or its FOV id. That is the name cellpose gives its output
  (``img_cp_masks.png`` beside ``img.png``, ``img_masks.tif`` with ``--save_tif``). The crop
  pass reads the mask instead of segmenting: 8/16/32-bit label images, TIFF or PNG; a binary mask
  is split into connected components. Mask files under the images folder are not images.
* **Object tables** (`ingest.objects`): a CSV or parquet table of object centres. CellProfiler's
  per-object table (``Nuclei.csv``: ``ImageNumber``, ``ObjectNumber``, ``Location_Center_X/Y``)
  joined with its ``Image.csv`` (`ingest.objects_images`) by file name (``FileName_<channel>``)
  or by ``Metadata_<key>`` columns, or any table with the FOV's metadata columns (``plate``,
  ``well``, ``field``, or ``Metadata_Plate`` / ``Metadata_Well`` / ``Metadata_Site``) and x/y
  columns. The crops are centred there, as DeepProfiler takes cells in; with no mask there are no
  morphology features and crops are not masked.

Object ids are kept: a cell's id is ``<fov_id>-c<object number>``, which `raycell embed` turns
into ``Metadata_ObjectNumber`` (and the table's ``ImageNumber`` travels as a column), so a raycell
profile joins back to the lab's own measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from raycell import constants as K
from raycell.config import IngestConfig
from raycell.ingest.params import IngestParams
from raycell.ingest.sources import (
    EXTENSIONS,
    IngestError,
    compile_pattern,
    normalize_well,
    reject_row,
)

MASK_SUFFIXES = ("_cp_masks", "_masks", "_mask", "_labels", "_label")
ROLES = {"masks": "ingest.masks", "cell_masks": "ingest.cell_masks"}
# x/y column pairs tried in order when ingest.objects_xy is not given
_XY_CANDIDATES = (
    ("Location_Center_X", "Location_Center_Y"),
    ("AreaShape_Center_X", "AreaShape_Center_Y"),
    ("x", "y"),
    ("X", "Y"),
    ("center_x", "center_y"),
    ("centroid_x", "centroid_y"),
)
_ID_CANDIDATES = ("ObjectNumber", "Number_Object_Number", "object_number", "object_id", "label")
# a FOV key and the CellProfiler metadata names that hold it
_CP_NAMES = {K.FIELD: ("site", "field"), K.WELL: ("well",), K.PLATE: ("plate",)}


# --------------------------------------------------------------------------------------------------
# Plan time: which mask file / which table rows belong to which field of view
# --------------------------------------------------------------------------------------------------


def list_image_files(root: Path) -> list[Path]:
    """TIFF/PNG files under `root`, hidden files and folders skipped, sorted."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def mask_stem(name: str) -> str | None:
    """'img_cp_masks.png' -> 'img'; None when the name carries no mask suffix."""
    stem = Path(name).stem
    for suf in MASK_SUFFIXES:
        if stem.lower().endswith(suf):
            return stem[: -len(suf)]
    return None


def _mask_settings(p: IngestConfig) -> list[tuple[str, str, str, str]]:
    """(role, key, folder, pattern) of each kind of mask: nuclei (`masks`), cell bodies."""
    return [
        ("masks", ROLES["masks"], p.masks, p.masks_pattern),
        ("cell_masks", ROLES["cell_masks"], p.cell_masks, p.cell_masks_pattern),
    ]


def _mask_index(root: Path, pattern: str, key: str, fov_keys: list[str]) -> dict[tuple, list[str]]:
    """Mask files under `root` by what identifies their field: regex group values, or a stem."""
    if not root.is_dir():
        raise IngestError(f"{key} folder not found: {root}")
    files = list_image_files(root)
    index: dict[tuple, list[str]] = {}
    if pattern:
        rx = compile_pattern(pattern)
        alien = [g for g in rx.groupindex if g not in fov_keys]
        if alien:
            raise IngestError(
                f"{key}_pattern groups {alien} are not groups of the images' pattern that identify "
                f"a field of view ({fov_keys}): a mask is matched to its field by those values"
            )
        for f in files:
            m = rx.search(f.relative_to(root).as_posix())
            if m:
                vals = {k: v or "" for k, v in m.groupdict().items()}
                if K.WELL in vals:
                    vals[K.WELL] = normalize_well(vals[K.WELL])
                index.setdefault(("groups", *sorted(vals.items())), []).append(str(f))
    else:
        for f in files:
            stem = mask_stem(f.name)
            if stem is not None:
                index.setdefault(("stem", stem), []).append(str(f))
    if not index:
        how = f"{key}_pattern {pattern!r}" if pattern else f"a mask suffix {list(MASK_SUFFIXES)}"
        raise IngestError(f"no mask file under {root} matches {how}")
    return index


def _mask_keys(fov: dict, pattern: str) -> list[tuple]:
    """The index keys under which a field's mask may be filed (see `_mask_index`)."""
    if pattern:
        groups = list(compile_pattern(pattern).groupindex)
        return [("groups", *sorted((g, str(fov["meta"].get(g, ""))) for g in groups))]
    stems = {fov["fov_id"]} | {Path(f["relpath"]).stem for f in fov["files"]}
    return [("stem", s) for s in sorted(stems)]


def mask_file_paths(p: IngestParams, fov_keys: list[str]) -> set[str]:
    """Every file the mask settings claim as a mask (left out of the images' discovery)."""
    out: set[str] = set()
    for _, key, folder, pattern in _mask_settings(p):
        if folder:
            idx = _mask_index(Path(folder), pattern, key, fov_keys)
            out |= {path for paths in idx.values() for path in paths}
    return out


def attach_masks(
    p: IngestParams, fovs: list[dict], fov_keys: list[str]
) -> tuple[list[dict], list[dict]]:
    """Give each FOV its mask file(s) (`fov['masks']`, a dict role -> path); the rest are rejects.

    A field with no mask (`missing-mask`) or two (`duplicate-mask`) is rejected, files named.
    """
    kept, rejects = list(fovs), []
    for role, key, folder, pattern in _mask_settings(p):
        if not folder:
            continue
        idx = _mask_index(Path(folder), pattern, key, fov_keys)
        nxt = []
        for fov in kept:
            found = sorted({m for k in _mask_keys(fov, pattern) for m in idx.get(k, [])})
            files = [f["relpath"] for f in fov["files"]]
            if len(found) != 1:
                code = "missing-mask" if not found else "duplicate-mask"
                why = (
                    f"no file in {key} {folder} for this field"
                    + (
                        f" ({key}_pattern {pattern!r})"
                        if pattern
                        else f" (by name: <image stem>{'|'.join(MASK_SUFFIXES)})"
                    )
                    if not found
                    else f"{len(found)} files in {key} for one field: {found}"
                )
                rejects.append(
                    reject_row("fov", code, why, fov["fov_id"], files + found, fov["meta"])
                )
                continue
            nxt.append({**fov, "masks": {**fov.get("masks", {}), role: found[0]}})
        kept = nxt
    return kept, rejects


def _read_table(path: str, key: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise IngestError(f"{key} not found: {p}")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(p)
        return pd.read_csv(p, low_memory=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure is "unreadable", named
        raise IngestError(f"{key} {p} is not a readable CSV/parquet table: {exc}") from None


def _xy_columns(t: pd.DataFrame, given: list, path: str) -> tuple[str, str]:
    if given:
        if len(given) != 2 or any(c not in t.columns for c in given):
            raise IngestError(
                f"ingest.objects_xy {given} must name the x and y columns of {path}; it has "
                f"{list(t.columns)[:30]}"
            )
        return given[0], given[1]
    for x, y in _XY_CANDIDATES:
        if x in t.columns and y in t.columns:
            return x, y
        # a merged CellProfiler export prefixes the object name: Nuclei_Location_Center_X
        px = [c for c in t.columns if c.endswith("_" + x)]
        for cx in px:
            cy = cx[: -len(x)] + y
            if cy in t.columns:
                return cx, cy
    raise IngestError(
        f"ingest.objects {path}: no x/y columns (looked for {[x for x, _ in _XY_CANDIDATES]} and "
        f"their y partners); name them with ingest.objects_xy=[X, Y]; it has {list(t.columns)[:30]}"
    )


def _id_column(t: pd.DataFrame) -> str | None:
    for c in _ID_CANDIDATES:
        hits = [col for col in t.columns if col == c or col.endswith("_" + c)]
        if hits:
            return hits[0]
    return None


def _canon(v) -> str:
    """A metadata value as compared: stripped, as a well ('A1' = 'A01'), a number ('01' = '1')."""
    v = normalize_well(str(v).strip())
    try:
        f = float(v)
    except ValueError:
        return v
    return str(int(f)) if f.is_integer() else repr(f)


def _same(a, b) -> bool:
    """Whether two metadata values are the same (`_canon`)."""
    return _canon(a) == _canon(b)


def _metadata_map(cols: list[str], fov_keys: list[str]) -> dict[str, str]:
    """FOV key -> the table column holding it: the key itself or CellProfiler's Metadata_<Key>."""
    lower = {c.lower(): c for c in cols}
    out = {}
    for k in fov_keys:
        names = [k, *_CP_NAMES.get(k, ())]
        for n in names:
            for cand in (n, f"metadata_{n}"):
                if cand.lower() in lower:
                    out[k] = lower[cand.lower()]
                    break
            if k in out:
                break
    return out


def _field_of_rows(
    table: pd.DataFrame, fovs: list[dict], fov_keys: list[str], keycols: dict[str, str]
) -> pd.Series:
    """The fov_id of each table row by its metadata columns ('' where no field matches)."""
    # an index by the canonical key values: one look-up per group of rows, not a scan of the fields
    index: dict[tuple, list[str]] = {}
    for f in fovs:
        index.setdefault(tuple(_canon(f["meta"].get(k, "")) for k in keycols), []).append(
            f["fov_id"]
        )
    groups = table.groupby(list(keycols.values()), sort=False, dropna=False).groups
    out = pd.Series("", index=table.index, dtype=object)
    for vals, idx in groups.items():
        vals = vals if isinstance(vals, tuple) else (vals,)
        hit = index.get(tuple(_canon(v) for v in vals), [])
        if len(hit) > 1:
            raise IngestError(
                f"ingest.objects rows with {dict(zip(keycols, vals))} match {len(hit)} fields of "
                f"view ({hit[:3]}); the table needs more of the columns {fov_keys}"
            )
        if hit:
            out.loc[idx] = hit[0]
    return out


def _trailing_agreement(a: str, b: str) -> int:
    """How many trailing folder names two paths share ('/x/P1/Images', 's3://b/P1/Images/' -> 2)."""
    pa, pb = [x for x in a.split("/") if x], [x for x in b.replace("\\", "/").split("/") if x]
    n = 0
    for x, y in zip(reversed(pa), reversed(pb)):
        if x != y:
            break
        n += 1
    return n


def _image_numbers(p: IngestParams, fovs: list[dict], fov_keys: list[str]) -> dict[int, str]:
    """CellProfiler's Image.csv: ImageNumber -> fov_id, by file name or by Metadata_ columns."""
    path = p.objects_images
    img = _read_table(path, "ingest.objects_images")
    if "ImageNumber" not in img.columns:
        raise IngestError(f"ingest.objects_images {path} has no ImageNumber column")
    names = [c for c in img.columns if c.startswith("FileName_")]
    keycols = _metadata_map(list(img.columns), fov_keys)
    out: dict[int, str] = {}
    if names:
        # file names can repeat across plates (Phenix's r01c01f01...): a name maps to every field
        # holding it, and the row's other names, metadata and PathName narrow it down to one
        by_name: dict[str, set[str]] = {}
        dirs: dict[str, set[str]] = {}
        by_id = {fov["fov_id"]: fov for fov in fovs}
        for fov in fovs:
            for f in fov["files"]:
                by_name.setdefault(Path(f["relpath"]).name, set()).add(fov["fov_id"])
                dirs.setdefault(fov["fov_id"], set()).add(Path(f["path"]).parent.as_posix())
        for _, row in img.iterrows():
            sets = [by_name[str(row[c])] for c in names if str(row[c]) in by_name]
            hits = set.intersection(*sets) if sets else set()
            if len(hits) > 1 and keycols:
                hits = {
                    h
                    for h in hits
                    if all(_same(by_id[h]["meta"].get(k, ""), row[c]) for k, c in keycols.items())
                }
            pnames = [str(row[c]) for c in img.columns if c.startswith("PathName_")]
            if len(hits) > 1 and any(pn.strip("/") for pn in pnames):
                score = {
                    h: max(_trailing_agreement(d, pn) for d in dirs[h] for pn in pnames)
                    for h in hits
                }
                if max(score.values()) > 0:
                    hits = {h for h, v in score.items() if v == max(score.values())}
            if len(hits) > 1:
                raise IngestError(
                    f"ingest.objects_images {path}: ImageNumber {row['ImageNumber']} names files "
                    f"of several fields of view {sorted(hits)[:3]} (add Metadata_ columns)"
                )
            if hits:
                out[int(row["ImageNumber"])] = hits.pop()
        return out
    if not keycols:
        raise IngestError(
            f"ingest.objects_images {path} has neither FileName_<channel> columns nor metadata "
            f"columns for {fov_keys} (e.g. Metadata_Well); it has {list(img.columns)[:30]}"
        )
    fid = _field_of_rows(img, fovs, fov_keys, keycols)
    return {int(n): f for n, f in zip(img["ImageNumber"], fid) if f}


def attach_objects(
    p: IngestParams, fovs: list[dict], fov_keys: list[str]
) -> tuple[list[dict], list[dict], list[str]]:
    """Give each FOV its objects from the table (`fov['objects']`: ids, y, x).

    FOVs with none are rejected (`no-objects`); table rows that name no field are counted in a note.
    """
    path = p.objects
    t = _read_table(path, "ingest.objects")
    xcol, ycol = _xy_columns(t, list(p.objects_xy), path)
    idcol = _id_column(t)
    if "ImageNumber" in t.columns and not p.objects_images:
        keycols = _metadata_map(list(t.columns), fov_keys)
        if not keycols:
            raise IngestError(
                f"ingest.objects {path} has CellProfiler's ImageNumber but no metadata columns "
                f"for {fov_keys}: give its Image.csv as ingest.objects_images"
            )
    number_of: dict[str, int] = {}
    if p.objects_images:
        if "ImageNumber" not in t.columns:
            raise IngestError(
                f"ingest.objects {path} has no ImageNumber column to join ingest.objects_images"
            )
        fov_of = _image_numbers(p, fovs, fov_keys)
        fid = t["ImageNumber"].map(lambda n: fov_of.get(int(n), ""))
        number_of = {f: n for n, f in fov_of.items()}
    else:
        keycols = _metadata_map(list(t.columns), fov_keys)
        if not keycols:
            raise IngestError(
                f"ingest.objects {path} has no column naming the field of view (any of "
                f"{fov_keys}, or Metadata_Plate / Metadata_Well / Metadata_Site), and no "
                "ImageNumber with ingest.objects_images"
            )
        fid = _field_of_rows(t, fovs, fov_keys, keycols)
    xy = t[[xcol, ycol]].apply(pd.to_numeric, errors="coerce")
    bad = xy.isna().any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise IngestError(
            f"ingest.objects {path}: row {i + 2} has no numeric {xcol}/{ycol} "
            f"({t.iloc[i][[xcol, ycol]].tolist()})"
        )
    ids = (
        pd.to_numeric(t[idcol], errors="coerce")
        if idcol
        else t.groupby(fid, sort=False).cumcount() + 1
    )
    if ids.isna().any() or (ids < 0).any():
        i = int(np.flatnonzero((ids.isna() | (ids < 0)).to_numpy())[0])
        raise IngestError(f"ingest.objects {path}: row {i + 2}: {idcol} is not an object number")
    frame = pd.DataFrame({"fov": fid, "id": ids.astype(np.int64), "x": xy[xcol], "y": xy[ycol]})
    dup = frame[frame.fov != ""].duplicated(["fov", "id"])
    if dup.any():
        i = int(dup[dup].index[0])
        raise IngestError(
            f"ingest.objects {path}: row {i + 2}: object {int(frame.id[i])} appears twice in field "
            f"{frame.fov[i]!r} (object numbers must be unique within a field)"
        )
    stray = frame[frame.fov == ""]
    notes = []
    if len(stray) == len(frame):
        raise IngestError(
            f"ingest.objects {path}: none of its {len(frame)} rows matches a field of view"
        )
    if len(stray):
        notes.append(
            f"ingest.objects: {len(stray)} of {len(frame)} rows name no field of view being "
            "ingested (not found, or rejected; see the rejects table); they are left out"
        )
    by_fov = {f: g for f, g in frame[frame.fov != ""].groupby("fov", sort=False)}
    kept, rejects = [], []
    for fov in fovs:
        g = by_fov.get(fov["fov_id"])
        if g is None:
            rejects.append(
                reject_row(
                    "fov",
                    "no-objects",
                    f"no row of ingest.objects {path} names this field",
                    fov["fov_id"],
                    [f["relpath"] for f in fov["files"]],
                    fov["meta"],
                )
            )
            continue
        g = g.sort_values("id")
        meta = dict(fov["meta"])
        if fov["fov_id"] in number_of:
            meta["ImageNumber"] = str(number_of[fov["fov_id"]])
        objs = {
            "ids": g.id.tolist(),
            "y": g.y.astype(float).tolist(),
            "x": g.x.astype(float).tolist(),
        }
        kept.append({**fov, "meta": meta, "objects": objs})
    if p.mask_crops:
        notes.append(
            "ingest.objects gives object centres, no masks: crops are not masked "
            "(ingest.mask_crops is ignored) and carry no morph_* shape features"
        )
    return kept, rejects, notes


def check_given(p: IngestConfig) -> None:
    """Parameter checks of the given-objects keys (IngestError names the key)."""
    if p.cell_masks and not p.masks:
        raise IngestError(
            "ingest.cell_masks needs ingest.masks too (the nuclei, or whatever objects the cell "
            "masks were grown from)"
        )
    if p.objects and p.masks:
        raise IngestError(
            "ingest.masks and ingest.objects are two alternatives: give one (masks give the "
            "objects' shapes, an object table only their centres)"
        )
    for _, key, folder, _ in _mask_settings(p):  # before Ray starts: a typo in a path is caught
        if folder and not Path(folder).is_dir():
            raise IngestError(f"{key} folder not found: {Path(folder).absolute()}")
    for key, table in (("objects", p.objects), ("objects_images", p.objects_images)):
        if table and not Path(table).is_file():
            raise IngestError(f"ingest.{key} not found: {Path(table).absolute()}")
    for role, _, folder, pattern in _mask_settings(p):
        if pattern and not folder:
            raise IngestError(f"ingest.{role}_pattern is set but ingest.{role} (the folder) is not")
    if p.objects_images and not p.objects:
        raise IngestError("ingest.objects_images is set but ingest.objects (the table) is not")


# --------------------------------------------------------------------------------------------------
# Crop pass: the objects of one field
# --------------------------------------------------------------------------------------------------


@dataclass
class GivenObjects:
    """One field's objects from the lab: label images (masks) or centres (object table)."""

    nuclei: np.ndarray | None  # primary-object labels (masks), None for a table
    cells: np.ndarray | None  # cell-body labels (cell masks), or None
    ids: np.ndarray | None  # table: object numbers
    centres: np.ndarray | None  # table: (N, 2) float (y, x)
    diameter: float  # median equivalent diameter of the objects (0 for a table)

    @property
    def n_objects(self) -> int:
        """How many objects the field has."""
        if self.ids is not None:
            return len(self.ids)
        return int(len(np.unique(self.nuclei)) - 1)


def read_mask(path: str, shape: tuple[int, int]):
    """A mask file as int64 labels of `shape`; ImageError (a reject) when it is not a label image.

    Integer pixels are object ids (0 = background) and are kept; a binary mask (bool, or one
    non-zero value 1 or 255) is split into connected components (8-connected). Float pixels,
    several planes or channels, negative values and a size other than the field's are refused.
    """
    from raycell.ingest import images as imio

    try:
        if path.lower().endswith((".tif", ".tiff")):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from skimage import io

            arr = io.imread(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is "unreadable", named
        raise imio.ImageError(
            "unreadable", f"cannot read mask {path}: {type(exc).__name__}: {exc}"
        ) from None
    arr = np.asarray(arr)
    if arr.ndim != 2:
        arr2 = arr.squeeze()
        if arr2.ndim != 2:
            raise imio.ImageError(
                "mask-not-labels",
                f"mask {path} has shape {arr.shape}: a label image is one 2-D plane (several "
                "channels or planes: save the label image alone)",
            )
        arr = arr2
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "ui":
        raise imio.ImageError(
            "mask-not-labels",
            f"mask {path} has {arr.dtype} pixels: a label image holds integer object ids "
            "(0 = background), not a probability map or an image",
        )
    if arr.dtype.kind == "i" and arr.min() < 0:
        raise imio.ImageError("mask-not-labels", f"mask {path} has negative values")
    if arr.shape != tuple(shape):
        raise imio.ImageError(
            "mask-size-mismatch",
            f"mask {path} is {arr.shape[0]}x{arr.shape[1]} but the field's images are "
            f"{shape[0]}x{shape[1]}",
        )
    values = np.unique(arr)
    nz = values[values > 0]
    if len(nz) == 1 and int(nz[0]) in (1, 255):
        from skimage.measure import label

        return label(arr > 0).astype(np.int64)
    return arr.astype(np.int64)


def _median_diameter(labels: np.ndarray) -> float:
    area = np.bincount(labels.ravel())[1:]
    area = area[area > 0]
    return float(2 * np.sqrt(np.median(area) / np.pi)) if area.size else 0.0


def read_given(fov: dict, shape: tuple[int, int]) -> GivenObjects | None:
    """The field's given objects (None when raycell segments it)."""
    if fov.get("objects") is not None:
        o = fov["objects"]
        centres = np.column_stack([np.asarray(o["y"], float), np.asarray(o["x"], float)])
        h, w = shape
        out = (
            (centres[:, 0] < 0)
            | (centres[:, 0] > h - 1)
            | (centres[:, 1] < 0)
            | (centres[:, 1] > w - 1)
        )
        if out.any():
            from raycell.ingest import images as imio

            i = int(np.flatnonzero(out)[0])
            raise imio.ImageError(
                "objects-outside-image",
                f"{int(out.sum())} object centre(s) of ingest.objects lie outside the {h}x{w} "
                f"field, e.g. object {o['ids'][i]} at x={o['x'][i]:g}, y={o['y'][i]:g} (x and y "
                "swapped, or in physical units?)",
            )
        return GivenObjects(None, None, np.asarray(o["ids"], np.int64), centres, 0.0)
    masks = fov.get("masks")
    if not masks:
        return None
    nuc = read_mask(masks["masks"], shape)
    cells = read_mask(masks["cell_masks"], shape) if masks.get("cell_masks") else None
    return GivenObjects(nuc, cells, None, None, _median_diameter(nuc))


def nuclei_numbered_as(cells: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Each nucleus pixel labelled with the cell it lies in (so the two masks need not share ids).

    Why: cellpose run twice (nuclei, cells) numbers its two outputs independently; CellProfiler's
    share ids. Labelling nuclear pixels by their cell works for both.
    """
    return np.where(nuclei > 0, cells, 0)


def extract_at(
    ids: np.ndarray, centres: np.ndarray, img_out: np.ndarray, crop_size: int
) -> tuple[np.ndarray, pd.DataFrame]:
    """Crops centred on given (y, x) centres (rounded to the pixel); no mask, no shape features."""
    from raycell.ingest.crops import crop_windows

    centre_px = np.rint(centres).astype(np.int64)
    crops = crop_windows(img_out, centre_px, crop_size)
    feats = pd.DataFrame(
        {
            "label": ids.astype(np.int64),
            K.CENTROID_Y: centres[:, 0].astype(np.float32),
            K.CENTROID_X: centres[:, 1].astype(np.float32),
        }
    )
    return crops, feats


def crops_of_given(
    given: GivenObjects, img: np.ndarray, img_out: np.ndarray, names: list[str], p: IngestParams
) -> tuple[np.ndarray, pd.DataFrame]:
    """The crops and features of a field's given objects (masks: as raycell's own objects)."""
    from raycell.ingest.crops import extract

    if given.centres is not None:
        return extract_at(given.ids, given.centres, img_out, p.crop_size)
    objects = given.cells if given.cells is not None else given.nuclei
    nuclei = nuclei_numbered_as(given.cells, given.nuclei) if given.cells is not None else None
    return extract(
        objects,
        img,
        img_out,
        names,
        p.crop_size,
        nuclei=nuclei,
        mask=p.mask_crops,
        mask_blur=p.mask_blur,
    )


__all__ = [
    "GivenObjects",
    "attach_masks",
    "attach_objects",
    "check_given",
    "crops_of_given",
    "mask_file_paths",
    "read_given",
    "read_mask",
]
