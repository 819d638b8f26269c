"""Segmentation against expert masks of real fluorescence nuclei, and the mechanisms behind it.

`dsb2018_stardist` (from a PyPI wheel) ships in the repository (tests/data/nuclei_real, origin and
licences in its README) and is the set the segmentation was studied on. The held-out sets
(`bbbc039_crop`, `aitslab_bioimaging1`) were fetched from public GitHub repositories and so are kept
out of git: with the shared data (`$RAYCELL_SHARED_DATA/nuclei_real/<set>`) or in the git-ignored
`data/nuclei_real/<set>` of a checkout; their tests skip where neither is present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from scipy import ndimage as ndi

from raycell.ingest.segment import _filter_sizes, foreground, segment_nuclei
from raycell.ingest.segmentation_eval import evaluate_pairs

REAL = Path(__file__).parent / "data" / "nuclei_real"
SHARED_REAL = SHARED_DATA / "nuclei_real"
LOCAL_REAL = Path(__file__).resolve().parents[1] / "data" / "nuclei_real"  # git-ignored


def _set_dir(name: str) -> Path:
    """The set's folder: in the repository, else with the shared data (skip if neither)."""
    for root in (REAL, SHARED_REAL, LOCAL_REAL):
        if (root / name / "images").is_dir():
            return root / name
    pytest.skip(
        f"real nuclei set {name!r} not found in {REAL}, {SHARED_REAL} (RAYCELL_SHARED_DATA) or "
        f"{LOCAL_REAL}: fetched sets are kept out of git (tests/data/nuclei_real/README.md)"
    )


def _score(name: str, method: str) -> dict:
    d = _set_dir(name)
    return evaluate_pairs(str(d / "images"), str(d / "masks"), method=method)["overall"]


# (set, F1 floor, recall floor): the default settings, IoU 0.5
@pytest.mark.parametrize(
    "name,f1,recall", [("dsb2018_stardist", 0.85, 0.76), ("bbbc039_crop", 0.90, 0.90)]
)
def test_default_segmentation_on_real_nuclei_with_expert_masks(name, f1, recall):
    ours = _score(name, "raycell")
    base = _score(name, "otsu-watershed")
    assert ours["f1"] >= f1 and ours["recall"] >= recall, ours
    assert ours["f1"] > base["f1"] and ours["precision"] >= 0.9, (ours, base)


# held out, with the shared data: 2 Aitslab-bioimaging1 fields (U2OS, Hoechst, CX7; expert outlines
# of nuclei, fragments and micronuclei). Measured: P / R / F1 0.814 / 0.760 / 0.786; Otsu +
# watershed 0.884 / 0.813 / 0.847. The floors guard against regressions only.
def test_default_segmentation_on_held_out_aitslab_fields():
    ours = _score("aitslab_bioimaging1", "raycell")
    assert ours["f1"] >= 0.77 and ours["recall"] >= 0.74 and ours["precision"] >= 0.79, ours


@pytest.mark.xfail(
    strict=True,
    reason="known gap: on the held-out Aitslab fields raycell (F1 0.786) is below Otsu + watershed "
    "(0.847): micronuclei and fragments cut away by the half-maximum edge or the area limits, "
    "see docs/ingest.md",
)
def test_held_out_aitslab_fields_beat_otsu_watershed():
    ours = _score("aitslab_bioimaging1", "raycell")
    base = _score("aitslab_bioimaging1", "otsu-watershed")
    assert ours["f1"] > base["f1"], (ours, base)


def _disc(shape, centre, radius, blur=1.5):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius**2).astype(np.float32)
    return ndi.gaussian_filter(d, blur)


def _bright_and_dim_pair(seed=0):
    """A bright nucleus touching a dim one (a quarter as bright), plus a lone dim one."""
    rng = np.random.default_rng(seed)
    shape = (160, 160)
    img = 10 + 200 * _disc(shape, (60, 50), 12) + 50 * _disc(shape, (60, 77), 12)
    img += 50 * _disc(shape, (120, 110), 12)
    return img + rng.normal(0, 2, shape).astype(np.float32)


def test_dim_nucleus_touching_a_bright_one_is_kept():
    # at the detection threshold the pair is one component; refined as one, its edge is half the
    # bright nucleus' peak, above the whole dim nucleus, which vanished. Per intensity basin, each
    # nucleus is cut at half its own peak.
    img = _bright_and_dim_pair()
    x = img - np.median(img)
    per_component = foreground(x, peak_q=0.95, noise=1.0)
    per_basin = foreground(x, peak_q=0.95, noise=1.0, split_sigma=3.0, split_min_area=700)
    assert not per_component[60, 80]  # the mechanism that lost it
    assert per_basin[60, 80] and per_basin[60, 45]
    labels, d = segment_nuclei(img)
    assert labels.max() == 3, (labels.max(), d)
    assert len({labels[60, 47], labels[60, 80], labels[120, 110]} - {0}) == 3


def test_lone_nucleus_with_texture_beside_it_is_not_split_off():
    # a component with room for one object only is refined whole, as before: a bump of texture
    # at its side is cut away with the nucleus' half-maximum
    img = 10 + 200 * _disc((100, 100), (50, 50), 12)
    img += 40 * _disc((100, 100), (50, 66), 5, blur=3)
    x = img - 10
    fg = foreground(x, peak_q=0.95, noise=1.0, split_sigma=3.0, split_min_area=1.5 * np.pi * 144)
    lab, n = ndi.label(fg)
    assert n == 1 and not fg[50, 68]


def test_nucleus_cut_by_the_border_is_kept_a_border_speck_is_not():
    labels = np.zeros((100, 100), np.int32)
    labels[0:4, 30:50] = 1  # a 24 px nucleus cut down to a 4 px high cap: 80 px, 20 px contact
    labels[0:3, 80:83] = 2  # a 3 px speck on the border
    labels[40:64, 40:64] = 3  # a whole nucleus
    d = 24.0
    lo = 0.25 * np.pi * (d / 2) ** 2  # 113 px
    out = _filter_sizes(labels, lo, 1e9, d)
    assert out.max() == 2 and out[1, 40] > 0 and out[1, 81] == 0 and out[50, 50] > 0
    assert _filter_sizes(labels, lo, 1e9).max() == 1  # without d: no exemption
