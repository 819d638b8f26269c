"""Prediction shards (written by `raycell infer`): reading them back, checked against `predictions.json`.

`<predictions>/shards/part-XXXXX.parquet` holds one row per cell (`cell_id`, metadata, `latent`, `prob`,
`pred`, `recon_mse`, `recon_ssim`, ...); each shard's parquet schema metadata `raycell.infer` records
what produced it (`PROVENANCE_KEY`). `predictions.json` lists the shards with their row counts, so a
reader can refuse a folder with missing, extra, changed or duplicated rows instead of computing metrics
on them.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raycell import constants as K
from raycell.formats.shards import ShardError
from raycell.utils.io import read_json

PROVENANCE_KEY = K.INFER_PROVENANCE  # parquet schema metadata of every prediction shard


def load_predictions(pred_dir: str | Path) -> tuple[dict, pa.Table]:
    """(predictions.json, all rows) of a predictions folder, after checking shards, rows and cell ids.

    Raises:
        FileNotFoundError: no predictions.json or no shards.
        ShardError: malformed manifest; missing, unlisted, unreadable or changed shards; duplicated ids.
    """
    pred_dir = Path(pred_dir).absolute()
    try:
        pm = read_json(pred_dir / K.PREDICTIONS_MANIFEST, "predictions manifest")
    except ValueError as exc:  # malformed JSON: read_json names the file
        raise ShardError(f"{exc}; re-run `raycell infer` to rewrite it") from None
    table = read_predictions(pred_dir, _expected_files(pred_dir, pm))
    check_predictions(table, pm, pred_dir)
    return pm, table


def read_predictions(path: str | Path, files: list[Path] | None = None) -> pa.Table:
    """All prediction shards of a folder (or the given ones) as one table; empty shards are skipped.

    Raises:
        FileNotFoundError: no prediction shards there.
        ShardError: a shard cannot be read (named), or none holds rows.
    """
    root = Path(path)
    if files is None:
        files = sorted((root / "shards").glob(K.SHARD_GLOB)) if (root / "shards").is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no prediction shards in {root}/shards (run `raycell infer` first)"
        )
    tables = []
    for f in files:
        try:
            t = pq.read_table(f)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ShardError(
                f"cannot read prediction shard {f} ({exc}): delete it and re-run "
                "`raycell infer` with the same settings to redo it"
            ) from None
        if t.num_rows:
            tables.append(t.replace_schema_metadata(None))
    if not tables:
        raise ShardError(f"prediction shards in {root} hold no rows")
    return pa.concat_tables(tables, promote_options="default")


def _expected_files(pred_dir: Path, pm: dict) -> list[Path] | None:
    """The shard files predictions.json lists, each checked to exist with its recorded row count.

    A folder holding a shard predictions.json does not list is refused too: its rows would be mixed in.
    None for manifests written before shards were listed (then only the totals are checked).
    """
    if "shards" not in pm:
        return None
    fix = "re-run `raycell infer` with the same settings (it redoes missing shards)"
    manifest = pred_dir / K.PREDICTIONS_MANIFEST
    listed = [pred_dir / s["file"] for s in pm["shards"]]
    missing = [f.name for f in listed if not f.is_file()]
    if missing:
        raise ShardError(
            f"{len(missing)} prediction shard(s) listed in {manifest} are missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} in {pred_dir}/shards): "
            f"metrics would leave their cells out; {fix}"
        )
    extra = sorted(set((pred_dir / "shards").glob(K.SHARD_GLOB)) - set(listed))
    if extra:
        raise ShardError(
            f"{pred_dir}/shards holds {len(extra)} prediction shard(s) that {manifest} does not "
            f"list (e.g. {extra[0].name}): they are not from the run it describes; remove "
            "them or re-run `raycell infer` into a new folder"
        )
    for f, s in zip(listed, pm["shards"]):
        try:
            rows = pq.ParquetFile(f).metadata.num_rows
        except (OSError, ValueError) as exc:
            raise ShardError(
                f"cannot read prediction shard {f} ({exc}): delete it and {fix}"
            ) from None
        if rows != s["rows"]:
            raise ShardError(
                f"prediction shard {f} has {rows} rows but {manifest} records {s['rows']}: "
                f"it was changed after inference; delete it and {fix}"
            )
    return listed


def check_predictions(table, pm: dict, pred_dir: Path) -> None:
    """Refuse predictions whose row count differs from predictions.json or whose cell ids repeat.

    Metrics on a partial table or with cells counted twice look plausible and are wrong, so both are
    errors (ShardError, one line) rather than warnings.
    """
    import pyarrow.compute as pc

    manifest = pred_dir / K.PREDICTIONS_MANIFEST
    if "n_rows" in pm and table.num_rows != pm["n_rows"]:
        raise ShardError(
            f"{pred_dir}/shards hold {table.num_rows} prediction rows but {manifest} records "
            f"{pm['n_rows']}: shards are missing or were changed; re-run `raycell infer` "
            "with the same settings"
        )
    ids = table.column(K.CELL_ID)
    n_unique = pc.count_distinct(ids).as_py()
    if n_unique != table.num_rows:
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))
        raise ShardError(
            f"{table.num_rows - n_unique} duplicated cell_id(s) in the predictions in "
            f"{pred_dir} ({len(dup)} id(s) appear more than once, e.g. "
            f"{dup[0]['values'].as_py()!r}): metrics would count those cells twice; the data "
            f"set {pm.get('dataset', '')} needs unique cell ids (re-create or de-duplicate it)"
        )
