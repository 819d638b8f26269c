"""The ARMED model family beyond the conventional AEC (spec/armed-aec.md sections 2.2-2.6).

* `adversarial` (DA-AEC, 2.2): the conventional AEC plus an adversary that reads every encoder
  block's output and the latent and predicts the imaging batch (ẑ_A). The training plan alternates
  adversary and main steps; the main objective subtracts the adversary's loss (train/plans.py).
* `randomeffects` (domain-enhancing AEC, 2.3): an encoder and an *untied* decoder whose
  normalisation layers are `ClusterScaleBias` blocks (instance norm x (1 + gamma(z)) + beta(z),
  variational per-batch weights); a latent head that predicts the phenotype and the batch (ẑ_L);
  an image classifier that predicts the batch from the reconstruction (ẑ_I).
* `mixedeffects` (ARMED-AEC as drawn in the paper's figure, 2.5): a fixed-effects DA-AEC and a
  random-effects AEC side by side, and a mixing head on both latents giving the mixed prediction
  ŷ_M.
* `ImageClassifier` (2.3, 2.6) is also the Z-predictor's network (`raycell.infer.zpredictor`); the
  Z-predictor is not registered as a model type because it has no latent or reconstruction.

Output keys (every model also has `latent`, `recon`, `logits`):

| key | adversarial | randomeffects | mixedeffects |
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

Choices the reference leaves open, and what we chose:

* **Adversary for small images.** The reference adversary needs 256 px: it concatenates the
  encoder's outputs resolution by resolution, halving with a k4/s2 conv after each, then keeps
  halving to 4x4 (6 convs at 256 px). We group the encoder blocks by output size the same way and
  add k4/s2 convs until the map is 4x4, so the number of convs is log2(image_size / 4) for the
  presets (6 at 256 px, 4 at 64 px, 3 at 32 px), with the first entries of the reference's filter
  list [16, 32, 32, 64, 64, 128, ...].
* **Image classifier for small images.** k4/s2 convs down to 2x2, then a 2x2 valid conv to
  n_batches (7 convs at 256 px as the reference; log2(image_size / 2) in general).
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

from raycell.models.aec import AutoencoderClassifier, n_label_outputs, resolve_preset
from raycell.models.layers import (
    BN_EPS,
    BN_MOMENTUM,
    AuxClassifier,
    glorot_init,
    make_conv,
    same_conv,
)
from raycell.models.random_effects import ClusterScaleBias, RandomEffects, mean_kl
from raycell.models.registry import register_model

ADVERSARY_FILTERS = [16, 32, 32, 64, 64, 128, 128, 256]  # the reference's list (uses the first 6)
IMAGE_CLASSIFIER_FILTERS = [16, 32, 32, 64, 64, 128, 256]


def _pick(filters: list[int], i: int) -> int:
    """The i-th filter count, repeating the last entry for networks deeper than the list."""
    return filters[min(i, len(filters) - 1)]


def _block_sizes(image_size: int, strides: list[int]) -> list[int]:
    """Spatial size of every encoder block's output."""
    out, s = [], image_size
    for st in strides:
        s //= st
        out.append(s)
    return out


def _design(z: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
    """The design matrix, or all zeros (no random effect) when none is given."""
    if z is None:
        return x.new_zeros(x.shape[0], n)
    return z.to(device=x.device, dtype=x.dtype)


class ConvBlock(nn.Sequential):
    """k4/s2 conv -> BatchNorm -> per-channel PReLU (adversary and image classifier blocks)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 4, stride=2, padding=1),
                         nn.BatchNorm2d(cout, momentum=BN_MOMENTUM, eps=BN_EPS),
                         nn.PReLU(cout, init=0.0))


class Adversary(nn.Module):
    """Predicts the batch from every encoder block's output plus the latent (ẑ_A logits).

    Blocks with the same output size are concatenated (with the running map) and halved by one k4/s2
    conv; further convs halve the map down to `min_size`; flatten, concatenate the latent,
    Dense(hidden, linear as the reference) -> Dense(n_out).

    Args:
        feature_shapes: (channels, size) of each encoder block's output, in order.
        latent_dim: Size of the latent.
        n_out: Number of batches.
        filters: Filter counts of the successive convs.
        hidden: Width of the linear hidden layer (512 in the reference).
        min_size: Spatial size at which the conv stack stops (4 in the reference).
    """

    def __init__(self, feature_shapes: list[tuple[int, int]], latent_dim: int, n_out: int,
                 filters: list[int] | None = None, hidden: int = 512, min_size: int = 4):
        super().__init__()
        filters = list(filters or ADVERSARY_FILTERS)
        groups: list[list[int]] = []  # indices of encoder blocks per resolution
        sizes: list[int] = []
        for i, (_, s) in enumerate(feature_shapes):
            if sizes and sizes[-1] == s:
                groups[-1].append(i)
            else:
                if sizes and sizes[-1] != 2 * s:
                    raise ValueError("adversary: encoder block sizes must halve from one "
                                     "resolution to the next (strides 1 or 2), got "
                                     f"{[s for _, s in feature_shapes]}")
                groups.append([i])
                sizes.append(s)
        if sizes[-1] % 2:
            raise ValueError(f"adversary: the encoder's smallest map ({sizes[-1]} px) must be even")
        self.groups = groups
        convs, cin = [], 0
        for j, g in enumerate(groups):
            cin += sum(feature_shapes[i][0] for i in g)
            convs.append(ConvBlock(cin, _pick(filters, j)))
            cin = _pick(filters, j)
        size = sizes[-1] // 2
        while size > min_size and size % 2 == 0:
            convs.append(ConvBlock(cin, _pick(filters, len(convs))))
            cin = _pick(filters, len(convs) - 1)
            size //= 2
        self.convs = nn.ModuleList(convs)
        self.out_size = size
        self.dense = nn.Sequential(nn.Linear(cin * size * size + latent_dim, hidden),
                                   nn.Linear(hidden, n_out))

    def forward(self, feats: list[torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        """Encoder block outputs and latent -> batch logits (N, n_out)."""
        h = None
        for j, g in enumerate(self.groups):
            parts = ([h] if h is not None else []) + [feats[i] for i in g]
            h = self.convs[j](torch.cat(parts, 1) if len(parts) > 1 else parts[0])
        for conv in self.convs[len(self.groups):]:
            h = conv(h)
        return self.dense(torch.cat([h.flatten(1), latent], 1))


class ImageClassifier(nn.Module):
    """Images -> batch logits: k4/s2 conv blocks down to 2x2, then a 2x2 valid conv (ẑ_I, Z)."""

    def __init__(self, in_channels: int, n_out: int, image_size: int,
                 filters: list[int] | None = None):
        super().__init__()
        filters = list(filters or IMAGE_CLASSIFIER_FILTERS)
        blocks, cin, size = [], in_channels, image_size
        while size > 2 and size % 2 == 0:
            blocks.append(ConvBlock(cin, _pick(filters, len(blocks))))
            cin = _pick(filters, len(blocks) - 1)
            size //= 2
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(cin, n_out, size)  # 'valid': the remaining size x size map -> 1 x 1
        glorot_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> logits (N, n_out)."""
        return self.head(self.blocks(x)).flatten(1)


class RandomEffectsEncoder(nn.Module):
    """Conv -> ClusterScaleBias(z) -> PReLU blocks, then Dense -> latent (linear, no BatchNorm)."""

    def __init__(self, in_channels: int, image_size: int, filters: list[int], strides: list[int],
                 latent_dim: int, n_clusters: int, **re_kwargs):
        super().__init__()
        if len(filters) != len(strides):
            raise ValueError(f"filters {filters} and strides {strides} must have the same length")
        if image_size % _prod(strides):
            raise ValueError(f"image_size {image_size} is not divisible by the total stride "
                             f"{_prod(strides)}")
        sizes = _block_sizes(image_size, strides)
        chans = [in_channels, *filters]
        self.convs = nn.ModuleList(make_conv(chans[i], chans[i + 1], strides[i])
                                   for i in range(len(filters)))
        self.norms = nn.ModuleList(ClusterScaleBias(f, n_clusters, **re_kwargs) for f in filters)
        self.acts = nn.ModuleList(nn.PReLU(f, init=0.0) for f in filters)
        self.out_shape = (filters[-1], sizes[-1], sizes[-1])
        self.dense = nn.Linear(filters[-1] * sizes[-1] ** 2, latent_dim)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(x, z) -> (latent, [block outputs])."""
        feats = []
        for conv, norm, act in zip(self.convs, self.norms, self.acts):
            x = act(norm(same_conv(x, conv), z))
            feats.append(x)
        return self.dense(x.flatten(1)), feats

    def re_layers(self) -> list[RandomEffects]:
        """Every random-effects layer (2 per block)."""
        return [r for n in self.norms for r in n.re_layers()]


def _prod(xs: list[int]) -> int:
    out = 1
    for v in xs:
        out *= v
    return out


class RandomEffectsDecoder(nn.Module):
    """Untied decoder: Dense -> reshape -> PReLU, then transposed convs with ClusterScaleBias(z).

    Each transposed conv is followed by ClusterScaleBias(z) and PReLU; the last one (to the image
    channels) by ClusterScaleBias(z) and a sigmoid.
    """

    def __init__(self, encoder: RandomEffectsEncoder, latent_dim: int, n_clusters: int,
                 **re_kwargs):
        super().__init__()
        c, h, w = encoder.out_shape
        self.shape = (c, h, w)
        self.dense = nn.Linear(latent_dim, c * h * w)
        self.act0 = nn.PReLU(c, init=0.0)
        convs = list(encoder.convs)[::-1]
        # Own kernels with the mirrored shapes; stride 1 crops [1:-2] to undo TF 'same' padding.
        self.tconvs = nn.ModuleList(
            nn.ConvTranspose2d(cv.out_channels, cv.in_channels, 4, stride=cv.stride,
                               padding=0 if cv.stride[0] == 1 else 1) for cv in convs)
        self.norms = nn.ModuleList(ClusterScaleBias(cv.in_channels, n_clusters, **re_kwargs)
                                   for cv in convs)
        self.acts = nn.ModuleList(nn.PReLU(cv.in_channels, init=0.0) for cv in convs[:-1])

    def init_output(self, mean: list[float] | None) -> None:
        """Start the sigmoid output at the data's mean intensity (instance-norm bias = logit)."""
        if mean is None:
            return
        m = torch.as_tensor(mean, dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
        with torch.no_grad():
            self.norms[-1].norm.bias.copy_(torch.log(m / (1 - m)))

    def forward(self, latent: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(latent, z) -> reconstruction in [0, 1]."""
        x = self.act0(self.dense(latent).view(-1, *self.shape))
        last = len(self.tconvs) - 1
        for i, tc in enumerate(self.tconvs):
            x = tc(x)
            if tc.stride[0] == 1:
                x = x[..., 1:-2, 1:-2]
            x = self.norms[i](x, z)
            x = self.acts[i](x) if i < last else torch.sigmoid(x)
        return x

    def re_layers(self) -> list[RandomEffects]:
        """Every random-effects layer (2 per block)."""
        return [r for n in self.norms for r in n.re_layers()]


class LatentClassifier(nn.Module):
    """Heads on the RE latent: the phenotype and the batch (ẑ_L).

    Phenotype: Dense(32, ReLU) -> Dense(n_out); batch: Dense(32, ReLU) -> Dense(16, ReLU) ->
    Dense(n_clusters), as the reference's `LatentClassifier`.
    """

    def __init__(self, latent_dim: int, n_out: int, n_clusters: int, target: bool = True):
        super().__init__()
        self.target = nn.Sequential(nn.Linear(latent_dim, 32), nn.ReLU(), nn.Linear(32, n_out)) \
            if target else None
        self.cluster = nn.Sequential(nn.Linear(latent_dim, 32), nn.ReLU(), nn.Linear(32, 16),
                                     nn.ReLU(), nn.Linear(16, n_clusters))

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Latent -> (phenotype logits or None, batch logits)."""
        return (self.target(latent) if self.target is not None else None), self.cluster(latent)


class DomainAdversarialAEC(AutoencoderClassifier):
    """DA-AEC: the conventional AEC plus an adversary on the encoder's outputs (ẑ_A)."""

    def __init__(self, in_channels: int, n_classes: int, n_batches: int, image_size: int,
                 filters: list[int], strides: list[int], latent_dim: int,
                 classifier_hidden: int = 32, output_mean: list[float] | None = None,
                 adversary_filters: list[int] | None = None, adversary_hidden: int = 512):
        super().__init__(in_channels, n_classes, image_size, filters, strides, latent_dim,
                         classifier_hidden, output_mean)
        self.n_batches = n_batches
        shapes = list(zip(filters, _block_sizes(image_size, strides)))
        self.adversary = Adversary(shapes, latent_dim, n_batches, adversary_filters,
                                   adversary_hidden)
        glorot_init(self.adversary)

    def adversary_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """What the adversary reads: (latent, block outputs) of the encoder."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Images -> latent, recon, logits, batch_logits (ẑ_A), features."""
        latent, feats = self.encoder(x)
        return {"latent": latent, "recon": self.decoder(latent), "logits": self.classifier(latent),
                "batch_logits": self.adversary(feats, latent), "features": feats}


class RandomEffectsAEC(nn.Module):
    """Domain-enhancing AEC: z-conditioned encoder/decoder, latent heads ŷ and ẑ_L, ẑ_I classifier.

    Args:
        target_head: Whether the latent head predicts the phenotype (False inside `mixedeffects`,
            where the mixing head does).
    """

    uses_z = True  # inference must supply a design matrix for every cell (see CropPredictor)

    def __init__(self, in_channels: int, n_classes: int, n_batches: int, image_size: int,
                 filters: list[int], strides: list[int], latent_dim: int,
                 output_mean: list[float] | None = None, re_prior_scale: float = 0.25,
                 re_loc_init_scale: float = 0.1, image_classifier_filters: list[int] | None = None,
                 target_head: bool = True):
        super().__init__()
        self.latent_dim = self.num_features = latent_dim
        self.n_classes, self.n_batches = n_classes, n_batches
        re_kw = {"prior_scale": re_prior_scale, "loc_init_scale": re_loc_init_scale}
        self.encoder = RandomEffectsEncoder(in_channels, image_size, filters, strides, latent_dim,
                                            n_batches, **re_kw)
        self.decoder = RandomEffectsDecoder(self.encoder, latent_dim, n_batches, **re_kw)
        self.latent_classifier = LatentClassifier(latent_dim, n_label_outputs(n_classes), n_batches,
                                                  target=target_head)
        self.image_classifier = ImageClassifier(in_channels, n_batches, image_size,
                                                image_classifier_filters)
        glorot_init(self)
        self.decoder.init_output(output_mean)

    def kl(self) -> torch.Tensor:
        """Mean KL over the encoder's RE layers plus the mean over the decoder's (as reference)."""
        return mean_kl(self.encoder.re_layers()) + mean_kl(self.decoder.re_layers())

    def encode(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """The RE latent e_R (z None: no random effect)."""
        return self.encoder(x, _design(z, x, self.n_batches))[0]

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(x, z) -> latent, recon, [logits], cluster_logits, cluster_image_logits, kl."""
        z = _design(z, x, self.n_batches)
        latent, _ = self.encoder(x, z)
        recon = self.decoder(latent, z)
        logits, cluster_logits = self.latent_classifier(latent)
        out = {"latent": latent, "recon": recon, "cluster_logits": cluster_logits,
               "cluster_image_logits": self.image_classifier(recon), "kl": self.kl()}
        if logits is not None:
            out["logits"] = logits
        return out


class MixedEffectsAEC(nn.Module):
    """ARMED-AEC (paper figure): FE DA-AEC + RE AEC side by side, mixing head [e_F, e_R] -> ŷ_M."""

    uses_z = True

    def __init__(self, fe: DomainAdversarialAEC, re: RandomEffectsAEC, n_classes: int,
                 mixer_hidden: int = 32):
        super().__init__()
        self.fe, self.re = fe, re
        self.latent_dim = self.num_features = fe.latent_dim
        self.n_classes, self.n_batches = n_classes, re.n_batches
        self.mixer = AuxClassifier(fe.latent_dim + re.latent_dim, n_label_outputs(n_classes),
                                   mixer_hidden)
        glorot_init(self.mixer)

    # The plans find the adversary and the image classifier under these names for every model type.
    @property
    def adversary(self) -> Adversary:
        """The FE subnetwork's adversary."""
        return self.fe.adversary

    @property
    def image_classifier(self) -> ImageClassifier:
        """The RE subnetwork's image classifier."""
        return self.re.image_classifier

    def adversary_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The FE encoder's (latent, block outputs)."""
        return self.fe.encoder(x)

    def encode(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """The FE latent e_F (batch-agnostic by training; z is not needed)."""
        return self.fe.encoder(x)[0]

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(x, z) -> both subnetworks' outputs and the mixed prediction (see the module doc)."""
        fe = self.fe(x)
        re = self.re(x, z)
        mixed = self.mixer(torch.cat([fe["latent"], re["latent"]], 1))
        return {"latent": fe["latent"], "latent_re": re["latent"], "recon": re["recon"],
                "recon_fe": fe["recon"], "logits": mixed, "logits_fe": fe["logits"],
                "batch_logits": fe["batch_logits"], "cluster_logits": re["cluster_logits"],
                "cluster_image_logits": re["cluster_image_logits"], "kl": re["kl"]}


@register_model("adversarial")
def adversarial(in_channels: int, n_classes: int, n_batches: int = 1, preset: str = "small",
                image_size: int | None = None, filters: list[int] | None = None,
                strides: list[int] | None = None, latent_dim: int | None = None,
                classifier_hidden: int = 32, output_mean: list[float] | None = None,
                adversary_filters: list[int] | None = None, adversary_hidden: int = 512
                ) -> DomainAdversarialAEC:
    """Domain-adversarial AEC (spec 2.2); `n_batches` (training batches) sizes the adversary."""
    p = resolve_preset(preset, image_size=image_size, filters=filters, strides=strides,
                       latent_dim=latent_dim)
    return DomainAdversarialAEC(in_channels, n_classes, n_batches,
                                classifier_hidden=classifier_hidden, output_mean=output_mean,
                                adversary_filters=adversary_filters,
                                adversary_hidden=adversary_hidden, **p)


@register_model("randomeffects", uses_z=True)
def randomeffects(in_channels: int, n_classes: int, n_batches: int = 1, preset: str = "small",
                  image_size: int | None = None, filters: list[int] | None = None,
                  strides: list[int] | None = None, latent_dim: int | None = None,
                  output_mean: list[float] | None = None, re_prior_scale: float = 0.25,
                  re_loc_init_scale: float = 0.1, image_classifier_filters: list[int] | None = None
                  ) -> RandomEffectsAEC:
    """Random-effects (domain-enhancing) AEC (spec 2.3); prior s.d. 0.25, loc init 0.1."""
    p = resolve_preset(preset, image_size=image_size, filters=filters, strides=strides,
                       latent_dim=latent_dim)
    return RandomEffectsAEC(in_channels, n_classes, n_batches, output_mean=output_mean,
                            re_prior_scale=re_prior_scale, re_loc_init_scale=re_loc_init_scale,
                            image_classifier_filters=image_classifier_filters, **p)


@register_model("mixedeffects", uses_z=True)
def mixedeffects(in_channels: int, n_classes: int, n_batches: int = 1, preset: str = "small",
                 image_size: int | None = None, filters: list[int] | None = None,
                 strides: list[int] | None = None, latent_dim: int | None = None,
                 classifier_hidden: int = 32, output_mean: list[float] | None = None,
                 adversary_filters: list[int] | None = None, adversary_hidden: int = 512,
                 re_prior_scale: float = 0.25, re_loc_init_scale: float = 0.1,
                 image_classifier_filters: list[int] | None = None, mixer_hidden: int = 32
                 ) -> MixedEffectsAEC:
    """ARMED mixed-effects AEC as in the paper's figure (spec 2.5); both halves use the preset."""
    p = resolve_preset(preset, image_size=image_size, filters=filters, strides=strides,
                       latent_dim=latent_dim)
    fe = DomainAdversarialAEC(in_channels, n_classes, n_batches,
                              classifier_hidden=classifier_hidden, output_mean=output_mean,
                              adversary_filters=adversary_filters,
                              adversary_hidden=adversary_hidden, **p)
    re = RandomEffectsAEC(in_channels, n_classes, n_batches, output_mean=output_mean,
                          re_prior_scale=re_prior_scale, re_loc_init_scale=re_loc_init_scale,
                          image_classifier_filters=image_classifier_filters, target_head=False, **p)
    return MixedEffectsAEC(fe, re, n_classes, mixer_hidden)
