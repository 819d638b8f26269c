"""`raycell embed` (profiling layout, well profiles, resumable like infer) and `raycell export` on
its output.
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY, tiny_overrides

from raycell import constants as K
from raycell.config import load_config
from raycell.formats.shards import ShardError, open_dataset


def _table(folder: Path):
    from raycell.formats.predictions import read_predictions

    return read_predictions(folder)  # every shard of <folder>/shards, as embed and infer write them


@pytest.fixture(scope="module")
def timm_run(tiny_data, tmp_path_factory):
    """A timm ResNet-18 with heads label and group, one epoch on the tiny data, trained without Ray."""
    from raycell.train.context import LocalContext
    from raycell.train.loop import make_collate, run_training
    from raycell.train.trainer import training_setup

    root = tmp_path_factory.mktemp("timm_run")
    cfg = load_config(
        None,
        tiny_overrides(tiny_data, root, epochs=1)
        + ["model.type=timm", "model.args={backbone: resnet18}", "data.heads=[label, group]"],
    )
    setup, ds = training_setup(cfg)
    run_training(LocalContext(ds, make_collate(setup), 32, 128, root / "run"), cfg, setup)
    return root / "run"


@pytest.mark.ray
def test_embed_writes_the_profiling_layout_and_resumes(trained_run, tiny_data, ray_local, tmp_path):
    from raycell.infer.embed import embed

    out = tmp_path / "emb"
    cfg = load_config(
        None,
        tiny_overrides(tiny_data, tmp_path)
        + [f"infer.checkpoint={trained_run['run_dir']}", f"embed.out={out}"],
    )
    m = embed(cfg)
    t = _table(out)
    names = t.column_names
    assert names[:4] == [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Site",
        "Metadata_ObjectNumber",
    ]
    assert {
        "Metadata_CellID",
        "Metadata_Batch",
        "Metadata_Split",
        "Metadata_Label",
        "Pred_label",
        "Prob_label",
    } <= set(names)
    feats = [n for n in names if n.startswith("Cells_Embedding_")]
    assert len(feats) == 8 and names[-8:] == feats  # the AEC's latent, features last
    assert not any(n in names for n in (K.IMAGE, "path", K.RECON_MSE))
    assert t.num_rows == TINY["n_cells"] == m["n_cells"]
    ids = t.column("Metadata_CellID").to_pylist()
    assert len(set(ids)) == len(ids)
    man = json.loads((out / K.EMBEDDINGS_MANIFEST).read_text())
    assert (
        man["features"] == feats
        and man["heads"] == {"label": ["high", "low"]}
        and man["layout"] == "columns"
    )
    wells = pq.read_table(out / K.WELL_PROFILES)
    src = open_dataset(tiny_data).read_table([K.PLATE, K.WELL]).to_pandas()
    assert wells.num_rows == len(src.drop_duplicates())
    assert sum(wells.column("Metadata_Count_Cells").to_pylist()) == TINY["n_cells"]
    # a re-run has nothing to do; an embed into a folder of other results is refused in one line
    mtimes = {f: f.stat().st_mtime_ns for f in (out / "shards").glob("*.parquet")}
    embed(cfg)
    assert {f: f.stat().st_mtime_ns for f in mtimes} == mtimes
    other = load_config(
        None,
        tiny_overrides(tiny_data, tmp_path)
        + [f"infer.checkpoint={trained_run['run_dir']}", f"embed.out={out}", "embed.layout=list"],
    )
    with pytest.raises(ShardError, match="holds predictions of a different run .*feature_layout"):
        embed(other)


@pytest.mark.ray
@pytest.mark.slow
def test_embed_a_timm_checkpoint_then_export_h5ad(timm_run, tiny_data, ray_local, tmp_path):
    import anndata

    from raycell.__main__ import run

    out = tmp_path / "emb"
    run(
        [
            "embed",
            "--checkpoint",
            str(timm_run),
            "--data",
            str(tiny_data),
            "--out",
            str(out),
            "--layout",
            "list",
            "--set",
            "ray.progress=false",
        ]
    )
    t = _table(out)
    assert t.schema.field("embedding").type.list_size == 512  # resnet18's pooled features
    assert {"Pred_label", "Prob_label", "Pred_group", "Prob_group"} <= set(t.column_names)
    assert t.schema.field("Prob_group").type.list_size == 8
    assert set(t.column("Pred_group").to_pylist()) <= {f"line{i:02d}" for i in range(8)}
    h5 = tmp_path / "cells.h5ad"
    s = run(["export", "--embeddings", str(out), "--out", str(h5)])
    a = anndata.read_h5ad(h5)
    assert a.shape == (TINY["n_cells"], s["n_vars"]) and "X_pca" in a.obsm
    assert sorted(a.obs["Metadata_CellID"]) == sorted(t.column("Metadata_CellID").to_pylist())
    # the predictions layout of the same model: per-head columns, no reconstruction metrics
    pred = tmp_path / "pred"
    run(
        [
            "infer",
            "--checkpoint",
            str(timm_run),
            "--data",
            str(tiny_data),
            "--out",
            str(pred),
            "--set",
            "ray.progress=false",
        ]
    )
    p = _table(pred)
    assert {"prob_label", "pred_group", K.PROB, K.PRED} <= set(p.column_names)
    assert K.RECON_MSE not in p.column_names
    ev = run(["evaluate", "--predictions", str(pred)])
    assert 0 <= ev["splits"]["test"]["auroc"] <= 1 and "mse" not in ev["splits"]["test"]
