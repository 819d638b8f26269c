"""Pixels: reading, assembling a FOV, Z projection, illumination correction, normalisation.

Every field of view becomes one float32 (C, H, W) array in the images' own intensity units
(Z-projected per channel), which is what segmentation and the morphology intensities see. Two
corrections come after:

* **Illumination correction** (optional), per plate and channel, as CellProfiler's
  CorrectIlluminationCalculate/Apply and DeepProfiler's `illum` step: every projected image of the
  plate is downscaled by block averaging, the downscaled images are averaged, the average is
  median-filtered (a smooth estimate of the uneven illumination, the cells averaged out), scaled to
  mean 1 and each image is divided by it (upsampled back). Scaling to mean 1 (not CellProfiler's
  robust minimum) keeps corrected intensities in the units of the input.
* **Normalisation** to the crops' integer type: ``global`` maps robust low/high percentiles of each
  channel over the whole data set to the output range (one fixed affine map per channel, so batch
  differences stay as they are: the models face the batch effect), ``per-batch`` does the same per
  (batch, channel) and ``per-image`` per (field of view, channel).

Reading errors (empty, unreadable or truncated files, NaN/inf pixels, axes that cannot be told
apart, a file holding several planes where its name says it is one channel and one Z-slice, images
of different sizes within one FOV) raise `ImageError`, whose one-line message names the file; the
ingest task turns it into a reject row.

**Scale check.** Global and per-batch normalisation pool every field's pixels, so one field stored
at another scale (a uint32 field with values 1000x the rest, a float field in [0, 1] among uint16
fields) takes over the pooled percentiles and turns every other field's crops to zero, or its own.
`field_scale` describes a field by its pixel types and the log10 of each channel's 99th
percentile; `scale_reference` summarises a plate's fields robustly (median and MAD, majority pixel
type), and `scale_problem` says why a field is far outside its plate's.
"""

from __future__ import annotations

import hashlib
import os
import typing

import numpy as np
from scipy import ndimage as ndi

from raycell.config import CropDtype, IntensityNormalization, ScaleCheck, ZProjection
from raycell.ingest.sources import IngestError

Z_PROJECTIONS = typing.get_args(ZProjection)
NORMALIZATIONS = typing.get_args(IntensityNormalization)
OUT_DTYPES: dict[CropDtype, type] = {"uint8": np.uint8, "uint16": np.uint16}


class ImageError(IngestError):
    """One image (or one field of view) cannot be used; the message names the file and problem."""

    def __init__(self, code: str, message: str):
        """Keep a short machine-readable `code` (the rejects table's column) with the message."""
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _axes_from_file(path: str) -> tuple[np.ndarray, str]:
    """Read an image and its axes string.

    TIFF (OME-TIFF included) through tifffile and OME-Zarr folders through ome-zarr, both plane by
    plane (`raycell.ingest.ome`); PNG through scikit-image/imageio.
    """
    from raycell.ingest import ome

    if os.path.isdir(path):
        return ome.read_zarr(path)
    if path.lower().endswith((".tif", ".tiff")):
        return ome.read_tiff(path)
    from skimage import io

    arr = io.imread(path)
    return arr, {2: "YX", 3: "YXS"}.get(arr.ndim, "")


def read_image(path: str, axes: str = "") -> np.ndarray:
    """Read one image file as a float32 (Z, C, Y, X) array.

    Args:
        path: TIFF or PNG file.
        axes: the file's axes (e.g. 'ZCYX', 'CYX'), overriding what the file says; letters Z, C (or
            S for samples, e.g. RGB), Y, X; other letters are allowed only with size 1.

    Raises:
        ImageError: empty/unreadable/truncated file, axes that cannot be mapped, NaN or inf pixels.
    """
    return read_image_raw(path, axes).astype(np.float32, copy=False)


def _read_error(path: str, exc: Exception) -> ImageError:
    """One line that says what is wrong with the file (not which imageio plugin to install)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "could not find a backend" in msg.lower():
        msg = "its contents are not a TIFF or PNG image that can be decoded"
    else:
        msg = f"{type(exc).__name__}: {msg}"
    return ImageError("unreadable", f"cannot read image {path}: {msg}")


def read_image_raw(path: str, axes: str = "") -> np.ndarray:
    """`read_image` in the file's own pixel type (the scale check needs to know it)."""
    try:
        empty = os.path.getsize(path) == 0
    except OSError as exc:
        raise _read_error(path, exc) from None
    if empty:
        raise ImageError(
            "unreadable", f"cannot read image {path}: the file is empty (0 bytes); copy it again"
        )
    try:
        arr, file_axes = _axes_from_file(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is "unreadable", named
        raise _read_error(path, exc) from None
    ax = axes.upper() if axes else file_axes.upper()
    if arr.ndim == 2 and not axes:
        ax = "YX"
    if len(ax) != arr.ndim:
        raise ImageError(
            "bad-axes",
            f"{path}: image has shape {arr.shape} but axes {ax!r}; set ingest.axes (e.g. ZCYX)",
        )
    ax = ax.replace("S", "C")
    # drop singleton axes we do not know (T, Q, I, ...); anything else is ambiguous
    for i in reversed(range(arr.ndim)):
        if ax[i] not in "ZCYX":
            if arr.shape[i] != 1:
                raise ImageError(
                    "bad-axes",
                    f"{path}: axis {ax[i]!r} of shape {arr.shape} (axes {ax}) is "
                    "neither Z nor channel; set ingest.axes (e.g. ZCYX)",
                )
            arr = arr.squeeze(i)
            ax = ax[:i] + ax[i + 1 :]
    if len(set(ax)) != len(ax) or "Y" not in ax or "X" not in ax:
        raise ImageError(
            "bad-axes", f"{path}: cannot use axes {ax!r} for shape {arr.shape}; set ingest.axes"
        )
    for a in "ZC":
        if a not in ax:
            arr = arr[None]
            ax = a + ax
    arr = np.transpose(arr, [ax.index(a) for a in "ZCYX"])
    if arr.dtype.kind not in "buif":
        raise ImageError("bad-dtype", f"{path}: pixel type {arr.dtype} is not numeric")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ImageError("nan-pixels", f"{path}: {int(bad.sum())} NaN/inf pixel(s)")
    return arr


# --------------------------------------------------------------------------------------------------
# Z projection
# --------------------------------------------------------------------------------------------------


def focus_score(stack: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian of each slice of a (Z, H, W) stack: higher is sharper."""
    return np.array([ndi.laplace(s.astype(np.float32, copy=False)).var() for s in stack])


def project_z(stack: np.ndarray, mode: str) -> tuple[np.ndarray, int]:
    """Project a (Z, H, W) stack to (H, W).

    Args:
        stack: the slices of one channel.
        mode: 'max', 'mean', 'middle' or 'best-focus' (the slice with the largest variance of
            Laplacian).

    Returns:
        (image, index of the slice used; -1 for max/mean).
    """
    if mode not in Z_PROJECTIONS:
        raise IngestError(f"unknown ingest.z_projection {mode!r}; use one of {Z_PROJECTIONS}")
    if len(stack) == 1:
        return stack[0], 0
    if mode == "max":
        return stack.max(axis=0), -1
    if mode == "mean":
        return stack.mean(axis=0), -1
    i = len(stack) // 2 if mode == "middle" else int(np.argmax(focus_score(stack)))
    return stack[i], i


def load_fov_image(
    fov: dict, channels: list[str], z_projection: str, axes: str = ""
) -> tuple[np.ndarray, dict]:
    """Read all files of one field of view and project Z, giving a float32 (C, H, W) image.

    Files are grouped by their `channel` value in the order of `channels`; a file may itself hold
    several channels (when the regex has no channel group) and/or several Z-slices.

    Returns:
        (image, info with 'focus_z': the slice used per output channel (-1 for max/mean) and
        'dtypes': the files' pixel type per output channel).

    Raises:
        ImageError: a file cannot be read, holds several channels (or Z-slices) where its name
            gives one, or the files' sizes or slice counts disagree.
    """
    planes, focus, dtypes, shape = [], [], [], None
    for ch in channels:
        stacks, kinds = [], set()
        for f in (f for f in fov["files"] if f["channel"] == ch):
            raw = read_image_raw(f["path"], axes)
            kinds.add(raw.dtype.name)
            arr = raw.astype(np.float32, copy=False)
            one_c, one_z = f["channel"] != "", f.get("z", "") != ""
            if (one_c and arr.shape[1] != 1) or (one_z and arr.shape[0] != 1):
                raise ImageError(
                    "bad-axes",
                    f"{f['relpath']}: expected a 2-D image (its name gives one channel"
                    f"{' and one Z-slice' if one_z else ''}) but it holds {arr.shape[0]} Z x "
                    f"{arr.shape[1]} channel planes of {arr.shape[2]}x{arr.shape[3]}; save one "
                    "plane per file, or drop the channel/z group from ingest.pattern and set "
                    "ingest.axes",
                )
            if shape is None:
                shape, first = arr.shape[2:], f["relpath"]
            elif arr.shape[2:] != shape:
                raise ImageError(
                    "size-mismatch",
                    f"{f['relpath']} is {arr.shape[2]}x{arr.shape[3]} but "
                    f"{first} is {shape[0]}x{shape[1]} in the same field of view",
                )
            stacks.append(arr)
        zc = np.concatenate(
            stacks, axis=0
        )  # (Z, C_file, H, W): Z-slices from separate files stack up
        for c in range(zc.shape[1]):
            img, zi = project_z(zc[:, c], z_projection)
            planes.append(img)
            focus.append(zi)
            dtypes.append("+".join(sorted(kinds)))
    return np.stack(planes).astype(np.float32, copy=False), {"focus_z": focus, "dtypes": dtypes}


# --------------------------------------------------------------------------------------------------
# Illumination correction
# --------------------------------------------------------------------------------------------------


def downscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Block-mean downscale of (C, H, W) by an integer factor (partial edge blocks are cropped)."""
    from skimage.transform import downscale_local_mean

    f = max(1, int(factor))
    h, w = img.shape[1:]
    if h < f or w < f:  # smaller than one block: the image's mean
        return img.mean(axis=(1, 2), keepdims=True)
    # crop to whole blocks first: downscale_local_mean pads a partial block with zeros, which would
    # darken the last row and column of the illumination function
    return downscale_local_mean(img[:, : h // f * f, : w // f * f], (1, f, f))


def illumination_function(mean_small: np.ndarray, filter_size: int = 0) -> np.ndarray:
    """Smooth illumination function (C, h, w) from the average downscaled image of a plate.

    Args:
        mean_small: average of the plate's downscaled images, (C, h, w).
        filter_size: median filter size in downscaled pixels (0 = a tenth of the shorter side, odd,
            >= 3): large enough to average out cells, small enough to follow vignetting.

    Returns:
        (C, h, w) float32 with mean 1 per channel, floored at 5% of the mean so that empty corners
        do not blow up on division.
    """
    c, h, w = mean_small.shape
    size = filter_size or max(3, (min(h, w) // 10) | 1)
    out = np.empty_like(mean_small, dtype=np.float32)
    for i in range(c):
        sm = ndi.median_filter(mean_small[i].astype(np.float32), size=size, mode="nearest")
        sm = ndi.gaussian_filter(sm, size / 4, mode="nearest")  # remove the median filter's steps
        m = float(sm.mean())
        out[i] = np.maximum(sm / m, 0.05) if m > 0 else 1.0
    return out


# Upsampled illumination functions, by (function's digest, target shape). Every field of a plate is
# divided by the same upsampled function; interpolating it again for each field was ~5% of a 512 px
# two-channel field's ingest time. A few entries: a task's fields come from one plate or a few.
_UPSAMPLED: dict[tuple, np.ndarray] = {}


def upsample(func: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(C, h, w) -> (C, H, W) by bilinear interpolation (the function is smooth); read-only, cached."""
    c, h, w = func.shape
    key = (func.shape, func.dtype.str, tuple(shape), hashlib.blake2b(func.tobytes()).digest())
    if key not in _UPSAMPLED:
        zoom = (1, shape[0] / h, shape[1] / w)
        out = ndi.zoom(func, zoom, order=1, mode="nearest", grid_mode=True)[
            :, : shape[0], : shape[1]
        ]
        out.flags.writeable = False
        if len(_UPSAMPLED) >= 4:
            _UPSAMPLED.pop(next(iter(_UPSAMPLED)))
        _UPSAMPLED[key] = out
    return _UPSAMPLED[key]


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


def percentiles(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Per-channel (lo, hi) percentiles of a (C, ...) array as a (C, 2) float64 array."""
    flat = img.reshape(img.shape[0], -1)
    return np.percentile(flat, [lo, hi], axis=1).T.astype(np.float64)


def to_dtype(img: np.ndarray, lohi: np.ndarray, dtype: str) -> np.ndarray:
    """Affine map (x - lo) / (hi - lo) per channel, clipped to [0, 1], scaled to the int type."""
    if dtype not in OUT_DTYPES:
        raise IngestError(f"unknown ingest.dtype {dtype!r}; use one of {sorted(OUT_DTYPES)}")
    dt = OUT_DTYPES[dtype]
    lo = lohi[:, 0].reshape(-1, *([1] * (img.ndim - 1))).astype(np.float32)
    span = np.maximum(lohi[:, 1] - lohi[:, 0], 1e-6).reshape(lo.shape).astype(np.float32)
    x = (img - lo) / span
    return np.rint(np.clip(x, 0.0, 1.0) * np.iinfo(dt).max).astype(dt)


# --------------------------------------------------------------------------------------------------
# Scale check
# --------------------------------------------------------------------------------------------------

SCALE_CHECKS = typing.get_args(ScaleCheck)
SCALE_PERCENTILE = 99.0  # per-field "high" intensity: the brightest cells, not a few hot pixels
_SCALE_MADS = 5.0  # and also this many robust sds from the plate's median (broad plates)
_MIN_FIELDS = 3  # a majority needs at least three fields to be told from the odd one


def field_scale(img: np.ndarray, dtypes: list[str]) -> dict:
    """A field's pixel types and the log10 of each channel's 99th percentile (of a (C, H, W) image).

    The percentile is taken on a regular grid of at most ~256k pixels per channel: plenty for a
    check that looks for factors of 20, and cheap enough to repeat in the crop pass.
    """
    step = max(1, int(np.sqrt(img.shape[1] * img.shape[2] / 262144)))
    grid = img[:, ::step, ::step]
    hi = np.percentile(grid.reshape(grid.shape[0], -1), SCALE_PERCENTILE, axis=1)
    return {
        "dtypes": list(dtypes),
        "log_hi": [float(np.log10(max(float(v), 1e-6))) for v in hi],
    }


def scale_reference(fields: list[dict], fold: float) -> dict | None:
    """Robust summary of one plate's `field_scale`s: median and tolerance per channel, pixel types.

    A field is out of scale when a channel's log10 high percentile is further from the plate's
    median than both log10(`fold`) and 5 robust sds (1.4826 MAD) of the plate's fields, or when its
    pixel types differ from those of most of the plate's fields. None when the plate has fewer than
    three fields (no majority to compare with).
    """
    if len(fields) < _MIN_FIELDS:
        return None
    logs = np.array([f["log_hi"] for f in fields], np.float64)
    med = np.median(logs, axis=0)
    mad = np.median(np.abs(logs - med), axis=0) * 1.4826
    tol = np.maximum(_SCALE_MADS * mad, np.log10(max(float(fold), 1.0 + 1e-9)))
    kinds = [",".join(f["dtypes"]) for f in fields]
    top = max(set(kinds), key=kinds.count)
    return {
        "median": med.tolist(),
        "tol": tol.tolist(),
        "dtypes": top if 2 * kinds.count(top) > len(kinds) else "",
        "n_fields": len(fields),
    }


def scale_problem(field: dict, ref: dict | None, names: list[str]) -> str:
    """Why `field` (a `field_scale`) is far outside its plate's `ref`, or '' when it is not."""
    if ref is None:
        return ""
    kinds = ",".join(field["dtypes"])
    if ref["dtypes"] and kinds != ref["dtypes"]:
        return (
            f"pixel type {kinds} differs from the {ref['dtypes']} of most fields on its plate "
            f"({ref['n_fields']} fields)"
        )
    for name, v, m, t in zip(names, field["log_hi"], ref["median"], ref["tol"]):
        if abs(v - m) > t:
            return (
                f"channel {name!r}: 99th percentile {10**v:.4g} is {10 ** abs(v - m):.3g}x "
                f"{'above' if v > m else 'below'} the median {10**m:.4g} of the "
                f"{ref['n_fields']} fields on its plate"
            )
    return ""


def crop_flags(crops: np.ndarray) -> dict:
    """Per channel, how many crops are all zero and how many are mostly (> 50%) at the maximum.

    A channel that is all zero or saturated in many crops means the normalisation range does not
    fit those cells (a field at another scale, percentiles set too tight).
    """
    n, c = crops.shape[:2]
    if n == 0:
        return {"all_zero": [0] * c, "saturated": [0] * c}
    flat = crops.reshape(n, c, -1)
    top = np.iinfo(crops.dtype).max
    return {
        "all_zero": (flat.max(axis=2) == 0).sum(axis=0).astype(int).tolist(),
        "saturated": ((flat == top).mean(axis=2) > 0.5).sum(axis=0).astype(int).tolist(),
    }
