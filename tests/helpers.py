"""Helpers several test files share: small inputs made on the fly and the configs that read them.

Plain functions (fixtures stay in each test file or in conftest.py), imported as `from helpers import ...`
(pytest puts this folder on the path, as it does for conftest.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# what a data set's manifest says about the cells (not when or by whom it was made, nor its shard list)
CELL_KEYS = (
    "n_cells",
    "channel_names",
    "channels",
    "crop_size",
    "dtype",
    "label_vocab",
    "batch_vocab",
    "group_vocab",
    "weak_label_columns",
    "counts_per_split",
    "counts_per_batch",
    "channel_stats",
)


def write_small_raw(root: Path) -> Path:
    """The small synthetic raw set (2 plates x 2 wells x 2 fields, 160 px, ~10 cells each) at `root`.

    Basic batch effects: the easy images, whose cell counts and areas the ingest tests check.
    """
    from raycell.data.synthetic_raw import write_synthetic_raw

    write_synthetic_raw(
        root,
        seed=3,
        n_batches=2,
        n_lines=4,
        wells=2,
        fields=2,
        fov_size=160,
        cells_per_fov=10,
        effects="basic",
    )
    return root


def raw_ingest_config(src: Path, out: Path, platemap: Path | str = "", **ingest):
    """The ingest config for images in `write_synthetic_raw`'s layout; `ingest` overrides keys.

    Lists and booleans are written as JSON (`[0, 1]`, `true`); other values as they print.
    """
    from raycell.config import load_config
    from raycell.data.synthetic_raw import DEFAULT_PATTERN

    sets = [
        f"ingest.input={src}",
        f"ingest.out={out}",
        f"ingest.platemap={platemap}",
        f"ingest.pattern={DEFAULT_PATTERN}",
        "ingest.channels=[nucleus, cytoplasm]",
        "ingest.nucleus_channel=nucleus",
        "ingest.cytoplasm_channel=cytoplasm",
        "ingest.z_projection=best-focus",
        "ingest.crop_size=32",
        "ray.progress=false",
    ]
    sets += [
        f"ingest.{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}"
        for k, v in ingest.items()
    ]
    return load_config(None, sets)


# the tiny data set's training batches (2 unseen: batch06, batch07)
SEEN = tuple(f"batch{i:02d}" for i in range(6))


def untrained_checkpoint(
    data: Path,
    path: Path,
    model_type: str = "conventional",
    shape: tuple[int, int, int] | None = None,
) -> Path:
    """An untrained checkpoint of `model_type` at `path` for the crop data set `data` (seen: `SEEN`).

    For tests of what reads a checkpoint (output checks, locks, inference refusals): no training
    needed. `shape`: made for crops of this (C, H, W) instead of the data set's.
    """
    import torch

    from raycell import constants as K
    from raycell.formats.categories import CategoryMap
    from raycell.formats.shards import open_dataset
    from raycell.formats.spec import DataSpec
    from raycell.models import create_model
    from raycell.models.checkpoint import save_checkpoint

    ds = open_dataset(data)
    spec = DataSpec.from_dataset(ds)
    if shape is not None:
        spec = DataSpec(spec.channel_names, shape, spec.dtype)
    torch.manual_seed(0)
    model = create_model(
        model_type,
        in_channels=spec.shape[0],
        n_classes=2,
        n_batches=len(SEEN),
        preset="tiny",
        image_size=spec.shape[1],
    )
    return save_checkpoint(
        path,
        model,
        None,
        epoch=0,
        spec=spec,
        labels=CategoryMap(K.LABEL, tuple(ds.manifest.label_vocab)),
        batches=CategoryMap(K.BATCH, SEEN),
        config={},
        metrics={},
    )


def dataset_fingerprint(folder: Path) -> dict:
    """Every file's bytes (by hash), and the manifest apart from its creation time."""
    files = {
        p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "dataset.json"
    }
    manifest = json.loads((folder / "dataset.json").read_text())
    manifest.pop("created")
    return {"files": files, "manifest": manifest}
