"""Profiles and export: embeddings folders built here with pyarrow (no Ray, no `raycell embed`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycell.errors import UserError
from raycell.profiling import figures
from raycell.profiling import profiles as P
from raycell.profiling.export import export

DOSES = [0.0, 0.1, 0.3, 1.0, 3.0, 10.0]  # one per well, the same on both plates
D = 16
SHIFTED = 4  # features 0..3 move with the dose rank
CONSTANT = 5  # feature 5 is the same for every cell


def make_cells(n_per_well: int = 25, seed: int = 0, shuffle_dose: bool = False):
    """(metadata dict of arrays, X) for 2 plates x 6 wells; dose shifts the first features."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in ("P1", "P2"):
        for w, dose in enumerate(DOSES):
            for i in range(n_per_well):
                rows.append((p, f"A{w + 1:02d}", dose, 24 if w % 2 == 0 else 48, i + 1))
    n = len(rows)
    plate = np.array([r[0] for r in rows])
    well = np.array([r[1] for r in rows])
    dose = np.array([r[2] for r in rows])
    time = np.array([r[3] for r in rows], dtype=np.int64)
    rank = np.searchsorted(DOSES, dose).astype(np.float32)
    X = rng.normal(size=(n, D)).astype(np.float32)
    X[:, :SHIFTED] += rank[:, None]
    X[:, CONSTANT] = 1.5
    X[plate == "P2", 8] += 0.5  # a plate effect, outside the dose features
    if shuffle_dose:
        dose = rng.permutation(dose)
    # Predictions: right for 4 cells in 5, else the next dose.
    right = rng.random(n) < 0.8
    pred_idx = np.where(right, rank.astype(int), (rank.astype(int) + 1) % len(DOSES))
    prob = np.full((n, len(DOSES)), 0.02, np.float32)
    prob[np.arange(n), pred_idx] = 0.9
    meta = {
        "Metadata_Plate": plate,
        "Metadata_Well": well,
        "Metadata_Site": np.array(["1"] * n),
        "Metadata_ObjectNumber": np.array([r[4] for r in rows]),
        "Metadata_CellID": np.array([f"{r[0]}-{r[1]}-{r[4]}" for r in rows]),
        "Metadata_Batch": plate.copy(),
        "Metadata_Split": np.array(["test"] * n),
        "Metadata_dose": dose,
        "Metadata_time": time,
        "morph_area": rng.normal(300, 40, n),
        "morph_eccentricity": rng.uniform(0, 1, n),
        "Pred_dose": np.array([str(DOSES[i]) for i in pred_idx]),
        "Prob_dose": prob,
    }
    return meta, X


def write_embeddings(
    folder: Path,
    meta: dict,
    X: np.ndarray,
    layout: str = "columns",
    n_shards: int = 3,
    manifest_extra: dict | None = None,
) -> Path:
    """An embeddings folder as `raycell embed` writes it (the contract in the task)."""
    (folder / "shards").mkdir(parents=True)
    n, d = X.shape
    cols = {}
    for k, v in meta.items():
        if k.startswith("Prob_"):
            flat = pa.array(v.ravel(), pa.float32())
            cols[k] = pa.FixedSizeListArray.from_arrays(flat, v.shape[1])
        elif k == "Metadata_ObjectNumber":
            cols[k] = pa.array(v, pa.int64())
        else:
            cols[k] = pa.array(v)
    if layout == "columns":
        feats = [f"Cells_Embedding_{i:04d}" for i in range(d)]
        for i, f in enumerate(feats):
            cols[f] = pa.array(X[:, i], pa.float32())
    else:
        feats = ["embedding"]
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel(), pa.float32()), d)
    table = pa.table(cols)
    bounds = np.linspace(0, n, n_shards + 1).astype(int)
    for i in range(n_shards):
        pq.write_table(
            table.slice(bounds[i], bounds[i + 1] - bounds[i]),
            folder / "shards" / f"part-{i:05d}.parquet",
        )
    manifest = {
        "checkpoint": "runs/x/checkpoint",
        "model_type": "timm_classifier",
        "dataset": "data/synth",
        "layout": layout,
        "features": feats,
        "heads": {"dose": [str(d) for d in DOSES]},
        "n_cells": n,
        **(manifest_extra or {}),
    }
    (folder / "embeddings.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def cells():
    return make_cells()


@pytest.fixture(scope="module")
def emb(cells, tmp_path_factory):
    return write_embeddings(tmp_path_factory.mktemp("emb") / "emb", *cells)


@pytest.fixture(scope="module")
def emb_list(cells, tmp_path_factory):
    return write_embeddings(tmp_path_factory.mktemp("emb") / "emb_list", *cells, layout="list")


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("layout", ["columns", "list"])
def test_read_round_trip(cells, emb, emb_list, layout):
    meta_in, X_in = cells
    meta, X, names = P.read_embeddings(emb if layout == "columns" else emb_list)
    assert X.dtype == np.float32 and X.shape == X_in.shape
    np.testing.assert_array_equal(X, X_in)
    assert names == [f"Cells_Embedding_{i:04d}" for i in range(D)]
    assert list(meta.columns) == list(meta_in)  # every non-feature column, in shard order
    np.testing.assert_array_equal(meta["Metadata_Well"], meta_in["Metadata_Well"])
    np.testing.assert_array_equal(meta["Metadata_dose"], meta_in["Metadata_dose"])
    assert meta["Metadata_time"].dtype == np.int64
    np.testing.assert_allclose(P.prob_matrix(meta, "dose"), meta_in["Prob_dose"])
    assert meta.attrs["manifest"]["heads"]["dose"][1] == "0.1"
    assert P.morph_columns(meta) == ["morph_area", "morph_eccentricity"]
    assert P.feature_columns(["Metadata_Well", *names[:2], "morph_area"]) == names[:2]


def test_read_missing_manifest(tmp_path, cells):
    folder = write_embeddings(tmp_path / "e", *cells)
    (folder / "embeddings.json").unlink()
    with pytest.raises(UserError) as ei:
        P.read_embeddings(folder)
    assert "embeddings.json" in one_line(ei)


def test_read_no_shards_and_missing_feature(tmp_path, cells):
    folder = write_embeddings(tmp_path / "e", *cells, n_shards=1)
    m = json.loads((folder / "embeddings.json").read_text())
    m["features"].append("Cells_Embedding_9999")
    (folder / "embeddings.json").write_text(json.dumps(m))
    with pytest.raises(UserError) as ei:
        P.read_embeddings(folder)
    assert "Cells_Embedding_9999" in one_line(ei) and "embeddings.json" in one_line(ei)
    (folder / "shards" / "part-00000.parquet").unlink()
    with pytest.raises(UserError) as ei:
        P.read_embeddings(folder)
    assert "no embedding shards" in one_line(ei)


def test_read_ragged_list_column(tmp_path):
    folder = tmp_path / "e"
    (folder / "shards").mkdir(parents=True)
    t = pa.table(
        {
            "Metadata_Plate": ["P1", "P1"],
            "Metadata_Well": ["A01", "A01"],
            "embedding": pa.array([[0.0, 1.0, 2.0], [0.0, 1.0]], pa.list_(pa.float32())),
        }
    )
    pq.write_table(t, folder / "shards" / "part-00000.parquet")
    (folder / "embeddings.json").write_text(
        json.dumps({"layout": "list", "features": ["embedding"], "heads": {}, "n_cells": 2})
    )
    with pytest.raises(UserError) as ei:
        P.read_embeddings(folder)
    assert "ragged" in one_line(ei) and "embedding" in one_line(ei)


def test_read_row_count_differs_from_manifest(tmp_path, cells):
    folder = write_embeddings(tmp_path / "e", *cells, manifest_extra={"n_cells": 7})
    with pytest.raises(UserError) as ei:
        P.read_embeddings(folder)
    assert "n_cells=7" in one_line(ei)


# ---------------------------------------------------------------- profiles


def test_select_features_drops_constant_and_keeps_top_k(cells):
    _, X = cells
    names = [f"f{i}" for i in range(D)]
    Xs, ns = P.select_features(X, names)
    assert f"f{CONSTANT}" not in ns and len(ns) == D - 1
    Xs, ns = P.select_features(X, names, top_k=SHIFTED)
    assert ns == [f"f{i}" for i in range(SHIFTED)]  # the dose-shifted dims vary most
    np.testing.assert_array_equal(Xs, X[:, :SHIFTED])
    assert P.select_features(X, names, top_k=0, drop_zero_variance=False)[1] == names
    with pytest.raises(UserError) as ei:
        P.select_features(X, names, top_k=-1)
    assert "top_k" in one_line(ei)


def test_aggregate_wells_one_row_per_well_with_medians(emb):
    meta, X, names = P.read_embeddings(emb)
    wells = P.aggregate_wells(meta, X, names)
    assert len(wells) == 12
    assert list(wells.columns[:2]) == ["Metadata_Plate", "Metadata_Well"]
    assert "Metadata_Count_Cells" in wells and (wells["Metadata_Count_Cells"] == 25).all()
    for kept in ("Metadata_dose", "Metadata_time", "Metadata_Batch", "Metadata_Site"):
        assert kept in wells  # constant within each well
    for dropped in (
        "Metadata_ObjectNumber",
        "Metadata_CellID",
        "Pred_dose",
        "Prob_dose",
        "morph_area",
    ):
        assert dropped not in wells
    assert list(wells.columns[-D:]) == names
    row = wells[(wells.Metadata_Plate == "P2") & (wells.Metadata_Well == "A03")].iloc[0]
    m = (meta.Metadata_Plate == "P2").to_numpy() & (meta.Metadata_Well == "A03").to_numpy()
    np.testing.assert_allclose(
        row[names].to_numpy(dtype=np.float32), np.median(X[m], axis=0), rtol=1e-6
    )
    assert row["Metadata_dose"] == 0.3


def test_embed_well_profiles_are_the_profile_commands_aggregation(emb):
    """embed's well_profiles.parquet and `raycell profile`'s per-well step give the same wells."""
    from raycell.profiling.wellprofiles import aggregate, read_input

    meta, X, names = P.read_embeddings(emb)
    wells = P.aggregate_wells(meta, X, names)
    prof = aggregate(read_input(emb, "embedding"), ["Metadata_Plate", "Metadata_Well"]).frame
    assert list(prof.columns) == list(wells.columns)
    pd.testing.assert_frame_equal(
        prof.astype(dict.fromkeys(names, np.float32)), wells, check_exact=True
    )


def test_aggregate_wells_needs_plate_and_well(cells):
    meta, X = cells
    frame = pd.DataFrame({k: v for k, v in meta.items() if k not in ("Metadata_Well", "Prob_dose")})
    with pytest.raises(UserError) as ei:
        P.aggregate_wells(frame, X, [f"f{i}" for i in range(D)])
    assert "Metadata_Well" in one_line(ei)


def test_pc1_spearman_orders_doses(emb, tmp_path):
    meta, X, names = P.read_embeddings(emb)
    Xs, _ = P.select_features(X, names)
    assert P.pc1_spearman(meta, Xs, "Metadata_dose") > 0.8
    shuffled = meta.copy()
    rng = np.random.default_rng(1)
    shuffled["Metadata_dose"] = rng.permutation(meta["Metadata_dose"].to_numpy())
    assert P.pc1_spearman(shuffled, Xs, "Metadata_dose") < 0.2
    with pytest.raises(UserError) as ei:
        P.pc1_spearman(meta, Xs, "Metadata_Well")
    assert "not numeric" in one_line(ei)
    with pytest.raises(UserError) as ei:
        P.pc1_spearman(meta, Xs, "Metadata_nope")
    assert "Metadata_nope" in one_line(ei)


def test_head_metrics_confusion_and_accuracy(emb, cells):
    meta, _, _ = P.read_embeddings(emb)
    hm = P.head_metrics(meta)
    assert set(hm) == {"dose"}  # Pred_dose + Metadata_dose
    h = hm["dose"]
    assert h["classes"] == [str(d) for d in DOSES]  # manifest order, numeric truth as str(value)
    conf = np.array(h["confusion"])
    assert conf.sum() == h["n"] == len(meta)
    truth = meta["Metadata_dose"].astype(str).to_numpy()
    acc = float((meta["Pred_dose"].to_numpy() == truth).mean())
    assert h["accuracy"] == pytest.approx(acc)
    assert 0.7 < h["accuracy"] < 0.9
    recall = np.diag(conf) / conf.sum(axis=1)
    assert h["balanced_accuracy"] == pytest.approx(recall.mean())
    # Row i is the truth: every error went to the next dose.
    assert all(conf[i, (i + 1) % 6] + conf[i, i] == conf[i].sum() for i in range(6))


def test_head_metrics_integer_truth_and_sorted_classes():
    meta = pd.DataFrame(
        {
            "Metadata_time": np.array([24, 48, 48, 24], dtype=np.int64),
            "Pred_time": ["24", "48", "24", "24"],
            "Metadata_line": ["b", "a", None, "a"],
            "Pred_line": ["b", "a", "a", "b"],
        }
    )
    hm = P.head_metrics(meta)
    assert hm["time"]["classes"] == ["24", "48"] and hm["time"]["accuracy"] == 0.75
    assert hm["time"]["confusion"] == [[2, 0], [1, 1]]
    assert hm["line"]["n"] == 3  # the cell without a truth value is left out
    # the AECs' phenotype head `label` is scored against Metadata_Label
    aec = pd.DataFrame({"Metadata_Label": ["0", "1", "1"], "Pred_label": ["0", "1", "0"]})
    assert P.head_metrics(aec)["label"]["accuracy"] == pytest.approx(2 / 3)
    # int64 turned float64 by a null: 24.0 is still the class "24" of the manifest
    meta2 = pd.DataFrame({"Metadata_time": [24.0, 48.0, np.nan], "Pred_time": ["24", "24", "48"]})
    h = P.head_metrics(meta2, heads={"time": ["24", "48"]})["time"]
    assert h["classes"] == ["24", "48"] and h["n"] == 2 and h["accuracy"] == 0.5


def test_reduce_pca_and_errors(cells, monkeypatch):
    _, X = cells
    Z = P.reduce(X, "pca", 2)
    assert Z.shape == (len(X), 2) and np.isfinite(Z).all()
    with pytest.raises(UserError) as ei:
        P.reduce(X, "tsne")
    assert "tsne" in one_line(ei)
    import sys

    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    with pytest.raises(UserError) as ei:
        P.reduce(X, "umap")
    assert "umap-learn" in one_line(ei)


# ---------------------------------------------------------------- export


def test_export_h5ad_round_trip(emb, tmp_path):
    import anndata

    out = tmp_path / "cells.h5ad"
    s = export(emb, out, fmt="h5ad")
    assert s["n_obs"] == 300 and s["n_vars"] == D - 1 and "X_pca" in s["obsm"]  # constant dropped
    a = anndata.read_h5ad(out)
    meta, X, names = P.read_embeddings(emb)
    keep = [n for n in names if n != f"Cells_Embedding_{CONSTANT:04d}"]
    assert list(a.var_names) == keep
    np.testing.assert_array_equal(np.asarray(a.X), X[:, [names.index(n) for n in keep]])
    for c in ("Metadata_Plate", "Metadata_Well", "Metadata_CellID", "Pred_dose"):
        assert isinstance(a.obs[c].dtype, pd.CategoricalDtype)
        np.testing.assert_array_equal(a.obs[c].astype(str).to_numpy(), meta[c].to_numpy())
    for c in ("Metadata_dose", "Metadata_time", "Metadata_ObjectNumber", "morph_area"):
        assert a.obs[c].dtype == meta[c].dtype
        np.testing.assert_array_equal(a.obs[c].to_numpy(), meta[c].to_numpy())
    assert list(a.obs.columns) == [c for c in meta.columns if c != "Prob_dose"]
    assert "Prob_dose" not in a.obs and a.obsm["Prob_dose"].shape == (300, 6)
    assert a.obsm["X_pca"].shape == (300, 2)
    assert list(a.uns["heads"]["dose"]) == [str(d) for d in DOSES]
    assert a.uns["model_type"] == "timm_classifier" and a.uns["checkpoint"] == "runs/x/checkpoint"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_export_h5ad_umap_wiring(emb, tmp_path, monkeypatch):
    """obsm["X_umap"] from UMAP on the PCs (a stand-in: the real one JIT-compiles for ~20 s)."""
    import sys
    import types

    import anndata

    seen = {}

    class FakeUMAP:
        def __init__(self, n_components, n_neighbors, random_state):
            seen.update(n_components=n_components, n_neighbors=n_neighbors, seed=random_state)

        def fit_transform(self, x):
            seen["shape"] = x.shape
            return x[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    s = export(emb, tmp_path / "u.h5ad", umap=True, seed=3)
    assert s["obsm"] == ["Prob_dose", "X_pca", "X_umap"]
    assert seen == {"n_components": 2, "n_neighbors": 15, "seed": 3, "shape": (300, D - 1)}
    a = anndata.read_h5ad(tmp_path / "u.h5ad")
    np.testing.assert_allclose(a.obsm["X_umap"], a.obsm["X_pca"] * 2, rtol=1e-5)


def test_export_h5ad_well_level_list_layout(emb_list, tmp_path):
    import anndata

    s = export(emb_list, tmp_path / "wells.h5ad", level="well", top_k=4, with_morph=True)
    assert s["n_obs"] == 12 and s["n_vars"] == 4
    a = anndata.read_h5ad(tmp_path / "wells.h5ad")
    assert (a.obs["Metadata_Count_Cells"] == 25).all()
    assert "Metadata_dose" in a.obs and a.obsm["X_pca"].shape == (12, 2)


def test_export_parquet_cytotable_layout(emb_list, tmp_path):
    out = tmp_path / "cells.parquet"
    s = export(emb_list, out, fmt="parquet", drop_zero_variance=False)
    t = pq.read_table(out)
    cols = t.column_names
    n_meta = sum(c.startswith("Metadata_") for c in cols)
    assert all(c.startswith("Metadata_") for c in cols[:n_meta])  # metadata first
    assert cols[n_meta:] == [f"Cells_Embedding_{i:04d}" for i in range(D)]  # list layout expanded
    assert s["n_vars"] == D and t.num_rows == 300
    assert "Metadata_Pred_dose" in cols and "Metadata_Prob_dose_0.1" in cols
    assert "Metadata_morph_area" in cols  # carried, not a feature without with_morph
    assert t.schema.field("Cells_Embedding_0000").type == pa.float32()
    meta, X, _ = P.read_embeddings(emb_list)
    np.testing.assert_array_equal(t.column("Cells_Embedding_0003").to_numpy(), X[:, 3])
    assert t.column("Metadata_Well").to_pylist() == meta["Metadata_Well"].tolist()


def test_export_csv_with_morph_and_wells(emb, tmp_path):
    s = export(emb, tmp_path / "cells.csv", fmt="csv", with_morph=True)
    df = pd.read_csv(tmp_path / "cells.csv")
    assert "Cells_Morph_area" in df and "Cells_Morph_eccentricity" in df and "morph_area" not in df
    assert s["n_morph"] == 2 and s["n_vars"] == D - 1 + 2
    assert abs(df["Cells_Morph_area"].mean()) < 1e-3  # standardised
    assert df["Cells_Morph_area"].std() == pytest.approx(1, rel=0.01)
    assert df.columns[-1] == "Cells_Morph_eccentricity"
    w = export(emb, tmp_path / "wells.csv", fmt="csv", level="well")
    wells = pd.read_csv(tmp_path / "wells.csv")
    assert w["n_obs"] == len(wells) == 12 and wells.columns[0] == "Metadata_Plate"


def test_export_bad_inputs(emb, tmp_path, cells):
    with pytest.raises(UserError) as ei:
        export(emb, tmp_path / "x.xlsx", fmt="xlsx")
    assert "xlsx" in one_line(ei)
    with pytest.raises(UserError) as ei:
        export(emb, tmp_path / "x.h5ad", level="plate")
    assert "plate" in one_line(ei)
    with pytest.raises(UserError) as ei:
        export(emb, tmp_path / "x.h5ad", top_k=-3)
    assert "top_k" in one_line(ei)
    with pytest.raises(UserError) as ei:
        export(emb, tmp_path / "missing" / "x.h5ad")
    assert "does not exist" in one_line(ei)
    with pytest.raises(UserError) as ei:
        export(emb, tmp_path / "x.csv", fmt="csv", umap=True)
    assert "h5ad" in one_line(ei)
    meta, X = cells
    no_morph = {k: v for k, v in meta.items() if not k.startswith("morph_")}
    folder = write_embeddings(tmp_path / "nomorph", no_morph, X)
    with pytest.raises(UserError) as ei:
        export(folder, tmp_path / "x.h5ad", with_morph=True)
    assert "morph_" in one_line(ei)
    with pytest.raises(UserError) as ei:
        export(tmp_path / "nothing", tmp_path / "x.h5ad")
    assert "embeddings.json" in one_line(ei)


# ---------------------------------------------------------------- figures


def test_figures_write_pngs(cells, tmp_path):
    meta, X = cells
    xy = P.reduce(X, "pca", 2)
    png = figures.scatter_by(xy, meta["Metadata_Plate"], "by plate", path=tmp_path / "plate.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "plate.png").read_bytes() == png
    dose = pd.Series(meta["Metadata_dose"], name="dose")
    assert len(figures.scatter_by(xy, dose, "by dose")) > 1000  # numeric: colourbar
    hm = P.head_metrics(
        pd.DataFrame({"Metadata_dose": meta["Metadata_dose"], "Pred_dose": meta["Pred_dose"]})
    )
    figures.confusion_figure(hm["dose"], "dose", path=tmp_path / "conf.png")
    assert (tmp_path / "conf.png").stat().st_size > 1000
    with pytest.raises(UserError) as ei:
        figures.scatter_by(xy, meta["Metadata_Plate"][:3], "bad")
    assert "colour values" in one_line(ei)
