"""Retrieval metrics of profiles, computed by copairs: phenotypic activity and consistency mAP.

* **Activity**: for each treatment's well, the average precision of ranking its replicate wells
  (same treatment) above the control wells; mAP per treatment, a permutation p-value against
  random rankings of the same size, Benjamini-Hochberg corrected. A treatment is *retrieved* when
  its corrected p-value is below the FDR (0.05). This is copairs' "phenotypic activity" recipe:
  every control gets its own reference index, so controls are negatives of every treatment and
  never positives of each other.
* **Consistency**: per annotation column (mechanism, target, dose), the mAP of retrieving
  treatments that share the annotation against those that do not, on the treatments' consensus
  profiles (by default only the retrieved ones, as the field does: an inactive compound has no
  phenotype to share), or on the wells with replicates of the same treatment excluded.
* **Percent replicating**: the fraction of treatments whose median replicate correlation exceeds
  the 95th percentile of non-replicate correlations (copairs' `correlation_test`).

Nothing is computed by hand here: raycell builds the pair rules and tables, copairs does the maths,
so the numbers equal copairs run directly on the same profiles.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raycell.constants import ConsistencyLevel
from raycell.profiling.wellprofiles import (
    TREATMENT_KEY,
    ProfileError,
    ProfileTable,
    consensus,
    treatment_key,
)

REFERENCE_INDEX = "Metadata_reference_index"


@dataclass
class RetrievalSettings:
    """How profiles are paired and scored (the `profile.*` keys of the same names)."""

    treatment: list[str]
    controls_mask: np.ndarray | None = None
    annotations: list[str] = field(default_factory=list)
    null_size: int = 10000
    fdr: float = 0.05
    distance: str = "cosine"
    consistency_level: ConsistencyLevel = "treatment"
    consistency_active_only: bool = True
    seed: int = 0


@dataclass
class RetrievalResult:
    """Tables per treatment / annotation value, and the headline numbers (`summary`)."""

    activity: pd.DataFrame | None
    consistency: dict[str, pd.DataFrame]
    summary: dict
    notes: list[str] = field(default_factory=list)


def _quiet():
    """Silence copairs' warning per unpaired profile: the summary says what matters."""
    logging.getLogger("copairs").setLevel(logging.ERROR)
    return warnings.catch_warnings()


def _map_table(
    meta: pd.DataFrame,
    X: np.ndarray,
    sameby: str,
    pos_diffby: list[str],
    neg_diffby: list[str],
    s: RetrievalSettings,
    pos_sameby: list[str] | None = None,
) -> pd.DataFrame:
    """Copairs AP per row, then mAP per `sameby` value with p-values; sorted by mAP."""
    from copairs import map as cmap
    from copairs.matching import UnpairedException

    cols = [
        sameby,
        "mean_average_precision",
        "p_value",
        "corrected_p_value",
        "retrieved",
        "n_profiles",
    ]
    with _quiet():
        warnings.simplefilter("ignore")
        try:
            ap = cmap.average_precision(
                meta,
                X,
                pos_sameby=pos_sameby or [sameby],
                pos_diffby=pos_diffby,
                neg_sameby=[],
                neg_diffby=neg_diffby,
                distance=s.distance,
                progress_bar=False,
            )
        except UnpairedException:  # no two profiles share a value: nothing to retrieve
            return pd.DataFrame(columns=cols)
        ap = ap.dropna(subset=["average_precision"])
        if ap.empty:
            return pd.DataFrame(columns=cols)
        m = cmap.mean_average_precision(
            ap,
            [sameby],
            null_size=s.null_size,
            threshold=s.fdr,
            seed=s.seed,
            progress_bar=False,
            max_workers=1,
        )
    n = ap.groupby(sameby).size().rename("n_profiles")
    m = m.merge(n, left_on=sameby, right_index=True)
    m["retrieved"] = m["corrected_p_value"] < s.fdr
    return (
        m[cols]
        .sort_values(["mean_average_precision", sameby], ascending=[False, True], kind="stable")
        .reset_index(drop=True)
    )


def activity_map(t: ProfileTable, s: RetrievalSettings) -> pd.DataFrame:
    """The mAP per treatment of retrieving its replicate wells against the control wells."""
    frame = t.frame.reset_index(drop=True)
    ctrl = s.controls_mask
    if ctrl is None or not ctrl.any():
        raise ProfileError(
            "activity mAP needs control wells: set profile.controls (e.g. "
            "\"Metadata_treatment == 'DMSO'\")"
        )
    key = treatment_key(frame, s.treatment)
    meta = pd.DataFrame(
        {TREATMENT_KEY: key.to_numpy(), REFERENCE_INDEX: np.where(ctrl, np.arange(len(frame)), -1)}
    )
    cols = [TREATMENT_KEY, REFERENCE_INDEX]
    table = _map_table(meta, t.matrix(), TREATMENT_KEY, [], cols, s, pos_sameby=cols)
    table = table[~table[TREATMENT_KEY].isin(set(key[ctrl]))]
    return table.rename(columns={TREATMENT_KEY: "treatment"}).reset_index(drop=True)


def consistency_map(
    t: ProfileTable, column: str, s: RetrievalSettings, keep: set[str] | None = None
) -> pd.DataFrame:
    """The mAP per value of `column` of retrieving other treatments with the same value.

    Rows without a value and control rows are left out; `keep` restricts to those treatments.
    """
    frame = t.frame.reset_index(drop=True)
    if column not in frame.columns:
        meta = [str(c) for c in frame.columns if str(c).startswith("Metadata_")]
        raise ProfileError(
            f"profile.annotations: no column {column!r} in the profiles "
            f"(metadata columns: {', '.join(meta[:12])})"
        )
    key = treatment_key(frame, s.treatment)
    ok = frame[column].notna().to_numpy().copy()
    if s.controls_mask is not None and not s.controls_mask.all():
        ok &= ~s.controls_mask
    if keep is not None:
        ok &= key.isin(keep).to_numpy()
    sub = ProfileTable(frame[ok].reset_index(drop=True), list(t.features))
    ann = sub.frame[column].astype(str)
    if s.consistency_level == "treatment":
        sub = consensus(sub, s.treatment)
        meta = pd.DataFrame({column: sub.frame[column].astype(str).to_numpy()})
        return _map_table(meta, sub.matrix(), column, [], [column], s)
    meta = pd.DataFrame({column: ann.to_numpy(), TREATMENT_KEY: key[ok].to_numpy()})
    return _map_table(meta, sub.matrix(), column, [TREATMENT_KEY], [column], s)


def percent_replicating(t: ProfileTable, s: RetrievalSettings) -> float:
    """Fraction of treatments whose median replicate correlation beats the null's p95."""
    from copairs.replicating import correlation_test

    frame = t.frame.reset_index(drop=True)
    ctrl = s.controls_mask
    # controls are not a treatment; with no controls declared (or all wells) every well counts
    rows = ~ctrl if ctrl is not None and not ctrl.all() else np.ones(len(frame), bool)
    key = treatment_key(frame, s.treatment)[rows]
    if not key.duplicated().any():
        return float("nan")
    meta = pd.DataFrame({TREATMENT_KEY: key.to_numpy()})
    with _quiet():
        warnings.simplefilter("ignore")
        res = correlation_test(
            t.matrix()[rows], meta, [TREATMENT_KEY], [], n_samples=1000, progress_bar=False
        )
        return float(res.percent_score("right")[0])


def _retrieved_summary(table: pd.DataFrame) -> dict:
    """How many rows of a mAP table are retrieved, what fraction, and their mean mAP (NaN if none)."""
    n = len(table)
    return {
        "n_retrieved": int(table["retrieved"].sum()),
        "fraction_retrieved": float(table["retrieved"].mean()) if n else 0.0,
        "mean_map": float(table["mean_average_precision"].mean()) if n else float("nan"),
    }


def retrieval(t: ProfileTable, s: RetrievalSettings) -> RetrievalResult:
    """Activity (when there are controls), consistency per annotation, percent replicating."""
    if not s.treatment:
        raise ProfileError(
            "retrieval metrics need profile.treatment: the column(s) naming each "
            "well's treatment (e.g. [Metadata_broad_sample])"
        )
    notes = []
    has_controls = s.controls_mask is not None and 0 < s.controls_mask.sum() < len(t.frame)
    activity = activity_map(t, s) if has_controls else None
    if activity is None:
        notes.append("no activity mAP: profile.controls selects no control wells (or all wells)")
    summary: dict = {
        "n_profiles": len(t.frame),
        "n_features": len(t.features),
        "fdr": s.fdr,
        "null_size": s.null_size,
        "distance": s.distance,
    }
    keep = None
    if activity is not None:
        summary["activity"] = {"n_treatments": len(activity), **_retrieved_summary(activity)}
        if s.consistency_active_only:
            keep = set(activity.loc[activity["retrieved"], "treatment"])
    cons = {}
    for col in s.annotations:
        table = consistency_map(t, col, s, keep)
        cons[col] = table
        summary.setdefault("consistency", {})[col] = {
            "level": s.consistency_level,
            "active_only": keep is not None,
            "n_values": len(table),
            **_retrieved_summary(table),
        }
    summary["percent_replicating"] = percent_replicating(t, s)
    return RetrievalResult(activity, cons, summary, notes)
