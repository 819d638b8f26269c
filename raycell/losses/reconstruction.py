"""Reconstruction terms: the training MSE, and per-cell MSE and SSIM computed on the device.

`per_cell_mse` / `per_cell_ssim` give one value per cell (SSIM as `skimage.metrics.structural_similarity`
with a uniform 7x7 window, smaller for tiny crops, sample covariance, mean over channels): inference calls
them on the crops and reconstructions it already holds on the GPU instead of copying both back to the
CPU. They compute in float64, as skimage does: SSIM's variances are differences of means of squares,
which lose about three digits in float32 (checked against skimage in tests/test_losses.py and
tests/test_metrics.py). We do not
use torchmetrics' SSIM: it is not a dependency, pads the border instead of cropping it as skimage does,
and returns one mean over the batch, not one value per cell.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_mse(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every pixel of the batch (Keras `mse` semantics of the reference)."""
    return F.mse_loss(recon.float(), x.float())


def per_cell_mse(images: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """(N,) float64: per cell, the mean over channels and pixels of (image - recon)^2."""
    if images.shape != recons.shape:
        raise ValueError(
            f"images and recons have different shapes: {tuple(images.shape)} vs "
            f"{tuple(recons.shape)}"
        )
    d = images.double() - recons.double()
    return (d * d).flatten(1).mean(1)


def ssim_window(h: int, w: int, default: int = 7) -> int:
    """Largest odd window <= `default` that fits an (h, w) image (skimage: 7, less for tiny crops)."""
    win = min(default, h, w)
    if win % 2 == 0:
        win -= 1
    if win < 3:
        raise ValueError(f"images of size {h}x{w} are too small for SSIM (need >= 3x3)")
    return win


def per_cell_ssim(
    images: torch.Tensor, recons: torch.Tensor, data_range: float = 1.0
) -> torch.Tensor:
    """(N,) float64 per-cell SSIM of (N, C, H, W) crops, averaged over channels.

    skimage's `structural_similarity(..., channel_axis=0, data_range=data_range)` defaults: a uniform
    w x w window (`ssim_window`), sample covariance (w^2 / (w^2 - 1)), C1 = (0.01 L)^2, C2 = (0.03 L)^2,
    and the mean over pixels at least (w - 1) / 2 from the border. Those pixels' windows lie inside the
    image, so an unpadded `avg_pool2d` gives exactly skimage's cropped local means.
    """
    if images.shape != recons.shape:
        raise ValueError(
            f"images and recons have different shapes: {tuple(images.shape)} vs "
            f"{tuple(recons.shape)}"
        )
    n, c, h, w = images.shape
    win = ssim_window(h, w)
    x = images.double().reshape(n * c, 1, h, w)
    y = recons.double().reshape(n * c, 1, h, w)
    ux, uy, uxx, uyy, uxy = F.avg_pool2d(
        torch.cat([x, y, x * x, y * y, x * y], 1), win, stride=1
    ).unbind(1)
    cov_norm = win * win / (win * win - 1.0)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean((1, 2)).reshape(n, c).mean(1)
