"""The conventional autoencoder-classifier (ARMED `BaseAutoencoderClassifier`, spec/armed-aec.md 2.1).

Encoder of k4 conv blocks -> Dense latent + BatchNorm; a decoder tied to the encoder's kernels; a small
classifier head on the latent. Sizes come from a preset (`armed`: the reference's 256 px / 56-d latent;
`small`: 64 px for CPUs and tests), any field of which can be overridden.
"""

from __future__ import annotations

import torch
from torch import nn

from raycell.constants import ModelPreset
from raycell.forward import ModelOutput
from raycell.models.layers import AuxClassifier, ConvEncoder, TiedDecoder, glorot_init
from raycell.models.registry import register_model
from raycell.plans import TrainingPlan

PRESETS: dict[ModelPreset, dict] = {
    # The reference: 256x256 input, 6 blocks, 56-d latent (spec/armed-aec.md 2.1).
    "armed": {
        "image_size": 256,
        "filters": [64, 64, 64, 128, 256, 512],
        "strides": [1, 1, 1, 2, 2, 2],
        "latent_dim": 56,
    },
    # Same shape of network, ~100x fewer FLOPs: 64 px crops on a CPU.
    "small": {
        "image_size": 64,
        "filters": [16, 32, 32, 64],
        "strides": [1, 2, 2, 2],
        "latent_dim": 32,
    },
    # Tests: 32 px crops.
    "tiny": {"image_size": 32, "filters": [8, 16, 16], "strides": [1, 2, 2], "latent_dim": 8},
}


def resolve_preset(preset: str, **overrides) -> dict:
    """Preset values with non-None overrides applied; unknown presets raise with the list."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; presets: {', '.join(PRESETS)}")
    out = dict(PRESETS[preset])
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out


def n_label_outputs(n_classes: int) -> int:
    """Binary labels use one logit (BCE, as the reference); more classes use one logit per class."""
    return 1 if n_classes == 2 else n_classes


class AutoencoderClassifier(nn.Module):
    """Conventional AEC: forward returns latent, reconstruction and phenotype logits."""

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        image_size: int,
        filters: list[int],
        strides: list[int],
        latent_dim: int,
        classifier_hidden: int = 32,
        output_mean: list[float] | None = None,
    ):
        super().__init__()
        self.latent_dim = self.num_features = latent_dim
        self.n_classes = n_classes
        self.encoder = ConvEncoder(in_channels, image_size, filters, strides, latent_dim)
        self.decoder = TiedDecoder(self.encoder, latent_dim)
        self.classifier = AuxClassifier(latent_dim, n_label_outputs(n_classes), classifier_hidden)
        glorot_init(self)
        self.decoder.init_output(output_mean)

    def encode(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Latent representation (N, latent_dim); `z` (batch design matrix) is unused here."""
        return self.encoder(x)[0]

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> ModelOutput:
        """X (N, C, H, W) in [0, 1] -> latent, recon, logits; `z` is unused."""
        latent, _ = self.encoder(x)
        return ModelOutput(
            latent=latent, recon=self.decoder(latent), logits=self.classifier(latent)
        )


@register_model("conventional", plan=TrainingPlan)
def conventional(
    in_channels: int,
    n_classes: int,
    n_batches: int = 1,
    preset: str = "small",
    image_size: int | None = None,
    filters: list[int] | None = None,
    strides: list[int] | None = None,
    latent_dim: int | None = None,
    classifier_hidden: int = 32,
    output_mean: list[float] | None = None,
) -> AutoencoderClassifier:
    """Conventional AEC (no batch modelling). `n_batches` is accepted for a uniform builder signature.

    `output_mean` (per-channel mean intensity in [0, 1], from the data set manifest) initialises the
    output layer so the first reconstructions have the data's brightness instead of 0.5.
    """
    p = resolve_preset(
        preset, image_size=image_size, filters=filters, strides=strides, latent_dim=latent_dim
    )
    return AutoencoderClassifier(
        in_channels, n_classes, classifier_hidden=classifier_hidden, output_mean=output_mean, **p
    )
