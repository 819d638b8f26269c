"""Segmentation of a field of view into nuclei and cell bodies.

The default backend needs no weights: scikit-image only, in the spirit of CellProfiler's
IdentifyPrimaryObjects / IdentifySecondaryObjects:

1. **Nuclei** (primary objects) on the nucleus channel: subtraction of a smooth background floor (a
   robust 2nd-order polynomial surface: no object scale needed) and of texture at the scale of a
   few objects (white top-hat at 2 d) and specks, Gaussian smoothing (sigma max(1,
   d/20) px), a global threshold (Otsu on log intensities by default; fluorescence intensities are
   closer to log-normal, so a few very bright mitotic nuclei do not drag the threshold up), or a
   local threshold for uneven images, each object's edge refined to its half-maximum: half way
   between the background and the object's peak (its 95th percentile), so the threshold decides
   *which* objects, not how big; blur then does not enlarge objects, and a nucleus inside a halo
   of cytoplasmic crosstalk is cut at its own edge, not the cell's), objects fainter than
   `min_snr` noise sds of the smoothed image dropped (an empty field gives nothing; a dim
   shot-noise field keeps its nuclei; components with room for several objects are refined per
   intensity basin, so a dim nucleus touching a bright one is cut at its own half-maximum, not
   erased by its neighbour's), hole filling, then **declumping**: a distance-transform
   watershed whose markers are the maxima of the distance map that stand out by at least `declump_h`
   x the expected radius (h-maxima). A threshold relative to the object's own size, not a pixel
   count, so the same setting splits 10 px and 60 px nuclei alike.
2. **Cell bodies** (secondary objects, when a cytoplasm channel is named): a foreground mask from
   the same thresholding on that channel, then a marker watershed seeded by the nuclei on the
   gradient magnitude of the smoothed cytoplasm image, with a small compactness (per nucleus
   diameter) so that touching cells with no visible edge between them are split near the midline
   (this approximates CellProfiler's "Propagation").
3. Objects smaller than `min_area` or larger than `max_area` are removed (both default to multiples
   of the expected object area), then debris is dropped by comparing each object with the other
   objects of its field (`drop_outlier_objects`, robust median/MAD statistics): specks far smaller
   than the bulk, out-of-focus blobs whose edges are far shallower than the bulk's.

Scale: everything is expressed in units of the expected nucleus (or object) **diameter** `d`. If it
is not given (0) it is estimated from the image (`robust_diameter`), in two passes: specks narrower
than the smallest allowed object and texture broader than the largest are removed, the foreground is
thresholded, and the **median object** (not area-weighted: a few giant leak components cannot set
the scale; border-touching objects and specks left out) gives d; the same is repeated with the
background removed at that d. The estimate is clipped to `diameter_bounds` (derived from the crop
size). In `raycell ingest` a scale pass first estimates it on a few fields per plate (the estimate
only, `nucleus_diameter`); each field's own estimate then starts from the plate's median in place of
the first, coarse pass (a quarter less CPU per field, nuclei and cell F1 unchanged on the varied
synthetic beds) and is replaced by it when it is more than 2x away from it. Why: with an
area-weighted estimate, fields with background texture at the scale of several cells ran away to
150-190 px for 18 px nuclei.
Nothing is tuned to a particular data set. Images whose objects do not separate at threshold
(confluent cytoplasm-only stains) should set the diameter; a punctate stain used as the primary
channel (vesicles, receptor spots: the Transfluor GFP example) should also set `edge_peak: 0`,
since the half-maximum of a spotted object is the outline of its brightest spots.

Background: besides the polynomial floor, a white top-hat at the object scale (`remove_background`,
a grey opening of side 2 d) removes texture at the scale of a few objects (haze, crosstalk, uneven
confluence), and a small grey opening (`despeckle`, d / 4) removes debris. `plausibility` turns the
statistics of a segmentation (median object vs the plate's, objects on the border, foreground in
giant objects) into a reject reason (`implausible-segmentation: ...`).

`cellpose` is an optional backend, imported lazily, used only with a local model file (never a
download), loaded once per process.

Scoring against true masks lives in `raycell.ingest.segmentation_eval`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from raycell.errors import UserError
from raycell.ingest.filters import fill_holes, gaussian, local_gaussian_threshold
from raycell.ingest.params import IngestParams

METHODS = ("classical", "cellpose")
THRESHOLDS = ("otsu", "li", "local")


class SegmentationError(UserError, RuntimeError):
    """The segmentation backend cannot run (missing package or model file, bad parameters)."""


# --------------------------------------------------------------------------------------------------
# Thresholding and scale
# --------------------------------------------------------------------------------------------------


def _smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    return ndi.gaussian_filter(img.astype(np.float32, copy=False), sigma) if sigma > 0 else img


def noise_sigma(img: np.ndarray) -> float:
    """Standard deviation of the pixel noise (Immerkaer 1996, with a median for robustness).

    The 3x3 kernel below cancels any locally linear signal, so smooth structure (cells,
    illumination) hardly contributes; on white noise of sd s its output has sd 6 s.
    """
    k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    r = ndi.convolve(img.astype(np.float32, copy=False), k, mode="reflect")[1:-1, 1:-1]
    return float(1.4826 * np.median(np.abs(r)) / 6.0)


def smoothed_noise(noise: float, sigma: float) -> float:
    """The noise sd left after Gaussian smoothing at `sigma`, with a 2x margin.

    White noise of sd s has sd s / (2 sqrt(pi) sigma) after the filter. An object must stand
    `min_snr` of *these* sds above the background, not of the raw pixel noise: a dim nucleus on a
    field with few photons per pixel (shot noise) is well resolved once averaged over its area
    but lies within 3 raw pixel sds of the background, and the raw test dropped every object of
    such fields. The 2x margin allows for the selection: Otsu keeps the brightest noise blobs of an
    empty field, whose medians sit a few smoothed sds up (with it, pure Gaussian or Poisson noise
    fields, flat or textured, still give no objects).
    """
    return noise if sigma < 1 else noise / (np.sqrt(np.pi) * sigma)


def background_surface(img: np.ndarray, order: int = 2, iters: int = 4) -> np.ndarray:
    """A smooth background floor: a polynomial surface fitted to the pixels that are not objects.

    The fit is robust (iterated, keeping pixels less than one robust sd above the current surface),
    on a subsample of about 64 x 64 points; a 2nd-order surface follows gradients and vignetting but
    cannot follow anything the size of a cell, so it needs no object scale (unlike a rolling ball).
    """
    h, w = img.shape
    sy, sx = max(1, h // 64), max(1, w // 64)
    sub = img[::sy, ::sx].astype(np.float64)
    yy, xx = np.mgrid[0:h:sy, 0:w:sx]
    yy, xx = (yy / max(h - 1, 1)) * 2 - 1, (xx / max(w - 1, 1)) * 2 - 1
    terms = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    design = np.stack([(yy**i * xx**j).ravel() for i, j in terms], axis=1)
    v = sub.ravel()
    keep = v <= np.percentile(v, 50)  # start from the darker half: objects are bright
    for _ in range(iters):
        coef, *_ = np.linalg.lstsq(design[keep], v[keep], rcond=None)
        r = v - design @ coef
        sd = 1.4826 * np.median(np.abs(r[keep] - np.median(r[keep]))) + 1e-12
        keep = r < sd
    gy = np.linspace(-1, 1, h)[:, None]
    gx = np.linspace(-1, 1, w)[None, :]
    return sum(c * gy**i * gx**j for c, (i, j) in zip(coef, terms)).astype(np.float32)


def foreground(
    img: np.ndarray,
    method: str = "otsu",
    scale: float = 1.0,
    log: bool = True,
    block: int = 0,
    refine: int = 2,
    noise: float = 0.0,
    min_snr: float = 3.0,
    peak_q: float | None = None,
    split_sigma: float = 0.0,
    split_min_area: float = 0.0,
) -> np.ndarray:
    """Binary foreground of a (smoothed) image by a global or local threshold, refined per object.

    Args:
        img: 2-D float image.
        method: 'otsu', 'li' (minimum cross entropy) or 'local' (Gaussian-weighted local mean,
            floored by half the global threshold so that empty background tiles do not light up).
        scale: multiplies the threshold (CellProfiler's "threshold correction factor"), applied in
            intensity units.
        log: threshold log intensities: robust to a few very bright objects (it finds dim objects
            next to bright ones), at the price of a threshold close to the background, which makes
            objects too big.
        block: block size in pixels for 'local' (odd; 0 = whole image / 4).
        refine: rounds of boundary refinement: each connected component is re-thresholded at half
            way between the background (median outside the mask) and the component's median
            intensity, the "half maximum" edge of a blurred object, so the detection threshold does
            not decide the object's size. 0 = off.
        noise: noise sd of `img` (`noise_sigma`, or `smoothed_noise` for a smoothed image); with
            it, components whose median is not at least `min_snr` noise sds above the background
            are dropped. Otsu always splits an image in two, so without this an empty field
            (background and noise only) would give "cells". It also floors the log's reference.
        min_snr: see `noise`.
        peak_q: refine each component's edge at half way between the background and its peak
            (this quantile of its pixels) instead of its median: the half-maximum edge of a
            blurred object. The median of a nucleus inside a halo of cytoplasmic crosstalk is the
            halo's level, and half of it is the cell's edge, not the nucleus'. Components are
            relabelled each round, so pieces that separate are refined on their own peak, and the
            `noise` test runs on the refined pieces (before refinement, a dim nucleus merged with
            the noise around it has a median close to the background). None = the median.
        split_sigma: with `peak_q`, refine per intensity basin rather than per connected
            component (`intensity_basins` of the thresholded mask, maxima of `img` smoothed at this
            sigma). The detection threshold sits close to the background, so neighbouring nuclei
            join into one component; refined as one, its peak is its brightest nucleus' and half of
            that is above every dimmer nucleus joined to it, which then vanish: whole regions of
            clear but dimmer nuclei were lost that way. 0 = per component.
        split_min_area: only components larger than this (px) are split into basins (room for
            more than one object); smaller ones are refined whole, so that a bump of background
            texture beside a lone nucleus is cut away with the nucleus' half-maximum as before.
    """
    from skimage import filters

    if method not in THRESHOLDS:
        raise SegmentationError(f"unknown threshold method {method!r}; use one of {THRESHOLDS}")
    x = img - float(img.min())
    if not np.any(x > 0):
        return np.zeros(img.shape, bool)
    # the log's reference level: the median background, but never below the pixel noise. On a dim
    # field with shot noise most background pixels are 0 after background removal, and a reference
    # of ~0 stretches that noise over most of the log range, where Otsu then cuts it; differences
    # smaller than the noise cannot be told apart anyway
    med = max(float(np.median(x)), noise, 1e-6)
    t_in = np.log1p(x / med) if log else x
    # fit the threshold in the transformed domain, then map it back so `scale` acts on intensities
    fn = filters.threshold_li if method == "li" else filters.threshold_otsu
    t = float(fn(t_in))
    if log:
        t = float(np.expm1(t) * med)
    if method == "local":
        b = block or max(3, (min(img.shape) // 4) | 1)
        local = local_gaussian_threshold(x, b | 1)  # = filters.threshold_local(.., "gaussian")
        mask = x > np.maximum(local * scale, 0.5 * t)
    else:
        mask = x > t * scale
    if refine <= 0 or not mask.any() or mask.all():
        return mask
    bg = float(np.median(x[~mask]))
    if peak_q is not None:
        cur = mask
        basins = None
        if split_sigma > 0:
            # a peak must stand out of its saddle by the noise: noise bumps in haze are no nuclei
            basins = intensity_basins(x, mask, split_sigma, split_min_area, noise)
        for _ in range(refine):
            if basins is None:
                lab, n = ndi.label(cur)
            else:
                lab, n = np.where(cur, basins, 0), int(basins.max())
            level = _label_quantile(x, lab, n, peak_q)
            cut = np.concatenate([[np.inf], bg + 0.5 * (level - bg)])
            cur = cur & (x > cut[lab])
        if noise > 0:
            lab, n = ndi.label(cur)
            level = label_median(x, lab, n)
            faint = np.concatenate([[False], level < bg + min_snr * noise])
            cur = cur & ~faint[lab]
        return cur
    lab, n = ndi.label(mask)
    if noise > 0:
        level = label_median(x, lab, n)
        faint = np.concatenate([[False], level < bg + min_snr * noise])
        if faint.any():
            mask = mask & ~faint[lab]
            lab[~mask] = 0
    cur = mask
    for _ in range(refine):
        level = label_median(x, np.where(cur, lab, 0), n)
        level = np.nan_to_num(level, nan=np.inf)  # a component refined away stays away
        cut = np.concatenate([[np.inf], bg + 0.5 * (level - bg)])
        cur = mask & (x > cut[lab])
    return cur


def intensity_basins(
    x: np.ndarray, mask: np.ndarray, sigma: float, min_area: float = 0.0, prominence: float = 0.0
) -> np.ndarray:
    """The mask's components larger than `min_area` px split into one region per intensity peak.

    A watershed of `x` smoothed at `sigma`, with markers at its local maxima within the component
    (one or more per nucleus; splitting one nucleus in two is harmless where this is used, since
    each half is cut at nearly the same level and the halves join again). With `prominence`, a
    maximum must stand that far above the saddle to its neighbours (h-maxima): bumps of noise in
    a haze of texture then do not become pieces refined on their own. Smaller components, and
    components without a maximum of their own, stay one region each.
    """
    from skimage import segmentation

    comp, n_comp = ndi.label(mask)
    area = np.bincount(comp.ravel(), minlength=n_comp + 1)
    big = area > min_area
    big[0] = False
    if not big.any():
        return comp
    sm = _smooth(x, sigma)
    if prominence > 0:
        peaks = h_maxima_per_object(
            sm, np.where(big[comp], comp, 0), prominence, int(3 * sigma) + 2
        )
    else:
        size = max(3, int(round(2 * sigma)) | 1)
        peaks = big[comp] & (sm >= ndi.maximum_filter(sm, size=size))
    markers, n = ndi.label(peaks)
    seeded = np.zeros(n_comp + 1, bool)
    seeded[comp[markers > 0]] = True
    whole = ~seeded[comp] & mask  # small components, and big ones without a maximum
    markers[whole] = comp[whole] + n
    return segmentation.watershed(-sm, markers, mask=mask)


def _by_label(x: np.ndarray, lab: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labelled pixels of `x` sorted by (label, value), with each label 1..n's count and start.

    Why by hand: scipy's `ndimage.median` / `maximum` with labels argsort the whole image on every
    call (a quarter of ingest's time on 512 px fields); here only the labelled pixels are sorted, by
    value and then stably by label (numpy's radix sort for the small-int labels: as uint16, since a
    stable sort of int32 is a merge sort, 3x slower). The value sort need not be stable: tied values
    are equal, so the sorted values are the same (and it is 3-4x faster than the stable one).
    """
    sel = lab > 0
    v, labels = x[sel], lab[sel]
    if n < 2**16:
        labels = labels.astype(np.uint16)
    by_value = np.argsort(v)
    order = by_value[np.argsort(labels[by_value], kind="stable")]
    counts = np.bincount(labels, minlength=n + 1)[1 : n + 1]
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return v[order], counts, start


def _label_quantile(x: np.ndarray, lab: np.ndarray, n: int, q: float) -> np.ndarray:
    """The q-quantile (lower) of `x` in each label 1..n; inf for a label with no pixels."""
    v, counts, start = _by_label(x, lab, n)
    idx = start + np.floor(q * np.maximum(counts - 1, 0)).astype(np.int64)
    out = np.full(n, np.inf)
    ok = counts > 0
    out[ok] = v[idx[ok]]
    return out


def label_median(x: np.ndarray, lab: np.ndarray, n: int) -> np.ndarray:
    """`scipy.ndimage.median(x, lab, index=1..n)`: the mean of the two middle values, in x's dtype.

    A label with no pixels gives NaN (scipy returns an arbitrary value there).
    """
    v, counts, start = _by_label(x, lab, n)
    out = np.full(n, np.nan)
    ok = counts > 0
    lo, hi = start[ok] + (counts[ok] - 1) // 2, start[ok] + counts[ok] // 2
    out[ok] = (v[lo] + v[hi]) / 2
    return out


def label_max(x: np.ndarray, lab: np.ndarray, n: int) -> np.ndarray:
    """`scipy.ndimage.maximum(x, lab, index=1..n)` for labels that all have pixels (those of `ndi.label`)."""
    out = np.full(n + 1, -np.inf)
    np.maximum.at(out, lab.ravel(), x.ravel())
    return out[1:]


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    # = np.quantile(values, 0.5, weights=weights, method="inverted_cdf"), which needs numpy >= 2.0;
    # pyproject still allows numpy 1.26
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2)])


def estimate_diameter(mask: np.ndarray, min_px: int = 9) -> float:
    """Typical object diameter (px) from a foreground mask; 0 if there are no objects.

    Medians are weighted by area (the size of the object a typical foreground pixel belongs to), so
    specks and debris do not pull the estimate down. Components that look like single objects
    (solidity >= 0.9) give their equivalent diameter when they hold at least half of the foreground;
    otherwise (clumps, ragged cells) twice the inscribed radius of each component is used, which for
    a clump is the size of its largest member rather than of the clump.
    """
    from skimage import measure

    lab, n = ndi.label(mask)
    if n == 0:
        return 0.0
    props = measure.regionprops_table(
        lab, properties=("area", "solidity", "equivalent_diameter_area")
    )
    area = props["area"].astype(np.float64)
    big = area >= min_px
    if not big.any():
        return 0.0
    single = big & (props["solidity"] >= 0.9)
    if area[single].sum() >= 0.5 * area[big].sum():
        return _weighted_median(props["equivalent_diameter_area"][single], area[single])
    inscribed = 2 * label_max(ndi.distance_transform_edt(mask), lab, n)
    return _weighted_median(np.asarray(inscribed)[big], area[big])


def _robust_centre(v: np.ndarray, w: np.ndarray | None = None) -> tuple[float, float]:
    """(median, MAD-based sd) of `v`, medians weighted by `w` when given."""
    w = np.ones_like(v) if w is None else w
    m = _weighted_median(v, w)
    return m, 1.4826 * _weighted_median(np.abs(v - m), w)


def drop_outlier_objects(
    labels: np.ndarray,
    x: np.ndarray,
    fg: np.ndarray,
    k: float = 3.0,
    qc: dict | None = None,
    min_objects: int = 8,
    min_spread: float = 0.15,
) -> np.ndarray:
    """Drop objects far outside the field's own bulk: debris, not nuclei (robust statistics).

    Two kinds of debris survive a threshold and a size filter made for nuclei: small bright specks
    (dust, precipitate) and large diffuse blobs (out-of-focus material). Neither is defined by a
    number tuned to a data set but by being unlike the other objects of the same field:

    * area: log area more than `k` robust sds below the field's area-weighted median (weighted, so
      that specks, which can outnumber nuclei, cannot set the centre);
    * edge sharpness: the mean gradient magnitude on the object's boundary divided by its contrast
      (peak over background), a unit-free measure of how steep its edge is. An in-focus nucleus has
      a steep edge; an out-of-focus blob a shallow one (a Gaussian profile), so its log sharpness
      lies more than `k` robust sds below the field's median. Blur of the whole field moves all
      objects together and drops none.

    The spreads have a floor (`min_spread` in log units, about +-15%) so that a very uniform field
    does not turn ordinary variation into outliers, and fields with fewer than `min_objects`
    objects are left alone (no bulk to compare with). `qc["n_outliers"]` counts what was dropped.

    Args:
        labels: label image after the size filter.
        x: the (background-removed, lightly smoothed) image the objects were found on.
        fg: the foreground mask (its complement gives the background level).
        k: how many robust sds below the bulk an object must lie to be dropped.
        qc: if a dict, receives "n_outliers".
        min_objects: fewer objects than this: nothing is dropped.
        min_spread: floor of the robust sds, in log units.
    """
    from skimage import filters, segmentation
    from skimage.segmentation import relabel_sequential

    n = int(labels.max())
    if n < min_objects:
        return labels
    index = np.arange(1, n + 1)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64)
    bg = float(np.median(x[~fg])) if (~fg).any() else 0.0
    peak = _label_quantile(x, labels, n, 0.95)
    contrast = np.maximum(peak - bg, 1e-6)
    edge = segmentation.find_boundaries(labels, mode="inner") & (labels > 0)
    grad = filters.sobel(x)
    sharp = np.asarray(ndi.mean(grad, np.where(edge, labels, 0), index), np.float64) / contrast
    sharp = np.nan_to_num(sharp, nan=0.0)
    la, ls = np.log(np.maximum(area, 1.0)), np.log(np.maximum(sharp, 1e-9))
    ma, sa = _robust_centre(la, area)
    msh, ssh = _robust_centre(ls)
    # objects cut by the field's border are small because they are cut: not judged by area
    on_border = np.zeros(n + 1, bool)
    on_border[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    small = (la < ma - k * max(sa, min_spread)) & ~on_border[1:]
    bad = small | (ls < msh - k * max(ssh, min_spread))
    if qc is not None:
        qc["n_outliers"] = int(bad.sum())
    if not bad.any():
        return labels
    keep = np.concatenate([[False], ~bad])
    out = np.where(keep[labels], labels, 0)
    return relabel_sequential(out)[0].astype(np.int32)


def _area_limits(d: float, min_area: float, max_area: float) -> tuple[float, float]:
    a = np.pi * (d / 2) ** 2
    # defaults: a quarter of the typical area (debris, fragments) up to 8x (large clumps /
    # multinucleate);
    # both are relative to the image's own scale, see module docstring
    return (min_area if min_area > 0 else 0.25 * a), (max_area if max_area > 0 else 8.0 * a)


def _filter_sizes(labels: np.ndarray, lo: float, hi: float, d: float = 0.0) -> np.ndarray:
    """Remove labels with area outside [lo, hi] and renumber 1..n.

    An object cut by the field's border is small because it is cut, not because it is debris: one
    whose contact with the border is at least d / 2 long (a speck narrower than half an object
    cannot be; a nucleus cut down to a quarter still is) needs only a quarter of `lo`, as
    `drop_outlier_objects` does not judge such objects by area either. `raycell ingest` drops
    border objects before cropping anyway; kept here, they count as the nuclei they are in a
    score against true masks and in per-field counts. `d` = 0: no exemption.
    """
    from skimage.segmentation import relabel_sequential

    if labels.max() == 0:
        return labels
    area = np.bincount(labels.ravel())
    floor = np.full(area.size, float(lo))
    if d > 0:
        contact = np.bincount(
            np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]),
            minlength=area.size,
        )
        floor[contact >= d / 2] = lo / 4
    bad = (area < floor) | (area > hi)
    bad[0] = False
    out = labels.copy()
    out[bad[labels]] = 0
    return relabel_sequential(out)[0].astype(np.int32)


def diameter_bounds(
    shape: tuple[int, ...], crop_size: int = 0, lo: float = 0.0, hi: float = 0.0
) -> tuple[float, float]:
    """The [min, max] range an automatic diameter estimate is clipped to.

    A bound is the backstop that keeps one bad field from running away (the reported failure:
    150-190 px estimates for 18 px nuclei, which then turned a field into one or two giant objects).
    Defaults follow from what the pipeline can use: an object wider than its crop cannot be cropped
    whole (`crop_size`), and one narrower than a sixteenth of it is a few pixels in the crop. With
    no crop size, a third of the field's short side is the upper limit.
    """
    side = float(min(shape[-2:]))
    hi = hi if hi > 0 else (float(crop_size) if crop_size > 0 else side / 3)
    lo = lo if lo > 0 else max(4.0, crop_size / 16 if crop_size > 0 else 4.0)
    hi = min(max(hi, lo), side)
    return float(lo), float(hi)


def despeckle(img: np.ndarray, width: float) -> np.ndarray:
    """Remove bright specks narrower than `width` px (a grey opening with a small square).

    Debris and dust are far smaller than a nucleus; left in, they pass the threshold and, being
    many, pull an object-count median down (and give false objects). The opening flattens any
    bright feature that cannot hold the square and leaves wider objects unchanged.
    """
    k = int(round(width))
    if k < 2:
        return img
    return ndi.grey_opening(img, size=(k, k))


def remove_background(img: np.ndarray, d: float) -> np.ndarray:
    """White top-hat: subtract a background that follows anything broader than about 2 objects.

    The polynomial `background_surface` cannot follow texture at the scale of a few cells (uneven
    confluence, out-of-focus haze, cytoplasmic crosstalk); thresholded with the nuclei, that texture
    becomes giant objects. A grey opening with a square of side 2 d removes every object narrower
    than 2 d (so nuclei, alone or in pairs, stay in the difference) and keeps broader structure,
    which is then smoothed (sigma d/2) so the blocky opening does not print squares into the image.
    Separable min/max filters keep this O(pixels) at any d.
    """
    if d <= 0:
        return img
    k = max(3, int(round(2 * d)) | 1)
    sm = _smooth(img, 1.0)
    bg = gaussian(ndi.grey_opening(sm, size=(k, k)), d / 2)  # = ndi.gaussian_filter, by FFT
    return img - np.minimum(bg, sm)


def robust_diameter(mask: np.ndarray, min_d: float) -> float:
    """Median diameter of the objects in a foreground mask (0 if none qualify).

    Why a median over objects with capped weights (not the area-weighted median, not the mean):
    one or two giant components (texture or crosstalk that passed the threshold) hold much of the
    foreground, so full area weighting lets them set the scale (a runaway to many times the true
    diameter); with each
    object's weight capped at the 75th percentile of the areas they count as one large object each
    among dozens. Specks keep their small weight, so they cannot pull the scale down either.
    Components touching the border are left out (their size is truncated, and a background leak
    usually touches it), and so are specks narrower than `min_d` (see the weights below for the
    rest). Each component gives its
    equivalent diameter when it is convex (solidity >= 0.9), else twice its inscribed radius (the
    size of the largest object in a clump).
    """
    lab, n = ndi.label(mask)
    if n == 0:
        return 0.0
    # regionprops' area, bbox and solidity (area over convex hull area), without building a
    # RegionProperties per component (most are specks that need no more than their area)
    area = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.float64)
    slices = ndi.find_objects(lab)
    h, w = mask.shape
    box = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in slices]).reshape(-1, 4)
    border = (box[:, 0] == 0) | (box[:, 1] == 0) | (box[:, 2] == h) | (box[:, 3] == w)
    inscribed = 2 * label_max(ndi.distance_transform_edt(mask), lab, n)
    equivalent = (4 * area / np.pi) ** 0.5  # regionprops' equivalent_diameter_area
    # solidity needs each object's convex hull, the costliest property here; an object whose
    # equivalent and inscribed diameters are both below min_d is dropped whatever its solidity
    # (most of a field's components are such specks), so only the others get a hull
    diam = inscribed.copy()
    for i in np.flatnonzero(np.maximum(equivalent, inscribed) >= min_d):
        if _solid(lab[slices[i]] == i + 1, area[i], 0.9):
            diam[i] = equivalent[i]
    keep = diam >= min_d
    if (keep & ~border).sum() >= 3:
        keep &= ~border  # too few interior objects (a few large cells): use the border ones too
    if not keep.any():
        return 0.0
    # weights: area, capped at the 75th percentile of the areas. Uncapped, a giant leak component
    # outweighs dozens of nuclei; unweighted, specks (often more numerous than nuclei) set the
    # scale.
    area = area[keep]
    return _weighted_median(diam[keep], np.minimum(area, np.percentile(area, 75)))


def _solid(obj: np.ndarray, area: float, level: float) -> bool:
    """Whether regionprops' solidity of the object `obj` (its box) is at least `level`.

    Solidity is the area over the pixel count of skimage's `convex_hull_image`, which counts the
    pixel centres inside the hull of the pixels' edge midpoints. That count lies between two cheap
    ones: the pixels within their row's or column's span of the object (inside the hull, half a
    pixel from its edge) and the pixels of the octagon bounded by the object's extreme rows, columns
    and diagonals (the hull lies within it). Either bound often settles the comparison (a nucleus
    fills ~95% of its octagon); only the others need the hull itself. Why by hand: the hull is the
    costliest step of the scale estimate, and this gives the same answer.
    """
    from skimage.morphology import convex_hull_image

    rr, cc = np.nonzero(obj)
    d, e = rr + cc, rr - cc
    rows = np.arange(obj.shape[0])
    lo = np.maximum.reduce([np.zeros_like(rows), d.min() - rows, rows - e.max()])
    hi = np.minimum.reduce([np.full_like(rows, obj.shape[1] - 1), d.max() - rows, rows - e.min()])
    octagon = float(np.maximum(hi - lo + 1, 0).sum())
    if area / octagon >= level:
        return True
    cols = np.arange(obj.shape[1])
    in_row = (cols >= obj.argmax(1)[:, None]) & (
        cols <= obj.shape[1] - 1 - obj[:, ::-1].argmax(1)[:, None]
    )
    in_col = (rows[:, None] >= obj.argmax(0)) & (
        rows[:, None] <= obj.shape[0] - 1 - obj[::-1].argmax(0)
    )
    spans = float(np.count_nonzero((in_row & obj.any(1)[:, None]) | (in_col & obj.any(0))))
    if area / spans < level:
        return False
    return bool(area / float(np.sum(convex_hull_image(obj))) >= level)


def plausibility(qc: dict, ref_diameter: float = 0.0, fold: float = 4.0) -> str:
    """Why a segmentation looks implausible ('' when it does not), from `segment_nuclei`'s qc.

    Three signs of a background leak or a runaway scale, each relative to the field or its plate,
    not to a pixel count: the median object far larger (> `fold` x in area) than its plate's
    (`ref_diameter`, the plate's median diameter); most objects (> half, of at least 3) touching
    the border (more than half beyond the fraction expected by chance for objects of that size, and
    larger than the interior ones, which cells truncated by the border are not); or
    most of the foreground (> half) in objects too large to be one (the area filter
    would drop them, and the field would look like it had few or no cells).
    """
    why = []
    if ref_diameter > 0 and qc.get("median_area", 0) > 0:
        ratio = qc["median_area"] / (np.pi * (ref_diameter / 2) ** 2)
        if ratio > fold:
            why.append(f"median object {ratio:.1f}x the plate's")
    n = qc.get("n_raw", 0)
    # large objects touch the border often by chance alone (a 50 px cell in a 512 px field: ~20%),
    # so "most" means more than half on top of what the median object's size makes expected
    limit = min(0.9, 0.5 + qc.get("border_expected", 0.0))
    # and real cells cut by the border are smaller than the interior ones, a leak's are larger
    leak = qc.get("border_area_ratio", 99.0) > 1.5
    if n >= 3 and qc.get("border_fraction", 0) > limit and leak:
        why.append(f"{100 * qc['border_fraction']:.0f}% on the border")
    if qc.get("fg_fraction_too_large", 0) > 0.5:
        why.append(f"{100 * qc['fg_fraction_too_large']:.0f}% of the foreground in giant objects")
    if not why:
        return ""
    return f"implausible-segmentation: {', '.join(why)} (diameter {qc.get('diameter', 0):.1f} px)"


def _qc(labels: np.ndarray, d: float, hi_area: float) -> dict:
    """Statistics of a label image before the size filter, for `plausibility`."""
    n = int(labels.max())
    if n == 0:
        return {"n_raw": 0, "diameter": float(d)}
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    present = area > 0
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge = edge[edge > 0]
    on_edge = np.zeros(n + 1, bool)
    on_edge[edge] = True
    inner, outer = area[present & ~on_edge[1:]], area[present & on_edge[1:]]
    ratio = float(np.median(outer) / np.median(inner)) if len(inner) and len(outer) else 0.0
    med = float(np.median(area[present]))
    eq_d = 2 * np.sqrt(med / np.pi)
    h, w = labels.shape
    return {
        "n_raw": int(present.sum()),
        "median_area": med,
        # chance that a randomly placed object of the median size touches the border
        "border_expected": float(1 - max(0.0, 1 - eq_d / h) * max(0.0, 1 - eq_d / w)),
        "border_fraction": float(len(edge) / max(int(present.sum()), 1)),
        # median area of border objects over interior ones (99 = no interior object)
        "border_area_ratio": ratio if len(inner) else 99.0,
        "fg_fraction_too_large": float(area[area > hi_area].sum() / max(int(area.sum()), 1)),
        "diameter": float(d),
    }


# --------------------------------------------------------------------------------------------------
# Classical backend
# --------------------------------------------------------------------------------------------------


def h_maxima_per_object(surf: np.ndarray, comp: np.ndarray, h: float, margin: int) -> np.ndarray:
    """`skimage.morphology.h_maxima(surf, h) & (comp > 0)`, computed object by object.

    Why by hand: h_maxima's grey reconstruction sorts every pixel of the field (a quarter of ingest's
    time on 512 px fields). Objects are separate components of the foreground, and between two of them
    `surf` falls to about the background, far more than h below either's maxima, so the maxima of one
    do not depend on the other: each component's box, grown by `margin` (the smoothing's reach), is
    the image h_maxima sees. `_h_maxima_in_box` gives h_maxima's answer on it bit for bit without
    sorting the box's pixels; integer images, h <= 0 or no margin go through skimage itself
    (`_h_maxima_boxes`).
    """
    out = np.zeros(surf.shape, bool)
    if not np.issubdtype(surf.dtype, np.floating) or not h > 0 or margin < 1:
        return _h_maxima_boxes(surf, comp, h, margin)
    for i, box in _object_boxes(comp, margin):
        ys, xs, hit = _h_maxima_in_box(surf[box], comp[box] == i, h)
        out[ys[hit] + box[0].start, xs[hit] + box[1].start] = True
    return out


def _h_maxima_in_box(
    f: np.ndarray, own: np.ndarray, h: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`skimage.morphology.h_maxima(f, h) & own` on the box `f`, as (ys, xs, is maximum) of the
    pixels of `own` that can be maxima (the others are not).

    h_maxima's answer at p is f(p) - R(p) >= h (in f's dtype), R the grey reconstruction by dilation
    of its marker (f - h less a rounding allowance) under f: the largest min(marker(q), lowest f on
    an 8-connected path q -> p). R(p) is at least the marker of each 8-neighbour (capped by f(p)):
    a pixel that fails the test against that bound fails it for R too (rounding is monotone), so
    only the others (about the 3x3 maxima) are candidates; `own` must not touch the box's edge
    (unless the field's), so that their neighbours are in the box. For a candidate, the difference
    falls as R grows, so the answer is "no" exactly when R(p) >= v, v the smallest value with
    f(p) - v < h; and R(p) >= v exactly when a pixel with marker >= v lies in p's 8-connected
    component of f >= v. One threshold and one labelling per candidate decide it, where a
    reconstruction would sort every pixel of the box (why this is by hand).
    """
    none = np.zeros(0, np.intp)
    if h > np.ptp(f):  # h_maxima's own shortcut: no maximum that high
        return none, none, np.zeros(0, bool)
    # h_maxima's reconstruction marker for a float image, by its own expression
    marker = f - h - 2 * np.finfo(f.dtype).resolution * np.abs(f)
    # ndi.maximum_filter(marker, size=3, mode="constant", cval=-inf), which is these two passes
    # (called directly: this runs once per object, where its per-call cost shows)
    near = marker
    for axis in (0, 1):
        near = ndi.maximum_filter1d(near, 3, axis=axis, mode="constant", cval=-np.inf)
    near = np.minimum(near, f)
    ys, xs = np.nonzero(own & (f - near >= h))
    if len(ys) == 0:
        return ys, xs, np.zeros(0, bool)
    top = marker.max()
    mp = marker[ys, xs]
    if mp.min() >= top:  # nothing higher to reach the candidates: R is their own marker
        return ys, xs, (f[ys, xs] - mp) >= h
    out = np.zeros(len(ys), bool)
    for k, (y, x) in enumerate(zip(ys, xs)):
        v = _h_cut(f[y : y + 1, x], h)
        if top < v:
            out[k] = True  # no marker reaches v anywhere: R(p) = marker(p) < v
            continue
        lab, _ = ndi.label(f >= v, structure=np.ones((3, 3), bool))
        out[k] = not marker[lab == lab[y, x]].max() >= v
    return ys, xs, out


def _h_cut(fp: np.ndarray, h: float) -> np.ndarray:
    """The smallest v (a 1-element array in fp's dtype) with `fp - v < h` as numpy computes it.

    fp - v falls (weakly) as v grows, so this is where h_maxima's test `f - R >= h` turns false.
    Found from fp - h by stepping one float at a time (a few steps: rounding moves it by an ulp or so).
    """
    v = (fp - h).astype(fp.dtype)
    while (fp - v < h)[0]:
        v = np.nextafter(v, -np.inf, dtype=fp.dtype)
    while not (fp - v < h)[0]:
        v = np.nextafter(v, np.inf, dtype=fp.dtype)
    return v


def _object_boxes(comp: np.ndarray, margin: int):
    """(label, bounding box grown by `margin` and clipped to the image) for each object of `comp`."""
    h_img, w_img = comp.shape
    for i, sl in enumerate(ndi.find_objects(comp), start=1):
        if sl is not None:
            yield (
                i,
                (
                    slice(max(sl[0].start - margin, 0), min(sl[0].stop + margin, h_img)),
                    slice(max(sl[1].start - margin, 0), min(sl[1].stop + margin, w_img)),
                ),
            )


def _h_maxima_boxes(surf: np.ndarray, comp: np.ndarray, h: float, margin: int) -> np.ndarray:
    """`h_maxima_per_object` by skimage's h_maxima on each whole box (integer images, h <= 0)."""
    from skimage import morphology

    out = np.zeros(surf.shape, bool)
    for i, box in _object_boxes(comp, margin):
        own = comp[box] == i
        out[box] |= morphology.h_maxima(surf[box], h).astype(bool) & own
    return out


def split_at_notches(
    labels: np.ndarray,
    d: float,
    min_area: float = 1.0,
    min_depth: float = 0.1,
    max_cut: float = 1.2,
    min_piece: float = 0.3,
    min_solidity: float = 0.85,
    rounds: int = 2,
) -> np.ndarray:
    """Cut objects with room for two nuclei along the line between their two deepest outline notches.

    Two nuclei pressed side by side along their long sides leave no dip between them, neither in
    intensity nor in the distance map (the smaller one is a shoulder of the larger one's ridge), so
    no marker rule finds two seeds; what they do leave is a notch on each side of the contact, a
    concavity of the outline. Each object of at least `min_area` x the expected area is compared
    with its convex hull: the hull's pockets (hull minus object) deeper than `min_depth` x the
    expected radius are notches; the two deepest at most `max_cut` x d apart are joined by a
    straight cut, kept only when both pieces hold at least `min_piece` x the expected area and are
    convex (solidity, area over convex hull, at least `min_solidity`). All
    relative to the object scale `d`. Why by hand: scikit-image has convex hulls but no
    concave-point splitting. `rounds`: pieces are looked at again (clumps of three).
    """
    from skimage import draw, morphology

    r = d / 2
    a_exp = np.pi * r * r
    out = labels.copy()
    nxt = int(out.max()) + 1
    # an object's fate depends on its own pixels only, so a later round looks again only at the
    # objects the round before cut (both pieces): the others would be left whole again
    look: set[int] | None = None
    for _ in range(rounds):
        area = np.bincount(out.ravel())
        todo = [
            (i, sl)
            for i, sl in enumerate(ndi.find_objects(out), start=1)
            if sl is not None
            and (look is None or i in look)
            and area[i] >= min_area * a_exp
            and (sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start) >= min_area * a_exp
        ]
        look = set()
        split = 0
        for i, sl in todo:
            box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
            obj = out[box] == i
            if obj.sum() < min_area * a_exp:
                continue
            hull = morphology.convex_hull_image(obj)
            if obj.sum() < min_solidity * hull.sum():
                continue  # two nuclei side by side are nearly convex; a crescent or ring is not
            pockets, n = ndi.label(hull & ~obj)
            if n < 2:
                continue
            depth = ndi.distance_transform_edt(np.pad(hull, 1))[1:-1, 1:-1]
            deepest = []
            for k, psl in enumerate(ndi.find_objects(pockets), start=1):
                dk = np.where(pockets[psl] == k, depth[psl], 0)
                j = np.unravel_index(int(dk.argmax()), dk.shape)
                if dk[j] >= min_depth * r:
                    deepest.append((dk[j], (j[0] + psl[0].start, j[1] + psl[1].start)))
            deepest.sort(reverse=True)
            deepest = deepest[:4]
            best = None  # the shortest cut between two of the deepest notches
            for a in range(len(deepest)):
                for b in range(a + 1, len(deepest)):
                    p, q = np.array(deepest[a][1]), np.array(deepest[b][1])
                    length = float(np.hypot(*(p - q)))
                    if length < max_cut * d and (best is None or length < best[0]):
                        best = (length, p, q)
            if best is None:
                continue
            line = np.zeros_like(obj)
            line[draw.line(*best[1], *best[2])] = True
            line = ndi.binary_dilation(line, np.ones((2, 2), bool))
            pieces, n_pieces = ndi.label(obj & ~line)
            if n_pieces != 2:
                continue
            area = np.bincount(pieces.ravel())[1:]
            if area.min() < min_piece * a_exp:
                continue
            # nuclei are convex: a cut that leaves a curved piece (a crescent of halo texture,
            # a ragged clump) is no line between two nuclei
            hulls = [morphology.convex_hull_image(pieces == k).sum() for k in (1, 2)]
            if min(area[0] / hulls[0], area[1] / hulls[1]) < min_solidity:
                continue
            # the cut's own pixels go to the nearer piece
            near = ndi.distance_transform_edt(
                pieces == 0, return_distances=False, return_indices=True
            )
            whole = np.where(obj, pieces[tuple(near)], 0)
            out[box][whole == 2] = nxt
            look.update((i, nxt))
            nxt += 1
            split += 1
        if not split:
            break
    return out


@dataclasses.dataclass(frozen=True)
class _Primary:
    """The primary channel as `segment_nuclei` thresholds it: background floor removed, noise known.

    Shared by the scale estimate and the final mask, so the scale pass of `raycell ingest`
    (`nucleus_diameter`) can stop after the estimate.
    """

    img: np.ndarray
    noise: float
    tophat: bool
    threshold: str
    threshold_scale: float
    log_threshold: bool
    min_snr: float
    edge_peak: float

    @classmethod
    def of(
        cls,
        img: np.ndarray,
        *,
        flatten: bool,
        tophat: bool,
        threshold: str,
        threshold_scale: float,
        log_threshold: bool,
        min_snr: float,
        edge_peak: float,
    ) -> "_Primary":
        noise = noise_sigma(img)
        if flatten:
            img = img - background_surface(img)
        return cls(
            img, noise, tophat, threshold, threshold_scale, log_threshold, min_snr, edge_peak
        )

    def mask_at(
        self, x: np.ndarray, sigma: float, d: float, smoothed: np.ndarray | None = None
    ) -> np.ndarray:
        """Filled foreground of `x` smoothed at `sigma` (or of `smoothed`, `x` already smoothed)."""
        fg = foreground(
            _smooth(x, sigma) if smoothed is None else smoothed,
            self.threshold,
            self.threshold_scale,
            self.log_threshold,
            block=int(4 * d) | 1 if d > 0 else 0,
            noise=smoothed_noise(self.noise, sigma),
            min_snr=self.min_snr,
            peak_q=self.edge_peak if self.edge_peak > 0 else None,
            # basins of maxima at an eighth of the object scale: one or more per nucleus, while a
            # dim nucleus beside a bright one keeps its own (its dip is lost at coarser smoothing)
            split_sigma=max(1.0, d / 8) if d > 0 else 0.0,
            split_min_area=1.5 * np.pi * (d / 2) ** 2,
        )
        return fill_holes(ndi.binary_opening(fg))

    def prepared(self, d: float, speck: float) -> np.ndarray:
        """Specks narrower than `speck` px removed, then texture broader than two objects."""
        return remove_background(despeckle(self.img, speck), d) if self.tophat else self.img

    def scale(self, bounds: tuple[float, float], start: float = 0.0) -> float:
        """The automatic diameter estimate, clipped to `bounds` (0 = no objects found).

        `start`: a scale already known for such fields (the plate's median), used instead of the
        first, coarse pass.
        """
        lo, hi = bounds
        if not self.tophat:
            d = estimate_diameter(self.mask_at(self.img, 1.0, 0))
            return float(np.clip(d, lo, hi)) if d > 0 else 0.0
        # two passes: the first removes only what is broader than the largest allowed object
        # and specks narrower than the smallest; the second repeats at the scale it found
        if start > 0:
            d = float(np.clip(start, lo, hi))
        else:
            d = robust_diameter(self.mask_at(self.prepared(hi / 2, lo), 1.0, 0), lo)
            d = float(np.clip(d, lo, hi)) if d > 0 else 0.0
        if d > 0:
            x2 = self.prepared(d, max(lo, d / 3))
            d2 = robust_diameter(self.mask_at(x2, max(1.0, d / 20), d), max(lo, d / 3))
            d = float(np.clip(d2, lo, hi)) if d2 > 0 else d
        return d


def segment_nuclei(
    img: np.ndarray,
    diameter: float = 0.0,
    threshold: str = "otsu",
    threshold_scale: float = 1.0,
    log_threshold: bool = True,
    declump: str = "shape",
    declump_h: float = 0.2,
    min_area: float = 0.0,
    max_area: float = 0.0,
    min_snr: float = 3.0,
    flatten: bool = True,
    tophat: bool = True,
    diameter_min: float = 0.0,
    diameter_max: float = 0.0,
    crop_size: int = 0,
    ref_diameter: float = 0.0,
    outlier_fold: float = 2.0,
    qc: dict | None = None,
    edge_peak: float = 0.95,
    outlier_k: float = 3.0,
) -> tuple[np.ndarray, float]:
    """Primary objects (nuclei, or whole cells when there is one stain) by threshold + watershed.

    Args:
        img: 2-D float image of the nucleus (primary) channel.
        diameter: expected object diameter in px; 0 = estimate from the image.
        threshold: 'otsu', 'li' or 'local' (see `foreground`).
        threshold_scale: threshold correction factor.
        log_threshold: threshold log intensities.
        declump: 'shape' (distance-transform maxima), 'intensity' (maxima of the image smoothed at
            the object scale, for objects brighter in the middle, e.g. cytoplasm-only stains) or
            'none'.
        declump_h: how far (as a fraction of the expected radius) a maximum must stand above the
            saddle to its neighbour to seed its own object.
        min_area: smallest kept area in px (0 = a quarter of the expected area).
        max_area: largest kept area in px (0 = 8x the expected area).
        min_snr: objects must be this many pixel-noise sds brighter than the background (see
            `foreground`); an empty field then gives no objects.
        flatten: subtract `background_surface` first, so an uneven background (illumination
            gradient, vignetting, offset) is not mistaken for objects when there is no illumination
            correction.
        tophat: also subtract `remove_background` at the object scale (texture at the scale of a
            few objects) and `despeckle` (debris far smaller than an object).
        diameter_min: lower bound of the estimated diameter (0 = see `diameter_bounds`).
        diameter_max: upper bound of the estimated diameter (0 = see `diameter_bounds`).
        crop_size: the crop size, which sets the default bounds.
        ref_diameter: the plate's median diameter: the field's estimate starts from it (in place
            of the coarse first pass), and an estimate more than `outlier_fold` x away from it is
            replaced by it (0 = no plate reference).
        outlier_fold: see `ref_diameter`.
        qc: if a dict, filled with statistics for `plausibility` (objects before the size filter).
        edge_peak: each object's edge is put at half its maximum over the background, the maximum
            being this quantile of its pixels (see `foreground`'s `peak_q`); 0 = the older
            half-median edge.
        outlier_k: drop objects whose area or edge sharpness is more than this many robust sds
            below the field's bulk (`drop_outlier_objects`: debris); 0 = off.

    Returns:
        (labels int32 HxW with 0 = background, the diameter used).
    """
    from skimage import segmentation

    if declump not in ("shape", "intensity", "none"):
        raise SegmentationError(f"unknown declump method {declump!r}; use shape, intensity or none")
    prim = _Primary.of(
        img,
        flatten=flatten,
        tophat=tophat,
        threshold=threshold,
        threshold_scale=threshold_scale,
        log_threshold=log_threshold,
        min_snr=min_snr,
        edge_peak=edge_peak,
    )
    d = float(diameter)
    if d <= 0:
        d = prim.scale(
            diameter_bounds(img.shape, crop_size, diameter_min, diameter_max), start=ref_diameter
        )
        # a field far from its plate is more likely wrong than different: trust the plate
        if ref_diameter > 0 and (d <= 0 or max(d / ref_diameter, ref_diameter / d) > outlier_fold):
            if qc is not None:
                qc["estimate_replaced"] = round(d, 2)
            d = float(ref_diameter)
    if d <= 0:
        if qc is not None:
            qc.update(n_raw=0, diameter=0.0)
        return np.zeros(img.shape, np.int32), 0.0
    # no despeckle here: it only has to keep specks out of the scale estimate; in the final mask
    # the area filter drops them, and an opening would erase punctate stains (Transfluor GFP)
    x = prim.prepared(d, 0)
    x_smooth = _smooth(x, max(1.0, d / 20))  # thresholded here, and the outlier test's image
    fg = prim.mask_at(x, max(1.0, d / 20), d, x_smooth)
    lo_a, hi_a = _area_limits(d, min_area, max_area)
    if not fg.any():
        if qc is not None:
            qc.update(n_raw=0, diameter=d)
        return np.zeros(img.shape, np.int32), d
    r = d / 2
    comp, _ = ndi.label(fg)
    if declump == "none":
        labels = comp.astype(np.int32)
    else:
        if declump == "shape":
            # distance map smoothed at a small fraction of the radius: one maximum per convex lobe
            sigma = max(1.0, r / 6)
            surf = ndi.gaussian_filter(ndi.distance_transform_edt(fg), sigma)
        else:
            # CellProfiler's auto smoothing: sigma = min size / 3.5; rescaled to 'shape' units
            sigma = max(1.0, d / 7)
            surf = _smooth(x, sigma)
            surf = (surf - surf[fg].min()) / max(float(np.ptp(surf[fg])), 1e-6) * r
        peaks = h_maxima_per_object(surf, comp, declump_h * r, margin=int(3 * sigma) + 2)
        markers, _ = ndi.label(peaks)
        # components without any marker still become one object each
        missing = np.setdiff1d(np.unique(comp[fg]), np.unique(comp[markers > 0]))
        if missing.size:
            extra = np.isin(comp, missing)
            markers[extra] = comp[extra] + markers.max()
        labels = segmentation.watershed(-surf, markers, mask=fg).astype(np.int32)
        if declump == "shape":
            labels = split_at_notches(labels, d)
    if qc is not None:
        qc.update(_qc(labels, d, hi_a))
    labels = _filter_sizes(labels, lo_a, hi_a, d)
    if outlier_k > 0:
        # debris (specks, out-of-focus blobs) judged against this field's own objects
        labels = drop_outlier_objects(labels, x_smooth, fg, outlier_k, qc)
    return labels, d


def segment_cells(
    nuclei: np.ndarray,
    cyto: np.ndarray,
    diameter: float,
    threshold: str = "otsu",
    threshold_scale: float = 1.0,
    log_threshold: bool = True,
    compactness: float = 0.05,
    max_area: float = 0.0,
    flatten: bool = True,
) -> np.ndarray:
    """Secondary objects: grow each nucleus into the cytoplasm channel (marker watershed).

    Args:
        nuclei: label image of the primary objects (the seeds; labels are kept, so cell k holds
            nucleus k).
        cyto: 2-D float image of the cytoplasm channel.
        diameter: the nuclei's diameter (sets the smoothing scale and, with max_area, the size
            limit).
        threshold: as in `foreground`, on the cytoplasm channel.
        threshold_scale: as in `foreground`.
        log_threshold: as in `foreground`.
        compactness: watershed compactness per nucleus diameter (0 = a pure gradient watershed); it
            makes featureless contacts split near the midline between the two nuclei instead of
            wherever the noise puts the weakest edge.
        max_area: largest cell area in px (0 = no limit beyond the foreground).
        flatten: subtract `background_surface` from the cytoplasm image first.

    Returns:
        int32 label image of cells with the nuclei's label numbers (a nucleus whose cell would be
        empty keeps at least its own pixels).
    """
    from skimage import filters, segmentation

    if nuclei.max() == 0:
        return nuclei.copy()
    noise = noise_sigma(cyto)
    if flatten:
        cyto = cyto - background_surface(cyto)
    sm = _smooth(cyto, max(1.0, diameter / 20))
    fg = foreground(sm, threshold, threshold_scale, log_threshold, noise=noise) | (nuclei > 0)
    fg = fill_holes(ndi.binary_opening(fg) | (nuclei > 0))
    grad = filters.sobel(sm / max(float(np.percentile(sm[fg], 99)), 1e-6))
    # compactness is given per nucleus diameter, so that the same value means the same trade-off
    # between
    # following edges and staying round at any magnification (skimage's is per pixel of distance)
    cells = segmentation.watershed(
        grad, nuclei, mask=fg, compactness=compactness / max(diameter, 1.0)
    ).astype(np.int32)
    if max_area > 0:
        area = np.bincount(cells.ravel(), minlength=nuclei.max() + 1)
        big = np.flatnonzero(area > max_area)
        big = big[big > 0]
        if big.size:  # a runaway cell (foreground leak) falls back to its nucleus
            sel = np.isin(cells, big)
            cells[sel] = nuclei[sel]
    return cells


# --------------------------------------------------------------------------------------------------
# Cellpose backend (optional; never downloads)
# --------------------------------------------------------------------------------------------------


# Loaded models, keyed by (model file, its mtime, on the GPU). A crop task segments many fields of view, and a
# Ray worker process runs many tasks; without the cache every field read the weights from disk and
# built the network again. One entry only: a run uses one model, so a new key frees the old one
# (and a file replaced in place, with a new mtime, is loaded again).
_CELLPOSE_MODELS: dict[tuple[str, int], object] = {}


def cuda_available() -> bool:
    """Whether torch (cellpose's backend) sees a CUDA device in this process."""
    try:
        import torch  # noqa: PLC0415 - heavy, only needed for cellpose
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def cellpose_on_gpu(setting: str | bool) -> bool:
    """`ingest.cellpose_gpu` resolved in the process that runs cellpose: 'auto' = CUDA is visible.

    In a Ray task that requested a GPU, Ray makes that GPU (only) visible, so 'auto' finds it.
    """
    if setting == "auto":
        return cuda_available()
    return bool(setting)


def cellpose_gpus(p: IngestParams, cluster_gpus: float | None = None) -> float:
    """The GPUs each crop task requests from Ray: 0 unless cellpose runs on a GPU.

    'auto' requests them when the Ray cluster has GPUs (`cluster_gpus`, the cluster's "GPU"
    resource; None = unknown, then whether this process sees CUDA decides). Requesting them is
    what sends the tasks to the GPU nodes and keeps more tasks than fit from sharing a device.

    Raises:
        SegmentationError: `cellpose_gpu: true` on a Ray cluster known to have no GPU (its tasks
            would wait forever for one).
    """
    if p.segmentation != "cellpose" or p.cellpose_gpu is False:
        return 0.0
    if p.cellpose_gpu is True:
        if cluster_gpus is not None and cluster_gpus <= 0:
            raise SegmentationError(
                "ingest.cellpose_gpu is true but the Ray cluster has no GPU; start Ray on a GPU "
                "node (ray start --num-gpus N) or set ingest.cellpose_gpu to auto or false"
            )
        return float(p.cellpose_gpus_per_task)
    has_gpu = cuda_available() if cluster_gpus is None else cluster_gpus > 0
    return float(p.cellpose_gpus_per_task) if has_gpu else 0.0


def _cellpose_model(model_path: str, gpu: bool = False):
    """The cellpose model in `model_path`, loaded once per process (the checks run every time)."""
    try:
        from cellpose import models  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise SegmentationError(
            "ingest.segmentation=cellpose needs the 'cellpose' package, which is not "
            "installed (pip install cellpose), or use segmentation=classical"
        ) from None
    if not model_path or not Path(model_path).is_file():
        raise SegmentationError(
            f"ingest.cellpose_model must name a local cellpose model file; "
            f"{model_path or '(empty)'} does not exist (raycell never downloads weights)"
        )
    key = (str(Path(model_path).absolute()), Path(model_path).stat().st_mtime_ns, bool(gpu))
    if key not in _CELLPOSE_MODELS:
        _CELLPOSE_MODELS.clear()
        _CELLPOSE_MODELS[key] = models.CellposeModel(gpu=gpu, pretrained_model=str(model_path))
    return _CELLPOSE_MODELS[key]


def segment_cellpose(
    img: np.ndarray, model_path: str, diameter: float = 0.0, gpu: bool = False
) -> np.ndarray:
    """Label image from a local cellpose model on a (C, H, W) or (H, W) image (`gpu`: on CUDA)."""
    model = _cellpose_model(model_path, gpu)
    out = model.eval(img, diameter=diameter or None, channel_axis=0 if img.ndim == 3 else None)
    return np.asarray(out[0], np.int32)


def check_backend(method: str, model_path: str = "") -> None:
    """Raise SegmentationError early (before any task starts) if the backend cannot run."""
    if method not in METHODS:
        raise SegmentationError(f"unknown segmentation method {method!r}; use one of {METHODS}")
    if method == "cellpose":
        _cellpose_model(model_path)


def _scale_params(p: IngestParams) -> dict:
    """The ingest parameters the scale estimate depends on, as keyword arguments."""
    return {
        "threshold": p.threshold,
        "threshold_scale": p.threshold_scale,
        "log_threshold": p.log_threshold,
        "min_snr": p.min_snr,
        "flatten": p.flatten,
        "tophat": p.tophat,
        "diameter_min": p.diameter_min,
        "diameter_max": p.diameter_max,
        "crop_size": p.crop_size,
        "edge_peak": p.edge_peak,
    }


def nucleus_diameter(img: np.ndarray, p: IngestParams) -> float:
    """The automatic diameter estimate `segment_nuclei` would use on this primary channel (no plate
    reference), without the segmentation that follows it: the scale pass of `raycell ingest`
    needs only this number, and the estimate is about half of a field's nucleus segmentation.
    """
    q = _scale_params(p)
    bounds = diameter_bounds(
        img.shape, q.pop("crop_size"), q.pop("diameter_min"), q.pop("diameter_max")
    )
    return _Primary.of(img, **q).scale(bounds)


def segment(
    img: np.ndarray,
    nucleus: int,
    cytoplasm: int | None,
    p: IngestParams,
    ref_diameter: float = 0.0,
    qc: dict | None = None,
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Segment one field of view with the configured backend.

    Args:
        img: (C, H, W) float image (projected, illumination-corrected, not yet normalised).
        nucleus: channel index of the primary objects.
        cytoplasm: channel index to grow cell bodies into, or None.
        p: the ingest parameters.
        ref_diameter: the plate's median diameter (see `segment_nuclei`; 0 = none).
        qc: filled with the statistics `plausibility` reads (classical backend only).

    Returns:
        (nuclei labels, cell labels or None, diameter used in px).
    """
    if p.segmentation == "cellpose":
        chans = [nucleus] if cytoplasm is None else [cytoplasm, nucleus]
        gpu = cellpose_on_gpu(p.cellpose_gpu)
        cells = segment_cellpose(img[chans], p.cellpose_model, p.diameter, gpu)
        d = 2 * np.sqrt(np.bincount(cells.ravel())[1:].mean() / np.pi) if cells.max() else 0.0
        return cells, None, float(d)
    nuc, d = segment_nuclei(
        img[nucleus],
        diameter=p.diameter,
        declump=p.declump,
        declump_h=p.declump_h,
        min_area=p.min_area,
        max_area=p.max_area,
        ref_diameter=ref_diameter,
        outlier_fold=p.diameter_outlier_fold,
        qc=qc,
        outlier_k=p.outlier_k,
        **_scale_params(p),
    )
    cells = None
    if cytoplasm is not None:
        cells = segment_cells(
            nuc,
            img[cytoplasm],
            d,
            threshold=p.threshold,
            threshold_scale=p.threshold_scale,
            log_threshold=p.log_threshold,
            compactness=p.cell_compactness,
            max_area=p.max_cell_area,
            flatten=p.flatten,
        )
    return nuc, cells, d
