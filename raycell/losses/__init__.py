"""Loss terms as small pure functions on model outputs; the training plans weight and combine them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_mse(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every pixel of the batch (Keras `mse` semantics of the reference)."""
    return F.mse_loss(recon.float(), x.float())


def label_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on a single logit (the reference's sigmoid head) or CE over K logits."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0].float(), y.float())
    return F.cross_entropy(logits.float(), y)


def label_prob(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities: (N,) positive-class probability for one logit, (N, K) softmax otherwise."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0].float())
    return torch.softmax(logits.float(), dim=1)


def cluster_ce(logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of batch (cluster) logits against a one-hot or soft design matrix z (N, n_batches)."""
    return -(z.float() * torch.log_softmax(logits.float(), dim=1)).sum(1).mean()
