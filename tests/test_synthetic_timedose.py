import re

import numpy as np
import pytest
from scipy import stats

from raycell import constants as K
from raycell.data.synthetic_timedose import generate_timedose, write_timedose
from raycell.errors import ConfigError, UserError
from raycell.formats.shards import open_dataset

SMALL = dict(n_cells=600, crop_size=32, seed=0)


def _foreground(img):
    """Per-crop cell-body mask: above 40% of the way from the crop's background to its bright end
    (relative, so a batch's gain or offset does not move it)."""
    x = img[:, 1].reshape(len(img), -1).astype(float)
    lo, hi = np.percentile(x, 10, axis=1), np.percentile(x, 99, axis=1)
    return (x > (lo + 0.4 * (hi - lo))[:, None]).reshape(img[:, 1].shape)


@pytest.fixture(scope="module")
def small():
    return generate_timedose(**SMALL)


def test_shape_columns_dtypes(small):
    img, meta, gt = small
    assert img.shape == (600, 2, 32, 32) and img.dtype == np.uint8 and len(meta) == 600
    for col in (
        K.CELL_ID,
        K.BATCH,
        K.PLATE,
        K.WELL,
        K.FIELD,
        K.GROUP,
        K.LABEL,
        K.SPLIT,
        "time",
        "dose",
        "compound",
        "true_dose_effect",
        "true_time_effect",
    ):
        assert col in meta.columns, col
    assert meta["time"].dtype == np.int64 and meta["dose"].dtype == np.float64
    for col in ("true_dose_effect", "true_time_effect"):
        assert meta[col].dtype == np.float64
    assert meta[K.CELL_ID].is_unique
    assert (meta[K.PLATE] == meta[K.BATCH]).all() and (meta[K.FIELD] == "1").all()
    assert (meta[K.SPLIT] == "").all()
    # label is the dose as a class name; group names the condition; DMSO is the zero dose
    assert set(meta[K.LABEL]) == {"0", "0.01", "0.1", "1", "10"}
    assert (meta[K.LABEL].astype(float) == meta["dose"]).all()
    assert (meta[K.GROUP] == "t" + meta["time"].astype(str) + "_d" + meta[K.LABEL]).all()
    assert ((meta["compound"] == "DMSO") == (meta["dose"] == 0)).all()
    assert set(meta["compound"]) == {"DMSO", "cmpdA"}
    assert meta[K.WELL].map(lambda w: bool(re.fullmatch(r"[B-O](0[2-9]|1\d|2[0-3])", w))).all()
    # a (plate, well) holds one condition: wells are unique per batch x time x dose x replicate
    per_well = meta.groupby([K.PLATE, K.WELL])[["time", "dose"]].nunique()
    assert (per_well == 1).all().all()


def test_deterministic_under_seed(small):
    a, ma, ga = small
    b, mb, gb = generate_timedose(**SMALL)
    c, _, _ = generate_timedose(**{**SMALL, "seed": 1})
    assert np.array_equal(a, b) and ma.equals(mb) and ga == gb
    assert not np.array_equal(a, c)


def test_full_design_in_every_batch(small):
    _, meta, gt = small
    assert sorted(meta[K.BATCH].unique()) == [f"batch{b:02d}" for b in range(4)]
    cells = meta.groupby([K.BATCH, "time", "dose"]).size()
    assert len(cells) == 4 * 3 * 5 and cells.min() >= 4  # 600 cells over 120 wells: 5 per well
    wells = meta.groupby([K.BATCH, "time", "dose"])[K.WELL].nunique()
    assert (wells == 2).all()  # replicates
    assert gt["unseen_batches"] == ["batch03"]
    assert [(c["time"], c["dose"]) for c in gt["conditions"]] == [
        (t, d) for t in (24, 48, 72) for d in (0.0, 0.01, 0.1, 1.0, 10.0)
    ]


def test_dose_effect_is_monotone_and_visible(small):
    img, meta, _ = small
    # the truth: strictly increasing in dose at every time point, and growing with time
    for _, g in meta.groupby("time"):
        eff = g.groupby("dose")["true_dose_effect"].agg(["min", "max"]).sort_index()
        assert (eff["max"].to_numpy()[:-1] < eff["min"].to_numpy()[1:]).all()
    top = meta[meta["dose"] == 10].groupby("time")["true_dose_effect"].mean().sort_index()
    assert top.is_monotonic_increasing and top.iloc[-1] > top.iloc[0]
    assert (meta.loc[meta["dose"] == 0, "true_dose_effect"] == 0).all()
    # a hand-made measurement on the rendered crops sees it: cell-body area above a threshold
    area = _foreground(img).sum(axis=(1, 2))
    by_dose = meta.assign(area=area).groupby("dose")["area"].mean()
    assert stats.spearmanr(by_dose.index, by_dose.to_numpy()).statistic > 0.9
    assert by_dose.iloc[-1] > 1.2 * by_dose.iloc[0]
    # ... but single cells of neighbouring doses overlap (not trivially separable)
    a0, a1 = area[meta["dose"] == 0.01], area[meta["dose"] == 0.1]
    assert ((a0 > np.median(a1)).mean()) > 0.1


def test_time_acts_on_the_cell_body_stain(small):
    img, meta, _ = small
    body = img[:, 1].astype(float)
    fg = _foreground(img)
    mean_fg = (body * fg).sum(axis=(1, 2)) / np.maximum(fg.sum(axis=(1, 2)), 1)
    by_time = meta.assign(m=mean_fg).groupby("time")["m"].mean()
    assert by_time.is_monotonic_increasing
    assert meta.groupby("time")["true_time_effect"].nunique().eq(1).all()


def test_batches_add_nuisance(small):
    img, meta, gt = small
    # the darkest tenth of each crop (background) and the brightness differ between batches
    x = img.reshape(len(img), 2, -1).astype(float)
    bg = np.percentile(x[:, 1], 10, axis=1)
    bright = x[:, 0].mean(axis=1)
    groups = [meta[K.BATCH] == b for b in sorted(meta[K.BATCH].unique())]
    assert stats.f_oneway(*[bright[g] for g in groups]).pvalue < 1e-10
    assert stats.f_oneway(*[bg[g] for g in groups]).pvalue < 1e-10
    # no nuisance at batch_strength 0: the batches look alike
    img0, meta0, gt0 = generate_timedose(**{**SMALL, "batch_strength": 0.0})
    assert all(
        b["gain_nuc"] == 1 and b["blur"] == 0 and b["background"] == 0 for b in gt0["batches"]
    )
    x0 = img0[:, 0].reshape(len(img0), -1).mean(axis=1)
    per_batch = meta0.assign(m=x0).groupby(K.BATCH)["m"].mean()
    per_batch_n = meta.assign(m=bright).groupby(K.BATCH)["m"].mean()
    assert per_batch.std() < 0.3 * per_batch_n.std()


def test_write_timedose_shards_and_manifest(tmp_path, small):
    out = tmp_path / "td"
    m = write_timedose(str(out), rows_per_shard=250, **SMALL).to_dict()
    assert m["n_cells"] == 600 and len(m["shards"]) == 3
    assert m["suggested_unseen"] == ["batch03"]
    assert m["weak_label_columns"] == ["time", "dose", "compound"]
    assert m["ground_truth"]["doses"] == [0.0, 0.01, 0.1, 1.0, 10.0]
    assert m["params"]["generator"] == "raycell.data.synthetic_timedose"
    ds = open_dataset(out, check=True)
    imgs, meta = ds.load_images()
    assert meta["time"].dtype == np.int64 and meta["dose"].dtype == np.float64
    img, ref, _ = small
    assert np.array_equal(imgs, img)
    assert (meta[K.CELL_ID].to_numpy() == ref[K.CELL_ID].to_numpy()).all()
    # a second write refuses the finished data set unless asked to overwrite
    with pytest.raises(UserError, match="already holds"):
        write_timedose(str(out), **SMALL)


def test_degenerate_design_still_generates():
    img, meta, _ = generate_timedose(
        n_cells=20,
        crop_size=32,
        times=[24],
        doses=[1.0],
        n_batches=2,
        n_unseen=0,
        replicates=1,
        seed=0,
    )
    assert len(img) == 20 and (meta["true_dose_effect"] == 0).all()
    assert (meta["true_time_effect"] == 0).all()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(doses=[]), "synth.doses is empty"),
        (dict(doses=[0, -1.0]), "synth.doses: -1.0"),
        (dict(doses=[0, float("nan")]), "synth.doses"),
        (dict(doses=[0, 1, 1.0]), "synth.doses lists 1 more than once"),
        (dict(times=[]), "synth.times is empty"),
        (dict(times=[24, 36.5]), "synth.times: 36.5"),
        (dict(n_unseen=4), r"synth.n_unseen must be in \[0, n_batches\), got 4 of 4"),
        (dict(n_unseen=5), "synth.n_unseen"),
        (dict(replicates=0), "synth.replicates"),
        (dict(n_cells=100), "synth.n_cells=100 is fewer than the design's 120 wells"),
        (dict(effect_strength=-1.0), "synth.effect_strength"),
        (dict(crop_size=8), "synth.crop_size"),
    ],
)
def test_bad_arguments_give_one_line_errors(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        generate_timedose(**{**dict(n_cells=600, crop_size=32), **kw})
    assert "\n" not in str(e.value)


def test_varied_effects_keep_the_cells_and_differ_per_batch(small, tmp_path):
    """synth.crop_effects=varied on the time x dose design: same cells and metadata, each batch its own
    mix of mechanisms recorded in the manifest, the unseen batch one beyond any seen batch; basic = before."""
    img, meta, gt = small
    vimg, vmeta, vgt = generate_timedose(**SMALL, effects="varied")
    assert vmeta.drop(columns=[K.CENTROID_Y, K.CENTROID_X]).equals(
        meta.drop(columns=[K.CENTROID_Y, K.CENTROID_X])
    )
    assert vimg.shape == img.shape and not np.array_equal(vimg, img)
    assert np.array_equal(vimg, generate_timedose(**SMALL, effects="varied")[0])  # deterministic
    assert "batch_effects" not in gt and set(vgt["batch_effects"]) == set(meta[K.BATCH])
    mixes = {
        b: tuple(m for m, p in e.items() if p["strength"] > 0)
        for b, e in vgt["batch_effects"].items()
    }
    assert len(set(mixes.values())) > 1  # batches differ in mechanism, not only in strength
    assert [e["batch"] for e in vgt["unseen_extremes"]] == vgt["unseen_batches"]
    m = write_timedose(str(tmp_path / "v"), rows_per_shard=300, effects="varied", **SMALL).to_dict()
    assert m["batch_effects"] == vgt["batch_effects"] and m["params"]["effects"] == "varied"
    assert np.array_equal(open_dataset(tmp_path / "v").load_images()[0], vimg)
    basic = write_timedose(
        str(tmp_path / "b"), rows_per_shard=300, effects="basic", **SMALL
    ).to_dict()
    assert "effects" not in basic["params"] and "batch_effects" not in basic
