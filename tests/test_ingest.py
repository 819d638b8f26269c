"""Ingest: sources, pixels, segmentation, crops, the Ray Data pipeline end to end, bad inputs, real
   images.

The end-to-end tests build a small synthetic raw data set, break it in every way SPEC's
"Reliability" lists, ingest it, and check that each broken field of view lands in the rejects table
with the right reason while the rest lands in the shards (n_fovs_in == n_fovs_with_cells +
n_fovs_rejected). Tests on the CellProfiler example images skip when ../shared/data is not there.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
from helpers import raw_ingest_config, write_small_raw

from raycell import constants as K
from raycell.config import load_config
from raycell.data.synthetic_raw import DEFAULT_PATTERN
from raycell.errors import UserError
from raycell.formats.shards import open_dataset
from raycell.ingest import crops as C
from raycell.ingest import images as I
from raycell.ingest.params import IngestParams
from raycell.ingest.segment import SegmentationError, check_backend, segment_nuclei
from raycell.ingest.sources import IngestError, discover, group_fovs, join_platemap, load_platemap

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYCELL_SHARED_DATA", REPO / ".." / "shared" / "data")).resolve()
CP = SHARED / "cellprofiler_examples"


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    # the easy images (basic batch effects): the end-to-end test counts cells and checks their areas
    return write_small_raw(tmp_path_factory.mktemp("ing") / "raw")


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def test_regex_errors(raw, tmp_path):
    with pytest.raises(IngestError, match="matches none"):
        discover(raw / "images", r"(?P<well>ZZZ\d+)")
    with pytest.raises(IngestError, match="not a valid regex"):
        discover(raw / "images", r"(?P<well>[A-")
    with pytest.raises(IngestError, match="no named groups"):
        discover(raw / "images", r"SYN")
    with pytest.raises(IngestError, match="no .tif"):
        discover(tmp_path, DEFAULT_PATTERN)
    with pytest.raises(IngestError, match="not found"):
        discover(tmp_path / "nope", DEFAULT_PATTERN)


def test_grouping_missing_channel_and_z(raw):
    files, _ = discover(raw / "images", DEFAULT_PATTERN)
    drop_z = files.relpath.str.endswith("SYN00_A01_s0_cytoplasm_z2.tif")
    drop_c = files.relpath.str.contains("SYN00_A02_s1_nucleus")
    fovs, rejects = group_fovs(files[~drop_z & ~drop_c], ["nucleus", "cytoplasm"])
    codes = {r["fov_id"]: r["code"] for r in rejects}
    assert codes == {"batch00_SYN00_A01_0": "missing-z", "batch00_SYN00_A02_1": "missing-channel"}
    assert len(fovs) == 6
    # an unselected channel is a file-level reject, not a silent skip
    fovs, rejects = group_fovs(files, ["nucleus"])
    assert len(fovs) == 8 and {r["code"] for r in rejects} == {"channel-not-selected"}
    with pytest.raises(IngestError, match="not found in the file names"):
        group_fovs(files, ["DAPI"])


def test_platemap_errors(raw, tmp_path):
    files, _ = discover(raw / "images", DEFAULT_PATTERN)
    fovs, _ = group_fovs(files, ["nucleus", "cytoplasm"])
    keys = ["batch", "plate", "well", "field"]
    bad = tmp_path / "pm.csv"
    pd.DataFrame({"row": ["A"], "treatment": ["x"]}).to_csv(bad, index=False)
    with pytest.raises(IngestError, match="shares no column"):
        load_platemap(bad, [], keys)
    with pytest.raises(IngestError, match="has no column 'site'"):
        load_platemap(raw / "platemap.csv", ["plate", "site"], keys)
    with pytest.raises(IngestError, match="not a group of ingest.pattern"):
        load_platemap(raw / "platemap.csv", ["plate", "dose"], keys)
    with pytest.raises(IngestError, match="not found"):
        load_platemap(tmp_path / "missing.csv", [], keys)
    dup = tmp_path / "dup.csv"
    pd.DataFrame({"plate": ["SYN00", "SYN00"], "well": ["A1", "A01"], "label": ["a", "b"]}).to_csv(
        dup, index=False
    )
    with pytest.raises(IngestError, match="repeated"):
        load_platemap(dup, [], keys)  # 'A1' and 'A01' are the same well
    pm, on = load_platemap(raw / "platemap.csv", [], keys)
    assert on == ["plate", "well"]
    kept, rejects = join_platemap(fovs, pm[pm.well != "A02"], on, "pm")
    assert len(kept) == 4 and {r["code"] for r in rejects} == {"not-in-platemap"}
    assert kept[0]["meta"]["label"] in ("high", "low") and "dose" in kept[0]["meta"]


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------


def test_read_image_errors(tmp_path):
    good = tmp_path / "g.tif"
    tifffile.imwrite(good, (np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8))
    assert I.read_image(str(good)).shape == (1, 1, 64, 64)
    trunc = tmp_path / "t.tif"
    trunc.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(I.ImageError, match="t.tif") as e:
        I.read_image(str(trunc))
    assert e.value.code == "unreadable"
    garbage = tmp_path / "x.png"
    garbage.write_bytes(b"not a png at all")
    with pytest.raises(I.ImageError) as e:
        I.read_image(str(garbage))
    assert e.value.code == "unreadable"
    nan = tmp_path / "n.tif"
    a = np.ones((32, 32), np.float32)
    a[3, 4] = np.nan
    tifffile.imwrite(nan, a)
    with pytest.raises(I.ImageError, match="NaN") as e:
        I.read_image(str(nan))
    assert e.value.code == "nan-pixels"
    zc = tmp_path / "zc.tif"
    tifffile.imwrite(
        zc, np.zeros((3, 2, 16, 16), np.uint16), imagej=True, metadata={"axes": "ZCYX"}
    )
    assert I.read_image(str(zc)).shape == (3, 2, 16, 16)
    assert I.read_image(str(zc), axes="CZYX").shape == (2, 3, 16, 16)
    with pytest.raises(I.ImageError, match="axes"):
        I.read_image(str(zc), axes="ZYX")


def test_projections_and_focus():
    rng = np.random.default_rng(0)
    sharp = (rng.random((64, 64)) > 0.9).astype(np.float32) * 100
    from scipy import ndimage

    stack = np.stack(
        [ndimage.gaussian_filter(sharp, 3), sharp, ndimage.gaussian_filter(sharp, 1.5)]
    )
    assert I.project_z(stack, "best-focus")[1] == 1
    assert I.project_z(stack, "middle")[1] == 1
    np.testing.assert_allclose(I.project_z(stack, "max")[0], stack.max(0))
    np.testing.assert_allclose(I.project_z(stack, "mean")[0], stack.mean(0), rtol=1e-6)
    with pytest.raises(IngestError, match="z_projection"):
        I.project_z(stack, "sum")


def test_illumination_function_flattens_a_gradient():
    yy, xx = np.mgrid[0:128, 0:128] / 128.0
    illum = (0.5 + xx + 0.3 * yy).astype(np.float32)
    rng = np.random.default_rng(1)
    imgs = [(illum * (100 + 50 * (rng.random((128, 128)) > 0.97)))[None] for _ in range(12)]
    mean_small = np.mean([I.downscale(im, 4) for im in imgs], axis=0)
    func = I.illumination_function(mean_small)
    assert abs(func.mean() - 1) < 1e-3
    flat = imgs[0] / I.upsample(func, (128, 128))
    bg = flat[0][imgs[0][0] < illum * 120]
    assert bg.std() / bg.mean() < 0.05 < (imgs[0][0][imgs[0][0] < illum * 120]).std() / 100


def test_to_dtype():
    x = np.array([[[0.0, 5.0, 10.0, 20.0]]], np.float32)
    out = I.to_dtype(x, np.array([[0.0, 10.0]]), "uint8")
    assert out.dtype == np.uint8 and out.tolist() == [[[0, 128, 255, 255]]]
    assert I.to_dtype(x, np.array([[0.0, 10.0]]), "uint16").max() == 65535


# --------------------------------------------------------------------------------------------------
# Segmentation and crops
# --------------------------------------------------------------------------------------------------


def _disks(shape=(128, 128), centres=((40, 40), (40, 62), (90, 90)), r=10, noise=2.0, seed=0):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.full(shape, 20.0, np.float32)
    truth = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, 1):
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[m] = 120
        truth[m] = i
    from scipy import ndimage

    img = ndimage.gaussian_filter(img, 1.0) + np.random.default_rng(seed).normal(0, noise, shape)
    return img.astype(np.float32), truth


def test_segment_splits_touching_disks_and_estimates_diameter():
    img, truth = _disks()
    lab, d = segment_nuclei(img)
    assert lab.max() == 3  # the two touching disks (centres 22 px apart, r 10) are split
    assert 17 < d < 23
    from raycell.ingest.segmentation_eval import match_instances

    assert match_instances(lab, truth)["f1"] == 1.0


def test_empty_field_has_no_objects():
    rng = np.random.default_rng(0)
    img = (200 + rng.normal(0, 5, (128, 128))).astype(np.float32)
    assert segment_nuclei(img)[0].max() == 0


def test_cellpose_backend_errors_clearly(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cellpose", None)  # as if not installed
    with pytest.raises(SegmentationError, match="needs the 'cellpose' package"):
        check_backend("cellpose", str(tmp_path / "model"))
    import types

    fake = types.ModuleType("cellpose")
    fake.models = types.SimpleNamespace(CellposeModel=lambda **kw: None)
    monkeypatch.setitem(sys.modules, "cellpose", fake)
    with pytest.raises(SegmentationError, match="local cellpose model file"):
        check_backend("cellpose", str(tmp_path / "model"))
    with pytest.raises(SegmentationError, match="unknown segmentation"):
        check_backend("stardist")


def test_cellpose_model_is_loaded_once_per_process(monkeypatch, tmp_path):
    """The crop pass segments many fields per worker: the model file is read once, not per field."""
    import types

    from raycell.ingest import segment as S

    loads = []

    class FakeModel:
        def __init__(self, gpu, pretrained_model):
            loads.append(pretrained_model)

        def eval(self, img, diameter=None, channel_axis=None):
            lab = np.zeros(img.shape[-2:], np.int32)
            lab[10:20, 10:20] = 1
            return lab, None, None

    fake = types.ModuleType("cellpose")
    fake.models = types.SimpleNamespace(CellposeModel=FakeModel)
    monkeypatch.setitem(sys.modules, "cellpose", fake)
    monkeypatch.setattr(S, "_CELLPOSE_MODELS", {})
    model, other = tmp_path / "model", tmp_path / "other"
    model.write_bytes(b"weights")
    other.write_bytes(b"weights")
    p = IngestParams(segmentation="cellpose", cellpose_model=str(model))
    img = np.zeros((2, 32, 32), np.float32)
    check_backend("cellpose", str(model))  # the driver's check loads it too
    for _ in range(3):  # three fields of view
        nuc, cells, d = S.segment(img, 0, 1, p)
        assert nuc.max() == 1 and cells is None and d > 0
    assert loads == [str(model)]
    S.segment(img, 0, None, replace(p, cellpose_model=str(other)))  # another model is loaded
    assert loads == [str(model), str(other)]
    model.unlink()  # a cached model does not hide a missing file
    with pytest.raises(SegmentationError, match="local cellpose model file"):
        S.segment(img, 0, None, p)


def test_cellpose_gpu_setting_reaches_the_model(monkeypatch, tmp_path):
    """ingest.cellpose_gpu decides the device cellpose is built on; 'auto' follows CUDA."""
    import types

    import torch

    from raycell.ingest import segment as S

    built = []

    class FakeModel:
        def __init__(self, gpu, pretrained_model):
            built.append(gpu)

        def eval(self, img, diameter=None, channel_axis=None):
            return np.ones(img.shape[-2:], np.int32), None, None

    fake = types.ModuleType("cellpose")
    fake.models = types.SimpleNamespace(CellposeModel=FakeModel)
    monkeypatch.setitem(sys.modules, "cellpose", fake)
    monkeypatch.setattr(S, "_CELLPOSE_MODELS", {})
    model = tmp_path / "model"
    model.write_bytes(b"weights")
    p = IngestParams(segmentation="cellpose", cellpose_model=str(model))
    img = np.zeros((1, 16, 16), np.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    S.segment(img, 0, None, p)  # auto without CUDA: the CPU
    S.segment(img, 0, None, replace(p, cellpose_gpu=True))
    S.segment(img, 0, None, replace(p, cellpose_gpu=False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    S.segment(img, 0, None, p)  # auto where CUDA is visible (a Ray task given a GPU): the GPU
    assert built == [False, True, False, True]
    cfg = load_config(None, ["ingest.cellpose_gpu=true", "ingest.cellpose_gpus_per_task=0.25"])
    assert cfg.ingest.cellpose_gpu is True and cfg.ingest.cellpose_gpus_per_task == 0.25
    assert load_config(None, []).ingest.cellpose_gpu == "auto"
    with pytest.raises(UserError, match="cellpose_gpu"):
        load_config(None, ["ingest.cellpose_gpu=sometimes"])


def test_cellpose_on_gpu_requests_gpus_for_the_crop_tasks(monkeypatch):
    """The crop tasks ask Ray for a GPU when cellpose runs on one, and only then."""
    import torch

    from raycell.ingest.segment import cellpose_gpus
    from raycell.ingest.tasks import map_fovs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = IngestParams(segmentation="cellpose", cellpose_gpus_per_task=0.5)
    assert cellpose_gpus(IngestParams(cellpose_gpu=True), 1.0) == 0.0  # classical: no GPU
    assert cellpose_gpus(replace(p, cellpose_gpu=False), 4.0) == 0.0
    assert cellpose_gpus(replace(p, cellpose_gpu=True), 4.0) == 0.5
    assert cellpose_gpus(p, 4.0) == 0.5  # auto: the cluster has GPUs
    assert cellpose_gpus(p, 0.0) == 0.0  # auto: it has none
    assert cellpose_gpus(p, None) == 0.0  # auto, cluster unknown: this process has no CUDA
    with pytest.raises(SegmentationError, match="no GPU"):
        cellpose_gpus(replace(p, cellpose_gpu=True), 0.0)  # its tasks would wait forever

    class FakeDataset:
        def map_batches(self, fn, **kw):
            self.kw = kw
            return self

    for gpus, want in ((0.5, {"num_gpus": 0.5}), (0.0, {})):
        ds = map_fovs(FakeDataset(), None, p, {}, num_gpus=gpus)
        assert {k: v for k, v in ds.kw.items() if k == "num_gpus"} == want
        assert ds.kw["num_cpus"] == p.cpus_per_task


def test_crops_border_padding_masks_and_morphology():
    img, truth = _disks(centres=((30, 30), (30, 52), (100, 100), (3, 64)), r=10)
    labels = truth.copy()
    kept = C.drop_border_objects(labels)
    assert set(np.unique(kept)) == {0, 1, 2, 3}  # the disk cut by the top edge is dropped
    out = I.to_dtype(img[None], np.array([[20.0, 120.0]]), "uint8")
    crops, feats = C.extract(labels, img[None], out, ["dna"], 48, mask=True, mask_blur=1.5)
    assert crops.shape == (3, 1, 48, 48) and len(feats) == 3
    np.testing.assert_allclose(feats.morph_area, np.pi * 100, rtol=0.05)
    assert (feats.morph_eccentricity < 0.2).all() and (feats.morph_solidity > 0.9).all()
    np.testing.assert_allclose(feats.morph_mean_dna, 115, rtol=0.05)  # 120 inside, blurred edge
    # masked crop of disk 1: the neighbouring disk 2 (22 px to the right) is gone, the centre kept
    assert crops[0, 0, 24, 24] > 200 and crops[0, 0, 24, 24 + 22] == 0
    # windows past the image edge are zero-padded
    w = C.crop_windows(np.ones((1, 10, 10), np.uint8), np.array([[0, 0]]), 6)
    assert w.shape == (1, 1, 6, 6) and w[0, 0, :3].sum() == 0 and w[0, 0, 3:, 3:].sum() == 9


# --------------------------------------------------------------------------------------------------
# End to end with Ray, bad inputs included
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(raw, tmp_path_factory) -> Path:
    """The synthetic raw images with one field of view broken per failure mode."""
    src = tmp_path_factory.mktemp("broken") / "images"
    shutil.copytree(raw / "images", src)
    b0, b1 = src / "batch00", src / "batch01"
    # truncated file
    f = b0 / "SYN00_A01_s0_nucleus_z1.tif"
    f.write_bytes(f.read_bytes()[:2000])
    # missing Z-slice / missing channel
    (b0 / "SYN00_A01_s1_cytoplasm_z2.tif").unlink()
    for z in range(3):
        (b0 / f"SYN00_A02_s0_nucleus_z{z}.tif").unlink()
    # a file the regex does not match
    (b0 / "notes_scan.tif").write_bytes(b"II*\x00 not really a tiff")
    rng = np.random.default_rng(0)
    for z in range(3):
        for c in ("nucleus", "cytoplasm"):
            # an empty field: background and noise only
            tifffile.imwrite(
                b1 / f"SYN01_A01_s7_{c}_z{z}.tif",
                (300 + rng.normal(0, 20, (160, 160))).astype(np.uint16),
            )
            # NaN pixels in a float TIFF
            a = rng.random((160, 160)).astype(np.float32)
            if c == "cytoplasm" and z == 1:
                a[10:12, 10:12] = np.nan
            tifffile.imwrite(b1 / f"SYN01_A02_s8_{c}_z{z}.tif", a)
            # a well that the plate map does not list
            shutil.copy(b1 / f"SYN01_A01_s0_{c}_z{z}.tif", b1 / f"SYN01_A09_s0_{c}_z{z}.tif")
            # sizes differ within one field
            size = 160 if c == "nucleus" else 128
            tifffile.imwrite(
                b1 / f"SYN01_A01_s9_{c}_z{z}.tif", np.full((size, size), 100, np.uint16)
            )
    return src


EXPECTED_REJECTS = {
    "batch00_SYN00_A01_0": "unreadable",
    "batch00_SYN00_A01_1": "missing-z",
    "batch00_SYN00_A02_0": "missing-channel",
    "batch01_SYN01_A01_7": "no-cells",
    "batch01_SYN01_A02_8": "nan-pixels",
    "batch01_SYN01_A09_0": "not-in-platemap",
    "batch01_SYN01_A01_9": "size-mismatch",
}


def _check_overlays(out, s, fov_rej):
    """Per plate: an outline PNG of fields that gave cells, counts that add up to the summary's,
    and `raycell report` on the data set shows them."""
    from PIL import Image

    from raycell.report.build import build_report

    index = json.loads((out / "overlays" / "overlays.json").read_text())
    plates = {r["plate"]: r for r in index["plates"]}
    assert set(plates) == {"SYN00", "SYN01"}
    assert sum(r["n_fovs_with_cells"] for r in plates.values()) == s["n_fovs_with_cells"]
    assert sum(r["n_cells"] for r in plates.values()) == s["n_cells"]
    assert sum(r["n_fovs_rejected"] for r in plates.values()) == len(fov_rej)
    for r in plates.values():
        assert r["diameter_px"] > 0 and 1 <= len(r["fields"]) <= 3
        assert all(f not in fov_rej.index for f in r["fields"])  # only fields that gave cells
        rgb = np.asarray(Image.open(out / r["png"]).convert("RGB"))
        yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 150) & (rgb[..., 2] < 60)
        assert yellow.sum() > 50, r["png"]  # nucleus outlines drawn
    page = build_report(out, tmp_out := out.parent / "report")
    html = page.read_text()
    assert "Segmentation per plate" in html and "batch00_SYN00" in html
    assert len(list(tmp_out.glob("*overlay_SYN0*.png"))) == 2


@pytest.mark.ray
def test_ingest_end_to_end_with_bad_inputs(ray_local, raw, broken, tmp_path):
    from raycell.ingest.driver import REJECTS, ingest_fields

    out = tmp_path / "crops"
    cfg = raw_ingest_config(broken, out, raw / "platemap.csv", illum_correction=True)
    s = ingest_fields(cfg)
    assert s["n_fovs_in"] == 12 and s["n_fovs_in"] == s["n_fovs_with_cells"] + s["n_fovs_rejected"]
    assert s["n_fovs_with_cells"] == 5 and s["n_files_rejected"] == 1
    rej = pd.read_parquet(out / REJECTS)
    fov_rej = rej[rej.kind == "fov"].set_index("fov_id")
    assert fov_rej.code.to_dict() == EXPECTED_REJECTS
    for fid, row in fov_rej.iterrows():  # every reason names something a person can act on
        assert row.reason and row.files, fid
    assert "SYN00_A01_s0_nucleus_z1.tif" in fov_rej.loc["batch00_SYN00_A01_0", "reason"]
    assert rej[rej.kind == "file"].files.tolist() == ["batch00/notes_scan.tif"]
    ds = open_dataset(out, check=True)
    m = ds.manifest.to_dict()
    assert m["n_cells"] == s["n_cells"] > 20 and ds.shape == (2, 32, 32)
    assert m["channel_names"] == ["nucleus", "cytoplasm"] and m["label_vocab"] == ["high", "low"]
    assert m["batch_vocab"] == ["batch00", "batch01"]
    assert {"dose", "time", "line"} <= set(m["weak_label_columns"])
    assert set(m["ingest"]["illumination"]["functions"]) == {"SYN00", "SYN01"}
    assert m["ingest"]["normalization"]["mode"] == "global"
    assert m["ingest"]["accounting"]["n_fovs_rejected"] == 7
    t = pq.read_table(ds.shard_paths[0]).to_pandas()
    assert t[K.CELL_ID].is_unique and (t[K.GROUP].str.startswith("line")).all()
    morph = [c for c in t.columns if c.startswith(K.MORPH_PREFIX)]
    assert {
        "morph_area",
        "morph_perimeter",
        "morph_eccentricity",
        "morph_solidity",
        "morph_major_axis",
        "morph_minor_axis",
        "morph_mean_nucleus",
        "morph_mean_cytoplasm",
        "morph_nucleus_area",
    } <= set(morph)
    assert t.morph_area.between(100, 2000).all() and t.morph_nucleus_area.lt(t.morph_area).all()
    _check_overlays(out, s, fov_rej)

    # a re-run with the same inputs and parameters is skipped; nothing duplicated
    again = ingest_fields(cfg)
    assert again["skipped"] and again["n_cells"] == s["n_cells"]
    # different parameters need overwrite, which rebuilds the data set in place without duplicates
    cfg.ingest.mask_crops = not cfg.ingest.mask_crops
    with pytest.raises(IngestError, match="overwrite"):
        ingest_fields(cfg)
    cfg.ingest.overwrite = True
    s2 = ingest_fields(cfg)
    assert not s2["skipped"] and s2["n_cells"] == s["n_cells"]
    assert open_dataset(out, check=True).manifest.n_cells == s["n_cells"]
    assert not (tmp_path / "crops.partial").exists() and not (tmp_path / "crops.old").exists()


@pytest.mark.ray
def test_ingest_normalisation_modes(ray_local, raw, tmp_path):
    from raycell.ingest.driver import ingest_fields

    res = {}
    for mode in ("per-batch", "per-image"):
        out = tmp_path / mode
        s = ingest_fields(
            raw_ingest_config(
                raw / "images",
                out,
                raw / "platemap.csv",
                normalization=mode,
                dtype="uint16",
                num_workers=2,
                fovs_per_task=2,
            )
        )
        assert s["n_fovs_with_cells"] == 8 and s["n_fovs_rejected"] == 0, pd.read_parquet(
            out / "rejects.parquet"
        ).to_dict("records")
        m = open_dataset(out, check=True).manifest.to_dict()
        assert m["dtype"] == "uint16" and m["ingest"]["normalization"]["mode"] == mode
        res[mode] = m
    assert set(res["per-batch"]["ingest"]["normalization"]["ranges"]) == {"batch00", "batch01"}
    assert res["per-image"]["ingest"]["normalization"]["ranges"] == {}


def test_ingest_job_reports_bad_input(tmp_path, capsys):
    # jobs/ingest.py is `raycell ingest`: the same main with the verb in front
    from raycell.__main__ import main

    rc = main(
        [
            "ingest",
            "--set",
            f"ingest.input={tmp_path}",
            "--set",
            f"ingest.out={tmp_path / 'o'}",
            "--set",
            r"ingest.pattern=(?P<well>\w+)",
            "--set",
            "ingest.z_projection=sum",
        ]
    )
    assert rc == 2 and "z_projection" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Real images (CellProfiler examples)
# --------------------------------------------------------------------------------------------------


def _real(name: str) -> Path:
    d = CP / name
    if not d.is_dir():
        pytest.skip(
            f"real example images not found at {d} (set RAYCELL_SHARED_DATA to the shared/data "
            "folder to run this test)"
        )
    return d


@pytest.mark.ray
def test_example_human(ray_local, tmp_path):
    from raycell.ingest.driver import ingest_fields

    src = _real("ExampleHuman")
    cfg = load_config(
        REPO / "configs/ingest/cellprofiler_example_human.yaml",
        [f"ingest.input={src}", f"ingest.out={tmp_path / 'h'}", "ray.progress=false"],
    )
    s = ingest_fields(cfg)
    assert s["n_fovs_with_cells"] == 1 and 150 <= s["n_cells"] <= 400, s
    assert 8 <= s["diameter_px"]["median"] <= 20  # nuclei are ~12 px across
    ds = open_dataset(tmp_path / "h", check=True)
    assert ds.manifest.channel_names == ["DNA", "PH3", "cell"] and ds.shape == (3, 64, 64)
    t = pq.read_table(ds.shard_paths[0]).to_pandas()
    assert 60 <= t.morph_nucleus_area.median() <= 250 and 200 <= t.morph_area.median() <= 1500
    assert t.morph_nucleus_area.le(t.morph_area).all()
    # mitotic (PH3-bright) cells exist but are a minority
    assert 0 < (t.morph_mean_ph3 > 2 * t.morph_mean_ph3.median()).mean() < 0.3


@pytest.mark.ray
@pytest.mark.slow
def test_example_as_09047_illumination(ray_local, tmp_path):
    from raycell.ingest.driver import ingest_fields

    src = _real("ExampleIlluminationCorrection_AS_09047")
    cfg = load_config(
        REPO / "configs/ingest/cellprofiler_illum_AS_09047.yaml",
        [f"ingest.input={src}", f"ingest.out={tmp_path / 'as'}", "ray.progress=false"],
    )
    s = ingest_fields(cfg)
    assert s["n_fovs_in"] == 72 and s["n_fovs_with_cells"] + s["n_fovs_rejected"] == 72
    assert s["n_fovs_with_cells"] >= 70 and 700 <= s["n_cells"] <= 5000, s
    m = open_dataset(tmp_path / "as", check=True).manifest.to_dict()
    func = np.load(tmp_path / "as" / next(iter(m["ingest"]["illumination"]["functions"].values())))
    assert (
        func.shape == (1, 128, 128) and func.max() / func.min() > 1.5
    )  # real vignetting was found
    t = pd.concat(pq.read_table(p).to_pandas() for p in open_dataset(tmp_path / "as").shard_paths)
    assert t.well.nunique() == 24 and t.field.nunique() == 3
    assert 500 <= t.morph_area.median() <= 5000


@pytest.mark.ray
def test_ingest_rejects_implausible_segmentation(ray_local, raw, tmp_path):
    """A field whose objects are far larger than its plate's and sit on the border (a background
    leak) lands in the rejects table with that reason, not in the crops, not as `no-cells`."""
    from raycell.ingest.driver import REJECTS, ingest_fields

    src = tmp_path / "images"
    shutil.copytree(raw / "images", src)
    yy, xx = np.mgrid[0:160, 0:160]
    for z in range(3):
        f = src / "batch00" / f"SYN00_A01_s0_nucleus_z{z}.tif"
        ref = tifffile.imread(f)
        leak = np.full(ref.shape, np.percentile(ref, 10), np.float64)
        for cy, cx in ((0, 0), (0, 159), (159, 0), (159, 159)):
            leak[(yy - cy) ** 2 + (xx - cx) ** 2 < 75**2] = np.percentile(ref, 99.5)
        leak += np.random.default_rng(z).normal(0, 0.01 * leak.max(), leak.shape)
        tifffile.imwrite(f, np.clip(leak, 0, None).astype(ref.dtype))
    out = tmp_path / "crops"
    s = ingest_fields(raw_ingest_config(src, out, raw / "platemap.csv", normalization="per-image"))
    assert s["n_fovs_in"] == s["n_fovs_with_cells"] + s["n_fovs_rejected"]
    assert s["rejects_by_code"] == {"implausible-segmentation": 1}, s["rejects_by_code"]
    assert s["diameter_px"]["plates"]  # the scale pass gave each plate a reference
    rej = pd.read_parquet(out / REJECTS).set_index("fov_id")
    reason = rej.loc["batch00_SYN00_A01_0", "reason"]
    assert reason.startswith("implausible-segmentation: median object") and "plate's" in reason


@pytest.mark.ray
def test_ingest_stores_crop_features_that_the_baseline_reads(ray_local, raw, tmp_path):
    from raycell.data.splits import split_dataset
    from raycell.eval.baseline import feature_source, load_features
    from raycell.features.morphology import crop_features
    from raycell.formats.shards import decode_images
    from raycell.ingest.driver import ingest_fields

    out = tmp_path / "feat"
    s = ingest_fields(
        raw_ingest_config(raw / "images", out, raw / "platemap.csv", crop_features=True)
    )
    assert s["n_fovs_with_cells"] == 8
    ds = open_dataset(out, check=True)
    t = ds.read_table()
    stored = [c for c in t.column_names if c.startswith("feat_")]
    # the stored columns are the baseline's own crop features of the crops as written, exactly
    want, names = crop_features(decode_images(t, ds.shape, ds.dtype), ds.manifest.channel_names)
    assert stored == [f"feat_{n}" for n in names] and len(names) > 10
    got = np.column_stack([t.column(c).to_numpy(zero_copy_only=False) for c in stored])
    np.testing.assert_array_equal(got, want.astype(np.float32))
    # the baseline uses them (no image column read) and gives the same matrix as computing them
    split_dataset(str(out), unseen=[])
    assert feature_source(out, "all") == "morph_*+crops"
    f = load_features(out, ["train"], "crops")
    assert f["names"] == names
    rows = pd.Index(t.column(K.CELL_ID).to_pylist()).get_indexer(
        f["splits"]["train"]["meta"][K.CELL_ID]
    )
    assert len(rows) > 20 and (rows >= 0).all()
    np.testing.assert_array_equal(
        f["splits"]["train"]["x"], want[rows].astype(np.float32).astype(np.float64)
    )


def test_upsampled_illumination_is_cached_by_content():
    """Every field of a plate reuses one upsampled function; a changed function is upsampled anew."""
    from scipy import ndimage as ndi

    func = np.random.default_rng(0).uniform(0.5, 1.5, (2, 16, 16)).astype(np.float32)
    up = I.upsample(func, (128, 96))
    want = ndi.zoom(func, (1, 8, 6), order=1, mode="nearest", grid_mode=True)
    assert up.shape == (2, 128, 96) and np.array_equal(up, want)
    assert I.upsample(func, (128, 96)) is up and not up.flags.writeable  # shared: read-only
    func[0, 0, 0] = 3.0  # same array object, new content: not the stale result
    assert not np.array_equal(I.upsample(func, (128, 96)), up)
