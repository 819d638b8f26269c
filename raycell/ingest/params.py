"""The ingest parameters every ingest step reads: the config's `ingest` section, paths made absolute.

Each field, its default and its help live once, in `raycell.config.IngestConfig`; `IngestParams`
adds no field. It is built from the section in one place (`IngestParams.from_config`), travels to
the Ray tasks as it is (pickled with the task's arguments), and is written to the data set's
manifest in one place (`IngestParams.record`), which a re-run compares to decide whether the data
set on disk was made with the same parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os

from raycell.config import IngestConfig

# Paths the Ray tasks open: absolute, since a worker's working directory is not the driver's.
PATH_KEYS = (
    "input",
    "out",
    "platemap",
    "cellpose_model",
    "masks",
    "cell_masks",
    "objects",
    "objects_images",
)
# Settings that say where and whether to write, or on which device, not what the crops are: not
# part of the record (a data set made on a CPU is the one a GPU run would make).
_NOT_RECORDED = ("overwrite", "out", "cellpose_gpu", "cellpose_gpus_per_task")


@dataclasses.dataclass
class IngestParams(IngestConfig):
    """`IngestConfig` with its paths absolute: what the planning, statistics and crop steps read.

    Built directly (`IngestParams(crop_size=32)`) it holds the config's defaults, which is what
    the segmentation scoring tools use.
    """

    @classmethod
    def from_config(cls, ingest: IngestConfig) -> IngestParams:
        """A copy of the config's `ingest` section, the set paths made absolute (`~` expanded)."""
        d = dataclasses.asdict(ingest)  # a deep copy: the tasks never share the config's lists
        for k in PATH_KEYS:
            if d[k]:
                d[k] = os.path.abspath(os.path.expanduser(d[k]))
        return cls(**d)

    def record(self) -> dict:
        """The parameters as the manifest records them (JSON types), `_NOT_RECORDED` left out."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_RECORDED}
        return json.loads(json.dumps(d))
