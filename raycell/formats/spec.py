"""`DataSpec`: what a model expects as input (channels, crop shape, dtype), saved in every checkpoint.

Ray-free, so loading a checkpoint or checking a data set against a model never imports Ray.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from raycell.formats.shards import ShardDataset, ShardError


@dataclass(frozen=True)
class DataSpec:
    """What the model expects as input; saved in every checkpoint so inference preprocesses identically."""

    channel_names: tuple[str, ...]
    shape: tuple[int, int, int]  # (C, H, W)
    dtype: str  # 'uint8' | 'uint16'

    @property
    def scale(self) -> float:
        """Multiplier taking stored integers to [0, 1] (global normalisation: the data set's own scale)."""
        return 1.0 / (255.0 if self.dtype == "uint8" else 65535.0)

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        """Stored integers (on any device) -> float32 in [0, 1]."""
        return x.float().mul_(self.scale)

    @classmethod
    def from_dataset(cls, ds: ShardDataset) -> "DataSpec":
        """The spec of a data set's crops."""
        return cls(tuple(ds.manifest["channel_names"]), ds.shape, ds.dtype)

    def check_compatible(self, ds: ShardDataset, model: str = "the model") -> None:
        """Raise `ShardError` if a data set's crops differ from what a model was trained on.

        Channel count, crop size and dtype must match (the network's input layer and the intensity
        scale depend on them); differently spelt channel names are allowed, since ingest names are free.
        """
        other = DataSpec.from_dataset(ds)
        what = []
        if other.shape[0] != self.shape[0]:
            what.append(f"{other.shape[0]} channel(s) {list(other.channel_names)} vs "
                        f"{self.shape[0]} {list(self.channel_names)}")
        if other.shape[1:] != self.shape[1:]:
            what.append(f"crop size {other.shape[1]}x{other.shape[2]} vs {self.shape[1]}x{self.shape[2]}")
        if other.dtype != self.dtype:
            what.append(f"dtype {other.dtype} vs {self.dtype}")
        if what:
            raise ShardError(f"data set {ds.root} does not fit {model}: {'; '.join(what)} (data vs model); "
                             "run the model on data made with the same crop size, channels and dtype "
                             "(ingest.crop_size / synth.crop_size), or train a model on this data")

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        """Inverse of `to_dict`."""
        return cls(tuple(d["channel_names"]), tuple(d["shape"]), d["dtype"])
