"""From label images to single-cell crops and morphology features.

* Objects (cells when cell bodies were segmented, else nuclei) that touch the image border are
  dropped: their shape and intensities are cut off, so both the crop and the features would be
  wrong.
* Each kept object gives a `crop_size` x `crop_size` crop of every channel centred on its centroid
  (rounded to the pixel); where the crop reaches past the image edge it is padded with 0 (the
  background after normalisation). All crops of a field are gathered with one fancy-indexing
  operation, not a Python loop.
* Optionally the crop is multiplied by the object's own mask blurred with a Gaussian (`mask_blur`
  px), which removes neighbours while keeping a soft, cell-like edge (the seed's "blurred mask"
  crops).
* Morphology features (`morph_*` columns) are `skimage.measure.regionprops_table`'s on the same
  objects: area, perimeter, eccentricity, solidity, major and minor axis lengths (pixels), and the
  mean intensity per channel (in the image's own units after Z projection and illumination
  correction, before normalisation). Eccentricity and the axis lengths are computed for all objects
  at once by the same formulas (`_inertia_shape`), the rest bit for bit without regionprops'
  per-object machinery (`_basic_props`, `_perimeter_solidity`). With cell bodies, the nucleus area
  is added as `morph_nucleus_area`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from raycell import constants as K

_RENAME = {
    "area": "area",
    "perimeter": "perimeter",
    "eccentricity": "eccentricity",
    "solidity": "solidity",
    "axis_major_length": "major_axis",
    "axis_minor_length": "minor_axis",
}


def drop_border_objects(labels: np.ndarray, margin: int = 1) -> np.ndarray:
    """Set to 0 every object with a pixel within `margin` pixels of the image border."""
    # Not skimage.segmentation.clear_border: it relabels the image and clears connected pieces, not
    # labels, so an object whose label comes in several pieces (a cellpose mask can) would keep the
    # pieces away from the border: a cut object with the wrong shape and features. Whole labels go.
    m = max(1, int(margin))
    edge = np.concatenate(
        [labels[:m].ravel(), labels[-m:].ravel(), labels[:, :m].ravel(), labels[:, -m:].ravel()]
    )
    touching = np.unique(edge[edge > 0])
    if touching.size == 0:
        return labels
    out = labels.copy()
    out[np.isin(out, touching)] = 0
    return out


def crop_windows(arr: np.ndarray, centers: np.ndarray, size: int) -> np.ndarray:
    """Gather (N, C, size, size) windows of a (C, H, W) array centred on integer (y, x) `centers`.

    Windows reaching past the image are zero-padded (the array is padded once, then indexed once).
    """
    c, h, w = arr.shape
    half = size // 2
    padded = np.pad(arr, ((0, 0), (half, size), (half, size)))
    off = np.arange(size) - half
    ys = centers[:, 0, None] + off[None] + half  # (N, size) rows in padded coordinates
    xs = centers[:, 1, None] + off[None] + half
    win = padded[:, ys[:, :, None], xs[:, None, :]]  # (C, N, size, size)
    return np.ascontiguousarray(win.transpose(1, 0, 2, 3))


def morphology(
    labels: np.ndarray, img: np.ndarray, channel_names: list[str], nuclei: np.ndarray | None = None
) -> pd.DataFrame:
    """Per-object morphology features (one row per label, ordered by label).

    Args:
        labels: objects to describe (0 = background).
        img: (C, H, W) float image in input units (for the mean intensities).
        channel_names: names for the `morph_mean_<name>` columns.
        nuclei: nucleus labels with the same numbering, to add `morph_nucleus_area`.

    Returns:
        DataFrame with `label`, `centroid_y`, `centroid_x` and `morph_*` columns (float32).
    """
    props = _basic_props(labels, np.moveaxis(img, 0, -1))
    props.update(_inertia_shape(labels, props["label"]))
    props.update(_perimeter_solidity(labels, props["label"]))
    df = pd.DataFrame(
        {
            "label": props["label"].astype(np.int64),
            K.CENTROID_Y: props["centroid-0"].astype(np.float32),
            K.CENTROID_X: props["centroid-1"].astype(np.float32),
        }
    )
    for src, dst in _RENAME.items():
        df[f"{K.MORPH_PREFIX}{dst}"] = props[src].astype(np.float32)
    for i, name in enumerate(channel_names):
        df[f"{K.MORPH_PREFIX}mean_{safe_name(name)}"] = props[f"intensity_mean-{i}"].astype(
            np.float32
        )
    if nuclei is not None:
        area = np.bincount(nuclei.ravel(), minlength=int(labels.max()) + 1)
        df[f"{K.MORPH_PREFIX}nucleus_area"] = area[df["label"].to_numpy()].astype(np.float32)
    return df


def _basic_props(labels: np.ndarray, img_hwc: np.ndarray) -> dict[str, np.ndarray]:
    """regionprops_table's `label`, `centroid`, `area` and `intensity_mean` columns, bit for bit.

    The centroid is a mean of integer pixel coordinates, whose sums are exact in float64 in any
    order; the intensity means are numpy's mean over the same array regionprops builds for each
    object (its pixels' values in row-major order), so the same summation. Why: regionprops makes a
    RegionProperties object and caches per property for each object, a fifth of the feature time.
    """
    present = np.bincount(labels.ravel())
    present[0] = 0
    ids = np.flatnonzero(present)
    area = present[ids].astype(np.float64)
    rr, cc = np.nonzero(labels)
    lab = labels[rr, cc]
    n = present.size
    out = {
        "label": ids,
        "centroid-0": np.bincount(lab, rr.astype(np.float64), minlength=n)[ids] / area,
        "centroid-1": np.bincount(lab, cc.astype(np.float64), minlength=n)[ids] / area,
        "area": area,
    }
    slices = ndi.find_objects(labels)
    means = np.empty((len(ids), img_hwc.shape[-1]), np.float64)
    for k, i in enumerate(ids):
        obj = labels[slices[i - 1]] == i
        means[k] = np.mean((img_hwc[slices[i - 1]] * obj[..., None])[obj], axis=0)
    for c in range(img_hwc.shape[-1]):
        out[f"intensity_mean-{c}"] = means[:, c]
    return out


def _inertia_shape(labels: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The `eccentricity`, `axis_major_length`, `axis_minor_length` of regionprops, for objects `ids`.

    The same definitions (eigenvalues l1 >= l2 >= 0 of the inertia tensor from the second central
    moments: major 4 sqrt(l1), minor 4 sqrt(l2), eccentricity sqrt(1 - l2 / l1)), with the moments
    of all objects from one pass of pixel sums and the 2x2 eigenvalues in closed form. Why: per
    object, regionprops computes the moments up to order 3 on each object's image and calls LAPACK,
    almost half of the feature time of a field; the values agree to ~1e-12 (float32 once stored).
    """
    rr, cc = np.nonzero(labels)
    lab = labels[rr, cc]
    n = int(labels.max()) + 1
    rr, cc = rr.astype(np.float64), cc.astype(np.float64)
    count = np.bincount(lab, minlength=n)[ids].astype(np.float64)
    sr, sc = (np.bincount(lab, w, minlength=n)[ids] for w in (rr, cc))
    srr, scc, src = (np.bincount(lab, w, minlength=n)[ids] for w in (rr * rr, cc * cc, rr * cc))
    # central moments over the pixel count: the covariance of the pixel coordinates
    var_r = (srr - sr * sr / count) / count
    var_c = (scc - sc * sc / count) / count
    cov = (src - sr * sc / count) / count
    half_sum, root = (var_r + var_c) / 2, np.hypot((var_c - var_r) / 2, cov)
    l1 = np.clip(half_sum + root, 0, None)
    l2 = np.clip(half_sum - root, 0, None)
    ecc = np.zeros_like(l1)
    ok = l1 != 0
    ecc[ok] = np.sqrt(1 - l2[ok] / l1[ok])
    return {
        "eccentricity": ecc,
        "axis_major_length": 4 * np.sqrt(l1),
        "axis_minor_length": 4 * np.sqrt(l2),
    }


# skimage.measure.perimeter's weights per value of its 3x3 convolution (4-neighbourhood)
_PERIMETER_WEIGHTS = np.zeros(50, np.float64)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2


def _perimeter_solidity(labels: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The `perimeter` and `solidity` of regionprops for objects `ids`, the same values bit for bit.

    Perimeter: skimage convolves each object's outline (its pixels with a 4-neighbour outside it)
    with [[10, 2, 10], [2, 1, 2], [10, 2, 10]] and weighs the histogram of the results; only outline
    pixels get odd values, the only ones with a weight. Here the outline of every object and the
    count of same-object outline neighbours come from one pass over the label image, and each
    object's histogram of odd values goes through the same dot product. Solidity: area over the
    pixel count of skimage's `convex_hull_image` of the object's box, as regionprops computes it.
    Why: regionprops erodes and convolves each object's own image (a third of the feature time of
    a field, with the hulls).
    """
    from skimage.morphology import convex_hull_image

    h, w = labels.shape
    pad = np.pad(labels, 1)
    centre = pad[1:-1, 1:-1]

    def shifted(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
        return a[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    four = ((-1, 0), (1, 0), (0, -1), (0, 1))
    inside = centre > 0
    outline = inside & ~np.logical_and.reduce([shifted(pad, dy, dx) == centre for dy, dx in four])
    pad_out = np.pad(outline, 1)
    value = np.ones((h, w), np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                same = shifted(pad_out, dy, dx) & (shifted(pad, dy, dx) == centre)
                value += (2 if dy == 0 or dx == 0 else 10) * same
    n = int(labels.max()) + 1
    rows = labels[outline].astype(np.int64) * 50 + value[outline]
    hist = np.bincount(rows, minlength=n * 50).reshape(n, 50)
    perimeter = np.array([hist[i] @ _PERIMETER_WEIGHTS for i in ids], np.float64)
    area = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
    slices = ndi.find_objects(labels)
    solidity = np.array(
        [area[i] / float(np.sum(convex_hull_image(labels[slices[i - 1]] == i))) for i in ids],
        np.float64,
    )
    return {"perimeter": perimeter, "solidity": solidity}


def safe_name(name: str) -> str:
    """A channel name usable inside a column name."""
    out = "".join(ch if ch.isalnum() else "_" for ch in str(name)).strip("_").lower()
    return out or "ch"


def extract(
    labels: np.ndarray,
    img: np.ndarray,
    img_out: np.ndarray,
    channel_names: list[str],
    crop_size: int,
    nuclei: np.ndarray | None = None,
    mask: bool = False,
    mask_blur: float = 2.0,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Crops and features for every object that does not touch the border.

    Args:
        labels: objects (cells, or nuclei when no cell bodies were segmented).
        img: (C, H, W) float image in input units (features).
        img_out: the same image normalised to the output integer type (crops).
        channel_names: channel names for the feature columns.
        crop_size: crop height and width.
        nuclei: nucleus labels numbered like `labels` (adds the nucleus area), or None.
        mask: multiply each crop by its object's blurred mask.
        mask_blur: Gaussian sigma (px) of the mask edge.

    Returns:
        (crops (N, C, crop_size, crop_size) in img_out's dtype, features DataFrame with N rows).
    """
    kept = drop_border_objects(labels)
    c = img_out.shape[0]
    if kept.max() == 0:
        return np.empty((0, c, crop_size, crop_size), img_out.dtype), pd.DataFrame()
    feats = morphology(kept, img, channel_names, nuclei)
    centers = np.rint(feats[[K.CENTROID_Y, K.CENTROID_X]].to_numpy()).astype(np.int64)
    crops = crop_windows(img_out, centers, crop_size)
    if mask:
        lab_win = crop_windows(kept[None], centers, crop_size)[:, 0]
        own = (lab_win == feats["label"].to_numpy()[:, None, None]).astype(np.float32)
        if mask_blur > 0:
            own = ndi.gaussian_filter(own, sigma=(0, mask_blur, mask_blur))
            # keep the object's interior at full weight: blur only softens the edge outwards
            own = np.maximum(own, (lab_win == feats["label"].to_numpy()[:, None, None]) * 1.0)
        crops = np.rint(crops * own[:, None]).astype(img_out.dtype)
    return crops, feats
