"""`raycell infer`: run a checkpoint over crop shards with Ray Data and write prediction shards.

One output shard per input shard (`<out>/shards/part-XXXXX.parquet`, same name), each written atomically,
so a re-run skips the shards that are complete and an interrupted job leaves no half file. Work proceeds
in rounds of `infer.shards_per_round` input shards: Ray Data streams a round through the model actors into
a staging folder, then the round's rows are regrouped by source shard and renamed into place.

Every prediction shard records what produced it (parquet schema metadata `raycell.infer`): the checkpoint
and a hash of its weights, the data set, the input shard's name, size and mtime, the splits, the Z source
and its hash, `randomize_z` and `write_recon`. A shard counts as done only when that record matches the
current run. When it does not, `infer` refuses (one line) rather than redoing: the folder holds another
run's results, which a redo would silently replace and a resume would silently mix; the user decides
(delete the folder, or choose another `infer.out`). `check_infer` does all of this before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycell import constants as K
from raycell.config import ConfigError, ExperimentConfig
from raycell.data.dataset import read_shards
from raycell.formats.checkpoint import CheckpointMeta, weights_fingerprint
from raycell.formats.predictions import PROVENANCE_KEY
from raycell.formats.shards import ShardDataset, ShardError, open_dataset, split_counts
from raycell.infer.predictor import PASSTHROUGH, CropPredictor
from raycell.models.checkpoint import load_checkpoint
from raycell.utils.io import atomic_write_json, atomic_write_parquet
from raycell.utils.locks import check_free, writing

PATH_COL = "path"  # added by read_parquet(include_paths=True)


def _split_value(name: str) -> str:
    """The split column's value for a split name ('unassigned' in manifests is '' in the shards)."""
    return K.UNASSIGNED if name == "unassigned" else name


class _ModelActor:
    """Keep only rows of the requested splits (a vectorised Arrow filter in the actor, before decoding)."""

    def __init__(self, splits: list[str], torch_threads: int = 0, **kw):
        if torch_threads:  # Ray starts an actor with one BLAS/torch thread per CPU it holds
            import torch

            torch.set_num_threads(torch_threads)
        self.splits = pa.array([_split_value(s) for s in splits]) if splits else None
        self.inner = CropPredictor(**kw)

    def __call__(self, t: pa.Table) -> pa.Table:
        if self.splits is not None:
            t = t.filter(pc.is_in(t.column(K.SPLIT), self.splits))
        return self.inner(t)


@dataclass
class InferJob:
    """What `check_infer` found: everything `predict` needs, validated without Ray."""

    ck: Path
    meta: CheckpointMeta
    ds: ShardDataset
    out: Path
    splits: list[str]
    z_source: str
    producer: dict
    inputs: dict[str, dict]  # input shard name -> {file, size, mtime_ns}
    pending: list[str] = field(default_factory=list)  # input shard paths still to predict
    layout: str = "predictions"  # or "profiles" (`raycell embed`)

    @property
    def run_key(self) -> str:
        """A short hash of the producer record: equal keys mean the same inputs."""
        return hashlib.sha256(json.dumps(self.producer, sort_keys=True).encode()).hexdigest()[:16]


LAYOUTS = {
    "predictions": ("predictions", K.PREDICTIONS_MANIFEST),  # layout -> (default folder, manifest)
    "profiles": ("embeddings", K.EMBEDDINGS_MANIFEST),
}


def check_infer(cfg: ExperimentConfig, layout: str = "predictions") -> InferJob:
    """Validate an infer (or, with layout='profiles', an embed) run without Ray, so a bad input costs one
    line instead of a Ray start-up.

    Checks: the checkpoint exists and loads (meta.json and weights); the data set opens and its crops
    fit the model; infer.splits are splits of the data set; every pending input shard is readable and
    its rows declare the manifest's crop shape; infer.z_source is a Z table for this model that covers
    the cells needing it; a random/mixed-effects model has a Z for every batch; the output folder
    holds nothing from a different run.

    Raises:
        ConfigError, ShardError, CheckpointError, FileNotFoundError, MissingDesignMatrixError: one line
        each, naming the key or file.
    """
    ic = cfg.infer
    if not ic.checkpoint:
        raise ConfigError("infer needs infer.checkpoint (--checkpoint RUN_OR_CHECKPOINT_FOLDER)")
    _, meta = load_checkpoint(ic.checkpoint)
    ck = meta.path
    ds = open_dataset(ic.data or cfg.data.path)
    meta.data_spec.check_compatible(ds, f"checkpoint {ck}")
    splits = list(ic.splits)
    counts = split_counts(ds)
    bad = [s for s in splits if s not in counts]
    if bad:
        raise ConfigError(
            f"infer.splits: {', '.join(map(repr, bad))} "
            f"{'is not a split' if len(bad) == 1 else 'are not splits'} of data set {ds.root}; "
            f"its splits are {sorted(counts)} (rows: {counts})"
        )
    z_source, z_ids, z_fp = "", None, None
    if ic.z_source:
        from raycell.formats.inferred_z import read_inferred_z, z_fingerprint

        z_source = str(Path(ic.z_source).absolute())
        z_ids, _ = read_inferred_z(z_source, list(meta.batches.values))
        z_fp = z_fingerprint(z_source)
    _check_design_matrix(cfg, ds, meta, z_ids)
    out_key, out_val = (
        ("embed.out", cfg.embed.out) if layout == "profiles" else ("infer.out", ic.out)
    )
    out = Path(out_val).absolute() if out_val else ck.parent / LAYOUTS[layout][0]
    check_free(out, out_key)  # first: a live run's folder may not be marked as raycell's yet
    _check_out(
        out, out_key, layout, [("data set", ds.root), ("checkpoint", ck), ("Z source", z_source)]
    )
    producer = {
        "checkpoint": str(ck),
        "weights_sha256": weights_fingerprint(ck),
        "dataset": str(ds.root),
        "splits": sorted(splits) or "all",
        "z_source": z_fp,
        "randomize_z": bool(ic.randomize_z),
        "write_recon": bool(ic.write_recon),
    }
    if (
        layout != "predictions"
    ):  # (predictions keep their old record: earlier folders stay reusable)
        producer.update(layout=layout, feature_layout=cfg.embed.layout)
    inputs = {}
    for p in ds.shard_paths:
        st = os.stat(p)
        inputs[Path(p).name] = {"file": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    plan = InferJob(ck, meta, ds, out, splits, z_source, producer, inputs, layout=layout)
    done = _done_shards(plan)
    plan.pending = [p for p in ds.shard_paths if Path(p).name not in done]
    for p in plan.pending:
        ds.check_shard_file(p)
    return plan


def _check_out(out: Path, key: str, layout: str, inputs: list) -> None:
    """Refuse an output folder raycell must not write (`raycell.utils.outputs` rules).

    Never a folder of the user's own files, nor one that is, holds or lies inside an input (the data
    set above all: a refusal must never send the user to delete it); only an earlier infer/embed
    folder of the same kind is resumed.
    """
    from raycell.utils.outputs import EMBEDDINGS, PREDICTIONS, check_output

    check_output(out, inputs, key, EMBEDDINGS if layout == "profiles" else PREDICTIONS, ConfigError)


def _done_shards(plan: InferJob) -> set[str]:
    """Names of the prediction shards already made by this run; refuse when the folder holds others'."""
    shard_out = plan.out / "shards"
    done = set()
    fix = f"delete {plan.out} or set {'embed' if plan.layout == 'profiles' else 'infer'}.out to a new folder"
    for f in sorted(shard_out.glob(K.SHARD_GLOB)) if shard_out.is_dir() else []:
        if f.name not in plan.inputs:
            raise ShardError(
                f"infer.out {plan.out} holds prediction shard {f.name}, but data set "
                f"{plan.ds.root} has no input shard of that name: it holds another data set's "
                f"predictions; {fix}"
            )
        try:
            md = pq.read_schema(f).metadata or {}
        except (OSError, pa.ArrowInvalid) as exc:
            raise ShardError(
                f"cannot read prediction shard {f} ({exc}): delete it and re-run "
                "`raycell infer` to redo it"
            ) from None
        if PROVENANCE_KEY not in md:
            raise ShardError(
                f"prediction shard {f} has no record of what produced it (an older raycell "
                f"wrote it), so it cannot be reused or mixed with new results; {fix}"
            )
        rec = json.loads(md[PROVENANCE_KEY])
        if rec.get("run_key") != plan.run_key:
            raise ShardError(
                f"infer.out {plan.out} holds predictions of a different run "
                f"({_differences(rec.get('producer') or {}, plan.producer)}); {fix}"
            )
        was, now = rec.get("input") or {}, plan.inputs[f.name]
        if (was.get("size"), was.get("mtime_ns")) != (now["size"], now["mtime_ns"]):
            raise ShardError(
                f"input shard {now['file']} changed after prediction shard {f} was made from "
                f"it (size {was.get('size')} -> {now['size']}, modified since): the data set "
                f"was rewritten; {fix}"
            )
        done.add(f.name)
    return done


def _differences(was: dict, now: dict) -> str:
    """What differs between two producer records, in a few words per field."""

    def show(key: str, v) -> str:
        if key == "weights_sha256":
            return str(v)[:12]
        if key == "z_source" and isinstance(v, dict):
            return f"{v.get('path')} (sha256 {str(v.get('sha256'))[:12]})"
        return repr(v)

    diffs = [
        f"{k.replace('_sha256', ' hash')} was {show(k, was.get(k))}, now {show(k, now.get(k))}"
        for k in now
        if was.get(k) != now.get(k)
    ]
    return "; ".join(diffs) or "unknown producer"


def predict(cfg: ExperimentConfig, layout: str = "predictions") -> dict:
    """Write predictions for `cfg.infer.data` (default `cfg.data.path`); returns the predictions manifest.

    `layout='profiles'` writes the same forward pass in the profiling layout (`raycell embed`,
    `raycell.infer.predictor`), with `embeddings.json`. Needs Ray to be initialised. Validates
    everything first (`check_infer`).
    """
    plan = check_infer(cfg, layout)
    with writing(plan.out, "embed.out" if layout == "profiles" else "infer.out"):
        # shards another run may have finished since the check: counted (or refused) again
        done = _done_shards(plan)
        plan.pending = [p for p in plan.pending if Path(p).name not in done]
        return _predict(cfg, plan, layout)


def _predict(cfg: ExperimentConfig, plan: InferJob, layout: str) -> dict:
    """`predict`'s work, under the output folder's lock."""
    import ray.data

    from raycell.utils.outputs import EMBEDDINGS, MARKER, PREDICTIONS, mark

    ck, meta, ds, out, pending = plan.ck, plan.meta, plan.ds, plan.out, plan.pending
    shard_out = out / "shards"
    shard_out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():  # recognised as raycell's before its manifest exists
        mark(out, EMBEDDINGS if layout == "profiles" else PREDICTIONS)
    stale = _remove_leftovers(out, LAYOUTS[layout][1])
    if stale:
        print(
            f"[raycell] removed {len(stale)} leftover(s) of an interrupted infer run in {out}: "
            f"{', '.join(p.name for p in stale[:3])}{', ...' if len(stale) > 3 else ''}",
            flush=True,
        )
    print(
        f"[raycell] {'embed' if layout == 'profiles' else 'infer'} {meta.model_type} ({ck}) on "
        f"{ds.root}: {len(ds.shard_paths) - len(pending)} "
        f"shard(s) already done, {len(pending)} to go -> {out}",
        flush=True,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = cfg.data.block_size_mb << 20
    # a user error raised in the predictor reaches the driver as itself (inside Ray's RayTaskError),
    # not as Ray Data's UserCodeException that keeps only its text
    ctx.raise_original_map_exception = True
    t0 = time.time()
    per = max(1, cfg.infer.shards_per_round)
    for r in range(0, len(pending), per):
        round_paths = pending[r : r + per]
        staging = out / f".staging-{uuid.uuid4().hex[:8]}"
        try:
            rd = read_shards(round_paths, cfg.data.parquet_reader, include_paths=True)
            rd = rd.map_batches(
                _ModelActor,
                batch_format="pyarrow",
                batch_size=cfg.data.eval_batch_size,
                fn_constructor_kwargs={
                    "splits": plan.splits,
                    "checkpoint": str(ck),
                    "torch_threads": _actor_threads(cfg),
                    "write_recon": cfg.infer.write_recon,
                    "z_source": plan.z_source,
                    "randomize_z": cfg.infer.randomize_z,
                    "passthrough": PASSTHROUGH + [PATH_COL],
                    "layout": layout,
                    "feature_layout": cfg.embed.layout,
                    "channels_last": cfg.train.channels_last,
                },
                compute=ray.data.ActorPoolStrategy(size=cfg.infer.num_actors),
                num_gpus=cfg.infer.num_gpus,
                num_cpus=cfg.infer.cpus_per_actor,
            )
            try:
                rd.write_parquet(str(staging))
            except Exception as exc:  # noqa: BLE001 - a user error inside Ray is re-raised as itself
                user = _user_error_in(exc)
                if user is None:
                    raise
                raise user from None
            _finalise_round(staging, round_paths, shard_out, plan)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    shards, n_rows = [], 0
    for name, inp in plan.inputs.items():  # only this data set's shards count, in manifest order
        rows = pq.ParquetFile(shard_out / name).metadata.num_rows
        shards.append({"file": f"shards/{name}", "rows": rows, "input": inp})
        n_rows += rows
    counts = split_counts(ds)
    expected = sum(counts.get(s, 0) for s in plan.splits) if plan.splits else sum(counts.values())
    if n_rows != expected:
        raise ShardError(
            f"inference wrote {n_rows} prediction rows but the manifest of {ds.root} counts "
            f"{expected} rows in splits {plan.splits or 'all'}: the data set's shards and its "
            "dataset.json disagree"
        )
    manifest = {
        "checkpoint": str(ck),
        "model_type": meta.model_type,
        "dataset": str(ds.root),
        "splits": list(cfg.infer.splits) or "all",
        "n_rows": n_rows,
        "n_shards": len(shards),
        "labels": meta.labels.to_dict(),
        "batches": meta.batches.to_dict(),
        "data_spec": meta.data_spec.to_dict(),
        "producer": plan.producer,
        "run_key": plan.run_key,
        "shards": shards,
        "seconds": round(time.time() - t0, 2),
    }
    if layout == "profiles":
        manifest.update(
            _profile_manifest(shard_out / shards[0]["file"].split("/")[-1], meta, cfg, n_rows)
        )
    atomic_write_json(out / LAYOUTS[layout][1], manifest)
    print(
        f"[raycell] wrote {n_rows} {'embedding' if layout == 'profiles' else 'prediction'} rows in "
        f"{len(shards)} shard(s) to {out}",
        flush=True,
    )
    return {**manifest, "out": str(out)}


def _actor_threads(cfg: ExperimentConfig) -> int:
    """`infer.torch_threads`, or on one machine its cores shared between the actors (0: Ray's default).

    Why: Ray gives an actor holding 1 CPU one torch thread, so on a laptop one actor used half the
    cores a plain loop uses (measured 0.35x a plain `inference_mode` loop on 2 cores).
    """
    from raycell.utils.ray_utils import single_node

    if cfg.infer.torch_threads:
        return cfg.infer.torch_threads
    if cfg.infer.num_gpus or not single_node():
        return 0
    return max(1, (os.cpu_count() or 1) // max(1, cfg.infer.num_actors))


def _user_error_in(exc: BaseException) -> BaseException | None:
    """The project's one-line error inside a Ray failure, rebuilt on the driver; None if there is none."""
    from raycell.errors import user_errors
    from raycell.utils.ray_private import user_error_in

    return user_error_in(exc, user_errors())


def _check_design_matrix(
    cfg: ExperimentConfig, ds, meta: CheckpointMeta, z_ids: pa.Array | None = None
) -> None:
    """Fail before Ray starts when a random/mixed-effects model would meet cells it has no Z for."""
    from raycell.infer.predictor import MissingDesignMatrixError

    if cfg.infer.randomize_z:
        return
    if not meta.uses_z:
        return
    wanted = [_split_value(s) for s in cfg.infer.splits]
    cols = [K.CELL_ID, K.BATCH, K.SPLIT] if z_ids is not None else [K.BATCH, K.SPLIT]
    t = ds.read_table(cols, splits=wanted or None)
    unknown = pc.invert(
        pc.is_in(t.column(K.BATCH), pa.array(list(meta.batches.values), pa.string()))
    )
    if z_ids is None:
        missing = sorted(set(t.column(K.BATCH).filter(unknown).to_pylist()))
        if missing:
            raise MissingDesignMatrixError(
                f"model type {meta.model_type!r} needs a design matrix Z for every cell, but batch(es) "
                f"{missing} are not among its training batches and no inferred Z was given: run "
                "`raycell infer-z --checkpoint <run>` and pass its output folder as infer.z_source (or "
                "restrict infer.splits to seen batches, or set infer.randomize_z=true for the ablation)"
            )
        return
    ids = t.column(K.CELL_ID).filter(unknown)
    lacking = ids.filter(pc.invert(pc.is_in(ids, value_set=z_ids.cast(ids.type))))
    if len(lacking):
        raise MissingDesignMatrixError(
            f"{len(lacking)} cell(s) of batches outside the training batches (e.g. {lacking[0].as_py()!r}) "
            f"have no row in the inferred Z {cfg.infer.z_source} (infer.z_source): run `raycell infer-z` on "
            "this data set with infer.z_splits covering these cells' splits"
        )


def _profile_manifest(
    first_shard: Path, meta: CheckpointMeta, cfg: ExperimentConfig, n_rows: int
) -> dict:
    """The embeddings.json keys of the profiling layout: feature columns, heads and their classes."""
    from raycell.infer.predictor import EMBEDDING, FEATURE_PREFIX

    names = pq.read_schema(first_shard).names
    heads = meta.output_heads
    return {
        "layout": cfg.embed.layout,
        "n_cells": n_rows,
        "features": [EMBEDDING]
        if cfg.embed.layout == "list"
        else [n for n in names if n.startswith(FEATURE_PREFIX)],
        "heads": {h.column: list(h.values) for h in heads},
    }


def _remove_leftovers(out: Path, manifest: str = K.PREDICTIONS_MANIFEST) -> list[Path]:
    """Staging folders and temporary files that a killed infer run left in `out` (never results).

    A run removes its own in `finally`, which a SIGKILL or a lost node skips; nothing reads them, but
    they would stay in the user's folder for good. Called under the folder's lock
    (`raycell.utils.locks`), so no live run's staging folder is ever removed.
    """
    stale = sorted(p for p in out.glob(".staging-*") if p.is_dir())
    stale += sorted(out.glob(f".{manifest}.*.tmp"))
    stale += sorted((out / "shards").glob(".*.parquet.*.tmp"))
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def _finalise_round(staging: Path, round_paths: list[str], shard_out: Path, plan: InferJob) -> None:
    """Regroup a round's staged rows by source shard and write one output file per input shard.

    Each file carries its provenance record (schema metadata) so a later run can tell whether it is done.
    """
    files = sorted(staging.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    for src in round_paths:
        name = Path(src).name
        if table is not None:
            # include_paths gives the path as the filesystem saw it (no scheme); match on the file name.
            mask = pc.ends_with(table.column(PATH_COL), "/" + name)
            part = table.filter(mask).drop_columns([PATH_COL])
        else:
            part = pa.table({K.CELL_ID: pa.array([], pa.string())})
        rec = {
            "run_key": plan.run_key,
            "producer": plan.producer,
            "input": plan.inputs[name],
            "rows": part.num_rows,
        }
        part = part.replace_schema_metadata(
            {**(part.schema.metadata or {}), PROVENANCE_KEY: json.dumps(rec).encode()}
        )
        atomic_write_parquet(part, shard_out / name)


__all__ = ["check_infer", "predict"]
