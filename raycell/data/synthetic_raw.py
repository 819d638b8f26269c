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
* with ``effects="varied"`` (the default; ``"basic"`` gives the easy images of before), each batch
  also draws its own mix of background texture, channel crosstalk, debris, gamma, strong
  vignetting and Poisson shot noise (`raycell.data.batch_effects`), and each of the last
  `n_unseen` batches (suggested for holding out) carries one of them stronger than any seen batch.

Layout of `out`::

    images/<batch>/<plate>_<well>_s<field>_<channel>_z<z>.tif  uint16, one per channel and slice
    masks/<fov_id>_nuclei.tif, masks/<fov_id>_cells.tif  true labels (cell k holds nucleus k)
    platemap.csv  plate, well, line, label, dose, time
    truth.csv     per field: in-focus slice, cell counts (varied: debris specks and blobs)
    raw.json      parameters, suggested_unseen, batch_effects, unseen_extremes + the ingest
                  settings to use

`fov_id` is what ingest derives from the default pattern `DEFAULT_PATTERN`:
``<batch>_<plate>_<well>_<field>``.

Random streams (why: any number of fields, written in chunks by any number of Ray tasks, with the
same bytes): lines and batches come from one Generator seeded by `seed`, the varied effects'
per-batch parameters from one seeded by ``(seed, 0xEFF)``; each field of view draws its cells, focal
plane and read noise from its own Generator seeded by ``(seed, batch, well, field)`` and its scene
effects (texture, debris, shot noise) from one seeded by ``(seed, 0xEFF, batch, well, field)``, so
the cells are the same with ``effects="basic"`` and ``"varied"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from raycell.data import batch_effects as be
from raycell.data.synthetic import CHANNELS, _batch_params, _line_params, auto_workers, run_chunks
from raycell.errors import ConfigError
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
CHUNK_FOVS = 16  # default fields of view per chunk (one task's work)
AUTO_RAY_FOVS = 2000  # num_workers=None: Ray tasks from this many fields of view on
_EFF_STREAM = 0xEFF  # the varied effects' random streams: (seed, 0xEFF[, batch, well, field])


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


def _nuisance(
    rng: np.random.Generator,
    img: np.ndarray,
    bp: pd.Series,
    eff: dict | None = None,
    eff_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Apply a batch's gain, illumination (gradient, vignetting), offset, blur, noise.

    With `eff` (the batch's varied effects, `raycell.data.batch_effects`) also a stronger
    vignetting, Poisson shot noise and a gamma response; their random draws come from `eff_rng`,
    so `rng` is consumed exactly as without them (the same cells and read noise in both modes).
    """
    _, h, w = img.shape
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    gy, gx = gy / h - 0.5, gx / w - 0.5
    illum = (1 + bp.grad_strength * (gy * np.sin(bp.grad_dir) + gx * np.cos(bp.grad_dir)) * 2) * (
        1 - 0.5 * bp.grad_strength * (gy**2 + gx**2) * 2
    )
    x = img * np.array([bp.gain_nuc, bp.gain_cyto], np.float32)[:, None, None]
    x = (x + bp.offset + 0.02) * illum[None]
    if eff and eff["vignetting"]["strength"] > 0:
        v = eff["vignetting"]
        x = be.vignetting(x, v["strength"], v["power"], tuple(v["centre"]))
    if bp.blur > 0.05:
        x = ndimage.gaussian_filter(x, sigma=(0, bp.blur, bp.blur))
    if eff and eff["shot_noise"]["strength"] > 0:
        x = be.shot_noise(eff_rng, x, eff["shot_noise"]["photons"])
    x += rng.normal(0, 1, x.shape).astype(np.float32) * (
        bp.noise * np.sqrt(np.clip(x, 0, None) + 0.05)
    )
    if eff and eff["gamma"]["strength"] > 0:
        x = be.gamma(x, eff["gamma"]["gamma"])
    return np.clip(np.rint(x * _SCALE), 0, 4095).astype(np.uint16)


def _scene_effects(rng: np.random.Generator, img: np.ndarray, eff: dict) -> tuple[np.ndarray, dict]:
    """Add a field's background texture and debris, then mix channels (crosstalk), before focus."""
    _, h, w = img.shape
    x = img.copy()
    counts = {"n_specks": 0, "n_blobs": 0}
    t = eff["texture"]
    if t["strength"] > 0:
        tex = be.background_texture(rng, (h, w), t["scale_px"], t["strength"])
        x += np.array(t["channel_weights"], np.float32)[:, None, None] * tex[None]
    d = eff["debris"]
    if d["strength"] > 0:
        deb, counts = be.debris(rng, (h, w), d["strength"])
        x += np.array(d["channel_weights"], np.float32)[:, None, None] * deb[None]
    if eff["crosstalk"]["strength"] > 0:
        x = be.crosstalk(x, np.array(eff["crosstalk"]["mix"]))
    return x, counts


def _well_name(w: int) -> str:
    return f"{chr(ord('A') + w // 12)}{w % 12 + 1:02d}"


@dataclass
class RawDesign:
    """The global draws of `synth --raw` (lines, batches, varied effects) and the field settings.

    Small and picklable: enough to render any field of view alone.
    """

    seed: int
    lines: pd.DataFrame
    batches: pd.DataFrame
    effs: dict
    wells: int
    fields: int
    fov_size: int
    cells_per_fov: int
    n_z: int

    def fov(self, i: int) -> tuple[int, int, int]:
        """(batch, well, field) of the i-th field of view (batch-major, as the files are listed)."""
        b, rest = divmod(i, self.wells * self.fields)
        return b, *divmod(rest, self.fields)

    @property
    def n_fovs(self) -> int:
        """Fields of view over all plates."""
        return len(self.batches) * self.wells * self.fields


def _write_fov(plan: RawDesign, tmp: Path, b: int, w: int, f: int) -> dict:
    """Render one field of view with its own Generators; write its TIFFs and masks; its truth."""
    import tifffile

    bp = plan.batches.iloc[b]
    plate, well = f"SYN{b:02d}", _well_name(w)
    line = plan.lines.iloc[(w + b) % len(plan.lines)]
    rng = np.random.default_rng([plan.seed, b, w, f])
    img, nuclei, cells = _render_fov(rng, plan.fov_size, line, plan.cells_per_fov)
    focal = int(rng.integers(plan.n_z))
    eff = plan.effs.get(bp.batch)
    eff_rng = np.random.default_rng([plan.seed, _EFF_STREAM, b, w, f])
    counts = {}
    if eff:
        img, counts = _scene_effects(eff_rng, img, eff)
    for z in range(plan.n_z):
        dz = abs(z - focal)
        sl = ndimage.gaussian_filter(img, (0, _DEFOCUS * dz, _DEFOCUS * dz)) if dz else img
        raw = _nuisance(rng, sl / (1 + 0.15 * dz), bp, eff, eff_rng)
        for c, name in enumerate(CHANNELS):
            name_z = f"{plate}_{well}_s{f}_{name}_z{z}.tif"
            tifffile.imwrite(tmp / "images" / bp.batch / name_z, raw[c])
    fov_id = f"{bp.batch}_{plate}_{well}_{f}"
    tifffile.imwrite(tmp / "masks" / f"{fov_id}_nuclei.tif", nuclei)
    tifffile.imwrite(tmp / "masks" / f"{fov_id}_cells.tif", cells)
    edge = np.unique(np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]]))
    n = int(len(np.unique(cells)) - 1)
    return {
        "fov_id": fov_id,
        "batch": bp.batch,
        "plate": plate,
        "well": well,
        "field": str(f),
        "focal_z": focal,
        "n_cells": n,
        "n_interior": n - int((edge > 0).sum()),
        **counts,
    }


def _write_fovs(plan: RawDesign, tmp: str, lo: int, hi: int) -> list[dict]:
    """Fields of view lo..hi-1 (one chunk); their truth rows in order."""
    return [_write_fov(plan, Path(tmp), *plan.fov(i)) for i in range(lo, hi)]


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
    effects: str = "varied",
    n_unseen: int | None = None,
    unseen_extreme: float = 2.5,
    chunk_fovs: int | None = None,
    num_workers: int | None = None,
    progress: bool = True,
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
        effects: "varied" (each batch its own mix of texture, crosstalk, debris, gamma,
            vignetting, shot noise on top of the basic effects; `raycell.data.batch_effects`) or
            "basic" (gain, offset, illumination, blur, noise only: the easy images of before). The
            cells, focal planes and read noise are the same in both for a seed.
        n_unseen: the last batches suggested for holding out (None = min(2, n_batches - 1)); with
            "varied" each carries one mechanism stronger than any seen batch has.
        unseen_extreme: that mechanism's strength over the strongest seen batch's.
        chunk_fovs: fields of view per chunk (None: `CHUNK_FOVS`); never changes the files.
        num_workers: Ray tasks writing chunks at once (0: this process; None: Ray from
            `AUTO_RAY_FOVS` fields on, one task per CPU); never changes the files.
        progress: a progress bar on stderr (when there is more than one chunk).

    Returns:
        The description written to `raw.json` (parameters, counts, the ingest settings to use).
    """
    if min(n_batches, n_lines, wells, fields, n_z, cells_per_fov) < 1 or fov_size < 32:
        raise ValueError("write_synthetic_raw: counts must be >= 1 and fov_size >= 32")
    if effects not in ("basic", "varied"):
        raise ValueError(f"write_synthetic_raw: effects must be basic or varied, not {effects!r}")
    if unseen_extreme <= 1:
        raise ValueError(f"write_synthetic_raw: unseen_extreme must be > 1, not {unseen_extreme}")
    n_unseen = min(2, n_batches - 1) if n_unseen is None else n_unseen
    if not 0 <= n_unseen < n_batches:
        raise ValueError(
            f"write_synthetic_raw: n_unseen must be in [0, {n_batches}) (n_batches), not {n_unseen}"
        )
    for key, v, lo in (("chunk_fovs", chunk_fovs, 1), ("num_workers", num_workers, 0)):
        bad = isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo
        if v is not None and bad:
            raise ConfigError(
                f"write_synthetic_raw: {key} must be a whole number >= {lo}, got {v!r}"
            )
    # OutputError is a FileExistsError: a user's folder is refused even with overwrite
    out = prepare_output(out, overwrite=overwrite, what="synth.out", kind=RAW)
    rng = np.random.default_rng(seed)
    lines = _line_params(rng, max(2, n_lines))
    batches = _batch_params(rng, n_batches, 0, batch_strength)
    # the unseen flag only labels batches here (the basic effects are drawn as for seen ones, so a
    # seed gives the same images as before the flag existed)
    batches["unseen"] = np.arange(n_batches) >= n_batches - n_unseen
    # varied effects draw from their own streams: the cells, focus and noise do not depend on them
    eff_rng = np.random.default_rng([seed, _EFF_STREAM])
    effs, extremes = {}, []
    if effects == "varied":
        effs, extremes = be.draw_batch_effects(
            eff_rng,
            list(batches.batch),
            list(batches.unseen),
            n_channels=len(CHANNELS),
            strength=batch_strength,
            unseen_extreme=unseen_extreme,
        )
    tmp = staging_dir(out, RAW)
    (tmp / "masks").mkdir()
    pm_rows = []
    for b, bp in batches.iterrows():
        (tmp / "images" / bp.batch).mkdir(parents=True)
        for w in range(wells):
            line = lines.iloc[(w + b) % len(lines)]
            pm_rows.append(
                {
                    "plate": f"SYN{b:02d}",
                    "well": _well_name(w),
                    "line": line.line,
                    "label": line.label,
                    "dose": _DOSES[w % len(_DOSES)],
                    "time": _TIMES[(w // len(_DOSES)) % 2],
                }
            )
    plan = RawDesign(seed, lines, batches, effs, wells, fields, fov_size, cells_per_fov, n_z)
    per = chunk_fovs or CHUNK_FOVS
    jobs = [(str(tmp), lo, min(lo + per, plan.n_fovs)) for lo in range(0, plan.n_fovs, per)]
    workers = (
        auto_workers(plan.n_fovs, AUTO_RAY_FOVS, len(jobs)) if num_workers is None else num_workers
    )
    truth_rows: list[dict] = []

    def gather(rows: list[dict]) -> int:
        truth_rows.extend(rows)
        return len(rows)

    run_chunks(
        _write_fovs,
        plan,
        jobs,
        workers,
        gather,
        total=plan.n_fovs,
        unit="field",
        desc="synth --raw",
        progress=progress,
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
            effects=effects,
            n_unseen=n_unseen,
            unseen_extreme=unseen_extreme,
        ),
        "n_fovs": len(truth),
        "n_cells": int(truth.n_cells.sum()),
        "n_interior": int(truth.n_interior.sum()),
        "batches": batches.to_dict(orient="records"),
        "suggested_unseen": batches.batch[batches.unseen].tolist(),
        # per batch and mechanism: strength (0 = off) and parameters (`raycell.data.batch_effects`)
        "batch_effects": effs,
        # each unseen batch's mechanism at a strength no seen batch has, with a one-line note
        "unseen_extremes": extremes,
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
        effects=s.effects,
        n_unseen=s.n_unseen,
        unseen_extreme=s.unseen_extreme,
        # 0 / -1 in the config: chosen by the writer (None)
        chunk_fovs=s.raw_chunk_fovs or None,
        num_workers=None if s.num_workers < 0 else s.num_workers,
    )
