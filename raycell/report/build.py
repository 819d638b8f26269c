"""`raycell report FOLDER`: one self-contained HTML page (and its PNGs) for what a folder holds.

The folder is recognised by the files raycell writes there (nothing is guessed from names):

* an embeddings folder (`raycell embed`): `embeddings.json`;
* a tune search folder (`raycell tune`): `trials.csv`;
* an experiment folder (`raycell experiment`): `results.json` and `table.md`;
* a demo folder (`raycell demo`): `summary.json` and `runs/`;
* an ingest data set (`raycell ingest`): `ingest_summary.json` (per plate: fields, rejects, cells,
  the diameter used and the segmentation overlays of `overlays/`, then example crops);
* a Train run folder (`raycell train`): `history.jsonl`, `metrics.json` or `checkpoint_*/meta.json`,
  with `predictions/` (`raycell infer`) and `eval/` (`raycell evaluate`) when they were made.

Each section that applies is included: training curves, metric tables, latent PCA by label and by
batch, reconstructions per imaging batch (models that reconstruct), example crops per class, the
experiment table, the tune trials, and for embeddings PCA/UMAP by weak label and batch with per-head
accuracy and confusion matrices. The report is built in a staging folder beside `out` and swapped in
when complete; an earlier report there (recognised by its `report.json`) is replaced, anything else
is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raycell import constants as K
from raycell.errors import UserError
from raycell.formats.arrays import list_matrix
from raycell.report.page import Figure, Section, html_table, markdown_table, render_page
from raycell.utils.io import atomic_write_json, atomic_write_text, json_object
from raycell.utils.outputs import REPORT, REPORT_JSON, raycell_output, staging_dir, swap_in

HTML_FILE = "report.html"
MANIFEST_FILE = REPORT_JSON  # marks a report folder, so a re-run may replace it
GENERATOR = "raycell.report"
RECON_BATCHES = 8  # at most this many imaging batches in the reconstruction grid ...
RECON_PER_BATCH = 4  # ... with this many cells each
CROPS_PER_CLASS = 8
MAX_CLASSES = 12  # example-crop rows
INGEST_SUMMARY = "ingest_summary.json"  # = raycell.ingest.driver.SUMMARY (that imports Ray)

EXPECTED = (
    "a Train run folder (history.jsonl, metrics.json or checkpoint_*/), a demo folder "
    "(summary.json and runs/), an experiment folder (results.json and table.md), a tune folder "
    "(trials.csv), an embeddings folder (embeddings.json), a profile folder (profile.json) or an "
    "ingest data set (ingest_summary.json)"
)

CAPTIONS = {  # what each section shows and what to look for, in plain words
    "curves": (
        "Loss (left, log scale) and model-selection metrics (right) after every epoch. Training "
        "and validation losses should fall together; a validation loss that rises while the "
        "training loss falls is overfitting. valbatch_auroc (when present) is the AUROC on whole "
        "imaging batches never trained on: it is the honest estimate for new batches."
    ),
    "metrics": (
        "Evaluation per split. test = held-out cells of the training batches, unseen = imaging "
        "batches never seen in training. A large gap in AUROC between test and unseen means the "
        "model relies on batch-specific cues. Lower batch_probe_acc (closer to chance) and higher"
        " ilisi_norm mean the latents carry less batch information."
    ),
    "pca": (
        "First two principal components of the latent vectors of up to {n} cells. Left, coloured "
        "by phenotype label: the labels should separate. Right, coloured by imaging batch: the "
        "colours should mix; a model whose latents separate batches learnt the imaging date, not "
        "the cells."
    ),
    "recon": (
        "For a few cells of each imaging batch, the crops (upper row) above the model's "
        "reconstructions (lower row), on the same colour scale. Good reconstructions keep the "
        "shape and texture of each cell; a batch whose reconstructions are blurred or wrongly "
        "bright is one the model handles poorly."
    ),
    "crops": (
        "Example crops of each class (channels as colours: blue, green, red, ...). Look for what "
        "tells the classes apart, and for crops that are empty, cut off or badly segmented."
    ),
    "experiment": (
        "The experiment's comparison table (mean ± s.d. over seeds). Compare unseen AUROC across "
        "models: a batch-robust model keeps its seen AUROC on unseen batches. Arrows say which "
        "direction means less batch information in the latents."
    ),
    "tune": (
        "Every trial of the search, best objective first (each trial at its best epoch, best_epoch); the "
        "best trial (★, shaded) is the one best.yaml reproduces. Trials stopped early by ASHA have fewer "
        "epochs_run; eligible says which trials competed under tune.select."
    ),
    "tune_plot": (
        "The objective of each trial in the order they ran, with the best so far, and the "
        "objective against each searched value. A flat cloud means that value barely matters."
    ),
    "emb_pca": (
        "Embeddings of up to {n} cells reduced to two dimensions ({method}), coloured by each "
        "weak label and by batch. Weak labels that change morphology gradually (dose, time) "
        "should form ordered gradients; colours by batch should mix: a model that separates "
        "batches learnt the imaging date."
    ),
    "overlays": (
        "A few fields of each plate as raycell segmented them for the crops: the nucleus channel "
        "in grey, each nucleus outlined in yellow and, with a cytoplasm channel, each cell body "
        "in magenta. Look for nuclei without an outline (missed), outlines around background or "
        "debris, two nuclei inside one outline (merged) and one nucleus cut in two. The table "
        "gives per plate the fields in, with cells and rejected (by reason, see rejects.parquet), "
        "the cells cropped (objects touching the border are not) and the diameter used."
    ),
    "emb_heads": (
        "How well each weak-label head predicts its metadata column (Pred_<head> against "
        "Metadata_<head>). Compare accuracy with chance (1 / number of classes); balanced "
        "accuracy is not inflated by a common class. In the confusion matrices (rows: truth, "
        "columns: prediction), ordered classes such as doses should err mostly into their "
        "neighbours."
    ),
}


class ReportError(UserError, ValueError):
    """A folder `raycell report` cannot report on, or an output folder it must not replace."""


@dataclass
class _Ctx:
    """Where figures go and how many cells they show."""

    out: Path
    max_cells: int
    seed: int
    n: int = 0
    notes: list[str] = field(default_factory=list)

    def png(self, name: str) -> Path:
        self.n += 1
        return self.out / f"{self.n:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_')}.png"


# --------------------------------------------------------------------------------------------------
# entry point


def detect(folder: Path) -> str | None:
    """What a folder holds: 'embeddings', 'profile', 'tune', 'experiment', 'demo', 'run', 'ingest'
    or None.
    """
    if (folder / INGEST_SUMMARY).is_file():
        return "ingest"
    if (folder / "embeddings.json").is_file():
        return "embeddings"
    if (folder / "profile.json").is_file():
        return "profile"
    if (folder / "trials.csv").is_file():
        return "tune"
    if (folder / "results.json").is_file() and (folder / "table.md").is_file():
        return "experiment"
    if (folder / "summary.json").is_file() and (folder / "runs").is_dir():
        return "demo"
    if (
        (folder / "history.jsonl").is_file()
        or (folder / "metrics.json").is_file()
        or any(folder.glob("checkpoint_*/meta.json"))
    ):
        return "run"
    return None


def build_report(
    folder: str | os.PathLike,
    out: str | os.PathLike | None = None,
    max_cells: int = 2000,
    seed: int = 0,
) -> Path:
    """Write `<out>/report.html` (figures embedded) and its PNGs for `folder`; returns the page.

    Args:
        folder: A run, demo, experiment, tune or embeddings folder.
        out: The report folder (default `<folder>/report`); an earlier report there is replaced.
        max_cells: At most this many cells in each scatter plot (sampled with `seed`).
        seed: Seed of the cell sampling.

    Raises:
        ReportError: the folder does not exist or holds nothing to report; `out` holds other files.
    """
    folder = Path(folder).expanduser().absolute()
    if not folder.exists():
        raise ReportError(f"report: folder not found: {folder}")
    if not folder.is_dir():
        raise ReportError(f"report: {folder} is a file, not a folder; give {EXPECTED}")
    kind = detect(folder)
    if kind is None:
        raise ReportError(f"report: {folder} holds nothing to report: expected {EXPECTED}")
    if max_cells < 10:
        raise ReportError(f"report: max_cells={max_cells} is too small; give at least 10")
    out = Path(out).expanduser().absolute() if out else folder / "report"
    _check_out(out)
    staged = staging_dir(out, REPORT)
    try:
        ctx = _Ctx(staged, max_cells, seed)
        title, header, sections = BUILDERS[kind](folder, ctx)
        sections = [s for s in sections if s.figures or s.tables]
        if not sections:
            raise ReportError(
                f"report: {folder} looks like a {kind} folder but nothing in it could be "
                f"shown ({'; '.join(ctx.notes) or 'no history, metrics or predictions'})"
            )
        if ctx.notes:
            header["not shown"] = "; ".join(ctx.notes)
        header["report made"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        page = render_page(title, header, sections)
        atomic_write_text(staged / HTML_FILE, page)
        atomic_write_json(
            staged / MANIFEST_FILE,
            {
                "generator": GENERATOR,
                "folder": str(folder),
                "kind": kind,
                "max_cells": max_cells,
                "seed": seed,
                "sections": [s.title for s in sections],
                "figures": [Path(f.path).name for s in sections for f in s.figures],
                "notes": ctx.notes,
            },
        )
        swap_in(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out / HTML_FILE


def _is_report(path: Path) -> bool:
    return (raycell_output(path) or (None,))[0] == REPORT


def _check_out(out: Path) -> None:
    """Refuse an output that is a file or a folder of files that are not an earlier report."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"report --out {out} is a file, not a folder; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not _is_report(out):
        raise ReportError(
            f"report --out {out} already holds files that are not a raycell report; "
            "choose a new or empty folder (nothing was replaced)"
        )


# --------------------------------------------------------------------------------------------------
# helpers shared by the folder kinds


def _read_json(path: Path) -> dict:
    return json_object(path) or {}


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        obj = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _made(*paths: Path) -> str:
    times = [p.stat().st_mtime for p in paths if p.exists()]
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(min(times))) if times else "unknown"


def _highlights(cfg: dict) -> dict[str, str]:
    """A few config keys that say what was trained on what (absent keys are left out)."""
    keys = (
        "model.preset",
        "model.args",
        "train.epochs",
        "train.lr",
        "data.batch_size",
        "data.path",
        "seed",
    )
    out = {}
    for key in keys:
        v = cfg
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if v not in (None, "", {}):
            out[key] = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return out


def _fmt(v) -> object:
    return float(v) if isinstance(v, (float, np.floating)) else v


# --------------------------------------------------------------------------------------------------
# a Train run (also each run of a demo or experiment)


def _history(run_dir: Path) -> list[dict]:
    from raycell.train.history import HISTORY_FILE, read_history

    hist = read_history(run_dir / HISTORY_FILE)
    if not hist:  # a run folder from before history.jsonl: metrics.json keeps every epoch too
        hist = [
            h
            for h in _read_json(run_dir / "metrics.json").get("history", [])
            if isinstance(h, dict) and isinstance(h.get("epoch"), (int, float))
        ]
    return hist


def _curves_section(run_dir: Path, ctx: _Ctx, prefix: str) -> Section | None:
    from raycell.plots import training_curves

    hist = _history(run_dir)
    if not hist:
        return None
    path = training_curves(
        hist, ctx.png(f"{prefix}training_curves"), title=f"{prefix}training curves"
    )
    keys = [
        k
        for k in (
            "train_loss",
            "val_loss",
            "valbatch_loss",
            "val_auroc",
            "valbatch_auroc",
            "val_composite",
            "val_batch_probe",
        )
        if any(k in h for h in hist)
    ]
    rows = [[int(h["epoch"])] + [_fmt(h.get(k, float("nan"))) for k in keys] for h in hist]
    return Section(
        f"{prefix}Training curves",
        CAPTIONS["curves"],
        figures=[Figure(path, f"{prefix}training losses and validation metrics per epoch")],
        tables=[html_table(["epoch"] + keys, rows)],
    )


def _metrics_section(eval_dir: Path, prefix: str) -> Section | None:
    from raycell.eval.evaluate import TABLE_COLUMNS

    m = _read_json(eval_dir / "metrics.json")
    splits = m.get("splits")
    if not isinstance(splits, dict) or not splits:
        return None
    rows_by = {f"{m.get('model_type', 'model')}/{s}": r for s, r in splits.items()}
    base = m.get("baseline") or {}
    for s, r in (base.get("splits") or {}).items():
        rows_by[f"{base.get('label', 'baseline')}/{s}"] = r
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows_by.values())]
    rows = [[name] + [_fmt(r.get(c, float("nan"))) for c in cols] for name, r in rows_by.items()]
    return Section(
        f"{prefix}Evaluation metrics",
        CAPTIONS["metrics"],
        tables=[html_table(["model/split"] + cols, rows)],
    )


def _prediction_columns(pred_dir: Path, columns: list[str]):
    """The given columns of every prediction shard (only those: shards may hold reconstructions)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((pred_dir / "shards").glob(K.SHARD_GLOB))
    tables = []
    for f in files:
        try:
            names = pq.read_schema(f).names
            t = pq.read_table(f, columns=[c for c in columns if c in names])
        except (OSError, pa.ArrowInvalid) as exc:
            raise ReportError(f"report: cannot read prediction shard {f} ({exc})") from None
        if t.num_rows:
            tables.append(t.replace_schema_metadata(None))
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _pca_section(pred_dir: Path, ctx: _Ctx, prefix: str) -> Section | None:
    from raycell.plots import pca_plot

    t = _prediction_columns(pred_dir, [K.LATENT, K.LABEL, K.BATCH, K.SPLIT])
    if t is None or K.LATENT not in t.column_names or t.num_rows < 3:
        return None
    idx = np.sort(np.random.default_rng(ctx.seed).permutation(t.num_rows)[: ctx.max_cells])
    t = t.take(idx)
    lat = list_matrix(t.column(K.LATENT), K.LATENT, str(pred_dir), ReportError)
    labels = np.asarray(t.column(K.LABEL).to_pylist(), dtype=str)
    batches = np.asarray(t.column(K.BATCH).to_pylist(), dtype=str)
    path = pca_plot(
        lat,
        labels,
        batches,
        ctx.png(f"{prefix}latent_pca"),
        title=f"{prefix}latent PCA",
        max_points=len(lat),
        seed=ctx.seed,
    )
    splits = (
        sorted({s or "unassigned" for s in t.column(K.SPLIT).to_pylist()})
        if K.SPLIT in t.column_names
        else []
    )
    note = f"{len(lat)} cells of split(s) {', '.join(splits)} from {pred_dir}."
    return Section(
        f"{prefix}Latent space (PCA)",
        CAPTIONS["pca"].format(n=ctx.max_cells),
        figures=[Figure(path, f"{prefix}latent PCA coloured by label and by batch", note)],
    )


def _sample_rows(ds, column: str, per_value: int, seed: int, max_values: int):
    """Up to `per_value` rows (with their crops) for each value of `column`.

    Shards are visited in turn until every value has enough; each shard's `column` is read first and
    its crops only when it contributes rows, so a large data set is not read whole.
    """
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    vocab = {K.LABEL: ds.manifest.label_vocab, K.BATCH: ds.manifest.batch_vocab}.get(column, [])
    want = list(vocab)[:max_values]
    got: dict[str, list] = {}
    names = ds.columns()
    cols = [c for c in (K.CELL_ID, K.IMAGE, K.BATCH, K.LABEL, K.SPLIT) if c in names]

    def count(v: str) -> int:
        return sum(len(i) for _, i in got.get(v, []))

    for p in ds.shard_paths:
        values = np.asarray(ds.read_shard(p, [column]).column(column).to_pylist(), dtype=str)
        for v in dict.fromkeys(values.tolist()):
            if (want and v not in want) or (not want and v not in got and len(got) >= max_values):
                continue
            if count(v) < per_value:
                idx = rng.permutation(np.flatnonzero(values == v))[: per_value - count(v)]
                got.setdefault(v, []).append((p, np.sort(idx)))
        if want and all(count(v) >= per_value for v in want):
            break
    if not got:
        return None
    shards = dict.fromkeys(p for picks in got.values() for p, _ in picks)
    parts = {p: ds.read_shard(p, cols) for p in shards}  # crops only of the shards that give rows
    order = [v for v in (want or sorted(got)) if v in got]
    return pa.concat_tables([parts[p].take(idx) for v in order for p, idx in got[v]])


def _open_data(path: str | None, ctx: _Ctx, what: str):
    from raycell.formats.shards import open_dataset

    if not path:
        return None
    try:
        return open_dataset(path)
    except (UserError, FileNotFoundError, ValueError, KeyError) as exc:
        ctx.notes.append(f"{what}: data set {path} not readable ({str(exc).splitlines()[0][:200]})")
        return None


def _recon_section(run_dir: Path, ctx: _Ctx, prefix: str) -> Section | None:
    """Originals above reconstructions for a few cells per imaging batch (none for classifiers)."""
    import torch

    from raycell.formats.checkpoint import find_checkpoint, read_meta
    from raycell.formats.shards import decode_images
    from raycell.models import model_entry
    from raycell.models.checkpoint import load_checkpoint
    from raycell.models.random_effects import one_hot_design

    try:
        ck = find_checkpoint(run_dir)
    except FileNotFoundError:
        return None
    entry = model_entry(read_meta(ck).model_type)
    if not getattr(entry, "reconstructs", True):
        return None  # a classifier (timm): nothing to reconstruct
    model, meta = load_checkpoint(ck, "cpu")
    ds = _open_data(meta.config.get("data", {}).get("path"), ctx, f"{prefix}reconstructions")
    if ds is None:
        return None
    spec, batch_map = meta.data_spec, meta.batches
    t = _sample_rows(ds, K.BATCH, RECON_PER_BATCH, ctx.seed, max_values=10**6)
    if t is None:
        return None
    batches = np.asarray(t.column(K.BATCH).to_pylist(), dtype=str)
    codes = batch_map.encode(t.column(K.BATCH), allow_unknown=True)
    keep = np.ones(len(codes), bool)
    if meta.uses_z:  # unseen batches have no Z row: the model would refuse (or mislead)
        keep = codes >= 0
    shown = [b for b in dict.fromkeys(batches[keep].tolist())][:RECON_BATCHES]
    keep &= np.isin(batches, shown)
    if not keep.any():
        return None
    t, batches, codes = t.filter(keep), batches[keep], codes[keep]
    imgs = decode_images(t, spec.shape, spec.dtype)
    raw = imgs.astype(np.int32) if imgs.dtype == np.uint16 else imgs.copy()
    with torch.inference_mode():
        x = spec.to_float(torch.from_numpy(raw))
        z = one_hot_design(torch.from_numpy(np.asarray(codes, dtype=np.int64)), len(batch_map))
        out = model(x, z)
    recon = getattr(out, "recon", None)
    if recon is None or tuple(recon.shape) != tuple(x.shape):
        return None  # a model without a reconstruction of the input's shape
    path = _figures().recon_grid(
        x.numpy(),
        recon.float().clamp(0, 1).numpy(),
        batches,
        ctx.png(f"{prefix}reconstructions"),
        title=f"{prefix}{meta.model_type}: crops and reconstructions",
    )
    note = f"Checkpoint {meta.path} (epoch {meta.epoch}), data set {ds.root}" + (
        "; only the model's training batches (its Z has no row for the others)."
        if meta.uses_z
        else "."
    )
    return Section(
        f"{prefix}Reconstructions per imaging batch",
        CAPTIONS["recon"],
        figures=[
            Figure(path, f"{prefix}original crops above their reconstructions, per batch", note)
        ],
    )


def _crops_section(data_path: str | None, ctx: _Ctx, prefix: str = "") -> Section | None:
    from raycell.formats.shards import decode_images

    ds = _open_data(data_path, ctx, f"{prefix}example crops")
    if ds is None:
        return None
    t = _sample_rows(ds, K.LABEL, CROPS_PER_CLASS, ctx.seed, max_values=MAX_CLASSES)
    if t is None:
        return None
    imgs = decode_images(t, ds.shape, ds.dtype)
    labels = np.asarray(t.column(K.LABEL).to_pylist(), dtype=str)
    path = _figures().crops_by_class(
        imgs,
        labels,
        ctx.png(f"{prefix}crops_by_class"),
        title=f"{prefix}example crops per class",
        per_class=CROPS_PER_CLASS,
    )
    names = ", ".join(ds.manifest.channel_names)
    return Section(
        f"{prefix}Example crops per class",
        CAPTIONS["crops"],
        figures=[
            Figure(
                path,
                f"{prefix}a row of example crops per class",
                f"Data set {ds.root}; channels {names}.",
            )
        ],
    )


def _figures():
    from raycell.report import figures

    return figures


def _run_sections(
    run_dir: Path, ctx: _Ctx, prefix: str = "", out_dir: Path | None = None, crops: bool = True
) -> list[Section]:
    """Every section of one Train run; `out_dir` holds its predictions/ and eval/ (default: run)."""
    out_dir = out_dir or run_dir
    secs = [
        _safe(ctx, "training curves", _curves_section, run_dir, ctx, prefix),
        _safe(ctx, "metrics", _metrics_section, out_dir / "eval", prefix),
    ]
    if (out_dir / "predictions").is_dir():
        secs.append(_safe(ctx, "latent PCA", _pca_section, out_dir / "predictions", ctx, prefix))
    secs.append(_safe(ctx, "reconstructions", _recon_section, run_dir, ctx, prefix))
    if crops:
        data = (_read_yaml(run_dir / "config.yaml").get("data") or {}).get("path")
        secs.append(_safe(ctx, "example crops", _crops_section, data, ctx, prefix))
    return [s for s in secs if s is not None]


def _safe(ctx: _Ctx, what: str, fn, *args) -> Section | None:
    """`fn(*args)`, or None with the reason noted when it raises a user error.

    A damaged checkpoint or an unreadable shard then leaves one section out (the page header says
    why) instead of losing the whole report.
    """
    try:
        return fn(*args)
    except (UserError, FileNotFoundError) as exc:
        prefix = args[-1] if args and isinstance(args[-1], str) else ""
        ctx.notes.append(f"{prefix}{what} left out: {str(exc).splitlines()[0][:300]}")
        return None


def _run_report(folder: Path, ctx: _Ctx):
    cfg = _read_yaml(folder / "config.yaml")
    metrics = _read_json(folder / "metrics.json")
    model_type = metrics.get("model_type") or (cfg.get("model") or {}).get("type")
    if not model_type:
        try:
            from raycell.formats.checkpoint import find_checkpoint, read_meta

            model_type = read_meta(find_checkpoint(folder)).model_type
        except (UserError, FileNotFoundError, ValueError):
            model_type = "unknown"
    header = {
        "folder": str(folder),
        "what": "Train run (raycell train)",
        "made": _made(folder / "config.yaml", folder / "history.jsonl"),
        "model type": model_type,
        "epochs run": str(len(_history(folder))),
        **_highlights(cfg),
    }
    return f"raycell report: {folder.name}", header, _run_sections(folder, ctx)


# --------------------------------------------------------------------------------------------------
# demo, experiment, tune


def _demo_report(folder: Path, ctx: _Ctx):
    from raycell.eval.evaluate import TABLE_COLUMNS

    summary = _read_json(folder / "summary.json")
    cfg = _read_yaml(folder / "config.yaml")
    models = summary.get("models") or {}
    rows_by = {
        f"{m}/{s}": r
        for m, v in models.items()
        for s, r in (("test", v.get("seen_test") or {}), ("unseen", v.get("unseen") or {}))
        if r
    }
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows_by.values())]
    sections = [
        Section(
            "Demo summary: seen-batch test split vs unseen batches",
            CAPTIONS["metrics"],
            tables=[
                html_table(
                    ["model/split"] + cols,
                    [
                        [k] + [_fmt(r.get(c, float("nan"))) for c in cols]
                        for k, r in rows_by.items()
                    ],
                )
            ]
            if rows_by
            else [],
        )
    ]
    data = str(folder / "data") if (folder / "data" / K.MANIFEST).is_file() else None
    if (s := _crops_section(data, ctx)) is not None:
        sections.append(s)
    runs = {m: Path(v["run_dir"]) for m, v in models.items() if v.get("run_dir")}
    runs = {m: r for m, r in runs.items() if r.is_dir()} or {
        ((_read_yaml(p / "config.yaml").get("model") or {}).get("type") or p.name): p
        for p in sorted((folder / "runs").iterdir())
        if p.is_dir()
    }
    for model_type, run in runs.items():
        sections += _run_sections(run, ctx, prefix=f"{model_type}: ", crops=False)
    header = {
        "folder": str(folder),
        "what": "raycell demo",
        "made": _made(folder / "config.yaml"),
        "models": ", ".join(runs) or ", ".join(models),
        "seconds": str(summary.get("seconds", "")),
        **_highlights(cfg),
    }
    return f"raycell demo report: {folder.name}", header, sections


def _experiment_report(folder: Path, ctx: _Ctx):
    res = _read_json(folder / "results.json")
    table, notes = markdown_table((folder / "table.md").read_text())
    sections = [
        Section(
            "Experiment table", CAPTIONS["experiment"], tables=[table] if table else [], notes=notes
        )
    ]
    cfg = res.get("config") or {}
    if (s := _crops_section((cfg.get("data") or {}).get("path"), ctx)) is not None:
        sections.append(s)
    rows = [
        r
        for r in res.get("rows", [])
        if isinstance(r, dict)
        and r.get("run_dir")
        and not str(r.get("label", "")).endswith("randomized Z")
    ]
    seeds = sorted({r.get("seed") for r in rows if isinstance(r.get("seed"), int)})
    if seeds:  # one seed's runs: the others look alike and would multiply the page
        for r in [r for r in rows if r.get("seed") == seeds[0]]:
            run = Path(r["run_dir"])
            out_dir = folder / f"seed{seeds[0]}" / str(r["model"])
            if run.is_dir():
                sections += _run_sections(
                    run,
                    ctx,
                    prefix=f"{r['model']} (seed {seeds[0]}): ",
                    out_dir=out_dir if out_dir.is_dir() else run,
                    crops=False,
                )
    header = {
        "folder": str(folder),
        "what": "experiment (raycell experiment)",
        "made": _made(folder / "results.json"),
        "command": str(res.get("command", "")),
        "models": ", ".join(map(str, res.get("models", []))),
        "seeds": ", ".join(map(str, res.get("seeds", []))),
        **_highlights(cfg),
    }
    if seeds:
        header["runs shown"] = f"seed {seeds[0]} (of {len(seeds)} seed(s))"
    return f"raycell experiment report: {folder.name}", header, sections


def _tune_report(folder: Path, ctx: _Ctx):
    import pandas as pd

    try:
        trials = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    except (OSError, ValueError) as exc:
        raise ReportError(f"report: cannot read {folder / 'trials.csv'} ({exc})") from None
    best_yaml = folder / "best.yaml"
    cfg = _read_yaml(best_yaml)
    tune = cfg.get("tune") or {}
    metric, mode = tune.get("metric", "objective"), tune.get("mode", "max")
    best_id = None
    if best_yaml.is_file():
        m = re.search(r"^# Best trial (\S+)", best_yaml.read_text(), re.M)
        best_id = m.group(1) if m else None
    if "objective" not in trials.columns:
        raise ReportError(
            f"report: {folder / 'trials.csv'} has no column 'objective' (written by `raycell tune`)"
        )
    trials = trials.sort_values("objective", ascending=(mode == "min"), na_position="last")
    trials = trials.reset_index(drop=True)
    if "error" in trials.columns and trials["error"].isna().all():
        trials = trials.drop(columns=["error"])
    best_row = None
    if best_id is not None and "trial_id" in trials.columns:
        hit = np.flatnonzero(trials["trial_id"].astype(str).to_numpy() == best_id)
        best_row = int(hit[0]) if len(hit) else None
    if best_row is None and trials["objective"].notna().any():
        best_row = 0
    rows = [
        [_fmt(v) if not (isinstance(v, float) and np.isnan(v)) else float("nan") for v in r]
        for r in trials.itertuples(index=False)
    ]
    sections = [
        Section(
            f"Tune trials (objective: {metric}, {mode})",
            CAPTIONS["tune"],
            tables=[html_table(list(trials.columns), rows, best_row=best_row)],
        )
    ]
    plot = folder / "tune_objective.png"
    if plot.is_file():
        dst = ctx.png("tune_objective")
        shutil.copyfile(plot, dst)
        sections.append(
            Section(
                "Objective over trials",
                CAPTIONS["tune_plot"],
                figures=[Figure(dst, f"{metric} of each trial and against each searched value")],
            )
        )
    if best_row is not None and "trial_id" in trials.columns:
        run = folder / "trials" / f"train-{trials['trial_id'].iloc[best_row]}"
        if run.is_dir():
            sections += _run_sections(run, ctx, prefix="best trial: ")
    header = {
        "folder": str(folder),
        "what": "hyperparameter search (raycell tune)",
        "made": _made(folder / "trials.csv"),
        "trials": str(len(trials)),
        "objective": f"{metric} ({mode})",
        "model type": str((cfg.get("model") or {}).get("type", "")),
    }
    if best_row is not None:
        header["best"] = (
            f"{trials['trial_id'].iloc[best_row] if 'trial_id' in trials else best_row}: "
            f"{trials['objective'].iloc[best_row]:.4g}"
        )
    header.update(_highlights(cfg))
    return f"raycell tune report: {folder.name}", header, sections


# --------------------------------------------------------------------------------------------------
# embeddings (raycell embed)


def _scatter(coords: np.ndarray, colourings: dict, ctx: _Ctx, method: str) -> list[Figure]:
    """One figure per colouring (a legend for classes, a colour bar for numbers such as dose)."""
    from raycell.profiling.figures import scatter_by

    axis = "PC" if method == "pca" else "UMAP"
    figs = []
    for name, values in colourings.items():
        path = ctx.png(f"{method}_by_{name}")
        scatter_by(
            coords,
            values,
            f"{method.upper()} of the embeddings, coloured by {name}",
            path=path,
            axis_labels=(f"{axis}1", f"{axis}2"),
            seed=ctx.seed,
        )
        figs.append(Figure(path, f"{method.upper()} of the embeddings coloured by {name}"))
    return figs


def _confusion(entry: dict, head: str, ctx: _Ctx) -> Figure:
    from raycell.profiling.figures import confusion_figure

    path = ctx.png(f"confusion_{head}")
    confusion_figure(entry, f"{head} head", path=path)  # it adds accuracy and n itself
    return Figure(path, f"confusion matrix of the {head} head (rows: truth, columns: prediction)")


def _emb_sections(folder: Path, ctx: _Ctx) -> list[Section]:
    """PCA (and UMAP) by each weak label and by batch; per-head accuracy and confusion matrices."""
    from raycell.profiling import profiles as P

    meta, X, names = P.read_embeddings(folder)
    idx = np.sort(np.random.default_rng(ctx.seed).permutation(len(X))[: ctx.max_cells])
    sub, Xs = meta.iloc[idx].reset_index(drop=True), X[idx]
    heads = [
        h
        for h in (meta.attrs.get("manifest") or {}).get("heads") or {}
        if P.META_PREFIX + h in meta.columns
    ]
    # numeric truths (dose, time) keep their numbers: scatter_by shows them as a gradient
    colour = {h: sub[P.META_PREFIX + h] for h in heads}
    for col, name in (("Batch", "batch"), ("Plate", "plate")):
        if P.META_PREFIX + col in sub.columns and (name == "batch" or len(colour) == len(heads)):
            colour[name] = sub[P.META_PREFIX + col].astype(str)
    sections = []
    methods = ["pca"]
    try:
        import umap  # noqa: F401

        methods.append("umap")
    except ImportError:
        ctx.notes.append("UMAP left out: umap-learn is not installed")
    for method in methods:
        if len(Xs) < 5 or Xs.shape[1] < 2:
            break
        coords = P.reduce(Xs, method, 2, ctx.seed)
        sections.append(
            Section(
                f"Embeddings ({method.upper()})",
                CAPTIONS["emb_pca"].format(n=ctx.max_cells, method=method.upper()),
                figures=_scatter(coords, colour, ctx, method),
                notes=[f"{len(Xs)} of {len(X)} cells, {X.shape[1]} features."],
            )
        )
    metrics = P.head_metrics(meta)
    if metrics:
        rows, figs = [], []
        for h, e in metrics.items():
            try:
                rho = P.pc1_spearman(meta, X, P.META_PREFIX + h)
            except UserError:
                rho = float(
                    "nan"
                )  # a categorical head (treatment, compound): no order to compare with
            rows.append(
                [
                    h,
                    e["n"],
                    len(e["classes"]),
                    e["accuracy"],
                    e["balanced_accuracy"],
                    e["chance"],
                    rho,
                ]
            )
            figs.append(_confusion(e, h, ctx))
        table = html_table(
            [
                "head",
                "cells",
                "classes",
                "accuracy",
                "balanced accuracy",
                "chance",
                "|Spearman rho| PC1 vs truth",
            ],
            rows,
        )
        sections.append(
            Section(
                "Weak-label heads: accuracy and confusion",
                CAPTIONS["emb_heads"],
                figures=figs,
                tables=[table],
            )
        )
    return sections


def _emb_report(folder: Path, ctx: _Ctx):
    man = _read_json(folder / "embeddings.json")
    sections = _emb_sections(folder, ctx)
    if man.get("dataset") and (s := _crops_section(man["dataset"], ctx)) is not None:
        sections.append(s)
    header = {
        "folder": str(folder),
        "what": "embeddings (raycell embed)",
        "made": _made(folder / "embeddings.json"),
        "model type": str(man.get("model_type", "")),
        "checkpoint": str(man.get("checkpoint", "")),
        "data set": str(man.get("dataset", "")),
        "cells": str(man.get("n_cells", "")),
        "layout": str(man.get("layout", "")),
        "features": str(len(man.get("features", []))),
        "weak-label heads": ", ".join(man.get("heads") or {}) or "none",
    }
    return f"raycell embeddings report: {folder.name}", header, sections


def _profile_report(folder: Path, ctx: _Ctx):
    from raycell.report.profile_section import profile_report

    return profile_report(folder, ctx)


# --------------------------------------------------------------------------------------------------
# ingest data set


def _overlay_section(folder: Path, ctx: _Ctx) -> Section | None:
    """Per plate: counts, rejects and diameter (a table) and the overlay PNG of `raycell ingest`."""
    index = folder / "overlays" / "overlays.json"
    if not index.is_file():
        ctx.notes.append(
            "segmentation overlays left out: no overlays/overlays.json (a data set written "
            "before overlays existed, or ingest.overlay_fields=0)"
        )
        return None
    plates = _read_json(index).get("plates") or []
    rows, figures = [], []
    for r in plates:
        drawn = ", ".join(f"{f} ({n})" for f, n in zip(r.get("fields", []), r.get("objects", [])))
        codes = ", ".join(f"{k} {v}" for k, v in (r.get("rejects_by_code") or {}).items())
        rows.append(
            [
                r["plate"],
                r["n_fovs"],
                r["n_fovs_with_cells"],
                r["n_fovs_rejected"],
                codes,
                r["n_cells"],
                r["diameter_px"],
                drawn,
            ]
        )
        src = folder / r["png"] if r.get("png") else None
        if src is None or not src.is_file():
            continue
        dst = ctx.png(f"overlay_{r['plate']}")
        shutil.copyfile(src, dst)
        figures.append(
            Figure(
                dst,
                f"segmentation outlines on {len(r.get('fields', []))} fields of plate {r['plate']}",
                f"Plate {r['plate']}: {drawn} (field, objects found); diameter "
                f"{r['diameter_px']} px.",
            )
        )
    table = html_table(
        [
            "plate",
            "fields",
            "with cells",
            "rejected",
            "rejects by reason",
            "cells",
            "diameter px",
            "fields drawn (objects)",
        ],
        rows,
    )
    return Section("Segmentation per plate", CAPTIONS["overlays"], figures=figures, tables=[table])


def _ingest_report(folder: Path, ctx: _Ctx):
    summary = _read_json(folder / INGEST_SUMMARY)
    diam = summary.get("diameter_px") or {}
    header = {
        "folder": str(folder),
        "what": "ingest data set (raycell ingest)",
        "made": _made(folder / INGEST_SUMMARY),
        "input": str(summary.get("input", "")),
        "fields of view": f"{summary.get('n_fovs_in', '')} in, "
        f"{summary.get('n_fovs_with_cells', '')} with cells, "
        f"{summary.get('n_fovs_rejected', '')} rejected",
        "cells": str(summary.get("n_cells", "")),
        "channels": ", ".join(summary.get("channels") or []),
        "diameter px (median of fields)": f"{float(diam.get('median', 0.0)):.1f}",
    }
    sections = [
        _safe(ctx, "segmentation overlays", _overlay_section, folder, ctx),
        _safe(ctx, "example crops", _crops_section, str(folder), ctx),
    ]
    return (f"raycell ingest report: {folder.name}", header, [s for s in sections if s is not None])


BUILDERS = {
    "ingest": _ingest_report,
    "run": _run_report,
    "demo": _demo_report,
    "experiment": _experiment_report,
    "tune": _tune_report,
    "embeddings": _emb_report,
    "profile": _profile_report,
}
