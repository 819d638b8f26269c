"""Instrument layouts: named presets for the file names of high-content imagers, load-data CSVs.

A preset (`ingest.preset`, `raycell ingest --preset NAME`) stands for a hand-written
`ingest.pattern`; its named groups follow the same rules (`raycell.ingest.sources`). Where an
instrument names wells by row and column numbers (Opera Phenix / Operetta ``r01c01``, OME-Zarr
plates ``B/3``), the `row` and `col` groups become one `well` (``A01``) so plate maps join as usual.

* ``phenix`` (alias ``operetta``): Harmony exports, ``[<plate>/][Images/]r01c01f01p01-ch1sk1fk1fl1
  .tiff``: row, column, field, plane (Z), channel, time point (``sk``).
* ``imagexpress``: MetaXpress,
  ``[<plate>/][TimePoint_1/][ZStep_2/][<prefix>_]A01[_s1]_w1<uuid>.tif`` (site and UUID
  optional; thumbnails do not match and are listed as unmatched files).
* ``cellinsight`` (alias ``arrayscan``): Thermo CellInsight / ArrayScan, as in CellProfiler's
  example images: ``<plate>_A01f00d0.tif`` (field ``f``, channel ``d``).
* ``jump``: the JUMP Cell Painting layout: no regex, the files are listed by CellProfiler
  load-data CSVs (`ingest.load_data`, default every ``load_data*.csv`` under `ingest.input`): a row
  per field with ``FileName_Orig<Channel>`` / ``PathName_Orig<Channel>`` and ``Metadata_Plate``,
  ``Metadata_Well``, ``Metadata_Site`` (and ``Metadata_Batch`` / ``Metadata_Source`` when present).
  A listed file is taken at ``PathName/FileName`` when that exists (absolute, or relative to the
  CSV), else found by its name under `ingest.input` (the copy whose folders agree most with
  ``PathName``, e.g. ``<plate>/Images``); one found nowhere is a ``listed-not-found`` file reject.
* ``ome-zarr``: an OME-Zarr (NGFF) HCS plate, ``<plate>.zarr/<row>/<col>/<field>``, each field a
  multi-channel image with its own axes (`raycell.ingest.ome`); a single OME-Zarr image
  (``<name>.zarr``) or OME-TIFF needs no preset, only a pattern on its name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from raycell import constants as K
from raycell.config import IngestConfig
from raycell.ingest.params import IngestParams
from raycell.ingest.sources import CHANNEL, IngestError, Z, discover, normalize_well, reject_row


@dataclass(frozen=True)
class Preset:
    """One instrument's naming: the regex (empty for load-data CSVs) and a line for `--help`."""

    pattern: str
    about: str


PRESETS = {
    "phenix": Preset(
        r"(?:(?!Images/)(?P<plate>[^/]+)/)?(?:Images/)?r(?P<row>\d{2})c(?P<col>\d{2})"
        r"f(?P<field>\d{2})p(?P<z>\d{2})-ch(?P<channel>\d+)sk(?P<timepoint>\d+)fk\d+fl\d+"
        r"\.(?i:tiff?)$",
        "Opera Phenix / Operetta: [<plate>/][Images/]r01c01f01p01-ch1sk1fk1fl1.tiff",
    ),
    "imagexpress": Preset(
        r"(?:(?!TimePoint_|ZStep_)(?P<plate>[^/]+)/)?(?:TimePoint_(?P<timepoint>\d+)/)?"
        r"(?:ZStep_(?P<z>\d+)/)?(?:[^/]*_)?(?P<well>[A-P]\d{2})(?:_s(?P<field>\d+))?"
        r"_w(?P<channel>\d)(?:[0-9A-Fa-f]{8}-[0-9A-Fa-f-]{27})?\.(?i:tiff?)$",
        "ImageXpress: [<plate>/][TimePoint_1/][ZStep_1/][<prefix>_]A01[_s1]_w1<uuid>.tif",
    ),
    "cellinsight": Preset(
        r"(?P<plate>[^/]+?)_(?P<well>[A-P]\d{2})f(?P<field>\d{2})d(?P<channel>\d+)"
        r"\.(?i:tiff?|png)$",
        "CellInsight / ArrayScan (CellProfiler's examples): <plate>_A01f00d0.tif",
    ),
    "jump": Preset("", "JUMP Cell Painting: fields listed by load_data*.csv (FileName_Orig<Ch>)"),
    "ome-zarr": Preset(
        r"(?P<plate>[^/]+)\.zarr/(?P<row>[A-Za-z]+|\d+)/(?P<col>\d+)/(?P<field>\d+)$",
        "OME-Zarr (NGFF) plate: <plate>.zarr/<row>/<col>/<field>",
    ),
}
ALIASES = {"operetta": "phenix", "arrayscan": "cellinsight", "cellprofiler": "cellinsight"}
PRESET_NAMES = tuple(sorted(set(PRESETS) | set(ALIASES)))


def preset(name: str) -> Preset:
    """The preset called `name` (or an alias); IngestError listing the names otherwise."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise IngestError(f"unknown ingest.preset {name!r}; use one of {list(PRESET_NAMES)}")
    return PRESETS[key]


def check_layout(p: IngestConfig) -> None:
    """ingest.preset / pattern / load_data: one way to find the files (IngestError names it)."""
    name = p.preset
    if name:
        preset(name)
        if p.pattern:
            raise IngestError(
                f"give ingest.preset ({name!r}) or ingest.pattern, not both (a preset is a pattern)"
            )
    if p.load_data and p.pattern:
        raise IngestError("give ingest.load_data or ingest.pattern, not both")
    if not (name or p.pattern or p.load_data):
        raise IngestError(
            "ingest.pattern is empty: give a regex with named groups, or a layout preset "
            f"(ingest.preset / --preset: {list(PRESET_NAMES)}), or load-data CSVs "
            "(ingest.load_data)"
        )


def _row_index(row: str) -> int:
    """'A' -> 1, 'AA' -> 27, '03' -> 3."""
    if row.isdigit():
        return int(row)
    n = 0
    for ch in row.upper():
        n = n * 26 + ord(ch) - 64
    return n


def _well_from_row_col(files: pd.DataFrame) -> pd.DataFrame:
    """`row` + `col` groups -> one `well` column ('A01'); rows past Z keep their numbers."""
    if "row" not in files or "col" not in files or K.WELL in files:
        return files

    def well(r: str, c: str) -> str:
        i = _row_index(r)
        letters = ""
        while i > 0:
            i, rem = divmod(i - 1, 26)
            letters = chr(65 + rem) + letters
        return normalize_well(f"{letters}{int(c):02d}")

    out = files.copy()
    cols = list(out.columns)
    out.insert(cols.index("row"), K.WELL, [well(r, c) for r, c in zip(out["row"], out["col"])])
    return out.drop(columns=["row", "col"])


def find_files(p: IngestParams, root: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """The input files and their metadata by the configured layout (pattern, preset, load-data).

    Returns:
        (matched, unmatched, rejects) as `raycell.ingest.sources.discover`, plus file rejects of
        load-data rows whose files were not found.
    """
    check_layout(p)
    name = ALIASES.get(p.preset.lower(), p.preset.lower())
    if p.load_data or name == "jump":
        return load_data_files(p, root)
    pattern = p.pattern or PRESETS[name].pattern
    files, unmatched = discover(root, pattern)
    return _well_from_row_col(files), unmatched, []


# --------------------------------------------------------------------------------------------------
# Load-data CSVs (CellProfiler LoadData, the JUMP Cell Painting layout)
# --------------------------------------------------------------------------------------------------

_META = {
    "Metadata_Source": "source_id",
    "Metadata_Batch": "batch",
    "Metadata_Plate": K.PLATE,
    "Metadata_Well": K.WELL,
    "Metadata_Site": K.FIELD,
    "Metadata_Field": K.FIELD,
}


def _load_data_csvs(p: IngestParams, root: Path) -> list[Path]:
    where = Path(p.load_data or root)
    if where.is_file():
        return [where]
    if not where.is_dir():
        raise IngestError(f"ingest.load_data not found: {where}")
    csvs = sorted(where.rglob("load_data*.csv"))
    if not csvs:
        raise IngestError(f"no load_data*.csv under {where} (ingest.load_data, preset jump)")
    return csvs


def _locate(
    file_name: str,
    path_name: str,
    csv: Path,
    by_name: dict[str, list[Path]],
    plate_dirs: bool,
    plate: str,
):
    """The local file a load-data row names: PathName/FileName, else found under ingest.input.

    Where the folders under ingest.input name plates (`plate_dirs`), a copy found by name must lie
    under its row's plate: JUMP's Phenix names repeat on every plate, and another plate's file of
    the same name is not this field's.
    """
    direct = Path(path_name) / file_name
    if not direct.is_absolute():
        direct = csv.parent / direct
    if "://" not in path_name and direct.is_file():
        return direct, ""
    hits = by_name.get(file_name, [])
    if plate_dirs and plate:
        hits = [h for h in hits if any(plate in part for part in h.parent.parts)]
    if len(hits) <= 1:
        return (hits[0], "") if hits else (None, "not found")
    # the same name in several plates (Phenix names repeat): the copy whose folders agree most
    want = [s for s in re.split(r"[/\\]", path_name) if s][::-1]

    def agree(h: Path) -> int:
        n = 0
        for a, b in zip(h.parent.parts[::-1], want):
            if a != b:
                break
            n += 1
        return n

    scores = [agree(h) for h in hits]
    best = [h for h, s in zip(hits, scores) if s == max(scores)]
    if len(best) > 1:
        return None, f"{len(best)} files of that name under ingest.input, none nearer {path_name}"
    return best[0], ""


def load_data_files(p: IngestParams, root: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """The files listed by load-data CSV(s), in the `discover` layout (one row per file)."""
    from raycell.ingest.objects import list_image_files

    by_name: dict[str, list[Path]] = {}
    if root.is_dir():
        for f in list_image_files(root):
            by_name.setdefault(f.name, []).append(f)
    rows, rejects = [], []
    folders = {part for paths in by_name.values() for f in paths for part in f.parent.parts}
    plate_dirs: dict[str, bool] = {}  # plate -> does some folder under ingest.input name it?
    for csv in _load_data_csvs(p, root):
        try:
            t = pd.read_csv(csv, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise IngestError(f"load-data CSV {csv} is not readable: {exc}") from None
        names = [c for c in t.columns if c.startswith("FileName_")]
        orig = [c for c in names if c.startswith("FileName_Orig")]
        names = orig or names  # JUMP lists illumination functions too (FileName_Illum<Ch>)
        if not names:
            raise IngestError(f"load-data CSV {csv} has no FileName_<channel> column")
        meta_cols = {c: k for c, k in _META.items() if c in t.columns}
        if K.PLATE not in meta_cols.values() and K.WELL not in meta_cols.values():
            raise IngestError(
                f"load-data CSV {csv} has neither Metadata_Plate nor Metadata_Well: the fields "
                "cannot be told apart"
            )
        for i, r in t.iterrows():
            meta = {k: r[c] for c, k in meta_cols.items()}
            plate = meta.get(K.PLATE, "")
            if plate not in plate_dirs:
                plate_dirs[plate] = bool(plate) and any(plate in d for d in folders)
            for col in names:
                channel = col[len("FileName_Orig") if col in orig else len("FileName_") :]
                path_col = "PathName_" + col[len("FileName_") :]
                found, why = _locate(
                    r[col], r.get(path_col, ""), csv, by_name, plate_dirs[plate], plate
                )
                if found is None:
                    rejects.append(
                        reject_row(
                            "file",
                            "listed-not-found",
                            f"{csv.name} row {i + 2}: {r[col]} "
                            f"({why}; PathName {r.get(path_col, '')!r})",
                            "",
                            [r[col]],
                        )
                    )
                    continue
                inside = found.is_relative_to(root)
                rel = found.relative_to(root).as_posix() if inside else str(found)
                rows.append(
                    {"path": str(found.absolute()), "relpath": rel, **meta, CHANNEL: channel, Z: ""}
                )
    if not rows:
        raise IngestError(
            f"none of the files the load-data CSV(s) list was found ({len(rejects)} listed), "
            f"e.g. {rejects[0]['reason'] if rejects else ''}"
        )
    files = pd.DataFrame(rows).drop_duplicates(["path", CHANNEL])
    files.attrs["load_data"] = [str(c) for c in _load_data_csvs(p, root)]  # for the fingerprint
    if K.WELL in files:
        files[K.WELL] = files[K.WELL].map(normalize_well)
    return files, pd.DataFrame(columns=["path", "relpath"]), rejects


__all__ = ["PRESETS", "PRESET_NAMES", "check_layout", "find_files", "load_data_files", "preset"]
