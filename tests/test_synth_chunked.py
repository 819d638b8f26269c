"""`raycell synth` in chunks: the bytes of a data set depend on the seed and the generator's
arguments only, never on how it is chunked or how many Ray tasks write it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from helpers import dataset_fingerprint

from raycell.data.synthetic import BLOCK_CELLS, generate, write_synthetic
from raycell.data.synthetic_raw import write_synthetic_raw
from raycell.data.synthetic_timedose import generate_timedose, write_timedose
from raycell.errors import ConfigError
from raycell.formats.shards import open_dataset

# more than two random blocks, and shards that neither divide the cells nor line up with the blocks
CROPS = dict(n_cells=2 * BLOCK_CELLS + 300, crop_size=16, rows_per_shard=300, seed=5)
TIMEDOSE = dict(n_cells=BLOCK_CELLS + 500, crop_size=16, rows_per_shard=400, seed=2)
RAW = dict(
    seed=3,
    n_batches=2,
    n_lines=2,
    wells=2,
    fields=2,
    fov_size=64,
    cells_per_fov=4,
    n_z=2,
    n_unseen=1,
)


def _files(folder: Path) -> dict:
    """Every file of a folder (relative path -> hash of its bytes)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def crops_one_chunk(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "one_chunk"
    write_synthetic(str(out), chunk_cells=10**6, num_workers=0, **CROPS)
    return out


@pytest.fixture(scope="module")
def timedose_one_chunk(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "td_one_chunk"
    write_timedose(str(out), chunk_cells=10**6, num_workers=0, **TIMEDOSE)
    return out


def test_one_chunk_holds_what_generate_gives(crops_one_chunk):
    ds = open_dataset(crops_one_chunk, check=True)
    m = ds.manifest.to_dict()
    assert m["n_cells"] == CROPS["n_cells"] and [s["rows"] for s in m["shards"]] == [300] * 7 + [
        248
    ]
    assert "chunk_cells" not in m["params"] and "num_workers" not in m["params"]
    imgs, meta = ds.load_images()
    ref_img, ref_meta, gt = generate(**{k: v for k, v in CROPS.items() if k != "rows_per_shard"})
    assert np.array_equal(imgs, ref_img)
    assert (meta.cell_id.to_numpy() == ref_meta.cell_id.to_numpy()).all()
    assert np.array_equal(meta.true_radius.to_numpy(), ref_meta.true_radius.to_numpy())
    assert m["ground_truth"]["unseen_batches"] == gt["unseen_batches"]


@pytest.mark.parametrize("chunk_cells", [1, 299, 700, 2 * BLOCK_CELLS])
def test_chunked_crops_are_byte_identical(crops_one_chunk, tmp_path, chunk_cells):
    out = tmp_path / "chunked"
    write_synthetic(str(out), chunk_cells=chunk_cells, num_workers=0, progress=False, **CROPS)
    assert dataset_fingerprint(out) == dataset_fingerprint(crops_one_chunk)


def test_any_block_renders_alone():
    """A block's cells come from its own stream: rendered alone they equal the whole run's."""
    from raycell.data.synthetic import synth_plan

    img, meta, _ = generate(n_cells=BLOCK_CELLS + 10, crop_size=16, seed=5)
    plan, _ = synth_plan(n_cells=BLOCK_CELLS + 10, crop_size=16, seed=5)
    alone, alone_meta = plan.render_block(1)
    assert len(alone) == 10 and np.array_equal(alone, img[BLOCK_CELLS:])
    assert alone_meta.equals(meta.iloc[BLOCK_CELLS:].reset_index(drop=True))
    other, _, _ = generate(n_cells=BLOCK_CELLS + 10, crop_size=16, seed=6)
    assert not np.array_equal(img, other)


def test_chunked_timedose_is_byte_identical(timedose_one_chunk, tmp_path):
    ds = open_dataset(timedose_one_chunk, check=True)
    imgs, meta = ds.load_images()
    ref_img, ref_meta, _ = generate_timedose(
        **{k: v for k, v in TIMEDOSE.items() if k != "rows_per_shard"}
    )
    assert np.array_equal(imgs, ref_img)
    assert (meta.group.to_numpy() == ref_meta.group.to_numpy()).all()
    for chunk_cells in (1, 900):
        out = tmp_path / f"c{chunk_cells}"
        write_timedose(str(out), chunk_cells=chunk_cells, num_workers=0, **TIMEDOSE)
        assert dataset_fingerprint(out) == dataset_fingerprint(timedose_one_chunk)


@pytest.fixture(scope="module")
def raw_one_chunk(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw") / "one_chunk"
    write_synthetic_raw(out, chunk_fovs=100, num_workers=0, **RAW)
    return out


@pytest.mark.parametrize("chunk_fovs", [1, 3])
def test_chunked_raw_fields_are_byte_identical(raw_one_chunk, tmp_path, chunk_fovs):
    out = tmp_path / "raw"
    info = write_synthetic_raw(out, chunk_fovs=chunk_fovs, num_workers=0, **RAW)
    assert info["n_fovs"] == 8 and "chunk_fovs" not in info["params"]
    assert _files(out) == _files(raw_one_chunk)  # TIFFs, masks, truth.csv, platemap.csv, raw.json


@pytest.mark.ray
def test_ray_tasks_write_the_same_bytes(
    ray_local, crops_one_chunk, timedose_one_chunk, raw_one_chunk, tmp_path
):
    write_synthetic(str(tmp_path / "ray"), chunk_cells=600, num_workers=2, **CROPS)
    assert dataset_fingerprint(tmp_path / "ray") == dataset_fingerprint(crops_one_chunk)
    write_timedose(str(tmp_path / "ray_td"), chunk_cells=400, num_workers=2, **TIMEDOSE)
    assert dataset_fingerprint(tmp_path / "ray_td") == dataset_fingerprint(timedose_one_chunk)
    write_synthetic_raw(tmp_path / "ray_raw", chunk_fovs=3, num_workers=2, **RAW)
    assert _files(tmp_path / "ray_raw") == _files(raw_one_chunk)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(chunk_cells=0), r"synth.chunk_cells must be a whole number >= 1, got 0"),
        (dict(chunk_cells=2.5), r"synth.chunk_cells must be a whole number >= 1, got 2.5"),
        (dict(num_workers=-1), r"synth.num_workers must be a whole number >= 0, got -1"),
        (dict(rows_per_shard=0), r"synth.rows_per_shard must be a whole number >= 1, got 0"),
    ],
)
@pytest.mark.parametrize("writer", [write_synthetic, write_timedose])
def test_bad_chunking_gives_one_line_errors(tmp_path, writer, kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        writer(str(tmp_path / "ds"), **{**dict(n_cells=200, crop_size=16), **kw})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "ds").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(chunk_fovs=0), r"write_synthetic_raw: chunk_fovs must be a whole number >= 1, got 0"),
        (
            dict(num_workers=-2),
            r"write_synthetic_raw: num_workers must be a whole number >= 0, got -2",
        ),
    ],
)
def test_bad_raw_chunking_gives_one_line_errors(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        write_synthetic_raw(tmp_path / "raw", **{**RAW, **kw})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "raw").exists()
