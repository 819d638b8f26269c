"""Figures only the report draws: crop grids (per class; originals above reconstructions).

Training curves and the latent PCA come from `raycell.plots`, the embeddings' scatter plots
and confusion matrices from `raycell.profiling.figures`, so a figure looks the same in the report as
where it is first made. Everything is saved to a PNG file (matplotlib, Agg).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raycell.plots import channel_stretch, composite_rgb, pyplot, save_figure


def _blocks(
    blocks: list[tuple[str, list[tuple[str, np.ndarray]]]],
    per_row: int,
    path: str | Path,
    title: str,
) -> Path:
    """Blocks of labelled crop rows, `per_row` blocks side by side, saved as a PNG.

    Each block is (heading, rows), each row (label, (n, H, W, 3) RGB). Axes are placed in inches
    (`add_axes`), not by a tight layout, which let the figure title run into the first heading and
    squeezed the rows of square images together.
    """
    plt = pyplot()
    cell, gap, left, top, spacer = 1.1, 0.1, 1.0, 0.55, 0.8  # inches
    head = 0.3 if any(name for name, _ in blocks) else 0.0
    n_rows = max(len(rows) for _, rows in blocks)
    k = max(len(rgb) for _, rows in blocks for _, rgb in rows)
    bc = min(per_row, len(blocks))
    br = -(-len(blocks) // bc)
    block_w, block_h = k * (cell + gap), head + n_rows * (cell + gap)
    width = left + bc * block_w + (bc - 1) * spacer + 0.1
    height = top + br * (block_h + 0.15) + 0.1
    fig = plt.figure(figsize=(width, height))
    for b, (name, rows) in enumerate(blocks):
        x0 = left + (b % bc) * (block_w + spacer)
        y0 = top + (b // bc) * (block_h + 0.15)  # from the top
        if name:
            fig.text(
                x0 / width, 1 - (y0 + head * 0.75) / height, name, fontsize=9, fontweight="bold"
            )
        for r, (label, rgb) in enumerate(rows):
            y = y0 + head + r * (cell + gap) + cell
            for c in range(len(rgb)):
                ax = fig.add_axes(
                    ((x0 + c * (cell + gap)) / width, 1 - y / height, cell / width, cell / height)
                )
                ax.imshow(rgb[c], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                for sp in ax.spines.values():
                    sp.set_visible(False)
            fig.text(
                (x0 - 0.1) / width,
                1 - (y - cell / 2) / height,
                label,
                fontsize=8,
                ha="right",
                va="center",
            )
    fig.suptitle(title, y=1 - 0.12 / height, va="top")  # the montage places its own axes
    return save_figure(plt, fig, path, None, tight=False)


def crops_by_class(
    imgs: np.ndarray, labels: np.ndarray, path: str | Path, title: str = "", per_class: int = 8
) -> Path:
    """A row of up to `per_class` crops for each label value (one shared colour stretch)."""
    hi = channel_stretch(imgs)
    rows = []
    for value in sorted(set(labels.tolist()), key=str):
        idx = np.flatnonzero(labels == value)[:per_class]
        rows.append(("", [(str(value), composite_rgb(imgs[idx], hi))]))
    return _blocks(rows, 1, path, title)


def recon_grid(
    originals: np.ndarray,
    recons: np.ndarray,
    batches: np.ndarray,
    path: str | Path,
    title: str = "",
) -> Path:
    """Per imaging batch, a row of original crops above a row of their reconstructions.

    Both are (N, C, H, W) floats in [0, 1], shown with the originals' colour stretch, so a
    washed-out or over-bright reconstruction looks it. Two batches side by side when there are
    more than two.
    """
    hi = channel_stretch(originals)
    blocks = []
    for b in sorted(set(batches.tolist()), key=str):
        idx = np.flatnonzero(batches == b)
        blocks.append(
            (
                str(b),
                [
                    ("original", composite_rgb(originals[idx], hi)),
                    ("reconstr.", composite_rgb(recons[idx], hi)),
                ],
            )
        )
    return _blocks(blocks, 2 if len(blocks) > 2 else 1, path, title)
