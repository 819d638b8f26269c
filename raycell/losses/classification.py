"""Classification terms: the phenotype loss and probabilities, and the batch (cluster) cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """Cross-entropy of batch (cluster) logits against a one-hot or soft design matrix z (N, n_batches).

    `F.cross_entropy` with probability targets: -sum(z * log_softmax(logits)) averaged over rows; an
    all-zero row (a cell of no training batch) adds 0 and still counts in the mean.
    """
    return F.cross_entropy(logits.float(), z.float())


def batch_accuracy(logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Accuracy of batch logits against Z, over rows with a known batch (non-zero Z rows)."""
    known = z.sum(1) > 0
    if not known.any():
        return torch.zeros((), device=z.device)
    return (logits[known].argmax(1) == z[known].argmax(1)).float().mean()
