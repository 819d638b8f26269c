"""OME-TIFF and OME-Zarr (NGFF) fields: the same pixels as plain TIFFs give the same crops.

The synthetic raw fields (one TIFF per channel) are rewritten as one OME-TIFF per field (CZYX, with
its physical pixel size) and as an OME-Zarr HCS plate (``SYN00.zarr/<row>/<col>/<field>``, two
resolution levels); each layout is planned and cropped field by field (no Ray): same cell ids, same
crops, byte for byte, and the pixel size from the metadata. One end-to-end run checks the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from raycell.config import load_config
from raycell.data.synthetic_raw import write_synthetic_raw
from raycell.ingest import ome
from raycell.ingest.fov import fov_result
from raycell.ingest.params import IngestParams
from raycell.ingest.plan import plan_ingest

PLAIN = r"(?P<plate>[^_/]+)_(?P<well>[A-P]\d{2})_s(?P<field>\d+)_(?P<channel>[a-z]+)_z0\.tif$"
OME_TIFF = r"(?P<plate>[^_/]+)_(?P<well>[A-P]\d{2})_s(?P<field>\d+)\.ome\.tif$"


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    import zarr
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    base = tmp_path_factory.mktemp("ome")
    write_synthetic_raw(
        base / "raw",
        seed=2,
        n_batches=1,
        n_lines=2,
        wells=2,
        fields=2,
        fov_size=128,
        cells_per_fov=8,
        effects="basic",
        n_z=1,
    )
    plain = base / "raw" / "images" / "batch00"
    tif, zarr_root = base / "ome_tiff", base / "ome_zarr"
    tif.mkdir()
    fields = sorted({f.name.rsplit("_", 2)[0] for f in plain.glob("*.tif")})  # SYN00_A01_s0
    plate = zarr.open_group(zarr_root / "SYN00.zarr", mode="w")
    wells = sorted({f.split("_")[1] for f in fields})
    write_plate_metadata(
        plate, ["A"], [str(int(w[1:])) for w in wells], [f"A/{int(w[1:])}" for w in wells]
    )
    for name in fields:
        _, well, site = name.split("_")
        czyx = np.stack(
            [tifffile.imread(plain / f"{name}_{c}_z0.tif") for c in ("nucleus", "cytoplasm")]
        )[:, None]
        tifffile.imwrite(
            tif / f"{name}.ome.tif",
            czyx,
            ome=True,
            metadata={
                "axes": "CZYX",
                "PhysicalSizeX": 0.65,
                "PhysicalSizeY": 0.65,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeYUnit": "µm",
            },
        )
        well_group = plate.require_group(f"A/{int(well[1:])}")
        field = well_group.require_group(site[1:])
        write_image(
            czyx,
            field,
            axes="czyx",
            scale_factors=[2],
            scale={"c": 1.0, "z": 1.0, "y": 0.65, "x": 0.65},
            axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"},
        )
    for well in wells:
        write_well_metadata(plate[f"A/{int(well[1:])}"], ["0", "1"])
    return {"plain": plain, "ome_tiff": tif, "ome_zarr": zarr_root}


def _params(root: Path, **ingest) -> IngestParams:
    sets = [
        f"ingest.input={root}",
        f"ingest.out={root.parent / 'out'}",
        "ingest.normalization=per-image",
        "ingest.crop_size=32",
        "ingest.diameter=10",
        "ingest.channel_names=[nucleus, cytoplasm]",
        "ingest.cytoplasm_channel=cytoplasm",
        "ray.progress=false",
    ]
    sets += [
        f"ingest.{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}"
        for k, v in ingest.items()
    ]
    return IngestParams.from_config(load_config(None, sets).ingest)


LAYOUTS = {
    "plain": {"pattern": PLAIN, "channels": ["nucleus", "cytoplasm"]},
    "ome_tiff": {"pattern": OME_TIFF},
    "ome_zarr": {"preset": "ome-zarr"},
}


def _crops(root: Path, **kw) -> tuple[dict, dict]:
    p = _params(root, **kw)
    plan = plan_ingest(p)
    out = {}
    for fov in plan["fovs"]:
        row, crops, meta = fov_result(fov, p, plan["channels"], None)
        assert row["status"] == "ok", row
        out[fov["fov_id"]] = (meta["cell_id"].tolist(), crops)
    return out, plan


def test_ome_tiff_and_ome_zarr_give_the_same_crops_as_plain_tiffs(trees):
    ref, plan = _crops(trees["plain"], **LAYOUTS["plain"])
    assert len(ref) == 4 and plan["pixel_size"] is None
    for name in ("ome_tiff", "ome_zarr"):
        got, plan = _crops(trees[name], **LAYOUTS[name])
        assert sorted(got) == sorted(ref), name  # same fields: SYN00_A01_0, ...
        for fid, (ids, crops) in ref.items():
            assert got[fid][0] == ids, (name, fid)
            assert np.array_equal(got[fid][1], crops), (name, fid)
        assert plan["pixel_size"]["x"] == pytest.approx(0.65)
        assert plan["pixel_size"]["unit"] in ("µm", "micrometer")
        assert {f["meta"]["well"] for f in plan["fovs"]} == {"A01", "A02"}


def test_ome_zarr_reads_the_full_resolution_level_plane_by_plane(trees, monkeypatch):
    field = next(ome.find_zarr_images(trees["ome_zarr"]).__iter__())
    assert field.relative_to(trees["ome_zarr"]).as_posix() == "SYN00.zarr/A/1/0"
    arr, axes = ome.read_zarr(str(field))
    assert axes == "CZYX" and arr.shape == (2, 1, 128, 128)  # level 0, not the half-size level
    seen = []
    real = ome._planes

    def spy(lazy, axes, dtype):
        seen.append(lazy.shape)
        return real(lazy, axes, dtype)

    monkeypatch.setattr(ome, "_planes", spy)
    ome.read_zarr(str(field))
    assert seen == [(2, 1, 128, 128)]
    tif = sorted(trees["ome_tiff"].glob("*.ome.tif"))[0]
    arr, axes = ome.read_tiff(str(tif))  # one page per channel; tifffile squeezes Z of size 1
    assert axes == "CYX" and np.array_equal(arr, tifffile.imread(tif))


@pytest.mark.ray
def test_ome_zarr_ingest_records_the_pixel_size(ray_local, trees, tmp_path):
    from raycell.formats.shards import open_dataset
    from raycell.ingest.driver import ingest_fields

    cfg = load_config(
        None,
        [
            f"ingest.input={trees['ome_zarr']}",
            f"ingest.out={tmp_path / 'o'}",
            "ingest.preset=ome-zarr",
            "ingest.crop_size=32",
            "ray.progress=false",
            "ingest.channel_names=[nucleus, cytoplasm]",
        ],
    )
    s = ingest_fields(cfg)
    assert s["n_fovs_with_cells"] == 4 and s["n_cells"] > 10
    px = open_dataset(tmp_path / "o").manifest.ingest["pixel_size"]
    assert px["x"] == pytest.approx(0.65) and px["source"] == "ome-zarr"
