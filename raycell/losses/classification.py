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


def confusion_ce(logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of batch logits against the uniform distribution, over rows with a known batch.

    The domain-confusion loss (Tzeng et al. 2015; Alvi et al. 2018): log(K) at its minimum, when the
    prediction is uniform over the K batches, whatever the true batch; rows of no training batch (all-zero
    z) are left out, as they carry nothing to hide.
    """
    known = z.sum(1) > 0
    if not known.any():
        return logits.sum() * 0.0
    return -F.log_softmax(logits[known].float(), dim=1).mean()


def batch_accuracy(logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Accuracy of batch logits against Z, over rows with a known batch (non-zero Z rows)."""
    known = z.sum(1) > 0
    if not known.any():
        return torch.zeros((), device=z.device)
    return (logits[known].argmax(1) == z[known].argmax(1)).float().mean()


def split_heads(logits: torch.Tensor, sizes: list[int] | tuple[int, ...]) -> list[torch.Tensor]:
    """The weak-label heads' logits, one (N, K_h) block per head, from their side-by-side (N, sum K_h)."""
    if logits.shape[1] != sum(sizes):
        raise ValueError(
            f"logits have {logits.shape[1]} columns but the heads have {list(sizes)} classes "
            f"(sum {sum(sizes)})"
        )
    return list(torch.split(logits, list(sizes), dim=1))


def heads_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    sizes: list[int] | tuple[int, ...],
    multilabel: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Weak-label loss: the sum over heads, and each head's term.

    y: (N, H) class codes. Softmax heads (default): one cross-entropy per head. `multilabel`: the blog's
    formulation, one sigmoid binary cross-entropy over the concatenated one-hot targets of all heads,
    reported per head as that head's block of the BCE (their sum is the objective).
    """
    blocks = split_heads(logits.float(), sizes)
    if not multilabel:
        terms = [F.cross_entropy(b, y[:, h]) for h, b in enumerate(blocks)]
    else:
        total = float(sum(sizes))
        terms = [
            F.binary_cross_entropy_with_logits(
                b, F.one_hot(y[:, h], b.shape[1]).float(), reduction="sum"
            )
            / (len(y) * total)
            for h, b in enumerate(blocks)
        ]
    return torch.stack(terms).sum(), terms


def heads_prob(logits: torch.Tensor, sizes: list[int] | tuple[int, ...]) -> list[torch.Tensor]:
    """Per-head class probabilities (softmax within each head; also used after multi-label training,
    where it ranks the classes of a head the same way the sigmoids do).
    """
    return [torch.softmax(b, dim=1) for b in split_heads(logits.float(), sizes)]
