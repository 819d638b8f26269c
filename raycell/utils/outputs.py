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
PREDICTIONS, EMBEDDINGS = "predictions", "embeddings"  # `infer` / `embed` output folders
RAW_JSON = "raw.json"
PROFILE, PROFILE_JSON = "profile", "profile.json"
REPORT, REPORT_JSON = "report", "report.json"
_NOUN = {
    DATASET: "data set (dataset.json)",
    RAW: "synth --raw folder (raw.json)",
    PREDICTIONS: f"predictions folder ({K.PREDICTIONS_MANIFEST})",
    EMBEDDINGS: f"embeddings folder ({K.EMBEDDINGS_MANIFEST})",
    PROFILE: "profile folder (profile.json)",
    REPORT: "report folder (report.json)",
}


class OutputError(UserError, FileExistsError):
    """An output path raycell will not write to; the message names it and what to do instead."""


def _read_json(path: Path) -> dict | None:
    from raycell.utils.io import json_object

    return json_object(path)


def raycell_output(folder: str | os.PathLike) -> tuple[str, bool] | None:
    """(kind, complete) when raycell wrote `folder`, else None.

    kind is DATASET, RAW or PROFILE; complete means its manifest is there (a marker alone is a staging
    folder or an interrupted write).
    """
    folder = Path(folder)
    m = _read_json(folder / K.MANIFEST)
    if m is not None and all(k in m for k in K.MANIFEST_REQUIRED_KEYS):
        return DATASET, True
    r = _read_json(folder / RAW_JSON)
    if r is not None and str(r.get("generator", "")).startswith("raycell."):
        return RAW, True
    for kind, name in ((PREDICTIONS, K.PREDICTIONS_MANIFEST), (EMBEDDINGS, K.EMBEDDINGS_MANIFEST)):
        m = _read_json(folder / name)
        if m is not None and "shards" in m and "run_key" in m:
            return kind, True
    for kind, name in ((PROFILE, PROFILE_JSON), (REPORT, REPORT_JSON)):
        m = _read_json(folder / name)
        if m is not None and m.get("generator") == f"raycell.{kind}":
            return kind, True
    mark = _read_json(folder / MARKER)
    if mark is not None and mark.get("kind") in _NOUN:
        return mark["kind"], False
    return _interrupted_infer(folder)


def _interrupted_infer(folder: Path) -> tuple[str, bool] | None:
    """An infer/embed folder whose run was killed before its manifest or marker was written.

    Recognised by infer's provenance record in its shards' parquet metadata (what a resume reads).
    """
    where = folder / K.SHARD_DIR
    shards = sorted(where.glob(K.SHARD_GLOB)) if where.is_dir() else []
    if not shards:
        return None
    import pyarrow.parquet as pq

    try:
        rec = json.loads((pq.read_schema(shards[0]).metadata or {})[K.INFER_PROVENANCE])
    except (OSError, KeyError, ValueError, TypeError):
        return None
    layout = (rec.get("producer") or {}).get("layout") if isinstance(rec, dict) else None
    return (EMBEDDINGS if layout == "profiles" else PREDICTIONS), False


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
        rel = (
            "is"
            if out == i
            else "contains"
            if out in i.parents
            else "is inside"
            if i in out.parents
            else None
        )
        if rel:
            raise error(
                f"{what} {out} {rel} the input {label} {i}; choose an output folder "
                "outside the inputs (nothing was written)"
            )
    near = out
    while not os.path.lexists(near):
        near = near.parent
    if not near.is_dir():
        where = "is a file" if near == out else f"lies under the file {near}"
        raise error(
            f"{what} {out} {where}, not a folder; choose a folder path (the file was left as it is)"
        )
    for place in [out, out.parent] if near == out else [near]:
        if not os.access(place, os.W_OK | os.X_OK):
            raise error(
                f"{what} {out}: cannot write to {place} (permission denied); choose a "
                "folder you can write to"
            )
    if near != out or not any(out.iterdir()):
        return out, None
    got = raycell_output(out)
    if got is None:
        raise error(
            f"{what} {out} already holds files raycell did not write; choose a new or "
            "empty folder (raycell never replaces them, even with overwrite)"
        )
    if got[0] != kind:
        raise error(
            f"{what} {out} holds a raycell {_NOUN[got[0]]}, not a {_NOUN[kind]}; choose "
            "another folder"
        )
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
        raise error(
            f"{what} {path} already holds a {_NOUN[kind]}; choose another folder or pass "
            f"{hint} to replace it"
        )
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
        raise OutputError(
            f"{out} changed during the run and now holds files raycell did not "
            f"write; it was left as it is, the new output is in {staged}"
        )
    old = _new_dir(out.parent, f"{out.name}.old-")
    os.replace(out, old)  # onto the new empty folder
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- single output files (`export`)

_FILE_MARK = ".{}.raycell-output"  # beside a file whose format holds no marker of its own (csv)


def enclosing_output(path: str | os.PathLike) -> Path | None:
    """The nearest folder above `path` that raycell wrote (a data set, embeddings, ...), or None.

    Why: a file written there would be read back as part of it (a shard, a manifest) or break it.
    """
    for parent in Path(os.path.realpath(os.path.expanduser(str(path)))).parents:
        if raycell_output(parent) is not None:
            return parent
        emb = _read_json(parent / K.EMBEDDINGS_MANIFEST)  # also embeddings other tools wrote
        if emb is not None and "features" in emb:
            return parent
    return None


def _file_record(path: Path) -> dict:
    st = os.stat(path)
    return {"written_by": "raycell", "kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def raycell_file(path: str | os.PathLike, ours=None) -> bool:
    """True when raycell wrote the file `path` and nobody replaced it since.

    Recognised by `ours(path)` (a marker inside the file: .h5ad `uns`, parquet schema metadata) or
    by the record beside it (`.<name>.raycell-output`: size and mtime, so a file the user saved over
    the export does not count as raycell's). A symlink is never raycell's.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    rec = _read_json(path.parent / _FILE_MARK.format(path.name))
    if rec is not None and rec == _file_record(path):
        return True
    try:
        return bool(ours and ours(path))
    except Exception:  # noqa: BLE001 - an unreadable file is simply not recognised as raycell's
        return False


def prepare_file(
    out: str | os.PathLike,
    inputs=(),
    overwrite: bool = False,
    what: str = "--out",
    error: type[Exception] = OutputError,
    hint: str = "--overwrite",
    ours=None,
) -> Path:
    """Refuse an output file raycell must not write; writes nothing; the resolved path.

    Refused: a folder; a missing or unwritable parent folder; a path that is, or lies inside, one of
    `inputs` or any folder raycell wrote (a data set, embeddings); an existing file raycell did not
    write (even with `overwrite`); an earlier raycell file unless `overwrite`.
    """
    given = Path(os.path.expanduser(str(out)))
    path = Path(os.path.realpath(given))
    if given.is_dir():
        raise error(f"{what} {given} is a folder; give a file name (e.g. {given / 'out.h5ad'})")
    if not given.parent.is_dir():
        raise error(f"{what} {given}: folder {given.parent} does not exist (create it first)")
    for label, inp in inputs:
        if not inp:
            continue
        i = Path(os.path.realpath(os.path.expanduser(str(inp))))
        if path == i or i in path.parents:
            raise error(
                f"{what} {given} {'is' if path == i else 'lies inside'} the input {label} "
                f"{i}; write it outside the inputs (nothing was written)"
            )
    inside = enclosing_output(path)
    if inside is not None:
        raise error(
            f"{what} {given} lies inside {inside}, a folder raycell wrote (data set, "
            "embeddings or predictions) that would read it back or break; write it "
            "elsewhere (nothing was written)"
        )
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise error(
            f"{what} {given}: cannot write to {path.parent} (permission denied); choose a "
            "folder you can write to"
        )
    if os.path.lexists(given):
        if not raycell_file(given, ours):
            raise error(
                f"{what} {given} already exists and raycell did not write it; choose "
                "another file name (raycell never replaces it, even with --overwrite)"
            )
        if not overwrite:
            raise error(
                f"{what} {given} holds an earlier raycell output; choose another file name "
                f"or pass {hint} to replace it"
            )
    return path


def write_file(path: str | os.PathLike, write, record: bool = False) -> None:
    """Call write(tmp) on a temporary name beside `path`, then rename it into place.

    `record` also writes the `.<name>.raycell-output` record (for formats without a marker inside),
    so a later run recognises the file as raycell's.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if record:
        from raycell.utils.io import atomic_write_json

        atomic_write_json(path.parent / _FILE_MARK.format(path.name), _file_record(path))


def check_space(
    out: str | os.PathLike, need: int, what: str = "--out", error: type[Exception] = OutputError
) -> None:
    """Refuse before long work when the disk of `out` has less than `need` bytes free.

    `need` is a rough lower bound of the output's size (e.g. crops x bytes x a compression
    allowance), so a run that would fit is never refused; a run that cannot fit is told at once
    instead of after the disk fills up.
    """
    near = Path(os.path.realpath(os.path.expanduser(str(out))))
    while not near.exists():
        near = near.parent
    free = shutil.disk_usage(near).free
    if free < need:
        raise error(
            f"{what} {out}: needs about {need / 2**20:.0f} MiB, only "
            f"{free / 2**20:.0f} MiB free on the disk of {near}; free space there or "
            "choose an output on a disk with room (nothing was written)"
        )
