"""`raycell evaluate`: metrics per split from inference outputs, as JSON, CSV and a printed table.

For each split present (seen `test` vs `unseen` are the ones that matter; `val`/`train` when inferred):
phenotype AUROC with a DeLong 95% CI, balanced accuracy and F1; reconstruction MSE and SSIM (per-cell
values written by `infer`); latent batch mixing (Davies-Bouldin and Calinski-Harabasz by batch on z-scored
latents, batch silhouette, iLISI, batch-probe accuracy) and label structure (silhouette, 1-NN label accuracy
excluding same-batch neighbours). Definitions are in `raycell.eval.metrics`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from raycell import constants as K
from raycell.eval import metrics as M
from raycell.utils.io import atomic_write_json, atomic_write_text, read_json

SPLIT_ORDER = [K.TEST, K.UNSEEN, K.VAL, K.TRAIN, K.UNASSIGNED]
TABLE_COLUMNS = ["n", "auroc", "auroc_ci_low", "auroc_ci_high", "balanced_accuracy", "f1", "mse", "ssim",
                 "db", "ch", "batch_probe_acc", "batch_probe_chance", "batch_silhouette", "ilisi_norm",
                 "nsb_1nn_acc"]


def split_metrics(df: pd.DataFrame, latents: np.ndarray, label_vocab: list[str], max_cells: int = 5000,
                  seed: int = 0) -> dict:
    """All metrics for the rows of one split (df has label, batch, prob, recon_mse, recon_ssim)."""
    res: dict = {"n": int(len(df))}
    known = df[K.LABEL].isin(label_vocab).to_numpy()
    if not known.all():
        # cells whose label the model never saw: kept in the latent metrics, counted, left out of AUROC
        res["n_unknown_label"] = int((~known).sum())
        print(f"[raycell] warning: {res['n_unknown_label']} cell(s) have labels outside the model's "
              f"vocabulary {label_vocab} (e.g. {df[K.LABEL][~known].iloc[0]!r}); excluded from "
              "classification metrics", flush=True)
    y = pd.Categorical(df[K.LABEL], categories=label_vocab).codes
    prob = df[K.PROB].to_numpy()
    if len(label_vocab) == 2 and np.ndim(prob[0]) == 0 and known.any():
        res.update(M.classification_metrics(y[known], prob[known].astype(float)))
    elif known.any():  # multi-class: accuracy family on the arg-max
        from sklearn.metrics import balanced_accuracy_score, f1_score

        pred = np.stack(prob[known]).argmax(1)
        res.update({"balanced_accuracy": float(balanced_accuracy_score(y[known], pred)),
                    "f1": float(f1_score(y[known], pred, average="macro")),
                    "accuracy": float((pred == y[known]).mean())})
    res["mse"] = float(df[K.RECON_MSE].mean())
    res["ssim"] = float(df[K.RECON_SSIM].mean())
    idx = np.random.default_rng(seed).permutation(len(df))[:max_cells]
    sub = df.iloc[idx]
    res.update(M.latent_metrics(latents[idx], sub[K.LABEL].to_numpy(), sub[K.BATCH].to_numpy()))
    return res


def evaluate_predictions(pred_dir: str | Path, out: str | Path | None = None, max_cells: int = 5000,
                         seed: int = 0, plot: bool = True, quiet: bool = False) -> dict:
    """Compute metrics for a predictions folder; writes metrics.json, metrics.csv and a PCA plot."""
    from raycell.infer.run import read_predictions

    pred_dir = Path(pred_dir).absolute()
    try:
        pm = read_json(pred_dir / K.PREDICTIONS_MANIFEST, "predictions manifest")
    except ValueError as exc:  # malformed JSON: read_json names the file
        from raycell.data.shards import ShardError

        raise ShardError(f"{exc}; re-run `raycell infer` to rewrite it") from None
    table = read_predictions(pred_dir, _expected_files(pred_dir, pm))
    check_predictions(table, pm, pred_dir)
    latents = np.asarray(table.column(K.LATENT).combine_chunks().flatten()).reshape(table.num_rows, -1)
    df = table.drop_columns([c for c in (K.LATENT, K.LATENT_RE, K.BATCH_PROB, K.RECON)
                             if c in table.column_names]).to_pandas()
    label_vocab = pm["labels"]["values"]
    out = Path(out).absolute() if out else pred_dir.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    splits = sorted(df[K.SPLIT].unique(), key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 99)
    for s in splits:
        m = (df[K.SPLIT] == s).to_numpy()
        results[s or "unassigned"] = split_metrics(df[m].reset_index(drop=True), latents[m], label_vocab,
                                                   max_cells, seed)
    report = {"predictions": str(pred_dir), "model_type": pm["model_type"], "checkpoint": pm["checkpoint"],
              "label_positive": label_vocab[-1] if len(label_vocab) == 2 else None, "splits": results}
    atomic_write_json(out / "metrics.json", report)
    frame = pd.DataFrame(results).T
    frame.insert(0, "model", pm["model_type"])
    atomic_write_text(out / "metrics.csv", frame.to_csv(index_label="split"))
    if plot:
        from raycell.eval.plots import pca_plot

        report["pca_plot"] = str(pca_plot(latents, df[K.LABEL].to_numpy(), df[K.BATCH].to_numpy(),
                                          out / "latent_pca.png", title=f"{pm['model_type']} latents"))
    if not quiet:
        print(format_table(results, title=f"{pm['model_type']}  ({pred_dir})"))
    report["out"] = str(out)
    return report


def _expected_files(pred_dir: Path, pm: dict) -> list[Path] | None:
    """The shard files predictions.json lists, each checked to exist with its recorded row count.

    A folder holding a shard predictions.json does not list is refused too: its rows would be mixed in.
    None for manifests written before shards were listed (then only the totals are checked).
    """
    import pyarrow.parquet as pq

    from raycell.data.shards import ShardError

    if "shards" not in pm:
        return None
    fix = "re-run `raycell infer` with the same settings (it redoes missing shards)"
    manifest = pred_dir / K.PREDICTIONS_MANIFEST
    listed = [pred_dir / s["file"] for s in pm["shards"]]
    missing = [f.name for f in listed if not f.is_file()]
    if missing:
        raise ShardError(f"{len(missing)} prediction shard(s) listed in {manifest} are missing "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} in {pred_dir}/shards): "
                         f"metrics would leave their cells out; {fix}")
    extra = sorted(set((pred_dir / "shards").glob(K.SHARD_GLOB)) - set(listed))
    if extra:
        raise ShardError(f"{pred_dir}/shards holds {len(extra)} prediction shard(s) that {manifest} does not "
                         f"list (e.g. {extra[0].name}): they are not from the run it describes; remove "
                         "them or re-run `raycell infer` into a new folder")
    for f, s in zip(listed, pm["shards"]):
        try:
            rows = pq.ParquetFile(f).metadata.num_rows
        except (OSError, ValueError) as exc:
            raise ShardError(f"cannot read prediction shard {f} ({exc}): delete it and {fix}") from None
        if rows != s["rows"]:
            raise ShardError(f"prediction shard {f} has {rows} rows but {manifest} records {s['rows']}: "
                             f"it was changed after inference; delete it and {fix}")
    return listed


def check_predictions(table, pm: dict, pred_dir: Path) -> None:
    """Refuse predictions whose row count differs from predictions.json or whose cell ids repeat.

    Metrics on a partial table or with cells counted twice look plausible and are wrong, so both are
    errors (ShardError, one line) rather than warnings.
    """
    import pyarrow.compute as pc

    from raycell.data.shards import ShardError

    manifest = pred_dir / K.PREDICTIONS_MANIFEST
    if "n_rows" in pm and table.num_rows != pm["n_rows"]:
        raise ShardError(f"{pred_dir}/shards hold {table.num_rows} prediction rows but {manifest} records "
                         f"{pm['n_rows']}: shards are missing or were changed; re-run `raycell infer` "
                         "with the same settings")
    ids = table.column(K.CELL_ID)
    n_unique = pc.count_distinct(ids).as_py()
    if n_unique != table.num_rows:
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))
        raise ShardError(f"{table.num_rows - n_unique} duplicated cell_id(s) in the predictions in "
                         f"{pred_dir} ({len(dup)} id(s) appear more than once, e.g. "
                         f"{dup[0]['values'].as_py()!r}): metrics would count those cells twice; the data "
                         f"set {pm.get('dataset', '')} needs unique cell ids (re-create or de-duplicate it)")


SHORT = {"auroc_ci_low": "auroc_lo", "auroc_ci_high": "auroc_hi", "balanced_accuracy": "bal_acc",
         "batch_probe_acc": "probe_acc", "batch_probe_chance": "chance",
         "batch_silhouette": "batch_sil", "ilisi_norm": "ilisi_norm", "nsb_1nn_acc": "nsb_1nn"}


def format_table(results: dict, title: str = "", first: str = "split") -> str:
    """A fixed-width table of the headline metrics, one row per split (or per model)."""
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in results.values())]
    w0 = max([len(first)] + [len(str(s)) for s in results]) + 2
    head = f"{first:<{w0}}" + "".join(f"{SHORT.get(c, c):>11}" for c in cols)
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for s, r in results.items():
        cells = []
        for c in cols:
            v = r.get(c, float("nan"))
            cells.append(f"{v:>11d}" if isinstance(v, (int, np.integer)) else f"{float(v):>11.4f}")
        lines.append(f"{s!s:<{w0}}" + "".join(cells))
    return "\n".join(lines)
