"""Segmentation overlays: a few fields per plate with their objects' outlines, and per-plate counts.

A biologist judges a segmentation by looking at it. `raycell ingest` writes, per plate,
`overlays/<plate>.png`: up to `ingest.overlay_fields` fields that gave cells (spread over the plate,
a fixed choice), each shown as its nucleus channel (grey, 1st-99.8th percentile) with the nuclei
outlined in yellow and, with a cytoplasm channel, the cell bodies in magenta; and
`overlays/overlays.json`: per plate, the fields in / with cells / rejected (by reject code), the
cells kept and the diameter used, with the PNG's name. `raycell report <ingest folder>` shows both.

The drawn fields are segmented again here, in the driver, with the crop pass's own reading,
illumination correction, segmentation and plate reference diameter (`segment`), so the outlines are
those the crops were cut from; a few fields per plate cost far less than carrying every field's
label image back from the crop tasks.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np

from raycell import constants as K
from raycell.ingest import images as imio
from raycell.ingest.params import IngestParams
from raycell.ingest.segment import segment
from raycell.ingest.tasks import read_fov
from raycell.utils.io import atomic_write_bytes, atomic_write_json

OVERLAY_DIR = "overlays"
OVERLAY_INDEX = "overlays.json"
NUCLEUS_RGB = (1.0, 0.85, 0.0)  # yellow outlines: visible on grey, distinct from the cells'
CELL_RGB = (1.0, 0.0, 1.0)
MAX_SIDE = 512  # each field is drawn at most this wide / high (a sample, not a full-size copy)


@dataclasses.dataclass
class PlateOverlay:
    """One plate's line in `overlays.json` (and in the report's table)."""

    plate: str
    png: str  # relative to the data set folder; '' when no field of the plate gave cells
    fields: list[str]  # the fields drawn, left to right
    objects: list[int]  # objects (nuclei) found in each drawn field, border objects included
    n_fovs: int  # with cells + rejected (also those the plan rejected)
    n_fovs_with_cells: int
    n_fovs_rejected: int
    rejects_by_code: dict[str, int]
    n_cells: int
    diameter_px: float  # the plate's reference diameter, else the median of its fields'


def outline_rgb(img: np.ndarray, nuclei: np.ndarray, cells: np.ndarray | None = None) -> np.ndarray:
    """An RGB float image: `img` in grey (1st-99.8th percentile) with the objects' outlines."""
    from skimage.segmentation import find_boundaries

    lo, hi = np.percentile(img, [1.0, 99.8])
    grey = np.clip((img - lo) / max(float(hi - lo), 1e-12), 0.0, 1.0).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if cells is not None:
        rgb[find_boundaries(cells, mode="inner")] = CELL_RGB
    rgb[find_boundaries(nuclei, mode="inner")] = NUCLEUS_RGB
    return rgb


def _shrink(rgb: np.ndarray, side: int = MAX_SIDE) -> np.ndarray:
    """Every k-th pixel so that the field fits `side` (outlines are 1 px: no smoothing)."""
    k = max(1, -(-max(rgb.shape[:2]) // side))
    return rgb[::k, ::k]


def montage(tiles: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Tiles side by side on white, top-aligned, `gap` px apart; uint8 RGB."""
    h = max(t.shape[0] for t in tiles)
    w = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    out = np.ones((h, w, 3), np.float32)
    x = 0
    for t in tiles:
        out[: t.shape[0], x : x + t.shape[1]] = t
        x += t.shape[1] + gap
    return (out * 255).round().astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """A uint8 RGB image encoded as PNG, for an atomic write."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def file_name(plate: str) -> str:
    """A plate name as a file name: characters other than letters, digits, - _ . become _."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in plate) or "plate"


def pick_fields(fov_ids: list[str], k: int) -> list[str]:
    """Up to `k` of the sorted ids, evenly spread (first, middle, last ...): a fixed choice."""
    ids = sorted(fov_ids)
    if k <= 0 or not ids:
        return []
    if len(ids) <= k:
        return ids
    return [ids[int(round(i * (len(ids) - 1) / (k - 1)))] for i in range(k)] if k > 1 else ids[:1]


def field_overlay(fov: dict, p: IngestParams, ch: dict, stats: dict) -> tuple[np.ndarray, int]:
    """One field as the crop pass segments it, drawn with its outlines: (RGB float, objects)."""
    img, _ = read_fov(fov, p, ch)
    plate = fov["row"][K.PLATE]
    func = (stats.get("illum") or {}).get(plate)
    if p.illum_correction and func is not None:
        img = img / imio.upsample(func, img.shape[1:])
    ref_d = float((stats.get("diameter_ref") or {}).get(plate, 0.0))
    nuc, cells, _ = segment(img, ch["nucleus"], ch["cytoplasm"], p, ref_diameter=ref_d)
    return outline_rgb(img[ch["nucleus"]], nuc, cells), int(nuc.max())


def write_overlays(
    out: Path,
    fovs: list[dict],
    per_fov: dict[str, dict],
    rejects: list[dict],
    p: IngestParams,
    ch: dict,
    stats: dict,
) -> list[PlateOverlay]:
    """Write `<out>/overlays/<plate>.png` and `overlays.json`; return the per-plate records.

    Args:
        out: the data set folder being written (the staging folder: swapped in whole).
        fovs: the planned fields of view.
        per_fov: fov_id -> {"n_cells", "diameter"} of the fields that gave cells.
        rejects: the rejects rows (dicts with kind, fov_id, code).
        p: ingest parameters; `overlay_fields` fields per plate are drawn (0 = none).
        ch: the plan's channel roles.
        stats: the statistics pass's result (illumination functions, plate diameters).
    """
    k = p.overlay_fields
    if k <= 0:
        return []
    by_plate: dict[str, list[dict]] = {}
    for f in fovs:
        by_plate.setdefault(str(f["row"][K.PLATE]), []).append(f)
    plate_of = {f["fov_id"]: plate for plate, group in by_plate.items() for f in group}
    # rejected fields per plate and code: those of the plan (not in `fovs`) carry their plate in
    # their metadata; those of the crop pass are found through `fovs`
    codes_by_plate: dict[str, dict[str, int]] = {}
    for r in rejects:
        if r.get("kind") != "fov":
            continue
        plate = plate_of.get(r["fov_id"]) or str(r.get(K.PLATE) or "") or "(no plate)"
        codes = codes_by_plate.setdefault(plate, {})
        codes[r["code"]] = codes.get(r["code"], 0) + 1
    (out / OVERLAY_DIR).mkdir(exist_ok=True)
    records = []
    refs = stats.get("diameter_ref") or {}
    for plate in sorted(set(by_plate) | set(codes_by_plate)):
        group = by_plate.get(plate, [])
        ok = [f["fov_id"] for f in group if f["fov_id"] in per_fov]
        codes = codes_by_plate.get(plate, {})
        diams = [per_fov[i]["diameter"] for i in ok if per_fov[i].get("diameter")]
        d = float(refs.get(plate, 0.0)) or (float(np.median(diams)) if diams else 0.0)
        chosen = pick_fields(ok, k)
        by_id = {f["fov_id"]: f for f in group}
        tiles, counts = [], []
        for fid in chosen:
            rgb, n = field_overlay(by_id[fid], p, ch, stats)
            tiles.append(_shrink(rgb))
            counts.append(n)
        png = ""
        if tiles:
            png = f"{OVERLAY_DIR}/{file_name(plate)}.png"
            atomic_write_bytes(out / png, png_bytes(montage(tiles)))
        records.append(
            PlateOverlay(
                plate=plate,
                png=png,
                fields=chosen,
                objects=counts,
                n_fovs=len(ok) + sum(codes.values()),
                n_fovs_with_cells=len(ok),
                n_fovs_rejected=sum(codes.values()),
                rejects_by_code=dict(sorted(codes.items())),
                n_cells=int(sum(per_fov[i]["n_cells"] for i in ok)),
                diameter_px=round(d, 2),
            )
        )
    atomic_write_json(
        out / OVERLAY_DIR / OVERLAY_INDEX,
        {
            "fields_per_plate": k,
            "legend": "nucleus channel in grey; nuclei outlined in yellow, cell bodies in magenta",
            "plates": [dataclasses.asdict(r) for r in records],
        },
    )
    return records
