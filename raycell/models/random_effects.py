"""Variational random-effects layers (ARMED `RandomEffects`, `ClusterScaleBiasBlock`; spec 2.3).

`RandomEffects` is a bias-free dense layer u(z) = z @ W from the design matrix z (N, n_clusters) to
C units, with a mean-field Normal posterior over every weight W[k, c] and a fixed Normal prior
N(0, prior_scale^2). With a one-hot z it picks cluster k's row; with a soft z (an inferred Z for
unseen batches) it mixes the rows with z's weights; with an all-zero z it returns 0 (the random
effect vanishes).

`ClusterScaleBias` is the block that replaces BatchNorm in the random-effects encoder and decoder:
InstanceNorm(x) * (1 + gamma(z)) + beta(z), with gamma and beta two `RandomEffects` layers.

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

import math

import torch
import torch.nn.functional as F
from torch import nn

from raycell.models.layers import BN_EPS

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

    def __init__(self, n_clusters: int, units: int, loc_init_scale: float = 0.1,
                 scale_init_min: float = 0.01, scale_init_range: float = 0.005,
                 prior_scale: float = 0.25):
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
