"""The inferred-Z table (`raycell infer-z` writes it, `infer` reads it): names, reader, fingerprint.

A format module, so the predictor and the batch inference read Z without importing the Z-predictor's
training code (which itself runs the batch inference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from raycell import constants as K
from raycell.config import ConfigError
from raycell.formats.arrays import list_matrix
from raycell.utils.io import read_json

Z_PARQUET, Z_JSON, Z_WEIGHTS = "inferred_z.parquet", "inferred_z.json", "zpredictor.pt"


def _z_paths(source: str | Path) -> tuple[Path, Path]:
    p = Path(source)
    if p.suffix == ".parquet":
        return p, p.with_suffix(".json")
    return p / Z_PARQUET, p / Z_JSON


def read_inferred_z(
    source: str | Path, batches: list[str] | None = None
) -> tuple[pa.Array, np.ndarray]:
    """Read an infer-z output: (cell_id array, Z (N, n_batches) float32).

    Checked here, on the driver as well as in every inference actor, so a wrong `infer.z_source`
    is one line naming it rather than a Ray actor trace.

    Args:
        source: The infer-z output folder, or its `inferred_z.parquet`.
        batches: The model's training batches (Z column order), checked against the file's.

    Raises:
        FileNotFoundError: No inferred Z there (names `raycell infer-z`).
        ConfigError: Not a Z table (unreadable, wrong columns), or its batch vocabulary differs from
            the model's.
    """
    import pyarrow.parquet as pq

    p = Path(source)
    if p.is_file() and p.suffix != ".parquet":
        raise ConfigError(
            f"infer.z_source {p} is a file but not a Z table: give the folder written by "
            "`raycell infer-z` (or its inferred_z.parquet)"
        )
    pq_path, js_path = _z_paths(source)
    if not pq_path.is_file():
        raise FileNotFoundError(
            f"inferred Z not found at {pq_path} (infer.z_source): run "
            "`raycell infer-z` first; it writes inferred_z.parquet into "
            "infer.z_out"
        )
    not_z = (
        f"infer.z_source {pq_path} is not a Z table written by `raycell infer-z` "
        f"(expected columns {K.CELL_ID!r} and 'z', a fixed-size list of floats)"
    )
    try:
        schema = pq.read_schema(pq_path)
        if K.CELL_ID not in schema.names or "z" not in schema.names:
            raise ConfigError(f"{not_z}; it has columns {schema.names}")
        if not pa.types.is_fixed_size_list(schema.field("z").type):
            raise ConfigError(f"{not_z}; its 'z' column is {schema.field('z').type}")
        t = pq.read_table(pq_path, columns=[K.CELL_ID, "z"])
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConfigError(f"{not_z}; it cannot be read: {exc}") from None
    z = list_matrix(t.column("z"), "z", str(pq_path), ConfigError)
    n = z.shape[1]
    if js_path.is_file():
        try:
            vocab = read_json(js_path, "inferred Z metadata")["batches"]["values"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"infer.z_source: {js_path} is not an infer-z summary ({exc}); re-run "
                "`raycell infer-z`"
            ) from None
        if batches is not None and list(vocab) != list(batches):
            raise ConfigError(
                f"inferred Z at {pq_path} (infer.z_source) has columns for batches "
                f"{vocab}, but the model was trained on {list(batches)}: re-run "
                "`raycell infer-z` with infer.checkpoint set to this model"
            )
    if batches is not None and n != len(batches):
        raise ConfigError(
            f"inferred Z at {pq_path} (infer.z_source) has {n} columns, the model has "
            f"{len(batches)} batches: re-run `raycell infer-z` with infer.checkpoint set "
            "to this model"
        )
    return t.column(K.CELL_ID).combine_chunks(), z


def z_fingerprint(source: str | Path) -> dict:
    """Where an inferred Z is and a hash of its parquet: recorded by `infer` with every prediction shard."""
    from raycell.formats.checkpoint import file_sha256

    pq_path, _ = _z_paths(source)
    pq_path = pq_path.absolute()
    return {"path": str(pq_path), "sha256": file_sha256(pq_path)}
