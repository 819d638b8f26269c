"""Instrument layouts: each preset on a small tree in that instrument's naming, and load-data CSVs.

Planning only (no Ray): the presets must give the same fields, wells, sites, channels and Z-slices a
hand-written regex would, and the fields' pixels must load in channel order.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import SHARED_DATA

from raycell.config import load_config
from raycell.ingest import images as imio
from raycell.ingest.layouts import PRESET_NAMES
from raycell.ingest.params import IngestParams
from raycell.ingest.plan import check_params, plan_ingest
from raycell.ingest.sources import IngestError


def _params(root: Path, **ingest) -> IngestParams:
    sets = [f"ingest.input={root}", f"ingest.out={root.parent / 'out'}", "ingest.pattern="]
    sets += [
        f"ingest.{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}"
        for k, v in ingest.items()
    ]
    return IngestParams.from_config(load_config(None, sets).ingest)


def _img(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.full((24, 20), value, np.uint16))


def _summary(plan: dict) -> dict:
    return {
        f["fov_id"]: (f["meta"], [(x["channel"], x["z"]) for x in f["files"]]) for f in plan["fovs"]
    }


def test_phenix_operetta_names(tmp_path):
    root = tmp_path / "in"
    plate = "P1__2024-01-01T10_00_00-Measurement 1"
    for r, c in ((2, 3), (2, 4)):
        for f in (1, 2):
            for pl in (1, 2):
                for ch in (1, 2):
                    name = f"r{r:02d}c{c:02d}f{f:02d}p{pl:02d}-ch{ch}sk1fk1fl1.tiff"
                    _img(root / plate / "Images" / name, 10 * ch + pl)
    (root / plate / "Images" / "Index.idx.xml").write_text("<xml/>")
    for name in ("phenix", "operetta"):
        plan = plan_ingest(_params(root, preset=name, channel_names=["DNA", "actin"]))
        assert len(plan["fovs"]) == 4 and not plan["rejects"]
        meta = plan["fovs"][0]["meta"]
        assert meta == {"plate": plate, "well": "B03", "field": "01", "timepoint": "1"}
        assert {f["meta"]["well"] for f in plan["fovs"]} == {"B03", "B04"}
        assert [(x["channel"], x["z"]) for x in plan["fovs"][0]["files"]] == [
            ("1", "01"),
            ("1", "02"),
            ("2", "01"),
            ("2", "02"),
        ]
    img, _ = imio.load_fov_image(plan["fovs"][0], ["1", "2"], "max")
    assert img.shape == (2, 24, 20) and img[:, 0, 0].tolist() == [12, 22]


def test_imagexpress_names_with_and_without_folders(tmp_path):
    root = tmp_path / "in"
    for well in ("A01", "B02"):
        for s in (1, 2):
            for z in (1, 2):
                for w in (1, 2, 3):
                    u = str(uuid.UUID(int=hash((well, s, z, w)) % 2**128)).upper()
                    folder = root / "plate7" / "TimePoint_1" / f"ZStep_{z}"
                    _img(folder / f"exp_{well}_s{s}_w{w}{u}.tif", w)
    _img(root / "plate7" / "TimePoint_1" / "ZStep_1" / "exp_A01_s1_w1_thumbABC.tif", 0)
    plan = plan_ingest(_params(root, preset="imagexpress"))
    assert len(plan["fovs"]) == 4
    assert [r["code"] for r in plan["rejects"]] == ["no-match"]  # the thumbnail, named
    assert "thumb" in plan["rejects"][0]["files"]
    assert plan["fovs"][0]["meta"] == {
        "plate": "plate7",
        "timepoint": "1",
        "well": "A01",
        "field": "1",
    }
    assert plan["channels"]["values"] == ["1", "2", "3"]
    assert [x["z"] for x in plan["fovs"][0]["files"]][:2] == ["1", "2"]
    # a single-site plate in one folder: no _s, no UUID, no TimePoint folder
    flat = tmp_path / "flat"
    for well in ("C03", "D04"):
        for w in (1, 2):
            _img(flat / "plate8" / f"{well}_w{w}.TIF", w)
    plan = plan_ingest(_params(flat, preset="imagexpress"))
    assert sorted(f["meta"]["well"] for f in plan["fovs"]) == ["C03", "D04"]
    assert plan["fovs"][0]["meta"]["plate"] == "plate8" and plan["fovs"][0]["meta"]["field"] == ""


def test_cellinsight_names(tmp_path):
    root = tmp_path / "in"
    for well in ("A01", "H12"):
        for f in (0, 1):
            for d in (0, 1, 2):
                _img(root / f"AS_09125_050116030001_{well}f{f:02d}d{d}.TIF", d)
    for name in ("cellinsight", "arrayscan", "cellprofiler"):
        plan = plan_ingest(_params(root, preset=name))
        assert len(plan["fovs"]) == 4 and not plan["rejects"]
        assert plan["fovs"][0]["meta"] == {
            "plate": "AS_09125_050116030001",
            "well": "A01",
            "field": "00",
        }
        assert plan["channels"]["values"] == ["0", "1", "2"]


def test_cellinsight_preset_on_cellprofilers_example_images(tmp_path):
    src = SHARED_DATA / "cellprofiler_examples" / "ExampleHuman"
    if not src.is_dir():
        pytest.skip(f"shared data not found: {src}")
    plan = plan_ingest(replace(_params(src, preset="cellinsight"), out=str(tmp_path / "o")))
    assert len(plan["fovs"]) == 1 and plan["fovs"][0]["meta"]["well"] == "D03"
    assert plan["channels"]["values"] == ["0", "1", "2"]


def _jump_tree(tmp_path: Path) -> tuple[Path, Path]:
    """Two plates whose Phenix file names repeat (as in JUMP), and their load_data.csv files."""
    root, csvs = tmp_path / "images", tmp_path / "load_data_csv"
    channels = ["DNA", "ER", "RNA", "AGP", "Mito"]
    for p_i, plate in enumerate(("BR00116991", "BR00116992")):
        rows = []
        for well, (r, c) in {"A01": (1, 1), "B02": (2, 2)}.items():
            for site in (1, 2):
                row = {
                    "Metadata_Source": "source_4",
                    "Metadata_Batch": "2020_11_04_CPJUMP1",
                    "Metadata_Plate": plate,
                    "Metadata_Well": well,
                    "Metadata_Site": str(site),
                }
                for k, ch in enumerate(channels, start=1):
                    name = f"r{r:02d}c{c:02d}f{site:02d}p01-ch{k}sk1fk1fl1.tiff"
                    _img(
                        root
                        / "2020_11_04_CPJUMP1"
                        / "images"
                        / f"{plate}__2020-11-05"
                        / "Images"
                        / name,
                        100 * p_i + k,
                    )
                    row[f"FileName_Orig{ch}"] = name
                    row[f"PathName_Orig{ch}"] = (
                        f"s3://cellpainting-gallery/cpg0000/source_4/images/"
                        f"2020_11_04_CPJUMP1/images/{plate}__2020-11-05/"
                        "Images/"
                    )
                    row[f"FileName_Illum{ch}"] = f"{plate}_Illum{ch}.npy"
                rows.append(row)
        (csvs / plate).mkdir(parents=True)
        pd.DataFrame(rows).to_csv(csvs / plate / "load_data_with_illum.csv", index=False)
    return root, csvs


def test_jump_load_data_csvs(tmp_path):
    root, csvs = _jump_tree(tmp_path)
    plan = plan_ingest(_params(root, preset="jump", load_data=str(csvs)))
    assert len(plan["fovs"]) == 8 and not plan["rejects"]
    assert plan["channels"]["values"] == ["AGP", "DNA", "ER", "Mito", "RNA"]
    by_id = {f["fov_id"]: f for f in plan["fovs"]}
    f = next(
        f
        for f in by_id.values()
        if f["meta"]["plate"] == "BR00116992"
        and f["meta"]["well"] == "B02"
        and f["meta"]["field"] == "2"
    )
    assert f["meta"]["batch"] == "2020_11_04_CPJUMP1" and f["row"]["batch"] == "2020_11_04_CPJUMP1"
    # the same file name exists under both plates: each field reads its own plate's copy
    assert all("BR00116992__" in x["path"] for x in f["files"])
    img, _ = imio.load_fov_image(f, ["DNA", "ER"], "max")
    assert img[:, 0, 0].tolist() == [101, 102]
    # load_data alone (no preset) and the CSVs found under ingest.input work the same
    assert len(plan_ingest(_params(root, load_data=str(csvs)))["fovs"]) == 8
    (root / "load_data.csv").write_text(
        (csvs / "BR00116991" / "load_data_with_illum.csv").read_text()
    )
    assert len(plan_ingest(_params(root, preset="jump"))["fovs"]) == 4


def test_jump_missing_file_is_a_reject(tmp_path):
    root, csvs = _jump_tree(tmp_path)
    victim = next((root).rglob("r01c01f01p01-ch3sk1fk1fl1.tiff"))
    victim.unlink()
    plan = plan_ingest(_params(root, load_data=str(csvs)))
    codes = sorted(r["code"] for r in plan["rejects"])
    assert codes == ["listed-not-found", "missing-channel"]
    nf = next(r for r in plan["rejects"] if r["code"] == "listed-not-found")
    assert "r01c01f01p01-ch3sk1fk1fl1.tiff" in nf["reason"] and "row 2" in nf["reason"]


def test_layout_errors(tmp_path):
    root = tmp_path / "in"
    _img(root / "a.tif", 1)
    with pytest.raises(IngestError, match="unknown ingest.preset 'phoenix'"):
        check_params(_params(root, preset="phoenix"))
    with pytest.raises(IngestError, match="not both"):
        check_params(replace(_params(root, preset="phenix"), pattern="(?P<well>x)"))
    with pytest.raises(IngestError, match="ingest.pattern is empty.*preset"):
        check_params(_params(root))
    with pytest.raises(IngestError, match="matches none"):
        plan_ingest(_params(root, preset="phenix"))
    bad = tmp_path / "ld.csv"
    pd.DataFrame({"Metadata_Well": ["A01"], "Image": ["a.tif"]}).to_csv(bad, index=False)
    with pytest.raises(IngestError, match="no FileName_<channel> column"):
        plan_ingest(_params(root, load_data=str(bad)))


def test_cli_help_names_every_preset():
    from raycell.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["ingest"]
    text = sub.format_help().replace("\n", " ")
    for name in PRESET_NAMES:
        assert name in text, name
