"""Ingest: raw microscopy fields of view -> single-cell crop shards, and ARMED npz import.

Modules, in pipeline order: `sources` (files, regex metadata, fields of view, plate map), `images`
(reading, Z projection, illumination correction, normalisation, scale check), `segment` (nuclei and
cell bodies), `crops` (border filter, crops, morphology features). The `raycell ingest` job is
split by step: `plan` (checks; files -> fields of view, no pixels read), `stats` (the statistics
pass: illumination functions, normalisation ranges), `fov` (the crop pass, one field of view at a
time), `tasks` (the Ray Data plumbing both passes share) and `driver` (`ingest_fields`: streams the
crops into shards, writes rejects, summary and manifest). Beside it: `segmentation_eval` (scoring
against true masks, `raycell segmentation-eval`) and `armed_npz` (`import_armed`).
Every step reads the same parameters, `params.IngestParams` (the `ingest` config section).

The public functions are imported lazily so that `import raycell.ingest` stays cheap (no Ray, no
skimage).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ingest_fields",
    "import_armed",
    "evaluate_segmentation",
    "match_instances",
    "IngestError",
]

_WHERE = {
    "ingest_fields": "raycell.ingest.driver",
    "import_armed": "raycell.ingest.armed_npz",
    "evaluate_segmentation": "raycell.ingest.segmentation_eval",
    "match_instances": "raycell.ingest.segmentation_eval",
    "IngestError": "raycell.ingest.sources",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'raycell.ingest' has no attribute {name!r}")
