"""Ingest: raw microscopy fields of view -> single-cell crop shards, and ARMED npz import.

Modules, in pipeline order: `sources` (files, regex metadata, fields of view, plate map), `images`
(reading, Z projection, illumination correction, normalisation), `segment` (nuclei and cell bodies;
scoring against true masks), `crops` (border filter, crops, morphology features), `run` (the Ray
Data pipeline, `run_ingest`), `armed` (`import_armed`).

The public functions are imported lazily so that `import raycell.ingest` stays cheap (no Ray, no
skimage).
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_ingest", "import_armed", "evaluate_segmentation", "match_instances", "IngestError"]

_WHERE = {
    "run_ingest": "raycell.ingest.run",
    "import_armed": "raycell.ingest.armed_npz",
    "evaluate_segmentation": "raycell.ingest.segment",
    "match_instances": "raycell.ingest.segment",
    "IngestError": "raycell.ingest.sources",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'raycell.ingest' has no attribute {name!r}")
