"""Batch-effect augmentation on the device: make each training cell look as if imaged in another batch.

A model can only use the imaging batch as a shortcut if the batch is visible in the pixels. Randomising
what batch effects do (gain, offset, gamma, blur, noise, a smooth background, channel crosstalk) per
cell during training removes that signal from the training images, a standard domain-randomisation
lever against the batch shortcut. Everything is vectorised over the batch and runs
where the batch already is (GPU or CPU); parameters come from a seeded `torch.Generator`, so a step is
reproducible. Images are float in [0, 1] (after `DataSpec.to_float`) and stay in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# name -> what it does, at strength 1 (the config help lists these)
AUGMENTATIONS = {
    "gain": "per-cell, per-channel multiplicative gain exp(U(-0.3, 0.3))",
    "offset": "per-cell, per-channel additive offset U(-0.05, 0.05)",
    "gamma": "per-cell power law x ** exp(U(-0.3, 0.3))",
    "blur": "Gaussian blur, sigma U(0, 1.2) px, on half the cells",
    "noise": "Gaussian noise, sd U(0, 0.03)",
    "background": "a smooth additive background (a 4x4 random grid, upsampled), amplitude U(0, 0.1)",
    "mix": "channel crosstalk: each channel gets U(0, 0.15) of the others' mean",
}
# Geometric augmentations that suit cells (no preferred orientation): named on their own, not in 'all'
# (which is the batch effects), e.g. train.augment=flip,rot90,gain for the weak-label backbones.
GEOMETRIC = {
    "flip": "mirror half of the cells left-right",
    "rot90": "rotate each cell by a random multiple of 90 degrees (square crops)",
}


def parse_augment(spec: str) -> tuple[str, ...]:
    """`train.augment` ('' = none, 'all', or a comma list) -> augmentation names, in a fixed order.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if "all" in names:  # every batch effect, plus any geometric one named beside it
        names = [n for n in names if n != "all"] + list(AUGMENTATIONS)
    known = {**GEOMETRIC, **AUGMENTATIONS}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(
            f"unknown augmentation(s) {bad}; valid: all (the batch effects), {', '.join(known)}"
        )
    return tuple(n for n in known if n in names)


def _u(gen: torch.Generator, shape, lo: float, hi: float, device) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, device=gen.device) * (hi - lo) + lo).to(device)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-cell Gaussian blur: separable kernels of size 7, one sigma per cell (0 = unchanged)."""
    n, c, h, w = x.shape
    r = torch.arange(-3, 4, device=x.device, dtype=x.dtype)
    s = sigma.clamp(min=1e-3).view(n, 1)
    k = torch.exp(-0.5 * (r.view(1, -1) / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # (n, 7); sigma ~0 gives a delta kernel
    kx = k.repeat_interleave(c, 0).view(n * c, 1, 1, 7)
    ky = k.repeat_interleave(c, 0).view(n * c, 1, 7, 1)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), kx, groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), ky, groups=n * c)
    return y.view(n, c, h, w)


def augment_batch(
    x: torch.Tensor, names: tuple[str, ...], gen: torch.Generator, strength: float = 1.0
) -> torch.Tensor:
    """`x` (N, C, H, W) float in [0, 1] with the named batch effects drawn per cell; a new tensor.

    Args:
        x: the batch, on any device.
        names: augmentations to apply (`parse_augment`), in this order.
        gen: the random source (its device may differ from x's: parameters are drawn there and moved).
        strength: scales every range (0 = unchanged).
    """
    if not names or strength <= 0:
        return x
    n, c, h, w = x.shape
    s, dev = float(strength), x.device
    x = x.float()
    if "flip" in names:
        x = torch.where((_u(gen, (n, 1, 1, 1), 0, 1, dev) < 0.5), x.flip(-1), x)
    if "rot90" in names:
        k = (
            _u(gen, (n,), 0, 4, dev).long().clamp(max=3)
            if h == w
            else 2 * (_u(gen, (n,), 0, 2, dev).long().clamp(max=1))
        )  # 180 degrees only if not square
        rots = torch.stack(
            [torch.rot90(x, r, dims=(2, 3)) if r % 2 == 0 or h == w else x for r in range(4)]
        )  # (4, N, C, H, W): pick one per cell
        x = rots[k, torch.arange(n, device=dev)]
    if "mix" in names and c > 1:
        m = _u(gen, (n, c, 1, 1), 0, 0.15 * s, dev)
        others = (x.sum(1, keepdim=True) - x) / (c - 1)
        x = (1 - m) * x + m * others
    if "background" in names:
        grid = _u(gen, (n, c, 4, 4), 0, 1, dev)
        bg = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True).clamp(0, 1)
        x = x + _u(gen, (n, 1, 1, 1), 0, 0.1 * s, dev) * bg
    if "blur" in names:
        sigma = _u(gen, (n,), 0, 1.2 * s, dev) * (_u(gen, (n,), 0, 1, dev) < 0.5)
        x = _blur(x, sigma)
    if "gain" in names:
        x = x * torch.exp(_u(gen, (n, c, 1, 1), -0.3 * s, 0.3 * s, dev))
    if "offset" in names:
        x = x + _u(gen, (n, c, 1, 1), -0.05 * s, 0.05 * s, dev)
    if "gamma" in names:
        x = x.clamp(0, 1) ** torch.exp(_u(gen, (n, 1, 1, 1), -0.3 * s, 0.3 * s, dev))
    if "noise" in names:
        sd = _u(gen, (n, 1, 1, 1), 0, 0.03 * s, dev)
        x = x + sd * torch.randn(x.shape, generator=gen, device=gen.device).to(dev)
    return x.clamp(0, 1)
