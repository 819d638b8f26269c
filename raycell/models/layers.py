"""Building blocks shared by the ARMED model family: the encoder, the tied decoder, heads, batch classifiers.

`ConvEncoder`, `TiedDecoder` and `AuxClassifier` make the conventional AEC (`aec.py`); `Adversary` (reads
the encoder, predicts the batch) and `ImageClassifier` (reads images, predicts the batch) are the batch
classifiers of the adversarial and random-effects models (`armed.py`) and the Z-predictor
(`raycell.zpredictor`).

Keras defaults of the reference (spec/armed-aec.md section 2) are kept where they change behaviour:
kernel 4 with TF 'same' padding, BatchNorm eps 1e-3, Glorot-uniform weights with zero biases, PReLU
starting at slope 0 (ReLU). Two deliberate deviations: PReLU has one slope per *channel*, not per element
(the reference's per-element slopes add ~32 M parameters at 256 px); and BatchNorm running statistics use
PyTorch's momentum 0.1 rather than Keras' 0.99 (PyTorch 0.01), which needs thousands of steps before the
eval-mode statistics settle: short runs would otherwise evaluate with near-initial statistics.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM, BN_EPS = 0.1, 1e-3
ADVERSARY_FILTERS = [16, 32, 32, 64, 64, 128, 128, 256]  # the reference's list (uses the first 6)
IMAGE_CLASSIFIER_FILTERS = [16, 32, 32, 64, 64, 128, 256]


def glorot_init(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases for every conv and linear layer (Keras defaults)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_output_mean(bias: torch.Tensor, mean: list[float] | None) -> None:
    """Start a sigmoid output at the data's mean intensity: set the bias before the sigmoid to logit(mean).

    With the reference's norm -> sigmoid output every pixel starts at 0.5, while microscopy crops are
    mostly dark background; the first epochs are then spent learning a global offset.
    """
    if mean is None:
        return
    m = torch.as_tensor(mean, dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        bias.copy_(torch.logit(m))


def pick_filter(filters: list[int], i: int) -> int:
    """The i-th filter count, repeating the last entry for networks deeper than the list."""
    return filters[min(i, len(filters) - 1)]


def block_sizes(image_size: int, strides: list[int]) -> list[int]:
    """Spatial size of every encoder block's output."""
    out, s = [], image_size
    for st in strides:
        s //= st
        out.append(s)
    return out


def check_strides(image_size: int, filters: list[int], strides: list[int]) -> None:
    """One stride per filter count, and an image size the strides divide."""
    if len(filters) != len(strides):
        raise ValueError(f"filters {filters} and strides {strides} must have the same length")
    if image_size % math.prod(strides):
        raise ValueError(
            f"image_size {image_size} is not divisible by the total stride {math.prod(strides)}"
        )


def same_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Apply a k4 conv with TF 'same' padding: stride 1 pads 1 before / 2 after, stride 2 pads 1."""
    if conv.stride[0] == 1:
        return conv(F.pad(x, (1, 2, 1, 2)))
    return conv(x)


def make_conv(cin: int, cout: int, stride: int, kernel: int = 4) -> nn.Conv2d:
    """A k4 conv whose padding `same_conv` completes."""
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=0 if stride == 1 else 1)


def conv_stack(
    in_channels: int, image_size: int, filters: list[int], strides: list[int]
) -> nn.ModuleList:
    """An encoder's k4 convs, in_channels -> filters[0] -> ... -> filters[-1] (strides checked)."""
    check_strides(image_size, filters, strides)
    chans = [in_channels, *filters]
    return nn.ModuleList(make_conv(chans[i], chans[i + 1], strides[i]) for i in range(len(filters)))


def tied_conv_transpose(x: torch.Tensor, conv: nn.Conv2d, bias: torch.Tensor) -> torch.Tensor:
    """The transpose of `conv` with its own weight tensor (tied) and a separate bias.

    A conv weight (out, in, k, k) is already the (in, out, k, k) layout conv_transpose2d wants, so the
    transposed op maps conv's output channels back to its input channels. Stride 1 undoes the 1/2 'same'
    padding by cropping [1:-2].
    """
    if conv.stride[0] == 1:
        return F.conv_transpose2d(x, conv.weight, bias)[..., 1:-2, 1:-2]
    return F.conv_transpose2d(x, conv.weight, bias, stride=conv.stride, padding=1)


class BlockEncoder(nn.Module):
    """Conv -> norm -> PReLU blocks, then Dense -> latent, returning every block's output.

    The per-block outputs feed the adversary of the domain-adversarial models. Encoders differ in
    their norm: `make_norm(channels)` builds it, and `blocks` calls it with any extra inputs (the
    random-effects encoder's design matrix).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        filters: list[int],
        strides: list[int],
        latent_dim: int,
        make_norm: Callable[[int], nn.Module],
    ):
        super().__init__()
        self.convs = conv_stack(in_channels, image_size, filters, strides)
        self.norms = nn.ModuleList(make_norm(f) for f in filters)
        self.acts = nn.ModuleList(nn.PReLU(f, init=0.0) for f in filters)
        size = block_sizes(image_size, strides)[-1]
        self.out_shape = (filters[-1], size, size)
        self.dense = nn.Linear(filters[-1] * size**2, latent_dim)

    def blocks(self, x: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, list]:
        """X (N, C, H, W) -> (dense output (N, D), [block outputs])."""
        feats = []
        for conv, norm, act in zip(self.convs, self.norms, self.acts):
            x = act(norm(same_conv(x, conv), *extra))
            feats.append(x)
        return self.dense(x.flatten(1)), feats


class ConvEncoder(BlockEncoder):
    """Conv -> BN -> PReLU blocks, then Dense -> latent (-> BatchNorm), returning every block's output."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        filters: list[int],
        strides: list[int],
        latent_dim: int,
        latent_norm: bool = True,
    ):
        norm = functools.partial(nn.BatchNorm2d, momentum=BN_MOMENTUM, eps=BN_EPS)
        super().__init__(in_channels, image_size, filters, strides, latent_dim, norm)
        self.latent_norm = (
            nn.BatchNorm1d(latent_dim, momentum=BN_MOMENTUM, eps=BN_EPS)
            if latent_norm
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """X (N, C, H, W) in [0, 1] -> (latent (N, D), [block outputs])."""
        h, feats = self.blocks(x)
        return self.latent_norm(h), feats


class TiedDecoder(nn.Module):
    """Dense -> reshape -> PReLU, then transposed convs tied to the encoder's convs, BN, sigmoid output."""

    def __init__(self, encoder: ConvEncoder, latent_dim: int):
        super().__init__()
        # Keep the encoder out of this module's parameters (it is registered on the parent model);
        # a plain list attribute holds the reference without double-registering the weights.
        self._encoder = [encoder]
        c, h, w = encoder.out_shape
        self.shape = (c, h, w)
        self.dense = nn.Linear(latent_dim, c * h * w)
        self.act0 = nn.PReLU(c, init=0.0)
        convs = list(encoder.convs)[::-1]
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(cv.in_channels)) for cv in convs)
        self.norms = nn.ModuleList(
            nn.BatchNorm2d(cv.in_channels, momentum=BN_MOMENTUM, eps=BN_EPS) for cv in convs
        )
        self.acts = nn.ModuleList(nn.PReLU(cv.in_channels, init=0.0) for cv in convs[:-1])

    def init_output(self, mean: list[float] | None) -> None:
        """Start the sigmoid output at the data's mean intensity (the last BatchNorm's bias)."""
        init_output_mean(self.norms[-1].bias, mean)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (N, D) -> reconstruction (N, C, H, W) in [0, 1]."""
        x = self.act0(self.dense(z).view(-1, *self.shape))
        convs = list(self._encoder[0].convs)[::-1]
        for i, conv in enumerate(convs):
            x = self.norms[i](tied_conv_transpose(x, conv, self.biases[i]))
            x = self.acts[i](x) if i < len(convs) - 1 else torch.sigmoid(x)
        return x


class AuxClassifier(nn.Module):
    """Latent -> Dense(hidden) -> LeakyReLU(0.3) -> Dense(n_out) logits (sigmoid/softmax in the loss)."""

    def __init__(self, latent_dim: int, n_out: int, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.3), nn.Linear(hidden, n_out)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_out)."""
        return self.net(z)


class ConvBlock(nn.Sequential):
    """k4/s2 conv -> BatchNorm -> per-channel PReLU (adversary and image classifier blocks)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 4, stride=2, padding=1),
            nn.BatchNorm2d(cout, momentum=BN_MOMENTUM, eps=BN_EPS),
            nn.PReLU(cout, init=0.0),
        )


class LatentAdversary(nn.Module):
    """Predicts the batch from the latent alone (ẑ_A logits): Dense(hidden) -> ReLU -> Dense(n_out).

    Early encoder blocks carry the batch's intensity and texture whatever the encoder learns (the
    decoder needs them), so an adversary that reads them can always win; one on the latent asks the
    encoder to hide the batch only where the representation is evaluated. Same call as `Adversary`.
    """

    def __init__(self, latent_dim: int, n_out: int, hidden: int = 512, standardize: bool = False):
        super().__init__()
        self.standardize = standardize
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_out),
        )

    def forward(self, feats: list[torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        """Batch logits from the latent (`feats` is ignored)."""
        return self.net(standardize_rows(latent) if self.standardize else latent)


def standardize_rows(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each column of a minibatch to mean 0, s.d. 1, with the gradient flowing through the statistics.

    What the batch probe does (it z-scores the latent before its regression): an adversary that reads
    the raw latent can be fooled by shrinking the directions that carry the batch, which leaves them
    just as readable to any classifier that rescales; after this no rescaling of the latent changes
    what the adversary sees. No parameters and no running statistics, so it changes no checkpoint.
    """
    if len(x) < 2:
        return x - x.mean(0, keepdim=True)
    x = x.float()
    return (x - x.mean(0, keepdim=True)) / (x.var(0, unbiased=False, keepdim=True) + eps).sqrt()


class Adversary(nn.Module):
    """Predicts the batch from every encoder block's output plus the latent (ẑ_A logits).

    Blocks with the same output size are concatenated (with the running map) and halved by one k4/s2
    conv; further convs halve the map down to `min_size`; flatten, concatenate the latent,
    Dense(hidden, linear as the reference) -> Dense(n_out).

    The reference needs 256 px: it concatenates the encoder's outputs resolution by resolution, halving
    with a k4/s2 conv after each, then keeps halving to 4x4 (6 convs at 256 px). Grouping the blocks by
    output size the same way and adding convs until the map is 4x4 gives log2(image_size / 4) convs for
    the presets (6 at 256 px, 4 at 64 px, 3 at 32 px), with the first entries of the reference's filter
    list.

    Args:
        feature_shapes: (channels, size) of each encoder block's output, in order.
        latent_dim: Size of the latent.
        n_out: Number of batches.
        filters: Filter counts of the successive convs.
        hidden: Width of the linear hidden layer (512 in the reference).
        min_size: Spatial size at which the conv stack stops (4 in the reference).
    """

    def __init__(
        self,
        feature_shapes: list[tuple[int, int]],
        latent_dim: int,
        n_out: int,
        filters: list[int] | None = None,
        hidden: int = 512,
        min_size: int = 4,
    ):
        super().__init__()
        filters = list(filters or ADVERSARY_FILTERS)
        groups: list[list[int]] = []  # indices of encoder blocks per resolution
        sizes: list[int] = []
        for i, (_, s) in enumerate(feature_shapes):
            if sizes and sizes[-1] == s:
                groups[-1].append(i)
            else:
                if sizes and sizes[-1] != 2 * s:
                    raise ValueError(
                        "adversary: encoder block sizes must halve from one "
                        "resolution to the next (strides 1 or 2), got "
                        f"{[s for _, s in feature_shapes]}"
                    )
                groups.append([i])
                sizes.append(s)
        if sizes[-1] % 2:
            raise ValueError(f"adversary: the encoder's smallest map ({sizes[-1]} px) must be even")
        self.groups = groups
        convs, cin = [], 0
        for j, g in enumerate(groups):
            cin += sum(feature_shapes[i][0] for i in g)
            convs.append(ConvBlock(cin, pick_filter(filters, j)))
            cin = pick_filter(filters, j)
        size = sizes[-1] // 2
        while size > min_size and size % 2 == 0:
            convs.append(ConvBlock(cin, pick_filter(filters, len(convs))))
            cin = pick_filter(filters, len(convs) - 1)
            size //= 2
        self.convs = nn.ModuleList(convs)
        self.out_size = size
        self.dense = nn.Sequential(
            nn.Linear(cin * size * size + latent_dim, hidden), nn.Linear(hidden, n_out)
        )

    def forward(self, feats: list[torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        """Encoder block outputs and latent -> batch logits (N, n_out)."""
        h = None
        for j, g in enumerate(self.groups):
            parts = ([h] if h is not None else []) + [feats[i] for i in g]
            h = self.convs[j](torch.cat(parts, 1) if len(parts) > 1 else parts[0])
        for conv in self.convs[len(self.groups) :]:
            h = conv(h)
        return self.dense(torch.cat([h.flatten(1), latent], 1))


class ImageClassifier(nn.Module):
    """Images -> batch logits: k4/s2 conv blocks down to 2x2, then a 2x2 valid conv (ẑ_I, Z).

    The reference's 7 convs at 256 px; log2(image_size / 2) for other sizes.
    """

    def __init__(
        self, in_channels: int, n_out: int, image_size: int, filters: list[int] | None = None
    ):
        super().__init__()
        filters = list(filters or IMAGE_CLASSIFIER_FILTERS)
        blocks, cin, size = [], in_channels, image_size
        while size > 2 and size % 2 == 0:
            blocks.append(ConvBlock(cin, pick_filter(filters, len(blocks))))
            cin = pick_filter(filters, len(blocks) - 1)
            size //= 2
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(cin, n_out, size)  # 'valid': the remaining size x size map -> 1 x 1
        glorot_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> logits (N, n_out)."""
        return self.head(self.blocks(x)).flatten(1)
