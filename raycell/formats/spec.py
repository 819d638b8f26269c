"""`DataSpec`: what a model expects as input (channels, crop shape, dtype, normalisation), saved in
every checkpoint.

Ray-free, so loading a checkpoint or checking a data set against a model never imports Ray. Every path
where crops become model input (training, validation, batch inference, embedding, the Z-predictor, the
report's reconstructions) calls `DataSpec.to_float`, so the normalisation travels with the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from raycell.constants import DEFAULT_NORMALIZE, NORMALIZE_MODES, NormalizeMode
from raycell.formats.shards import ShardDataset, ShardError

# Per-crop normalisation: the low / high percentile of each crop channel that map to 0 / 1.
CROP_LOW_PCT, CROP_HIGH_PCT = 1.0, 99.0
_EPS = (
    1e-6  # the smallest (high - low) spread divided by: a constant crop channel becomes 0, not NaN
)
# What a spec saved before `normalize` existed was trained with (not a default: a fact about old files).
_NORMALIZE_BEFORE_THE_KEY = "global"


def normalize_crops(
    x: torch.Tensor, low_pct: float = CROP_LOW_PCT, high_pct: float = CROP_HIGH_PCT
) -> torch.Tensor:
    """Per crop and per channel: (x - low percentile) / (high - low percentile), clipped to [0, 1].

    Removes each crop's own gain and offset, which otherwise let a model read the imaging batch from
    a crop's overall brightness. x: float (..., H, W); every leading index is normalised on its own.
    """
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1])
    n = flat.shape[1]
    # Percentiles rather than min/max, so one hot pixel or debris speck does not set a crop's scale.
    # kthvalue (an order statistic) rather than torch.quantile: quantile refuses inputs of more than
    # 2**24 elements (a large batch of crops), and an order statistic is exactly equivariant to a
    # gain and an offset (kth(a*x + b) = a*kth(x) + b), so the output is too.
    k_lo = min(n, max(1, int(round(low_pct / 100.0 * (n - 1))) + 1))
    k_hi = min(n, max(1, int(round(high_pct / 100.0 * (n - 1))) + 1))
    lo = flat.kthvalue(k_lo, dim=1, keepdim=True).values
    hi = flat.kthvalue(k_hi, dim=1, keepdim=True).values
    out = (flat - lo).div_((hi - lo).clamp_min_(_EPS)).clamp_(0.0, 1.0)
    return out.reshape(x.shape)


@dataclass(frozen=True)
class DataSpec:
    """What the model expects as input; saved in every checkpoint so inference preprocesses identically."""

    channel_names: tuple[str, ...]
    shape: tuple[int, int, int]  # (C, H, W)
    dtype: str  # 'uint8' | 'uint16'
    # 'global' (the data set's scale) or 'crop' (per crop and channel)
    normalize: NormalizeMode = DEFAULT_NORMALIZE

    @property
    def scale(self) -> float:
        """Multiplier taking stored integers to [0, 1] (global normalisation: the data set's own scale)."""
        return 1.0 / (255.0 if self.dtype == "uint8" else 65535.0)

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        """Stored integers (on any device) -> float32 model input in [0, 1], normalised as `normalize` says.

        'global': times the data set's scale (the same for every crop); 'crop': then `normalize_crops`.
        """
        x = x.float().mul_(self.scale)
        if self.normalize == "crop":
            x = normalize_crops(x)
        return x

    @classmethod
    def from_dataset(
        cls, ds: ShardDataset, normalize: NormalizeMode = DEFAULT_NORMALIZE
    ) -> "DataSpec":
        """The spec of a data set's crops (with the model input's normalisation, `data.normalize`)."""
        return cls(tuple(ds.manifest.channel_names), ds.shape, ds.dtype, normalize)

    def with_normalize(self, normalize: NormalizeMode) -> "DataSpec":
        """The same spec with another normalisation."""
        return replace(self, normalize=normalize)

    def check_compatible(self, ds: ShardDataset, model: str = "the model") -> None:
        """Raise `ShardError` if a data set's crops differ from what a model was trained on.

        Channel count, crop size and dtype must match (the network's input layer and the intensity
        scale depend on them); differently spelt channel names are allowed, since ingest names are free.
        """
        other = DataSpec.from_dataset(ds)
        what = []
        if other.shape[0] != self.shape[0]:
            what.append(
                f"{other.shape[0]} channel(s) {list(other.channel_names)} vs "
                f"{self.shape[0]} {list(self.channel_names)}"
            )
        if other.shape[1:] != self.shape[1:]:
            what.append(
                f"crop size {other.shape[1]}x{other.shape[2]} vs {self.shape[1]}x{self.shape[2]}"
            )
        if other.dtype != self.dtype:
            what.append(f"dtype {other.dtype} vs {self.dtype}")
        if what:
            raise ShardError(
                f"data set {ds.root} does not fit {model}: {'; '.join(what)} (data vs model); "
                "run the model on data made with the same crop size, channels and dtype "
                "(ingest.crop_size / synth.crop_size), or train a model on this data"
            )

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        """Inverse of `to_dict`; a spec saved before `normalize` existed is 'global' (what it was
        trained with).

        Raises:
            ValueError: a saved `normalize` this version does not know (the caller names the file).
        """
        normalize = d.get("normalize", _NORMALIZE_BEFORE_THE_KEY)
        if normalize not in NORMALIZE_MODES:  # a file's value: the config's checks never saw it
            raise ValueError(
                f"data_spec.normalize must be {' or '.join(NORMALIZE_MODES)}, got {normalize!r}"
            )
        return cls(tuple(d["channel_names"]), tuple(d["shape"]), d["dtype"], normalize)
