"""From crop shards to model batches: the data spec, the vectorised collate, Ray Data and local iterators.

The collate turns an Arrow batch into tensors in one `np.frombuffer` (see `shards.decode_images`); images
stay uint8/uint16 until they reach the device, where `DataSpec.to_float` scales them to [0, 1]. The same
collate serves Ray Train workers (`iter_torch_batches`), Ray Data inference and the Ray-free local iterator
used by unit tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from raycell import constants as K
from raycell.data.categories import CategoryMap
from raycell.data.shards import ShardDataset, ShardError, decode_images

TRAIN_COLUMNS = [K.CELL_ID, K.IMAGE, K.LABEL, K.BATCH]


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


class CropCollate(ArrowBatchCollateFn):
    """Arrow batch -> {'x': uint8/int32 (N,C,H,W), 'y': label codes, 'b': batch codes (-1 = unseen)}.

    Labels outside the vocabulary raise (training data must be covered); batches outside it become -1,
    because inference on unseen batches is a normal use.
    """

    def __init__(self, spec: DataSpec, labels: CategoryMap, batches: CategoryMap):
        super().__init__()
        self.spec, self.labels, self.batches = spec, labels, batches

    def __call__(self, t: pa.Table) -> dict[str, torch.Tensor]:
        """Collate one batch."""
        imgs = decode_images(t, self.spec.shape, self.spec.dtype)
        # One copy out of the (read-only) Arrow buffer; uint16 has few torch kernels, widen it to int32.
        x = torch.from_numpy(imgs.astype(np.int32) if imgs.dtype == np.uint16 else imgs.copy())
        y = self.labels.encode(t.column(K.LABEL))
        b = self.batches.encode(t.column(K.BATCH), allow_unknown=True)
        return {"x": x, "y": torch.from_numpy(y), "b": torch.from_numpy(b)}


def ray_datasets(ds: ShardDataset, splits: tuple[str, ...] = (K.TRAIN, K.VAL),
                 columns: list[str] | None = None, block_size_mb: int = 8) -> dict:
    """One Ray Dataset per split, streaming the shards (file order shuffled for the training split).

    Small data sets need small blocks: Ray 2.60 packs files into 128 MiB blocks by default, and a data set
    that is one block cannot be shuffled or split across workers (spec/ray-2.60.md section 2).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = block_size_mb << 20
    out = {}
    for name in splits:
        # SPLIT is only needed for the filter: select it, filter, drop it.
        rd = ray.data.read_parquet(ds.shard_paths, shuffle="files" if name == K.TRAIN else None)
        rd = rd.select_columns(list(dict.fromkeys((columns or TRAIN_COLUMNS) + [K.SPLIT])))
        rd = rd.filter(expr=f"{K.SPLIT} == '{name}'").drop_columns([K.SPLIT])
        out[name] = rd.randomize_block_order() if name == K.TRAIN else rd
    return out


def local_batches(ds: ShardDataset, split: str, batch_size: int, collate: CropCollate,
                  shuffle: bool = False, seed: int = 0, columns: list[str] | None = None,
                  drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Ray-free iterator over one split (unit tests, benchmarks, small local jobs)."""
    t = ds.read_table(columns or TRAIN_COLUMNS, splits=[split])
    if shuffle:
        t = t.take(pa.array(np.random.default_rng(seed).permutation(t.num_rows)))
    stop = t.num_rows - (t.num_rows % batch_size if drop_last else 0)
    for s in range(0, stop, batch_size):
        yield collate(t.slice(s, batch_size))


def split_counts(ds: ShardDataset) -> dict[str, int]:
    """Rows per split from the manifest (falls back to reading the split column)."""
    counts = ds.manifest.get("counts_per_split")
    if counts:
        return dict(counts)
    col = ds.read_table([K.SPLIT]).column(K.SPLIT)
    vc = pc.value_counts(col).to_pylist()
    return {d["values"]: d["counts"] for d in vc}
