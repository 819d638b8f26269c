"""Figures (matplotlib, saved to files only), shared by every stage: the backend, saving, PCA of
latents by label and by batch, training curves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """Matplotlib's pyplot on the file-only Agg backend (no display is ever opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: str | Path, title: str | None, tight: bool = True) -> Path:
    """Title, lay out (`tight`: matplotlib's tight layout), write and close `fig`; returns its path."""
    if title is not None:
        fig.suptitle(title)
    if tight:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def channel_stretch(imgs: np.ndarray) -> np.ndarray:
    """Per-channel 99.5th percentile of (N, C, H, W) crops (never zero)."""
    return np.maximum(np.percentile(imgs.astype(np.float32), 99.5, axis=(0, 2, 3)), 1e-6)


_PALETTE = np.array(
    [[0.2, 0.4, 1.0], [0.2, 1.0, 0.2], [1.0, 0.25, 0.25], [1.0, 0.2, 1.0], [1.0, 1.0, 0.2]],
    np.float32,
)


def composite_rgb(imgs: np.ndarray, hi: np.ndarray | None = None) -> np.ndarray:
    """(N, C, H, W) crops -> (N, H, W, 3) RGB in [0, 1], channels as additive colours (`_PALETTE`).

    Each channel is divided by `hi` (default: its 99.5th percentile over these crops); one channel is
    grey. Shared by the ingest montage and the report's crop grids, which pass one `hi` to show
    reconstructions on their originals' scale.
    """
    x = imgs.astype(np.float32)
    if hi is None:
        hi = channel_stretch(x)
    x = np.clip(x / hi[None, :, None, None], 0, 1)
    if x.shape[1] == 1:
        rgb = np.repeat(x, 3, axis=1)
    else:
        pal = _PALETTE[np.arange(x.shape[1]) % len(_PALETTE)]
        rgb = np.clip(np.einsum("nchw,ck->nkhw", x, pal), 0, 1)
    return rgb.transpose(0, 2, 3, 1)


def pca_plot(
    latents: np.ndarray,
    labels: np.ndarray,
    batches: np.ndarray,
    path: str | Path,
    title: str = "",
    max_points: int = 5000,
    seed: int = 0,
) -> Path:
    """Two panels of the first two principal components, coloured by label and by batch; saved as PNG."""
    from sklearn.decomposition import PCA

    plt = pyplot()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(latents))[:max_points]
    pcs = PCA(n_components=2, random_state=seed).fit(latents[idx])
    xy = pcs.transform(latents[idx])
    ev = pcs.explained_variance_ratio_
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, values, name in ((axes[0], labels[idx], "label"), (axes[1], batches[idx], "batch")):
        cats = sorted(set(values.tolist()))
        cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
        for i, c in enumerate(cats):
            m = values == c
            ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.6, color=cmap(i % cmap.N), label=str(c))
        ax.set_xlabel(f"PC1 ({ev[0]:.0%})")
        ax.set_ylabel(f"PC2 ({ev[1]:.0%})")
        ax.set_title(f"by {name}")
        ax.legend(markerscale=3, fontsize=7, loc="best", ncol=1 + len(cats) // 12)
    return save_figure(plt, fig, path, title)


def training_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Losses (left) and model-selection metrics (right) per epoch from a run's metrics history.

    Right panel: val AUROC, and where recorded the held-out validation batches' AUROC (`valbatch_auroc`),
    the composite `val_composite` and the val latents' batch-probe accuracy. An epoch lacking a key is a
    gap in its line.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ep = [h["epoch"] for h in history]

    def _series(key):
        return [h.get(key, float("nan")) for h in history]

    for key in ("train_loss", "val_loss", "valbatch_loss", "train_mse", "val_mse"):
        if any(key in h for h in history):
            axes[0].plot(ep, _series(key), marker="o", label=key)
    axes[0].set_xlabel("epoch")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    shown = [
        k
        for k in ("val_auroc", "valbatch_auroc", "val_composite", "val_batch_probe")
        if any(k in h for h in history)
    ]
    for key in shown:
        axes[1].plot(ep, _series(key), marker="o", label=key)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("val AUROC" if shown == ["val_auroc"] else "model selection")
    if len(shown) > 1:
        axes[1].legend(fontsize=8)
    return save_figure(plt, fig, path, title)
