"""Every epoch's metrics, kept in a JSON-lines file in the run folder (`history.jsonl`).

Ray 2.60's `Result.metrics_dataframe` holds only the reports whose checkpoints are kept
(`train.checkpoints_to_keep`), so the loop's rank 0 appends each epoch's metrics here as well. One line is
one epoch, written with a single `write` on a file opened for appending, so a killed worker leaves at most
one partial last line (skipped when read). A restarted or resumed run appends again; `read_history`
de-duplicates by epoch, the last line of an epoch winning (a re-run epoch replaces the lost one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HISTORY_FILE = "history.jsonl"


def _plain(v):
    """numpy scalars -> Python numbers (json cannot write them)."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


def append_epoch(path: str | os.PathLike, metrics: dict) -> None:
    """Append one epoch's metrics as one line (NaN written as `NaN`, which `read_history` reads back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps({k: _plain(v) for k, v in metrics.items()}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        # A file that ends in a partial line (a worker killed mid-write) gets a newline first, so the
        # new record stays a line of its own.
        if os.fstat(fd).st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        os.write(fd, line)  # one write: the line lands whole or (killed first) not at all
        os.fsync(fd)
    finally:
        os.close(fd)


def read_history(path: str | os.PathLike) -> list[dict]:
    """The epochs recorded in `path`, one dict per epoch in epoch order (last write of an epoch wins).

    Lines that do not parse (a partial last line) or have no `epoch` are skipped; a missing file is [].
    """
    path = Path(path)
    if not path.is_file():
        return []
    by_epoch: dict[int, dict] = {}
    for raw in path.read_text().splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int):
            by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


__all__ = ["HISTORY_FILE", "append_epoch", "read_history"]
