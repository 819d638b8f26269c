"""Loss terms as small pure functions, and the typed model and loss outputs.

* `outputs.py`: `ModelOutput` (what every model's forward returns) and `LossOutput` (what every plan's
  loss returns);
* `reconstruction.py`: the training MSE and per-cell MSE / SSIM on the device (inference);
* `classification.py`: the phenotype loss and probabilities, the batch cross-entropy and accuracy;
* `alignment.py`: the between-batch spread of the latent within each phenotype (`loss.align`).

The training plans (`raycell/plans.py`) weight and combine the terms.
"""

from raycell.forward import OPTIONAL_OUTPUTS, LossOutput, ModelOutput
from raycell.losses.alignment import batch_mean_gap
from raycell.losses.classification import (
    batch_accuracy,
    cluster_ce,
    confusion_ce,
    heads_loss,
    heads_prob,
    label_loss,
    label_prob,
    split_heads,
)
from raycell.losses.reconstruction import per_cell_mse, per_cell_ssim, reconstruction_mse

__all__ = [
    "OPTIONAL_OUTPUTS",
    "LossOutput",
    "ModelOutput",
    "batch_accuracy",
    "batch_mean_gap",
    "cluster_ce",
    "confusion_ce",
    "heads_loss",
    "heads_prob",
    "label_loss",
    "label_prob",
    "per_cell_mse",
    "per_cell_ssim",
    "reconstruction_mse",
    "split_heads",
]
