"""The report of a profile folder (`raycell profile`, `raycell evaluate --profiles`).

A table of the headline numbers (retrieval.json), the activity mAP per treatment, sorted, retrieved
ones marked, with its bar plot, and one table and plot per consistency annotation. Kept apart from
build.py, which only recognises the folder and calls `profile_report`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from raycell.report.page import Figure, Section, html_table, markdown_table

CAPTIONS = {
    "summary": (
        "Retrieval metrics computed by copairs. Activity: how well each treatment's replicate "
        "wells are retrieved against the control wells (mean average precision, mAP); a "
        "treatment is retrieved when its permutation p-value, Benjamini-Hochberg corrected, is "
        "below the FDR. Consistency: how well treatments sharing an annotation (mechanism, "
        "target, dose) retrieve each other. Percent replicating: treatments whose median "
        "replicate correlation exceeds the 95th percentile of non-replicate correlations."
    ),
    "activity": (
        "mAP per treatment against the controls, best first; ✓ marks the retrieved ones. A "
        "treatment whose wells look like the controls scores near the fraction of replicates "
        "among the ranked wells; 1 means every replicate ranks above every control."
    ),
    "consistency": (
        "mAP per value of {col}: how well treatments sharing it retrieve each other against "
        "those that do not; ✓ marks values with a corrected p-value below the FDR."
    ),
    "comparison": (
        "The same wells scored after each batch correction: raw features, each plate normalised "
        "against its controls, Harmony on the principal components, or both. Higher mAP and "
        "fraction retrieved are better; batch silhouette and iLISI (normalised) near 1 mean the "
        "batches are mixed, a batch-probe accuracy near chance means the batch cannot be read "
        "off the profiles."
    ),
}


def _rows(t: pd.DataFrame, label: str) -> list[list]:
    return [
        [
            str(r[label]),
            float(r["mean_average_precision"]),
            float(r["p_value"]),
            float(r["corrected_p_value"]),
            "✓" if bool(r["retrieved"]) else "",
            int(r["n_profiles"]),
        ]
        for _, r in t.iterrows()
    ]


def _table_section(t: pd.DataFrame, label: str, title: str, caption: str, ctx, png: str) -> Section:
    from raycell.profiling.figures import map_figure

    t = t.sort_values("mean_average_precision", ascending=False, kind="stable")
    path = ctx.png(png)
    map_figure(t, label, title, path=path)
    table = html_table(
        [label, "mAP", "p-value", "corrected p", "retrieved", "profiles"], _rows(t, label)
    )
    return Section(title, caption, figures=[Figure(path, title)], tables=[table])


def profile_report(folder: Path, ctx):
    """(title, header, sections) of a profile folder, for `raycell.report.build`."""
    from raycell.profiling.profile_folder import ACTIVITY, RETRIEVAL, consistency_file

    man = json.loads((folder / "profile.json").read_text())
    settings = man.get("settings") or {}
    sections = []
    summary = {}
    if (folder / RETRIEVAL).is_file():
        summary = json.loads((folder / RETRIEVAL).read_text())
        rows = []
        a = summary.get("activity")
        if a:
            rows.append(
                [
                    "activity (vs controls)",
                    a["n_treatments"],
                    a["n_retrieved"],
                    a["fraction_retrieved"],
                    a["mean_map"],
                ]
            )
        for col, c in (summary.get("consistency") or {}).items():
            rows.append(
                [
                    f"consistency: {col}",
                    c["n_values"],
                    c["n_retrieved"],
                    c["fraction_retrieved"],
                    c["mean_map"] if c["mean_map"] is not None else float("nan"),
                ]
            )
        pr = summary.get("percent_replicating")
        notes = [
            f"percent replicating: {pr:.3f}"
            if pr is not None
            else "percent replicating: not defined (no treatment has two wells)"
        ]
        sections.append(
            Section(
                "Retrieval summary",
                CAPTIONS["summary"],
                tables=[
                    html_table(
                        ["metric", "groups", "retrieved", "fraction retrieved", "mean mAP"], rows
                    )
                ],
                notes=notes,
            )
        )
    if (folder / ACTIVITY).is_file():
        t = pd.read_csv(folder / ACTIVITY)
        if len(t):
            sections.append(
                _table_section(
                    t,
                    "treatment",
                    "Phenotypic activity: mAP per treatment",
                    CAPTIONS["activity"],
                    ctx,
                    "activity_map",
                )
            )
    for col in settings.get("annotations") or []:
        f = folder / consistency_file(col)
        if f.is_file():
            t = pd.read_csv(f)
            if len(t):
                sections.append(
                    _table_section(
                        t,
                        col,
                        f"Phenotypic consistency: {col}",
                        CAPTIONS["consistency"].format(col=col),
                        ctx,
                        f"consistency_{col}",
                    )
                )
    if (folder / "comparison.md").is_file():
        table, _ = markdown_table((folder / "comparison.md").read_text())
        sections.append(
            Section("Batch corrections compared", CAPTIONS["comparison"], tables=[table])
        )
    header = {
        "folder": str(folder),
        "what": "profiles (raycell profile)",
        "input": str(man.get("input", "")),
        "profiles": str(man.get("n_profiles", "")),
        "features": str(man.get("n_features", "")),
        "controls": str(settings.get("controls") or "all wells"),
        "normalisation": str(settings.get("normalize", "")),
        "treatment": ", ".join(settings.get("treatment") or []),
        "FDR": str(summary.get("fdr", settings.get("fdr", ""))),
    }
    if man.get("notes"):
        header["steps"] = "; ".join(man["notes"])
    return f"raycell profile report: {folder.name}", header, sections
