"""Planning an ingest: parameter and output checks, then files -> fields of view, no pixels read.

`plan_ingest` lists the images, parses metadata with the regex, groups them into fields of view
(FOVs), checks each FOV is complete, joins the plate map, decides the channel roles and fingerprints
the inputs (so an identical re-run can be skipped). Files and FOVs that cannot be used become rows
of the rejects table right away. `check_ingest` runs the same parameter and output checks before
Ray starts (the CLI calls it first).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd

from raycell import constants as K
from raycell.config import IngestConfig
from raycell.ingest import images as imio
from raycell.ingest import layouts, ome
from raycell.ingest import objects as given
from raycell.ingest.params import IngestParams
from raycell.ingest.segment import check_backend
from raycell.ingest.sources import (
    CHANNEL,
    IngestError,
    expected_channels,
    fov_keys,
    group_fovs,
    join_platemap,
    load_platemap,
    reject_row,
)

_GROUP_CANDIDATES = ("line", "group", "treatment", "compound", "cell_line")


def check_ingest(cfg) -> None:
    """Check `cfg.ingest` before anything starts (no Ray, no pixels); IngestError names the key."""
    check_params(cfg.ingest, sources=False)
    check_out(cfg.ingest)  # before the sources: a user's folder is refused whatever else they lack
    check_sources(cfg.ingest)


def check_params(p: IngestConfig, sources: bool = True) -> None:
    """Check the config's ingest section as the user gave it; IngestError names the key.

    Each key's own choices and bounds were checked with the config (raycell/config.py); these are
    what ingest needs beyond them. `sources`: also check where fields and objects come from
    (`check_sources`).
    """
    if not p.input or not p.out:
        raise IngestError("ingest.input and ingest.out must both be set")
    if sources:
        check_sources(p)


def check_sources(p: IngestConfig) -> None:
    """Where fields and objects come from: given masks / tables, the layout, the segmentation backend."""
    given.check_given(p)
    layouts.check_layout(p)
    if not (p.masks or p.objects):  # given objects: the backend never runs
        check_backend(p.segmentation, p.cellpose_model)


def check_out(p: IngestConfig) -> Path:
    """The resolved ingest.out, checked before Ray and the statistics pass start.

    Raises:
        IngestError: `out` is a file, unwritable, a folder of the user's own files, or overlaps
            ingest.input / ingest.platemap.
    """
    from raycell.utils.outputs import DATASET, check_output

    inputs = [("ingest.input", p.input), ("ingest.platemap", p.platemap)]
    inputs += [("ingest.masks", p.masks), ("ingest.cell_masks", p.cell_masks)]
    inputs += [("ingest.objects", p.objects)]  # check_output skips the empty ones
    return check_output(p.out, inputs, "ingest.out", DATASET, IngestError)[0]


def _resolve_channel(name: str, names: list[str], values: list[str], key: str) -> int:
    if name in names:
        return names.index(name)
    if name in values:
        return values.index(name)
    raise IngestError(f"{key} {name!r} is not one of the channels {names} (values {values})")


def _channel_plan(p: IngestParams, files: pd.DataFrame, fovs: list[dict]) -> dict:
    """Channel values (file slots), output names and the nucleus / cytoplasm indices."""
    values = list(p.channels) or expected_channels(files)
    if values == [""] and fovs:
        # no channel group: the channels are inside each file; count them in the first readable one
        n = None
        for f in fovs[:20]:
            try:
                n = imio.read_image(f["files"][0]["path"], p.axes).shape[1]
                break
            except imio.ImageError:
                continue
        if n is None:
            raise IngestError(
                "cannot tell the number of channels: the first 20 fields of view have "
                "unreadable images"
            )
        slots = [""]
        values = [str(i) for i in range(n)]
    else:
        slots = values
    names = list(p.channel_names) or values
    if len(names) != len(values):
        raise IngestError(
            f"ingest.channel_names has {len(names)} names for {len(values)} channels {values}"
        )
    nuc = (
        _resolve_channel(p.nucleus_channel, names, values, "ingest.nucleus_channel")
        if p.nucleus_channel
        else 0
    )
    cyt = (
        _resolve_channel(p.cytoplasm_channel, names, values, "ingest.cytoplasm_channel")
        if p.cytoplasm_channel
        else None
    )
    if cyt is not None and cyt == nuc:
        raise IngestError("ingest.cytoplasm_channel must differ from ingest.nucleus_channel")
    return {
        "slots": slots,
        "values": values,
        "names": [str(n) for n in names],
        "nucleus": nuc,
        "cytoplasm": cyt,
    }


def _shard_columns(meta: dict, p: IngestParams) -> dict:
    """Map a FOV's metadata (regex groups + plate map) to the crop-shard columns (all strings)."""
    meta = {k: str(v) for k, v in meta.items()}
    batch = meta.get(p.batch_column, meta.get(K.PLATE, ""))
    label = meta.get(p.label_column, "") if p.label_column else ""
    gcol = p.group_column or next((c for c in _GROUP_CANDIDATES if c in meta), "")
    row = {
        K.BATCH: batch,
        K.LABEL: label,
        K.GROUP: meta.get(gcol, "") if gcol else "",
        K.PLATE: meta.get(K.PLATE, ""),
        K.WELL: meta.get(K.WELL, ""),
        K.FIELD: meta.get(K.FIELD, ""),
    }
    reserved = set(row) | {
        K.CELL_ID,
        K.SPLIT,
        K.SOURCE,
        K.CENTROID_Y,
        K.CENTROID_X,
        *K.IMAGE_COLUMNS,
    }
    # everything else (line, dose, time, treatment, extra regex groups) travels as a weak-label
    # column
    row.update(
        {k: v for k, v in meta.items() if k not in reserved and not k.startswith(K.MORPH_PREFIX)}
    )
    return row


def plan_ingest(p: IngestParams) -> dict:
    """Discover, group and annotate the fields of view (no pixels read; see `_channel_plan`).

    Returns:
        dict with `fovs` (records for the tasks), `rejects` (rows), `channels` (see
        `_channel_plan`), `n_files`, `fingerprint` (of the input files and the plate map's
        contents), `notes` (warnings for the summary).
    """
    root = Path(p.input).absolute()
    given.check_given(p)
    files, unmatched, layout_rejects = layouts.find_files(p, root)
    load_csvs = files.attrs.get("load_data", [])
    mask_paths: set[str] = set()
    if p.masks:  # mask files beside the images (cellpose's habit) are not images
        mask_paths = given.mask_file_paths(p, fov_keys(files))
        files = files[~files.path.isin(mask_paths)].reset_index(drop=True)
        unmatched = unmatched[~unmatched.path.isin(mask_paths)].reset_index(drop=True)
        if files.empty:
            raise IngestError(f"every image ingest.pattern matches under {root} is a mask")
    rejects = layout_rejects + [
        reject_row("file", "no-match", "path does not match ingest.pattern", "", [r])
        for r in unmatched.relpath
    ]
    fovs, grp_rejects = group_fovs(files, p.channels or None)
    rejects += grp_rejects
    notes = []
    if p.platemap:
        pm, on = load_platemap(p.platemap, p.platemap_on, fov_keys(files))
        fovs, pm_rejects = join_platemap(fovs, pm, on, str(Path(p.platemap).absolute()))
        rejects += pm_rejects
        if pm.attrs.get("stripped_columns"):
            notes.append(
                f"plate map {p.platemap}: spaces around values in column(s) "
                f"{pm.attrs['stripped_columns']} were stripped"
            )
    if p.masks:
        fovs, mask_rejects = given.attach_masks(p, fovs, fov_keys(files))
        rejects += mask_rejects
    if p.objects:
        fovs, obj_rejects, obj_notes = given.attach_objects(p, fovs, fov_keys(files))
        rejects += obj_rejects
        notes += obj_notes
    if p.label_column and fovs and p.label_column not in fovs[0]["meta"]:
        if p.label_column != "label":
            raise IngestError(
                f"ingest.label_column {p.label_column!r} is neither a regex group nor a "
                f"plate-map column (have {sorted(fovs[0]['meta'])})"
            )
        notes.append("no 'label' column in the regex groups or plate map: labels are empty")
    if p.group_column and fovs and p.group_column not in fovs[0]["meta"]:
        raise IngestError(
            f"ingest.group_column {p.group_column!r} is neither a regex group nor a "
            f"plate-map column (have {sorted(fovs[0]['meta'])})"
        )
    channels = _channel_plan(p, files, fovs)
    for f in fovs:
        f["row"] = _shard_columns(f["meta"], p)
        nuc_slot = channels["slots"][min(channels["nucleus"], len(channels["slots"]) - 1)]
        f["source"] = next(x["relpath"] for x in f["files"] if x[CHANNEL] == nuc_slot)
    h = hashlib.sha1()
    for path in sorted(files.path.tolist() + unmatched.path.tolist()):
        st = os.stat(path)
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for path in sorted(mask_paths):
        st = os.stat(path)
        h.update(f"mask|{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for csv in load_csvs:
        h.update(b"load_data|" + hashlib.sha1(Path(csv).read_bytes()).digest())
    for key, table in (("objects", p.objects), ("objects_images", p.objects_images)):
        if table:  # the tables' contents, as for the plate map
            h.update(f"{key}|".encode() + hashlib.sha1(Path(table).read_bytes()).digest())
    if p.platemap:
        # the plate map's contents, not its date: an edited map means other labels
        h.update(b"platemap|" + hashlib.sha1(Path(p.platemap).read_bytes()).digest())
    px = ome.pixel_size(fovs[0]["files"][0]["path"]) if fovs else None
    if px and any(ome.pixel_size(f["files"][0]["path"]) != px for f in fovs[-1:]):
        notes.append(f"pixel sizes differ between fields: the manifest records the first's ({px})")
    n_fov_rejects = sum(r["kind"] == "fov" for r in rejects)
    return {
        "fovs": fovs,
        "rejects": rejects,
        "channels": channels,
        "notes": notes,
        "n_files": len(files) + len(unmatched),
        "n_fovs_in": len(fovs) + n_fov_rejects,
        "fingerprint": h.hexdigest(),
        "pixel_size": px,
    }
