"""Finding the images, metadata from their paths, grouping into fields of view, the plate map.

Every file under the input folder with a TIFF/PNG extension is matched (``re.search``) against a
regular expression with named groups on its path relative to the input folder (``/`` separators).
The groups ``channel`` and ``z`` say which channel and Z-slice a file holds; all other groups
(``batch``, ``plate``, ``well``, ``field``, anything else) identify the **field of view** (FOV), the
unit of work: all files that agree on them form one FOV. Problems are recorded, not raised, wherever
they concern one file or one FOV (a file the regex does not match, a channel that was not selected,
a missing channel or Z-slice, two files for one slot, a well the plate map lacks), so ingest can
account for every input. The channels and Z-slices a field should have are the values most fields
have: one stray file (``z01`` among ``z1``) is rejected by itself instead of making every other
field incomplete; problems with the whole job (no images, a regex that matches nothing, a
plate map without usable columns) raise `IngestError` with a one-line message naming the file or
column.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from raycell import constants as K
from raycell.errors import UserError

EXTENSIONS = (".tif", ".tiff", ".png")
CHANNEL, Z = "channel", "z"
_WELL_RE = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")


class IngestError(UserError, ValueError):
    """An input or parameter that makes the whole job impossible (the message names file/key)."""


def natural_key(s: str) -> tuple:
    """Sort key that orders 'z2' before 'z10'."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def normalize_well(well: str) -> str:
    """'a1', 'A01', 'A001' -> 'A01' so file names and plate maps agree; others are left as is."""
    m = _WELL_RE.match(str(well).strip())
    return f"{m.group(1).upper()}{int(m.group(2)):02d}" if m else str(well)


def compile_pattern(pattern: str) -> re.Pattern:
    """Compile the metadata regex with a clear error; it must have at least one named group."""
    if not pattern:
        raise IngestError(
            "ingest.pattern is empty: give a regex with named groups, e.g. "
            r"'(?P<plate>[^_]+)_(?P<well>[A-P]\d{2})_s(?P<field>\d+)_(?P<channel>\w+)'"
        )
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise IngestError(f"ingest.pattern {pattern!r} is not a valid regex: {exc}") from None
    if not rx.groupindex:
        raise IngestError(
            f"ingest.pattern {pattern!r} has no named groups ((?P<name>...)): no metadata "
            "could be read from the file names"
        )
    return rx


def discover(input_dir: str | os.PathLike, pattern: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List the image files under `input_dir` and parse their metadata.

    Args:
        input_dir: folder searched recursively for .tif/.tiff/.png (any case); hidden files are
            skipped.
        pattern: regex with named groups, searched in each path relative to `input_dir`.

    Returns:
        (matched, unmatched): `matched` has columns `path` (absolute), `relpath`, one column per
        named group (strings, '' for a group that did not take part), `channel` and `z` ('' when the
        regex has no such group); `unmatched` has `path`, `relpath`.

    Raises:
        IngestError: the folder does not exist or holds no images, or the regex matches none of
        them.
    """
    root = Path(input_dir).absolute()
    rx = compile_pattern(pattern)
    if not root.is_dir():
        raise IngestError(f"ingest.input folder not found: {root}")
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    from raycell.ingest.ome import find_zarr_images

    paths += find_zarr_images(root)  # OME-Zarr images are folders, matched like files
    if not paths:
        raise IngestError(f"no .tif/.tiff/.png images or OME-Zarr folders under {root}")
    rows, bad = [], []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        m = rx.search(rel)
        if m is None:
            bad.append({"path": str(p), "relpath": rel})
            continue
        rows.append(
            {"path": str(p), "relpath": rel, **{k: v or "" for k, v in m.groupdict().items()}}
        )
    unmatched = pd.DataFrame(bad, columns=["path", "relpath"])
    if not rows:
        raise IngestError(
            f"ingest.pattern {pattern!r} matches none of the {len(paths)} images under {root} "
            f"(e.g. {paths[0].relative_to(root).as_posix()!r})"
        )
    files = pd.DataFrame(rows)
    for col in (CHANNEL, Z):
        if col not in files:
            files[col] = ""
    if K.WELL in files:
        files[K.WELL] = files[K.WELL].map(normalize_well)
    return files, unmatched


def fov_keys(files: pd.DataFrame) -> list[str]:
    """The metadata columns that identify a field of view: every regex group but channel and z."""
    return [c for c in files.columns if c not in ("path", "relpath", CHANNEL, Z)]


def _fov_ids(frame: pd.DataFrame, keys: list[str]) -> pd.Series:
    """A readable id per FOV ('AS_09125_D03_00'); key=value pairs if that would be ambiguous."""
    if not keys:
        return pd.Series(["fov"] * len(frame), index=frame.index)
    ids = frame[keys].astype(str).agg("_".join, axis=1)
    if ids.nunique() < len(frame.drop_duplicates(keys)):
        ids = (
            frame[keys]
            .astype(str)
            .apply(lambda r: "_".join(f"{k}={v}" for k, v in r.items()), axis=1)
        )
    return ids.str.replace(r"[^\w.=\-]+", "-", regex=True)


def reject_row(
    kind: str,
    code: str,
    reason: str,
    fov_id: str = "",
    files: list[str] | None = None,
    meta: dict | None = None,
) -> dict:
    """One row of the rejects table."""
    return {
        "kind": kind,
        "fov_id": fov_id,
        "code": code,
        "reason": reason,
        "files": ";".join(files or []),
        **{k: str(v) for k, v in (meta or {}).items()},
    }


def _majority(files: pd.DataFrame, col: str) -> list[str]:
    """Values of `col` found in more than half of the fields of view in `files` (all if none is).

    Why the majority and not the union: one stray file spelt differently (``z01`` among ``z1``)
    would otherwise make every other field "incomplete" while the stray one looks complete.
    """
    n = files["fov_id"].nunique()
    per_value = files.groupby(col)["fov_id"].nunique()
    keep = [v for v, k in per_value.items() if 2 * k > n]
    return sorted(keep or per_value.index.tolist(), key=natural_key)


def expected_channels(files: pd.DataFrame) -> list[str]:
    """The channel values most fields of view have (the default for ingest.channels)."""
    return _majority(files.assign(fov_id=_fov_ids(files, fov_keys(files))), CHANNEL)


def group_fovs(
    files: pd.DataFrame, channels: list[str] | None = None
) -> tuple[list[dict], list[dict]]:
    """Group matched files into fields of view and check each one is complete.

    A FOV is complete when it has exactly one file for every selected channel and every Z-slice
    that most FOVs with that channel have. Files of channels that are not selected, and (without
    `channels`) of channel or Z values that few FOVs have, become file rejects.

    Args:
        files: `matched` from `discover`.
        channels: channel values to keep, in output order (None/empty = the values most FOVs
            have, natural order).

    Returns:
        (fovs, rejects): each FOV is a dict with `fov_id`, `meta` (the identifying groups), `files`
        (list of {path, relpath, channel, z}); rejects are `reject_row` dicts.
    """
    found = sorted(files[CHANNEL].unique(), key=natural_key)
    keys = fov_keys(files)
    files = files.assign(fov_id=_fov_ids(files, keys))
    rejects = []
    if not channels:
        channels = _majority(files, CHANNEL)
        odd = ~files[CHANNEL].isin(channels)
        rejects += [
            reject_row(
                "file",
                "unexpected-channel",
                f"{rel}: channel {c!r} is not one of the channels most fields have {channels}; "
                "the file is left out (rename it, or list it in ingest.channels)",
                fid,
                [rel],
            )
            for c, fid, rel in files.loc[odd, [CHANNEL, "fov_id", "relpath"]].itertuples(
                index=False
            )
        ]
        files = files[~odd]
    channels = list(channels)
    unknown = [c for c in channels if c not in found]
    if unknown:
        raise IngestError(
            f"ingest.channels {unknown} not found in the file names; the regex's 'channel' "
            f"group gives {found}"
        )
    rejects += [
        reject_row(
            "file",
            "channel-not-selected",
            f"channel {c!r} is not in ingest.channels {channels}",
            fid,
            [rel],
        )
        for c, fid, rel in files.loc[
            ~files[CHANNEL].isin(channels), [CHANNEL, "fov_id", "relpath"]
        ].itertuples(index=False)
    ]
    files = files[files[CHANNEL].isin(channels)]
    z_all = {c: _majority(files[files[CHANNEL] == c], Z) for c in channels}
    odd = pd.Series(False, index=files.index)
    for c in channels:
        odd |= (files[CHANNEL] == c) & ~files[Z].isin(z_all[c])
    rejects += [
        reject_row(
            "file",
            "unexpected-z",
            f"{rel}: Z value {z!r} of channel {c!r} is not one of the Z values most fields have "
            f"{z_all[c]}; the file is left out (rename it if it belongs to its field)",
            fid,
            [rel],
        )
        for c, z, fid, rel in files.loc[odd, [CHANNEL, Z, "fov_id", "relpath"]].itertuples(
            index=False
        )
    ]
    files = files[~odd]
    fovs = []
    for fov_id, g in files.groupby("fov_id", sort=False):
        meta = {k: g[k].iloc[0] for k in keys}
        rels = sorted(g.relpath)
        problem = None
        counts = g.groupby([CHANNEL, Z]).size()
        if (counts > 1).any():
            (c, z), n = next((idx, v) for idx, v in counts.items() if v > 1)
            problem = ("duplicate-file", f"{n} files for channel {c!r} z {z!r}")
        missing_c = [c for c in channels if c not in set(g[CHANNEL])]
        if problem is None and missing_c:
            problem = ("missing-channel", f"missing channel(s) {missing_c}")
        if problem is None:
            for c in channels:
                miss_z = [z for z in z_all[c] if z not in set(g.loc[g[CHANNEL] == c, Z])]
                if miss_z:
                    problem = ("missing-z", f"channel {c!r} is missing Z-slice(s) {miss_z}")
                    break
        if problem:
            rejects.append(reject_row("fov", problem[0], problem[1], fov_id, rels, meta))
            continue
        order = {c: i for i, c in enumerate(channels)}
        g = g.assign(_c=g[CHANNEL].map(order), _z=g[Z].map(natural_key))
        g = g.sort_values(["_c", "_z"])
        fovs.append(
            {
                "fov_id": fov_id,
                "meta": meta,
                "files": g[["path", "relpath", CHANNEL, Z]].to_dict(orient="records"),
            }
        )
    return fovs, rejects


def load_platemap(
    path: str | os.PathLike, on: list[str] | None, fov_columns: list[str]
) -> tuple[pd.DataFrame, list[str]]:
    """Read a plate-map CSV and decide the join columns.

    Args:
        path: CSV file (all columns read as strings).
        on: join columns named by the user (empty = every column the plate map shares with the
            regex).
        fov_columns: the metadata columns the FOVs have.

    Returns:
        (plate map, join columns). Spaces around values are stripped; the columns where that
        changed something are listed in `pm.attrs["stripped_columns"]`.

    Raises:
        IngestError: missing/unreadable file, no shared column, a named column missing, duplicate
        keys.
    """
    p = Path(path)
    if not p.is_file():
        raise IngestError(f"ingest.platemap not found: {p}")
    try:
        pm = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise IngestError(f"plate map {p} is not a readable CSV: {exc}") from None
    pm.columns = [c.strip() for c in pm.columns]
    # ' high' would be a label of its own and 'SYN00 ' would match no file: strip, and say so
    stripped = pm.apply(lambda col: col.str.strip())
    pm.attrs["stripped_columns"] = [c for c in pm.columns if not stripped[c].equals(pm[c])]
    pm[list(pm.columns)] = stripped
    if K.WELL in pm:
        pm[K.WELL] = pm[K.WELL].map(normalize_well)
    if on:
        for col in on:
            if col not in pm.columns:
                raise IngestError(
                    f"plate map {p} has no column {col!r} (ingest.platemap_on); it has "
                    f"{list(pm.columns)}"
                )
            if col not in fov_columns:
                raise IngestError(
                    f"ingest.platemap_on column {col!r} is not a group of ingest.pattern "
                    f"(groups: {fov_columns})"
                )
        keys = list(on)
    else:
        keys = [c for c in pm.columns if c in fov_columns]
        if not keys:
            raise IngestError(
                f"plate map {p} shares no column with the regex groups {fov_columns}; it has "
                f"{list(pm.columns)} (name a column like 'well' in both)"
            )
    dup = pm.duplicated(keys, keep=False)
    if dup.any():
        first = pm[dup].iloc[0]
        raise IngestError(
            f"plate map {p} has {int(dup.sum())} rows with repeated {keys}, e.g. "
            f"{dict(first[keys])} (row {int(pm.index[dup][0]) + 2} of the file)"
        )
    return pm, keys


def join_platemap(
    fovs: list[dict], pm: pd.DataFrame, keys: list[str], path: str
) -> tuple[list[dict], list[dict]]:
    """Add the plate-map columns to each FOV's metadata; FOVs without a row become rejects."""
    lookup = {tuple(r[k] for k in keys): r for r in pm.to_dict(orient="records")}
    kept, rejects = [], []
    for fov in fovs:
        key = tuple(str(fov["meta"].get(k, "")) for k in keys)
        row = lookup.get(key)
        if row is None:
            what = ", ".join(f"{k}={v}" for k, v in zip(keys, key))
            rejects.append(
                reject_row(
                    "fov",
                    "not-in-platemap",
                    f"{what} is not in plate map {path}",
                    fov["fov_id"],
                    [f["relpath"] for f in fov["files"]],
                    fov["meta"],
                )
            )
            continue
        extra = {k: v for k, v in row.items() if k not in fov["meta"]}
        kept.append({**fov, "meta": {**fov["meta"], **extra}})
    return kept, rejects
