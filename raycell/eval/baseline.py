"""A hand-made-feature baseline: logistic regression on per-cell features, scored like a deep model.

Every comparison needs it: a deep model that does not beat a linear model on shape and intensity
features on the unseen batches has not learnt anything the features do not already give.

* Features: the data set's `morph_*` columns when it has them (written by `raycell ingest`), else
  features of the crops themselves (`raycell.features.morphology.crop_features`: Otsu object at the
  centre of the first (nucleus) channel and of the channel mean (cell); regionprops shape;
  per-channel intensity inside / outside the cell; grey-level co-occurrence texture inside the cell;
  read from the `feat_*` columns when ingest stored them, `ingest.crop_features`, else computed here);
  or both ('all': the ingest's shape columns and the CellProfiler-style intensity and texture).
  `baseline_sources` gives an experiment's rows: with 'auto' and `morph_*` present, two rows, the
  shape columns alone and the richer set, so a table shows whether a deep model beats either.
* Model: median imputation + standardisation + `LogisticRegression(class_weight="balanced")`,
  fitted on the `train` split (at most `max_cells` cells, fixed-seed subsample).
* Metrics per evaluated split (`test` = seen batches, `unseen`): the same keys `raycell evaluate`
  gives a deep model (AUROC with DeLong CI, balanced accuracy, F1 from
  `raycell.metrics.classification`; DB / CH / batch probe etc. from `raycell.metrics.latent` on the
  standardised features, i.e. how much batch the features carry); `mse` / `ssim` are NaN.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from raycell import constants as K
from raycell.errors import UserError
from raycell.features.table import feature_source, has_morph_columns, load_features

__all__ = [
    "BASELINE_MODEL",
    "baseline_label",
    "baseline_sources",
    "feature_source",
    "load_features",
    "fit_baseline",
    "baseline_metrics",
    "evaluate_baseline",
    "baseline_row",
]

BASELINE_MODEL = "baseline"  # the `model` of a baseline row (its table label: `baseline_label`)


def baseline_label(source: str) -> str:
    """The table row name of the baseline on features from `source` ('morph_*', 'crops' or both)."""
    return f"logreg on hand-made features ({source})"


# ------------------------------------------------------------------------------------------------
# Data set -> features -> fitted baseline -> metrics


def baseline_sources(data: str | Path, features: str = "auto") -> list[str]:
    """The `features` value of each baseline row of an experiment on `data`.

    'auto' with `morph_*` columns gives two rows, 'morph' (the ingest's shape columns) and 'all' (those
    plus the crops' intensity and texture: a richer, CellProfiler-style set); 'auto' without them one
    'crops' row; any other value one row of its own.
    """
    if features != "auto":
        has_morph_columns(data, features)  # checks the value and that morph_* exist for 'morph'
        return [features]
    return ["morph", "all"] if has_morph_columns(data, features) else ["crops"]


def fit_baseline(x: np.ndarray, y: np.ndarray, seed: int = 0):
    """Median imputation + standardisation + balanced logistic regression, fitted on (x, y)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(
        SimpleImputer(strategy="median", keep_empty_features=True),
        StandardScaler(),
        LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.fit(np.where(np.isfinite(x), x, np.nan), y)
    return pipe


def baseline_metrics(pipe, x: np.ndarray, meta: pd.DataFrame, label_vocab: list[str]) -> dict:
    """The metrics `raycell evaluate` gives a deep model's split, for the fitted baseline on x."""
    from raycell.metrics.classification import classification_metrics
    from raycell.metrics.latent import latent_metrics

    res: dict = {"n": int(len(meta))}
    known = meta[K.LABEL].isin(label_vocab).to_numpy()
    if not known.all():
        res["n_unknown_label"] = int((~known).sum())
    y = pd.Categorical(meta[K.LABEL], categories=label_vocab).codes
    x = np.where(np.isfinite(x), x, np.nan)
    if known.any():
        prob = np.zeros((len(x), len(label_vocab)))
        prob[:, pipe.classes_] = pipe.predict_proba(x)  # a class absent from train keeps prob 0
        res.update(classification_metrics(y[known], prob[known]))
    res["mse"] = math.nan  # no reconstruction: keeps the deep rows' keys
    res["ssim"] = math.nan
    z = pipe[:-1].transform(x)  # imputed, standardised with the train statistics
    res.update(latent_metrics(z, meta[K.LABEL].to_numpy(), meta[K.BATCH].to_numpy()))
    return res


def evaluate_baseline(feats: dict, splits: list[str], seed: int = 0) -> dict:
    """Fit on the `train` features of `load_features`' output, score `splits`: {split: metrics}."""
    if K.TRAIN not in feats["splits"]:
        raise UserError("baseline: the data set has no 'train' cells; run `raycell split` on it")
    tr = feats["splits"][K.TRAIN]
    labels = tr["meta"][K.LABEL]
    keep = labels.isin(feats["label_vocab"]).to_numpy()
    y = pd.Categorical(labels[keep], categories=feats["label_vocab"]).codes
    if len(np.unique(y)) < 2:
        raise UserError("baseline: the 'train' split has a single label; nothing to classify")
    pipe = fit_baseline(tr["x"][keep], y, seed)
    return {
        s: baseline_metrics(
            pipe, feats["splits"][s]["x"], feats["splits"][s]["meta"], feats["label_vocab"]
        )
        for s in splits
        if s in feats["splits"]
    }


def baseline_row(
    data: str | Path,
    seed: int = 0,
    features: str = "auto",
    max_cells: int = 5000,
    feats: dict | None = None,
) -> dict:
    """One experiment-table row of the baseline (the keys of a deep model's row; no checkpoint).

    Args:
        data: The crop data set (split).
        seed: The row's seed (logistic regression's `random_state`; the cells and features do not
            depend on it, so rows of different seeds agree up to solver noise).
        features: See `load_features`.
        max_cells: Cells per split.
        feats: `load_features(data, [train, test, unseen], ...)` computed earlier (reused across
            seeds).
    """
    t0 = time.time()
    if feats is None:
        feats = load_features(data, [K.TRAIN, K.TEST, K.UNSEEN], features, max_cells)
    ev = evaluate_baseline(feats, [K.TEST, K.UNSEEN], seed)
    return {
        "model": BASELINE_MODEL,
        "label": baseline_label(feats["source"]),
        "seed": seed,
        "run_dir": "",
        "checkpoint": "",
        "train_seconds": 0.0,
        "final_metrics": {
            "features": feats["source"],
            "n_features": len(feats.get("names", [])),
            "feature_names": feats.get("names", []),
            "n_train": int(len(feats["splits"][K.TRAIN]["meta"])),
            "feature_seconds": feats.get("seconds"),
        },
        "seconds": round(time.time() - t0 + feats.get("seconds", 0.0), 1),
        "test": ev.get(K.TEST, {}),
        "unseen": ev.get(K.UNSEEN, {}),
    }
