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
    """Numpy scalars -> Python numbers (json cannot write them)."""
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


# Shown per epoch on the terminal (when present): the objective, the model-selection metrics, the time.
EPOCH_LINE_KEYS = ("train_loss", "val_loss", "val_auroc", "valbatch_auroc", "val_batch_probe")


def epoch_line(rec: dict, epochs: int) -> str:
    """One terminal line for one epoch's metrics, e.g. `epoch 3/6  train_loss 0.0123  val_auroc
    0.81  12.3 s`.
    """
    parts = [f"epoch {rec['epoch'] + 1}/{epochs}"]
    for k in EPOCH_LINE_KEYS:
        v = rec.get(k)
        if isinstance(v, (int, float)) and v == v:  # skip NaN
            parts.append(f"{k} {v:.4g}")
    if isinstance(rec.get("epoch_time_s"), (int, float)):
        parts.append(f"{rec['epoch_time_s']:.1f} s")
    return "  ".join(parts)


class EpochPrinter:
    """Prints one line per new epoch of a run's `history.jsonl` while `fit()` runs (a driver thread).

    The workers' own output goes to Ray's logs unless `ray.verbose`; the driver reads the history that
    rank 0 writes (the run folder is the driver's), so the terminal shows the epochs and nothing else.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        epochs: int,
        prefix: str = "[raycell] ",
        interval_s: float = 1.0,
    ):
        import threading

        self.path, self.epochs, self.prefix, self.interval_s = (
            Path(path),
            epochs,
            prefix,
            interval_s,
        )
        self.shown = {r["epoch"] for r in read_history(self.path)}  # a resumed run: only new epochs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raycell-epochs", daemon=True)

    def _poll(self) -> None:
        for rec in read_history(self.path):
            if rec["epoch"] not in self.shown:
                self.shown.add(rec["epoch"])
                print(self.prefix + epoch_line(rec, self.epochs), flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def __enter__(self) -> "EpochPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()  # the last epoch, written just before fit() returned
