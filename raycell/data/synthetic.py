"""The built-in synthetic data set: cell crops with a known phenotype and strong, confounded batch effects.

Generative model (all draws from one `numpy.random.Generator` seeded by `seed`, so a seed gives the same
bytes every time):

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

Cells are rendered as two channels (``nucleus``, ``cytoplasm``) of `crop_size` pixels, centred on the cell,
as uint8. Wells group cells of one (line, batch); `raycell split` groups by well.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from raycell import constants as K
from raycell.formats.shards import ShardError, ShardWriter
from raycell.utils.outputs import DATASET, prepare_output, staging_dir, swap_in

CHANNELS = ["nucleus", "cytoplasm"]
LABELS = ("high", "low")
_FIELD = 512.0  # size of the virtual field of view (px) used for the illumination gradient


def _line_params(rng: np.random.Generator, n_lines: int) -> pd.DataFrame:
    return pd.DataFrame({
        "line": [f"line{i:02d}" for i in range(n_lines)],
        "label": [LABELS[i % 2] for i in range(n_lines)],
        "radius": rng.uniform(11.0, 15.0, n_lines),
        "elong": rng.uniform(1.0, 1.45, n_lines),
        "nuc_ratio": rng.uniform(0.38, 0.52, n_lines),
        "cyto_int": rng.uniform(0.32, 0.5, n_lines),
        "nuc_int": rng.uniform(0.55, 0.8, n_lines),
    })


def _batch_params(rng: np.random.Generator, n_batches: int, n_unseen: int, strength: float,
                  confounded: bool = True) -> pd.DataFrame:
    """Per-batch nuisance parameters, drawn in a fixed order so a seed gives the same batches.

    `confounded=False` gives every batch a gain drawn regardless of any label (designs such as
    time x dose, where the batch must not predict the condition).
    """
    n_seen = n_batches - n_unseen
    # Seen batches alternate their majority label; low-majority batches get the bright half of the gains.
    majority = [LABELS[(b + 1) % 2] if confounded else "" for b in range(n_seen)] + [""] * n_unseen
    gain_lo = np.where(np.array(majority) == "low", 1.0, 0.55)
    gain = np.where(np.array(majority) == "", rng.uniform(0.55, 1.45, n_batches),
                    gain_lo + rng.uniform(0.0, 0.45, n_batches))
    unseen = np.arange(n_batches) >= n_seen
    wide = np.where(unseen, 1.4, 1.0)  # unseen batches: a wider range of focus and noise
    s = strength
    return pd.DataFrame({
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
    })


def _allocate_cells(rng: np.random.Generator, lines: pd.DataFrame, batches: pd.DataFrame,
                    n_cells: int, lines_per_batch: int, confounding: float, wells_per_line: int
                    ) -> pd.DataFrame:
    """Which line, well and field each cell comes from."""
    rows = []
    per_batch = np.full(len(batches), n_cells // len(batches))
    per_batch[: n_cells - per_batch.sum()] += 1
    by_label = {lab: lines.index[lines.label == lab].to_numpy() for lab in LABELS}
    k = max(2, min(lines_per_batch, len(lines)))
    for b, bp in batches.iterrows():
        maj = bp.majority or None
        n_min = max(1, k // 2) if maj is None else max(1, k // 4)
        minority = LABELS[0] if maj == "low" else LABELS[1]
        major = maj or LABELS[0]
        chosen = {major: rng.choice(by_label[major], min(k - n_min, len(by_label[major])), replace=False),
                  minority: rng.choice(by_label[minority], min(n_min, len(by_label[minority])), replace=False)}
        frac = {major: confounding if maj else 0.5, minority: 1 - confounding if maj else 0.5}
        for lab, line_ids in chosen.items():
            n_lab = int(round(per_batch[b] * frac[lab])) if lab == major else \
                per_batch[b] - int(round(per_batch[b] * frac[major]))
            counts = rng.multinomial(n_lab, np.full(len(line_ids), 1 / len(line_ids)))
            for li, n in zip(line_ids, counts):
                wells = rng.integers(0, wells_per_line, n)
                for w in range(wells_per_line):
                    m = int((wells == w).sum())
                    if m == 0:
                        continue
                    rows.append(pd.DataFrame({
                        "line_idx": li, "batch_idx": b,
                        K.WELL: f"{chr(ord('A') + li % 16)}{w + 1 + wells_per_line * (li // 16):02d}",
                        K.FIELD: rng.integers(0, 4, m).astype(str),
                    }, index=range(m)))
    cells = pd.concat(rows, ignore_index=True)
    return cells.sample(frac=1.0, random_state=int(rng.integers(2**31))).reset_index(drop=True)


def _render(rng: np.random.Generator, cells: pd.DataFrame, lines: pd.DataFrame, size: int,
            pheno: float) -> tuple[np.ndarray, pd.DataFrame]:
    """Noise-free cell images (N, 2, size, size) in [0, 1] plus the per-cell ground-truth parameters."""
    n = len(cells)
    sc = size / 64.0
    lp = lines.iloc[cells.line_idx.to_numpy()].reset_index(drop=True)
    is_low = (lp.label == "low").to_numpy()
    # per-cell shape: line look x cell-to-cell variation; the label moves the lobe amplitude and puncta
    radius = lp.radius.to_numpy() * sc * rng.normal(1.0, 0.08, n)
    elong = lp.elong.to_numpy() * rng.normal(1.0, 0.06, n)
    lobe_amp = np.clip(rng.normal(0.07 + 0.05 * pheno * is_low, 0.035, n), 0.0, 0.35)
    n_puncta = rng.poisson(3.0 + 3.0 * pheno * is_low)
    lobes = rng.integers(3, 7, n)
    truth = pd.DataFrame({"true_radius": radius, "true_lobe_amp": lobe_amp, "true_puncta": n_puncta})
    out = _draw_cells(rng, size, radius, elong, lobe_amp, n_puncta, lobes, lp.nuc_ratio.to_numpy(),
                      lp.cyto_int.to_numpy(), lp.nuc_int.to_numpy())
    return out, truth


def _draw_cells(rng: np.random.Generator, size: int, radius: np.ndarray, elong: np.ndarray,
                lobe_amp: np.ndarray, n_puncta: np.ndarray, lobes: np.ndarray,
                nuc_ratio: np.ndarray, cyto_int: np.ndarray, nuc_int: np.ndarray,
                nuc_tex: np.ndarray | None = None) -> np.ndarray:
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
        bound = radius[s:e, None, None] * (1 + lobe_amp[s:e, None, None] * np.sin(lobes[s:e, None, None]
                                                                                   * theta + psi)
                                           + 0.03 * np.sin(2 * theta + 2 * psi))
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
            tex += np.sin(f * (dx * np.cos(a) + dy * np.sin(a)) + rng.uniform(0, 2 * np.pi, (m, 1, 1)))
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


def _apply_batch(rng: np.random.Generator, img: np.ndarray, cells: pd.DataFrame,
                 batches: pd.DataFrame) -> np.ndarray:
    """Apply each cell's batch transform in place and quantise to uint8."""
    n, _, size, _ = img.shape
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    pos = rng.uniform(size, _FIELD - size, (n, 2)).astype(np.float32)  # cell centre in its field
    for b, bp in batches.iterrows():
        idx = np.flatnonzero(cells.batch_idx.to_numpy() == b)
        if idx.size == 0:
            continue
        x = img[idx]
        gy = (pos[idx, 0, None, None] + yy[None]) / _FIELD - 0.5
        gx = (pos[idx, 1, None, None] + xx[None]) / _FIELD - 0.5
        illum = 1 + bp.grad_strength * (gy * np.sin(bp.grad_dir) + gx * np.cos(bp.grad_dir)) * 2
        x *= np.array([bp.gain_nuc, bp.gain_cyto], np.float32)[None, :, None, None]
        x *= illum[:, None]
        x += bp.offset * illum[:, None]
        if bp.blur > 0.05:
            x = ndimage.gaussian_filter(x, sigma=(0, 0, bp.blur, bp.blur))
        x += rng.normal(0, 1, x.shape).astype(np.float32) * (bp.noise * np.sqrt(np.clip(x, 0, None) + 0.05))
        img[idx] = x
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), pos


def generate(n_cells: int = 6000, crop_size: int = 64, n_lines: int = 8, n_batches: int = 8,
             n_unseen: int = 2, lines_per_batch: int = 4, wells_per_line: int = 6,
             confounding: float = 0.75, batch_strength: float = 1.0, phenotype_strength: float = 1.0,
             seed: int = 0) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Generate crops in memory: (N, 2, S, S) uint8 images, per-cell metadata, and the ground truth.

    The metadata has the crop-shard columns (cell_id, batch, plate, well, field, group, label, split='')
    plus `true_*` columns with each cell's generative parameters.
    """
    if n_lines < 2:
        raise ValueError(f"synth needs at least 2 cell lines (one per label), got n_lines={n_lines}")
    if not 0 <= n_unseen < n_batches:
        raise ValueError(f"synth n_unseen must be in [0, n_batches), got {n_unseen} of {n_batches}")
    rng = np.random.default_rng(seed)
    lines = _line_params(rng, n_lines)
    batches = _batch_params(rng, n_batches, n_unseen, batch_strength)
    cells = _allocate_cells(rng, lines, batches, n_cells, lines_per_batch, confounding, wells_per_line)
    img, truth = _render(rng, cells, lines, crop_size, phenotype_strength)
    img, pos = _apply_batch(rng, img, cells, batches)
    bp = batches.iloc[cells.batch_idx.to_numpy()].reset_index(drop=True)
    lp = lines.iloc[cells.line_idx.to_numpy()].reset_index(drop=True)
    meta = pd.DataFrame({
        K.CELL_ID: [f"synth-{i:07d}" for i in range(len(cells))],
        K.BATCH: bp.batch.to_numpy(),
        K.PLATE: [f"plate-{b}" for b in bp.batch],
        K.WELL: cells[K.WELL].to_numpy(),
        K.FIELD: cells[K.FIELD].to_numpy(),
        K.GROUP: lp.line.to_numpy(),
        K.LABEL: lp.label.to_numpy(),
        K.SPLIT: K.UNASSIGNED,
        K.SOURCE: "synthetic",
        K.CENTROID_Y: pos[:, 0],
        K.CENTROID_X: pos[:, 1],
    })
    meta = pd.concat([meta, truth], axis=1)
    gt = {"lines": lines.to_dict(orient="records"), "batches": batches.to_dict(orient="records"),
          "unseen_batches": batches.batch[batches.unseen].tolist()}
    return img, meta, gt


def write_synthetic(out: str, n_cells: int = 6000, crop_size: int = 64, rows_per_shard: int = 1000,
                    overwrite: bool = False, seed: int = 0, **kw) -> dict:
    """Generate the synthetic data set and write it as crop shards; returns the manifest.

    `out` must be new, empty or (with `overwrite`) a raycell data set; the data set is built beside it and
    swapped in when complete, so a failed run leaves an earlier one whole (`raycell.utils.outputs`).
    """
    path = prepare_output(out, overwrite=overwrite, what="synth.out", kind=DATASET, error=ShardError)
    params = dict(n_cells=n_cells, crop_size=crop_size, seed=seed, **kw)
    img, meta, gt = generate(**params)
    tmp = staging_dir(path, DATASET)
    writer = ShardWriter(tmp, CHANNELS, rows_per_shard=rows_per_shard, overwrite=True)
    writer.add(img, meta)
    m = writer.close(params={"generator": "raycell.data.synthetic", **params},
                     extra={"suggested_unseen": gt["unseen_batches"], "ground_truth": gt})
    swap_in(tmp, path)
    return m
