"""Synthetic raw fields of view: layout, determinism, focus truth, segmentation against truth."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from raycell.data.synthetic_raw import DEFAULT_PATTERN, write_synthetic_raw
from raycell.ingest.images import load_fov_image
from raycell.ingest.segmentation_eval import evaluate_segmentation, match_instances
from raycell.ingest.sources import discover, group_fovs


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw") / "synth_raw"
    # seed 11: not a seed anything was developed on
    write_synthetic_raw(
        out, seed=11, n_batches=2, n_lines=4, wells=2, fields=2, fov_size=256, cells_per_fov=24
    )
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
    write_synthetic_raw(
        again, seed=11, n_batches=2, n_lines=4, wells=2, fields=2, fov_size=256, cells_per_fov=24
    )
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
