"""Ingest inputs that would corrupt results silently are refused or rejected by name.

* a field of view at another scale (uint32 x1000, float in [0, 1]) among uint16 fields: rejected as
  `out-of-scale` before it enters the normalisation statistics, or normalised by itself when asked;
  crops with an all-zero or saturated channel are counted and warned about;
* an edited plate map changes the ingest fingerprint (no "skipped" with the old labels);
* one stray file spelt differently (`z01` among `z1`) is rejected by itself, the complete fields
  are kept;
* a zero-byte PNG's reason says it is empty; a 3-D file where the name says one plane is `bad-axes`
  naming the file; padded plate-map values are stripped and still join.

Planning, reading and the scale check are tested without Ray; the end-to-end runs use `ray_local`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from raycell.config import load_config
from raycell.data.synthetic_raw import DEFAULT_PATTERN, write_synthetic_raw
from raycell.ingest import images as I
from raycell.ingest.params import IngestParams
from raycell.ingest.sources import IngestError, discover, group_fovs, join_platemap, load_platemap


def _touch_layout(root: Path, wells=12, fields=2, zs=("1", "2"), channels=("nucleus", "cytoplasm")):
    """Empty files named like the synthetic raw layout (planning never reads pixels)."""
    d = root / "images" / "batch00"
    d.mkdir(parents=True)
    for w in range(1, wells + 1):
        for f in range(fields):
            for c in channels:
                for z in zs:
                    (d / f"SYN00_A{w:02d}_s{f}_{c}_z{z}.tif").write_bytes(b"")
    pd.DataFrame(
        {
            "plate": ["SYN00"] * wells,
            "well": [f"A{w:02d}" for w in range(1, wells + 1)],
            "label": ["high", "low"] * (wells // 2),
        }
    ).to_csv(root / "platemap.csv", index=False)
    return d


def _set(key: str, value) -> str:
    return f"ingest.{key}={json.dumps(value) if isinstance(value, (list, bool)) else value}"


def _params(root: Path, **ingest) -> IngestParams:
    sets = [
        f"ingest.input={root / 'images'}",
        f"ingest.out={root / 'out'}",
        f"ingest.platemap={root / 'platemap.csv'}",
        f"ingest.pattern={DEFAULT_PATTERN}",
        "ingest.channels=[nucleus, cytoplasm]",
    ] + [_set(k, v) for k, v in ingest.items()]
    return IngestParams.from_config(load_config(None, sets).ingest)


# --------------------------------------------------------------------------------------------------
# Item 5: a stray file is blamed, not the complete fields
# --------------------------------------------------------------------------------------------------


def test_stray_z_file_is_rejected_and_complete_fields_kept(tmp_path):
    d = _touch_layout(tmp_path)
    (d / "SYN00_A01_s0_nucleus_z01.tif").write_bytes(b"")  # 'z01' among 'z1'
    files, _ = discover(tmp_path / "images", DEFAULT_PATTERN)
    fovs, rejects = group_fovs(files, ["nucleus", "cytoplasm"])
    assert len(fovs) == 24
    assert [(r["kind"], r["code"], r["files"]) for r in rejects] == [
        ("file", "unexpected-z", "batch00/SYN00_A01_s0_nucleus_z01.tif")
    ]
    assert "'01'" in rejects[0]["reason"] and "['1', '2']" in rejects[0]["reason"]
    # a field that really lacks a slice is still rejected as a field
    (d / "SYN00_A02_s1_cytoplasm_z2.tif").unlink()
    files, _ = discover(tmp_path / "images", DEFAULT_PATTERN)
    fovs, rejects = group_fovs(files, ["nucleus", "cytoplasm"])
    assert len(fovs) == 23
    assert sorted(r["code"] for r in rejects) == ["missing-z", "unexpected-z"]


def test_stray_channel_file_is_rejected_when_channels_are_not_given(tmp_path):
    from raycell.ingest.plan import plan_ingest

    d = _touch_layout(tmp_path)
    (d / "SYN00_A03_s1_dapi_z1.tif").write_bytes(b"")
    plan = plan_ingest(_params(tmp_path, channels=[]))
    assert len(plan["fovs"]) == 24 and plan["channels"]["values"] == ["cytoplasm", "nucleus"]
    assert [(r["code"], r["files"]) for r in plan["rejects"]] == [
        ("unexpected-channel", "batch00/SYN00_A03_s1_dapi_z1.tif")
    ]
    assert plan["n_files"] == 24 * 4 + 1


# --------------------------------------------------------------------------------------------------
# Item 4: the plate map's contents are part of the fingerprint
# --------------------------------------------------------------------------------------------------


def test_edited_platemap_changes_the_fingerprint(tmp_path):
    from raycell.ingest.plan import plan_ingest

    _touch_layout(tmp_path)
    p = _params(tmp_path)
    before = plan_ingest(p)["fingerprint"]
    assert plan_ingest(p)["fingerprint"] == before  # same inputs, same fingerprint
    pm = tmp_path / "platemap.csv"
    pm.write_text(pm.read_text().replace("high", "HIGH"))
    assert plan_ingest(p)["fingerprint"] != before


# --------------------------------------------------------------------------------------------------
# Item 8 (ingest): empty PNG, 3-D where 2-D is expected, padded plate-map values
# --------------------------------------------------------------------------------------------------


def test_zero_byte_and_garbage_png_reasons(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(I.ImageError) as e:
        I.read_image(str(empty))
    msg = str(e.value)
    assert e.value.code == "unreadable" and "empty.png" in msg and "empty (0 bytes)" in msg
    assert "pip install" not in msg and "\n" not in msg
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png at all")
    with pytest.raises(I.ImageError) as e:
        I.read_image(str(garbage))
    assert "garbage.png" in str(e.value) and "pip install" not in str(e.value)
    assert "\n" not in str(e.value)


def _fov(tmp_path, arrays: dict) -> dict:
    files = []
    for (c, z), a in arrays.items():
        path = tmp_path / f"P_A01_s0_{c}_z{z}.tif"
        tifffile.imwrite(path, a)
        files.append({"path": str(path), "relpath": path.name, "channel": c, "z": z})
    return {"fov_id": "f", "files": files}


def test_three_d_file_where_a_plane_is_expected_is_bad_axes(tmp_path):
    plane = np.ones((32, 32), np.uint16)
    fov = _fov(tmp_path, {("nuc", "0"): np.ones((3, 32, 32), np.uint16), ("cyt", "0"): plane})
    with pytest.raises(I.ImageError) as e:
        I.load_fov_image(fov, ["nuc", "cyt"], "max")
    assert e.value.code == "bad-axes" and "P_A01_s0_nuc_z0.tif" in str(e.value)
    # one slice of a Z series that holds three planes
    fov = _fov(tmp_path, {("nuc", "0"): plane, ("nuc", "1"): np.ones((3, 32, 32), np.uint16)})
    with pytest.raises(I.ImageError) as e:
        I.load_fov_image(fov, ["nuc"], "max")
    assert e.value.code == "bad-axes" and "P_A01_s0_nuc_z1.tif" in str(e.value)
    # 2-D files still load, and the pixel type is reported for the scale check
    fov = _fov(tmp_path, {("nuc", "0"): plane, ("nuc", "1"): plane, ("cyt", "0"): plane})
    img, info = I.load_fov_image(fov, ["nuc", "cyt"], "max")
    assert img.shape == (2, 32, 32) and info["dtypes"] == ["uint16", "uint16"]


def test_padded_platemap_values_are_stripped_and_join(tmp_path):
    from raycell.ingest.plan import plan_ingest

    _touch_layout(tmp_path, wells=2, fields=1)
    (tmp_path / "platemap.csv").write_text(
        "plate , well,label\n SYN00,A01 , high\nSYN00 ,  A02,low \n"
    )
    files, _ = discover(tmp_path / "images", DEFAULT_PATTERN)
    fovs, _ = group_fovs(files, ["nucleus", "cytoplasm"])
    pm, on = load_platemap(tmp_path / "platemap.csv", [], ["batch", "plate", "well", "field"])
    kept, rejects = join_platemap(fovs, pm, on, "pm")
    assert not rejects and sorted(f["meta"]["label"] for f in kept) == ["high", "low"]
    plan = plan_ingest(_params(tmp_path))
    assert {f["row"]["label"] for f in plan["fovs"]} == {"high", "low"}
    assert any("stripped" in n and "label" in n for n in plan["notes"])


# --------------------------------------------------------------------------------------------------
# Item 3: the scale check and the crop checks, as functions
# --------------------------------------------------------------------------------------------------


def test_scale_check_functions():
    rng = np.random.default_rng(0)
    fields = [I.field_scale(rng.uniform(100, 3000, (2, 64, 64)), ["uint16"] * 2) for _ in range(5)]
    ref = I.scale_reference(fields, fold=20)
    names = ["dna", "actin"]
    assert all(I.scale_problem(f, ref, names) == "" for f in fields)
    big = I.field_scale(rng.uniform(100, 3000, (2, 64, 64)) * 1000, ["uint16"] * 2)
    why = I.scale_problem(big, ref, names)
    assert "'dna'" in why and "above" in why  # same pixel type: the intensity criterion
    dim = I.field_scale(rng.uniform(100, 3000, (2, 64, 64)) / 3000, ["float32"] * 2)
    assert "pixel type float32" in I.scale_problem(dim, ref, names)
    # an empty field (background only, a few times dimmer) is not "out of scale"
    empty = I.field_scale(np.full((2, 64, 64), 300.0), ["uint16"] * 2)
    assert I.scale_problem(empty, ref, names) == ""
    assert I.scale_reference(fields[:2], fold=20) is None  # two fields: no majority


def test_crop_flags_counts_zero_and_saturated_channels():
    crops = np.zeros((4, 2, 8, 8), np.uint8)
    crops[:, 0] = 7
    crops[1, 1] = 255
    crops[2, 1, :2] = 255
    assert I.crop_flags(crops) == {"all_zero": [0, 2], "saturated": [0, 1]}


# --------------------------------------------------------------------------------------------------
# End to end (Ray): out-of-scale fields, separate normalisation, warnings, an edited plate map
# --------------------------------------------------------------------------------------------------

ODD_BIG, ODD_FLOAT = "batch00_SYN00_A01_0", "batch00_SYN00_A02_1"


@pytest.fixture(scope="module")
def scaled_raw(tmp_path_factory) -> Path:
    """Six small uint16 fields on one plate; one rewritten as uint32 x1000, one as float [0, 1]."""
    root = tmp_path_factory.mktemp("scale") / "raw"
    write_synthetic_raw(
        root,
        seed=5,
        n_batches=1,
        n_lines=2,
        wells=3,
        fields=2,
        fov_size=128,
        cells_per_fov=8,
        n_z=1,
    )
    d = root / "images" / "batch00"
    for c in ("nucleus", "cytoplasm"):
        f = d / f"SYN00_A01_s0_{c}_z0.tif"
        tifffile.imwrite(f, tifffile.imread(f).astype(np.uint32) * 1000)
        f = d / f"SYN00_A02_s1_{c}_z0.tif"
        tifffile.imwrite(f, (tifffile.imread(f) / 4095.0).astype(np.float32))
    return root


def _cfg(root: Path, out: Path, **ingest):
    sets = [
        f"ingest.input={root / 'images'}",
        f"ingest.out={out}",
        f"ingest.platemap={root / 'platemap.csv'}",
        f"ingest.pattern={DEFAULT_PATTERN}",
        "ingest.channels=[nucleus, cytoplasm]",
        "ingest.nucleus_channel=nucleus",
        "ingest.cytoplasm_channel=cytoplasm",
        "ingest.crop_size=32",
        "ray.progress=false",
    ] + [_set(k, v) for k, v in ingest.items()]
    return load_config(None, sets)


def _crops_by_fov(out: Path) -> dict[str, np.ndarray]:
    from raycell.formats.shards import decode_images, open_dataset

    ds = open_dataset(out, check=True)
    t = pd.concat(ds.read_shard(p).to_pandas() for p in ds.shard_paths)
    fov = t[["batch", "plate", "well", "field"]].astype(str).agg("_".join, axis=1)
    import pyarrow as pa

    imgs = decode_images(pa.Table.from_pandas(t, preserve_index=False), ds.shape, ds.dtype)
    return {f: imgs[(fov == f).to_numpy()] for f in fov.unique()}


@pytest.mark.ray
def test_out_of_scale_fields_are_rejected_others_keep_their_crops(ray_local, scaled_raw, tmp_path):
    from raycell.ingest.driver import REJECTS, ingest_fields

    out = tmp_path / "crops"
    s = ingest_fields(_cfg(scaled_raw, out))
    assert s["n_fovs_in"] == 6 == s["n_fovs_with_cells"] + s["n_fovs_rejected"]
    rej = pd.read_parquet(out / REJECTS).set_index("fov_id")
    assert rej.code.to_dict() == {ODD_BIG: "out-of-scale", ODD_FLOAT: "out-of-scale"}
    assert "uint32" in rej.loc[ODD_BIG, "reason"] and "float32" in rej.loc[ODD_FLOAT, "reason"]
    crops = _crops_by_fov(out)
    assert len(crops) == 4
    for fid, c in crops.items():  # the normal fields' crops are not zeroed by the odd ones
        assert (c.reshape(len(c), 2, -1).max(axis=2) > 0).mean() > 0.9, fid
    assert sum(s["crop_checks"]["all_zero"].values()) <= 0.1 * s["n_cells"]
    assert any("out-of-scale" in n for n in s["notes"])


@pytest.mark.ray
def test_out_of_scale_fields_normalised_separately_when_asked(ray_local, scaled_raw, tmp_path):
    from raycell.formats.shards import open_dataset
    from raycell.ingest.driver import ingest_fields

    out = tmp_path / "crops"
    s = ingest_fields(_cfg(scaled_raw, out, scale_check="separate"))
    assert s["n_fovs_rejected"] == 0
    assert s["fields_normalised_alone"] == sorted([ODD_BIG, ODD_FLOAT])
    crops = _crops_by_fov(out)
    for fid in (ODD_BIG, ODD_FLOAT):
        c = crops[fid]
        assert (c.reshape(len(c), 2, -1).max(axis=2) > 0).mean() > 0.9, fid
    m = open_dataset(out).manifest.ingest["scale_check"]
    assert m["mode"] == "separate" and m["normalised_alone"] == sorted([ODD_BIG, ODD_FLOAT])


@pytest.mark.ray
def test_saturated_and_all_zero_crops_are_warned(ray_local, scaled_raw, tmp_path, capsys):
    """Crops whose channel is saturated or all zero are counted, warned about and recorded."""
    from raycell.formats.shards import open_dataset
    from raycell.pipeline import run_ingest

    # saturation: a normalisation range that ends at the 1st percentile
    s = run_ingest(_cfg(scaled_raw, tmp_path / "sat", norm_percentiles=[0, 1]))
    sat = s["crop_checks"]["saturated"]
    assert sat["cytoplasm"] > 0.5 * s["n_cells"] and s["crop_checks"]["n_crops"] == s["n_cells"]
    printed = capsys.readouterr().out
    assert f"{sat['cytoplasm']} of {s['n_cells']} crops" in printed
    assert "'cytoplasm' more than half saturated" in printed
    # with the scale check off, the x1000 field zeroes the other fields' crops: the summary says so
    out = tmp_path / "zero"
    s = run_ingest(_cfg(scaled_raw, out, scale_check="ignore"))
    zero = s["crop_checks"]["all_zero"]
    assert zero["nucleus"] > 0.5 * s["n_cells"]
    assert any(f"{zero['nucleus']} of {s['n_cells']} crops" in n for n in s["notes"])
    assert open_dataset(out).manifest.ingest["crop_checks"]["all_zero"] == zero


@pytest.mark.ray
def test_edited_platemap_is_not_skipped(ray_local, scaled_raw, tmp_path):
    import shutil

    from raycell.formats.shards import open_dataset
    from raycell.ingest.driver import ingest_fields

    root = tmp_path / "raw"
    shutil.copytree(scaled_raw, root)
    out = tmp_path / "crops"
    ingest_fields(_cfg(root, out))
    assert ingest_fields(_cfg(root, out))["skipped"]
    pm = pd.read_csv(root / "platemap.csv", dtype=str)
    pm["label"] = pm["label"].map({"high": "low", "low": "high"})
    pm.to_csv(root / "platemap.csv", index=False)
    with pytest.raises(IngestError, match="overwrite"):
        ingest_fields(_cfg(root, out))
    s = ingest_fields(_cfg(root, out, overwrite=True))
    assert not s["skipped"]
    ds = open_dataset(out, check=True)
    t = pd.concat(ds.read_shard(p).to_pandas() for p in ds.shard_paths)
    want = dict(zip(pm.well, pm.label))
    assert (t.well.map(want) == t.label).all()


def test_bad_scale_check_options_are_one_line_errors(tmp_path, capsys):
    from raycell.__main__ import main

    _touch_layout(tmp_path, wells=2, fields=1)
    base = [
        "ingest",
        "--set",
        f"ingest.input={tmp_path / 'images'}",
        "--set",
        f"ingest.out={tmp_path / 'o'}",
        "--set",
        f"ingest.pattern={DEFAULT_PATTERN}",
    ]
    assert main(base + ["--set", "ingest.scale_check=maybe"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ingest.scale_check must be reject, separate or ignore" in err
    assert main(base + ["--set", "ingest.scale_fold=0.5"]) == 2
    assert "ingest.scale_fold must be > 1" in capsys.readouterr().err
