"""Atomic writes and run folders.

Every output goes to a temporary name in the same folder and is renamed into place, so an interrupted
job never leaves a half-written file that a re-run would mistake for a finished one.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any


def _tmp_path(path: Path) -> Path:
    """A new empty file beside `path`, created with mode 0666 less the umask as `open` does (mkstemp's
    0600 would survive the rename and make data sets unreadable to the user's group).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to `path` via a temporary file and an atomic rename."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to `path` atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (indented, NaN allowed) to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_parquet(table, path: str | os.PathLike, compression: str = "zstd") -> None:
    """Write a pyarrow Table to parquet atomically (zstd by default)."""
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = _tmp_path(path)
    try:
        pq.write_table(table, tmp, compression=compression)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_object(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`, or None when it is missing, unreadable, malformed or not an object.

    For files that only mark or describe a folder (a manifest probed to recognise an output, a
    lock, an optional record): their absence or damage is an answer, not an error.
    """
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """Read JSON with an error that names the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None


def new_run_dir(runs_dir: str | os.PathLike, name: str) -> Path:
    """Create `<runs_dir>/<name>-<timestamp>` (unique; Ray silently resumes a run whose name is reused)."""
    base = Path(runs_dir).absolute()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        cand = base / (f"{name}-{stamp}" if i == 0 else f"{name}-{stamp}-{i}")
        try:
            cand.mkdir(parents=True, exist_ok=False)
            return cand
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a unique run folder under {base}")


def software_versions() -> dict:
    """Versions recorded in manifests and checkpoints, so results can be traced to what made them."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (
        "raycell",
        "numpy",
        "pyarrow",
        "torch",
        "ray",
        "timm",
        "scikit-image",
        "scikit-learn",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip()
        if sha:
            out["git"] = sha
    except (OSError, subprocess.SubprocessError):
        pass
    return out
