"""Batch correction as rows of a table: one embedding raw, control-normalised and Harmony-corrected.

A user choosing a mixed-effects model over a conventional embedding asks how it compares with
correcting the conventional embedding afterwards. `compare_corrections` answers on the same wells
with the same metrics: copairs activity / consistency mAP and percent replicating, plus batch
mixing (batch silhouette, iLISI, linear batch probe from `raycell.metrics.latent`).

Versions (none uses feature selection, so they differ only in the correction):

* `raw`: the aggregated features as they are;
* `control`: each plate robust-z-scored against its control wells (pycytominer mad_robustize);
* `harmony`: Harmony (harmonypy) on the principal components of the globally standardised raw
  profiles, with the batch column as the covariate;
* `control+harmony`: Harmony on the principal components of the control-normalised profiles.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from raycell.constants import CORRECTIONS
from raycell.profiling.retrieval import RetrievalSettings, retrieval
from raycell.profiling.wellprofiles import (
    ProfileError,
    ProfileTable,
    control_mask,
    normalize_plates,
)

HARMONY_PREFIX = "Cells_Harmony_"


def harmony(t: ProfileTable, batch_column: str, n_pcs: int = 30, seed: int = 0) -> ProfileTable:
    """Harmony-corrected principal components of `t` (features `Cells_Harmony_XX`).

    PCA first, as Harmony expects (it corrects a low-dimensional embedding), on features
    standardised over all rows so that no feature dominates by its scale.
    """
    import harmonypy
    from sklearn.decomposition import PCA

    if batch_column not in t.frame.columns:
        raise ProfileError(f"profile.batch_column: no column {batch_column!r} in the profiles")
    batches = t.frame[batch_column].astype(str)
    if batches.nunique() < 2:
        raise ProfileError(
            f"Harmony needs at least 2 batches in {batch_column}, got {batches.nunique()}"
        )
    X = t.matrix()
    sd = X.std(axis=0)
    Z = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    k = max(1, min(n_pcs, Z.shape[0] - 1, Z.shape[1]))
    pcs = PCA(n_components=k, random_state=seed).fit_transform(Z)
    ho = harmonypy.run_harmony(
        pcs,
        pd.DataFrame({"batch": batches.to_numpy()}),
        ["batch"],
        verbose=False,
        random_state=seed,
    )
    corr = np.asarray(ho.Z_corr, dtype=np.float64)
    if corr.shape != pcs.shape:  # harmonypy < 2 returns components x rows
        corr = corr.T
    names = [f"{HARMONY_PREFIX}{i:02d}" for i in range(k)]
    frame = pd.concat(
        [t.frame[t.meta_columns].reset_index(drop=True), pd.DataFrame(corr, columns=names)], axis=1
    )
    return ProfileTable(frame, names, t.notes + [f"Harmony on {k} PCs by {batch_column}"])


def corrected_versions(
    t: ProfileTable,
    controls: str,
    batch_column: str,
    plate_column: str = "Metadata_Plate",
    methods=CORRECTIONS,
    seed: int = 0,
) -> dict[str, ProfileTable]:
    """The versions named in `methods` of the (aggregated, finite) profiles `t`."""
    out = {}
    normalised = None
    for m in methods:
        if m == "raw":
            out[m] = t
        elif m == "harmony":
            out[m] = harmony(t, batch_column, seed=seed)
        else:
            if normalised is None:
                normalised = normalize_plates(t, controls, "mad_robustize", plate_column)
            out[m] = normalised if m == "control" else harmony(normalised, batch_column, seed=seed)
    return out


def batch_mixing(t: ProfileTable, batch_column: str, seed: int = 0) -> dict:
    """Batch silhouette and normalised iLISI (1 = mixed), linear batch-probe accuracy."""
    from raycell.metrics.latent import batch_probe_accuracy, batch_silhouette, ilisi

    X = t.matrix()
    b = t.frame[batch_column].astype(str).to_numpy()
    if len(np.unique(b)) < 2:
        return {
            "batch_silhouette": math.nan,
            "ilisi_norm": math.nan,
            "batch_probe_acc": math.nan,
            "batch_chance": math.nan,
        }
    sd = X.std(axis=0)
    Z = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    probe = batch_probe_accuracy(Z, b, seed=seed)
    return {
        "batch_silhouette": batch_silhouette(Z, b),
        # k: a fifth of the wells (at most 30): a neighbourhood of every well mixes trivially
        "ilisi_norm": ilisi(Z, b, k=min(30, max(2, len(Z) // 5)))["ilisi_norm"],
        "batch_probe_acc": probe["batch_probe_acc"],
        "batch_chance": probe["chance"],
    }


def compare_corrections(
    tables: dict[str, ProfileTable], s: RetrievalSettings, controls: str, batch_column: str
) -> pd.DataFrame:
    """One row per (feature set, correction): mAP metrics and batch mixing on the same wells.

    Args:
        tables: name (e.g. "embedding / harmony") -> profiles, all of the same wells.
        s: the pairing rules (its control mask is recomputed per table).
        controls: the control query (rows keep their order, so the mask is the same).
        batch_column: the column whose mixing is measured.
    """
    rows = []
    for name, t in tables.items():
        mask = control_mask(t.frame, controls) if controls else None
        r = retrieval(t, RetrievalSettings(**{**s.__dict__, "controls_mask": mask}))
        row = {"version": name, "n_wells": len(t.frame), "n_features": len(t.features)}
        a = r.summary.get("activity")
        if a:
            row["activity_fraction_retrieved"] = a["fraction_retrieved"]
            row["activity_mean_map"] = a["mean_map"]
        for col, c in (r.summary.get("consistency") or {}).items():
            row[f"consistency_{col}_mean_map"] = c["mean_map"]
            row[f"consistency_{col}_fraction_retrieved"] = c["fraction_retrieved"]
        row["percent_replicating"] = r.summary["percent_replicating"]
        row.update(batch_mixing(t, batch_column, s.seed))
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """The comparison as a Markdown pipe table (numbers to 3 decimals)."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
