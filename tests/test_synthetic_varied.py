"""The crop generator's batch effects: "basic" keeps the bytes it always had, "varied"
adds the mechanisms of `raycell.data.batch_effects` per batch, deterministically, in any chunks."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
from helpers import dataset_fingerprint

from raycell.data import batch_effects as be
from raycell.data.synthetic import BLOCK_CELLS, generate, render_cells, synth_plan, write_synthetic
from raycell.errors import ConfigError
from raycell.formats.shards import open_dataset

# made by the generator before `effects` existed (commit 816250a): "basic" must give these bytes
BASIC_SMALL = dict(n_cells=300, crop_size=16, seed=7)
BASIC_SMALL_SHA1 = "60fefb95d3606d32e50d6a4f1d685041ab1f66f7"
BASIC_TWO_BLOCKS = dict(
    n_cells=BLOCK_CELLS + 40, crop_size=12, seed=11, n_batches=4, n_unseen=1, n_lines=4
)
BASIC_TWO_BLOCKS_SHA1 = "b817315651686bc2e20340357828b35a7f861a9d"
VARIED = dict(n_cells=BLOCK_CELLS + 200, crop_size=16, rows_per_shard=300, seed=3, effects="varied")


def _sha1(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.mark.parametrize(
    "kw, sha1", [(BASIC_SMALL, BASIC_SMALL_SHA1), (BASIC_TWO_BLOCKS, BASIC_TWO_BLOCKS_SHA1)]
)
def test_basic_is_the_bytes_of_before(kw, sha1):
    img, _, gt = generate(**kw)
    assert _sha1(img) == sha1
    assert _sha1(generate(**kw, effects="basic")[0]) == sha1
    assert "batch_effects" not in gt


@pytest.fixture(scope="module")
def varied_one_chunk(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("varied") / "one_chunk"
    write_synthetic(str(out), chunk_cells=10**6, num_workers=0, progress=False, **VARIED)
    return out


def test_varied_is_deterministic_and_keeps_the_cells():
    kw = {k: v for k, v in VARIED.items() if k != "rows_per_shard"}
    a, ma, gt = generate(**kw)
    b, mb, _ = generate(**kw)
    basic, mbasic, _ = generate(**{**kw, "effects": "basic"})
    assert np.array_equal(a, b) and ma.equals(mb)
    # the effects draw from their own streams: same cells, places and metadata, other pixels
    assert ma.equals(mbasic)
    assert not np.array_equal(a, basic)
    assert set(gt["batch_effects"]) == set(ma.batch)
    assert not np.array_equal(a, generate(**{**kw, "seed": 4})[0])


@pytest.mark.parametrize("chunk_cells", [1, 2 * BLOCK_CELLS])
def test_varied_chunking_gives_identical_bytes(varied_one_chunk, tmp_path, chunk_cells):
    out = tmp_path / "chunked"
    write_synthetic(str(out), chunk_cells=chunk_cells, num_workers=0, progress=False, **VARIED)
    assert dataset_fingerprint(out) == dataset_fingerprint(varied_one_chunk)


def test_block_renders_alone_with_varied_effects(varied_one_chunk):
    """Block 1 rendered by itself is what the whole data set holds for its cells."""
    plan, _ = synth_plan(**{k: v for k, v in VARIED.items() if k != "rows_per_shard"})
    alone, _ = plan.render_block(1)
    imgs, _ = open_dataset(varied_one_chunk).load_images()
    assert np.array_equal(alone, imgs[BLOCK_CELLS:])


def test_manifest_records_effects_and_unseen_extremes(varied_one_chunk):
    m = open_dataset(varied_one_chunk, check=True).manifest.to_dict()
    assert m["params"]["effects"] == "varied" and m["params"]["unseen_extreme"] == 2.5
    effs, extremes = m["batch_effects"], m["unseen_extremes"]
    unseen = m["suggested_unseen"]
    assert sorted(e["batch"] for e in extremes) == sorted(unseen) and len(unseen) == 2
    seen = [b for b in effs if b not in unseen]
    for e in extremes:
        # every unseen batch carries one mechanism stronger than every seen batch has it
        assert effs[e["batch"]][e["mechanism"]]["strength"] == pytest.approx(e["strength"])
        assert all(e["strength"] > effs[b][e["mechanism"]]["strength"] for b in seen)
        assert e["mechanism"] in be.MECHANISMS and e["note"].startswith(
            f"unseen batch {e['batch']}"
        )


def test_basic_manifest_has_no_effects(tmp_path):
    m = write_synthetic(
        str(tmp_path / "ds"), n_cells=50, crop_size=16, rows_per_shard=50, progress=False
    ).to_dict()
    assert "effects" not in m["params"] and "batch_effects" not in m and "unseen_extremes" not in m


def _one_mechanism(mechanism: str, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Crops of one plan with every batch given only `mechanism`, and the same crops without it."""
    plan, _ = synth_plan(
        n_cells=240, crop_size=32, n_batches=2, n_unseen=1, seed=1, effects="varied"
    )
    off = {m: {"strength": 0.0} for m in be.MECHANISMS}
    plan.effects = copy.copy(plan.effects)
    plan.effects.per_batch = {
        b: {**off, mechanism: {"strength": 1.0, **params}} for b in plan.batches.batch
    }
    plan.effects.textures = {}
    if mechanism == "texture":
        tex = be.background_texture(np.random.default_rng(0), (512, 512), 8.0, params["strength"])
        plan.effects.textures = {b: tex for b in range(len(plan.batches))}
    with_it = render_cells(plan, 0, plan.n_cells)[0].astype(np.float64)
    plan.effects = None
    return with_it, render_cells(plan, 0, plan.n_cells)[0].astype(np.float64)


def _channel_corr(x: np.ndarray) -> float:
    return float(np.corrcoef(x[:, 0].ravel(), x[:, 1].ravel())[0, 1])


def test_each_mechanism_moves_crops_the_expected_way():
    # crosstalk: the cell-body stain bleeds into the nucleus channel, which then follows it
    mix = [[1.0, 0.6], [0.0, 1.0]]
    x, base = _one_mechanism("crosstalk", {"strength": 0.6, "mix": mix})
    assert _channel_corr(x) > _channel_corr(base) + 0.05
    # shot noise at 25 photons per unit: larger pixel-to-pixel differences
    x, base = _one_mechanism("shot_noise", {"strength": 0.2, "photons": 25.0})
    assert np.abs(np.diff(x, axis=-1)).mean() > 1.5 * np.abs(np.diff(base, axis=-1)).mean()
    # vignetting dims (never brightens) by where the crop is in its field
    x, base = _one_mechanism("vignetting", {"strength": 0.8, "power": 2.0, "centre": [0.5, 0.5]})
    dim = x.mean(axis=(1, 2, 3)) / base.mean(axis=(1, 2, 3))
    assert dim.max() <= 1.01 and dim.min() < 0.85 and dim.std() > 0.02
    # background texture: the background (the crop's corners) gets brighter and uneven
    x, base = _one_mechanism(
        "texture", {"strength": 0.5, "scale_px": 8.0, "channel_weights": [1.0, 1.0]}
    )
    corner = (slice(None), slice(None), slice(0, 6), slice(0, 6))
    assert x[corner].mean() > base[corner].mean() + 5 and x[corner].std() > 2 * base[corner].std()
    # gamma < 1 lifts the dim background relative to the bright cells
    x, base = _one_mechanism("gamma", {"strength": 0.7, "gamma": float(np.exp(-0.7))})
    assert x[corner].mean() > 1.5 * base[corner].mean()
    # debris: bright specks where there were none
    x, base = _one_mechanism("debris", {"strength": 40.0, "channel_weights": [1.0, 0.5]})
    assert (x[corner] > 200).sum() > (base[corner] > 200).sum() + 5


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(effects="strong"), r"synth.effects must be one of basic, varied, got 'strong'"),
        (
            dict(effects="varied", unseen_extreme=1.0),
            r"synth.unseen_extreme must be a number > 1, got 1.0",
        ),
    ],
)
def test_bad_effects_give_one_line_errors(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        write_synthetic(str(tmp_path / "ds"), n_cells=100, crop_size=16, **kw)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "ds").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match=match):
        generate(n_cells=100, crop_size=16, **kw)


@pytest.mark.ray
def test_ray_tasks_write_the_same_varied_bytes(ray_local, varied_one_chunk, tmp_path):
    write_synthetic(str(tmp_path / "ray"), chunk_cells=600, num_workers=2, progress=False, **VARIED)
    assert dataset_fingerprint(tmp_path / "ray") == dataset_fingerprint(varied_one_chunk)
