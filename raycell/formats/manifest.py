"""The data-set manifest (`dataset.json`): what a crop-shard folder holds, as one typed record.

Every stage reads a data set through `DatasetManifest`; `from_dict` is the one place that reads the JSON
and `_upgrade` the one place that gives manifests written by earlier versions the defaults of the keys
they lack. `to_dict` writes the same JSON keys as before, so older raycell versions read the files too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from raycell import constants as K
from raycell.errors import UserError
from raycell.utils.io import atomic_write_json, read_json


class ShardError(UserError, ValueError):
    """A data set folder, manifest or shard does not follow the crop-shard contract."""


# sections only some producers write: left out of the JSON when empty, as those producers always did
_SECTIONS = (
    "suggested_unseen",
    "ground_truth",
    "batch_effects",
    "unseen_extremes",
    "armed",
    "ingest",
    "split_params",
    "compaction",
)


@dataclass
class DatasetManifest:
    """The manifest of a crop-shard data set folder.

    Attributes:
        schema_version: crop-shard format version (`constants.SCHEMA_VERSION` when written).
        channel_names: one name per image channel, in the crops' channel order.
        channels: number of channels (the length of `channel_names`).
        crop_size: (height, width) of every crop, in pixels.
        dtype: stored pixel type, 'uint8' or 'uint16'.
        label_vocab: sorted phenotype labels present; the class order of models trained on the set.
        batch_vocab: sorted batches present; the Z column order of models trained on the set.
        shards: the shard files in order, each `{"file": "shards/part-00000.parquet", "rows": n}`
            (relative to the folder; the earliest manifests may lack `rows`).
        created: local time the manifest was written (ISO 8601 without zone); default "".
        n_cells: rows over all shards; default: the sum of the shards' `rows`.
        group_vocab: sorted values of the `group` column (cell line, donor); default [].
        weak_label_columns: extra metadata columns usable as weak labels; default [].
        counts_per_split: rows per split value ('unassigned' before `raycell split`); default {}
            (readers that need counts then count the split column).
        counts_per_batch: rows per batch; default {}.
        channel_stats: per channel name, the pixel statistics (`mean`, `std`, percentiles, in stored
            units) from the writers' exact histograms; default {}.
        params: the producer's parameters (`generator` or `stage` names it); default {}.
        software: versions of the packages that wrote the set; default {}.
        suggested_unseen: batches the producer suggests to hold out whole (`synth`, `import-armed`);
            default [] (then `split` needs `split.unseen`).
        ground_truth: `synth`'s true generating parameters (for checks); default None.
        batch_effects: `synth --effects varied`: each batch's mechanism strengths; default None.
        unseen_extremes: `synth --effects varied`: each unseen batch's extreme mechanism; default None.
        armed: `import-armed`: the source files, cluster order, counts, label encoding; default None.
        ingest: `ingest`: parameters, fingerprint, normalisation, illumination, checks; default None.
        split_params: `split`'s arguments (`unseen`, `group_by`, `stratify`, `fractions`, `seed`,
            `val_batches`); default None (not split yet); `val_batches` defaults to [].
        compaction: `compact_dataset`: the source folder and shard sizes; default None.
        extra: keys this version does not know (written by a newer or a custom producer), kept as
            they were so that rewriting the manifest loses nothing.
    """

    schema_version: int
    channel_names: list[str]
    channels: int
    crop_size: tuple[int, int]
    dtype: str
    label_vocab: list[str]
    batch_vocab: list[str]
    shards: list[dict]
    created: str = ""
    n_cells: int = 0
    group_vocab: list[str] = field(default_factory=list)
    weak_label_columns: list[str] = field(default_factory=list)
    counts_per_split: dict[str, int] = field(default_factory=dict)
    counts_per_batch: dict[str, int] = field(default_factory=dict)
    channel_stats: dict[str, dict] = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    software: dict = field(default_factory=dict)
    suggested_unseen: list[str] = field(default_factory=list)
    ground_truth: dict | None = None
    batch_effects: dict | None = None
    unseen_extremes: list[dict] | None = None
    armed: dict | None = None
    ingest: dict | None = None
    split_params: dict | None = None
    compaction: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict, where: str | os.PathLike = K.MANIFEST) -> DatasetManifest:
        """The manifest from its JSON object (any version up to this one's `SCHEMA_VERSION`).

        Raises:
            ShardError: not a JSON object, a required key missing or malformed, or a newer schema
                version.
        """
        if not isinstance(raw, dict):
            raise ShardError(f"{where}: manifest must be a JSON object")
        missing = [k for k in K.MANIFEST_REQUIRED_KEYS if k not in raw]
        if missing:
            raise ShardError(f"{where}: manifest is missing key(s) {missing}")
        if raw["schema_version"] > K.SCHEMA_VERSION:
            raise ShardError(
                f"{where}: schema_version {raw['schema_version']} is newer than this "
                f"raycell understands ({K.SCHEMA_VERSION}); upgrade raycell"
            )
        try:
            d = _upgrade(raw)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ShardError(
                f"{where}: manifest holds a malformed value ({type(exc).__name__}: {exc}); "
                "re-create the data set"
            ) from None
        known = {f.name for f in fields(cls)} - {"extra"}
        m = cls(**{k: v for k, v in d.items() if k in known})
        m.extra = {k: v for k, v in d.items() if k not in known}
        return m

    def to_dict(self) -> dict:
        """The JSON object of `dataset.json` (the producer-only sections only when set)."""
        d = {
            "schema_version": self.schema_version,
            "created": self.created,
            "n_cells": self.n_cells,
            "channel_names": list(self.channel_names),
            "channels": self.channels,
            "crop_size": list(self.crop_size),
            "dtype": self.dtype,
            "label_vocab": list(self.label_vocab),
            "batch_vocab": list(self.batch_vocab),
            "group_vocab": list(self.group_vocab),
            "weak_label_columns": list(self.weak_label_columns),
            "counts_per_split": dict(self.counts_per_split),
            "counts_per_batch": dict(self.counts_per_batch),
            "channel_stats": self.channel_stats,
            "shards": list(self.shards),
            "params": self.params,
            "software": self.software,
        }
        for k in _SECTIONS:
            v = getattr(self, k)
            if v:
                d[k] = v
        d.update(self.extra)
        return d

    def write(self, folder: str | os.PathLike) -> Path:
        """Write `folder/dataset.json` atomically (the last file of a data set: it marks it complete)."""
        path = Path(folder) / K.MANIFEST
        atomic_write_json(path, self.to_dict())
        return path

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every crop."""
        h, w = self.crop_size
        return self.channels, h, w


def _upgrade(raw: dict) -> dict:
    """A copy of a manifest of any earlier version with every key this version reads.

    The defaults of the optional keys are here and nowhere else (see `DatasetManifest`).
    """
    d = dict(raw)
    d["channel_names"] = [str(c) for c in d["channel_names"]]
    d["channels"] = int(d["channels"])
    h, w = d["crop_size"]
    d["crop_size"] = (int(h), int(w))
    d["label_vocab"] = [str(v) for v in d["label_vocab"]]
    d["batch_vocab"] = [str(v) for v in d["batch_vocab"]]
    d["shards"] = [dict(s) for s in d["shards"]]
    d.setdefault("created", "")
    d.setdefault("n_cells", sum(int(s.get("rows", 0)) for s in d["shards"]))
    d["n_cells"] = int(d["n_cells"])
    for key in ("group_vocab", "weak_label_columns", "suggested_unseen"):
        d[key] = list(d.get(key) or [])
    for key in ("counts_per_split", "counts_per_batch", "channel_stats", "params", "software"):
        d[key] = dict(d.get(key) or {})
    if d.get("split_params") is not None:
        d["split_params"] = {"val_batches": [], **d["split_params"]}
    return d


def read_dataset_manifest(path: str | os.PathLike) -> DatasetManifest:
    """Read a `dataset.json` file (or the one in a folder), upgraded to this version's fields.

    Raises:
        ShardError: the file is missing, not JSON, or not a manifest this version can read.
    """
    path = Path(path)
    if path.is_dir():
        path = path / K.MANIFEST
    try:
        raw = read_json(path, "manifest")
    except ValueError as exc:
        raise ShardError(str(exc)) from None
    return DatasetManifest.from_dict(raw, path)
