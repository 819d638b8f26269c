"""The ARMED model family beyond the conventional AEC (spec/armed-aec.md sections 2.2-2.6).

* `adversarial` (DA-AEC, 2.2): the conventional AEC plus an adversary that reads every encoder
  block's output and the latent and predicts the imaging batch (ẑ_A). The training plan alternates
  adversary and main steps; the main objective subtracts the adversary's loss (raycell/plans.py).
* `randomeffects` (domain-enhancing AEC, 2.3): an encoder and an *untied* decoder whose
  normalisation layers are `ClusterScaleBias` blocks (instance norm x (1 + gamma(z)) + beta(z),
  variational per-batch weights); a latent head that predicts the phenotype and the batch (ẑ_L);
  an image classifier that predicts the batch from the reconstruction (ẑ_I).
* `mixedeffects` (ARMED-AEC as drawn in the paper's figure, 2.5): a fixed-effects DA-AEC and a
  random-effects AEC side by side, and a mixing head on both latents giving the mixed prediction
  ŷ_M.
* `zpredictor` (2.6): the `ImageClassifier` network (2.3) alone, trained on the training images to
  predict their imaging batch; its softmax on cells of unseen batches is their soft design matrix Z
  (`raycell infer-z`, `raycell.zpredictor`). A classifier with one weak-label head, the batch
  column over the training batches: trained by the one loop with `ZPredictorPlan` (NAdam, softmax
  cross-entropy), no reconstruction; its latent is the last conv block's output, flattened.

Registered with their training plans (`raycell/plans.py`); `ModelOutput` fields they fill (every model
also fills `latent`, `recon`, `logits`):

| field | adversarial | randomeffects | mixedeffects |
|---|---|---|---|
| `latent` | e (BN latent) | e_R | e_F (the FE latent, whose batch-mixing the metrics measure) |
| `latent_re` | - | - | e_R |
| `recon` | X̂ | X̂_R | X̂_R (see below) |
| `recon_fe` | - | - | X̂_F |
| `logits` | ŷ | ŷ (target branch of the latent head) | ŷ_M (mixing head) |
| `logits_fe` | - | - | ŷ_F |
| `batch_logits` | ẑ_A | - | ẑ_A |
| `cluster_logits` | - | ẑ_L | ẑ_L |
| `cluster_image_logits` | - | ẑ_I = ImageClassifier(X̂_R) | ẑ_I |
| `kl` | - | KL(q(U) || p(U)) | KL of the RE subnetwork |

The networks these models are built from live in `layers.py` (encoder, tied decoder, heads, `Adversary`,
`ImageClassifier`) and `random_effects.py` (random-effects layers, encoder, decoder, latent heads).

Choices the reference leaves open, and what we chose:

* **Mixing head** (absent from the reference code): concat[e_F, e_R] -> Dense(32) ->
  LeakyReLU(0.3) -> Dense(1); 32 matches the other heads. It is trained jointly with both
  subnetworks.
* **Which reconstruction `recon` is for mixedeffects:** X̂_R, the random-effects reconstruction, as
  the spec reads Table V's ARMED seen MSE (0.0012, below the conventional 0.0019); X̂_F is
  `recon_fe`.
* **ME phenotype heads:** the figure has ŷ_F on the FE latent and ŷ_M from the mixing head; the RE
  subnetwork has no phenotype branch of its own there (its latent reaches ŷ only via the mixer).
* **A missing z** (None) is an all-zero design matrix: the random effects vanish (unseen batch, no
  Z).
"""

from __future__ import annotations

import torch
from torch import nn

from raycell import constants as K
from raycell.forward import ModelOutput
from raycell.models.aec import AutoencoderClassifier, n_label_outputs, resolve_preset
from raycell.models.layers import (
    Adversary,
    AuxClassifier,
    ImageClassifier,
    LatentAdversary,
    TiedDecoder,
    block_sizes,
    glorot_init,
)
from raycell.models.random_effects import (
    LatentClassifier,
    RandomEffectsDecoder,
    RandomEffectsEncoder,
    design_matrix,
    mean_kl,
)
from raycell.models.registry import register_model
from raycell.plans import AdversarialPlan, MixedEffectsPlan, RandomEffectsPlan, ZPredictorPlan


class DomainAdversarialAEC(AutoencoderClassifier):
    """DA-AEC: the conventional AEC plus an adversary on the encoder's outputs (ẑ_A)."""

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        n_batches: int,
        image_size: int,
        filters: list[int],
        strides: list[int],
        latent_dim: int,
        classifier_hidden: int = 32,
        output_mean: list[float] | None = None,
        adversary_filters: list[int] | None = None,
        adversary_hidden: int = 512,
        adversary_reads: str = "all",
        decoder_batch: bool = False,
        adversary_standardize: bool = False,
    ):
        super().__init__(
            in_channels,
            n_classes,
            image_size,
            filters,
            strides,
            latent_dim,
            classifier_hidden,
            output_mean,
        )
        self.n_batches = n_batches
        self.decoder_batch = decoder_batch
        if (
            decoder_batch
        ):  # the decoder reads [latent, Z]: the batch's look need not be in the latent
            self.decoder = TiedDecoder(self.encoder, latent_dim + n_batches)
            glorot_init(self.decoder)
            self.decoder.init_output(output_mean)
        if adversary_reads == "latent":
            self.adversary = LatentAdversary(
                latent_dim, n_batches, adversary_hidden, standardize=adversary_standardize
            )
        elif adversary_reads == "all":
            shapes = list(zip(filters, block_sizes(image_size, strides)))
            self.adversary = Adversary(
                shapes, latent_dim, n_batches, adversary_filters, adversary_hidden
            )
        else:
            raise ValueError(f"adversary_reads must be 'all' or 'latent', got {adversary_reads!r}")
        glorot_init(self.adversary)

    def auxiliary_networks(self) -> dict[str, nn.Module]:
        """The networks the plan trains with their own optimiser: the adversary."""
        return {"adversary": self.adversary}

    def adversary_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """What the adversary reads: (latent, block outputs) of the encoder."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> ModelOutput:
        """Images -> latent, recon, logits, batch_logits (ẑ_A); `z` only feeds a batch-conditioned
        decoder (`decoder_batch`; no Z: the reconstruction of no particular batch).
        """
        latent, feats = self.encoder(x)
        dec_in = (
            torch.cat([latent, design_matrix(z, x, self.n_batches)], 1)
            if self.decoder_batch
            else latent
        )
        return ModelOutput(
            latent=latent,
            recon=self.decoder(dec_in),
            logits=self.classifier(latent),
            batch_logits=self.adversary(feats, latent),
        )


class RandomEffectsAEC(nn.Module):
    """Domain-enhancing AEC: z-conditioned encoder/decoder, latent heads ŷ and ẑ_L, ẑ_I classifier.

    Args:
        target_head: Whether the latent head predicts the phenotype (False inside `mixedeffects`,
            where the mixing head does).
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        n_batches: int,
        image_size: int,
        filters: list[int],
        strides: list[int],
        latent_dim: int,
        output_mean: list[float] | None = None,
        re_prior_scale: float = 0.25,
        re_loc_init_scale: float = 0.1,
        image_classifier_filters: list[int] | None = None,
        target_head: bool = True,
    ):
        super().__init__()
        self.latent_dim = self.num_features = latent_dim
        self.n_classes, self.n_batches = n_classes, n_batches
        re_kw = {"prior_scale": re_prior_scale, "loc_init_scale": re_loc_init_scale}
        self.encoder = RandomEffectsEncoder(
            in_channels, image_size, filters, strides, latent_dim, n_batches, **re_kw
        )
        self.decoder = RandomEffectsDecoder(self.encoder, latent_dim, n_batches, **re_kw)
        self.latent_classifier = LatentClassifier(
            latent_dim, n_label_outputs(n_classes), n_batches, target=target_head
        )
        self.image_classifier = ImageClassifier(
            in_channels, n_batches, image_size, image_classifier_filters
        )
        glorot_init(self)
        self.decoder.init_output(output_mean)

    def auxiliary_networks(self) -> dict[str, nn.Module]:
        """The networks the plan trains with their own optimiser: the image classifier."""
        return {"image_classifier": self.image_classifier}

    def kl(self) -> torch.Tensor:
        """Mean KL over the encoder's RE layers plus the mean over the decoder's (as reference)."""
        return mean_kl(self.encoder.re_layers()) + mean_kl(self.decoder.re_layers())

    def encode(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """The RE latent e_R (z None: no random effect)."""
        return self.encoder(x, design_matrix(z, x, self.n_batches))[0]

    def branch(
        self, x: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(e_R, X̂_R, ŷ or None without a target head, ẑ_L, ẑ_I): what `forward` and `mixedeffects` share."""
        latent, _ = self.encoder(x, z)
        recon = self.decoder(latent, z)
        logits, cluster_logits = self.latent_classifier(latent)
        return latent, recon, logits, cluster_logits, self.image_classifier(recon)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> ModelOutput:
        """(x, z) -> latent, recon, logits, cluster_logits, cluster_image_logits, kl."""
        latent, recon, logits, cluster_logits, cluster_image_logits = self.branch(
            x, design_matrix(z, x, self.n_batches)
        )
        return ModelOutput(
            latent=latent,
            recon=recon,
            logits=logits,
            cluster_logits=cluster_logits,
            cluster_image_logits=cluster_image_logits,
            kl=self.kl(),
        )


class MixedEffectsAEC(nn.Module):
    """ARMED-AEC (paper figure): FE DA-AEC + RE AEC side by side, mixing head [e_F, e_R] -> ŷ_M."""

    def __init__(
        self, fe: DomainAdversarialAEC, re: RandomEffectsAEC, n_classes: int, mixer_hidden: int = 32
    ):
        super().__init__()
        self.fe, self.re = fe, re
        self.latent_dim = self.num_features = fe.latent_dim
        self.n_classes, self.n_batches = n_classes, re.n_batches
        self.mixer = AuxClassifier(
            fe.latent_dim + re.latent_dim, n_label_outputs(n_classes), mixer_hidden
        )
        glorot_init(self.mixer)

    def auxiliary_networks(self) -> dict[str, nn.Module]:
        """The FE subnetwork's adversary and the RE subnetwork's image classifier."""
        return {**self.fe.auxiliary_networks(), **self.re.auxiliary_networks()}

    def adversary_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The FE encoder's (latent, block outputs)."""
        return self.fe.encoder(x)

    def encode(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """The FE latent e_F (batch-agnostic by training; z is not needed)."""
        return self.fe.encoder(x)[0]

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> ModelOutput:
        """(x, z) -> both subnetworks' outputs and the mixed prediction (see the module doc)."""
        fe = self.fe(x, z)
        latent_re, recon_re, _, cluster_logits, cluster_image_logits = self.re.branch(
            x, design_matrix(z, x, self.n_batches)
        )
        mixed = self.mixer(torch.cat([fe.latent, latent_re], 1))
        return ModelOutput(
            latent=fe.latent,
            latent_re=latent_re,
            recon=recon_re,
            recon_fe=fe.recon,
            logits=mixed,
            logits_fe=fe.logits,
            batch_logits=fe.batch_logits,
            cluster_logits=cluster_logits,
            cluster_image_logits=cluster_image_logits,
            kl=self.re.kl(),
        )


@register_model("adversarial", plan=AdversarialPlan, outputs=("batch_logits",))
def adversarial(
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
    adversary_filters: list[int] | None = None,
    adversary_hidden: int = 512,
    adversary_reads: str = "all",
    decoder_batch: bool = False,
    adversary_standardize: bool = False,
) -> DomainAdversarialAEC:
    """Domain-adversarial AEC (spec 2.2); `n_batches` (training batches) sizes the adversary.

    `adversary_reads`: 'all' (the reference: every encoder block's output and the latent) or
    'latent' (an MLP on the latent only, the representation that is evaluated). `decoder_batch`: the
    decoder also reads the batch's one-hot Z (as a conditional autoencoder), so reconstructing a
    batch's look no longer needs the batch in the latent that the adversary tries to clean.
    """
    p = resolve_preset(
        preset, image_size=image_size, filters=filters, strides=strides, latent_dim=latent_dim
    )
    return DomainAdversarialAEC(
        in_channels,
        n_classes,
        n_batches,
        classifier_hidden=classifier_hidden,
        output_mean=output_mean,
        adversary_filters=adversary_filters,
        adversary_hidden=adversary_hidden,
        adversary_reads=adversary_reads,
        decoder_batch=decoder_batch,
        adversary_standardize=adversary_standardize,
        **p,
    )


@register_model(
    "randomeffects",
    plan=RandomEffectsPlan,
    uses_z=True,
    outputs=("cluster_logits", "cluster_image_logits", "kl"),
)
def randomeffects(
    in_channels: int,
    n_classes: int,
    n_batches: int = 1,
    preset: str = "small",
    image_size: int | None = None,
    filters: list[int] | None = None,
    strides: list[int] | None = None,
    latent_dim: int | None = None,
    output_mean: list[float] | None = None,
    re_prior_scale: float = 0.25,
    re_loc_init_scale: float = 0.1,
    image_classifier_filters: list[int] | None = None,
) -> RandomEffectsAEC:
    """Random-effects (domain-enhancing) AEC (spec 2.3); prior s.d. 0.25, loc init 0.1."""
    p = resolve_preset(
        preset, image_size=image_size, filters=filters, strides=strides, latent_dim=latent_dim
    )
    return RandomEffectsAEC(
        in_channels,
        n_classes,
        n_batches,
        output_mean=output_mean,
        re_prior_scale=re_prior_scale,
        re_loc_init_scale=re_loc_init_scale,
        image_classifier_filters=image_classifier_filters,
        **p,
    )


@register_model(
    "mixedeffects",
    plan=MixedEffectsPlan,
    uses_z=True,
    outputs=(
        "latent_re",
        "recon_fe",
        "logits_fe",
        "batch_logits",
        "cluster_logits",
        "cluster_image_logits",
        "kl",
    ),
)
def mixedeffects(
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
    adversary_filters: list[int] | None = None,
    adversary_hidden: int = 512,
    re_prior_scale: float = 0.25,
    re_loc_init_scale: float = 0.1,
    image_classifier_filters: list[int] | None = None,
    mixer_hidden: int = 32,
    adversary_reads: str = "all",
    decoder_batch: bool = False,
    adversary_standardize: bool = False,
) -> MixedEffectsAEC:
    """ARMED mixed-effects AEC as in the paper's figure (spec 2.5); both halves use the preset."""
    p = resolve_preset(
        preset, image_size=image_size, filters=filters, strides=strides, latent_dim=latent_dim
    )
    fe = DomainAdversarialAEC(
        in_channels,
        n_classes,
        n_batches,
        classifier_hidden=classifier_hidden,
        output_mean=output_mean,
        adversary_filters=adversary_filters,
        adversary_hidden=adversary_hidden,
        adversary_reads=adversary_reads,
        decoder_batch=decoder_batch,
        adversary_standardize=adversary_standardize,
        **p,
    )
    re = RandomEffectsAEC(
        in_channels,
        n_classes,
        n_batches,
        output_mean=output_mean,
        re_prior_scale=re_prior_scale,
        re_loc_init_scale=re_loc_init_scale,
        image_classifier_filters=image_classifier_filters,
        target_head=False,
        **p,
    )
    return MixedEffectsAEC(fe, re, n_classes, mixer_hidden)


class ZPredictor(ImageClassifier):
    """The Z-predictor (spec 2.6): `ImageClassifier` images -> batch logits, as a registered model.

    A subclass rather than a wrapper, so its weights keep `ImageClassifier`'s names (`blocks.*`,
    `head.*`): `zpredictor.pt` stays loadable by `ImageClassifier.load_state_dict`.
    """

    def __init__(
        self,
        in_channels: int,
        n_out: int,
        image_size: int,
        head_name: str = K.BATCH,
        filters: list[int] | None = None,
    ):
        super().__init__(in_channels, n_out, image_size, filters)
        self.head_names, self.head_sizes = [head_name], [n_out]
        cin = self.head.in_channels
        self.latent_dim = self.num_features = (
            cin * self.head.kernel_size[0] * self.head.kernel_size[1]
        )

    def encode(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """The last conv block's output, flattened (what the head reads); z is not used."""
        return self.blocks(x).flatten(1)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> ModelOutput:
        """X -> latent (features before the head) and the batch logits; no reconstruction."""
        f = self.blocks(x)
        return ModelOutput(latent=f.flatten(1), recon=None, logits=self.head(f).flatten(1))


@register_model(
    "zpredictor", plan=ZPredictorPlan, reconstructs=False, weak_labels=True, batch_head=True
)
def zpredictor(
    in_channels: int,
    n_classes: int,
    n_batches: int = 1,
    preset: str = "small",
    image_size: int | None = None,
    head_names: list[str] | None = None,
    head_sizes: list[int] | None = None,
    filters: list[int] | None = None,
    output_mean: list[float] | None = None,
) -> ZPredictor:
    """The Z-predictor (spec 2.6): one head, the imaging batch over the training batches.

    The loop passes `head_names=["batch"]`, `head_sizes=[number of training batches]`; with no heads
    given, `n_classes` sizes the single head (the builder signature every weak-label type shares).
    `filters`: the conv blocks' widths (default the reference's 16, 32, 32, 64, 64, 128, 256);
    `preset` gives the crop size when `image_size` is unset; `output_mean` is accepted and unused (no
    decoder).
    """
    if head_sizes is not None and len(head_sizes) != 1:
        raise ValueError(
            f"model type 'zpredictor' has one head (the batch column), got heads {head_names}"
        )
    size = resolve_preset(preset, image_size=image_size)["image_size"]
    n_out = int(head_sizes[0]) if head_sizes else n_classes
    name = head_names[0] if head_names else K.BATCH
    return ZPredictor(in_channels, n_out, size, head_name=name, filters=filters)
