"""Imaging batch effects beyond gain/offset/blur/noise, as pure numpy functions (one per mechanism).

The synthetic raw generator (`raycell.data.synthetic_raw`, ``synth.effects: varied``) uses them to
make imaging batches that differ in *mechanism*, not only in degree, so that a segmentation or a
model tuned on some batches can be tested on conditions it never saw. Each mechanism has one scalar
`strength` (0 = off) with a documented meaning, so batches can be compared ("texture 2.5x the
strongest seen"):

* ``texture`` (`background_texture`): 99th percentile of a smooth background at the scale of a few
  cells, in image intensity units (nuclei are ~0.55-0.8);
* ``crosstalk`` (`crosstalk`): largest fraction of one channel bleeding into another;
* ``debris`` (`debris`): bright specks per 10^4 px, plus a tenth as many large out-of-focus blobs;
* ``gamma`` (`gamma`): abs(ln(gamma)) of a power-law response around intensity 1;
* ``vignetting`` (`vignetting`): fraction of the intensity lost in the darkest corner;
* ``shot_noise`` (`shot_noise`): relative Poisson noise at intensity 1 (1 / sqrt(photons per unit)).

Images are float32 arrays in intensity units (0 = black); the functions keep the shape and dtype,
and keep non-negative input non-negative. Random ones take a `numpy.random.Generator`, so a seed
gives the same output. `draw_batch_effects` draws which mechanisms each batch has, and how strong,
and makes every unseen batch carry one mechanism stronger than in any seen batch.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MECHANISMS = ("texture", "crosstalk", "debris", "gamma", "vignetting", "shot_noise")
# strength range per mechanism for a batch that has it (times `strength` of `draw_batch_effects`),
# and a hard cap that keeps an extreme physically meaningful
_RANGES = {
    "texture": (0.08, 0.3, 1.2),
    "crosstalk": (0.05, 0.25, 0.9),
    "debris": (2.0, 8.0, 60.0),
    "gamma": (0.1, 0.4, 1.2),
    "vignetting": (0.15, 0.35, 0.9),
    "shot_noise": (0.03, 0.1, 0.5),
}


def background_texture(
    rng: np.random.Generator, shape: tuple[int, int], scale_px: float, strength: float
) -> np.ndarray:
    """Smooth, blob-like, non-negative background at the scale of a few cells.

    Smoothed white noise, standardised and half-wave rectified: bright patches about `scale_px`
    across separated by dark ones, which a global threshold cannot tell from cells when `strength`
    approaches the cells' intensity (e.g. autofluorescent medium, uneven coating, out-of-focus
    material).

    Args:
        rng: random generator.
        shape: (H, W) of the field.
        scale_px: Gaussian smoothing sigma in px (the patches' size is ~2-3x this).
        strength: the texture's 99th percentile (0 gives zeros).

    Returns:
        float32 (H, W) texture >= 0.
    """
    t = ndimage.gaussian_filter(rng.normal(0, 1, shape), scale_px, mode="wrap")
    t = np.clip((t - t.mean()) / (t.std() + 1e-12), 0, None)
    p99 = np.percentile(t, 99)
    return (t * (strength / p99 if p99 > 0 else 0.0)).astype(np.float32)


def crosstalk(img: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """Bleed-through between channels: ``out[c] = sum_k mix[c, k] * img[k]``.

    Args:
        img: (C, H, W) image.
        mix: (C, C) matrix with ones on the diagonal; ``mix[c, k]`` is the fraction of channel k
            seen in channel c (e.g. a cytoplasm stain leaking into the nucleus channel).

    Returns:
        (C, H, W) image of the same dtype.
    """
    mix = np.asarray(mix, np.float64)
    if mix.shape != (img.shape[0], img.shape[0]):
        raise ValueError(f"crosstalk: mix must be {img.shape[0]}x{img.shape[0]}, got {mix.shape}")
    return np.einsum("ck,khw->chw", mix, img).astype(img.dtype)


def debris(
    rng: np.random.Generator,
    shape: tuple[int, int],
    specks_per_1e4: float,
    blob_ratio: float = 0.1,
    speck_amp: tuple[float, float] = (0.5, 2.0),
    blob_amp: tuple[float, float] = (0.15, 0.5),
) -> tuple[np.ndarray, dict]:
    """Dust and debris: small bright specks and a few large, soft, out-of-focus blobs.

    Neither is in the true masks, so a segmentation that keeps them loses precision, and bright
    specks pull intensity-based scale or threshold estimates.

    Args:
        rng: random generator.
        shape: (H, W) of the field.
        specks_per_1e4: mean number of specks per 10^4 px (Poisson); 0 gives zeros.
        blob_ratio: mean number of blobs per speck.
        speck_amp: peak intensity range of a speck (sigma 0.6-1.5 px).
        blob_amp: peak intensity range of a blob (sigma 4-10 px).

    Returns:
        (float32 (H, W) debris image >= 0, {"n_specks", "n_blobs"}).
    """
    h, w = shape
    out = np.zeros(shape, np.float32)
    n_specks = int(rng.poisson(specks_per_1e4 * h * w / 1e4))
    n_blobs = int(rng.poisson(blob_ratio * specks_per_1e4 * h * w / 1e4))
    for n, sig_r, amp_r in ((n_specks, (0.6, 1.5), speck_amp), (n_blobs, (4.0, 10.0), blob_amp)):
        for _ in range(n):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            sig, amp = rng.uniform(*sig_r), rng.uniform(*amp_r)
            r = int(np.ceil(3.5 * sig))
            y0, y1 = max(0, int(cy) - r), min(h, int(cy) + r + 1)
            x0, x1 = max(0, int(cx) - r), min(w, int(cx) + r + 1)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            out[y0:y1, x0:x1] += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sig**2))
    return out, {"n_specks": n_specks, "n_blobs": n_blobs}


def gamma(img: np.ndarray, g: float, ref: float = 1.0) -> np.ndarray:
    """Power-law (non-linear) detector response ``ref * (x / ref) ** g``; 0 and `ref` stay fixed.

    Negative values are clipped to 0 first; input in [0, ref] stays in [0, ref].
    """
    x = np.clip(img, 0, None) / ref
    return (ref * np.power(x, g)).astype(img.dtype)


def vignetting(
    img: np.ndarray, strength: float, power: float = 2.0, centre: tuple[float, float] = (0.5, 0.5)
) -> np.ndarray:
    """Radial falloff ``1 - strength * (r / r_max) ** power`` around `centre` (fractions of H, W).

    `r_max` is the distance to the farthest corner, so the darkest corner loses exactly `strength`
    of its intensity and nothing brightens. Works on (H, W) or (C, H, W).
    """
    h, w = img.shape[-2:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = centre[0] * (h - 1), centre[1] * (w - 1)
    r = np.hypot(yy - cy, xx - cx)
    r_max = max(np.hypot(y - cy, x - cx) for y in (0, h - 1) for x in (0, w - 1))
    fall = 1 - strength * (r / max(r_max, 1e-12)) ** power
    return (img * fall).astype(img.dtype)


def shot_noise(rng: np.random.Generator, img: np.ndarray, photons: float) -> np.ndarray:
    """Poisson shot noise: scale to photons (`photons` per unit intensity), sample, scale back.

    The mean is unchanged and the relative noise is ``1 / sqrt(photons * x)``: at low counts the
    background is mostly zeros and ones and dim cells break up.
    """
    lam = np.clip(img, 0, None).astype(np.float64) * photons
    return (rng.poisson(lam) / photons).astype(img.dtype)


def draw_batch_effects(
    rng: np.random.Generator,
    batches: list[str],
    unseen: list[bool],
    n_channels: int = 2,
    strength: float = 1.0,
    p_on: float = 0.5,
    unseen_extreme: float = 2.5,
) -> tuple[dict, list[dict]]:
    """Draw each batch's mix of mechanisms, and an out-of-range mechanism for every unseen batch.

    Each mechanism is on in a batch with probability `p_on`, at a strength drawn uniformly from its
    range (times `strength`). Each unseen batch then gets one mechanism (different ones for
    different unseen batches, those present in some seen batch first) at `unseen_extreme` times the
    strongest seen batch's (or the top of the range when no seen batch has it), capped at a
    physical limit.

    Args:
        rng: random generator.
        batches: batch names.
        unseen: per batch, whether it is held out as unseen.
        n_channels: channels (for the crosstalk matrix).
        strength: scale of every strength (0 = no effects; `synth.batch_strength`).
        p_on: probability that a mechanism is on in a batch.
        unseen_extreme: factor over the strongest seen batch for the unseen batches' extreme.

    Returns:
        (per batch {mechanism: params with "strength" (0 when off)}, list of the unseen extremes:
        {"batch", "mechanism", "strength", "max_seen", "ratio", "note"}).
    """
    if unseen_extreme <= 1:
        raise ValueError(f"draw_batch_effects: unseen_extreme must be > 1, not {unseen_extreme}")
    eff: dict[str, dict] = {}
    for b in batches:
        eff[b] = {}
        for m in MECHANISMS:
            lo, hi, cap = _RANGES[m]
            on = rng.uniform() < p_on
            s = min(float(rng.uniform(lo, hi)) * strength, cap)
            eff[b][m] = _params(rng, m, s if on else 0.0, n_channels)
    seen = [b for b, u in zip(batches, unseen) if not u]
    extremes = []
    if strength > 0:
        max_seen = {m: max([eff[b][m]["strength"] for b in seen], default=0.0) for m in MECHANISMS}
        # a mechanism already at its cap in a seen batch cannot be made stronger
        room = [m for m in MECHANISMS if max_seen[m] < _RANGES[m][2]]
        present = [m for m in room if max_seen[m] > 0]
        order = list(rng.permutation(present)) + list(
            rng.permutation([m for m in room if m not in present])
        )
        for i, b in enumerate(bb for bb, u in zip(batches, unseen) if u and order):
            m = str(order[i % len(order)])
            lo, hi, cap = _RANGES[m]
            ref = max_seen[m] if max_seen[m] > 0 else hi * strength
            s = min(unseen_extreme * ref, cap)
            eff[b][m] = _params(rng, m, s, n_channels)
            ratio = s / max_seen[m] if max_seen[m] > 0 else None
            note = f"unseen batch {b}: {m} {s:.3g}, " + (
                f"{ratio:.2g}x the strongest seen ({max_seen[m]:.3g})"
                if ratio
                else "no seen batch has it"
            )
            extremes.append(
                {
                    "batch": b,
                    "mechanism": m,
                    "strength": s,
                    "max_seen": max_seen[m],
                    "ratio": ratio,
                    "note": note,
                }
            )
    return eff, extremes


def _params(rng: np.random.Generator, m: str, s: float, n_channels: int) -> dict:
    """A mechanism's full parameters at strength `s` (the draws that give it its look)."""
    p: dict = {"strength": float(s)}
    if m == "texture":
        p["scale_px"] = float(rng.uniform(10.0, 35.0))
        p["channel_weights"] = [float(v) for v in rng.uniform(0.5, 1.0, n_channels)]
    elif m == "crosstalk":
        mix = np.eye(n_channels)
        # one dominant direction at strength s, the others weaker (or none)
        pairs = [(c, k) for c in range(n_channels) for k in range(n_channels) if c != k]
        if pairs:
            main = pairs[int(rng.integers(len(pairs)))]
            for c, k in pairs:
                mix[c, k] = s if (c, k) == main else s * float(rng.uniform(0.0, 0.5))
        p["mix"] = mix.tolist()
    elif m == "debris":
        p["channel_weights"] = [1.0] + [float(v) for v in rng.uniform(0.3, 1.0, n_channels - 1)]
    elif m == "gamma":
        p["gamma"] = float(np.exp(s * rng.choice([-1.0, 1.0])))
    elif m == "vignetting":
        p["centre"] = [float(v) for v in rng.uniform(0.4, 0.6, 2)]
        p["power"] = float(rng.choice([2.0, 4.0]))
    elif m == "shot_noise":
        p["photons"] = float(1.0 / s**2) if s > 0 else None
    return p


# --------------------------------------------------------------------------------------------------
# Helpers for one mechanism at a time, and for crops (the crop generator, the robustness scorer)
# --------------------------------------------------------------------------------------------------


def strength_range(mechanism: str) -> tuple[float, float, float]:
    """(low, high, cap) of a mechanism's strength.

    A seen batch draws from [low, high] (times the batch strength); an unseen extreme never
    exceeds `cap`.
    """
    if mechanism not in _RANGES:
        raise ValueError(f"unknown batch-effect mechanism {mechanism!r}; use one of {MECHANISMS}")
    return _RANGES[mechanism]


def mechanism_params(
    rng: np.random.Generator, mechanism: str, strength: float, n_channels: int = 2
) -> dict:
    """One mechanism's full parameters at `strength`, drawn as `draw_batch_effects` draws them.

    Used to apply one mechanism alone at chosen strengths (e.g. to real images,
    `raycell.ingest.robustness`).
    """
    strength_range(mechanism)  # one-line error for an unknown name
    return _params(rng, mechanism, float(strength), n_channels)


def texture_windows(
    texture: np.ndarray, top: np.ndarray, left: np.ndarray, size: int
) -> np.ndarray:
    """(N, size, size) windows of a periodic field texture, the i-th at (`top[i]`, `left[i]`).

    `background_texture` smooths with ``mode="wrap"``, so its texture is periodic and any window,
    even one crossing the edge, is a piece of the same smooth field: a crop sees the background at
    its own location in the field of view.
    """
    h, w = texture.shape
    rows = (np.asarray(top, np.int64)[:, None] + np.arange(size)[None]) % h
    cols = (np.asarray(left, np.int64)[:, None] + np.arange(size)[None]) % w
    return texture[rows[:, :, None], cols[:, None, :]]


def vignetting_falloff(
    y: np.ndarray,
    x: np.ndarray,
    shape: tuple[int, int],
    strength: float,
    power: float = 2.0,
    centre: tuple[float, float] = (0.5, 0.5),
) -> np.ndarray:
    """The factor `vignetting` multiplies by, at field coordinates (`y`, `x`) of an (H, W) field.

    For crops: evaluated at the crop's pixels' positions in its field of view, so a crop near the
    corner of a vignetted field is dimmer (and dimmer on its outer side) than one in the centre.
    Coordinates outside the field are clipped to it, so nothing loses more than `strength`.
    """
    h, w = shape
    cy, cx = centre[0] * (h - 1), centre[1] * (w - 1)
    yy = np.clip(np.asarray(y, np.float64), 0, h - 1)
    xx = np.clip(np.asarray(x, np.float64), 0, w - 1)
    r = np.hypot(yy - cy, xx - cx)
    r_max = max(np.hypot(a - cy, b - cx) for a in (0, h - 1) for b in (0, w - 1))
    return 1 - strength * (r / max(r_max, 1e-12)) ** power
