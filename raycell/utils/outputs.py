"""Output folders that never cost a user their data: where raycell may write, and how it replaces.

Every verb that writes a data-set-like folder (`ingest`, `import-armed`, `synth`, `synth --raw`, the
demo's data folder) goes through here. The rules:

* raycell never deletes or moves anything it did not write;
* it refuses, before any work, an output that is a regular file, sits under one or cannot be
  written, is a non-empty folder it did not write, or is / contains / lies inside one of the inputs
  (symlinks resolved);
* `overwrite` replaces only a raycell output of the same kind (crop data set or `synth --raw`);
* a new output is built in a staging folder beside the target and swapped in with two renames, so a
  failed or killed run leaves the previous output whole.

A raycell output is recognised by its `dataset.json` (crop-shard manifest keys) or `raw.json`
(written by `synth --raw`), or by a marker file `.raycell-output` that raycell puts in every output
folder it creates. Why a marker as well: a staging folder, or a direct write that was killed, has no
manifest yet and must still be recognised as raycell's to be cleaned up; and it lets staging folders
have plain names (`<out>.partial-XXXXXXXX`) while a user's own folder called `<out>.partial` or
`<out>.old` is never touched.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
from pathlib import Path

from raycell import constants as K
from raycell.errors import UserError

MARKER = ".raycell-output"
DATASET, RAW = "dataset", "raw"
RAW_JSON = "raw.json"
PROFILE, PROFILE_JSON = "profile", "profile.json"
_NOUN = {DATASET: "data set (dataset.json)", RAW: "synth --raw folder (raw.json)",
         PROFILE: "profile folder (profile.json)"}
_MANIFEST_KEYS = ("schema_version", "channel_names", "shards")


class OutputError(UserError, FileExistsError):
    """An output path raycell will not write to; the message names it and what to do instead."""


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def raycell_output(folder: str | os.PathLike) -> tuple[str, bool] | None:
    """(kind, complete) when raycell wrote `folder`, else None.

    kind is DATASET, RAW or PROFILE; complete means its manifest is there (a marker alone is a staging
    folder or an interrupted write).
    """
    folder = Path(folder)
    m = _read_json(folder / K.MANIFEST)
    if m is not None and all(k in m for k in _MANIFEST_KEYS):
        return DATASET, True
    r = _read_json(folder / RAW_JSON)
    if r is not None and str(r.get("generator", "")).startswith("raycell."):
        return RAW, True
    pj = _read_json(folder / PROFILE_JSON)
    if pj is not None and str(pj.get("generator", "")).startswith("raycell."):
        return PROFILE, True
    mark = _read_json(folder / MARKER)
    if mark is not None and mark.get("kind") in _NOUN:
        return mark["kind"], False
    return None


def mark(folder: str | os.PathLike, kind: str) -> None:
    """Label `folder` as a raycell output of `kind` (the module docstring says why)."""
    from raycell.utils.io import atomic_write_json

    atomic_write_json(Path(folder) / MARKER, {"written_by": "raycell", "kind": kind})


def check_output(
    out: str | os.PathLike,
    inputs=(),
    what: str = "--out",
    kind: str = DATASET,
    error: type[Exception] = OutputError,
) -> tuple[Path, tuple[str, bool] | None]:
    """Refuse an output raycell must not write (see the module docstring); writes nothing.

    Args:
        out: the output folder.
        inputs: (label, path) pairs the output must neither be, contain nor lie inside; empty
            paths are skipped.
        what: the setting or flag that names `out`, for messages.
        kind: DATASET or RAW, what the verb writes.
        error: the verb's user error class.

    Returns:
        The resolved output path and `raycell_output(out)` (None when absent or empty).
    """
    out = Path(os.path.realpath(os.path.expanduser(str(out))))
    for label, inp in inputs:
        if not inp:
            continue
        i = Path(os.path.realpath(os.path.expanduser(str(inp))))
        rel = ("is" if out == i else "contains" if out in i.parents
               else "is inside" if i in out.parents else None)
        if rel:
            raise error(f"{what} {out} {rel} the input {label} {i}; choose an output folder "
                        "outside the inputs (nothing was written)")
    near = out
    while not os.path.lexists(near):
        near = near.parent
    if not near.is_dir():
        where = "is a file" if near == out else f"lies under the file {near}"
        raise error(f"{what} {out} {where}, not a folder; choose a folder path (the file was "
                    "left as it is)")
    for place in ([out, out.parent] if near == out else [near]):
        if not os.access(place, os.W_OK | os.X_OK):
            raise error(f"{what} {out}: cannot write to {place} (permission denied); choose a "
                        "folder you can write to")
    if near != out or not any(out.iterdir()):
        return out, None
    got = raycell_output(out)
    if got is None:
        raise error(f"{what} {out} already holds files raycell did not write; choose a new or "
                    "empty folder (raycell never replaces them, even with overwrite)")
    if got[0] != kind:
        raise error(f"{what} {out} holds a raycell {_NOUN[got[0]]}, not a {_NOUN[kind]}; choose "
                    "another folder")
    return out, got


def prepare_output(
    out: str | os.PathLike,
    inputs=(),
    overwrite: bool = False,
    what: str = "--out",
    kind: str = DATASET,
    error: type[Exception] = OutputError,
    hint: str = "--overwrite",
) -> Path:
    """`check_output`, then refuse a complete raycell output unless `overwrite`; the path."""
    path, got = check_output(out, inputs, what, kind, error)
    if got is not None and got[1] and not overwrite:
        raise error(f"{what} {path} already holds a {_NOUN[kind]}; choose another folder or pass "
                    f"{hint} to replace it")
    return path


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder `<prefix>XXXXXXXX` (its mode follows the umask, unlike mkdtemp's 0700)."""
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        d = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(d, 0o777)
            return d
        except FileExistsError:
            continue
    raise OutputError(f"could not create a new folder {prefix}* in {parent}")


def _sweep(out: Path) -> None:
    """Remove staging / old folders of `out` left by killed runs: only ones raycell marked."""
    for suffix in (".partial-", ".old-"):
        for p in out.parent.glob(glob.escape(out.name) + suffix + "*"):
            if p.is_dir() and not p.is_symlink() and raycell_output(p) is not None:
                shutil.rmtree(p, ignore_errors=True)


def staging_dir(out: Path, kind: str) -> Path:
    """A new marked folder beside `out` to build the output in (put it in place with `swap_in`)."""
    out = Path(out)
    _sweep(out)
    d = _new_dir(out.parent, f"{out.name}.partial-")
    mark(d, kind)
    return d


def swap_in(staged: Path, out: Path) -> None:
    """Put the finished `staged` folder at `out`; a raycell output there is removed only after.

    Anything else at `out` is refused, not moved (the verbs check up front; this checks again in
    case the folder changed while the run was going).
    """
    staged, out = Path(staged), Path(out)
    empty = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    if not os.path.lexists(out) or empty:
        os.replace(staged, out)  # a rename onto a missing or empty folder
        return
    if out.is_symlink() or not out.is_dir() or raycell_output(out) is None:
        raise OutputError(f"{out} changed during the run and now holds files raycell did not "
                          f"write; it was left as it is, the new output is in {staged}")
    old = _new_dir(out.parent, f"{out.name}.old-")
    os.replace(out, old)  # onto the new empty folder
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)
