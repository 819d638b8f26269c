"""Your own segmentation in: instance masks (`ingest.masks`), object tables (`ingest.objects`).

The judged test: the same synthetic fields ingested from cellpose-style masks and from a
CellProfiler-style object table (Nuclei.csv + Image.csv) give the same cells, ids and centres within
1 px, as the masks' own objects (those not touching the border), and the ids come out of
`raycell embed`'s `Metadata_ObjectNumber`. Bad inputs: each gives a reject row or a one-line error.
Planning and one field's crop pass run without Ray; the two end-to-end runs use `ray_local`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage import io as skio
from skimage.measure import regionprops

from raycell import constants as K
from raycell.config import load_config
from raycell.data.synthetic_raw import DEFAULT_PATTERN, write_synthetic_raw
from raycell.ingest.crops import drop_border_objects
from raycell.ingest.fov import fov_result
from raycell.ingest.params import IngestParams
from raycell.ingest.plan import check_params, plan_ingest
from raycell.ingest.sources import IngestError


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Synthetic fields + true masks, cellpose-style masks beside the images, CP tables."""
    out = tmp_path_factory.mktemp("given") / "raw"
    write_synthetic_raw(
        out,
        seed=5,
        n_batches=1,
        n_lines=2,
        wells=2,
        fields=2,
        fov_size=128,
        cells_per_fov=8,
        effects="basic",
        n_z=1,
    )
    images, nuclei_rows, image_rows = out / "images" / "batch00", [], []
    for n, mask in enumerate(sorted((out / "masks").glob("*_nuclei.tif")), start=1):
        fid = mask.name[: -len("_nuclei.tif")]
        _, plate, well, field = fid.split("_")
        stem = f"{plate}_{well}_s{field}_nucleus_z0"
        lab = tifffile.imread(mask)
        # cellpose's own naming, written beside the image it ran on (a 16-bit PNG)
        skio.imsave(images / f"{stem}_cp_masks.png", lab.astype(np.uint16), check_contrast=False)
        image_rows.append(
            {
                "ImageNumber": n,
                "FileName_DNA": f"{stem}.tif",
                "PathName_DNA": str(images),
                "Metadata_Well": well,
            }
        )
        # CellProfiler drops objects touching the border by default; its centres are centroids
        for r in regionprops(drop_border_objects(lab)):
            nuclei_rows.append(
                {
                    "ImageNumber": n,
                    "ObjectNumber": r.label,
                    "Location_Center_X": r.centroid[1],
                    "Location_Center_Y": r.centroid[0],
                }
            )
    pd.DataFrame(image_rows).to_csv(out / "Image.csv", index=False)
    pd.DataFrame(nuclei_rows).to_csv(out / "Nuclei.csv", index=False)
    return out


def _truth(raw: Path) -> pd.DataFrame:
    """The masks' own objects that do not touch the border: fov_id, label, centroid."""
    rows = []
    for mask in sorted((raw / "masks").glob("*_nuclei.tif")):
        fid = mask.name[: -len("_nuclei.tif")]
        for r in regionprops(drop_border_objects(tifffile.imread(mask))):
            rows.append({"fov_id": fid, "label": r.label, "y": r.centroid[0], "x": r.centroid[1]})
    return pd.DataFrame(rows)


def _params(raw: Path, out: Path, **ingest) -> IngestParams:
    sets = [
        f"ingest.input={raw / 'images'}",
        f"ingest.out={out}",
        f"ingest.platemap={raw / 'platemap.csv'}",
        f"ingest.pattern={DEFAULT_PATTERN}",
        "ingest.channels=[nucleus, cytoplasm]",
        "ingest.normalization=per-image",
        "ingest.crop_size=32",
        "ray.progress=false",
    ]
    sets += [
        f"ingest.{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}"
        for k, v in ingest.items()
    ]
    return IngestParams.from_config(load_config(None, sets).ingest)


def _fov_rejects(plan: dict) -> list[dict]:
    """Field rejects (the cellpose PNGs beside the images are file rejects when not masks)."""
    return [r for r in plan["rejects"] if r["kind"] == "fov"]


def _crop(fov: dict, p: IngestParams, ch: dict):
    row, crops, meta = fov_result(fov, p, ch, None)
    return row, crops, meta


def _cells(meta: pd.DataFrame, fid: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "fov_id": fid,
            "label": meta[K.CELL_ID].str.extract(r"-c(\d+)$")[0].astype(int),
            "y": meta[K.CENTROID_Y],
            "x": meta[K.CENTROID_X],
        }
    )


def _assert_same_cells(got: pd.DataFrame, truth: pd.DataFrame) -> None:
    m = truth.merge(got, on=["fov_id", "label"], how="outer", suffixes=("", "_got"), indicator=True)
    assert (m["_merge"] == "both").all(), m[m["_merge"] != "both"]
    assert np.hypot(m.y - m.y_got, m.x - m.x_got).max() < 1.0


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def test_cellpose_masks_beside_the_images_give_the_masks_objects(raw, tmp_path):
    p = _params(raw, tmp_path / "out", masks=str(raw / "images"))
    plan = plan_ingest(p)
    assert len(plan["fovs"]) == 4 and not plan["rejects"]  # the PNG masks are not images
    got = []
    for fov in plan["fovs"]:
        stem = Path(fov["files"][0]["relpath"]).stem
        assert fov["masks"]["masks"].endswith(f"{stem}_cp_masks.png")
        row, crops, meta = _crop(fov, p, plan["channels"])
        assert row["status"] == "ok", row
        assert crops.shape[1:] == (2, 32, 32) and "morph_area" in meta
        got.append(_cells(meta, fov["fov_id"]))
    _assert_same_cells(pd.concat(got), _truth(raw))


def test_mask_pattern_and_cell_masks(raw, tmp_path):
    groups = r"(?P<batch>batch\d+)_(?P<plate>[^_]+)_(?P<well>[A-P]\d{2})_(?P<field>\d+)"
    p = _params(
        raw,
        tmp_path / "out",
        masks=str(raw / "masks"),
        masks_pattern=groups + r"_nuclei\.tif$",
        cell_masks=str(raw / "masks"),
        cell_masks_pattern=groups + r"_cells\.tif$",
    )
    plan = plan_ingest(p)
    assert len(plan["fovs"]) == 4
    # the cellpose PNGs beside the images are not this run's masks: file rejects, no field lost
    assert {r["code"] for r in plan["rejects"]} == {"no-match"}
    fov = plan["fovs"][0]
    row, _, meta = _crop(fov, p, plan["channels"])
    assert row["status"] == "ok"
    cells = tifffile.imread(fov["masks"]["cell_masks"])
    kept = drop_border_objects(cells)
    assert sorted(_cells(meta, fov["fov_id"]).label) == sorted(np.unique(kept[kept > 0]).tolist())
    # the cell is the object; its nucleus area is the nuclear pixels inside it
    assert (meta.morph_nucleus_area > 0).all() and (meta.morph_nucleus_area < meta.morph_area).all()


def test_binary_mask_is_split_into_connected_components(raw, tmp_path):
    from raycell.ingest.objects import read_mask

    lab = np.zeros((40, 40), np.uint8)
    lab[5:12, 5:12] = lab[20:30, 20:30] = lab[5:9, 30:35] = 255
    path = tmp_path / "bin_masks.png"
    skio.imsave(path, lab, check_contrast=False)
    out = read_mask(str(path), (40, 40))
    assert out.max() == 3 and len(np.unique(out)) == 4
    tifffile.imwrite(tmp_path / "b.tif", lab > 0)
    assert read_mask(str(tmp_path / "b.tif"), (40, 40)).max() == 3
    ids = np.zeros((40, 40), np.uint16)
    ids[5:12, 5:12], ids[20:30, 20:30] = 7, 300
    tifffile.imwrite(tmp_path / "ids.tif", ids)
    assert set(np.unique(read_mask(str(tmp_path / "ids.tif"), (40, 40)))) == {0, 7, 300}


@pytest.mark.parametrize(
    "bad, code, words",
    [
        (lambda lab: lab.astype(np.float32), "mask-not-labels", "float32 pixels"),
        (lambda lab: np.stack([lab] * 3, -1).astype(np.uint8), "mask-not-labels", "one 2-D plane"),
        (lambda lab: lab[:100], "mask-size-mismatch", "100x128"),
        (lambda lab: lab.astype(np.int16) - 1, "mask-not-labels", "negative"),
    ],
)
def test_bad_masks_are_rejected_with_a_reason(raw, tmp_path, bad, code, words):
    masks = tmp_path / "m"
    masks.mkdir()
    for f in (raw / "masks").glob("*_nuclei.tif"):
        tifffile.imwrite(masks / f.name.replace("_nuclei", "_masks"), tifffile.imread(f))
    victim = sorted(masks.iterdir())[0]
    tifffile.imwrite(victim, bad(tifffile.imread(victim)))
    p = _params(raw, tmp_path / "out", masks=str(masks))  # by name: <fov_id>_masks.tif
    plan = plan_ingest(p)
    assert len(plan["fovs"]) == 4
    res = {f["fov_id"]: _crop(f, p, plan["channels"])[0] for f in plan["fovs"]}
    fid = victim.name[: -len("_masks.tif")]
    assert res[fid]["code"] == code and words in res[fid]["reason"], res[fid]
    assert str(victim) in res[fid]["reason"]
    assert all(r["status"] == "ok" for f, r in res.items() if f != fid)


def test_missing_and_duplicate_masks_are_field_rejects(raw, tmp_path):
    masks = tmp_path / "m"
    masks.mkdir()
    files = sorted((raw / "masks").glob("*_nuclei.tif"))
    for f in files[1:]:
        tifffile.imwrite(masks / f.name.replace("_nuclei", "_masks"), tifffile.imread(f))
    second = files[1].name.replace("_nuclei.tif", "")
    tifffile.imwrite(masks / (second + "_cp_masks.tif"), tifffile.imread(files[1]))
    plan = plan_ingest(_params(raw, tmp_path / "out", masks=str(masks)))
    codes = {r["fov_id"]: r["code"] for r in _fov_rejects(plan)}
    assert codes == {files[0].name[:-11]: "missing-mask", second: "duplicate-mask"}
    assert len(plan["fovs"]) == 2
    dup = next(r for r in plan["rejects"] if r["code"] == "duplicate-mask")
    assert "_cp_masks.tif" in dup["reason"] and "_masks.tif" in dup["files"]


def test_mask_setting_errors(raw, tmp_path):
    with pytest.raises(IngestError, match="ingest.masks folder not found"):
        plan_ingest(_params(raw, tmp_path / "o", masks=str(tmp_path / "nope")))
    with pytest.raises(IngestError, match=r"groups \['site'\] are not groups"):
        plan_ingest(
            _params(
                raw, tmp_path / "o", masks=str(raw / "masks"), masks_pattern=r"(?P<site>\d)_nuclei"
            )
        )
    with pytest.raises(IngestError, match="no mask file"):
        plan_ingest(
            _params(raw, tmp_path / "o", masks=str(raw / "masks"), masks_pattern=r"(?P<well>Z99)")
        )
    with pytest.raises(IngestError, match="cell_masks needs ingest.masks"):
        plan_ingest(_params(raw, tmp_path / "o", cell_masks=str(raw / "masks")))
    with pytest.raises(IngestError, match="two alternatives"):
        check_params(
            _params(raw, tmp_path / "o", masks=str(raw / "masks"), objects=str(raw / "Nuclei.csv"))
        )


# --------------------------------------------------------------------------------------------------
# Object tables
# --------------------------------------------------------------------------------------------------


def test_cellprofiler_tables_give_the_masks_objects_unmasked(raw, tmp_path):
    p = _params(
        raw,
        tmp_path / "out",
        objects=str(raw / "Nuclei.csv"),
        objects_images=str(raw / "Image.csv"),
    )
    plan = plan_ingest(p)
    assert len(plan["fovs"]) == 4 and not _fov_rejects(plan)
    assert any("crops are not masked" in n for n in plan["notes"])
    got = []
    for fov in plan["fovs"]:
        row, crops, meta = _crop(fov, p, plan["channels"])
        assert row["status"] == "ok", row
        assert not any(c.startswith(K.MORPH_PREFIX) for c in meta)
        assert meta["ImageNumber"].nunique() == 1
        # unmasked: the crop keeps pixels around the object (a masked crop's corners are 0)
        assert crops[:, 1, :4, :4].max() > 0
        got.append(_cells(meta, fov["fov_id"]))
    _assert_same_cells(pd.concat(got), _truth(raw))


def test_any_table_with_metadata_columns_and_xy(raw, tmp_path):
    t = pd.read_csv(raw / "Nuclei.csv").merge(pd.read_csv(raw / "Image.csv"), on="ImageNumber")
    wells = t.FileName_DNA.str.extract(r"_(?P<well>[A-P]\d{2})_s(?P<field>\d)")
    generic = pd.DataFrame(
        {
            "plate": "SYN00",
            "well": wells.well.str.replace("A0", "A"),
            "field": wells.field,
            "x": t.Location_Center_X,
            "y": t.Location_Center_Y,
            "ObjectNumber": t.ObjectNumber,
        }
    )
    generic.to_parquet(tmp_path / "objs.parquet")
    p = _params(raw, tmp_path / "out", objects=str(tmp_path / "objs.parquet"))
    plan = plan_ingest(p)
    assert len(plan["fovs"]) == 4 and not _fov_rejects(plan)
    got = [_cells(_crop(f, p, plan["channels"])[2], f["fov_id"]) for f in plan["fovs"]]
    _assert_same_cells(pd.concat(got), _truth(raw))


def test_bad_object_tables(raw, tmp_path):
    nuc = pd.read_csv(raw / "Nuclei.csv")
    img = str(raw / "Image.csv")

    def plan_with(table: pd.DataFrame, **kw):
        table.to_csv(tmp_path / "t.csv", index=False)
        return plan_ingest(_params(raw, tmp_path / "out", objects=str(tmp_path / "t.csv"), **kw))

    with pytest.raises(IngestError, match="no x/y columns"):
        plan_with(nuc.drop(columns=["Location_Center_X"]), objects_images=img)
    with pytest.raises(IngestError, match="give its Image.csv as ingest.objects_images"):
        plan_with(nuc)
    with pytest.raises(IngestError, match="appears twice"):
        plan_with(pd.concat([nuc, nuc.iloc[:1]]), objects_images=img)
    with pytest.raises(IngestError, match="row 2 has no numeric"):
        plan_with(nuc.assign(Location_Center_X=["?"] + [1.0] * (len(nuc) - 1)), objects_images=img)
    with pytest.raises(IngestError, match="none of its"):
        plan_with(nuc.assign(ImageNumber=99), objects_images=img)
    with pytest.raises(IngestError, match="match 2 fields of view.*needs more of the columns"):
        plan_with(pd.DataFrame({"well": ["A01"], "x": [5.0], "y": [6.0]}))  # two fields per well
    with pytest.raises(IngestError, match="ingest.objects not found"):
        plan_ingest(_params(raw, tmp_path / "out", objects=str(tmp_path / "missing.csv")))
    # a field without rows is a reject; rows of no field are a note
    plan = plan_with(
        pd.concat([nuc[nuc.ImageNumber != 1], nuc.iloc[:1].assign(ImageNumber=42)]),
        objects_images=img,
    )
    assert [r["code"] for r in _fov_rejects(plan)] == ["no-objects"]
    assert any("1 of" in n and "name no field" in n for n in plan["notes"])
    # centres outside the image (x and y in microns, say): the field is rejected with the reason
    p = _params(raw, tmp_path / "out", objects=str(tmp_path / "t.csv"), objects_images=img)
    nuc.assign(Location_Center_X=nuc.Location_Center_X * 3).to_csv(tmp_path / "t.csv", index=False)
    plan = plan_ingest(p)
    rows = [_crop(f, p, plan["channels"])[0] for f in plan["fovs"]]
    assert "objects-outside-image" in {r["code"] for r in rows}
    assert any("outside the 128x128 field" in r["reason"] for r in rows)


# --------------------------------------------------------------------------------------------------
# End to end: same cells from masks and from the table, ids into the embeddings' ObjectNumber
# --------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_ingest_from_masks_and_from_table_give_the_same_cells(ray_local, raw, tmp_path):
    import pyarrow as pa

    from raycell.formats.shards import open_dataset
    from raycell.infer.predictor import object_numbers
    from raycell.ingest.driver import ingest_fields

    truth = _truth(raw)
    runs = {
        "masks": ["ingest.masks=" + str(raw / "images")],
        "table": [
            "ingest.objects=" + str(raw / "Nuclei.csv"),
            "ingest.objects_images=" + str(raw / "Image.csv"),
        ],
    }
    for name, sets in runs.items():
        out = tmp_path / name
        cfg = load_config(
            None,
            [
                f"ingest.input={raw / 'images'}",
                f"ingest.out={out}",
                f"ingest.platemap={raw / 'platemap.csv'}",
                f"ingest.pattern={DEFAULT_PATTERN}",
                "ingest.channels=[nucleus, cytoplasm]",
                "ingest.crop_size=32",
                "ray.progress=false",
                *sets,
            ],
        )
        s = ingest_fields(cfg)
        assert s["n_fovs_with_cells"] == 4 and s["n_cells"] == len(truth), (name, s)
        # the PNG masks beside the images are masks, not files to reject; for the table run they
        # are files the image pattern does not match
        assert s["n_files_rejected"] == (0 if name == "masks" else 4)
        ds = open_dataset(out, check=True)
        t = pa.concat_tables([ds.read_shard(f) for f in ds.shard_paths]).to_pandas()
        fid = t[K.CELL_ID].str.rsplit("-c", n=1).str[0]
        _assert_same_cells(
            pd.DataFrame(
                {
                    "fov_id": fid,
                    "label": object_numbers(pa.array(t[K.CELL_ID])).to_numpy(),
                    "y": t[K.CENTROID_Y],
                    "x": t[K.CENTROID_X],
                }
            ),
            truth,
        )
        if name == "table":
            assert set(t["ImageNumber"]) == {"1", "2", "3", "4"}


def test_image_table_with_file_names_repeated_across_plates(tmp_path):
    """Phenix names repeat on every plate: Image.csv's Metadata_Plate picks the field."""
    root = tmp_path / "in"
    for plate in ("P1", "P2"):
        for ch in (1, 2):
            d = root / plate / "Images"
            d.mkdir(parents=True, exist_ok=True)
            plane = np.zeros((40, 40), np.uint16)
            tifffile.imwrite(d / f"r01c01f01p01-ch{ch}sk1fk1fl1.tiff", plane)
    name = "r01c01f01p01-ch1sk1fk1fl1.tiff"
    pd.DataFrame(
        {"ImageNumber": [1, 2], "FileName_DNA": [name, name], "Metadata_Plate": ["P2", "P1"]}
    ).to_csv(tmp_path / "Image.csv", index=False)
    pd.DataFrame(
        {
            "ImageNumber": [1, 2],
            "ObjectNumber": [3, 4],
            "Location_Center_X": [9.0, 20.0],
            "Location_Center_Y": [11.0, 30.0],
        }
    ).to_csv(tmp_path / "Nuclei.csv", index=False)
    sets = [
        f"ingest.input={root}",
        f"ingest.out={tmp_path / 'o'}",
        "ingest.preset=phenix",
        f"ingest.objects={tmp_path / 'Nuclei.csv'}",
        f"ingest.objects_images={tmp_path / 'Image.csv'}",
    ]
    plan = plan_ingest(IngestParams.from_config(load_config(None, sets).ingest))
    got = {
        f["meta"]["plate"]: (f["meta"]["ImageNumber"], f["objects"]["ids"]) for f in plan["fovs"]
    }
    assert got == {"P2": ("1", [3]), "P1": ("2", [4])}
    # without the metadata column, PathName's folders decide (an s3:// copy of the same layout)
    pd.DataFrame(
        {
            "ImageNumber": [1, 2],
            "FileName_DNA": [name, name],
            "PathName_DNA": ["s3://bucket/P1/Images/", "s3://bucket/P2/Images"],
        }
    ).to_csv(tmp_path / "Image.csv", index=False)
    plan = plan_ingest(IngestParams.from_config(load_config(None, sets).ingest))
    assert {f["meta"]["plate"]: f["meta"]["ImageNumber"] for f in plan["fovs"]} == {
        "P1": "1",
        "P2": "2",
    }
    # with neither, a one-line error
    pd.DataFrame({"ImageNumber": [1, 2], "FileName_DNA": [name, name]}).to_csv(
        tmp_path / "Image.csv", index=False
    )
    with pytest.raises(IngestError, match="ImageNumber 1 names files of several fields"):
        plan_ingest(IngestParams.from_config(load_config(None, sets).ingest))
