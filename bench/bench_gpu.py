"""GPU throughput: would raycell's data path keep a GPU busy, and what do bf16 / channels-last buy?

Sections, in this order (each measurement in its own try/except, so one failure loses nothing else;
a global `--budget-s` skips whatever is left once it is spent, and says so):

* env: GPU name and memory, torch / CUDA / cuDNN / timm versions, CPU count; whether importing
  `raycell.models` pulls in Ray (the GPU machine has no Ray: the import would fail, and the raycell
  modules on the way are recorded).
* data: crop shards written by raycell's generator and writer (`raycell.data.synthetic.generate` +
  `ShardWriter`: `--unique-cells` generated cells, repeated under new cell ids up to `--cells`,
  since generating 20k cells costs ~40 s of one core), read by pyarrow and collated by
  `raycell.data.collate.collate_crops` (what the Ray collate calls: `decode_images`, label and batch
  codes), then `DataSpec.to_float`. Images/s in this process and in N single-threaded processes. The
  shards are in the page cache: this is the CPU ceiling, not disk speed.
* h2d: host -> device copies (`.to(device)`) of uint8 and float32 batches, pinned and pageable.
* models: images/s of a training step (forward + backward + AdamW) and of an inference forward
  (`torch.inference_mode()`) in fp32, bf16 autocast and bf16 + channels_last; median of timed
  windows, peak GPU memory. raycell's `conventional` (small preset, batch 256 and 512) and
  `mixedeffects` AECs at 64 px x 2 channels are built by the registry and stepped by their training
  plan as `raycell/train/loop.py` does: uint8 batch -> `DataSpec.to_float` on the device, and a
  `.values()` host sync every step (`train_nosync` leaves that sync out). timm resnet50 (64 and
  128 px) and resnet18 (64 px): random init, in_chans=2, 8 classes, batch 256.
* compile: `torch.compile` of resnet50 bf16 + channels_last (train, then inference) in a child
  process that is killed after `--compile-timeout-s`; reports the compile seconds.

Rows are printed as they finish, with each section's seconds, then a summary. The JSON at `--out`
is rewritten after every measurement, so a run killed part-way keeps what it measured. Needs torch,
timm, numpy, pandas, pyarrow, scipy and pyyaml; not Ray, optuna or scikit-learn.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python bench/bench_gpu.py --out $OUT/gpu.json  # GPU, ~6 min
    python bench/bench_gpu.py --quick --device cpu --cells 512 --steps 2           # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/bench_gpu.py` works without PYTHONPATH=. too
    sys.path.insert(0, str(REPO))

PRECISIONS = ("fp32", "bf16", "bf16_cl")
SECTIONS = ("data", "h2d", "models", "compile")
# The synthetic data set: 2 channels, labels high/low, 8 imaging batches.
CHANNELS, AEC_CLASSES, AEC_BATCHES = 2, 2, 8
TIMM_CLASSES = 8
DEFAULT_OUT = REPO / "bench" / "results" / "gpu.json"
_TIMING: dict = {}  # warmup / windows / min_steps / window_s, set once from the arguments


def model_cases(quick: bool) -> list[dict]:
    """The models measured; --quick uses 32 px and batches / 128 so a busy CPU gets through them."""

    def b(n: int) -> int:
        return max(2, n // 128) if quick else n

    def px(n: int) -> int:
        return 32 if quick else n

    cases = [
        {"model": "conventional", "kind": "aec", "size": px(64), "batch": b(256)},
        {"model": "conventional", "kind": "aec", "size": px(64), "batch": b(512)},
        {"model": "mixedeffects", "kind": "aec", "size": px(64), "batch": b(256)},
        {"model": "resnet50", "kind": "timm", "size": px(64), "batch": b(256)},
        {"model": "resnet18", "kind": "timm", "size": px(64), "batch": b(256)},
        {"model": "resnet50", "kind": "timm", "size": px(128), "batch": b(256)},
    ]
    return [c for i, c in enumerate(cases) if c not in cases[:i]]  # --quick makes duplicates


# ------------------------------------------------------------------------------------------ timing


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(
    step,
    device,
    warmup: int,
    windows: int,
    min_steps: int,
    window_s: float,
    deadline: float | None = None,
    max_steps: int = 1000,
) -> dict:
    """Warm up, then time `windows` windows of steps; milliseconds per step from the median window.

    With `window_s` > 0 a window runs enough steps to last about that long (at least `min_steps`),
    sized from one step timed after the warm-up, so 3 ms and 100 ms steps get comparable windows.
    Past `deadline` (time.monotonic()) the warm-up and the windows stop early, after one window.
    """

    def late() -> bool:
        return deadline is not None and time.monotonic() > deadline

    _sync(device)
    t = time.perf_counter()
    step()  # the first step pays cuDNN autotuning, allocator growth and lazy initialisation
    _sync(device)
    first = time.perf_counter() - t
    for _ in range(max(warmup - 1, 0)):
        if late():
            break
        step()
    n = min_steps
    if window_s > 0:
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        one = max(time.perf_counter() - t, 1e-6)
        n = max(min_steps, min(max_steps, math.ceil(window_s / one)))
    ws = []
    for _ in range(max(windows, 1)):
        if ws and late():
            break
        _sync(device)
        t = time.perf_counter()
        for _ in range(n):
            step()
        _sync(device)
        ws.append(time.perf_counter() - t)
    med = statistics.median(ws)
    return {
        "first_step_s": round(first, 4),
        "steps_per_window": n,
        "windows_s": [round(w, 5) for w in ws],
        "step_ms": 1000.0 * med / n,
        "cut_short": len(ws) < max(windows, 1),
    }


def _run(step, dev, batch: int) -> dict:
    r = timed(step, dev, **_TIMING)
    return {**r, "images_per_s": batch / (r["step_ms"] / 1000)}


# --------------------------------------------------------------------------------------- the bench


class Bench:
    """Results, the time budget and the JSON file, shared by every section."""

    def __init__(self, args: argparse.Namespace, argv: list[str], device):
        """Start the clock; `argv` is recorded as the command."""
        self.args = args
        self.device = device
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.out = Path(args.out)
        self.res: dict = {
            "bench": "gpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "python bench/bench_gpu.py " + " ".join(argv),
            "args": vars(args),
            "budget_s": args.budget_s,
            "sections": {},
            "section_seconds": {},
            "skipped": [],
            "errors": [],
        }

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.t0

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.deadline - time.monotonic()

    def out_of_time(self, what: str, need: float = 1.0) -> bool:
        """True, with the skip recorded and printed, when fewer than `need` seconds are left."""
        if self.left() >= need:
            return False
        msg = (
            f"{what}: skipped, time budget spent (--budget-s {self.args.budget_s:g}, "
            f"{self.elapsed():.0f} s elapsed)"
        )
        self.res["skipped"].append(msg)
        print(f"  SKIP {msg}")
        return True

    def guarded(self, what: str, fn, *a, **kw) -> dict:
        """One measurement; an exception becomes {'status': 'error', ...} and the run goes on."""
        import torch

        cuda = self.device.type == "cuda"
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            out = fn(*a, **kw)
            if cuda:
                out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            return {"status": "ok", **out}
        except Exception as exc:  # noqa: BLE001 - one failed measurement must not lose the rest
            text = str(exc).strip()
            msg = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
            self.res["errors"].append(f"{what}: {msg}")
            tb = traceback.format_exc()
            print(f"  ERROR {what}: {msg}\n{tb[-1500:]}")
            return {"status": "error", "error": msg, "traceback": tb[-3000:]}
        finally:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    def section(self, name: str, fn) -> None:
        """Run a section, print and record its seconds, save the JSON."""
        print(f"\n== {name} (elapsed {self.elapsed():.1f} s, budget left {self.left():.0f} s)")
        t = time.monotonic()
        try:
            fn(self)
        except Exception as exc:  # noqa: BLE001 - a bug in one section must not lose the others
            self.res["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"  ERROR in section {name}:\n{traceback.format_exc()[-2000:]}")
        dt = time.monotonic() - t
        self.res["section_seconds"][name] = round(dt, 2)
        print(f"== {name} done in {dt:.1f} s")
        self.save()

    def save(self) -> None:
        """Write the JSON atomically (a kill mid-write leaves the previous version)."""
        self.res["elapsed_s"] = round(self.elapsed(), 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.res, indent=2, default=str))
        os.replace(tmp, self.out)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------- env


def env_section(bench: Bench) -> None:
    """Machine and versions, and whether raycell's model package imports Ray."""
    import numpy
    import pyarrow
    import torch

    dev = bench.device
    info: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": _cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
        "device": str(dev),
        "ray_installed": importlib.util.find_spec("ray") is not None,
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError as exc:
        info["timm"] = f"missing: {exc}"
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(
            gpu=p.name,
            gpu_mem_gib=round(p.total_memory / 2**30, 1),
            gpu_sms=p.multi_processor_count,
            gpu_capability=f"{p.major}.{p.minor}",
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
        with warnings.catch_warnings():  # newer torch versions deprecate the TF32 flags
            warnings.simplefilter("ignore")
            info["tf32"] = {
                "matmul": torch.backends.cuda.matmul.allow_tf32,
                "cudnn": torch.backends.cudnn.allow_tf32,
                "float32_matmul_precision": torch.get_float32_matmul_precision(),
            }
    had_ray = "ray" in sys.modules
    try:
        import raycell.models  # noqa: F401

        info["raycell_models_imports_ray"] = "ray" in sys.modules and not had_ray
    except ImportError as exc:  # Ray is absent and a raycell module asked for it: say which
        frames = [
            f"{Path(f.filename).name}:{f.lineno}"
            for f in traceback.extract_tb(exc.__traceback__)
            if "raycell" in f.filename
        ]
        info["raycell_models_imports_ray"] = f"import failed: {exc} (via {' -> '.join(frames)})"
        bench.res["errors"].append(f"env: import raycell.models failed: {exc}")
    bench.res["sections"]["env"] = info
    for k in (
        "gpu",
        "gpu_mem_gib",
        "torch",
        "cuda",
        "cudnn",
        "timm",
        "python",
        "cpus_usable",
        "torch_threads",
        "raycell_models_imports_ray",
    ):
        if k in info:
            print(f"  {k:<28}{info[k]}")


# -------------------------------------------------------------------------------------------- data


def write_shards(out: Path, cells: int, unique: int, size: int, rows_per_shard: int) -> dict:
    """Crop shards of `cells` rows: `unique` generated cells, repeated under new cell ids."""
    import pandas as pd

    from raycell import constants as K
    from raycell.data.synthetic import CHANNELS as NAMES
    from raycell.data.synthetic import generate
    from raycell.formats.shards import ShardWriter, open_dataset

    t = time.perf_counter()
    unique = max(1, min(unique, cells))
    img, meta, _ = generate(n_cells=unique, crop_size=size, seed=0)
    t_gen = time.perf_counter() - t
    w = ShardWriter(out, NAMES, rows_per_shard=rows_per_shard, overwrite=True)
    done, rep = 0, 0
    while done < cells:
        k = min(len(img), cells - done)
        m = meta.iloc[:k].copy()
        m[K.CELL_ID] = pd.Series([f"{c}-r{rep}" for c in m[K.CELL_ID]], index=m.index)
        w.add(img[:k], m)
        done, rep = done + k, rep + 1
    w.close(
        params={
            "generator": "raycell.data.synthetic",
            "n_cells": cells,
            "unique_cells": unique,
            "crop_size": size,
        }
    )
    ds = open_dataset(out)
    nbytes = sum(os.path.getsize(p) for p in ds.shard_paths)
    return {
        "path": str(out),
        "cells": cells,
        "unique_cells": unique,
        "shards": len(ds.shard_paths),
        "rows_per_shard": rows_per_shard,
        "shard_mib": round(nbytes / 2**20, 1),
        "generate_s": round(t_gen, 2),
        "write_s": round(time.perf_counter() - t - t_gen, 2),
        "shape": list(ds.shape),
        "dtype": ds.dtype,
        "label_vocab": ds.manifest.label_vocab,
        "batch_vocab": ds.manifest.batch_vocab,
    }


def read_decode(task: tuple) -> tuple[int, float, float, float]:
    """One shard -> collated batches -> float tensors; (images, read s, collate s, to_float s).

    The collate is raycell's own (`raycell.data.collate.collate_crops`, what `CropCollate` calls).
    """
    path, batch, shape, dtype, labels, batches, threads = task
    import pyarrow.parquet as pq

    from raycell import constants as K
    from raycell.data.collate import collate_crops
    from raycell.formats.categories import CategoryMap
    from raycell.formats.spec import DataSpec

    spec = DataSpec(("c",) * shape[0], tuple(shape), dtype)
    lab, bat = CategoryMap(K.LABEL, tuple(labels)), CategoryMap(K.BATCH, tuple(batches))
    t0 = time.perf_counter()
    t = pq.read_table(path, columns=[K.IMAGE, K.LABEL, K.BATCH], use_threads=threads)
    t1 = time.perf_counter()
    n, t_float = 0, 0.0
    for s in range(0, t.num_rows, batch):
        sl = t.slice(s, batch)
        batch_t = collate_crops(sl, spec, lab, bat)
        tf = time.perf_counter()
        spec.to_float(batch_t["x"])
        t_float += time.perf_counter() - tf
        n += len(batch_t["y"])
    t2 = time.perf_counter()
    return n, t1 - t0, t2 - t1 - t_float, t_float


def _worker_init() -> None:
    """One torch thread per worker: N processes should use N cores, not N x all of them."""
    import torch

    torch.set_num_threads(1)


def _worker_warm(_: int) -> int:
    """Import what a task needs before the clock starts."""
    import pyarrow.parquet  # noqa: F401

    import raycell.formats.shards  # noqa: F401
    import raycell.formats.spec  # noqa: F401

    time.sleep(0.05)  # long enough that every worker takes one
    return os.getpid()


def _pool_run(ctx, n: int, paths: list[str], base: tuple, tasks: int) -> dict:
    t = time.perf_counter()
    with ctx.Pool(n, initializer=_worker_init) as pool:
        pids = set(pool.map(_worker_warm, range(2 * n), chunksize=1))
        start_s = time.perf_counter() - t
        work = [(paths[i % len(paths)], *base, False) for i in range(tasks)]
        t = time.perf_counter()
        out = list(pool.imap_unordered(read_decode, work, chunksize=1))
        wall = time.perf_counter() - t
    imgs = sum(o[0] for o in out)
    return {
        "images": imgs,
        "tasks": tasks,
        "wall_s": round(wall, 3),
        "images_per_s": imgs / wall,
        "per_process_images_per_s": imgs / wall / n,
        "pool_start_s": round(start_s, 2),
        "workers_warmed": len(pids),
        "read_s": round(sum(o[1] for o in out), 3),
        "collate_s": round(sum(o[2] for o in out), 3),
        "to_float_s": round(sum(o[3] for o in out), 3),
    }


def _print_data(label: str, r: dict) -> None:
    if r.get("status") != "ok":
        print(f"  {label:<32} {r.get('status')}: {r.get('error', r.get('reason', ''))}")
        return
    parts = (r["read_s"], r["collate_s"], r["to_float_s"])
    tot = sum(parts) or 1.0
    print(
        f"  {label:<32} {r['images_per_s']:>12,.0f} img/s  (read {parts[0] / tot:.0%}, "
        f"collate {parts[1] / tot:.0%}, to_float {parts[2] / tot:.0%} of the work)"
    )


def data_section(bench: Bench) -> None:
    """Write shards, then read + collate + to_float images/s in-process and with N processes."""
    a = bench.args
    sec: dict = {"batch": a.data_batch}
    bench.res["sections"]["data"] = sec
    tmp = None
    from raycell.formats.shards import open_dataset

    if a.data:
        ds = open_dataset(a.data)
        info = {
            "status": "ok",
            "path": str(ds.root),
            "cells": ds.manifest.n_cells,
            "shards": len(ds.shard_paths),
            "shape": list(ds.shape),
            "dtype": ds.dtype,
            "label_vocab": ds.manifest.label_vocab,
            "batch_vocab": ds.manifest.batch_vocab,
        }
    elif bench.out_of_time("data", 10):
        return
    else:
        tmp = Path(tempfile.mkdtemp(prefix="raycell-bench-gpu-"))
        info = bench.guarded(
            "data.write",
            write_shards,
            tmp / "crops",
            a.cells,
            a.unique_cells,
            32 if a.quick else 64,
            a.rows_per_shard,
        )
    sec["dataset"] = info
    sec["ray_imported"] = "ray" in sys.modules
    print(f"  data set: {json.dumps({k: v for k, v in info.items() if 'vocab' not in k})}")
    if info["status"] != "ok":
        return
    try:
        paths = open_dataset(info["path"]).shard_paths
        rows = math.ceil((info["cells"] or 1) / len(paths))
        base = (
            a.data_batch,
            tuple(info["shape"]),
            info["dtype"],
            tuple(info["label_vocab"]),
            tuple(info["batch_vocab"]),
        )

        def in_process() -> dict:
            # passes over all shards until `data_s` seconds have gone by (at least one)
            n = rd = co = fl = 0.0
            t = time.perf_counter()
            while True:
                for p in paths:
                    r = read_decode((p, *base, True))
                    n, rd, co, fl = n + r[0], rd + r[1], co + r[2], fl + r[3]
                if time.perf_counter() - t >= a.data_s:
                    break
            wall = time.perf_counter() - t
            return {
                "images": int(n),
                "wall_s": round(wall, 3),
                "images_per_s": n / wall,
                "read_s": round(rd, 3),
                "collate_s": round(co, 3),
                "to_float_s": round(fl, 3),
            }

        import torch

        if not bench.out_of_time("data.in_process", 2):
            sec["in_process"] = r = bench.guarded("data.in_process", in_process)
            r["torch_threads"] = torch.get_num_threads()
            _print_data(f"1 process, {torch.get_num_threads()} torch threads", r)
        rate = sec.get("in_process", {}).get("images_per_s") or 10_000.0
        sec["procs"] = []
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or Arrow threads
        for n in a.procs:
            if n > _cores():
                sec["procs"].append(
                    {"procs": n, "status": "skipped", "reason": f"only {_cores()} cores"}
                )
                continue
            if bench.out_of_time(f"data.procs={n}", 8):
                sec["procs"].append({"procs": n, "status": "skipped", "reason": "time budget"})
                continue
            # enough shard reads for about data_s seconds at the last single-process rate
            tasks = min(4000, max(2 * n, len(paths), math.ceil(a.data_s * n * rate / rows)))
            r = {
                "procs": n,
                **bench.guarded(f"data.procs={n}", _pool_run, ctx, n, paths, base, tasks),
            }
            if n == 1 and r["status"] == "ok":
                rate = r["images_per_s"]
            sec["procs"].append(r)
            _print_data(f"{n} processes, 1 thread each", r)
            bench.save()
        one = next((p for p in sec["procs"] if p["procs"] == 1 and p["status"] == "ok"), None)
        for p in sec["procs"]:
            if one and p["status"] == "ok":
                p["scaling_vs_1"] = round(p["images_per_s"] / one["images_per_s"], 2)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------- h2d


def h2d_section(bench: Bench) -> None:
    """Host -> device copies of collated batches (uint8, as raycell ships them, and float32)."""
    import torch

    a, dev = bench.args, bench.device
    rows: list = []
    bench.res["sections"]["h2d"] = rows
    cuda = dev.type == "cuda"
    for batch in a.h2d_batches:
        for dtype in ("uint8", "float32"):
            for pinned in (True, False) if cuda else (False,):
                what = f"h2d {dtype} batch {batch} {'pinned' if pinned else 'pageable'}"
                if bench.out_of_time(what, 1):
                    continue

                def run(batch=batch, dtype=dtype, pinned=pinned) -> dict:
                    src = torch.zeros(batch, CHANNELS, 64, 64, dtype=getattr(torch, dtype))
                    if pinned:
                        src = src.pin_memory()
                    # without a device, a host copy, so the section still runs on a CPU
                    step = (lambda: src.to(dev, non_blocking=pinned)) if cuda else src.clone
                    r = timed(step, dev, **_TIMING)
                    mb = src.numel() * src.element_size() / 1e6
                    return {
                        **r,
                        "images_per_s": batch / (r["step_ms"] / 1000),
                        "gb_per_s": mb / r["step_ms"],
                        "mb_per_batch": round(mb, 3),
                    }

                r = {
                    "batch": batch,
                    "dtype": dtype,
                    "pinned": pinned,
                    "copy": "host->device" if cuda else "host->host (no device)",
                    **bench.guarded(what, run),
                }
                rows.append(r)
                if r["status"] == "ok":
                    print(
                        f"  {what:<40} {r['images_per_s']:>14,.0f} img/s {r['gb_per_s']:>8.2f} GB/s"
                    )
                bench.save()


# ------------------------------------------------------------------------------------------ models


def _autocast(on: bool):
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def aec_case(dev, model_type: str, size: int, batch: int, precision: str, mode: str) -> dict:
    """A raycell AEC built and stepped as `raycell.train.loop.run_training` does it."""
    import torch

    from raycell.config import LossConfig
    from raycell.formats.spec import DataSpec
    from raycell.models import build_plan, create_model
    from raycell.models.random_effects import one_hot_design

    bf16 = precision != "fp32" and dev.type == "cuda"  # the plan's autocast is CUDA-only
    cl = precision == "bf16_cl"
    torch.manual_seed(0)
    # the loop's model_kwargs() for a 2-channel, 2-label, 8-batch data set (its module imports Ray)
    model = create_model(
        model_type,
        in_channels=CHANNELS,
        n_classes=AEC_CLASSES,
        n_batches=AEC_BATCHES,
        preset="small",
        image_size=size,
    ).to(dev)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    spec = DataSpec(("nucleus", "cytoplasm"), (CHANNELS, size, size), "uint8")
    xu8 = torch.randint(0, 256, (batch, CHANNELS, size, size), dtype=torch.uint8, device=dev)
    y = torch.randint(0, AEC_CLASSES, (batch,), device=dev)
    z = one_hot_design(torch.randint(0, AEC_BATCHES, (batch,), device=dev), AEC_BATCHES)

    def inputs():
        x = spec.to_float(xu8)  # images stay uint8 until they are on the device, as in the loop
        return x.contiguous(memory_format=torch.channels_last) if cl else x

    if mode.startswith("train"):
        plan = build_plan(model, LossConfig(), 1e-3, 0.0, n_batches=AEC_BATCHES, bf16=bf16)
        model.train()
        sync_each = mode == "train"

        def step():
            lo = plan.training_step(inputs(), y, z)
            if sync_each:
                lo.values()  # the loop sums the logged losses every step: one device -> host copy
    else:
        model.eval()

        def step():
            with torch.inference_mode(), _autocast(bf16):
                model(inputs(), z)

    n_params = sum(p.numel() for p in model.parameters())
    return {"params_m": round(n_params / 1e6, 3), "autocast": bf16, **_run(step, dev, batch)}


def timm_case(dev, name: str, size: int, batch: int, precision: str, mode: str) -> dict:
    """A timm classifier: a cross-entropy training step with AdamW, or an inference forward."""
    import timm
    import torch
    import torch.nn.functional as F

    bf16 = precision != "fp32" and dev.type == "cuda"
    cl = precision == "bf16_cl"
    torch.manual_seed(0)
    model = timm.create_model(
        name, pretrained=False, in_chans=CHANNELS, num_classes=TIMM_CLASSES
    ).to(dev)
    x = torch.randn(batch, CHANNELS, size, size, device=dev)
    if cl:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, TIMM_CLASSES, (batch,), device=dev)
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            with _autocast(bf16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.inference_mode(), _autocast(bf16):
                model(x)

    n_params = sum(p.numel() for p in model.parameters())
    return {"params_m": round(n_params / 1e6, 3), "autocast": bf16, **_run(step, dev, batch)}


def _print_model(r: dict) -> None:
    ok = r.get("status") == "ok"
    ips = f"{r['images_per_s']:>12,.0f}" if ok else f"{'-':>12}"
    ms = f"{r['step_ms']:>9.2f}" if ok else f"{'-':>9}"
    mem = f"{r['peak_mem_gib']:>7.2f}" if ok and "peak_mem_gib" in r else f"{'-':>7}"
    status = "ok" if ok else f"{r.get('status')}: {r.get('error', r.get('reason', ''))}"
    print(
        f"  {r['model']:<14}{r['size']:>5}{r['batch']:>6} {r['precision']:<9}{r['mode']:<13}"
        f"{ips}{ms}{mem}  {status}"
    )


def models_section(bench: Bench) -> None:
    """Every (model, precision, mode) in its own guarded measurement."""
    a, dev = bench.args, bench.device
    rows: list = []
    bench.res["sections"]["models"] = rows
    cases = [c for c in model_cases(a.quick) if not a.models or c["model"] in a.models]
    print(
        f"  {'model':<14}{'px':>5}{'batch':>6} {'precision':<9}{'mode':<13}{'img/s':>12}"
        f"{'ms/step':>9}{'GiB':>7}  status"
    )
    for c in cases:
        for prec in a.precisions:
            modes = ["train", "infer"]
            if c["kind"] == "aec" and prec == "bf16_cl":
                modes.insert(1, "train_nosync")  # raycell's CUDA default: what the sync costs
            for mode in modes:
                what = f"{c['model']}@{c['size']}px b{c['batch']} {prec} {mode}"
                row = {**c, "precision": prec, "mode": mode}
                if bench.out_of_time(what, 2):
                    rows.append({**row, "status": "skipped", "reason": "time budget"})
                    continue
                fn = aec_case if c["kind"] == "aec" else timm_case
                row.update(
                    bench.guarded(what, fn, dev, c["model"], c["size"], c["batch"], prec, mode)
                )
                rows.append(row)
                _print_model(row)
                bench.save()


# ----------------------------------------------------------------------------------------- compile


def _compile_batch(quick: bool) -> int:
    return next(c["batch"] for c in model_cases(quick) if c["model"] == "resnet50")


def compile_section(bench: Bench) -> None:
    """torch.compile of resnet50 bf16 + channels_last in a child process, killed at the limit."""
    a = bench.args
    sec: dict = {
        "model": "resnet50",
        "size": a.compile_size,
        "batch": _compile_batch(a.quick),
        "precision": "bf16_cl",
    }
    bench.res["sections"]["compile"] = sec
    if a.no_compile:
        sec.update(status="skipped", reason="--no-compile")
        print("  skipped (--no-compile)")
        return
    limit = min(a.compile_timeout_s, bench.left() - 5)
    if limit < min(20.0, a.compile_timeout_s):
        sec.update(status="skipped", reason=f"time budget: {max(limit + 5, 0):.0f} s left")
        bench.res["skipped"].append(f"compile: skipped, {sec['reason']}")
        print(f"  SKIP compile: {sec['reason']}")
        return
    child_dir = Path(tempfile.mkdtemp(prefix="raycell-bench-compile-"))
    child_out = child_dir / "compile.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_compile-child",
        "--out",
        str(child_out),
        "--device",
        str(bench.device),
        "--compile-size",
        str(a.compile_size),
        "--steps",
        str(a.steps),
        "--windows",
        str(a.windows),
        "--warmup",
        str(a.warmup),
        "--window-s",
        str(a.window_s),
    ]
    cmd += ["--quick"] if a.quick else []
    cmd += [] if a.cudnn_benchmark else ["--no-cudnn-benchmark"]
    print(f"  child process, limit {limit:.0f} s")
    t = time.monotonic()
    # a session of its own, so that a timeout also kills inductor's compile workers
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
        sec["status"] = "ok" if rc == 0 else f"error: exit status {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        sec["status"] = "timeout"
        sec["reason"] = f"not done within {limit:.0f} s (--compile-timeout-s or budget); killed"
        print(f"  TIMEOUT after {limit:.0f} s: killed")
    sec["wall_s"] = round(time.monotonic() - t, 1)
    if child_out.is_file():
        sec.update(json.loads(child_out.read_text()))
    shutil.rmtree(child_dir, ignore_errors=True)
    for mode in ("train", "infer"):
        r = sec.get(mode)
        if isinstance(r, dict) and r.get("status") == "ok":
            print(
                f"  compiled {mode:<6} compile {r['compile_s']:.1f} s, "
                f"{r['images_per_s']:>12,.0f} img/s"
            )
        elif r is not None:
            print(f"  compiled {mode:<6} {r.get('status')}: {r.get('error', '')}")


def compile_child(args: argparse.Namespace) -> None:
    """In the child: time the first call (the compile), then measure; JSON after each part."""
    import timm
    import torch
    import torch.nn.functional as F

    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    out: dict = {}
    path = Path(args.out)
    batch, size = _compile_batch(args.quick), args.compile_size
    bf16 = dev.type == "cuda"
    torch.manual_seed(0)
    model = (
        timm.create_model("resnet50", pretrained=False, in_chans=CHANNELS, num_classes=TIMM_CLASSES)
        .to(dev)
        .to(memory_format=torch.channels_last)
    )
    x = torch.randn(batch, CHANNELS, size, size, device=dev)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, TIMM_CLASSES, (batch,), device=dev)
    cmodel = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step():
        with _autocast(bf16):
            loss = F.cross_entropy(cmodel(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer_step():
        with torch.inference_mode(), _autocast(bf16):
            cmodel(x)

    for mode, step in (("train", train_step), ("infer", infer_step)):
        model.train(mode == "train")
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            _sync(dev)
            t = time.perf_counter()
            step()  # compiles (inference compiles again: eval mode, no autograd)
            _sync(dev)
            out[mode] = {"status": "compiled", "compile_s": round(time.perf_counter() - t, 2)}
            path.write_text(json.dumps(out, indent=2))
            out[mode].update(status="ok", **_run(step, dev, batch))
            if dev.type == "cuda":
                out[mode]["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
        except Exception as exc:  # noqa: BLE001 - record it and try the other mode
            out[mode] = {
                **out.get(mode, {}),
                "status": "error",
                "error": f"{type(exc).__name__}: {exc}"[:500],
                "traceback": traceback.format_exc()[-3000:],
            }
        path.write_text(json.dumps(out, indent=2))
        shown = {k: v for k, v in out[mode].items() if k != "traceback"}
        print(f"  [compile child] {mode}: {json.dumps(shown)}", flush=True)


# ----------------------------------------------------------------------------------------- summary


def summary(bench: Bench) -> None:
    """Per model measurement: how many single-threaded data processes keep up with it."""
    secs = bench.res["sections"]
    procs = [p for p in secs.get("data", {}).get("procs", []) if p.get("status") == "ok"]
    one = next((p for p in procs if p["procs"] == 1), None)
    best = max(procs, key=lambda p: p["images_per_s"], default=None)
    h2d = [
        r["images_per_s"]
        for r in secs.get("h2d", [])
        if r.get("status") == "ok" and r["dtype"] == "uint8"
    ]
    h2d_best = max(h2d, default=None)
    rows = []
    for r in secs.get("models", []):
        if r.get("status") != "ok":
            continue
        row = {k: r[k] for k in ("model", "size", "batch", "precision", "mode", "images_per_s")}
        if one:
            row["data_procs_needed"] = round(r["images_per_s"] / one["per_process_images_per_s"], 2)
        if best:
            row["fed_by_best_procs"] = best["images_per_s"] >= r["images_per_s"]
        rows.append(row)
    bench.res["summary"] = {
        "data_images_per_s_1proc": one and one["images_per_s"],
        "data_images_per_s_best": best
        and {"procs": best["procs"], "images_per_s": best["images_per_s"]},
        "h2d_uint8_images_per_s_best": h2d_best,
        "models": rows,
        "note": "data_procs_needed = model images/s / images/s of one single-threaded "
        "read + collate + to_float process on page-cached shards; more than the cores "
        "means the host cannot feed the GPU this way",
    }
    print(f"\n== summary (elapsed {bench.elapsed():.1f} s)")
    if one and best:
        h2d_text = "-" if h2d_best is None else f"{h2d_best:,.0f}"
        print(
            f"  data path: 1 process {one['images_per_s']:,.0f} img/s, best {best['procs']} "
            f"processes {best['images_per_s']:,.0f} img/s; h2d uint8 best {h2d_text} img/s"
        )
    print(f"  {'model step':<44}{'img/s':>12}{'data procs':>12}")
    for r in rows:
        name = f"{r['model']}@{r['size']} b{r['batch']} {r['precision']} {r['mode']}"
        need = f"{r['data_procs_needed']:>12.1f}" if "data_procs_needed" in r else f"{'-':>12}"
        print(f"  {name:<44}{r['images_per_s']:>12,.0f}{need}")
    for key, what in (("skipped", "skipped for time"), ("errors", "error(s)")):
        if bench.res[key]:
            print(f"  {len(bench.res[key])} {what}:")
            for e in bench.res[key]:
                print(f"    {e}")


# -------------------------------------------------------------------------------------------- main


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


# argument: (normal default, --quick default), for those left unset on the command line
_DEFAULTS = {
    "steps": (10, 2),
    "warmup": (5, 1),
    "windows": (3, 1),
    "window_s": (0.5, 0.0),
    "cells": (20000, 512),
    "unique_cells": (4000, 256),
    "rows_per_shard": (1000, 128),
    "data_s": (2.0, 0.0),
    "h2d_batches": ([256, 4096], [4]),
    "compile_size": (64, 32),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Arguments; --quick changes the defaults of those left unset."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = ap.add_argument
    add("--out", default=str(DEFAULT_OUT), help="JSON results file (default %(default)s)")
    add("--device", default="auto", help="cuda, cuda:N, cpu or auto (cuda when there is one)")
    add(
        "--budget-s",
        type=float,
        default=360.0,
        help="time budget: whatever is left when it is spent is skipped (default 360)",
    )
    add(
        "--quick",
        action="store_true",
        help="smoke run: 32 px, batches / 128, 1 thread, 1 window of --steps steps, small data",
    )
    add(
        "--sections",
        type=_names,
        default=list(SECTIONS),
        help="comma list of data,h2d,models,compile (default all; env always runs)",
    )
    add(
        "--models",
        type=_names,
        default=[],
        help="only these models (comma list of conventional,mixedeffects,resnet50,resnet18)",
    )
    add(
        "--precisions",
        type=_names,
        default=list(PRECISIONS),
        help="comma list of fp32,bf16,bf16_cl (default all)",
    )
    add("--steps", type=int, help="minimum steps per timed window (10; quick 2)")
    add("--warmup", type=int, help="warm-up steps, the first one included (5; quick 1)")
    add("--windows", type=int, help="timed windows; the median is reported (3; quick 1)")
    add("--window-s", type=float, help="target seconds per window (0.5; quick 0: --steps steps)")
    add(
        "--no-cudnn-benchmark",
        dest="cudnn_benchmark",
        action="store_false",
        help="leave torch.backends.cudnn.benchmark off, as raycell's loop does",
    )
    add("--cells", type=int, help="rows in the synthetic shards (20000; quick 512)")
    add(
        "--unique-cells",
        type=int,
        help="distinct generated cells, repeated up to --cells (4000; quick 256)",
    )
    add("--rows-per-shard", type=int, help="rows per shard (1000, as synth; quick 128)")
    add("--data", default="", help="measure this crop-shard data set instead of writing one")
    add("--data-batch", type=int, default=256, help="collate batch size (default 256)")
    add("--data-s", type=float, help="target seconds per data measurement (2; quick 0)")
    add(
        "--procs",
        type=_ints,
        default=[1, 4, 8, 16],
        help="process counts for the data path (default 1,4,8,16; more than the cores: skipped)",
    )
    add("--h2d-batches", type=_ints, help="batch sizes of the copies (256,4096; quick 4)")
    add("--no-compile", action="store_true", help="skip the torch.compile section")
    add(
        "--compile-timeout-s",
        type=float,
        default=180.0,
        help="kill the compile child after this long (default 180; the budget bounds it too)",
    )
    add("--compile-size", type=int, help="crop size of the compiled resnet50 (64; quick 32)")
    add("--_compile-child", dest="compile_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k, (normal, quick) in _DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else normal)
    for opt, got, valid in (
        ("--precisions", args.precisions, PRECISIONS),
        ("--sections", args.sections, SECTIONS),
    ):
        bad = [v for v in got if v not in valid]
        if bad:
            ap.error(f"{opt}: unknown {bad}; valid: {','.join(valid)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the sections within the budget; exit status 0 even if measurements failed (see JSON)."""
    argv = sys.argv[1:] if argv is None else argv
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # rows show as they finish, through a pipe too
    args = parse_args(argv)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("bench_gpu: --device cuda, but torch sees no GPU (torch.cuda.is_available())")
            return 2
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    elif args.quick:
        torch.set_num_threads(1)  # a shared, busy CPU: spinning OpenMP threads only slow it down
    _TIMING.update(
        warmup=args.warmup, windows=args.windows, min_steps=args.steps, window_s=args.window_s
    )
    if args.compile_child:
        compile_child(args)
        return 0
    bench = Bench(args, argv, device)
    _TIMING["deadline"] = bench.deadline  # a slow step cannot run the budget over by much
    print(f"bench_gpu: device {device}, budget {args.budget_s:g} s, out {bench.out}")
    bench.section("env", env_section)
    fns = {
        "data": data_section,
        "h2d": h2d_section,
        "models": models_section,
        "compile": compile_section,
    }
    for name in SECTIONS:
        if name in args.sections:
            bench.section(name, fns[name])
    bench.res["ray_imported"] = "ray" in sys.modules
    summary(bench)
    bench.save()
    print(f"\nwrote {bench.out} ({bench.elapsed():.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
