"""Synthetic raw fields of view: layout, determinism, focus truth, segmentation against truth, and
the varied batch-effect mechanisms (`raycell.data.batch_effects`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from raycell.data import batch_effects as be
from raycell.data.synthetic_raw import DEFAULT_PATTERN, write_synthetic_raw
from raycell.ingest.images import load_fov_image
from raycell.ingest.segmentation_eval import evaluate_segmentation, match_instances
from raycell.ingest.sources import discover, group_fovs

# seed 11: not a seed anything was developed on
# the easy images (basic effects): the F1 >= 0.9 and exact best-focus checks below rely on them
RAW = dict(
    seed=11,
    n_batches=2,
    n_lines=4,
    wells=2,
    fields=2,
    fov_size=256,
    cells_per_fov=24,
    effects="basic",
)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw") / "synth_raw"
    write_synthetic_raw(out, **RAW)
    return out


def _digest(folder: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(folder.rglob("*.tif")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_and_platemap(raw):
    info = json.loads((raw / "raw.json").read_text())
    assert info["n_fovs"] == 8
    pm = pd.read_csv(raw / "platemap.csv", dtype=str)
    assert {"plate", "well", "line", "label", "dose", "time"} <= set(pm.columns)
    files, unmatched = discover(raw / "images", DEFAULT_PATTERN)
    assert unmatched.empty and len(files) == 8 * 2 * 3  # FOVs x channels x Z
    fovs, rejects = group_fovs(files, ["nucleus", "cytoplasm"])
    assert len(fovs) == 8 and not rejects
    for f in fovs:  # masks are named by the FOV id ingest derives from the default pattern
        assert (raw / "masks" / f"{f['fov_id']}_nuclei.tif").is_file()
        cells = tifffile.imread(raw / "masks" / f"{f['fov_id']}_cells.tif")
        nuclei = tifffile.imread(raw / "masks" / f"{f['fov_id']}_nuclei.tif")
        assert cells.max() > 3
        # every nucleus pixel lies inside the cell with the same label
        assert np.all(cells[nuclei > 0] == nuclei[nuclei > 0])


def test_deterministic(raw, tmp_path):
    again = tmp_path / "again"
    write_synthetic_raw(again, **RAW)
    assert _digest(again) == _digest(raw)
    with pytest.raises(FileExistsError):
        write_synthetic_raw(again, seed=11)


def test_best_focus_finds_the_focal_plane(raw):
    truth = pd.read_csv(raw / "truth.csv", dtype={"field": str}).set_index("fov_id")
    assert truth.focal_z.nunique() > 1  # the focal plane varies between fields
    files, _ = discover(raw / "images", DEFAULT_PATTERN)
    fovs, _ = group_fovs(files, ["nucleus", "cytoplasm"])
    for f in fovs:
        _, info = load_fov_image(f, ["nucleus", "cytoplasm"], "best-focus")
        assert info["focus_z"] == [truth.loc[f["fov_id"], "focal_z"]] * 2


def test_segmentation_f1_against_truth(raw):
    res = evaluate_segmentation(raw, iou=0.5, z_projection="best-focus")
    print({k: res[k] for k in ("nuclei", "cells")})
    assert res["n_fovs"] == 8
    assert res["nuclei"]["f1"] >= 0.9, res["nuclei"]
    assert res["cells"]["f1"] >= 0.9, res["cells"]
    # per imaging batch too: the pooled score hides a batch whose effect breaks the segmentation
    batches = {row["batch"] for row in res["per_fov"]}
    assert set(res["per_batch"]) == batches and len(batches) >= 2
    assert sum(v["nuclei"]["n_true"] for v in res["per_batch"].values()) == res["nuclei"]["n_true"]


def test_match_instances_known_answers():
    a = np.zeros((20, 20), np.int32)
    a[2:6, 2:6] = 1
    a[10:16, 10:16] = 2
    assert match_instances(a, a)["f1"] == 1.0
    b = np.zeros_like(a)
    b[2:6, 3:7] = 5  # IoU 12/20 = 0.6 with object 1
    b[0:2, 18:20] = 7  # a false positive
    r = match_instances(b, a)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 1)
    assert r["precision"] == 0.5 and r["recall"] == 0.5
    assert match_instances(np.zeros_like(a), a)["recall"] == 0.0
    with pytest.raises(ValueError):
        match_instances(a, a[:10])


# --------------------------------------------------------------------------------------------------
# Varied batch effects: each mechanism on a small array, then the generator's per-batch mix
# --------------------------------------------------------------------------------------------------


def _img(seed: int = 0) -> np.ndarray:
    """(2, 64, 64) float32 in [0, 1]: two channels with different bright squares."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.1, (2, 64, 64)).astype(np.float32)
    x[0, 10:20, 10:20] += 0.8
    x[1, 40:55, 30:50] += 0.6
    return x


def test_background_texture_is_smooth_bright_blobs():
    t = be.background_texture(np.random.default_rng(1), (128, 128), 12.0, 0.5)
    assert t.shape == (128, 128) and t.dtype == np.float32 and t.min() >= 0
    assert np.percentile(t, 99) == pytest.approx(0.5, rel=1e-5)
    assert 0.2 < (t > 0).mean() < 0.8  # patches and gaps, not a constant offset
    # smooth at the scale asked: neighbouring pixels nearly equal, far ones not
    assert np.abs(np.diff(t, axis=0)).mean() < 0.05 * t.max()
    again = be.background_texture(np.random.default_rng(1), (128, 128), 12.0, 0.5)
    assert np.array_equal(t, again)
    assert not be.background_texture(np.random.default_rng(1), (32, 32), 4.0, 0.0).any()


def test_crosstalk_raises_channel_correlation():
    x = _img()
    mix = np.array([[1.0, 0.4], [0.0, 1.0]])  # 40% of the cytoplasm seen in the nucleus channel
    y = be.crosstalk(x, mix)
    assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= 0
    r = lambda a: np.corrcoef(a[0].ravel(), a[1].ravel())[0, 1]  # noqa: E731
    assert r(y) > r(x) + 0.2
    assert np.array_equal(y[1], x[1])  # the other direction is off
    assert np.array_equal(be.crosstalk(x, np.eye(2)), x)
    with pytest.raises(ValueError, match="2x2"):
        be.crosstalk(x, np.eye(3))


def test_debris_specks_and_blobs():
    d, n = be.debris(np.random.default_rng(2), (200, 200), 5.0, blob_ratio=0.2)
    assert d.shape == (200, 200) and d.dtype == np.float32 and d.min() >= 0
    assert n["n_specks"] > 5 and n["n_blobs"] >= 1
    assert d.max() >= 0.5  # bright specks
    d2, n2 = be.debris(np.random.default_rng(2), (200, 200), 5.0, blob_ratio=0.2)
    assert np.array_equal(d, d2) and n == n2
    assert not be.debris(np.random.default_rng(2), (50, 50), 0.0)[0].any()


def test_gamma_keeps_range_and_endpoints():
    x = np.linspace(0, 1, 101, dtype=np.float32)
    for g in (0.5, 2.0):
        y = be.gamma(x, g)
        assert y.dtype == np.float32 and y.min() == 0 and y.max() == pytest.approx(1.0)
        assert np.all(np.diff(y) >= 0)  # monotone
    assert be.gamma(x, 2.0)[50] == pytest.approx(0.25)  # darkens mid-tones
    assert be.gamma(x, 0.5)[25] == pytest.approx(0.5)  # brightens them
    assert be.gamma(np.float32([-0.1]), 2.0)[0] == 0


def test_vignetting_darkens_corners_not_centre():
    x = np.ones((2, 65, 65), np.float32)
    y = be.vignetting(x, 0.6)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y[0, 32, 32] == pytest.approx(1.0)
    assert y[:, 0, 0] == pytest.approx([0.4, 0.4], abs=1e-6)  # the farthest corner loses 60%
    assert y.min() >= 0.4 - 1e-6 and y.max() <= 1.0
    off = be.vignetting(x[0], 0.6, power=4.0, centre=(0.3, 0.3))
    assert off[64, 64] < off[0, 0]  # off-centre: the far corner is darkest


def test_shot_noise_is_poisson_at_low_counts():
    x = np.full((200, 200), 0.5, np.float32)
    y = be.shot_noise(np.random.default_rng(3), x, photons=20.0)  # 10 photons per pixel
    assert y.shape == x.shape and y.dtype == np.float32 and y.min() >= 0
    assert y.mean() == pytest.approx(0.5, rel=0.03)
    assert y.std() == pytest.approx(np.sqrt(10) / 20, rel=0.05)
    assert np.allclose(y * 20, np.rint(y * 20), atol=1e-4)  # whole photons
    assert np.array_equal(y, be.shot_noise(np.random.default_rng(3), x, photons=20.0))
    bright = be.shot_noise(np.random.default_rng(3), x, photons=1e5)
    assert bright.std() < 0.1 * y.std()


def test_unseen_extreme_exceeds_every_seen_batch():
    names = [f"b{i}" for i in range(8)]
    unseen = [i >= 6 for i in range(8)]
    for seed, strength in zip(range(6), (1.0, 1.0, 1.0, 0.5, 2.0, 3.0)):
        rng = np.random.default_rng(seed)
        eff, ext = be.draw_batch_effects(rng, names, unseen, strength=strength)
        for m, (_, _, cap) in be._RANGES.items():  # strong batch effects stay physical
            assert all(0 <= eff[b][m]["strength"] <= cap for b in names)
        assert [e["batch"] for e in ext] == ["b6", "b7"]
        assert len({e["mechanism"] for e in ext}) == 2  # two unseen batches, two mechanisms
        for e in ext:
            seen = [eff[b][e["mechanism"]]["strength"] for b in names[:6]]
            assert eff[e["batch"]][e["mechanism"]]["strength"] == e["strength"]
            assert e["strength"] > max(seen) and e["max_seen"] == max(seen)
            assert e["batch"] in e["note"] and e["mechanism"] in e["note"]
    # no effects at strength 0, and no extremes to report
    eff, ext = be.draw_batch_effects(np.random.default_rng(0), names, unseen, strength=0.0)
    assert not ext and all(p["strength"] == 0 for e in eff.values() for p in e.values())
    with pytest.raises(ValueError, match="unseen_extreme"):
        be.draw_batch_effects(np.random.default_rng(0), names, unseen, unseen_extreme=1.0)


_VARIED = dict(
    seed=4,
    n_batches=3,
    n_lines=2,
    wells=2,
    fields=1,
    fov_size=96,
    cells_per_fov=6,
    n_z=2,
    n_unseen=1,
)


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("varied") / "raw"
    write_synthetic_raw(out, **_VARIED)
    return out


def test_varied_records_effects_and_extremes(varied):
    info = json.loads((varied / "raw.json").read_text())
    assert info["params"]["effects"] == "varied"
    assert info["suggested_unseen"] == ["batch02"]
    eff = info["batch_effects"]
    assert set(eff) == {"batch00", "batch01", "batch02"}
    assert all(set(e) == set(be.MECHANISMS) for e in eff.values())
    (ext,) = info["unseen_extremes"]
    assert ext["batch"] == "batch02"
    m = ext["mechanism"]
    assert eff["batch02"][m]["strength"] == ext["strength"]
    assert ext["strength"] > max(eff[b][m]["strength"] for b in ("batch00", "batch01"))
    truth = pd.read_csv(varied / "truth.csv")
    assert {"n_specks", "n_blobs"} <= set(truth.columns)


def test_varied_is_byte_identical_under_a_seed_and_keeps_the_cells(varied, tmp_path):
    write_synthetic_raw(tmp_path / "again", **_VARIED)
    assert _digest(tmp_path / "again") == _digest(varied)
    assert (tmp_path / "again" / "raw.json").read_bytes() == (varied / "raw.json").read_bytes()
    # basic effects on the same seed: the same cells (masks), different images
    write_synthetic_raw(tmp_path / "basic", effects="basic", **_VARIED)
    for f in sorted((varied / "masks").glob("*.tif")):
        assert f.read_bytes() == (tmp_path / "basic" / "masks" / f.name).read_bytes()
    assert _digest(tmp_path / "basic") != _digest(varied)
    with pytest.raises(ValueError, match="effects"):
        write_synthetic_raw(tmp_path / "bad", effects="hard", **_VARIED)


def test_from_config_defaults_to_varied_with_the_configs_unseen_batches(tmp_path):
    from raycell.config import load_config
    from raycell.data.synthetic_raw import from_config

    cfg = load_config(
        None,
        [
            f"synth.out={tmp_path / 'raw'}",
            "synth.raw=true",
            "synth.n_batches=3",
            "synth.n_unseen=1",
            "synth.n_lines=2",
            "synth.raw_wells=1",
            "synth.raw_fields=1",
            "synth.raw_fov_size=64",
            "synth.raw_cells_per_fov=3",
            "synth.raw_z=1",
        ],
    )
    info = from_config(cfg)
    assert info["params"]["effects"] == cfg.synth.effects
    assert info["suggested_unseen"] == ["batch02"]
    # one batch: nothing to hold out, so no extreme
    one = write_synthetic_raw(
        tmp_path / "one",
        seed=1,
        n_batches=1,
        n_lines=2,
        wells=1,
        fields=1,
        fov_size=64,
        cells_per_fov=3,
        n_z=1,
    )
    assert one["suggested_unseen"] == [] and one["unseen_extremes"] == []
