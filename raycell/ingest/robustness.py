"""Segmentation robustness to simulated plate effects on real fields of view that have no masks.

Real screens seldom come with instance masks, but a segmentation that holds up should give the same
objects when the imaging conditions change. `perturbation_robustness` therefore segments each clean
field (its segmentation is the pseudo ground truth), applies each mechanism of
`raycell.data.batch_effects` *alone* at a few strengths (the low and high end of the range a seen
batch of the synthetic test bed draws from, and the unseen extreme: `unseen_extreme` x the high end,
capped), segments again with the same settings and scores perturbed against clean objects (F1 at
IoU 0.5, `raycell.ingest.segmentation_eval.match_instances`). The plain Otsu + watershed baseline
(`otsu_watershed`) is scored the same way against its own clean output. Several seeds redraw each
perturbation (texture, debris, noise, the gamma direction, the vignetting centre).

Why pseudo ground truth: it measures *stability*, not accuracy; a method that finds nothing
anywhere would be perfectly stable, so the table also gives each method's clean object count, and
accuracy against true masks stays with `raycell segmentation-eval`.

Intensity units: the mechanisms' strengths are in the synthetic generator's units (nuclei at about
0.55-0.8), so each channel is scaled to put its 99.5th percentile at 0.8 (`to_units`) before the
perturbation, and segmented in those units. Scales follow the objects: the texture's length scale
(drawn for ~12 px nuclei) is multiplied by the clean field's diameter / 12. Each mechanism acts on
the segmented channel at full strength (no channel weight); crosstalk bleeds a second channel of
the same field into it (`crosstalk_from`) and is skipped, with the reason, for fields without one.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from raycell.data import batch_effects as be
from raycell.errors import UserError
from raycell.ingest.params import IngestParams

LEVELS = ("seen-low", "seen-high", "unseen")
METHODS = ("raycell", "otsu-watershed")
UNIT_PERCENTILE, UNIT_VALUE = 99.5, 0.8  # a channel's 99.5th percentile -> 0.8 (the nuclei's range)
_SYNTH_NUCLEUS_PX = 12.0  # nucleus diameter the texture scales of `batch_effects` were drawn for
_IMAGE_EXT = (".tif", ".tiff", ".png")


class RobustnessError(UserError, ValueError):
    """Bad arguments or inputs of the perturbation robustness check (one line naming what)."""


def strength_levels(mechanism: str, unseen_extreme: float = 2.5) -> list[tuple[str, float]]:
    """(level name, strength) of a mechanism: the seen range's ends and the unseen extreme."""
    lo, hi, cap = be.strength_range(mechanism)
    return [("seen-low", lo), ("seen-high", hi), ("unseen", min(unseen_extreme * hi, cap))]


def to_units(img: np.ndarray) -> np.ndarray:
    """(C, H, W) float32 with each channel scaled so its 99.5th percentile is 0.8 (see module doc).

    The background level is kept (no offset subtracted): the perturbation acts on it too.
    """
    x = np.asarray(img, np.float32)
    out = np.empty_like(x)
    for c in range(len(x)):
        ref = float(np.percentile(x[c], UNIT_PERCENTILE))
        out[c] = x[c] * (UNIT_VALUE / ref) if ref > 0 else x[c]
    return out


def perturb(
    rng: np.random.Generator,
    img: np.ndarray,
    mechanism: str,
    strength: float,
    diameter: float = _SYNTH_NUCLEUS_PX,
    direction: int = 0,
) -> np.ndarray:
    """The segmented channel of a field with one mechanism applied alone.

    Args:
        rng: random generator (the mechanism's parameters and its noise, texture or debris).
        img: (C, H, W) in `to_units` units; channel 0 is segmented, channel 1 (if any) is what
            crosstalk bleeds into it.
        mechanism: one of `raycell.data.batch_effects.MECHANISMS`.
        strength: the mechanism's strength (its meaning is in `raycell.data.batch_effects`).
        diameter: the objects' diameter in px (scales the texture).
        direction: gamma only: +1 gives ``g = e^strength`` (> 1: dims the mid-tones), -1 gives
            ``g = e^-strength`` (< 1: lifts the background), 0 draws it as the generator does.

    Returns:
        (H, W) float32 perturbed channel 0.
    """
    p = be.mechanism_params(rng, mechanism, strength, n_channels=max(2, len(img)))
    x = img[0].astype(np.float32, copy=True)
    shape = x.shape
    if mechanism == "texture":
        scale = p["scale_px"] * diameter / _SYNTH_NUCLEUS_PX
        x += be.background_texture(rng, shape, scale, strength)
    elif mechanism == "crosstalk":
        if len(img) < 2:
            raise RobustnessError("crosstalk needs a second channel to bleed from")
        x = be.crosstalk(img[:2].astype(np.float32), np.array([[1.0, strength], [0.0, 1.0]]))[0]
    elif mechanism == "debris":
        x += be.debris(rng, shape, strength)[0]
    elif mechanism == "gamma":
        x = be.gamma(x, float(np.exp(direction * strength)) if direction else p["gamma"])
    elif mechanism == "vignetting":
        x = be.vignetting(x, strength, p["power"], tuple(p["centre"]))
    elif mechanism == "shot_noise":
        x = be.shot_noise(rng, x, p["photons"])
    return x.astype(np.float32, copy=False)


def _files(spec: str) -> list[str]:
    """Image files of a glob or a folder, sorted; one-line error when there are none."""
    if os.path.isdir(spec):
        files = [str(p) for p in sorted(Path(spec).iterdir()) if p.suffix.lower() in _IMAGE_EXT]
    else:
        files = sorted(glob.glob(spec, recursive=True))
    if not files:
        raise RobustnessError(
            f"segmentation-eval --perturb: --images {spec!r} matches no image files"
        )
    return files


def _plane(path: str, channel: int) -> np.ndarray:
    """One 2-D plane of a file (`read_image`'s (Z, C, Y, X)): the channel asked for, max over Z."""
    from raycell.ingest.images import read_image

    arr = read_image(path)
    if channel >= arr.shape[1]:
        raise RobustnessError(
            f"segmentation-eval --perturb: {path} has {arr.shape[1]} channel(s); "
            f"--channel {channel} is out of range"
        )
    return arr[:, channel].max(axis=0)


def load_fields(
    images: str | Sequence, channel: int = 0, crosstalk_from: int | str | None = None
) -> list[tuple[str, np.ndarray]]:
    """Fields as (name, (C, H, W) float32): the channel to segment first, the crosstalk source next.

    Args:
        images: a glob or folder of image files, a list of paths, or a list of arrays ((H, W), or
            (C, H, W) with the channel to segment at `channel`).
        channel: channel of multi-channel inputs to segment.
        crosstalk_from: where crosstalk bleeds from: a channel index of the same file or array, or
            for files ``"OLD=NEW"``, which names the other channel's file by replacing OLD with NEW
            in the path (``"d0.tif=d2.tif"``); None: no crosstalk source.
    """
    if isinstance(images, (str, os.PathLike)):
        images = _files(str(images))
    if len(images) == 0:
        raise RobustnessError("perturbation_robustness: no images given")
    out = []
    for i, item in enumerate(images):
        if isinstance(item, (str, os.PathLike)):
            name, path = Path(item).name, str(item)
            planes = [_plane(path, channel)]
            if isinstance(crosstalk_from, str):
                old, sep, new = crosstalk_from.partition("=")
                if not sep or not old or old not in path:
                    raise RobustnessError(
                        f"segmentation-eval --perturb: --crosstalk-from "
                        f"{crosstalk_from!r} must be OLD=NEW with OLD in {path}"
                    )
                planes.append(_plane(path.replace(old, new), 0))
            elif crosstalk_from is not None:
                planes.append(_plane(path, int(crosstalk_from)))
        else:
            name, arr = f"image{i}", np.asarray(item, np.float32)
            if arr.ndim == 2:
                arr = arr[None]
            if arr.ndim != 3 or min(arr.shape[-2:]) < 16:
                raise RobustnessError(
                    f"perturbation_robustness: image {i} must be (H, W) or (C, H, W) "
                    f"with H, W >= 16, got shape {arr.shape}"
                )
            if channel >= len(arr) or (
                isinstance(crosstalk_from, int) and crosstalk_from >= len(arr)
            ):
                raise RobustnessError(
                    f"perturbation_robustness: image {i} has {len(arr)} channel(s); "
                    f"channel {channel} / crosstalk_from {crosstalk_from} is out of range"
                )
            planes = [arr[channel]]
            if isinstance(crosstalk_from, int):
                planes.append(arr[crosstalk_from])
        if len(planes) > 1 and planes[1].shape != planes[0].shape:
            raise RobustnessError(
                f"perturbation_robustness: {name}: the crosstalk source is "
                f"{planes[1].shape}, the image {planes[0].shape}"
            )
        out.append((name, np.stack(planes).astype(np.float32)))
    return out


def _segmenter(method: str, params: IngestParams):
    from raycell.ingest.segment import segment
    from raycell.ingest.segmentation_eval import otsu_watershed

    if method == "raycell":
        return lambda plane: segment(plane[None], 0, None, params)[:3:2]
    return lambda plane: (otsu_watershed(plane), 0.0)


def _pool(scores: list[dict]) -> dict:
    """F1, precision, recall from several images' match counts, pooled as segmentation-eval does."""
    tp = sum(s["tp"] for s in scores)
    n_p = sum(s["n_pred"] for s in scores)
    n_t = sum(s["n_true"] for s in scores)
    return {
        "f1": 2 * tp / (n_p + n_t) if n_p + n_t else 1.0,
        "precision": tp / n_p if n_p else 1.0,
        "recall": tp / n_t if n_t else 1.0,
        "n_pred": n_p,
        "n_clean": n_t,
    }


def perturbation_robustness(
    images: str | Sequence,
    effects: Sequence[str] = be.MECHANISMS,
    seeds: Sequence[int] = (0, 1, 2),
    levels: Sequence[str] = LEVELS,
    unseen_extreme: float = 2.5,
    methods: Sequence[str] = METHODS,
    iou: float = 0.5,
    channel: int = 0,
    crosstalk_from: int | str | None = None,
    params: IngestParams | None = None,
    progress: bool = False,
) -> dict:
    """Segment clean and perturbed real fields; score each perturbation against the clean objects.

    Args:
        images: a glob or folder of image files, a list of paths, or a list of arrays ((H, W) or
            (C, H, W)); see `load_fields`.
        effects: mechanisms to apply, one at a time (`raycell.data.batch_effects.MECHANISMS`).
        seeds: random seeds; each redraws every perturbation (results: mean and sd over seeds).
        levels: which strengths: 'seen-low', 'seen-high' (the ends of the range a seen synthetic
            batch draws from), 'unseen' (`unseen_extreme` x the high end, capped).
        unseen_extreme: the unseen level's factor over the seen range's high end (> 1).
        methods: 'raycell' (the ingest segmentation with `params`) and/or
            'otsu-watershed' (the baseline), each scored against its own clean segmentation.
        iou: IoU threshold of a match (>= 0.5).
        channel: channel of multi-channel inputs to segment.
        crosstalk_from: the crosstalk source (`load_fields`); crosstalk is skipped without one.
        params: ingest parameters of the raycell method (None = the config's defaults), e.g.
            `IngestParams(diameter=18)`.
        progress: a progress bar on stderr.

    Returns:
        JSON-able dict: iou, seeds, images, clean (per image and method: objects and diameter),
        rows (per mechanism, level and method: case (the mechanism, or gamma with its
        direction: gamma is run both ways), strength, f1 mean / sd / per seed, pooled precision,
        recall, n_pred, n_clean), skipped (mechanisms not run, with the reason) and
        table (markdown, `robustness_table`).

    Raises:
        RobustnessError: an unknown mechanism, level or method, no images, bad shapes or channels.
    """
    bad = [m for m in effects if m not in be.MECHANISMS]
    if bad:
        raise RobustnessError(
            f"perturbation_robustness: unknown effect(s) {bad}; use {list(be.MECHANISMS)}"
        )
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise RobustnessError(
            f"perturbation_robustness: unknown level(s) {bad}; use {list(LEVELS)}"
        )
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise RobustnessError(
            f"perturbation_robustness: unknown method(s) {bad}; use {list(METHODS)}"
        )
    if not unseen_extreme > 1:
        raise RobustnessError(
            f"perturbation_robustness: unseen_extreme must be > 1, got {unseen_extreme}"
        )
    if not seeds:
        raise RobustnessError("perturbation_robustness: give at least one seed")
    from raycell.ingest.segmentation_eval import match_instances

    params = params or IngestParams()
    fields = load_fields(images, channel, crosstalk_from)
    seg = {m: _segmenter(m, params) for m in methods}
    skipped = []
    run = list(effects)
    if "crosstalk" in run and any(len(x) < 2 for _, x in fields):
        run.remove("crosstalk")
        skipped.append(
            {
                "mechanism": "crosstalk",
                "reason": "no second channel to bleed from (crosstalk_from / --crosstalk-from)",
            }
        )
    # gamma in both directions, as separate rows: they fail differently (dim objects lost vs a
    # lifted background merged into them), and a mean over seeds' random directions hides both
    cases = [
        (m, lv, s, d)
        for m in run
        for d in ((1, -1) if m == "gamma" else (0,))
        for lv, s in strength_levels(m, unseen_extreme)
        if lv in levels
    ]
    from tqdm import tqdm

    bar = tqdm(
        total=len(fields) * (1 + len(cases) * len(seeds)),
        desc="perturb",
        unit="field",
        disable=not progress,
    )
    clean_rows = []
    scores: dict[tuple, list[list[dict]]] = {
        (m, lv, d, me): [[] for _ in seeds] for m, lv, _, d in cases for me in methods
    }
    for fi, (name, raw) in enumerate(fields):
        x = to_units(raw)
        clean = {me: seg[me](x[0]) for me in methods}
        bar.update()
        d = clean["raycell"][1] if "raycell" in clean else 0.0
        if not d:  # the baseline alone: the median object's equivalent diameter
            areas = np.bincount(clean[methods[0]][0].ravel())[1:]
            d = (
                float(2 * np.sqrt(np.median(areas[areas > 0]) / np.pi))
                if (areas > 0).any()
                else 12.0
            )
        clean_rows.append(
            {
                "image": name,
                "diameter": round(float(d), 2),
                **{f"{me}_objects": int(len(np.unique(clean[me][0])) - 1) for me in methods},
            }
        )
        for mech, lv, strength, sign in cases:
            for si, seed in enumerate(seeds):
                # one stream per (seed, image, case): any subset of cases gives the same draws
                rng = np.random.default_rng(
                    [seed, fi, be.MECHANISMS.index(mech), LEVELS.index(lv), sign + 1]
                )
                plane = perturb(rng, x, mech, strength, d, sign)
                for me in methods:
                    pred = seg[me](plane)[0]
                    scores[(mech, lv, sign, me)][si].append(
                        match_instances(pred, clean[me][0], iou)
                    )
                bar.update()
    bar.close()
    rows = []
    for mech, lv, strength, sign in cases:
        case = {1: "gamma (g > 1)", -1: "gamma (g < 1)"}.get(sign, mech)
        for me in methods:
            per_seed = [_pool(s) for s in scores[(mech, lv, sign, me)]]
            every = _pool([r for s in scores[(mech, lv, sign, me)] for r in s])
            f1 = np.array([r["f1"] for r in per_seed])
            rows.append(
                {
                    "mechanism": mech,
                    "case": case,
                    "level": lv,
                    "strength": round(float(strength), 4),
                    "method": me,
                    "f1_mean": round(float(f1.mean()), 4),
                    "f1_sd": round(float(f1.std(ddof=1)) if len(f1) > 1 else 0.0, 4),
                    "f1_per_seed": [round(float(v), 4) for v in f1],
                    "precision": round(every["precision"], 4),
                    "recall": round(every["recall"], 4),
                    "n_pred": every["n_pred"],
                    "n_clean": every["n_clean"],
                }
            )
    res = {
        "iou": iou,
        "seeds": list(seeds),
        "unseen_extreme": unseen_extreme,
        "images": [n for n, _ in fields],
        "methods": list(methods),
        "clean": clean_rows,
        "rows": rows,
        "skipped": skipped,
        "units": f"each channel x 0.8 / its {UNIT_PERCENTILE}th percentile",
    }
    res["table"] = robustness_table(res)
    return res


def robustness_table(res: dict) -> str:
    """A markdown table of `perturbation_robustness`'s result: F1 (mean +- sd over seeds)."""
    methods = res["methods"]
    names = {"raycell": "raycell F1", "otsu-watershed": "Otsu + watershed F1"}
    head = "| mechanism | level | strength | " + " | ".join(names[m] for m in methods) + " |"
    lines = [head, "|" + "---|" * (3 + len(methods))]
    by = {(r["case"], r["level"], r["method"]): r for r in res["rows"]}
    seen = []
    for r in res["rows"]:
        key = (r["case"], r["level"])
        if key in seen:
            continue
        seen.append(key)
        cells = []
        for m in methods:
            s = by[key + (m,)]
            cells.append(
                f"{s['f1_mean']:.3f} +- {s['f1_sd']:.3f}"
                if len(res["seeds"]) > 1
                else f"{s['f1_mean']:.3f}"
            )
        lines.append(f"| {key[0]} | {key[1]} | {r['strength']:.3g} | " + " | ".join(cells) + " |")
    clean = ", ".join(
        f"{c['image']}: " + ", ".join(f"{m} {c[m + '_objects']}" for m in methods)
        for c in res["clean"]
    )
    lines.append("")
    lines.append(
        f"F1 at IoU {res['iou']} of each perturbed segmentation against the same method's "
        f"segmentation of the clean image ({len(res['seeds'])} seed(s)); clean objects: "
        f"{clean}."
    )
    for s in res["skipped"]:
        lines.append(f"Skipped {s['mechanism']}: {s['reason']}.")
    return "\n".join(lines) + "\n"


def write_robustness(res: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write a result as ``<out>/robustness.json`` and ``<out>/robustness.md``, each atomically."""
    from raycell.utils.io import atomic_write_json, atomic_write_text

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "robustness.json", folder / "robustness.md"
    atomic_write_json(paths[0], res)
    atomic_write_text(paths[1], res["table"])
    return paths
