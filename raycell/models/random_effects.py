"""Variational random-effects layers (ARMED `RandomEffects`, `ClusterScaleBiasBlock`; spec 2.3).

`RandomEffects` is a bias-free dense layer u(z) = z @ W from the design matrix z (N, n_clusters) to
C units, with a mean-field Normal posterior over every weight W[k, c] and a fixed Normal prior
N(0, prior_scale^2). With a one-hot z it picks cluster k's row; with a soft z (an inferred Z for
unseen batches) it mixes the rows with z's weights; with an all-zero z it returns 0 (the random
effect vanishes).

`ClusterScaleBias` is the block that replaces BatchNorm in the random-effects encoder and decoder:
InstanceNorm(x) * (1 + gamma(z)) + beta(z), with gamma and beta two `RandomEffects` layers.
`RandomEffectsEncoder`, `RandomEffectsDecoder` and `LatentClassifier` are the parts of the
random-effects AEC built from them (assembled in `armed.py`).

Choices where the reference leaves room (documented here once):

* **KL**: the reference uses TFP's one-sample Monte-Carlo estimate (log q(w) - log p(w)); we use the
  analytic KL(N(mu, s^2) || N(0, p^2)) summed over the weights (the spec allows it). It has no
  sampling noise and does not depend on the forward pass, so it is the same in train and eval mode.
* **One weight sample per forward**, shared by the whole minibatch (as TFP's DenseVariational),
  drawn with the reparameterisation trick; eval mode uses the posterior means.
* **Initialisation** follows the reference: posterior means ~ N(0, loc_init_scale) (0.1 in the AEC)
  and the softplus pre-image rho of the s.d. ~ U[sp^-1(min) + sp^-1(range), sp^-1(min)], with
  s.d. = 1e-5 + softplus(rho): initial s.d.s between ~5e-5 and 0.01 with the AEC's values.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from raycell.models.layers import (
    BN_EPS,
    BlockEncoder,
    init_output_mean,
)

SIGMA_FLOOR = 1e-5  # the reference's s.d. = 1e-5 + softplus(rho); keeps the KL finite


def inverse_softplus(y: float) -> float:
    """The rho with softplus(rho) = y (y > 0)."""
    return math.log(math.expm1(y))


class RandomEffects(nn.Module):
    """u(z) = z @ W, W ~ q(W) = prod N(loc, (1e-5 + softplus(rho))^2), prior N(0, prior_scale^2).

    Args:
        n_clusters: Columns of the design matrix z (training batches).
        units: Output units C (channels of the block it modulates).
        loc_init_scale: s.d. of the N(0, .) initialisation of the posterior means.
        scale_init_min: Upper end of the initial s.d. range (before the 1e-5 floor).
        scale_init_range: Sets the lower end: rho starts in [sp^-1(min) + sp^-1(range), sp^-1(min)].
        prior_scale: s.d. of the fixed Normal prior.
    """

    def __init__(
        self,
        n_clusters: int,
        units: int,
        loc_init_scale: float = 0.1,
        scale_init_min: float = 0.01,
        scale_init_range: float = 0.005,
        prior_scale: float = 0.25,
    ):
        super().__init__()
        self.n_clusters, self.units = n_clusters, units
        self.prior_scale = prior_scale
        self.loc = nn.Parameter(torch.randn(n_clusters, units) * loc_init_scale)
        hi = inverse_softplus(scale_init_min)
        lo = hi + inverse_softplus(scale_init_range)
        self.rho = nn.Parameter(torch.empty(n_clusters, units).uniform_(lo, hi))

    @property
    def scale(self) -> torch.Tensor:
        """Posterior s.d. of every weight (n_clusters, units)."""
        return SIGMA_FLOOR + F.softplus(self.rho)

    def weight(self) -> torch.Tensor:
        """One reparameterised posterior sample in training mode; the posterior means in eval."""
        if self.training:
            return self.loc + self.scale * torch.randn_like(self.loc)
        return self.loc

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Design matrix z (N, n_clusters) with one-hot, soft or zero rows -> (N, units)."""
        return z.to(self.loc.dtype) @ self.weight()

    def kl(self) -> torch.Tensor:
        """Analytic KL(q || p) summed over all weights (a scalar).

        KL(N(m, s^2) || N(0, p^2)) = log(p / s) + (s^2 + m^2) / (2 p^2) - 1/2.
        """
        s, p = self.scale, self.prior_scale
        kl = math.log(p) - torch.log(s) + (s * s + self.loc * self.loc) / (2 * p * p) - 0.5
        return kl.sum()


class ClusterScaleBias(nn.Module):
    """InstanceNorm(affine) x (1 + gamma(z)) + beta(z): a per-batch scale and shift per channel.

    Replaces BatchNorm in the random-effects networks. Instance norm (eps 1e-3, as tfa's) removes
    each crop's own intensity scale; the random effects then put back a per-batch one, so the
    network can represent (and later separate) what is specific to an imaging batch.
    """

    def __init__(self, channels: int, n_clusters: int, **re_kwargs):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, eps=BN_EPS, affine=True)
        self.gamma = RandomEffects(n_clusters, channels, **re_kwargs)
        self.beta = RandomEffects(n_clusters, channels, **re_kwargs)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Feature map x (N, C, H, W) and z (N, n_clusters) -> (N, C, H, W)."""
        g = self.gamma(z)[:, :, None, None]
        b = self.beta(z)[:, :, None, None]
        return self.norm(x) * (1 + g) + b

    def re_layers(self) -> list[RandomEffects]:
        """The two random-effects layers (the KL is averaged over layers, as the reference)."""
        return [self.gamma, self.beta]


def mean_kl(layers: list[RandomEffects]) -> torch.Tensor:
    """Mean over layers of each layer's summed KL (the reference averages over the RE layers)."""
    if not layers:
        return torch.zeros(())
    return torch.stack([m.kl() for m in layers]).mean()


def one_hot_design(codes: torch.Tensor, n_batches: int) -> torch.Tensor:
    """Batch codes (int64) -> design matrix Z of float one-hot rows; unknown batches (-1) get a zero row.

    One-hot of codes + 1 over n_batches + 1 classes, without the first column (where -1 lands).
    """
    return F.one_hot(codes + 1, n_batches + 1)[:, 1:].float()


def design_matrix(z: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
    """The design matrix on x's device and dtype, or all zeros (no random effect) when none is given."""
    if z is None:
        return x.new_zeros(x.shape[0], n)
    return z.to(device=x.device, dtype=x.dtype)


class RandomEffectsEncoder(BlockEncoder):
    """Conv -> ClusterScaleBias(z) -> PReLU blocks, then Dense -> latent (linear, no BatchNorm)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        filters: list[int],
        strides: list[int],
        latent_dim: int,
        n_clusters: int,
        **re_kwargs,
    ):
        norm = functools.partial(ClusterScaleBias, n_clusters=n_clusters, **re_kwargs)
        super().__init__(in_channels, image_size, filters, strides, latent_dim, norm)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(x, z) -> (latent, [block outputs])."""
        return self.blocks(x, z)

    def re_layers(self) -> list[RandomEffects]:
        """Every random-effects layer (2 per block)."""
        return [r for n in self.norms for r in n.re_layers()]


class RandomEffectsDecoder(nn.Module):
    """Untied decoder: Dense -> reshape -> PReLU, then transposed convs with ClusterScaleBias(z).

    Each transposed conv is followed by ClusterScaleBias(z) and PReLU; the last one (to the image
    channels) by ClusterScaleBias(z) and a sigmoid.
    """

    def __init__(
        self, encoder: RandomEffectsEncoder, latent_dim: int, n_clusters: int, **re_kwargs
    ):
        super().__init__()
        c, h, w = encoder.out_shape
        self.shape = (c, h, w)
        self.dense = nn.Linear(latent_dim, c * h * w)
        self.act0 = nn.PReLU(c, init=0.0)
        convs = list(encoder.convs)[::-1]
        # Own kernels with the mirrored shapes; stride 1 crops [1:-2] to undo TF 'same' padding.
        self.tconvs = nn.ModuleList(
            nn.ConvTranspose2d(
                cv.out_channels,
                cv.in_channels,
                4,
                stride=cv.stride,
                padding=0 if cv.stride[0] == 1 else 1,
            )
            for cv in convs
        )
        self.norms = nn.ModuleList(
            ClusterScaleBias(cv.in_channels, n_clusters, **re_kwargs) for cv in convs
        )
        self.acts = nn.ModuleList(nn.PReLU(cv.in_channels, init=0.0) for cv in convs[:-1])

    def init_output(self, mean: list[float] | None) -> None:
        """Start the sigmoid output at the data's mean intensity (the last instance norm's bias)."""
        init_output_mean(self.norms[-1].norm.bias, mean)

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
        self.target = (
            nn.Sequential(nn.Linear(latent_dim, 32), nn.ReLU(), nn.Linear(32, n_out))
            if target
            else None
        )
        self.cluster = nn.Sequential(
            nn.Linear(latent_dim, 32),
            nn.ReLU(),
            nn.Linear(32, 16),
            nn.ReLU(),
            nn.Linear(16, n_clusters),
        )

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Latent -> (phenotype logits or None, batch logits)."""
        return (self.target(latent) if self.target is not None else None), self.cluster(latent)
