"""Output folders never cost a user their data (issue 7 items 1, 8, 10).

ingest, import-armed, synth and synth --raw refuse, in one line and before any Ray or pixel work,
an output that is a file, a folder of the user's own files, or an input; --overwrite replaces only
what raycell wrote; a user's `X.partial` / `X.old` folders survive; written files follow the umask.
None of these start Ray: `init_ray` is replaced by a function that fails the test if a verb gets
that far.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raycell.__main__ import main

# synth --raw small enough to take well under a second
RAW_SET = [
    "synth.n_batches=1",
    "synth.n_unseen=0",
    "synth.n_lines=2",
    "synth.raw_wells=1",
    "synth.raw_fields=1",
    "synth.raw_fov_size=64",
    "synth.raw_cells_per_fov=3",
    "synth.raw_z=1",
]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Every check here must happen before Ray starts."""
    import raycell.utils.ray_utils as ru

    def _fail(*_a, **_k):
        raise AssertionError("Ray was started: the output should have been refused before")

    monkeypatch.setattr(ru, "init_ray", _fail)


def _user_folder(path: Path) -> dict:
    """A folder of the user's own files; returns their contents to compare after."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub").mkdir()
    (path / "sub" / "img.tif").write_bytes(b"\x00" * 10)
    return _snapshot(path)


def _snapshot(path: Path) -> dict:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in files}


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raycell: error: "), err
    return err[0]


def _raw_args(out: Path, *extra: str) -> list[str]:
    args = ["synth", "--raw", "--out", str(out)]
    for s in RAW_SET:
        args += ["--set", s]
    return args + list(extra)


def _ingest_args(inp: Path, out: Path, platemap: Path | None = None, *extra: str) -> list[str]:
    args = ["ingest", "--input", str(inp), "--out", str(out), "--set", "ray.progress=false"]
    if platemap is not None:
        args += ["--platemap", str(platemap)]
    return args + list(extra)


@pytest.fixture()
def raw_input(tmp_path) -> tuple[Path, Path]:
    """An input folder with an image and a plate map (never read: the output check comes first)."""
    images = tmp_path / "raw" / "images"
    images.mkdir(parents=True)
    (images / "A01_s0_nucleus.tif").write_bytes(b"II*\x00" + b"\x00" * 100)
    pm = tmp_path / "raw" / "platemap.csv"
    pm.write_text("plate,well,label\nP1,A01,high\n")
    return images, pm


def _armed_src(folder: Path) -> Path:
    """A minimal ARMED source folder: data_train.npz + data_train.csv."""
    folder.mkdir(parents=True)
    n = 6
    eff = np.array(["high", "low"] * 3)
    np.savez(
        folder / "data_train.npz",
        images=np.full((n, 8, 8, 1), 0.5, np.float32),
        label=(eff == "low").astype(np.float32),
        cluster=np.ones((n, 1), np.float32),
    )
    meta = {
        "image": [f"c{i}.png" for i in range(n)],
        "date": "160802",
        "celltype": "m481",
        "met-eff": eff,
        "cell": [f"cell{i}" for i in range(n)],
    }
    pd.DataFrame(meta).to_csv(folder / "data_train.csv")
    return folder


# ---- ingest -------------------------------------------------------------------------------------


def test_ingest_refuses_user_folder_before_ray(raw_input, tmp_path, capsys):
    images, pm = raw_input
    out = tmp_path / "mine"
    before = _user_folder(out)
    for extra in ([], ["--overwrite"]):  # --overwrite never replaces a folder raycell did not write
        assert main(_ingest_args(images, out, pm, *extra)) == 2
        line = _err_line(capsys)
        assert "ingest.out" in line and str(out) in line and "raycell did not write" in line
        assert _snapshot(out) == before


def test_ingest_out_equal_to_input_keeps_inputs(raw_input, capsys):
    images, pm = raw_input
    before, pm_text = _snapshot(images), pm.read_text()
    assert main(_ingest_args(images, images, pm, "--overwrite")) == 2
    assert "is the input ingest.input" in _err_line(capsys)
    # an output holding the plate map, or inside the input folder, is refused the same way
    assert main(_ingest_args(images, pm.parent, pm)) == 2
    assert "contains the input" in _err_line(capsys)
    assert main(_ingest_args(images, images / "crops", pm)) == 2
    assert "is inside the input ingest.input" in _err_line(capsys)
    assert _snapshot(images) == before and pm.read_text() == pm_text
    assert not (images / "crops").exists()


def test_ingest_out_symlink_to_input_refused(raw_input, tmp_path, capsys):
    images, pm = raw_input
    link = tmp_path / "link"
    link.symlink_to(images, target_is_directory=True)
    before = _snapshot(images)
    assert main(_ingest_args(images, link, pm, "--overwrite")) == 2
    assert "is the input ingest.input" in _err_line(capsys)
    assert _snapshot(images) == before


def test_ingest_out_is_a_file_fails_before_ray(raw_input, tmp_path, capsys):
    images, pm = raw_input
    f = tmp_path / "crops.txt"
    f.write_text("keep me")
    assert main(_ingest_args(images, f, pm)) == 2
    assert "is a file, not a folder" in _err_line(capsys)
    assert main(_ingest_args(images, f / "crops", pm)) == 2  # a path under a file cannot be written
    assert f"lies under the file {f}" in _err_line(capsys)
    assert f.read_text() == "keep me" and not list(tmp_path.glob("crops.txt.*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_ingest_unwritable_out_fails_before_ray(raw_input, tmp_path, capsys):
    images, pm = raw_input
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(_ingest_args(images, ro / "crops", pm)) == 2
        assert "permission denied" in _err_line(capsys)
    finally:
        ro.chmod(0o755)


# ---- import-armed -------------------------------------------------------------------------------


def test_import_armed_refuses_user_folder_and_file(tmp_path, capsys):
    src = _armed_src(tmp_path / "armed")
    out = tmp_path / "mine"
    before = _user_folder(out)
    for extra in ([], ["--overwrite"]):
        assert main(["import-armed", str(src), "--out", str(out), *extra]) == 2
        line = _err_line(capsys)
        assert "import-armed --out" in line and "raycell did not write" in line
        assert _snapshot(out) == before
    f = tmp_path / "out.txt"
    f.write_text("keep me")
    assert main(["import-armed", str(src), "--out", str(f), "--overwrite"]) == 2
    assert "is a file, not a folder" in _err_line(capsys)
    assert f.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == [
        "armed",
        "mine",
        "out.txt",
    ]


def test_import_armed_src_as_out_keeps_source(tmp_path, capsys):
    src = _armed_src(tmp_path / "armed")
    before = _snapshot(src)
    assert main(["import-armed", str(src), "--out", str(src), "--overwrite"]) == 2
    assert "is the input ARMED source folder" in _err_line(capsys)
    # the same with a glob: the output folder holds the source files
    assert main(["import-armed", str(src / "data_*.npz"), "--out", str(src)]) == 2
    assert "contains the input ARMED file" in _err_line(capsys)
    assert _snapshot(src) == before


def test_import_armed_overwrite_replaces_only_its_own_output(tmp_path, capsys):
    src = _armed_src(tmp_path / "armed")
    out = tmp_path / "ds"
    # the user's folders that happen to carry raycell's old staging names are not raycell's
    partial, old = _user_folder(tmp_path / "ds.partial"), _user_folder(tmp_path / "ds.old")
    assert main(["import-armed", str(src), "--out", str(out)]) == 0
    assert main(["import-armed", str(src), "--out", str(out)]) == 2
    assert "already holds a data set" in _err_line(capsys)
    assert main(["import-armed", str(src), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "dataset.json").read_text())["n_cells"] == 6
    assert _snapshot(tmp_path / "ds.partial") == partial and _snapshot(tmp_path / "ds.old") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["armed", "ds", "ds.old", "ds.partial"]


# ---- synth and synth --raw ---------------------------------------------------------------------


def test_synth_raw_existing_folder_one_line(tmp_path, capsys):
    out = tmp_path / "mine"
    before = _user_folder(out)
    assert main(_raw_args(out)) == 2
    assert "synth.out" in _err_line(capsys)
    assert main(_raw_args(out, "--overwrite")) == 2  # a non-raycell folder is refused even so
    assert "raycell did not write" in _err_line(capsys)
    assert _snapshot(out) == before
    assert main(["synth", "--out", str(out), "--set", "synth.n_cells=60"]) == 2  # crop synth too
    assert "raycell did not write" in _err_line(capsys)
    assert _snapshot(out) == before


def test_synth_raw_overwrite_own_output_keeps_user_partial(tmp_path, capsys):
    out = tmp_path / "raw"
    user_partial = _user_folder(tmp_path / "raw.partial")
    assert main(_raw_args(out)) == 0
    first = json.loads((out / "raw.json").read_text())
    assert main(_raw_args(out)) == 2  # a raycell raw folder needs --overwrite
    assert "already holds a synth --raw folder" in _err_line(capsys)
    assert main(_raw_args(out, "--overwrite")) == 0
    assert json.loads((out / "raw.json").read_text()) == first
    assert _snapshot(tmp_path / "raw.partial") == user_partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "raw.partial"]
    # a crop data set is not written over a raw folder, even with --overwrite
    assert main(["synth", "--out", str(out), "--overwrite", "--set", "synth.n_cells=60"]) == 2
    assert "not a data set" in _err_line(capsys)


def test_killed_run_leftovers_are_cleaned_user_folders_kept(tmp_path):
    from raycell.data.synthetic import write_synthetic
    from raycell.utils.outputs import DATASET, staging_dir

    out = tmp_path / "ds"
    stale = staging_dir(out, DATASET)  # what a killed run leaves beside the output
    (stale / "shards").mkdir()
    (stale / "shards" / "part-00000.parquet").write_bytes(b"half")
    mine = _user_folder(tmp_path / "ds.partial-mine")  # the same pattern, but the user's
    write_synthetic(str(out), n_cells=60, crop_size=16, rows_per_shard=30)
    assert not stale.exists() and _snapshot(tmp_path / "ds.partial-mine") == mine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds.partial-mine"]


# ---- item 10: the user's umask ------------------------------------------------------------------


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
def test_written_files_follow_umask(tmp_path, umask, file_mode, dir_mode):
    from raycell.data.synthetic import write_synthetic
    from raycell.utils.io import atomic_write_json

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"a": 1})
        write_synthetic(str(tmp_path / "ds"), n_cells=60, crop_size=16, rows_per_shard=30)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == file_mode
    files = [p for p in (tmp_path / "ds").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"dataset.json", "part-00000.parquet"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == file_mode, p
    for d in [tmp_path / "ds", *(p for p in (tmp_path / "ds").rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(d.stat().st_mode) == dir_mode, d


# ---- export: a single output file ---------------------------------------------------------------


def _embeddings(folder: Path, n: int = 12, dataset: str = "") -> Path:
    """A small embeddings folder in the profiling layout (two shards, unique cell ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "shards").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cols = {
        "Metadata_Plate": ["P1"] * n,
        "Metadata_Well": [f"A{i % 3:02d}" for i in range(n)],
        "Metadata_CellID": [f"c{i}" for i in range(n)],
    }
    feats = [f"Cells_Embedding_{j:04d}" for j in range(4)]
    table = pa.table({**cols, **{f: rng.normal(size=n).astype(np.float32) for f in feats}})
    half = n // 2
    pq.write_table(table.slice(0, half), folder / "shards" / "part-00000.parquet")
    pq.write_table(table.slice(half), folder / "shards" / "part-00001.parquet")
    manifest = {
        "layout": "columns",
        "features": feats,
        "heads": {},
        "n_cells": n,
        "dataset": dataset,
        "shards": [{"file": f"shards/part-0000{i}.parquet"} for i in range(2)],
    }
    (folder / "embeddings.json").write_text(json.dumps(manifest))
    return folder


def _export(emb: Path, out: Path, fmt: str, *extra: str) -> int:
    return main(["export", "--embeddings", str(emb), "--out", str(out), "--format", fmt, *extra])


@pytest.mark.parametrize(
    "fmt,name", [("h5ad", "mine.h5ad"), ("csv", "mine.csv"), ("parquet", "mine.parquet")]
)
def test_export_never_replaces_a_users_file(tmp_path, capsys, fmt, name):
    emb = _embeddings(tmp_path / "emb")
    mine = tmp_path / name
    mine.write_bytes(b"the user's own file")
    for extra in ([], ["--overwrite"]):
        assert _export(emb, mine, fmt, *extra) == 2
        assert "raycell did not write it" in _err_line(capsys)
        assert mine.read_bytes() == b"the user's own file"


@pytest.mark.parametrize("fmt", ["h5ad", "csv", "parquet"])
def test_export_replaces_its_own_file_only_with_overwrite(tmp_path, capsys, fmt):
    emb = _embeddings(tmp_path / "emb")
    out = tmp_path / f"cells.{fmt}"
    assert _export(emb, out, fmt) == 0
    first = out.read_bytes()
    assert _export(emb, out, fmt) == 2
    assert "--overwrite" in _err_line(capsys) and out.read_bytes() == first
    assert _export(emb, out, fmt, "--overwrite") == 0
    assert out.stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp" + out.suffix)]
    # the user saves their own content over the export: it is theirs now
    out.write_bytes(b"edited by the user")
    assert _export(emb, out, fmt, "--overwrite") == 2
    assert "raycell did not write it" in _err_line(capsys)
    assert out.read_bytes() == b"edited by the user"


def test_export_never_writes_inside_a_data_set_or_embeddings(tiny_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    emb = _embeddings(tmp_path / "emb", dataset=str(data))
    shard = data / "shards" / "part-00000.parquet"
    before = shard.read_bytes()
    for out in (shard, data / "cells.parquet", emb / "cells.parquet", emb / "shards" / "x.parquet"):
        assert _export(emb, out, "parquet", "--overwrite") == 2, out
        line = _err_line(capsys)
        assert "lies inside" in line or "is the input" in line, line
    assert shard.read_bytes() == before
    assert not (data / "cells.parquet").exists() and not (emb / "cells.parquet").exists()


def test_export_refuses_a_duplicated_shard(tmp_path, capsys):
    import shutil

    emb = _embeddings(tmp_path / "emb")
    m = json.loads((emb / "embeddings.json").read_text())
    m.pop("n_cells")
    (emb / "embeddings.json").write_text(json.dumps(m))
    shutil.copy(emb / "shards" / "part-00000.parquet", emb / "shards" / "part-00002.parquet")
    assert _export(emb, tmp_path / "cells.csv", "csv") == 2
    assert "part-00002.parquet" in _err_line(capsys)
    m.pop("shards")  # no shard list: the repeated cell ids still give it away
    (emb / "embeddings.json").write_text(json.dumps(m))
    assert _export(emb, tmp_path / "cells.csv", "csv") == 2
    assert "repeat a Metadata_CellID" in _err_line(capsys)
    assert not (tmp_path / "cells.csv").exists()


# ---- infer / embed: output folders -------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory) -> Path:
    """An untrained checkpoint for the tiny data set (no training needed to test output checks)."""
    import torch

    from raycell import constants as K
    from raycell.formats.categories import CategoryMap
    from raycell.formats.checkpoint import save_checkpoint
    from raycell.formats.shards import open_dataset
    from raycell.formats.spec import DataSpec
    from raycell.models import create_model

    ds = open_dataset(tiny_data)
    spec = DataSpec.from_dataset(ds)
    torch.manual_seed(0)
    seen = tuple(f"batch{i:02d}" for i in range(6))
    model = create_model(
        "conventional",
        in_channels=spec.shape[0],
        n_classes=2,
        n_batches=len(seen),
        preset="tiny",
        image_size=spec.shape[1],
    )
    labels = CategoryMap(K.LABEL, tuple(ds.manifest.label_vocab))
    return save_checkpoint(
        tmp_path_factory.mktemp("ck") / "run" / "checkpoint",
        model,
        None,
        epoch=0,
        spec=spec,
        labels=labels,
        batches=CategoryMap(K.BATCH, seen),
        config={},
        metrics={},
    )


@pytest.mark.parametrize("verb", ["infer", "embed"])
def test_infer_and_embed_refuse_user_folders_and_inputs(
    verb, checkpoint, tiny_data, tmp_path, capsys
):
    mine = tmp_path / "mine"
    before = _user_folder(mine)
    base = [
        verb,
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(tiny_data),
        "--set",
        "ray.progress=false",
    ]
    data_before = _snapshot(tiny_data)
    for out, needle in (
        (mine, "raycell did not write"),
        (tiny_data, "is the input data set"),
        (tiny_data / "shards", "is inside the input data set"),
        (tiny_data / "preds", "is inside the input data set"),
    ):
        assert main(base + ["--out", str(out)]) == 2, out
        line = _err_line(capsys)
        assert needle in line and "delete" not in line, line
    assert _snapshot(mine) == before and _snapshot(tiny_data) == data_before
    assert not (tiny_data / "preds").exists()
