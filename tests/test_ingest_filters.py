"""The segmentation's fast filters give what the library calls they stand for give."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from raycell.ingest.filters import fill_holes, gaussian, local_gaussian_threshold
from raycell.ingest.segment import _label_quantile, label_median


@pytest.mark.parametrize("shape", [(512, 512), (97, 301)])
@pytest.mark.parametrize("sigma", [0.8, 4.0, 12.5, 33.3, 200.0])
def test_gaussian_is_scipys(shape, sigma):
    """Narrow kernels are scipy's own; wide ones by FFT: float32 bit for bit, float64 to rounding."""
    x = np.random.default_rng(0).gamma(2.0, 50.0, shape)
    for dtype, tol in ((np.float32, 0.0), (np.float64, 1e-12)):
        want = ndi.gaussian_filter(x.astype(dtype), sigma, mode="reflect")
        got = gaussian(x.astype(dtype), sigma)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))


@pytest.mark.parametrize("block", [129, 201])
def test_local_threshold_is_scikit_images(block):
    from skimage import filters

    x = np.random.default_rng(1).gamma(2.0, 50.0, (256, 384)).astype(np.float32)
    want = filters.threshold_local(x, block_size=block, method="gaussian")
    assert np.array_equal(local_gaussian_threshold(x, block), want)


def test_label_statistics_are_scipys():
    """Ties included (a quantised image): the unstable value sort gives the same order statistics."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 20, (128, 128)).astype(np.float32)
    lab, n = ndi.label(rng.random((128, 128)) > 0.6)
    idx = np.arange(1, n + 1)
    np.testing.assert_array_equal(label_median(x, lab, n), ndi.median(x, lab, idx))
    np.testing.assert_array_equal(_label_quantile(x, lab, n, 1.0), ndi.maximum(x, lab, idx))
    np.testing.assert_array_equal(_label_quantile(x, lab, n, 0.0), ndi.minimum(x, lab, idx))


def test_shape_features_are_regionprops():
    """Eccentricity and axis lengths for all objects at once equal regionprops' (lines and dots too)."""
    from skimage.measure import regionprops_table

    from raycell.ingest.crops import _inertia_shape

    rng = np.random.default_rng(3)
    lab, n = ndi.label(ndi.gaussian_filter(rng.random((256, 256)), 3) > 0.52)
    lab[2, 5:9] = n + 1  # a line: minor axis 0
    lab[9, 9] = n + 2  # one pixel: every moment 0
    props = ("label", "eccentricity", "axis_major_length", "axis_minor_length")
    want = regionprops_table(lab, properties=props)
    got = _inertia_shape(lab, want["label"])
    assert n > 20
    for k in props[1:]:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-9, err_msg=k)


def test_fill_holes_is_scipys():
    """Holes (background not connected to the edge, 4-connected) filled as scipy fills them, on blob
    masks with holes, edge-touching background, and all-on / all-off masks."""
    rng = np.random.default_rng(3)
    n_filled = 0
    for t in range(80):
        shape = (64, 64) if t % 2 else tuple(rng.integers(1, 90, 2))
        mask = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.3, 3)) > rng.uniform(0.3, 0.7)
        if t < 2:
            mask[:] = t == 0  # no background at all, then no foreground
        want = ndi.binary_fill_holes(mask)
        assert np.array_equal(fill_holes(mask), want), t
        n_filled += int((want & ~mask).sum())
    assert n_filled > 100  # the masks had holes to fill


def test_perimeter_and_solidity_are_regionprops_bit_for_bit():
    """Perimeter and solidity of all objects at once equal regionprops' exactly: blobs, objects
    touching each other and the image edge, a line, a single pixel."""
    from skimage.measure import regionprops_table

    from raycell.ingest.crops import _perimeter_solidity

    rng = np.random.default_rng(5)
    lab, n = ndi.label(ndi.gaussian_filter(rng.random((200, 240)), 3) > 0.5)
    right = np.arange(lab.shape[1])[None] > 120  # cut each blob in two touching objects
    lab = np.where(lab > 0, lab + right * n, 0)
    lab[2, 5:9] = 2 * n + 1  # a line
    lab[9, 9] = 2 * n + 2  # one pixel
    props = regionprops_table(lab, properties=("label", "perimeter", "solidity"))
    assert len(props["label"]) > 30
    got = _perimeter_solidity(lab, props["label"])
    for k in ("perimeter", "solidity"):
        np.testing.assert_array_equal(got[k], props[k], err_msg=k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_basic_props_are_regionprops_bit_for_bit(dtype):
    """Label, centroid, area and per-channel mean intensity equal regionprops_table's exactly, with
    a gap in the label numbers."""
    from skimage.measure import regionprops_table

    from raycell.ingest.crops import _basic_props

    rng = np.random.default_rng(11)
    lab, n = ndi.label(ndi.gaussian_filter(rng.random((180, 220)), 3) > 0.5)
    lab[lab == 3] = 0
    img = np.moveaxis(rng.gamma(2.0, 100.0, (2, 180, 220)).astype(dtype), 0, -1)
    props = ("label", "centroid", "area", "intensity_mean")
    want = regionprops_table(lab, intensity_image=img, properties=props)
    got = _basic_props(lab, img)
    assert n > 20 and set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
