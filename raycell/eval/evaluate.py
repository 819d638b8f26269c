"""`raycell evaluate`: metrics per split from inference outputs, as JSON, CSV and a printed table.

For each split present (seen `test` vs `unseen` are the ones that matter; `val`/`train` when inferred):
phenotype AUROC (the training loop's `val_auroc` on the same predictions; macro one-vs-rest for more
than two labels, binary with a DeLong 95% CI), balanced accuracy and F1; reconstruction MSE and SSIM
(per-cell values written by `infer`); latent batch mixing (Davies-Bouldin and Calinski-Harabasz by batch
on z-scored latents, batch silhouette, iLISI, batch-probe accuracy) and label structure (silhouette, 1-NN
label accuracy excluding same-batch neighbours). Definitions are in `raycell.metrics.classification` and
`raycell.metrics.latent`.

With `baseline` (config `eval.baseline`), the same splits are also scored for a logistic regression on
hand-made features of the predictions' data set, fitted on its `train` split (`raycell.eval.baseline`):
written as `baseline` in metrics.json and as extra rows of metrics.csv.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from raycell import constants as K
from raycell.metrics.classification import classification_metrics
from raycell.metrics.latent import latent_metrics
from raycell.utils.io import atomic_write_json, atomic_write_text

SPLIT_ORDER = [K.TEST, K.UNSEEN, K.VAL, K.TRAIN, K.UNASSIGNED]
TABLE_COLUMNS = [
    "n",
    "auroc",
    "auroc_ci_low",
    "auroc_ci_high",
    "balanced_accuracy",
    "f1",
    "mse",
    "ssim",
    "db",
    "ch",
    "batch_probe_acc",
    "batch_probe_chance",
    "batch_probe_within_label",
    "batch_probe_within_label_chance",
    "batch_silhouette",
    "ilisi_norm",
    "nsb_1nn_acc",
]


def split_metrics(
    df: pd.DataFrame,
    latents: np.ndarray,
    label_vocab: list[str],
    max_cells: int = 5000,
    seed: int = 0,
) -> dict:
    """All metrics for the rows of one split (df has label, batch, prob, recon_mse, recon_ssim)."""
    res: dict = {"n": int(len(df))}
    known = df[K.LABEL].isin(label_vocab).to_numpy()
    if not known.all():
        # cells whose label the model never saw: kept in the latent metrics, counted, left out of AUROC
        res["n_unknown_label"] = int((~known).sum())
        print(
            f"[raycell] warning: {res['n_unknown_label']} cell(s) have labels outside the model's "
            f"vocabulary {label_vocab} (e.g. {df[K.LABEL][~known].iloc[0]!r}); excluded from "
            "classification metrics",
            flush=True,
        )
    y = pd.Categorical(df[K.LABEL], categories=label_vocab).codes
    prob = df[K.PROB].to_numpy() if K.PROB in df else None  # weak-label models without a label head
    if prob is not None and known.any():  # (N,) binary or (N, K) class probabilities
        res.update(classification_metrics(y[known], np.stack(prob[known]).astype(float)))
    if K.RECON_MSE in df:  # models that reconstruct
        res["mse"] = float(df[K.RECON_MSE].mean())
        res["ssim"] = float(df[K.RECON_SSIM].mean())
    idx = np.random.default_rng(seed).permutation(len(df))[:max_cells]
    sub = df.iloc[idx]
    res.update(latent_metrics(latents[idx], sub[K.LABEL].to_numpy(), sub[K.BATCH].to_numpy()))
    return res


def evaluate_predictions(
    pred_dir: str | Path,
    out: str | Path | None = None,
    max_cells: int = 5000,
    seed: int = 0,
    plot: bool = True,
    quiet: bool = False,
    baseline: bool = False,
    baseline_features: str = "auto",
) -> dict:
    """Compute metrics for a predictions folder; writes metrics.json, metrics.csv and a PCA plot.

    With `baseline`, also the hand-made-feature baseline on the same splits (features: 'auto',
    'morph' or 'crops', see `raycell.eval.baseline.load_features`).
    """
    from raycell.formats.arrays import list_matrix
    from raycell.formats.predictions import load_predictions

    pred_dir = Path(pred_dir).absolute()
    pm, table = load_predictions(pred_dir)
    latents = list_matrix(table.column(K.LATENT), K.LATENT, str(pred_dir))
    df = table.drop_columns(
        [c for c in (K.LATENT, K.LATENT_RE, K.BATCH_PROB, K.RECON) if c in table.column_names]
    ).to_pandas()
    label_vocab = pm["labels"]["values"]
    out = Path(out).absolute() if out else pred_dir.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    splits = sorted(
        df[K.SPLIT].unique(), key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 99
    )
    for s in splits:
        m = (df[K.SPLIT] == s).to_numpy()
        results[s or "unassigned"] = split_metrics(
            df[m].reset_index(drop=True), latents[m], label_vocab, max_cells, seed
        )
    report = {
        "predictions": str(pred_dir),
        "model_type": pm["model_type"],
        "checkpoint": pm["checkpoint"],
        "label_positive": label_vocab[-1] if len(label_vocab) == 2 else None,
        "splits": results,
    }
    if baseline:
        report["baseline"] = _baseline(
            pm, pred_dir, [s or "unassigned" for s in splits], max_cells, seed, baseline_features
        )
    atomic_write_json(out / "metrics.json", report)
    frame = pd.DataFrame(results).T
    frame.insert(0, "model", pm["model_type"])
    if baseline:
        extra = pd.DataFrame(report["baseline"]["splits"]).T
        extra.insert(0, "model", report["baseline"]["label"])
        frame = pd.concat([frame, extra])
    atomic_write_text(out / "metrics.csv", frame.to_csv(index_label="split"))
    if plot:
        from raycell.plots import pca_plot

        report["pca_plot"] = str(
            pca_plot(
                latents,
                df[K.LABEL].to_numpy(),
                df[K.BATCH].to_numpy(),
                out / "latent_pca.png",
                title=f"{pm['model_type']} latents",
            )
        )
    if not quiet:
        print(format_table(results, title=f"{pm['model_type']}  ({pred_dir})"))
        if baseline:
            b = report["baseline"]
            print(
                format_table(
                    b["splits"], title=f"{b['label']}  (fitted on train of {b['dataset']})"
                )
            )
    report["out"] = str(out)
    return report


def _baseline(
    pm: dict, pred_dir: Path, splits: list[str], max_cells: int, seed: int, features: str
) -> dict:
    """The hand-made-feature baseline on the predictions' data set, scored on `splits` (not train)."""
    from raycell.errors import UserError
    from raycell.eval.baseline import baseline_label, evaluate_baseline, load_features

    data = pm.get("dataset")
    if not data or not (Path(data) / K.MANIFEST).is_file():
        raise UserError(
            f"{pred_dir / K.PREDICTIONS_MANIFEST}: its data set {data!r} is not there, so "
            "eval.baseline cannot fit the feature baseline; set eval.baseline=false"
        )
    splits = [s for s in splits if s != K.TRAIN]
    feats = load_features(data, [K.TRAIN] + splits, features, max_cells, seed)
    return {
        "label": baseline_label(feats["source"]),
        "features": feats["source"],
        "dataset": data,
        "feature_names": feats.get("names", []),
        "splits": evaluate_baseline(feats, splits, seed),
    }


SHORT = {
    "auroc_ci_low": "auroc_lo",
    "auroc_ci_high": "auroc_hi",
    "balanced_accuracy": "bal_acc",
    "batch_probe_acc": "probe_acc",
    "batch_probe_chance": "chance",
    "batch_probe_within_label": "probe_y",
    "batch_probe_within_label_chance": "chance_y",
    "batch_silhouette": "batch_sil",
    "ilisi_norm": "ilisi_norm",
    "nsb_1nn_acc": "nsb_1nn",
}


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
