"""`raycell ingest`: raw fields of view -> crop shards + rejects table, as a Ray Data pipeline.

Steps (SPEC stage 2):

1. **Plan** (driver, no pixels read): list the images, parse metadata with the regex, group them
   into fields of view (FOVs), check each FOV is complete, join the plate map. Files and FOVs that
   cannot be used become rows of the rejects table right away.
2. **Statistics pass** (Ray Data, one task per FOV, only when needed): each FOV is read and
   projected, and returns a block-mean downscaled copy (for the per-plate illumination functions)
   plus a fixed random sample of full-resolution pixels (for the global / per-batch normalisation
   percentiles, taken after illumination correction). Skipped for `normalization=per-image` without
   illumination correction.
3. **Crop pass** (Ray Data, one task per FOV): read, project, correct, segment, drop border objects,
   crop, measure; each FOV returns exactly one row: its crops and metadata, or a reject reason. One
   row per FOV in and out is what makes "every input accounted for" a simple set equality at the
   end.
4. The driver streams the rows into one `ShardWriter` as they arrive. Why the driver and not
   per-task shard files: the writer fills shards to a fixed row count (few, evenly sized files for
   the training reader, not one tiny file per FOV), checks cell ids are unique over the whole data
   set and accumulates the exact per-channel intensity histograms for the manifest. The crops are
   small next to the segmentation work (about 10 KB per cell), so the driver is not the bottleneck
   at the scale of one node; per-task files plus a manifest merge would be the next step for a large
   cluster.

Re-runs: everything is written into a staging folder `<out>.partial-XXXXXXXX` and swapped into place
only when complete, so a killed run leaves the previous data set intact, and a re-run starts from
scratch without duplicates. `ingest.out` must be new, empty or a raycell data set, and apart from
the inputs (`raycell.utils.outputs`): nothing raycell did not write is ever deleted.
When `out` already holds a data set made from the same files with the same parameters, the run is
skipped; when the inputs or parameters differ, `ingest.overwrite=true` is required.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from raycell import constants as K
from raycell.ingest import images as imio
from raycell.ingest.sources import (
    CHANNEL,
    IngestError,
    discover,
    expected_channels,
    fov_keys,
    group_fovs,
    join_platemap,
    load_platemap,
    reject_row,
)

REJECTS = "rejects.parquet"
SUMMARY = "ingest_summary.json"
_GROUP_CANDIDATES = ("line", "group", "treatment", "compound", "cell_line")
_SAMPLE = 2048  # full-resolution pixels per FOV and channel kept for normalisation percentiles


# --------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------


def check_config(cfg) -> None:
    """Check `cfg.ingest` before anything starts (no Ray, no pixels); IngestError names the key."""
    p = dataclasses.asdict(cfg.ingest)
    _check_params(p)
    _check_out(p)


def _check_params(p: dict) -> None:
    from raycell.ingest.segment import check_backend

    if p["z_projection"] not in imio.Z_PROJECTIONS:
        raise IngestError(
            f"ingest.z_projection must be one of {imio.Z_PROJECTIONS}, got {p['z_projection']!r}"
        )
    if p["normalization"] not in imio.NORMALIZATIONS:
        raise IngestError(
            f"ingest.normalization must be one of {imio.NORMALIZATIONS}, got {p['normalization']!r}"
        )
    if p["dtype"] not in imio.OUT_DTYPES:
        raise IngestError(
            f"ingest.dtype must be one of {sorted(imio.OUT_DTYPES)}, got {p['dtype']!r}"
        )
    lo_hi = p["norm_percentiles"]
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 100:
        raise IngestError(f"ingest.norm_percentiles must be [low, high] within 0..100, got {lo_hi}")
    if p["crop_size"] < 8:
        raise IngestError(f"ingest.crop_size must be >= 8, got {p['crop_size']}")
    if p["scale_check"] not in imio.SCALE_CHECKS:
        raise IngestError(
            f"ingest.scale_check must be one of {imio.SCALE_CHECKS}, got {p['scale_check']!r}"
        )
    if not p["scale_fold"] > 1:
        raise IngestError(f"ingest.scale_fold must be > 1 (a factor), got {p['scale_fold']}")
    if not p["input"] or not p["out"]:
        raise IngestError("ingest.input and ingest.out must both be set")
    check_backend(p["segmentation"], p["cellpose_model"])


def _resolve_channel(name: str, names: list[str], values: list[str], key: str) -> int:
    if name in names:
        return names.index(name)
    if name in values:
        return values.index(name)
    raise IngestError(f"{key} {name!r} is not one of the channels {names} (values {values})")


def _channel_plan(p: dict, files: pd.DataFrame, fovs: list[dict]) -> dict:
    """Channel values (file slots), output names and the nucleus / cytoplasm indices."""
    values = list(p["channels"]) or expected_channels(files)
    if values == [""] and fovs:
        # no channel group: the channels are inside each file; count them in the first readable one
        n = None
        for f in fovs[:20]:
            try:
                n = imio.read_image(f["files"][0]["path"], p["axes"]).shape[1]
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
    names = list(p["channel_names"]) or values
    if len(names) != len(values):
        raise IngestError(
            f"ingest.channel_names has {len(names)} names for {len(values)} channels {values}"
        )
    nuc = (
        _resolve_channel(p["nucleus_channel"], names, values, "ingest.nucleus_channel")
        if p["nucleus_channel"]
        else 0
    )
    cyt = (
        _resolve_channel(p["cytoplasm_channel"], names, values, "ingest.cytoplasm_channel")
        if p["cytoplasm_channel"]
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


def _shard_columns(meta: dict, p: dict, keys: list[str]) -> dict:
    """Map a FOV's metadata (regex groups + plate map) to the crop-shard columns (all strings)."""
    meta = {k: str(v) for k, v in meta.items()}
    batch = meta.get(p["batch_column"], meta.get(K.PLATE, ""))
    label = meta.get(p["label_column"], "") if p["label_column"] else ""
    gcol = p["group_column"] or next((c for c in _GROUP_CANDIDATES if c in meta), "")
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


def plan_ingest(p: dict) -> dict:
    """Discover, group and annotate the fields of view (no pixels read; see `_channel_plan`).

    Returns:
        dict with `fovs` (records for the tasks), `rejects` (rows), `channels` (see
        `_channel_plan`), `n_files`, `fingerprint` (of the input files and the plate map's
        contents), `notes` (warnings for the summary).
    """
    root = Path(p["input"]).absolute()
    files, unmatched = discover(root, p["pattern"])
    rejects = [
        reject_row("file", "no-match", "path does not match ingest.pattern", "", [r])
        for r in unmatched.relpath
    ]
    fovs, grp_rejects = group_fovs(files, p["channels"] or None)
    rejects += grp_rejects
    keys = fov_keys(files)
    notes = []
    if p["platemap"]:
        pm, on = load_platemap(p["platemap"], p["platemap_on"], keys)
        fovs, pm_rejects = join_platemap(fovs, pm, on, str(Path(p["platemap"]).absolute()))
        rejects += pm_rejects
        if pm.attrs.get("stripped_columns"):
            notes.append(
                f"plate map {p['platemap']}: spaces around values in column(s) "
                f"{pm.attrs['stripped_columns']} were stripped"
            )
    if p["label_column"] and fovs and p["label_column"] not in fovs[0]["meta"]:
        if p["label_column"] != "label":
            raise IngestError(
                f"ingest.label_column {p['label_column']!r} is neither a regex group nor a "
                f"plate-map column (have {sorted(fovs[0]['meta'])})"
            )
        notes.append("no 'label' column in the regex groups or plate map: labels are empty")
    if p["group_column"] and fovs and p["group_column"] not in fovs[0]["meta"]:
        raise IngestError(
            f"ingest.group_column {p['group_column']!r} is neither a regex group nor a "
            f"plate-map column (have {sorted(fovs[0]['meta'])})"
        )
    channels = _channel_plan(p, files, fovs)
    for f in fovs:
        f["row"] = _shard_columns(f["meta"], p, keys)
        nuc_slot = channels["slots"][min(channels["nucleus"], len(channels["slots"]) - 1)]
        f["source"] = next(x["relpath"] for x in f["files"] if x[CHANNEL] == nuc_slot)
    h = hashlib.sha1()
    for path in sorted(files.path.tolist() + unmatched.path.tolist()):
        st = os.stat(path)
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    if p["platemap"]:
        # the plate map's contents, not its date: an edited map means other labels
        h.update(b"platemap|" + hashlib.sha1(Path(p["platemap"]).read_bytes()).digest())
    n_fov_rejects = sum(r["kind"] == "fov" for r in rejects)
    return {
        "fovs": fovs,
        "rejects": rejects,
        "channels": channels,
        "notes": notes,
        "n_files": len(files) + len(unmatched),
        "n_fovs_in": len(fovs) + n_fov_rejects,
        "fingerprint": h.hexdigest(),
    }


# --------------------------------------------------------------------------------------------------
# Ray tasks
# --------------------------------------------------------------------------------------------------

_STATS_CACHE: dict = {}


def _get_stats(ref_box: list | None):
    """Resolve the statistics once per worker process (they can be large: a function per plate)."""
    if not ref_box:
        return None
    ref = ref_box[0]
    key = ref.hex() if hasattr(ref, "hex") else id(ref)
    if key not in _STATS_CACHE:
        import ray

        _STATS_CACHE.clear()
        _STATS_CACHE[key] = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
    return _STATS_CACHE[key]


def _load(fov: dict, p: dict, ch: dict) -> tuple[np.ndarray, dict]:
    img, info = imio.load_fov_image(fov, ch["slots"], p["z_projection"], p["axes"])
    if img.shape[0] != len(ch["names"]):
        raise imio.ImageError(
            "channel-count",
            f"{fov['files'][0]['relpath']}: {img.shape[0]} channels, "
            f"expected {len(ch['names'])} ({ch['names']})",
        )
    return img, info


def _stats_batch(batch: pa.Table, p: dict, ch: dict) -> pa.Table:
    """Statistics pass: downscaled image + pixel sample per FOV (unusable FOVs are skipped here)."""
    out = {
        "fov_id": [],
        "ok": [],
        "shape": [],
        "scale": [],
        "small": [],
        "sample": [],
        "sample_idx": [],
    }
    f = p["illum_downscale"]
    for rec in batch.column("record").to_pylist():
        fov = json.loads(rec)
        try:
            img, info = _load(fov, p, ch)
        except Exception:  # noqa: BLE001 - the crop pass reports the reason
            for k, v in zip(out, (fov["fov_id"], False, "", "", b"", b"", b"")):
                out[k].append(v)
            continue
        small = imio.downscale(img, f)
        grid = img[:, : small.shape[1] * f : f, : small.shape[2] * f : f] if f > 1 else img
        rng = np.random.default_rng(zlib.crc32(fov["fov_id"].encode()))
        idx = rng.choice(
            grid.shape[1] * grid.shape[2],
            min(_SAMPLE, grid.shape[1] * grid.shape[2]),
            replace=False,
        ).astype(np.int64)
        sample = grid.reshape(grid.shape[0], -1)[:, idx]
        out["fov_id"].append(fov["fov_id"])
        out["ok"].append(True)
        out["shape"].append(json.dumps(list(small.shape)))
        out["scale"].append(json.dumps(imio.field_scale(img, info["dtypes"])))
        out["small"].append(small.astype(np.float32).tobytes())
        out["sample"].append(sample.astype(np.float32).tobytes())
        out["sample_idx"].append(idx.tobytes())
    return pa.table(
        {
            "fov_id": pa.array(out["fov_id"], pa.string()),
            "ok": pa.array(out["ok"], pa.bool_()),
            "shape": pa.array(out["shape"], pa.string()),
            "scale": pa.array(out["scale"], pa.string()),
            **{k: pa.array(out[k], pa.binary()) for k in ("small", "sample", "sample_idx")},
        }
    )


def _scale_verdict(
    fid: str, img: np.ndarray, info: dict, plate: str, p: dict, ch: dict, stats: dict | None
) -> str:
    """Why this field is out of its plate's scale ('' if it is not, or nothing to compare with)."""
    if p["scale_check"] == "ignore" or not stats:
        return ""
    if fid in stats.get("out_of_scale", {}):
        return stats["out_of_scale"][fid]
    ref = stats.get("scale_ref", {}).get(plate)
    if ref is None:
        return ""
    return imio.scale_problem(imio.field_scale(img, info["dtypes"]), ref, ch["names"])


def process_fov(fov: dict, p: dict, ch: dict, stats: dict | None) -> dict:
    """The crop pass for one field of view: returns the result row (crops + metadata, or a reject).

    Any failure of one FOV becomes a reject with a reason (a programming error shows up there with
    its exception type, rather than killing the job after hours).
    """
    from raycell.ingest.crops import extract
    from raycell.ingest.segment import segment

    t0, c0 = time.perf_counter(), time.process_time()
    fid = fov["fov_id"]
    base = {
        "fov_id": fid,
        "status": "rejected",
        "code": "",
        "reason": "",
        "n_cells": 0,
        "crops": b"",
        "meta": b"",
        "info": "{}",
    }
    try:
        img, info = _load(fov, p, ch)
        plate = fov["row"][K.PLATE]
        odd = _scale_verdict(fid, img, info, plate, p, ch, stats)
        if odd and p["scale_check"] == "reject":
            return {
                **base,
                "code": "out-of-scale",
                "reason": f"{odd}: left out of the normalisation statistics and rejected "
                "(ingest.scale_check=separate keeps it, normalised by itself)",
            }
        if odd:
            info["separate"] = odd
        if p["illum_correction"]:
            func = stats["illum"].get(plate) if stats else None
            if func is None and not odd:
                raise imio.ImageError("no-illum", f"no illumination function for plate {plate!r}")
            if func is not None:
                img = img / imio.upsample(func, img.shape[1:])
        nuc, cells, d = segment(img, ch["nucleus"], ch["cytoplasm"], p)
        info["diameter"] = round(float(d), 2)
        info["n_objects"] = int(nuc.max())
        if nuc.max() == 0:
            return {
                **base,
                "code": "no-cells",
                "reason": f"no objects found (diameter {d:.1f} px)",
                "info": json.dumps(info),
            }
        lo, hi = p["norm_percentiles"]
        if p["normalization"] == "per-image" or odd:
            lohi = imio.percentiles(img, lo, hi)
        else:
            key = fov["row"][K.BATCH] if p["normalization"] == "per-batch" else ""
            if key not in stats["lohi"]:
                raise imio.ImageError(
                    "no-stats", f"no readable field of view in batch {key!r} to normalise with"
                )
            lohi = np.asarray(stats["lohi"][key])
        img_out = imio.to_dtype(img, lohi, p["dtype"])
        objects = cells if cells is not None else nuc
        crops, feats = extract(
            objects,
            img,
            img_out,
            ch["names"],
            p["crop_size"],
            nuclei=nuc if cells is not None else None,
            mask=p["mask_crops"],
            mask_blur=p["mask_blur"],
        )
        if len(feats) == 0:
            return {
                **base,
                "code": "no-cells",
                "reason": f"all {int(objects.max())} objects touch the image border",
                "info": json.dumps(info),
            }
        info["crop_flags"] = imio.crop_flags(crops)
        meta = feats.drop(columns=["label"])
        meta.insert(0, K.CELL_ID, [f"{fid}-c{int(lab):05d}" for lab in feats["label"]])
        for k, v in fov["row"].items():
            meta[k] = v
        meta[K.SPLIT] = K.UNASSIGNED
        meta[K.SOURCE] = fov["source"]
        info["seconds"] = round(time.perf_counter() - t0, 3)
        info["cpu_seconds"] = round(time.process_time() - c0, 3)
        sink = pa.BufferOutputStream()
        table = pa.Table.from_pandas(meta, preserve_index=False)
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        return {
            **base,
            "status": "ok",
            "n_cells": len(meta),
            "crops": crops.tobytes(),
            "meta": sink.getvalue().to_pybytes(),
            "info": json.dumps(info),
            "shape": json.dumps(list(crops.shape)),
        }
    except imio.ImageError as exc:
        return {**base, "code": exc.code, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - see docstring
        return {**base, "code": "error", "reason": f"{type(exc).__name__}: {exc}"}


def _crop_batch(batch: pa.Table, p: dict, ch: dict, stats_ref: list | None) -> pa.Table:
    stats = _get_stats(stats_ref)
    rows = [process_fov(json.loads(r), p, ch, stats) for r in batch.column("record").to_pylist()]
    cols = ("fov_id", "status", "code", "reason", "info", "shape")
    return pa.table(
        {
            **{c: pa.array([r.get(c, "") for r in rows], pa.string()) for c in cols},
            "n_cells": pa.array([r["n_cells"] for r in rows], pa.int64()),
            "crops": pa.array([r["crops"] for r in rows], pa.large_binary()),
            "meta": pa.array([r["meta"] for r in rows], pa.binary()),
        }
    )


def _dataset(fovs: list[dict], p: dict):
    import ray

    n_blocks = max(1, -(-len(fovs) // max(1, p["fovs_per_task"])))
    items = [{"fov_id": f["fov_id"], "record": json.dumps(f)} for f in fovs]
    return ray.data.from_items(items, override_num_blocks=n_blocks)


def _map(ds, fn, p: dict, fn_kwargs: dict):
    import ray

    compute = ray.data.TaskPoolStrategy(size=p["num_workers"]) if p["num_workers"] > 0 else None
    return ds.map_batches(
        fn,
        batch_size=max(1, p["fovs_per_task"]),
        batch_format="pyarrow",
        num_cpus=p["cpus_per_task"],
        compute=compute,
        fn_kwargs=fn_kwargs,
    )


# --------------------------------------------------------------------------------------------------
# Statistics (driver side)
# --------------------------------------------------------------------------------------------------


def _stats_fovs(fovs: list[dict], p: dict) -> list[dict]:
    """FOVs the statistics pass reads: all for illumination, else up to stats_fovs per batch."""
    if p["illum_correction"] or not p["stats_fovs"]:
        return fovs
    by_batch: dict[str, list] = {}
    for f in fovs:
        by_batch.setdefault(f["row"][K.BATCH], []).append(f)
    rng = np.random.default_rng(0)
    out = []
    for group in by_batch.values():
        take = rng.choice(len(group), min(len(group), p["stats_fovs"]), replace=False)
        out += [group[i] for i in sorted(take)]
    return out


def compute_stats(fovs: list[dict], p: dict, ch: dict) -> dict:
    """Run the statistics pass and reduce it to illumination functions and normalisation ranges.

    Fields whose scale is far outside their plate's (`imio.scale_problem`) are left out of both, so
    one field at another scale cannot turn every other field's crops to zero; the crop pass then
    rejects them, or normalises them by themselves (`ingest.scale_check`). The per-plate references
    go to the crop pass too, which checks the fields this pass did not sample.
    """
    empty = {"illum": {}, "lohi": {}, "scale_ref": {}, "out_of_scale": {}}
    need = p["illum_correction"] or p["normalization"] != "per-image"
    if not need or not fovs:
        return empty
    by_id = {f["fov_id"]: f for f in fovs}
    ds = _map(_dataset(_stats_fovs(fovs, p), p), _stats_batch, p, {"p": p, "ch": ch})
    rows = []  # (fov_id, plate, batch, small, sample (C, k), idx (k,), small shape, scale)
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in block.to_pylist():
            if not r["ok"]:
                continue
            shape = tuple(json.loads(r["shape"]))
            row = by_id[r["fov_id"]]["row"]
            rows.append(
                (
                    r["fov_id"],
                    row[K.PLATE],
                    row[K.BATCH],
                    np.frombuffer(r["small"], np.float32).reshape(shape),
                    np.frombuffer(r["sample"], np.float32).reshape(shape[0], -1),
                    np.frombuffer(r["sample_idx"], np.int64),
                    shape,
                    json.loads(r["scale"]),
                )
            )
    refs, odd = {}, {}
    if p["scale_check"] != "ignore":
        by_plate: dict[str, list] = {}
        for r in rows:
            by_plate.setdefault(r[1], []).append(r[7])
        refs = {pl: imio.scale_reference(v, p["scale_fold"]) for pl, v in by_plate.items()}
        for fid, plate, *_, scale in rows:
            why = imio.scale_problem(scale, refs[plate], ch["names"])
            if why:
                odd[fid] = why
    rows = [r for r in rows if r[0] not in odd]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for _, plate, _, small, *_ in rows:
        if plate in sums and sums[plate].shape != small.shape:
            small = imio.upsample(small, sums[plate].shape[1:])  # odd-sized image on the plate
        sums[plate] = sums.get(plate, 0) + small
        counts[plate] = counts.get(plate, 0) + 1
    illum = {}
    if p["illum_correction"]:
        illum = {
            pl: imio.illumination_function(s / counts[pl], p["illum_filter"])
            for pl, s in sums.items()
        }
    lo, hi = p["norm_percentiles"]
    pooled: dict[str, list] = {}
    for _, plate, batch, _, sample, idx, shape, _ in rows:
        if illum:
            func = illum[plate]
            if func.shape[1:] != tuple(shape[1:]):
                func = imio.upsample(func, shape[1:])
            sample = sample / func.reshape(func.shape[0], -1)[:, idx]
        key = batch if p["normalization"] == "per-batch" else ""
        pooled.setdefault(key, []).append(sample)
    lohi = {
        k: imio.percentiles(np.concatenate(v, axis=1), lo, hi).tolist() for k, v in pooled.items()
    }
    return {
        "illum": illum,
        "lohi": lohi,
        "n_fovs": len(rows),
        "scale_ref": {pl: r for pl, r in refs.items() if r is not None},
        "out_of_scale": odd,
    }


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _check_out(p: dict) -> Path:
    """The resolved ingest.out; IngestError when it is a file, unwritable, a folder of the user's own
    files or overlaps ingest.input / ingest.platemap (checked before Ray and the statistics pass)."""
    from raycell.utils.outputs import DATASET, check_output

    inputs = [("ingest.input", p["input"]), ("ingest.platemap", p["platemap"])]
    return check_output(p["out"], inputs, "ingest.out", DATASET, IngestError)[0]


def _existing(out: Path, p: dict, fingerprint: str) -> dict | None:
    """Summary of an identical earlier run in `out` (to skip), else None; raise on a clash."""
    from raycell.utils.io import read_json

    if not (out / K.MANIFEST).is_file():
        return None
    m = read_json(out / K.MANIFEST, "manifest")
    prev = m.get("ingest", {})
    same = prev.get("fingerprint") == fingerprint and prev.get("params") == _params_record(p)
    if same and not p["overwrite"] and (out / SUMMARY).is_file():
        s = read_json(out / SUMMARY, "ingest summary")
        return {**s, "skipped": True}
    if not same and not p["overwrite"]:
        raise IngestError(
            f"{out} already holds a data set made from other inputs or parameters; choose "
            "another ingest.out or set ingest.overwrite=true"
        )
    return None


def _params_record(p: dict) -> dict:
    rec = {k: v for k, v in p.items() if k not in ("overwrite", "out")}
    return json.loads(json.dumps(rec))


def _stream_crops(fovs: list[dict], p: dict, ch: dict, stats: dict, writer) -> dict:
    """Run the crop pass and feed its rows into `writer` as they arrive; collect the FOV rejects."""
    import ray

    by_id = {f["fov_id"]: f for f in fovs}
    got = {
        "seen": set(),
        "rejects": [],
        "n_ok": 0,
        "n_cells": 0,
        "diameter": [],
        "seconds": [],
        "cpu_seconds": 0.0,
        "separate": {},
        "all_zero": np.zeros(len(ch["names"]), np.int64),
        "saturated": np.zeros(len(ch["names"]), np.int64),
    }
    if not fovs:
        return got
    stats_ref = [ray.put(stats)] if (stats["illum"] or stats["lohi"]) else None
    ds = _map(_dataset(fovs, p), _crop_batch, p, {"p": p, "ch": ch, "stats_ref": stats_ref})
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in block.to_pylist():
            fov = by_id[r["fov_id"]]
            got["seen"].add(r["fov_id"])
            info = json.loads(r["info"] or "{}")
            if "diameter" in info:
                got["diameter"].append(info["diameter"])
            if r["status"] != "ok":
                files = [f["relpath"] for f in fov["files"]]
                got["rejects"].append(
                    reject_row("fov", r["code"], r["reason"], r["fov_id"], files, fov["meta"])
                )
                continue
            crops = np.frombuffer(r["crops"], imio.OUT_DTYPES[p["dtype"]])
            meta = pa.ipc.open_stream(r["meta"]).read_all().to_pandas()
            writer.add(crops.reshape(json.loads(r["shape"])), meta)
            got["n_ok"] += 1
            got["n_cells"] += len(meta)
            got["seconds"].append(info.get("seconds", 0.0))
            got["cpu_seconds"] += info.get("cpu_seconds", 0.0)
            if info.get("separate"):
                got["separate"][r["fov_id"]] = info["separate"]
            for k in ("all_zero", "saturated"):
                got[k] += np.asarray(info["crop_flags"][k], np.int64)
    # belt and braces: a FOV that came back from no task is still accounted for
    for f in fovs:
        if f["fov_id"] not in got["seen"]:
            files = [x["relpath"] for x in f["files"]]
            got["rejects"].append(
                reject_row(
                    "fov",
                    "lost",
                    "no result came back from its task",
                    f["fov_id"],
                    files,
                    f["meta"],
                )
            )
    return got


def _crop_checks(got: dict, names: list[str]) -> tuple[dict, list[str]]:
    """Counts of crops with an all-zero or saturated channel, and a warning per channel affected."""
    n = got["n_cells"]
    checks = {
        "n_crops": n,
        "all_zero": dict(zip(names, got["all_zero"].tolist())),
        "saturated": dict(zip(names, got["saturated"].tolist())),
    }
    notes = []
    for what, desc in (("all_zero", "all zero"), ("saturated", "more than half saturated")):
        for name, k in checks[what].items():
            if k:
                notes.append(
                    f"warning: {k} of {n} crops ({100 * k / max(n, 1):.1f}%) have channel "
                    f"{name!r} {desc}: check ingest.normalization / ingest.norm_percentiles and "
                    "the rejects table"
                )
    return checks, notes


def _summary(p: dict, plan: dict, got: dict, rej: pd.DataFrame, seconds: dict) -> dict:
    ch = plan["channels"]
    diam = got["diameter"]
    checks, check_notes = _crop_checks(got, ch["names"])
    sep = [
        f"field {fid} normalised by itself (ingest.scale_check=separate): {why}"
        for fid, why in sorted(got["separate"].items())
    ]
    n_odd = int((rej["code"] == "out-of-scale").sum()) if len(rej) else 0
    odd = (
        [f"warning: {n_odd} field(s) rejected as out-of-scale (see the rejects table)"]
        if n_odd
        else []
    )
    return {
        "out": p["out"],
        "input": p["input"],
        "n_files": plan["n_files"],
        "n_files_rejected": int((rej["kind"] == "file").sum()),
        "n_fovs_in": plan["n_fovs_in"],
        "n_fovs_with_cells": got["n_ok"],
        "n_fovs_rejected": int((rej["kind"] == "fov").sum()),
        "n_cells": got["n_cells"],
        "rejects_by_code": {k: int(v) for k, v in rej["code"].value_counts().items()},
        "channels": ch["names"],
        "nucleus_channel": ch["names"][ch["nucleus"]],
        "cytoplasm_channel": ch["names"][ch["cytoplasm"]] if ch["cytoplasm"] is not None else "",
        "diameter_px": {
            "median": float(np.median(diam)) if diam else 0.0,
            "min": float(min(diam)) if diam else 0.0,
            "max": float(max(diam)) if diam else 0.0,
        },
        "seconds": {
            **seconds,
            "per_fov_task_median": float(np.median(got["seconds"])) if got["seconds"] else 0.0,
            # CPU time of the crop tasks that gave cells: throughput per core, whatever the load
            "crop_task_cpu_total": round(got["cpu_seconds"], 2),
        },
        "crop_checks": checks,
        "fields_normalised_alone": sorted(got["separate"]),
        "notes": plan["notes"] + odd + sep + check_notes,
        "skipped": False,
    }


def _manifest_extra(p: dict, plan: dict, stats: dict, summary: dict, illum_files: dict) -> dict:
    """What the manifest records about ingest: parameters, corrections, accounting, rejects."""
    counts = (
        "n_files",
        "n_files_rejected",
        "n_fovs_in",
        "n_fovs_with_cells",
        "n_fovs_rejected",
        "n_cells",
    )
    return {
        "ingest": {
            "params": _params_record(p),
            "fingerprint": plan["fingerprint"],
            "normalization": {
                "mode": p["normalization"],
                "percentiles": p["norm_percentiles"],
                "ranges": stats["lohi"],
                "units": "input intensity after illumination correction",
                "dtype": p["dtype"],
            },
            "illumination": {
                "enabled": p["illum_correction"],
                "downscale": p["illum_downscale"],
                "functions": illum_files,
            },
            "scale_check": {
                "mode": p["scale_check"],
                "fold": p["scale_fold"],
                "plates": stats.get("scale_ref", {}),
                "n_rejected": summary["rejects_by_code"].get("out-of-scale", 0),
                "normalised_alone": summary["fields_normalised_alone"],
            },
            "crop_checks": summary["crop_checks"],
            "z_projection": p["z_projection"],
            "segmentation": p["segmentation"],
            "channel_roles": {
                "nucleus": summary["nucleus_channel"],
                "cytoplasm": summary["cytoplasm_channel"],
            },
            "morph_units": "pixels (areas px^2); morph_mean_* in input intensity units",
            "accounting": {k: summary[k] for k in counts},
            "rejects": {"file": REJECTS, "by_code": summary["rejects_by_code"]},
        }
    }


def run_ingest(cfg) -> dict:
    """Ingest raw images into a crop-shard data set (SPEC stage 2). See the module docstring.

    Args:
        cfg: an `ExperimentConfig`; reads `cfg.ingest` and `cfg.ray.progress`. Uses the running Ray
            (`ray.init` is the caller's job: jobs/ingest.py, the CLI); Ray Data starts a local one
            if none.

    Returns:
        Summary dict: counts (files, FOVs in / with cells / rejected, cells), rejects by code,
        paths, the seconds taken, and `skipped` when an identical data set was already there.

    Raises:
        IngestError: inputs or parameters that make the whole job impossible (the message names
            the key or file), or no FOV gave any cell.
    """
    import ray

    from raycell.formats.shards import ShardWriter
    from raycell.utils.io import atomic_write_json, atomic_write_parquet
    from raycell.utils.outputs import DATASET, staging_dir, swap_in

    t0 = time.perf_counter()
    p = dataclasses.asdict(cfg.ingest)
    _check_params(p)
    for k in ("input", "out", "platemap", "cellpose_model"):  # Ray workers do not share our cwd
        if p[k]:
            p[k] = os.path.abspath(os.path.expanduser(p[k]))
    out = _check_out(p)
    plan = plan_ingest(p)
    prev = _existing(out, p, plan["fingerprint"])
    if prev is not None:
        print(
            f"ingest: {out} already holds this data set (same inputs, parameters); skipped",
            file=sys.stderr,
        )
        return prev
    ray.data.DataContext.get_current().enable_progress_bars = bool(cfg.ray.progress)
    stats = compute_stats(plan["fovs"], p, plan["channels"])
    t_stats = time.perf_counter() - t0
    partial = staging_dir(out, DATASET)
    writer = ShardWriter(
        partial, plan["channels"]["names"], rows_per_shard=p["rows_per_shard"], overwrite=True
    )
    got = _stream_crops(plan["fovs"], p, plan["channels"], stats, writer)
    cols = ["kind", "fov_id", "code", "reason", "files"]
    rej = (
        pd.DataFrame(
            plan["rejects"] + got["rejects"],
            columns=None if plan["rejects"] or got["rejects"] else cols,
        )
        .fillna("")
        .astype(str)
    )
    atomic_write_parquet(pa.Table.from_pandas(rej, preserve_index=False), partial / REJECTS)
    summary = _summary(
        p, plan, got, rej, {"stats": round(t_stats, 2), "total": round(time.perf_counter() - t0, 2)}
    )
    if summary["n_fovs_in"] != summary["n_fovs_with_cells"] + summary["n_fovs_rejected"]:
        raise RuntimeError(f"ingest accounting bug: {summary}")  # never expected: fail loudly
    if summary["n_cells"] == 0:
        raise IngestError(
            f"no field of view gave any cell ({summary['n_fovs_rejected']} rejected: "
            f"{summary['rejects_by_code']}); see {partial / REJECTS}"
        )
    illum_files = {}
    for plate, func in stats["illum"].items():
        illum_files[plate] = f"illum/{_safe(plate)}.npy"
        (partial / "illum").mkdir(exist_ok=True)
        np.save(partial / illum_files[plate], func)
    writer.close(
        params={"stage": "ingest", "input": p["input"]},
        extra=_manifest_extra(p, plan, stats, summary, illum_files),
    )
    atomic_write_json(partial / SUMMARY, summary)
    swap_in(partial, out)
    return summary


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s) or "plate"
