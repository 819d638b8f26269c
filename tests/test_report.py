"""`raycell report`: the page renders for run, experiment, tune and embeddings folders, without Ray.

A tiny AEC is trained in-process (LocalContext), inferred with CropPredictor and evaluated; the
other folders are written by hand in the layouts `raycell experiment`, `tune` and `embed` use.
Every figure must be in the page as a decodable PNG, every section heading present, nothing fetched.
"""

from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_overrides

from raycell import constants as K
from raycell.report import ReportError, build_report

PNG = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Headings, images and every src/href of a page."""

    def __init__(self):
        super().__init__()
        self.h2, self.imgs, self.links, self._in_h2 = [], [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "img":
            self.imgs.append(a)
        self._in_h2 = tag == "h2"
        if self._in_h2:
            self.h2.append("")

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.h2[-1] += data


def _check_page(html_path: Path, headings: list[str], n_figures: int) -> _Page:
    assert html_path.name == "report.html" and html_path.is_file()
    p = _Page()
    p.feed(html_path.read_text())
    p.close()
    for h in headings:
        assert h in p.h2, f"missing section {h!r}; sections: {p.h2}"
    assert len(p.imgs) == n_figures, [i.get("alt") for i in p.imgs]
    for img in p.imgs:
        assert img.get("alt")
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG) and len(data) > 500
    assert not [u for u in p.links if u.lower().startswith(("http://", "https://", "//"))]
    assert len(list(html_path.parent.glob("*.png"))) == n_figures  # each figure also saved as a PNG
    return p


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A conventional AEC, 2 short epochs without Ray, inferred and evaluated in its folder."""
    from raycell.config import load_config, save_config
    from raycell.data.dataset import CropCollate
    from raycell.eval.evaluate import evaluate_predictions
    from raycell.formats.shards import open_dataset
    from raycell.infer.predictor import CropPredictor
    from raycell.train.context import LocalContext
    from raycell.train.loop import run_training
    from raycell.train.trainer import training_setup

    run = tmp_path_factory.mktemp("runs") / "demo-conventional-20261201-000000"
    run.mkdir()
    cfg = load_config(
        None, tiny_overrides(tiny_data, run.parent, epochs=2) + ["train.max_steps_per_epoch=3"]
    )
    save_config(cfg, run / "config.yaml")
    setup, ds = training_setup(cfg)
    col = CropCollate(setup.data_spec, setup.labels, setup.batches)
    ctx = LocalContext(ds, col, cfg.data.batch_size, cfg.data.eval_batch_size, run)
    run_training(ctx, cfg, setup, history_file=str(run / "history.jsonl"))
    # predictions as `raycell infer` lays them out (one shard), then `raycell evaluate` (Ray-free)
    data = open_dataset(tiny_data)
    table = data.read_table(splits=[K.TEST, K.UNSEEN])
    pred = CropPredictor(str(run), device="cpu")(table)
    shard = run / "predictions" / "shards" / "part-00000.parquet"
    shard.parent.mkdir(parents=True)
    pq.write_table(pred, shard)
    meta = pred_meta = json.loads(sorted(run.glob("checkpoint_*/meta.json"))[-1].read_text())
    pred_meta = {
        "checkpoint": str(run),
        "model_type": meta["model_type"],
        "dataset": str(tiny_data),
        "splits": [K.TEST, K.UNSEEN],
        "n_rows": pred.num_rows,
        "n_shards": 1,
        "labels": meta["labels"],
        "batches": meta["batches"],
        "data_spec": meta["data_spec"],
        "shards": [{"file": "shards/part-00000.parquet", "rows": pred.num_rows}],
    }
    (run / "predictions" / K.PREDICTIONS_MANIFEST).write_text(json.dumps(pred_meta))
    evaluate_predictions(run / "predictions", max_cells=300, plot=False, quiet=True)
    return run


RUN_SECTIONS = [
    "Training curves",
    "Evaluation metrics",
    "Latent space (PCA)",
    "Reconstructions per imaging batch",
    "Example crops per class",
]


def test_run_report_has_every_section_and_figure(tiny_run, tmp_path):
    out = tmp_path / "rep"
    page = build_report(tiny_run, out=out, max_cells=200)
    p = _check_page(page, RUN_SECTIONS, n_figures=4)  # curves, PCA, reconstructions, crops
    text = page.read_text()
    assert "conventional" in text and "test" in text and "unseen" in text
    assert "<script" not in text and "stylesheet" not in text
    # a second report into the same folder replaces the first whole (no figures left over)
    again = build_report(tiny_run, out=out, max_cells=200)
    assert again == page and len(list(out.glob("*.png"))) == len(p.imgs)
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".rep.")]  # no staging left


def test_default_out_is_the_report_folder_inside(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "predictions")  # trained only: curves, reconstructions, crops (no PCA)
    shutil.rmtree(run / "eval")
    page = build_report(run)
    assert page == run / "report" / "report.html"
    _check_page(
        page,
        ["Training curves", "Reconstructions per imaging batch", "Example crops per class"],
        n_figures=3,
    )


def test_experiment_report_shows_the_table_and_the_runs(tiny_run, tmp_path):
    from raycell.experiments import format_markdown

    metrics = (
        "seen_auroc",
        "unseen_auroc",
        "seen_mse",
        "unseen_mse",
        "db",
        "ch",
        "batch_probe_acc",
    )
    summary = {
        "conventional": {
            "n_seeds": 1,
            **{c: 0.5 for c in metrics},
            **{c + "_sd": float("nan") for c in metrics},
        }
    }
    exp = tmp_path / "exp"
    (exp / "seed0").mkdir(parents=True)
    (exp / "table.md").write_text(
        format_markdown(summary, "raycell MEDL experiment", ["Command: `raycell experiment medl`"])
    )
    (exp / "table.csv").write_text("model,seen_auroc\nconventional,0.5\n")
    (exp / "results.json").write_text(
        json.dumps(
            {
                "command": "raycell experiment medl --seeds 0",
                "seeds": [0],
                "models": ["conventional"],
                "config": {
                    "data": {
                        "path": str(
                            json.loads((tiny_run / "predictions" / "predictions.json").read_text())[
                                "dataset"
                            ]
                        )
                    }
                },
                "rows": [
                    {
                        "model": "conventional",
                        "label": "conventional",
                        "seed": 0,
                        "run_dir": str(tiny_run),
                    }
                ],
            }
        )
    )
    page = build_report(exp, max_cells=150)
    p = _check_page(
        page,
        [
            "Experiment table",
            "Example crops per class",
            "conventional (seed 0): Training curves",
            "conventional (seed 0): Latent space (PCA)",
        ],
        n_figures=4,
    )
    assert "seen AUROC" in page.read_text() and len(p.h2) >= 5


def test_tune_report_sorts_trials_and_marks_the_best(tmp_path):
    from raycell.tune import objective_plot

    tune = tmp_path / "search"
    tune.mkdir()
    rows = [
        {
            "trial": i + 1,
            "trial_id": f"ab_0000{i}",
            "train.lr": lr,
            "objective": obj,
            "best_epoch_objective": obj,
            "epochs_run": 2,
            "status": "completed",
            "error": "",
        }
        for i, (lr, obj) in enumerate([(0.01, 0.61), (0.001, 0.74), (0.1, float("nan"))])
    ]
    import pandas as pd

    pd.DataFrame(rows).to_csv(tune / "trials.csv", index=False)
    (tune / "best.yaml").write_text(
        "# Best trial ab_00001 of the search: val_auroc = 0.7400\n"
        "tune:\n  metric: val_auroc\n  mode: max\nmodel:\n  type: conventional\n"
    )
    objective_plot(
        rows,
        {"train.lr": {"dist": "loguniform", "low": 1e-3, "high": 0.1}},
        "val_auroc",
        "max",
        tune / "tune_objective.png",
        rows[1],
    )
    page = build_report(tune)
    _check_page(
        page, ["Tune trials (objective: val_auroc, max)", "Objective over trials"], n_figures=1
    )
    text = page.read_text()
    text = text[text.index("<table") :]  # the header names the best trial too
    best = text.index('<tr class="best">')
    assert text.index("ab_00001") > best > text.index("<thead>")  # best first, marked
    assert (
        text.index("ab_00001") < text.index("ab_00000") < text.index("ab_00002")
    )  # sorted, NaN last


def _embeddings(folder: Path, n: int = 240, d: int = 12, dataset: str = "") -> None:
    rng = np.random.default_rng(0)
    doses = np.array([0.0, 0.1, 1.0])[rng.integers(0, 3, n)]
    times = np.array([24, 48])[rng.integers(0, 2, n)]
    batch = np.array(["b1", "b2"])[rng.integers(0, 2, n)]
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[:, 0] += 3 * np.log10(doses + 0.01)  # PC1 follows the dose
    dose_cls, time_cls = ["0.0", "0.1", "1.0"], ["24", "48"]
    pred_dose = np.where(rng.random(n) < 0.7, doses.astype(str), "0.1")
    pred_time = np.where(rng.random(n) < 0.6, times.astype(str), "24")

    def probs(k):
        p = rng.random((n, k)).astype(np.float32)
        p /= p.sum(1, keepdims=True)
        return pa.FixedSizeListArray.from_arrays(pa.array(p.ravel()), k)

    cols = {
        "Metadata_Plate": pa.array(["P1"] * n),
        "Metadata_Well": pa.array([f"A{i % 6}" for i in range(n)]),
        "Metadata_Site": pa.array(["1"] * n),
        "Metadata_ObjectNumber": pa.array(np.arange(n), pa.int64()),
        "Metadata_CellID": pa.array([f"c{i}" for i in range(n)]),
        "Metadata_Batch": pa.array(batch),
        "Metadata_Split": pa.array(["test"] * n),
        "Metadata_dose": pa.array(doses),
        "Metadata_time": pa.array(times, pa.int64()),
        "morph_area": pa.array(rng.random(n)),
        "Pred_dose": pa.array(pred_dose),
        "Prob_dose": probs(3),
        "Pred_time": pa.array(pred_time),
        "Prob_time": probs(2),
    }
    feats = [f"Cells_Embedding_{j:04d}" for j in range(d)]
    cols.update({f: pa.array(X[:, j]) for j, f in enumerate(feats)})
    (folder / "shards").mkdir(parents=True)
    pq.write_table(pa.table(cols), folder / "shards" / "part-00000.parquet")
    (folder / "embeddings.json").write_text(
        json.dumps(
            {
                "checkpoint": "/runs/x/checkpoint_0001",
                "model_type": "timm_classifier",
                "dataset": dataset,
                "layout": "columns",
                "features": feats,
                "heads": {"dose": dose_cls, "time": time_cls},
                "n_cells": n,
            }
        )
    )


@pytest.mark.parametrize("with_umap", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_embeddings_report_has_scatter_plots_per_head_and_confusions(
    tmp_path, tiny_data, monkeypatch, with_umap
):
    import sys

    if with_umap:
        pytest.importorskip("umap")  # its first import and numba compilation take ~10 s
    else:
        monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    emb = tmp_path / "emb"
    _embeddings(emb, dataset=str(tiny_data))
    page = build_report(emb, max_cells=200)
    headings = [
        "Embeddings (PCA)",
        "Weak-label heads: accuracy and confusion",
        "Example crops per class",
    ]
    headings += ["Embeddings (UMAP)"] if with_umap else []
    # per method: dose, time, batch; two confusion matrices; crops of the data set
    p = _check_page(page, headings, n_figures=3 * (1 + with_umap) + 2 + 1)
    alts = " ".join(i["alt"] for i in p.imgs)
    assert "coloured by dose" in alts and "coloured by batch" in alts and "time head" in alts
    assert "Spearman" in page.read_text()
    notes = json.loads((page.parent / "report.json").read_text())["notes"]
    assert with_umap or any("umap-learn is not installed" in n for n in notes)


def test_missing_and_empty_folders_are_one_line_errors(tmp_path):
    with pytest.raises(ReportError, match="folder not found") as e:
        build_report(tmp_path / "nope")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ReportError, match=r"holds nothing to report: expected a Train run folder"
    ) as e:
        build_report(tmp_path / "empty")
    assert "\n" not in str(e.value) and "embeddings.json" in str(e.value)
    assert not (tmp_path / "empty" / "report").exists()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ReportError, match="is a file, not a folder"):
        build_report(tmp_path / "file.txt")
    with pytest.raises(ReportError, match="max_cells=0 is too small"):
        build_report(_tiny_search(tmp_path), max_cells=0)


def _tiny_search(tmp_path: Path) -> Path:
    tune = tmp_path / "search"
    tune.mkdir()
    (tune / "trials.csv").write_text("trial,trial_id,objective\n1,a,0.5\n")
    return tune


def test_an_out_folder_of_other_files_is_refused(tmp_path):
    tune = _tiny_search(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ReportError, match="not a raycell report") as e:
        build_report(tune, out=mine)
    assert "\n" not in str(e.value) and (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "search"]


def test_demo_report_has_the_summary_and_each_run(tiny_run, tiny_data, tmp_path):
    demo = tmp_path / "demo"
    (demo / "runs").mkdir(parents=True)
    (demo / "data").symlink_to(tiny_data)
    ev = json.loads((tiny_run / "eval" / "metrics.json").read_text())["splits"]
    (demo / "summary.json").write_text(
        json.dumps(
            {
                "out": str(demo),
                "seconds": 12.5,
                "models": {
                    "conventional": {
                        "run_dir": str(tiny_run),
                        "seen_test": ev["test"],
                        "unseen": ev["unseen"],
                    }
                },
            }
        )
    )
    page = build_report(demo, max_cells=100)
    _check_page(
        page,
        [
            "Demo summary: seen-batch test split vs unseen batches",
            "Example crops per class",
            "conventional: Training curves",
            "conventional: Evaluation metrics",
            "conventional: Latent space (PCA)",
            "conventional: Reconstructions per imaging batch",
        ],
        n_figures=4,
    )
    assert "conventional/unseen" in page.read_text()


def test_a_damaged_checkpoint_leaves_only_its_section_out(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("predictions", "eval"))
    for ck in run.glob("checkpoint_*"):
        (ck / "model.pt").write_bytes(b"truncated")
    page = build_report(run)
    p = _check_page(page, ["Training curves", "Example crops per class"], n_figures=2)
    assert "Reconstructions per imaging batch" not in p.h2
    text = page.read_text()
    assert "reconstructions left out: cannot load the weights" in text


def test_a_classifier_run_has_no_reconstruction_section(tiny_run, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import raycell.models

    monkeypatch.setattr(
        raycell.models,
        "model_entry",
        lambda name: SimpleNamespace(reconstructs=False, uses_z=False),
    )  # as the registry describes a timm classifier
    page = build_report(tiny_run, out=tmp_path / "rep", max_cells=100)
    p = _check_page(
        page, ["Training curves", "Latent space (PCA)", "Example crops per class"], n_figures=3
    )
    assert "Reconstructions per imaging batch" not in p.h2
