"""Building blocks shared by the ARMED model family: conv blocks, the tied decoder, heads.

Keras defaults of the reference (spec/armed-aec.md section 2) are kept where they change behaviour:
kernel 4 with TF 'same' padding, BatchNorm eps 1e-3, Glorot-uniform weights with zero biases, PReLU
starting at slope 0 (ReLU). Two deliberate deviations: PReLU has one slope per *channel*, not per element
(the reference's per-element slopes add ~32 M parameters at 256 px); and BatchNorm running statistics use
PyTorch's momentum 0.1 rather than Keras' 0.99 (PyTorch 0.01), which needs thousands of steps before the
eval-mode statistics settle: short runs would otherwise evaluate with near-initial statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM, BN_EPS = 0.1, 1e-3


def glorot_init(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases for every conv and linear layer (Keras defaults)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def same_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Apply a k4 conv with TF 'same' padding: stride 1 pads 1 before / 2 after, stride 2 pads 1."""
    if conv.stride[0] == 1:
        return conv(F.pad(x, (1, 2, 1, 2)))
    return conv(x)


def make_conv(cin: int, cout: int, stride: int, kernel: int = 4) -> nn.Conv2d:
    """A k4 conv whose padding `same_conv` completes."""
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=0 if stride == 1 else 1)


def tied_conv_transpose(x: torch.Tensor, conv: nn.Conv2d, bias: torch.Tensor) -> torch.Tensor:
    """The transpose of `conv` with its own weight tensor (tied) and a separate bias.

    A conv weight (out, in, k, k) is already the (in, out, k, k) layout conv_transpose2d wants, so the
    transposed op maps conv's output channels back to its input channels. Stride 1 undoes the 1/2 'same'
    padding by cropping [1:-2].
    """
    if conv.stride[0] == 1:
        return F.conv_transpose2d(x, conv.weight, bias)[..., 1:-2, 1:-2]
    return F.conv_transpose2d(x, conv.weight, bias, stride=conv.stride, padding=1)


class ConvEncoder(nn.Module):
    """Conv -> BN -> PReLU blocks, then Dense -> latent (-> BatchNorm), returning every block's output.

    The per-block outputs feed the adversary of the domain-adversarial models.
    """

    def __init__(self, in_channels: int, image_size: int, filters: list[int], strides: list[int],
                 latent_dim: int, latent_norm: bool = True):
        super().__init__()
        if len(filters) != len(strides):
            raise ValueError(f"filters {filters} and strides {strides} must have the same length")
        down = 1
        for s in strides:
            down *= s
        if image_size % down:
            raise ValueError(f"image_size {image_size} is not divisible by the total stride {down}")
        chans = [in_channels, *filters]
        self.convs = nn.ModuleList(make_conv(chans[i], chans[i + 1], strides[i]) for i in range(len(filters)))
        self.norms = nn.ModuleList(nn.BatchNorm2d(f, momentum=BN_MOMENTUM, eps=BN_EPS) for f in filters)
        self.acts = nn.ModuleList(nn.PReLU(f, init=0.0) for f in filters)
        self.out_size = image_size // down
        self.out_shape = (filters[-1], self.out_size, self.out_size)
        self.dense = nn.Linear(filters[-1] * self.out_size**2, latent_dim)
        self.latent_norm = nn.BatchNorm1d(latent_dim, momentum=BN_MOMENTUM, eps=BN_EPS) if latent_norm \
            else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (N, C, H, W) in [0, 1] -> (latent (N, D), [block outputs])."""
        feats = []
        for conv, norm, act in zip(self.convs, self.norms, self.acts):
            x = act(norm(same_conv(x, conv)))
            feats.append(x)
        z = self.latent_norm(self.dense(x.flatten(1)))
        return z, feats


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
        self.norms = nn.ModuleList(nn.BatchNorm2d(cv.in_channels, momentum=BN_MOMENTUM, eps=BN_EPS)
                                   for cv in convs)
        self.acts = nn.ModuleList(nn.PReLU(cv.in_channels, init=0.0) for cv in convs[:-1])

    def init_output(self, mean: list[float] | None) -> None:
        """Start the sigmoid output at the data's mean intensity (bias of the last BatchNorm = logit).

        With the reference's BN -> sigmoid output every pixel starts at 0.5, while microscopy crops are
        mostly dark background; the first epochs are then spent learning a global offset.
        """
        if mean is None:
            return
        m = torch.as_tensor(mean, dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
        with torch.no_grad():
            self.norms[-1].bias.copy_(torch.log(m / (1 - m)))

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
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.3), nn.Linear(hidden, n_out))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_out)."""
        return self.net(z)
