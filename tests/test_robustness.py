"""Segmentation robustness to simulated plate effects on fields without masks:
`raycell.ingest.robustness.perturbation_robustness`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA

from raycell.data import batch_effects as be
from raycell.errors import UserError
from raycell.ingest.robustness import (
    perturb,
    perturbation_robustness,
    strength_levels,
    to_units,
    write_robustness,
)

HUMAN = SHARED_DATA / "cellprofiler_examples" / "ExampleHuman"


def _disks(size: int = 128, n: int = 12, r: float = 5.0, seed: int = 0) -> np.ndarray:
    """(2, size, size): separated nuclei (channel 0) and larger cell bodies around them (1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    nuc, cyto = np.zeros((2, size, size), np.float32)
    k = int(np.ceil(np.sqrt(n)))
    step = size / k
    for i in range(n):
        cy = (i // k + 0.5) * step + rng.uniform(-3, 3)
        cx = (i % k + 0.5) * step + rng.uniform(-3, 3)
        d = np.hypot(yy - cy, xx - cx)
        nuc = np.maximum(nuc, 0.7 / (1 + np.exp((d - r) / 0.8)))
        cyto = np.maximum(cyto, 0.5 / (1 + np.exp((d - 2.2 * r) / 1.0)))
    img = np.stack([nuc, cyto]) + 0.05
    return (img + rng.normal(0, 0.01, img.shape)).astype(np.float32)


def test_scores_each_mechanism_level_and_method_on_a_synthetic_field():
    kw = dict(
        effects=("debris", "crosstalk"),
        seeds=(0, 1),
        levels=("seen-low", "unseen"),
        crosstalk_from=1,
    )
    res = perturbation_robustness([_disks()], **kw)
    json.dumps(res)  # JSON-able as it is
    assert res["clean"] == [
        {
            "image": "image0",
            "diameter": res["clean"][0]["diameter"],
            "raycell_objects": 12,
            "otsu-watershed_objects": 12,
        }
    ]
    rows = {(r["mechanism"], r["level"], r["method"]): r for r in res["rows"]}
    assert len(rows) == 2 * 2 * 2 and res["skipped"] == []
    for r in rows.values():
        assert 0 <= r["f1_mean"] <= 1 and len(r["f1_per_seed"]) == 2 and r["n_clean"] == 2 * 12
    assert rows[("debris", "unseen", "raycell")]["strength"] == pytest.approx(20.0)
    # more debris, more objects changed: the unseen extreme scores below the seen range's low end
    for m in ("raycell", "otsu-watershed"):
        assert rows[("debris", "unseen", m)]["f1_mean"] < rows[("debris", "seen-low", m)]["f1_mean"]
    assert res["table"].startswith(
        "| mechanism | level | strength | raycell F1 | Otsu + watershed F1 |"
    )
    assert "| debris | unseen | 20 |" in res["table"]
    # deterministic under the seeds, and a case's draw does not depend on the other cases run
    again = perturbation_robustness([_disks()], **{**kw, "effects": ("debris",)})
    assert again["rows"] == [r for r in res["rows"] if r["mechanism"] == "debris"]


def test_one_channel_skips_crosstalk_with_the_reason(tmp_path):
    res = perturbation_robustness(
        [_disks()[0]],
        effects=("crosstalk", "vignetting"),
        seeds=(0,),
        levels=("unseen",),
        methods=("otsu-watershed",),
    )
    assert [r["mechanism"] for r in res["rows"]] == ["vignetting"]
    assert res["skipped"][0]["mechanism"] == "crosstalk"
    assert "Skipped crosstalk: no second channel" in res["table"]
    assert "raycell" not in res["table"]
    js, md = write_robustness(res, tmp_path / "out")
    assert json.loads(js.read_text())["rows"] == res["rows"] and md.read_text() == res["table"]


def test_perturbations_act_in_their_direction():
    x = to_units(_disks())
    assert np.percentile(x[0], 99.5) == pytest.approx(0.8, rel=1e-4)
    rng = np.random.default_rng(0)
    vig = perturb(rng, x, "vignetting", 0.8)
    assert (vig <= x[0] + 1e-6).all() and vig.mean() < 0.9 * x[0].mean()
    tex = perturb(rng, x, "texture", 0.5, diameter=10.0)
    assert (tex >= x[0] - 1e-6).all() and np.percentile(tex - x[0], 99) == pytest.approx(
        0.5, rel=0.05
    )
    noisy = perturb(rng, x, "shot_noise", 0.25)
    assert abs(noisy.mean() - x[0].mean()) < 0.02 and (noisy - x[0]).std() > 0.02
    bleed = perturb(rng, x, "crosstalk", 0.5)
    assert np.allclose(bleed, x[0] + 0.5 * x[1], atol=1e-6)
    assert [lv for lv, _ in strength_levels("gamma")] == ["seen-low", "seen-high", "unseen"]
    lo, hi, cap = be.strength_range("gamma")
    assert strength_levels("gamma") == [("seen-low", lo), ("seen-high", hi), ("unseen", 2.5 * hi)]
    assert strength_levels("gamma", unseen_extreme=10)[2][1] == cap  # never past the physical cap


@pytest.mark.parametrize(
    "args, kw, match",
    [
        ([np.zeros((32, 32))], dict(effects=("blur",)), r"unknown effect\(s\) \['blur'\]"),
        ([np.zeros((32, 32))], dict(levels=("extreme",)), r"unknown level\(s\) \['extreme'\]"),
        ([np.zeros((32, 32))], dict(methods=("cellpose",)), r"unknown method\(s\) \['cellpose'\]"),
        (
            [np.zeros(40)],
            {},
            r"image 0 must be \(H, W\) or \(C, H, W\) with H, W >= 16, got shape \(40,\)",
        ),
        ([np.zeros((2, 32, 32))], dict(crosstalk_from=2), r"image 0 has 2 channel\(s\)"),
        ("/nonexistent/*.tif", {}, r"--images '/nonexistent/\*.tif' matches no image files"),
        ([np.zeros((32, 32))], dict(unseen_extreme=1.0), r"unseen_extreme must be > 1, got 1.0"),
    ],
)
def test_bad_inputs_give_one_line_errors(args, kw, match):
    with pytest.raises(UserError, match=match) as e:
        perturbation_robustness(args, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(
    not HUMAN.is_dir(), reason=f"shared data not found: {HUMAN} (set RAYCELL_SHARED_DATA)"
)
def test_real_example_human_nuclei():
    """Real HT29 nuclei (CellProfiler ExampleHuman, DNA channel d0), cell stain d2 bleeding in."""
    res = perturbation_robustness(
        str(HUMAN / "*d0.tif"),
        effects=("crosstalk", "debris"),
        seeds=(0,),
        levels=("unseen",),
        crosstalk_from="d0.tif=d2.tif",
    )
    assert res["images"] == ["AS_09125_050116030001_D03f00d0.tif"] and res["skipped"] == []
    clean = res["clean"][0]
    assert clean["raycell_objects"] > 150 and clean["otsu-watershed_objects"] > 150
    assert 5 < clean["diameter"] < 30  # nuclei of ~12 px
    for r in res["rows"]:
        assert 0 < r["f1_mean"] <= 1 and r["n_clean"] == clean[f"{r['method']}_objects"]
    with pytest.raises(UserError, match=r"--crosstalk-from 'd1=d9' must be OLD=NEW with OLD in"):
        perturbation_robustness(str(HUMAN / "*d0.tif"), crosstalk_from="d1=d9")
