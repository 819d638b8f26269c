"""Synthetic raw fields of view with true instance masks: the end-to-end test bed for ingest.

`write_synthetic_raw` draws cell lines and imaging batches with the crop generator's parameter
functions (`raycell.data.synthetic._line_params`, `_batch_params`: the same looks and nuisance
ranges), then renders whole fields of view instead of crops:

* one plate per batch, `wells` wells per plate, each well imaging one cell line (lines rotate over
  wells and plates), `fields` fields of view per well;
* each field holds up to `cells_per_fov` cells placed at random without overlapping (neighbours may
  touch), some cut by the field's border; a cell is the crop generator's shape (an ellipse with
  angular lobes, a smaller off-centre nucleus, smooth texture, cytoplasmic puncta);
* 2 channels (``nucleus``, ``cytoplasm``) x `n_z` Z-slices: one slice, drawn per field, is in focus
  and the others are blurred in proportion to their distance from it (and slightly dimmer);
* per-batch nuisance: channel gains, a background offset, an illumination gradient plus vignetting
  across the field, blur and signal-dependent noise, then 12-bit quantisation into uint16 TIFFs.

Layout of `out`::

    images/<batch>/<plate>_<well>_s<field>_<channel>_z<z>.tif  uint16, one per channel and slice
    masks/<fov_id>_nuclei.tif, masks/<fov_id>_cells.tif  true labels (cell k holds nucleus k)
    platemap.csv  plate, well, line, label, dose, time
    truth.csv     per field: in-focus slice, cell counts
    raw.json      parameters + the ingest settings to use

`fov_id` is what ingest derives from the default pattern `DEFAULT_PATTERN`:
``<batch>_<plate>_<well>_<field>``.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from scipy import ndimage

from raycell.data.synthetic import CHANNELS, _batch_params, _line_params
from raycell.utils.io import atomic_write_json
from raycell.utils.outputs import RAW, prepare_output, staging_dir, swap_in

DEFAULT_PATTERN = (
    r"(?P<batch>[^/]+)/(?P<plate>[^_/]+)_(?P<well>[A-P]\d{2})_s(?P<field>\d+)"
    r"_(?P<channel>[a-z]+)_z(?P<z>\d+)\.tif$"
)
_SCALE = 2500.0  # intensity 1.0 -> 2500 counts in a 12-bit range: headroom for bright batches
_DEFOCUS = 2.2  # blur sigma (px) per Z step away from the focal plane
_DOSES = ("0", "0.1", "1", "10")
_TIMES = ("24", "48")


def _place(
    rng: np.random.Generator, size: int, reach: np.ndarray, n: int
) -> tuple[list[int], np.ndarray]:
    """Indices of cells (with bounding radii `reach`) kept after placing them without overlap."""
    pos, keep = [], []
    for i in range(len(reach)):
        for _ in range(60):
            # centres may fall slightly outside the field so that some cells are cut by the border
            c = rng.uniform(-0.3 * reach[i], size + 0.3 * reach[i], 2)
            if all(np.hypot(*(c - p)) >= 0.85 * (reach[i] + reach[j]) for p, j in zip(pos, keep)):
                pos.append(c)
                keep.append(i)
                break
        if len(keep) == n:
            break
    return keep, np.array(pos).reshape(-1, 2)


def _render_fov(
    rng: np.random.Generator, size: int, line: pd.Series, n_cells: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In-focus, noise-free (2, size, size) image in [0, ~1] and true nucleus / cell labels."""
    m = n_cells * 3  # candidates; placement keeps those that fit
    radius = line.radius * rng.normal(1.0, 0.08, m)
    elong = line.elong * rng.normal(1.0, 0.06, m)
    lobe_amp = np.clip(rng.normal(0.07 + 0.05 * (line.label == "low"), 0.035, m), 0.0, 0.35)
    reach = radius * np.sqrt(elong) * (1 + lobe_amp + 0.03)
    keep, centres = _place(rng, size, reach, n_cells)
    img = np.zeros((2, size, size), np.float32)
    best_c = np.zeros((size, size), np.float32)
    best_n = np.zeros((size, size), np.float32)
    cells = np.zeros((size, size), np.uint16)
    nuclei = np.zeros((size, size), np.uint16)
    for k, (i, (cy, cx)) in enumerate(zip(keep, centres), start=1):
        half = int(np.ceil(reach[i] + 6))
        y0, y1 = max(0, int(cy) - half), min(size, int(cy) + half + 1)
        x0, x1 = max(0, int(cx) - half), min(size, int(cx) + half + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        phi, psi = rng.uniform(0, 2 * np.pi, 2)
        u = dx * np.cos(phi) + dy * np.sin(phi)
        v = -dx * np.sin(phi) + dy * np.cos(phi)
        el = np.sqrt(elong[i])
        rho = np.hypot(u / el, v * el)
        theta = np.arctan2(v, u)
        lobes = rng.integers(3, 7)
        bound = radius[i] * (
            1 + lobe_amp[i] * np.sin(lobes * theta + psi) + 0.03 * np.sin(2 * theta + 2 * psi)
        )
        cell = 1 / (1 + np.exp(-(bound - rho) / 0.8))
        nr = radius[i] * line.nuc_ratio
        ncy, ncx = rng.normal(0, 1.5, 2)
        nuc = 1 / (1 + np.exp(-(nr - np.hypot((dx - ncx) / 1.08, (dy - ncy) * 1.08)) / 0.7)) * cell
        tex = np.zeros_like(cell)
        for _ in range(3):
            f, a, ph = rng.uniform(0.15, 0.45), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
            tex += np.sin(f * (dx * np.cos(a) + dy * np.sin(a)) + ph)
        tex *= 0.06
        spots = np.zeros_like(cell)
        for _ in range(rng.poisson(3.0 + 3.0 * (line.label == "low"))):
            pr, pa = radius[i] * np.sqrt(rng.uniform(0.15, 0.65)), rng.uniform(0, 2 * np.pi)
            spots += np.exp(-((dy - pr * np.sin(pa)) ** 2 + (dx - pr * np.cos(pa)) ** 2) / 2.42)
        cyto = line.cyto_int * cell * (1 + tex) * (1 - 0.45 * nuc) + 0.35 * spots * cell
        nucl = line.nuc_int * nuc * (1 + 1.5 * tex)
        # each pixel belongs to the cell with the strongest presence there (touching cells do not
        # add up)
        sl = (slice(y0, y1), slice(x0, x1))
        win = cell > best_c[sl]
        img[1][sl] = np.where(win, cyto, img[1][sl])
        best_c[sl] = np.where(win, cell, best_c[sl])
        cells[sl] = np.where(win & (cell > 0.5), k, cells[sl])
        nwin = nuc > best_n[sl]
        img[0][sl] = np.where(nwin, nucl, img[0][sl])
        best_n[sl] = np.where(nwin, nuc, best_n[sl])
        nuclei[sl] = np.where(nwin & (nuc > 0.5), k, nuclei[sl])
    nuclei[cells == 0] = 0
    nuclei[nuclei != cells] = 0  # a nucleus pixel under a neighbour's cell body belongs to nobody
    return img, nuclei, cells


def _nuisance(rng: np.random.Generator, img: np.ndarray, bp: pd.Series) -> np.ndarray:
    """Apply a batch's gain, illumination (gradient, vignetting), offset, blur, noise."""
    _, h, w = img.shape
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    gy, gx = gy / h - 0.5, gx / w - 0.5
    illum = (1 + bp.grad_strength * (gy * np.sin(bp.grad_dir) + gx * np.cos(bp.grad_dir)) * 2) * (
        1 - 0.5 * bp.grad_strength * (gy**2 + gx**2) * 2
    )
    x = img * np.array([bp.gain_nuc, bp.gain_cyto], np.float32)[:, None, None]
    x = (x + bp.offset + 0.02) * illum[None]
    if bp.blur > 0.05:
        x = ndimage.gaussian_filter(x, sigma=(0, bp.blur, bp.blur))
    x += rng.normal(0, 1, x.shape).astype(np.float32) * (
        bp.noise * np.sqrt(np.clip(x, 0, None) + 0.05)
    )
    return np.clip(np.rint(x * _SCALE), 0, 4095).astype(np.uint16)


def write_synthetic_raw(
    out: str | os.PathLike,
    seed: int = 0,
    n_batches: int = 2,
    n_lines: int = 4,
    wells: int = 4,
    fields: int = 2,
    fov_size: int = 256,
    cells_per_fov: int = 14,
    n_z: int = 3,
    batch_strength: float = 1.0,
    overwrite: bool = False,
) -> dict:
    """Write raw fields of view, true masks and a plate map (see the module docstring).

    Args:
        out: output folder (built in a staging folder beside it and renamed when complete); it must
            be new, empty or an earlier `synth --raw` folder (`raycell.utils.outputs`).
        seed: random seed; a seed gives the same files every time.
        n_batches: imaging batches (one plate each).
        n_lines: cell lines (alternate labels 'high'/'low').
        wells: wells per plate.
        fields: fields of view per well.
        fov_size: field height and width in px.
        cells_per_fov: cells placed per field (fewer when they do not fit).
        n_z: Z-slices per channel.
        batch_strength: scale of the nuisance effects.
        overwrite: replace an earlier `synth --raw` folder (never a folder of other files).

    Returns:
        The description written to `raw.json` (parameters, counts, the ingest settings to use).
    """
    if min(n_batches, n_lines, wells, fields, n_z, cells_per_fov) < 1 or fov_size < 32:
        raise ValueError("write_synthetic_raw: counts must be >= 1 and fov_size >= 32")
    # OutputError is a FileExistsError: a user's folder is refused even with overwrite
    out = prepare_output(out, overwrite=overwrite, what="synth.out", kind=RAW)
    rng = np.random.default_rng(seed)
    lines = _line_params(rng, max(2, n_lines))
    batches = _batch_params(rng, n_batches, 0, batch_strength)
    tmp = staging_dir(out, RAW)
    (tmp / "masks").mkdir()
    import tifffile

    pm_rows, truth_rows = [], []
    for b, bp in batches.iterrows():
        plate = f"SYN{b:02d}"
        (tmp / "images" / bp.batch).mkdir(parents=True)
        for w in range(wells):
            well = f"{chr(ord('A') + w // 12)}{w % 12 + 1:02d}"
            line = lines.iloc[(w + b) % len(lines)]
            pm_rows.append(
                {
                    "plate": plate,
                    "well": well,
                    "line": line.line,
                    "label": line.label,
                    "dose": _DOSES[w % len(_DOSES)],
                    "time": _TIMES[(w // len(_DOSES)) % 2],
                }
            )
            for f in range(fields):
                img, nuclei, cells = _render_fov(rng, fov_size, line, cells_per_fov)
                focal = int(rng.integers(n_z))
                for z in range(n_z):
                    dz = abs(z - focal)
                    sl = (
                        ndimage.gaussian_filter(img, (0, _DEFOCUS * dz, _DEFOCUS * dz))
                        if dz
                        else img
                    )
                    raw = _nuisance(rng, sl / (1 + 0.15 * dz), bp)
                    for c, name in enumerate(CHANNELS):
                        tifffile.imwrite(
                            tmp / "images" / bp.batch / f"{plate}_{well}_s{f}_{name}_z{z}.tif",
                            raw[c],
                        )
                fov_id = f"{bp.batch}_{plate}_{well}_{f}"
                tifffile.imwrite(tmp / "masks" / f"{fov_id}_nuclei.tif", nuclei)
                tifffile.imwrite(tmp / "masks" / f"{fov_id}_cells.tif", cells)
                edge = np.unique(np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]]))
                n = int(len(np.unique(cells)) - 1)
                truth_rows.append(
                    {
                        "fov_id": fov_id,
                        "batch": bp.batch,
                        "plate": plate,
                        "well": well,
                        "field": str(f),
                        "focal_z": focal,
                        "n_cells": n,
                        "n_interior": n - int((edge > 0).sum()),
                    }
                )
    pd.DataFrame(pm_rows).to_csv(tmp / "platemap.csv", index=False)
    truth = pd.DataFrame(truth_rows)
    truth.to_csv(tmp / "truth.csv", index=False)
    desc = {
        "generator": "raycell.data.synthetic_raw",
        "params": dict(
            seed=seed,
            n_batches=n_batches,
            n_lines=n_lines,
            wells=wells,
            fields=fields,
            fov_size=fov_size,
            cells_per_fov=cells_per_fov,
            n_z=n_z,
            batch_strength=batch_strength,
        ),
        "n_fovs": len(truth),
        "n_cells": int(truth.n_cells.sum()),
        "n_interior": int(truth.n_interior.sum()),
        "batches": batches.to_dict(orient="records"),
        # the settings `raycell ingest` needs for this folder (paths relative to it)
        "ingest": {
            "input": "images",
            "pattern": DEFAULT_PATTERN,
            "platemap": "platemap.csv",
            "channels": list(CHANNELS),
            "nucleus_channel": "nucleus",
            "cytoplasm_channel": "cytoplasm",
            "label_column": "label",
            "group_column": "line",
        },
    }
    atomic_write_json(tmp / "raw.json", desc)
    swap_in(tmp, out)
    return desc


def from_config(cfg, overwrite: bool = False) -> dict:
    """`raycell synth --raw`: raw fields of view into `cfg.synth.out`, from an ExperimentConfig."""
    s = cfg.synth
    return write_synthetic_raw(
        s.out,
        seed=cfg.seed,
        n_batches=s.n_batches,
        n_lines=s.n_lines,
        wells=s.raw_wells,
        fields=s.raw_fields,
        fov_size=s.raw_fov_size,
        cells_per_fov=s.raw_cells_per_fov,
        n_z=s.raw_z,
        batch_strength=s.batch_strength,
        overwrite=overwrite,
    )
