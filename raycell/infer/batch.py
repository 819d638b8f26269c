"""`raycell infer`: run a checkpoint over crop shards with Ray Data and write prediction shards.

One output shard per input shard (`<out>/shards/part-XXXXX.parquet`, same name), each written atomically
as soon as all its rows are predicted, so a re-run skips the shards that are complete and an interrupted
job leaves no half file. Every pending input shard streams through one pool of model actors (the actor
start, imports and checkpoint load are paid once per command, not per group of shards); the driver
collects the rows, puts each output shard's rows in its input shard's order and writes it.

One pass can serve several outputs over the same data set and splits (`predict_many`): other
checkpoints, or the same checkpoint with randomized Z or another Z source. Each actor loads each
checkpoint once and decodes each batch once, so `raycell experiment` infers all the rows of a seed
with one actor pool.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycell import constants as K
from raycell.config import ConfigError, ExperimentConfig
from raycell.data.dataset import read_shards
from raycell.formats.checkpoint import CheckpointMeta, weights_fingerprint
from raycell.formats.predictions import PROVENANCE_KEY
from raycell.formats.shards import (
    ShardDataset,
    ShardError,
    decode_images,
    open_dataset,
    split_counts,
)
from raycell.infer.predictor import PASSTHROUGH, CropPredictor
from raycell.models.checkpoint import load_checkpoint
from raycell.utils.io import atomic_write_json, atomic_write_parquet
from raycell.utils.locks import check_free, writing

PATH_COL = "path"  # added by read_parquet(include_paths=True)


def _split_value(name: str) -> str:
    """The split column's value for a split name ('unassigned' in manifests is '' in the shards)."""
    return K.UNASSIGNED if name == "unassigned" else name


class _ModelActor:
    """One model replica serving every output of a pass (`predict_many`).

    Keeps only rows of the requested splits (a vectorised Arrow filter, before decoding), decodes each
    batch once, and predicts it once per output; each distinct checkpoint is loaded once per actor and
    shared by its outputs (`CropPredictor.variant`). Returns one row per output with rows in the batch:
    the output's index and its table as an Arrow IPC stream, because the outputs' schemas differ (other
    models, recon columns) and Ray Data's blocks must share one.
    """

    def __init__(self, splits: list[str], outputs: list[dict], torch_threads: int = 0, **kw):
        if torch_threads:  # Ray starts an actor with one BLAS/torch thread per CPU it holds
            import torch

            torch.set_num_threads(torch_threads)
        self.splits = pa.array([_split_value(s) for s in splits]) if splits else None
        loaded: dict[str, CropPredictor] = {}
        self.predictors: list[CropPredictor] = []
        self.names: list[pa.Array | None] = []  # per output: its input shards, None = all of them
        for o in outputs:
            ck, opts = (
                o["checkpoint"],
                {k: o[k] for k in ("z_source", "randomize_z", "write_recon")},
            )
            if ck in loaded:
                self.predictors.append(loaded[ck].variant(**opts))
            else:
                loaded[ck] = CropPredictor(checkpoint=ck, **opts, **kw)
                self.predictors.append(loaded[ck])
            self.names.append(None if o["names"] is None else pa.array(o["names"], pa.string()))

    def __call__(self, t: pa.Table) -> pa.Table:
        if self.splits is not None:
            t = t.filter(pc.is_in(t.column(K.SPLIT), self.splits))
        which, blobs = [], []
        decoded: dict[tuple, np.ndarray] = {}
        for i, (pred, names) in enumerate(zip(self.predictors, self.names)):
            keep = None if names is None else pc.is_in(_shard_names(t.column(PATH_COL)), names)
            part = t if keep is None else t.filter(keep)
            if part.num_rows == 0:  # the driver counts rows: an empty part carries nothing
                continue
            key = (pred.spec.shape, pred.spec.dtype)
            if keep is not None:
                imgs = decode_images(part, *key)
            else:
                if key not in decoded:
                    decoded[key] = decode_images(t, *key)
                imgs = decoded[key]
            which.append(i)
            blobs.append(_to_ipc(pred.predict_decoded(part, imgs)))
        return pa.table(
            {"output": pa.array(which, pa.int32()), "rows": pa.array(blobs, pa.large_binary())}
        )


def _shard_names(paths: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The file name of each path (read_parquet's include_paths gives it as the filesystem saw it)."""
    return pc.replace_substring_regex(paths, pattern=r"^.*/", replacement="")


def _to_ipc(t: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


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
    randomize_z: bool = False
    write_recon: bool = False

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
    plan = InferJob(
        ck,
        meta,
        ds,
        out,
        splits,
        z_source,
        producer,
        inputs,
        layout=layout,
        randomize_z=bool(ic.randomize_z),
        write_recon=bool(ic.write_recon),
    )
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
    return predict_many([cfg], layout)[0]


def predict_many(cfgs: list[ExperimentConfig], layout: str = "predictions") -> list[dict]:
    """`predict` for several outputs in one pass over the data: one actor pool, one read, each batch
    decoded once, each checkpoint loaded once per actor.

    The configs may differ in `infer.checkpoint`, `infer.out` (or `embed.out`), `infer.z_source`,
    `infer.randomize_z` and `infer.write_recon`; they must share the data set and `infer.splits`. The
    pass's own settings (actors, batch size, blocks) are the first config's. Every output is validated
    before Ray does anything (`check_infer`). Returns the manifests, in the order of `cfgs`.
    """
    import contextlib

    if not cfgs:
        return []
    plans = [check_infer(c, layout) for c in cfgs]
    _check_one_pass(plans)
    key = "embed.out" if layout == "profiles" else "infer.out"
    with contextlib.ExitStack() as stack:
        for plan in plans:
            stack.enter_context(writing(plan.out, key))
            # shards another run may have finished since the check: counted (or refused) again
            done = _done_shards(plan)
            plan.pending = [p for p in plan.pending if Path(p).name not in done]
        return _predict(cfgs, plans, layout)


def _check_one_pass(plans: list[InferJob]) -> None:
    """Outputs of one pass read the same rows and never write into one folder."""
    first = plans[0]
    for plan in plans[1:]:
        if plan.ds.root != first.ds.root or sorted(plan.splits) != sorted(first.splits):
            raise ConfigError(
                f"one inference pass reads one data set and splits: {plan.ds.root} "
                f"{plan.splits or 'all'} differs from {first.ds.root} {first.splits or 'all'}"
            )
    outs = [plan.out for plan in plans]
    twice = sorted({str(o) for o in outs if outs.count(o) > 1})
    if twice:
        raise ConfigError(f"two outputs of one inference pass go to the same folder {twice[0]}")


def _predict(cfgs: list[ExperimentConfig], plans: list[InferJob], layout: str) -> list[dict]:
    """`predict_many`'s work, under the output folders' locks."""
    from raycell.utils.outputs import EMBEDDINGS, MARKER, PREDICTIONS, mark

    what = "embed" if layout == "profiles" else "infer"
    for plan in plans:
        (plan.out / "shards").mkdir(parents=True, exist_ok=True)
        if not (plan.out / MARKER).exists():  # recognised as raycell's before its manifest exists
            mark(plan.out, EMBEDDINGS if layout == "profiles" else PREDICTIONS)
        stale = _remove_leftovers(plan.out, LAYOUTS[layout][1])
        if stale:
            print(
                f"[raycell] removed {len(stale)} leftover(s) of an interrupted infer run in "
                f"{plan.out}: {', '.join(p.name for p in stale[:3])}"
                f"{', ...' if len(stale) > 3 else ''}",
                flush=True,
            )
        print(
            f"[raycell] {what} {plan.meta.model_type} ({plan.ck}) on {plan.ds.root}: "
            f"{len(plan.ds.shard_paths) - len(plan.pending)} "
            f"shard(s) already done, {len(plan.pending)} to go -> {plan.out}",
            flush=True,
        )
    t0 = time.time()
    _stream(cfgs[0], plans, layout)
    return [_write_manifest(c, plan, layout, t0) for c, plan in zip(cfgs, plans)]


def _wanted_rows(path: str, splits: list[str]) -> int:
    """How many rows of an input shard are in `splits` (all its rows if none)."""
    if not splits:
        return pq.ParquetFile(path).metadata.num_rows
    col = pq.read_table(path, columns=[K.SPLIT]).column(K.SPLIT)
    return int(pc.sum(pc.is_in(col, pa.array([_split_value(s) for s in splits]))).as_py() or 0)


class _ShardCollector:
    """Collects one output's predicted rows by input shard and writes each shard once it is complete.

    The pass preserves order (Ray Data's `preserve_order`), so a shard's rows arrive in its input
    order whatever the number of actors: the output does not depend on scheduling.
    """

    def __init__(self, plan: InferJob, wanted: dict[str, int]):
        self.plan = plan
        self.wanted = {Path(p).name: wanted[Path(p).name] for p in plan.pending}
        self.parts: dict[str, list[pa.Table]] = {}
        self.rows: dict[str, int] = {}
        self.written: set[str] = set()
        self.schema: pa.Schema | None = None  # of a written shard: the schema of empty ones

    def add(self, t: pa.Table) -> None:
        paths = t.column(PATH_COL)
        for path in pc.unique(paths).to_pylist():
            name = path.rsplit("/", 1)[-1]
            part = t.filter(pc.equal(paths, path)) if t.num_rows else t
            if name not in self.wanted:
                raise ShardError(
                    f"inference returned rows of {path}, which is not a pending input shard of "
                    f"{self.plan.ds.root}"
                )
            self.parts.setdefault(name, []).append(part)
            self.rows[name] = self.rows.get(name, 0) + part.num_rows
            want = self.wanted[name]
            if self.rows[name] > want or name in self.written:
                raise ShardError(
                    f"inference returned {self.rows[name]} rows for input shard {path}, which "
                    f"has {want} rows of splits {self.plan.splits or 'all'}"
                )
            if self.rows[name] == want:
                self._write(name, pa.concat_tables(self.parts.pop(name)))

    def _write(self, name: str, t: pa.Table) -> None:
        t = _parquet_list_names(t.drop_columns([PATH_COL]) if PATH_COL in t.column_names else t)
        if self.schema is None and t.num_rows:
            self.schema = t.schema
        rec = {
            "run_key": self.plan.run_key,
            "producer": self.plan.producer,
            "input": self.plan.inputs[name],
            "rows": t.num_rows,
        }
        t = t.replace_schema_metadata(
            {**(t.schema.metadata or {}), PROVENANCE_KEY: json.dumps(rec).encode()}
        )
        atomic_write_parquet(t, self.plan.out / "shards" / name)
        self.written.add(name)

    def finish(self) -> None:
        """Write the shards without rows of the splits; refuse when a shard's rows did not all come."""
        for name, want in self.wanted.items():
            got = self.rows.get(name, 0)
            if name in self.written:
                continue
            if want:
                raise ShardError(
                    f"inference returned {got} of the {want} rows of input shard "
                    f"{self.plan.inputs[name]['file']} in splits {self.plan.splits or 'all'}"
                )
            # no rows: the columns a shard with rows has (a `cell_id` column if none has any)
            schema = self.schema or pa.schema([(K.CELL_ID, pa.string())])
            self._write(name, schema.empty_table())


def _parquet_list_names(t: pa.Table) -> pa.Table:
    """Fixed-size list columns with the child name a parquet round trip gives ('element', not 'item').

    Why: the same predictions then give the same bytes whether or not they were staged in parquet
    on their way, and a shard reads back with the schema it was written with.
    """
    renamed = [
        f.with_type(pa.list_(pa.field("element", f.type.value_type), f.type.list_size))
        if pa.types.is_fixed_size_list(f.type) and f.type.value_field.name != "element"
        else f
        for f in t.schema
    ]
    if all(a is b for a, b in zip(renamed, t.schema)):
        return t
    return t.cast(pa.schema(renamed, t.schema.metadata))


def _stream(cfg: ExperimentConfig, plans: list[InferJob], layout: str) -> None:
    """Stream every input shard pending for some output through one actor pool; write as rows come."""
    pending = {Path(p).name for plan in plans for p in plan.pending}
    if not pending:
        return
    splits = plans[0].splits
    ds = plans[0].ds
    wanted = {
        Path(p).name: _wanted_rows(p, splits) for p in ds.shard_paths if Path(p).name in pending
    }
    collectors = [_ShardCollector(plan, wanted) for plan in plans]
    # shards without rows of the splits are not read: their (empty) outputs are written at the end
    paths = [p for p in ds.shard_paths if Path(p).name in pending and wanted[Path(p).name]]
    if paths:
        _run_actors(cfg, plans, layout, paths, collectors)
    for c in collectors:
        c.finish()


def _run_actors(
    cfg: ExperimentConfig,
    plans: list[InferJob],
    layout: str,
    paths: list[str],
    collectors: list[_ShardCollector],
) -> None:
    import ray.data

    names = {Path(p).name for p in paths}
    outputs = []
    for plan in plans:
        mine = {Path(p).name for p in plan.pending} & names
        outputs.append(
            {
                "checkpoint": str(plan.ck),
                "z_source": plan.z_source,
                "randomize_z": plan.randomize_z,
                "write_recon": plan.write_recon,
                "names": None if mine == names else sorted(mine),
            }
        )
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = cfg.data.block_size_mb << 20
    # a user error raised in the predictor reaches the driver as itself (inside Ray's RayTaskError),
    # not as Ray Data's UserCodeException that keeps only its text
    ctx.raise_original_map_exception = True
    ordered, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    rd = read_shards(paths, cfg.data.parquet_reader, include_paths=True)
    rd = rd.map_batches(
        _ModelActor,
        batch_format="pyarrow",
        batch_size=cfg.data.eval_batch_size,
        fn_constructor_kwargs={
            "splits": plans[0].splits,
            "outputs": outputs,
            "torch_threads": _actor_threads(cfg),
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
        for batch in rd.iter_batches(batch_format="pyarrow", batch_size=None):
            which = batch.column("output").to_pylist()
            for i, blob in zip(which, batch.column("rows").to_pylist()):
                collectors[i].add(pa.ipc.open_stream(blob).read_all())
    except Exception as exc:  # noqa: BLE001 - a user error inside Ray is re-raised as itself
        user = _user_error_in(exc)
        if user is None:
            raise
        raise user from None
    finally:
        ctx.execution_options.preserve_order = ordered


def _write_manifest(cfg: ExperimentConfig, plan: InferJob, layout: str, t0: float) -> dict:
    """Check the row count against the data set's manifest, write predictions/embeddings.json."""
    out, ds, meta, ck = plan.out, plan.ds, plan.meta, plan.ck
    shard_out = out / "shards"
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


__all__ = ["check_infer", "predict", "predict_many"]
