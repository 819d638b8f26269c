"""The built-in synthetic data set: cell crops with a known phenotype and strong, confounded batch effects.

Generative model (a seed gives the same bytes every time; see "Random streams" below):

* **Cell lines** (`group`, `n_lines`): alternate lines carry phenotype label ``high`` / ``low``. Each line
  has its own look that is *unrelated* to the label: cell radius, elongation, nucleus/cell size ratio,
  stain intensities.
* **Phenotype** (the signal to learn, deliberately subtle and overlapping between classes): ``low`` cells
  have a more ruffled outline (larger amplitude of angular lobes on the cell boundary) and more
  cytoplasmic puncta (vesicle-like spots). Both are drawn per cell around a label-dependent mean, so no
  single cell is unambiguous; `phenotype_strength` scales the gap.
* **Imaging batches** (`batch`, `n_batches`), each with its own nuisance transform applied to every crop:
  per-channel gain and background offset, a linear illumination gradient across the field of view
  (direction and strength per batch, evaluated at each cell's position in its field), Gaussian blur
  (focus), and signal-dependent noise. `batch_strength` scales all of them.
* **Confounding**: each seen batch images `lines_per_batch` lines, with a majority label making up
  `confounding` of its cells, and batches whose majority is ``low`` are imaged brighter (higher gain).
  So in the seen data, brightness predicts the label: a shortcut.
* **Unseen batches** (the last `n_unseen`): balanced labels, with gains drawn without regard to the label
  and blur/noise drawn from a wider range; the shortcut does not hold there, so a model that learnt the
  batch look loses accuracy on them while one that learnt morphology does not.
* **Varied batch effects** (``effects="varied"``; ``"basic"``, the default, is the above only):
  each batch also draws its own mix of the mechanisms of `raycell.data.batch_effects` (background
  texture, channel crosstalk, debris, gamma, vignetting, shot noise) with `draw_batch_effects`, the
  same draw as ``synth --raw``, and each unseen batch carries one of them stronger than any seen
  batch. They are applied in the raw generator's physical order: texture, debris and crosstalk to
  the sample before the gain, vignetting with the illumination, shot noise before the read noise, gamma last.
  The field-scale ones are evaluated at the crop's place in its field of view (`_FIELD` px): each
  batch has one periodic texture field, each field of view sees it at its own random offset and a
  crop sees the window at its position there; vignetting is the field's falloff at the crop's
  pixels. Debris is drawn per crop at the raw generator's density (specks per 10^4 px).

Cells are rendered as two channels (``nucleus``, ``cytoplasm``) of `crop_size` pixels, centred on the cell,
as uint8. Wells group cells of one (line, batch); `raycell split` groups by well.

Random streams (why: a million cells must be generated in bounded memory, in any chunking, by any number
of processes, and give the same bytes): the cheap global draws (line and batch parameters, then which
line, batch, well and field each cell comes from, kept as compact integer arrays) come from one
`numpy.random.Generator` seeded by `seed`. Everything drawn per cell (shape, placement, puncta, the batch
transform's position and noise) comes from the cell's block of `BLOCK_CELLS` consecutive cells, with its
own Generator seeded by ``(seed, block index)``, so any block can be rendered alone. The varied
effects draw from their own streams (per batch ``(seed, 0xEFF)``; per block ``(seed, 0xEFF,
block)``; a field's texture offset ``(seed, 0xEFF, batch, line, well, field)``), so the cells, their
positions and the read noise are the same with ``"basic"`` and ``"varied"``, and ``"basic"`` gives
the bytes of before. `write_synthetic` writes shard k = cells
``[k * rows_per_shard, (k + 1) * rows_per_shard)`` in chunks of whole shards, in this process or as
Ray tasks that write their own shards (`write_blocks`); the output is byte-identical whatever the
chunk size or number of workers.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pandas as pd
from scipy import ndimage

from raycell import constants as K
from raycell.data import batch_effects as be
from raycell.errors import ConfigError
from raycell.formats.manifest import DatasetManifest
from raycell.formats.shards import ManifestBuilder, ShardError, write_shard_file
from raycell.utils.outputs import DATASET, check_space, prepare_output, staging_dir, swap_in

CHANNELS = ["nucleus", "cytoplasm"]
LABELS = ("high", "low")
_FIELD = 512.0  # size of the virtual field of view (px) used for the illumination gradient
BLOCK_CELLS = (
    1024  # cells per random block: fixed, so the bytes never depend on chunking or workers
)
CHUNK_CELLS = (
    16384  # default cells per chunk (rounded up to whole shards): bounds a writer's memory
)
AUTO_RAY_CELLS = 200_000  # num_workers=None: Ray tasks from this many cells on, in-process below
EFFECTS = ("basic", "varied")
_EFF_STREAM = 0xEFF  # the varied effects' random streams (as in raycell.data.synthetic_raw)


def _line_params(rng: np.random.Generator, n_lines: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "line": [f"line{i:02d}" for i in range(n_lines)],
            "label": [LABELS[i % 2] for i in range(n_lines)],
            "radius": rng.uniform(11.0, 15.0, n_lines),
            "elong": rng.uniform(1.0, 1.45, n_lines),
            "nuc_ratio": rng.uniform(0.38, 0.52, n_lines),
            "cyto_int": rng.uniform(0.32, 0.5, n_lines),
            "nuc_int": rng.uniform(0.55, 0.8, n_lines),
        }
    )


def _batch_params(
    rng: np.random.Generator,
    n_batches: int,
    n_unseen: int,
    strength: float,
    confounded: bool = True,
) -> pd.DataFrame:
    """Per-batch nuisance parameters, drawn in a fixed order so a seed gives the same batches.

    `confounded=False` gives every batch a gain drawn regardless of any label (designs such as
    time x dose, where the batch must not predict the condition).
    """
    n_seen = n_batches - n_unseen
    # Seen batches alternate their majority label; low-majority batches get the bright half of the gains.
    majority = [LABELS[(b + 1) % 2] if confounded else "" for b in range(n_seen)] + [""] * n_unseen
    gain_lo = np.where(np.array(majority) == "low", 1.0, 0.55)
    gain = np.where(
        np.array(majority) == "",
        rng.uniform(0.55, 1.45, n_batches),
        gain_lo + rng.uniform(0.0, 0.45, n_batches),
    )
    unseen = np.arange(n_batches) >= n_seen
    wide = np.where(unseen, 1.4, 1.0)  # unseen batches: a wider range of focus and noise
    s = strength
    return pd.DataFrame(
        {
            "batch": [f"batch{b:02d}" for b in range(n_batches)],
            "unseen": unseen,
            "majority": majority,
            # per-channel gain around the batch gain: channels drift apart a little between sessions
            "gain_nuc": 1 + s * (gain * rng.uniform(0.9, 1.1, n_batches) - 1),
            "gain_cyto": 1 + s * (gain * rng.uniform(0.9, 1.1, n_batches) - 1),
            "offset": s * rng.uniform(0.0, 0.12, n_batches),
            "grad_dir": rng.uniform(0, 2 * np.pi, n_batches),
            "grad_strength": s * rng.uniform(0.1, 0.6, n_batches),
            "blur": s * rng.uniform(0.0, 1.2, n_batches) * wide,
            "noise": s * rng.uniform(0.01, 0.05, n_batches) * wide,
        }
    )


def shuffle_order(rng: np.random.Generator, n: int) -> np.ndarray:
    """A shuffled row order, drawn as `DataFrame.sample(frac=1)` draws it, without a DataFrame.

    It takes `random_state=int(rng.integers(2**31))` as before the block-wise generator, so every cell's
    line, batch, well and field stay as they were for a seed.
    """
    return np.random.RandomState(int(rng.integers(2**31))).choice(n, n, replace=False)


def _allocate_cells(
    rng: np.random.Generator,
    lines: pd.DataFrame,
    batches: pd.DataFrame,
    n_cells: int,
    lines_per_batch: int,
    confounding: float,
    wells_per_line: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which line, batch, well and field each cell comes from, as compact integer arrays.

    In cell order; the well is 0..wells_per_line-1 within the line, the field 0..3.
    """
    parts = []  # (line, batch, well, fields) per (batch, line, well) with cells, in drawing order
    per_batch = np.full(len(batches), n_cells // len(batches))
    per_batch[: n_cells - per_batch.sum()] += 1
    by_label = {lab: lines.index[lines.label == lab].to_numpy() for lab in LABELS}
    k = max(2, min(lines_per_batch, len(lines)))
    for b, bp in batches.iterrows():
        maj = bp.majority or None
        n_min = max(1, k // 2) if maj is None else max(1, k // 4)
        minority = LABELS[0] if maj == "low" else LABELS[1]
        major = maj or LABELS[0]
        chosen = {
            major: rng.choice(by_label[major], min(k - n_min, len(by_label[major])), replace=False),
            minority: rng.choice(
                by_label[minority], min(n_min, len(by_label[minority])), replace=False
            ),
        }
        frac = {major: confounding if maj else 0.5, minority: 1 - confounding if maj else 0.5}
        for lab, line_ids in chosen.items():
            n_lab = (
                int(round(per_batch[b] * frac[lab]))
                if lab == major
                else per_batch[b] - int(round(per_batch[b] * frac[major]))
            )
            counts = rng.multinomial(n_lab, np.full(len(line_ids), 1 / len(line_ids)))
            for li, n in zip(line_ids, counts):
                per_well = np.bincount(rng.integers(0, wells_per_line, n), minlength=wells_per_line)
                for w, m in enumerate(per_well):
                    if m:
                        parts.append((li, b, w, rng.integers(0, 4, int(m))))
    sizes = [len(p[3]) for p in parts]
    line_idx = np.repeat(np.array([p[0] for p in parts], np.int32), sizes)
    batch_idx = np.repeat(np.array([p[1] for p in parts], np.int32), sizes)
    well = np.repeat(np.array([p[2] for p in parts], np.int32), sizes)
    field = np.concatenate([p[3] for p in parts]).astype(np.int8)
    order = shuffle_order(rng, len(line_idx))
    return line_idx[order], batch_idx[order], well[order], field[order]


def _render(
    rng: np.random.Generator, line_idx: np.ndarray, lines: pd.DataFrame, size: int, pheno: float
) -> tuple[np.ndarray, pd.DataFrame]:
    """Noise-free cell images (N, 2, size, size) in [0, 1] plus the per-cell ground-truth parameters."""
    n = len(line_idx)
    sc = size / 64.0
    lp = lines.iloc[line_idx].reset_index(drop=True)
    is_low = (lp.label == "low").to_numpy()
    # per-cell shape: line look x cell-to-cell variation; the label moves the lobe amplitude and puncta
    radius = lp.radius.to_numpy() * sc * rng.normal(1.0, 0.08, n)
    elong = lp.elong.to_numpy() * rng.normal(1.0, 0.06, n)
    lobe_amp = np.clip(rng.normal(0.07 + 0.05 * pheno * is_low, 0.035, n), 0.0, 0.35)
    n_puncta = rng.poisson(3.0 + 3.0 * pheno * is_low)
    lobes = rng.integers(3, 7, n)
    truth = pd.DataFrame(
        {"true_radius": radius, "true_lobe_amp": lobe_amp, "true_puncta": n_puncta}
    )
    out = _draw_cells(
        rng,
        size,
        radius,
        elong,
        lobe_amp,
        n_puncta,
        lobes,
        lp.nuc_ratio.to_numpy(),
        lp.cyto_int.to_numpy(),
        lp.nuc_int.to_numpy(),
    )
    return out, truth


def _draw_cells(
    rng: np.random.Generator,
    size: int,
    radius: np.ndarray,
    elong: np.ndarray,
    lobe_amp: np.ndarray,
    n_puncta: np.ndarray,
    lobes: np.ndarray,
    nuc_ratio: np.ndarray,
    cyto_int: np.ndarray,
    nuc_int: np.ndarray,
    nuc_tex: np.ndarray | None = None,
) -> np.ndarray:
    """Noise-free (N, 2, size, size) images in [0, 1] from per-cell shape and stain parameters.

    Shared by every crop generator, so a new design only chooses the parameters. `nuc_tex` is the
    per-cell amplitude of the nuclear texture (None: 1.5 for every cell).
    """
    n = len(radius)
    sc = size / 64.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    out = np.empty((n, 2, size, size), np.float32)
    maxp = 14
    for s in range(0, n, 512):
        e = min(n, s + 512)
        m = e - s
        cy, cx = rng.normal(0, 1.0 * sc, (2, m, 1, 1))
        phi = rng.uniform(0, 2 * np.pi, (m, 1, 1))
        dy, dx = yy[None] - cy, xx[None] - cx
        u = dx * np.cos(phi) + dy * np.sin(phi)
        v = -dx * np.sin(phi) + dy * np.cos(phi)
        el = np.sqrt(elong[s:e, None, None])
        rho = np.sqrt((u / el) ** 2 + (v * el) ** 2)
        theta = np.arctan2(v, u)
        psi = rng.uniform(0, 2 * np.pi, (m, 1, 1))
        bound = radius[s:e, None, None] * (
            1
            + lobe_amp[s:e, None, None] * np.sin(lobes[s:e, None, None] * theta + psi)
            + 0.03 * np.sin(2 * theta + 2 * psi)
        )
        cell = 1 / (1 + np.exp(-(bound - rho) / 0.8))
        # nucleus: a smaller, rounder ellipse, slightly off centre
        nr = radius[s:e, None, None] * nuc_ratio[s:e, None, None]
        ncy, ncx = rng.normal(0, 1.5 * sc, (2, m, 1, 1))
        nrho = np.sqrt(((dx - ncx) / 1.08) ** 2 + ((dy - ncy) * 1.08) ** 2)
        nuc = 1 / (1 + np.exp(-(nr - nrho) / 0.7))
        # smooth texture: a few random plane waves
        tex = np.zeros((m, size, size), np.float32)
        for _ in range(3):
            f = rng.uniform(0.15, 0.45, (m, 1, 1)) / sc
            a = rng.uniform(0, 2 * np.pi, (m, 1, 1))
            tex += np.sin(
                f * (dx * np.cos(a) + dy * np.sin(a)) + rng.uniform(0, 2 * np.pi, (m, 1, 1))
            )
        tex *= 0.06
        # puncta inside the cytoplasm (count carries the phenotype)
        pr = radius[s:e, None] * np.sqrt(rng.uniform(0.15, 0.65, (m, maxp)))
        pa = rng.uniform(0, 2 * np.pi, (m, maxp))
        py, px = cy[:, :, 0] + pr * np.sin(pa), cx[:, :, 0] + pr * np.cos(pa)
        present = np.arange(maxp)[None] < n_puncta[s:e, None]
        spots = np.zeros((m, size, size), np.float32)
        sig2 = 2 * (1.1 * sc) ** 2
        for p in range(maxp):
            if not present[:, p].any():
                continue
            d2 = (yy[None] - py[:, p, None, None]) ** 2 + (xx[None] - px[:, p, None, None]) ** 2
            spots += present[:, p, None, None] * np.exp(-d2 / sig2)
        cyto_i = cyto_int[s:e, None, None]
        nuc_i = nuc_int[s:e, None, None]
        out[s:e, 1] = cyto_i * cell * (1 + tex) * (1 - 0.45 * nuc) + 0.35 * spots * cell
        ntex = 1.5 if nuc_tex is None else nuc_tex[s:e, None, None].astype(np.float32)
        out[s:e, 0] = nuc_i * nuc * (1 + ntex * tex)
    return out


@dataclass
class CropEffects:
    """The varied batch effects of a crop design: small draws plus one periodic texture per batch.

    Attributes:
        seed: the data set's seed (the per-block and per-field streams derive from it).
        per_batch: per batch name {mechanism: params with "strength"} (`draw_batch_effects`).
        extremes: the unseen batches' out-of-range mechanisms (`draw_batch_effects`).
        textures: batch index -> its (`_FIELD`, `_FIELD`) periodic background texture (only batches
            with texture on).
    """

    seed: int
    per_batch: dict
    extremes: list
    textures: dict


def effects_params(kw: dict) -> dict:
    """A writer's generator arguments as the manifest records them: with basic effects (the default)
    without `effects` / `unseen_extreme`, so the manifest is as before they existed; with varied ones
    `unseen_extreme` always (it sets the unseen batches' extremes).
    """
    kw = dict(kw)
    if kw.get("effects", "basic") == "basic":
        kw.pop("effects", None)
        kw.pop("unseen_extreme", None)
    else:
        kw.setdefault("unseen_extreme", 2.5)
    return kw


def pop_varied(gt: dict) -> dict:
    """The varied effects taken out of a ground truth, for the top of the manifest (as raw.json)."""
    return {k: gt.pop(k) for k in ("batch_effects", "unseen_extremes") if k in gt}


def check_effects(effects: str, unseen_extreme: float) -> None:
    """One-line errors for the varied-effects arguments, before anything is drawn or written."""
    if effects not in EFFECTS:
        raise ConfigError(f"synth.effects must be one of {', '.join(EFFECTS)}, got {effects!r}")
    if (
        isinstance(unseen_extreme, bool)
        or not isinstance(unseen_extreme, (int, float))
        or not unseen_extreme > 1
    ):
        raise ConfigError(f"synth.unseen_extreme must be a number > 1, got {unseen_extreme!r}")


def crop_effects(
    seed: int,
    batches: pd.DataFrame,
    strength: float,
    unseen_extreme: float,
    crop_size: int,
    n_channels: int = 2,
) -> CropEffects:
    """Draw each batch's varied effects (stream ``(seed, 0xEFF)``) and its periodic texture field.

    The texture's scale (`scale_px`, drawn for 64 px crops as for raw fields) follows the cells,
    which the crop generator scales with `crop_size` / 64.
    """
    rng = np.random.default_rng([seed, _EFF_STREAM])
    per_batch, extremes = be.draw_batch_effects(
        rng,
        list(batches.batch),
        list(batches.unseen),
        n_channels=n_channels,
        strength=strength,
        unseen_extreme=unseen_extreme,
    )
    textures = {}
    field = int(_FIELD)
    for b, name in enumerate(batches.batch):
        t = per_batch[name]["texture"]
        if t["strength"] > 0:
            scale = t["scale_px"] * crop_size / 64.0
            textures[b] = be.background_texture(rng, (field, field), scale, t["strength"])
    return CropEffects(seed, per_batch, extremes, textures)


def _field_offsets(seed: int, b: int, fields: np.ndarray) -> np.ndarray:
    """(N, 2) offsets into a batch's periodic texture, one per field of view (rows of `fields`).

    From a stream per field, ``(seed, 0xEFF, batch, *field key)``, so every crop of a field, in any
    block, sees the same texture field.
    """
    keys, inv = np.unique(fields, axis=0, return_inverse=True)
    offs = np.array(
        [
            np.random.default_rng([seed, _EFF_STREAM, b, *map(int, k)]).integers(0, int(_FIELD), 2)
            for k in keys
        ],
        np.int64,
    )
    return offs[np.asarray(inv).reshape(-1)]


def _scene_effects(
    rng: np.random.Generator,
    x: np.ndarray,
    eff: dict,
    texture: np.ndarray | None,
    top: np.ndarray,
    left: np.ndarray,
) -> np.ndarray:
    """Add texture and debris to a batch's noise-free crops, then mix channels (crosstalk)."""
    n, c, size, _ = x.shape
    if texture is not None:
        w = np.array(eff["texture"]["channel_weights"], np.float32)[None, :, None, None]
        x = x + w * be.texture_windows(texture, top, left, size)[:, None]
    d = eff["debris"]
    if d["strength"] > 0:
        w = np.array(d["channel_weights"], np.float32)[:, None, None]
        x = x + np.stack(
            [w * be.debris(rng, (size, size), d["strength"])[0][None] for _ in range(n)]
        )
    if eff["crosstalk"]["strength"] > 0:
        x = np.einsum("ck,nkhw->nchw", np.array(eff["crosstalk"]["mix"], np.float32), x)
    return x.astype(np.float32, copy=False)


def _apply_batch(
    rng: np.random.Generator,
    img: np.ndarray,
    batch_idx: np.ndarray,
    batches: pd.DataFrame,
    effects: CropEffects | None = None,
    block: int = 0,
    fields: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply each cell's batch transform in place and quantise to uint8.

    With `effects` also each batch's varied effects (see the module docstring); their draws come
    from the block's own stream ``(seed, 0xEFF, block)``, so `rng` is consumed exactly as without
    them. `fields` (N, k) int keys name each cell's field of view within its batch (the texture
    offset; None: one field per batch).

    Returns the uint8 crops and each cell's centre in its field, (N, 2) float32.
    """
    n, _, size, _ = img.shape
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    pos = rng.uniform(size, _FIELD - size, (n, 2)).astype(np.float32)  # cell centre in its field
    eff_rng = None if effects is None else np.random.default_rng([effects.seed, _EFF_STREAM, block])
    for b, bp in batches.iterrows():
        idx = np.flatnonzero(batch_idx == b)
        if idx.size == 0:
            continue
        x = img[idx]
        eff = None if effects is None else effects.per_batch[bp.batch]
        if eff is not None:
            top = left = texture = None
            if eff["texture"]["strength"] > 0 and b in effects.textures:
                texture = effects.textures[b]
                key = np.zeros((idx.size, 1), np.int64) if fields is None else fields[idx]
                off = _field_offsets(effects.seed, b, key)
                # the crop's top-left corner in its field
                corner = np.rint(pos[idx] - size / 2).astype(np.int64)
                top, left = off[:, 0] + corner[:, 0], off[:, 1] + corner[:, 1]
            x = _scene_effects(eff_rng, x, eff, texture, top, left)
        gy = (pos[idx, 0, None, None] + yy[None]) / _FIELD - 0.5
        gx = (pos[idx, 1, None, None] + xx[None]) / _FIELD - 0.5
        illum = 1 + bp.grad_strength * (gy * np.sin(bp.grad_dir) + gx * np.cos(bp.grad_dir)) * 2
        x *= np.array([bp.gain_nuc, bp.gain_cyto], np.float32)[None, :, None, None]
        x *= illum[:, None]
        x += bp.offset * illum[:, None]
        if eff is not None and eff["vignetting"]["strength"] > 0:
            v = eff["vignetting"]
            fall = be.vignetting_falloff(
                pos[idx, 0, None, None] + yy[None],
                pos[idx, 1, None, None] + xx[None],
                (int(_FIELD),) * 2,
                v["strength"],
                v["power"],
                tuple(v["centre"]),
            )
            x *= fall[:, None].astype(np.float32)
        if bp.blur > 0.05:
            x = ndimage.gaussian_filter(x, sigma=(0, 0, bp.blur, bp.blur))
        if eff is not None and eff["shot_noise"]["strength"] > 0:
            x = be.shot_noise(eff_rng, x, eff["shot_noise"]["photons"])
        x += rng.normal(0, 1, x.shape).astype(np.float32) * (
            bp.noise * np.sqrt(np.clip(x, 0, None) + 0.05)
        )
        if eff is not None and eff["gamma"]["strength"] > 0:
            x = be.gamma(x, eff["gamma"]["gamma"])
        img[idx] = x
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), pos


class BlockDesign(Protocol):
    """What the chunked writer needs from a design: its size and one block of cells rendered alone."""

    n_cells: int

    def render_block(self, block: int) -> tuple[np.ndarray, pd.DataFrame]:
        """Cells [block * BLOCK_CELLS, ...): uint8 crops and their shard metadata."""
        ...


def block_cells(seed: int, block: int, n_cells: int) -> tuple[int, int, np.random.Generator]:
    """Block `block`'s cells [lo, hi) and its own Generator (seed, block): a block renders alone."""
    lo, hi = block * BLOCK_CELLS, min(n_cells, (block + 1) * BLOCK_CELLS)
    return lo, hi, np.random.default_rng([seed, block])


@dataclass
class CropDesign:
    """The global draws of the phenotype design: small, picklable, enough to render any block."""

    seed: int
    crop_size: int
    phenotype_strength: float
    wells_per_line: int
    lines: pd.DataFrame
    batches: pd.DataFrame
    line_idx: np.ndarray
    batch_idx: np.ndarray
    well: np.ndarray
    field: np.ndarray
    effects: CropEffects | None = None  # effects="varied": the batches' varied effects

    @property
    def n_cells(self) -> int:
        """Number of cells in the data set."""
        return len(self.line_idx)

    def render_block(self, block: int) -> tuple[np.ndarray, pd.DataFrame]:
        """Render, batch-transform and quantise one block with its own Generator (seed, block)."""
        lo, hi, rng = block_cells(self.seed, block, self.n_cells)
        li, bi = self.line_idx[lo:hi], self.batch_idx[lo:hi]
        img, truth = _render(rng, li, self.lines, self.crop_size, self.phenotype_strength)
        fields = np.stack([li, self.well[lo:hi], self.field[lo:hi]], axis=1)
        img, pos = _apply_batch(rng, img, bi, self.batches, self.effects, block, fields)
        wpl = self.wells_per_line
        well_names = np.array(
            [
                [f"{chr(ord('A') + li_ % 16)}{w + 1 + wpl * (li_ // 16):02d}" for w in range(wpl)]
                for li_ in range(len(self.lines))
            ],
            dtype=object,
        )
        batch = self.batches.batch.to_numpy(object)[bi]
        meta = pd.DataFrame(
            {
                K.CELL_ID: [f"synth-{i:07d}" for i in range(lo, hi)],
                K.BATCH: batch,
                K.PLATE: [f"plate-{b}" for b in batch],
                K.WELL: well_names[li, self.well[lo:hi]],
                K.FIELD: np.array(["0", "1", "2", "3"], dtype=object)[self.field[lo:hi]],
                K.GROUP: self.lines.line.to_numpy(object)[li],
                K.LABEL: self.lines.label.to_numpy(object)[li],
                K.SPLIT: K.UNASSIGNED,
                K.SOURCE: "synthetic",
                K.CENTROID_Y: pos[:, 0],
                K.CENTROID_X: pos[:, 1],
            }
        )
        return img, pd.concat([meta, truth], axis=1)


def render_cells(plan: BlockDesign, lo: int, hi: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Cells [lo, hi) of a plan: renders the blocks they overlap and cuts them out (index 0..)."""
    b0, b1 = lo // BLOCK_CELLS, (hi - 1) // BLOCK_CELLS + 1
    blocks = [plan.render_block(b) for b in range(b0, b1)]
    img = blocks[0][0] if len(blocks) == 1 else np.concatenate([b[0] for b in blocks])
    meta = (
        blocks[0][1] if len(blocks) == 1 else pd.concat([b[1] for b in blocks], ignore_index=True)
    )
    s, e = lo - b0 * BLOCK_CELLS, hi - b0 * BLOCK_CELLS
    if s == 0 and e == len(img):
        return img, meta
    return img[s:e].copy(), meta.iloc[s:e].reset_index(drop=True)


def synth_plan(
    n_cells: int = 6000,
    crop_size: int = 64,
    n_lines: int = 8,
    n_batches: int = 8,
    n_unseen: int = 2,
    lines_per_batch: int = 4,
    wells_per_line: int = 6,
    confounding: float = 0.75,
    batch_strength: float = 1.0,
    phenotype_strength: float = 1.0,
    seed: int = 0,
    effects: str = "basic",
    unseen_extreme: float = 2.5,
) -> tuple[CropDesign, dict]:
    """The global draws (lines, batches, every cell's line/batch/well/field) and the ground truth.

    With ``effects="varied"`` the ground truth also holds ``batch_effects`` (per batch and
    mechanism) and ``unseen_extremes`` (each unseen batch's out-of-range mechanism), as
    ``raw.json`` does.
    """
    check_effects(effects, unseen_extreme)
    if n_lines < 2:
        raise ValueError(
            f"synth needs at least 2 cell lines (one per label), got n_lines={n_lines}"
        )
    if not 0 <= n_unseen < n_batches:
        raise ValueError(f"synth n_unseen must be in [0, n_batches), got {n_unseen} of {n_batches}")
    if n_cells < 1:
        raise ConfigError(f"synth.n_cells must be >= 1, got {n_cells}")
    rng = np.random.default_rng(seed)
    lines = _line_params(rng, n_lines)
    batches = _batch_params(rng, n_batches, n_unseen, batch_strength)
    alloc = _allocate_cells(
        rng, lines, batches, n_cells, lines_per_batch, confounding, wells_per_line
    )
    # varied effects draw from their own streams: the cells and their allocation do not depend on
    # them
    eff = (
        crop_effects(seed, batches, batch_strength, unseen_extreme, crop_size, len(CHANNELS))
        if effects == "varied"
        else None
    )
    plan = CropDesign(
        seed, crop_size, phenotype_strength, wells_per_line, lines, batches, *alloc, eff
    )
    gt = {
        "lines": lines.to_dict(orient="records"),
        "batches": batches.to_dict(orient="records"),
        "unseen_batches": batches.batch[batches.unseen].tolist(),
    }
    if eff is not None:
        gt.update(batch_effects=eff.per_batch, unseen_extremes=eff.extremes)
    return plan, gt


def generate(**params) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Generate crops in memory: (N, 2, S, S) uint8 images, per-cell metadata, and the ground truth.

    The metadata has the crop-shard columns (cell_id, batch, plate, well, field, group, label, split='')
    plus `true_*` columns with each cell's generative parameters. Holds every crop: for large data sets
    use `write_synthetic`, which renders and writes in chunks.

    `effects`: "basic" (gain, offset, illumination gradient, blur, noise per batch; the default) or
    "varied" (also each batch's own mix of texture, crosstalk, debris, gamma, vignetting
    and shot noise; each unseen batch one mechanism at `unseen_extreme` x the strongest seen
    batch's).
    The cells and their metadata are the same in both for a seed.

    Args:
        **params: `synth_plan`'s arguments.
    """
    return render_design(*synth_plan(**params))


def render_design(plan: BlockDesign, gt: dict) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """A design's every cell in memory: (images, metadata, ground truth), from its plan and truth."""
    img, meta = render_cells(plan, 0, plan.n_cells)
    return img, meta, gt


def _whole(key: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"synth.{key} must be a whole number >= {lo}, got {value!r}")


def check_chunking(rows_per_shard: int, chunk_cells: int | None, num_workers: int | None) -> None:
    """One-line errors for the writer's chunking arguments, before anything is drawn or written."""
    _whole("rows_per_shard", rows_per_shard, 1)
    if chunk_cells is not None:
        _whole("chunk_cells", chunk_cells, 1)
    if num_workers is not None:
        _whole("num_workers", num_workers, 0)


def _write_chunk(plan: BlockDesign, out: str, k0: int, k1: int, rows_per_shard: int) -> list[dict]:
    """Render shards k0..k1-1 and write each with `write_shard_file`; returns their part records."""
    lo, hi = k0 * rows_per_shard, min(plan.n_cells, k1 * rows_per_shard)
    img, meta = render_cells(plan, lo, hi)
    parts = []
    for k in range(k0, k1):
        s, e = k * rows_per_shard - lo, min(hi, (k + 1) * rows_per_shard) - lo
        parts.append(
            write_shard_file(
                out, f"part-{k:05d}.parquet", img[s:e], meta.iloc[s:e].reset_index(drop=True)
            )
        )
    return parts


def auto_workers(size: int, threshold: int, n_chunks: int) -> int:
    """How many Ray tasks `num_workers=None` means: 0 (in this process) below `threshold`.

    Starting Ray costs seconds and a small data set is written in about as many. From `threshold`
    (cells, or fields of view) on: one task per CPU of the running Ray, or of this machine when Ray is
    not running yet.
    """
    if size < threshold or n_chunks < 2:
        return 0
    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1


def write_blocks(
    tmp: Path,
    plan: BlockDesign,
    channel_names: list[str],
    rows_per_shard: int,
    chunk_cells: int | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "synth",
) -> ManifestBuilder:
    """Write a plan's cells as shards into the staging folder `tmp`, in chunks of whole shards.

    Shard k always holds cells [k * rows_per_shard, (k + 1) * rows_per_shard). With `num_workers` > 0
    the chunks are Ray tasks (num_cpus=1, at most `num_workers` in flight) that write their own shards
    and return only part records; otherwise they run here one after another. Either way the records
    are added to one `ManifestBuilder` in shard order, so the bytes never depend on the chunking.

    Args:
        tmp: staging folder (from `staging_dir`); must be reachable by the tasks (a shared file system on
            a multi-node cluster).
        plan: the design's global draws (`CropDesign`, `raycell.data.synthetic_timedose.TimedoseDesign`).
        channel_names: the crops' channel names.
        rows_per_shard: cells per shard.
        chunk_cells: cells per chunk, rounded up to whole shards (None: `CHUNK_CELLS`); bounds the
            memory of each writer.
        num_workers: Ray tasks in flight (0: this process; None: `auto_workers` from
            `AUTO_RAY_CELLS` cells on). Ray is started with `raycell.utils.ray_utils.init_ray` (and
            stopped again) when it is not running.
        progress: a progress bar on stderr (when there is more than one chunk).
        desc: the progress bar's label.

    Returns:
        The manifest builder holding every shard; the caller writes the manifest.
    """
    check_chunking(rows_per_shard, chunk_cells, num_workers)
    n = plan.n_cells
    n_shards = -(-n // rows_per_shard)
    per_chunk = max(1, -(-(chunk_cells or CHUNK_CELLS) // rows_per_shard))
    jobs = [
        (str(tmp), k, min(k + per_chunk, n_shards), rows_per_shard)
        for k in range(0, n_shards, per_chunk)
    ]
    workers = auto_workers(n, AUTO_RAY_CELLS, len(jobs)) if num_workers is None else num_workers
    (tmp / K.SHARD_DIR).mkdir(exist_ok=True)
    builder = ManifestBuilder(tmp, channel_names)

    def add(parts: list[dict]) -> int:
        for p in parts:
            builder.add(p)
        return sum(p["rows"] for p in parts)

    run_chunks(
        _write_chunk, plan, jobs, workers, add, total=n, unit="cell", desc=desc, progress=progress
    )
    return builder


def run_chunks(
    fn: Callable,
    plan,
    jobs: list[tuple],
    workers: int,
    on_result: Callable[..., int],
    total: int,
    unit: str = "cell",
    desc: str = "synth",
    progress: bool = True,
) -> None:
    """Run ``fn(plan, *job)`` for every job, handing each result to `on_result` in job order.

    In this process (`workers` 0) or as Ray tasks (num_cpus=1, at most `workers` in flight).

    `on_result` returns how many units the job did, for the progress bar on stderr (shown when there
    is more than one job). Ray is started with `raycell.utils.ray_utils.init_ray` when it is not
    running, and stopped again afterwards.
    """
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        mininterval=1.0,
        disable=not progress or len(jobs) < 2,
    )
    try:
        if workers == 0:
            for job in jobs:
                bar.update(on_result(fn(plan, *job)))
        else:
            _run_ray(fn, plan, jobs, min(workers, len(jobs)), lambda r: bar.update(on_result(r)))
    finally:
        bar.close()


def _run_ray(fn: Callable, plan, jobs: list[tuple], workers: int, on_result: Callable) -> None:
    import ray

    started = not ray.is_initialized()
    if started:
        from raycell.utils.ray_utils import init_ray

        init_ray(progress=False)
    try:
        task = ray.remote(num_cpus=1)(fn)
        plan_ref = ray.put(plan)  # once, not once per task
        pending: dict = {}  # ObjectRef -> job number
        done: dict[int, object] = {}
        nxt = 0

        def collect() -> None:
            nonlocal nxt
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                done[pending.pop(r)] = ray.get(r)
            while nxt in done:  # in job order: shards and rows are listed as numbered
                on_result(done.pop(nxt))
                nxt += 1

        for i, job in enumerate(jobs):
            while len(pending) >= workers:
                collect()
            pending[task.remote(plan_ref, *job)] = i
        while pending:
            collect()
    finally:
        if started:
            ray.shutdown()


def write_synthetic(
    out: str,
    n_cells: int = 6000,
    crop_size: int = 64,
    rows_per_shard: int = 1000,
    overwrite: bool = False,
    seed: int = 0,
    chunk_cells: int | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    **kw,
) -> DatasetManifest:
    """Generate the synthetic data set and write it as crop shards, in chunks; returns the manifest.

    `out` must be new, empty or (with `overwrite`) a raycell data set; the data set is built beside it and
    swapped in when complete, so a failed run leaves an earlier one whole (`raycell.utils.outputs`).
    Memory is bounded by the chunk (`chunk_cells`), not `n_cells`; the bytes depend only on the
    generator's arguments and `rows_per_shard`, never on `chunk_cells` or `num_workers` (`write_blocks`).
    """
    return write_design(
        out,
        synth_plan,
        dict(n_cells=n_cells, crop_size=crop_size, seed=seed, **kw),
        generator="raycell.data.synthetic",
        rows_per_shard=rows_per_shard,
        overwrite=overwrite,
        chunk_cells=chunk_cells,
        num_workers=num_workers,
        progress=progress,
        # uint8 crops; the shards measured 0.77 of the raw bytes, so half is a safe lower bound
        min_bytes=n_cells * len(CHANNELS) * crop_size**2 // 2,
    )


def write_design(
    out: str,
    design: Callable[..., tuple[BlockDesign, dict]],
    params: dict,
    generator: str,
    rows_per_shard: int,
    overwrite: bool,
    chunk_cells: int | None,
    num_workers: int | None,
    progress: bool,
    desc: str = "synth",
    min_bytes: int = 0,
    normalised: tuple[str, ...] = (),
    extra: dict | None = None,
) -> dict:
    """Draw a crop design's plan and write its cells as a data set at `out`; returns the manifest.

    What `write_synthetic` and `raycell.data.synthetic_timedose.write_timedose` share: arguments checked
    before anything is written, the data set built beside `out` and swapped in when complete, the cells
    written by `write_blocks`, and the manifest recording the generator, its arguments and the ground
    truth (the varied effects at its top, as `raw.json` has them).

    Args:
        out: the data set folder (new, empty, or with `overwrite` a raycell data set).
        design: the plan function (`synth_plan`, `timedose_plan`): params -> (plan, ground truth).
        params: its arguments, as the manifest records them (after `effects_params`).
        generator: the generator's module name, recorded in the manifest.
        rows_per_shard: cells per shard.
        overwrite: replace a raycell data set at `out`.
        chunk_cells: cells per chunk (`write_blocks`).
        num_workers: Ray tasks in flight (`write_blocks`).
        progress: a progress bar on stderr.
        desc: the progress bar's label.
        min_bytes: free space `out` needs (0: not checked).
        normalised: parameters recorded as the design normalised them (their ground-truth values).
        extra: further manifest keys, after the ground truth.
    """
    check_chunking(rows_per_shard, chunk_cells, num_workers)
    check_effects(params.get("effects", "basic"), params.get("unseen_extreme", 2.5))
    params = effects_params(params)
    path = prepare_output(
        out, overwrite=overwrite, what="synth.out", kind=DATASET, error=ShardError
    )
    if min_bytes:
        check_space(path, min_bytes, "synth.out", ShardError)
    plan, gt = design(**params)
    params.update({k: gt[k] for k in normalised})
    tmp = staging_dir(path, DATASET)
    builder = write_blocks(
        tmp, plan, CHANNELS, rows_per_shard, chunk_cells, num_workers, progress, desc
    )
    m = builder.write(
        params={"generator": generator, **params},
        extra={
            "suggested_unseen": gt["unseen_batches"],
            "ground_truth": gt,
            **pop_varied(gt),
            **(extra or {}),
        },
    )
    swap_in(tmp, path)
    return m
