"""Profiling figures (matplotlib, Agg): embeddings coloured by a label, per-head confusion matrices.

Each function returns the PNG as bytes (the HTML report embeds them) and, given a path, also writes
it atomically (`raycell export`, the report's PNG folder). The look follows raycell/plots.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from raycell.errors import UserError
from raycell.plots import pyplot
from raycell.utils.io import atomic_write_bytes

MAX_LEGEND = 20  # more categories: the legend lists the first ones and says how many are left
MAX_LEVELS = 12  # a number column with at most this many values gets one colour step per value


def _finish(plt, fig, title: str, path: str | Path | None) -> bytes:
    """Title, tight layout, PNG bytes; written to `path` too when given."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    png = buf.getvalue()
    if path is not None:
        atomic_write_bytes(path, png)
    return png


def _is_numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def scatter_by(
    coords: np.ndarray,
    values,
    title: str = "",
    path: str | Path | None = None,
    axis_labels: tuple[str, str] = ("PC1", "PC2"),
    max_points: int = 20000,
    seed: int = 0,
) -> bytes:
    """2-d coordinates coloured by `values`: a legend for categories, a colourbar for numbers.

    A number column with a few values (doses, times) gets one colour step per value, in order.

    Points are drawn in one random order (subsampled to `max_points`), so no category is hidden
    just because its rows come last. Missing values are grey.
    """
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise UserError(f"scatter_by: coordinates must have shape (N, 2), got {xy.shape}")
    vals = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values))
    vals = vals.reset_index(drop=True)
    if len(vals) != len(xy):
        raise UserError(f"scatter_by: {len(xy)} points but {len(vals)} colour values")
    idx = np.random.default_rng(seed).permutation(len(xy))[:max_points]
    xy, vals = xy[idx], vals.iloc[idx].reset_index(drop=True)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 4.8))
    size = 4 if len(xy) > 2000 else 10
    missing = vals.isna().to_numpy()
    keep = ~missing
    if missing.any():
        ax.scatter(
            xy[missing, 0], xy[missing, 1], s=size, alpha=0.4, color="lightgrey", label="missing"
        )
    if _is_numeric(vals):
        num = vals[keep].to_numpy(dtype=np.float64)
        levels = np.unique(num)
        name = vals.name if isinstance(vals.name, str) else None
        if 1 < len(levels) <= MAX_LEVELS:
            # A few levels (doses, times): one colour step per level, so log-spaced doses
            # (0, 0.1, 1, 10) do not crowd into one end of a linear colour scale.
            cmap = plt.get_cmap("viridis", len(levels))
            sc = ax.scatter(
                xy[keep, 0],
                xy[keep, 1],
                s=size,
                alpha=0.7,
                cmap=cmap,
                c=np.searchsorted(levels, num),
                vmin=-0.5,
                vmax=len(levels) - 0.5,
            )
            bar = fig.colorbar(sc, ax=ax, label=name, ticks=range(len(levels)))
            bar.ax.set_yticklabels([f"{v:g}" for v in levels])
        else:
            sc = ax.scatter(xy[keep, 0], xy[keep, 1], s=size, alpha=0.7, cmap="viridis", c=num)
            fig.colorbar(sc, ax=ax, label=name)
        if missing.any():
            ax.legend(markerscale=3, fontsize=7, loc="best")
    else:
        labels = vals[keep].map(str)
        cats = sorted(set(labels))
        cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
        code = {c: i for i, c in enumerate(cats)}
        # One call in the shuffled order, so no category is painted over the others wholesale.
        ax.scatter(
            xy[keep, 0], xy[keep, 1], s=size, alpha=0.6, c=[cmap(code[c] % cmap.N) for c in labels]
        )
        for i, c in enumerate(cats[:MAX_LEGEND]):  # legend entries only
            ax.scatter([], [], s=size, color=cmap(i % cmap.N), label=c)
        if len(cats) > MAX_LEGEND:
            ax.plot([], [], " ", label=f"... {len(cats) - MAX_LEGEND} more")
        if cats or missing.any():
            ax.legend(
                markerscale=3, fontsize=7, loc="best", ncol=1 + min(len(cats), MAX_LEGEND) // 12
            )
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    return _finish(plt, fig, title, path)


def confusion_figure(entry: dict, title: str = "", path: str | Path | None = None) -> bytes:
    """A head's confusion matrix: rows = truth, colour = share of the row, counts written in.

    `entry` is one value of `raycell.profiling.profiles.head_metrics`.
    """
    try:
        conf = np.asarray(entry["confusion"], dtype=np.int64)
        classes = [str(c) for c in entry["classes"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"confusion_figure: not a head_metrics entry ({exc})") from None
    k = len(classes)
    if conf.shape != (k, k):
        raise UserError(f"confusion_figure: confusion has shape {conf.shape} for {k} classes")
    rows = conf.sum(axis=1, keepdims=True)
    share = np.divide(conf, rows, out=np.zeros(conf.shape, dtype=np.float64), where=rows > 0)
    plt = pyplot()
    side = min(3.2 + 0.45 * k, 14)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="share of true class", fraction=0.046, pad=0.04)
    if k <= 20:  # counts stay readable up to about 20 classes
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(conf[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc, bal = entry.get("accuracy"), entry.get("balanced_accuracy")
    if acc is not None and bal is not None:
        ax.set_title(
            f"accuracy {acc:.2f}, balanced {bal:.2f}, n={entry.get('n', conf.sum())}", fontsize=9
        )
    return _finish(plt, fig, title, path)


def map_figure(
    table: pd.DataFrame,
    label: str,
    title: str = "",
    path: str | Path | None = None,
    max_rows: int = 60,
) -> bytes:
    """Bars of the mAP per treatment (or annotation value), sorted, retrieved ones dark.

    Args:
        table: copairs' per-group table as `raycell profile` writes it (`label`,
            `mean_average_precision`, `retrieved`).
        label: the column naming each bar.
        title: the figure's title.
        path: also write the PNG there.
        max_rows: more rows: the best and worst halves are drawn, the middle left out.
    """
    plt = pyplot()
    t = table.sort_values("mean_average_precision", ascending=False, kind="stable")
    if len(t) > max_rows:
        t = pd.concat([t.head(max_rows // 2), t.tail(max_rows // 2)])
    n = len(t)
    fig, ax = plt.subplots(figsize=(7.5, max(2.0, 0.2 * n + 1.0)))
    y = np.arange(n)
    ret = t["retrieved"].astype(bool).to_numpy()
    ax.barh(y, t["mean_average_precision"], color=np.where(ret, "#1f6fb4", "#b8c7d6"))
    ax.set_yticks(y)
    ax.set_yticklabels([str(v)[:40] for v in t[label]], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("mAP (dark: retrieved, BH-corrected p below the FDR)")
    return _finish(plt, fig, title, path)
