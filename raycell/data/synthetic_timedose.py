"""A synthetic time x dose experiment: crops whose morphology changes gradually with dose and time.

The answer key for the weakly supervised profiling experiment (weak labels `time` and `dose`, as in
the blog post of seed 002): every (time, dose) condition is imaged in every batch, and each cell
carries the morphology shift that generated it, so a model's embedding can be checked against the
truth (e.g. does its first principal component order the doses?).

Generative model (random streams as in `raycell.data.synthetic`: the design, the per-well effect and
each batch's background field from one Generator seeded by `seed`, everything per cell from its
block's own Generator seeded by ``(seed, block index)``, so the data set is written in chunks, by
any number of Ray tasks, with the same bytes):

* **Dose** acts linearly in ``log10(dose + eps)`` (`eps` = a tenth of the smallest non-zero dose),
  scaled to a level ``u`` in [0, 1] over the doses given: cells grow (radius), elongate, and their
  nuclei dim and gain texture. The dose effect grows with time (x0.75 at the first time point,
  x1.25 at the last), so ``true_dose_effect = effect_strength * u * (0.75 + 0.5 * v)``.
* **Time** acts on other features: the cell-body (second-channel) stain brightens and the nucleus
  shrinks relative to the cell; ``true_time_effect = effect_strength * v``, with ``v`` the time
  scaled to [0, 1]. Time is the weaker signal, so dose dominates a profile's variation, as in the
  blog's PCA.
* **Cell-to-cell variation** (radius 10%, intensities 12-15%, ...) and a small well-to-well effect
  are larger than one dose step, so single cells of neighbouring doses overlap.
* **Imaging batches** (one plate each) add nuisance, independent of the condition: gain, offset,
  illumination gradient, blur and noise (`raycell.data.synthetic`'s machinery), plus channel
  crosstalk and a smooth background (`raycell.data.batch_effects`), all scaled by `batch_strength`.
  The last `n_unseen` batches get a wider range of blur and noise and are suggested for holding out.
  With ``effects="varied"`` (`synth.crop_effects`) each batch also draws its own mix of texture,
  crosstalk, debris, gamma, vignetting and shot noise, each unseen batch one mechanism stronger than any
  seen batch (the phenotype design's machinery, `raycell.data.synthetic.crop_effects`); "basic" keeps the
  bytes of before.

The label column is the dose as a string class, so the single-label pipeline runs on it unchanged;
`time`, `dose` and `compound` are the weak-label columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import numpy as np
import pandas as pd

from raycell import constants as K
from raycell.data.batch_effects import background_texture, crosstalk
from raycell.data.synthetic import (
    CHANNELS,
    CropEffects,
    _apply_batch,
    _batch_params,
    _draw_cells,
    block_cells,
    check_effects,
    crop_effects,
    render_design,
    shuffle_order,
    write_design,
)
from raycell.errors import ConfigError
from raycell.formats.manifest import DatasetManifest

TIMES = (24, 48, 72)
DOSES = (0.0, 0.01, 0.1, 1.0, 10.0)
CONTROL, COMPOUND = "DMSO", "cmpdA"
WEAK_LABEL_COLUMNS = ["time", "dose", "compound"]
# wells B02..O23 of a 384-well plate: the outer ring is left empty, as plate layouts usually do
_ROWS, _COLS = "BCDEFGHIJKLMNO", range(2, 24)


def dose_name(dose: float) -> str:
    """The class name of a dose (the label and group text): 0, 0.01, 0.1, 1, 10."""
    return f"{dose:g}"


def dose_level(doses: np.ndarray, all_doses: list[float]) -> np.ndarray:
    """Dose position in [0, 1], linear in log10(dose + eps) from the lowest to the highest dose."""
    pos = [d for d in all_doses if d > 0]
    eps = (min(pos) if pos else 1.0) / 10
    lo, hi = math.log10(min(all_doses) + eps), math.log10(max(all_doses) + eps)
    x = np.log10(np.asarray(doses, np.float64) + eps)
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _check(
    n_cells: int,
    crop_size: int,
    times: list,
    doses: list,
    n_batches: int,
    n_unseen: int,
    replicates: int,
    batch_strength: float,
    effect_strength: float,
) -> None:
    """One-line errors naming the synth key, before anything is drawn."""
    if not doses:
        raise ConfigError("synth.doses is empty: give at least one dose (uM), e.g. [0, 0.1, 1]")
    if not times:
        raise ConfigError("synth.times is empty: give at least one time point (hours), e.g. [24]")
    for d in doses:
        if not isinstance(d, Real) or isinstance(d, bool) or not math.isfinite(d) or d < 0:
            raise ConfigError(f"synth.doses: {d!r} is not a dose; doses are numbers >= 0 (uM)")
    for t in times:
        if (
            not isinstance(t, Real)
            or isinstance(t, bool)
            or not math.isfinite(t)
            or t != int(t)
            or t < 0
        ):
            raise ConfigError(f"synth.times: {t!r} is not a time point; times are whole hours >= 0")
    for key, vals in (("doses", [float(d) for d in doses]), ("times", [int(t) for t in times])):
        dup = sorted({v for v in vals if vals.count(v) > 1})
        if dup:
            raise ConfigError(f"synth.{key} lists {dup[0]:g} more than once")
    if n_batches < 1:
        raise ConfigError(f"synth.n_batches must be >= 1, got {n_batches}")
    if not 0 <= n_unseen < n_batches:
        raise ConfigError(
            f"synth.n_unseen must be in [0, n_batches), got {n_unseen} of "
            f"{n_batches} batches (at least one batch must stay seen)"
        )
    if replicates < 1:
        raise ConfigError(
            f"synth.replicates must be >= 1 (wells per time x dose x batch), got {replicates}"
        )
    per_plate = len(times) * len(doses) * replicates
    if per_plate > len(_ROWS) * len(_COLS):
        raise ConfigError(
            f"synth: {len(times)} times x {len(doses)} doses x {replicates} "
            f"replicates = {per_plate} wells per plate, more than the "
            f"{len(_ROWS) * len(_COLS)} inner wells of a 384-well plate"
        )
    n_wells = per_plate * n_batches
    if n_cells < n_wells:
        raise ConfigError(
            f"synth.n_cells={n_cells} is fewer than the design's {n_wells} wells "
            f"(batches x times x doses x replicates); raise n_cells or lower "
            "replicates"
        )
    if not 16 <= crop_size <= 512:
        raise ConfigError(f"synth.crop_size must be in [16, 512] px, got {crop_size}")
    for key, v in (("batch_strength", batch_strength), ("effect_strength", effect_strength)):
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"synth.{key} must be a finite number >= 0, got {v}")


def _design(
    rng: np.random.Generator,
    n_cells: int,
    times: list[int],
    doses: list[float],
    n_batches: int,
    replicates: int,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Every well (batch x time x dose x replicate) and each cell's well index (cells shuffled)."""
    wells = []
    for b in range(n_batches):
        # each plate gets its own random layout, so no plate position stands for a condition
        spots = rng.permutation(len(times) * len(doses) * replicates)
        i = 0
        for t in times:
            for d in doses:
                for r in range(replicates):
                    row, col = divmod(int(spots[i]), len(_COLS))
                    wells.append((b, t, d, r, f"{_ROWS[row]}{_COLS[col]:02d}"))
                    i += 1
    wells = pd.DataFrame(wells, columns=["batch_idx", "time", "dose", "replicate", K.WELL])
    counts = np.full(len(wells), n_cells // len(wells))
    counts[rng.permutation(len(wells))[: n_cells - counts.sum()]] += 1
    cell_well = np.repeat(np.arange(len(wells), dtype=np.int32), counts)
    return wells, cell_well[shuffle_order(rng, len(cell_well))]


def _render_cells(
    rng: np.random.Generator,
    time: np.ndarray,
    dose: np.ndarray,
    well_eff: np.ndarray,
    doses: list[float],
    times: list[int],
    size: int,
    strength: float,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Noise-free (N, 2, size, size) images in [0, 1] and the per-cell true effects."""
    n = len(time)
    sc = size / 64.0
    u = dose_level(dose, doses)
    tmin, tmax = min(times), max(times)
    v = (time.astype(np.float64) - tmin) / (tmax - tmin) if tmax > tmin else np.zeros(n)
    dose_eff = strength * u * (0.75 + 0.5 * v)  # the dose effect grows with time
    time_eff = strength * v
    # dose: bigger, more elongated cells with dimmer, more textured nuclei
    radius = 12.5 * sc * (1 + 0.28 * dose_eff) * well_eff * rng.normal(1.0, 0.10, n)
    elong = np.clip((1.1 + 0.3 * dose_eff) * rng.normal(1.0, 0.07, n), 0.8, None)
    nuc_int = np.clip(0.72 * (1 - 0.2 * dose_eff) * rng.normal(1.0, 0.12, n), 0.1, None)
    nuc_tex = 1.5 + 2.5 * dose_eff
    # time: brighter cell body, relatively smaller nucleus
    cyto_int = np.clip(0.36 * (1 + 0.3 * time_eff) * rng.normal(1.0, 0.15, n), 0.05, None)
    nuc_ratio = np.clip(0.46 * (1 - 0.12 * time_eff) * rng.normal(1.0, 0.07, n), 0.2, 0.8)
    # neither: outline lobes and puncta vary from cell to cell only
    lobe_amp = np.clip(rng.normal(0.07, 0.03, n), 0.0, 0.3)
    n_puncta = rng.poisson(3.0, n)
    lobes = rng.integers(3, 7, n)
    img = _draw_cells(
        rng, size, radius, elong, lobe_amp, n_puncta, lobes, nuc_ratio, cyto_int, nuc_int, nuc_tex
    )
    truth = pd.DataFrame({"true_dose_effect": dose_eff, "true_time_effect": time_eff})
    return img, truth


def _extra_batch_params(rng: np.random.Generator, n_batches: int, strength: float) -> pd.DataFrame:
    """Crosstalk and background per batch, on top of `raycell.data.synthetic._batch_params`."""
    s = strength
    return pd.DataFrame(
        {
            "crosstalk": s
            * rng.uniform(0.0, 0.15, n_batches),  # cell-body stain seen in the nucleus
            "background": s
            * rng.uniform(0.0, 0.08, n_batches),  # 99th percentile of the background
            "background_scale": rng.uniform(6.0, 20.0, n_batches),  # px
            "background_cyto": rng.uniform(
                0.5, 1.0, n_batches
            ),  # its weight in the cell-body channel
        }
    )


def _background_fields(rng: np.random.Generator, batches: pd.DataFrame, size: int) -> list:
    """Each batch's smooth background field (None where it has none), drawn once per batch.

    The batch's crops show random windows of it.
    """
    field = max(512, 2 * size)
    return [
        background_texture(rng, (field, field), bp.background_scale, bp.background)
        if bp.background > 0
        else None
        for _, bp in batches.iterrows()
    ]


def _add_crosstalk_background(
    rng: np.random.Generator,
    img: np.ndarray,
    batch_idx: np.ndarray,
    batches: pd.DataFrame,
    backgrounds: list,
) -> None:
    """Apply each batch's crosstalk and smooth background to its crops, in place (float images)."""
    _, c, size, _ = img.shape
    for b, bp in batches.iterrows():
        idx = np.flatnonzero(batch_idx == b)
        if idx.size == 0:
            continue
        x = img[idx]
        if bp.crosstalk > 0:
            mix = np.eye(c)
            mix[0, 1] = bp.crosstalk
            # crosstalk works on (C, H, W): stack the crops along H
            x = crosstalk(x.transpose(1, 0, 2, 3).reshape(c, -1, size), mix)
            x = x.reshape(c, len(idx), size, size).transpose(1, 0, 2, 3)
        bg = backgrounds[b]
        if bg is not None:
            oy, ox = rng.integers(0, len(bg) - size + 1, (2, len(idx)))
            win = np.stack([bg[y : y + size, z : z + size] for y, z in zip(oy, ox)])
            weight = np.array([1.0, bp.background_cyto], np.float32)[None, :, None, None]
            x = x + win[:, None] * weight
        img[idx] = x


@dataclass
class TimedoseDesign:
    """The global draws of the time x dose design: small, picklable, enough to render any block."""

    seed: int
    crop_size: int
    effect_strength: float
    times: list[int]
    doses: list[float]
    batches: pd.DataFrame
    wells: pd.DataFrame
    well_eff: np.ndarray
    backgrounds: list
    cell_well: np.ndarray
    effects: CropEffects | None = None  # effects="varied": the batches' varied effects

    @property
    def n_cells(self) -> int:
        """Number of cells in the data set."""
        return len(self.cell_well)

    def render_block(self, block: int) -> tuple[np.ndarray, pd.DataFrame]:
        """Render, batch-transform and quantise one block with its own Generator (seed, block)."""
        lo, hi, rng = block_cells(self.seed, block, self.n_cells)
        wi = self.cell_well[lo:hi]
        time = self.wells.time.to_numpy(np.int64)[wi]
        dose = self.wells.dose.to_numpy(np.float64)[wi]
        bi = self.wells.batch_idx.to_numpy()[wi]
        img, truth = _render_cells(
            rng,
            time,
            dose,
            self.well_eff[wi],
            self.doses,
            self.times,
            self.crop_size,
            self.effect_strength,
        )
        _add_crosstalk_background(rng, img, bi, self.batches, self.backgrounds)
        # a field of view per well: every crop of a well sees the same window of its batch's texture
        img, pos = _apply_batch(rng, img, bi, self.batches, self.effects, block, wi[:, None])
        batch = self.batches.batch.to_numpy(object)[bi]
        names = {d: dose_name(d) for d in self.doses}
        dose_txt = np.array([names[d] for d in dose], dtype=object)
        meta = pd.DataFrame(
            {
                K.CELL_ID: [f"timedose-{i:07d}" for i in range(lo, hi)],
                K.BATCH: batch,
                K.PLATE: batch,
                K.WELL: self.wells[K.WELL].to_numpy(object)[wi],
                K.FIELD: "1",
                K.GROUP: [f"t{t}_d{d}" for t, d in zip(time, dose_txt)],
                K.LABEL: dose_txt,
                K.SPLIT: K.UNASSIGNED,
                K.SOURCE: "synthetic",
                K.CENTROID_Y: pos[:, 0],
                K.CENTROID_X: pos[:, 1],
                "time": time,
                "dose": dose,
                "compound": np.where(dose == 0, CONTROL, COMPOUND),
            }
        )
        return img, pd.concat([meta, truth], axis=1)


def timedose_plan(
    n_cells: int = 6000,
    crop_size: int = 64,
    times: list | tuple = TIMES,
    doses: list | tuple = DOSES,
    n_batches: int = 4,
    n_unseen: int = 1,
    replicates: int = 2,
    batch_strength: float = 1.0,
    effect_strength: float = 1.0,
    seed: int = 0,
    effects: str = "basic",
    unseen_extreme: float = 2.5,
) -> tuple[TimedoseDesign, dict]:
    """The global draws (batches, wells, cells' wells, well effects, backgrounds) and the truth.

    With ``effects="varied"`` the truth also holds ``batch_effects`` and ``unseen_extremes``, drawn
    from their own stream, so the cells and the basic batch draws do not change. Raises ConfigError for
    bad arguments (see `generate_timedose`).
    """
    times, doses = list(times), list(doses)
    check_effects(effects, unseen_extreme)
    _check(
        n_cells,
        crop_size,
        times,
        doses,
        n_batches,
        n_unseen,
        replicates,
        batch_strength,
        effect_strength,
    )
    times, doses = [int(t) for t in times], [float(d) for d in doses]
    rng = np.random.default_rng(seed)
    batches = _batch_params(rng, n_batches, n_unseen, batch_strength, confounded=False)
    batches = pd.concat([batches, _extra_batch_params(rng, n_batches, batch_strength)], axis=1)
    wells, cell_well = _design(rng, n_cells, times, doses, n_batches, replicates)
    well_eff = rng.normal(1.0, 0.03, len(wells))  # a small well-to-well effect on the cell size
    backgrounds = _background_fields(rng, batches, crop_size)
    eff = (
        crop_effects(seed, batches, batch_strength, unseen_extreme, crop_size, len(CHANNELS))
        if effects == "varied"
        else None
    )
    plan = TimedoseDesign(
        seed,
        crop_size,
        effect_strength,
        times,
        doses,
        batches,
        wells,
        well_eff,
        backgrounds,
        cell_well,
        eff,
    )
    conditions = [
        {
            "time": t,
            "dose": d,
            "group": f"t{t}_d{dose_name(d)}",
            "compound": CONTROL if d == 0 else COMPOUND,
            "dose_level": float(dose_level(np.array([d]), doses)[0]),
        }
        for t in times
        for d in doses
    ]
    gt = {
        "design": "timedose",
        "times": times,
        "doses": doses,
        "replicates": replicates,
        "dose_eps": (min([d for d in doses if d > 0], default=1.0)) / 10,
        "effects": {
            "true_dose_effect": "effect_strength * dose_level * (0.75 + 0.5 * time_level); "
            "radius x(1 + 0.28 e), elongation 1.1 + 0.3 e, nuclear intensity "
            "x(1 - 0.2 e), nuclear texture 1.5 + 2.5 e",
            "true_time_effect": "effect_strength * time_level; cell-body intensity x(1 + 0.3 e), "
            "nucleus/cell ratio x(1 - 0.12 e)",
        },
        "conditions": conditions,
        "batches": batches.to_dict(orient="records"),
        "unseen_batches": batches.batch[batches.unseen].tolist(),
    }
    if eff is not None:
        gt.update(batch_effects=eff.per_batch, unseen_extremes=eff.extremes)
    return plan, gt


def generate_timedose(**params) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Generate a time x dose data set in memory: (N, 2, S, S) uint8 crops, metadata, ground truth.

    The metadata has the crop-shard columns (cell_id, batch, plate = batch, well, field, group
    't<time>_d<dose>', label = the dose as text, split='') plus `time` (int64 h), `dose` (float64
    uM), `compound` and the generative `true_dose_effect` / `true_time_effect` (float64).

    Args:
        **params: `timedose_plan`'s arguments.

    Raises:
        ConfigError: empty or negative doses or times, n_unseen not below n_batches, fewer cells
            than wells, and other arguments out of range.
    """
    return render_design(*timedose_plan(**params))


def write_timedose(
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
    """Generate the time x dose data set and write it as crop shards in chunks; return the manifest.

    Written like `raycell.data.synthetic.write_synthetic` (built beside `out`, swapped in when
    complete; `chunk_cells` / `num_workers` as in `raycell.data.synthetic.write_blocks`, never
    changing the bytes); `kw` are `generate_timedose`'s other arguments.
    """
    return write_design(
        out,
        timedose_plan,
        dict(n_cells=n_cells, crop_size=crop_size, seed=seed, **kw),
        generator="raycell.data.synthetic_timedose",
        rows_per_shard=rows_per_shard,
        overwrite=overwrite,
        chunk_cells=chunk_cells,
        num_workers=num_workers,
        progress=progress,
        desc="synth timedose",
        normalised=("times", "doses"),  # JSON-friendly lists
        # the truth columns are answers, not labels to train on
        extra={"weak_label_columns": list(WEAK_LABEL_COLUMNS)},
    )
