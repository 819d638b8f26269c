"""The between-batch spread of the latent within each phenotype: what a linear batch probe reads.

An adversary is an online classifier: an encoder can keep moving the batch to where the current
adversary does not look, and a probe fitted afterwards finds it again (Elazar & Goldberg, EMNLP 2018,
"Adversarial removal of demographic attributes from text data"). A linear probe separates batches by
their mean latents; making the batches' means equal, class by class, removes that directly with no
second player. Within a class, because phenotype and batch are often confounded: equal means over all
cells would also remove the phenotype.
"""

from __future__ import annotations

import torch


def batch_mean_gap(latent: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Share of the latent's variance that the batch explains within each phenotype, in a minibatch.

    For each label with cells of >= 2 batches: sum over its batches of n_b * ||mean_b - mean||^2 over the
    label's total variance (both on the latent z-scored over the minibatch, so shrinking the latent
    does not lower it); averaged over labels weighted by their cells. 0: every batch has the same mean
    latent within every label; 1: the batch is all there is.

    Args:
        latent: (N, D) the latent the batch is removed from.
        y: (N,) phenotype labels (class indices or 0/1), or (N, K) one-hot / multi-label rows (argmax).
        z: (N, n_batches) one-hot batch design; rows of no training batch (all zero) are left out.

    Returns:
        () the weighted share, 0 where no label has two batches in the minibatch.
    """
    h = latent.float()
    h = (h - h.mean(0)) / (h.std(0) + 1e-6)
    lab = (y.argmax(1) if y.ndim > 1 else y.round()).long()
    known = z.sum(1) > 0
    total, weight = h.new_zeros(()), 0
    for c in torch.unique(lab[known]):
        sel = known & (lab == c)
        onehot = z[sel].float()
        n_b = onehot.sum(0)
        present = n_b > 0
        if int(present.sum()) < 2:
            continue
        hc = h[sel]
        mean = hc.mean(0)
        means = (onehot.T @ hc)[present] / n_b[present, None]  # (batches present, D)
        between = (n_b[present, None] * (means - mean) ** 2).sum()
        overall = ((hc - mean) ** 2).sum() + 1e-6
        total = total + between / overall * int(sel.sum())
        weight += int(sel.sum())
    return total / weight if weight else total
