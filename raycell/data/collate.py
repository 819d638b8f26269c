"""Arrow batch of crop rows -> tensors, without Ray (the Ray collate class in `dataset` wraps it)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from raycell import constants as K
from raycell.formats.categories import CategoryMap
from raycell.formats.shards import decode_images
from raycell.formats.spec import DataSpec


def collate_crops(
    t: pa.Table,
    spec: DataSpec,
    labels: CategoryMap,
    batches: CategoryMap,
    heads: list[CategoryMap] | None = None,
) -> dict[str, torch.Tensor]:
    """The collate itself, as a function (benchmarks call it without Ray's collate base class).

    With `heads` (weak-label columns), y is (N, H): one class code per head, in the heads' order.
    """
    imgs = decode_images(t, spec.shape, spec.dtype)
    # One copy out of the (read-only) Arrow buffer; uint16 has few torch kernels, widen it to int32.
    x = torch.from_numpy(imgs.astype(np.int32) if imgs.dtype == np.uint16 else imgs.copy())
    if heads:
        y = np.stack([h.encode(t.column(h.column)) for h in heads], axis=1)
    else:
        y = labels.encode(t.column(K.LABEL))
    b = batches.encode(t.column(K.BATCH), allow_unknown=True)
    return {"x": x, "y": torch.from_numpy(y), "b": torch.from_numpy(b)}
