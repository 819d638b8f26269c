"""The GPU path end to end: `raycell train` (Ray Train + Ray Data, 1 GPU) and `raycell embed`.

One command on a machine with one GPU; under 8 minutes with the defaults. It starts one Ray instance
(`--num-cpus` logical CPUs, 1 GPU, no dashboard) and runs every `raycell` command as a subprocess
joined to it (`--address`), so each command pays no Ray start. Steps:

1. `raycell synth` + `raycell split` of three synthetic data sets: 64, 256 and 128 px.
2. FLOPs per training image of each model, from `torch.utils.flop_counter.FlopCounterMode` over one
   `training_step` of the model's plan (every forward and backward of the step, the adversary's and
   auxiliary networks' included), built as the training loop builds it, on the CPU at the run's
   crop size.
3. `raycell train` runs (`scaling.use_gpu=true`, 1 worker), each bf16 + channels-last and fp32:
   (a) conventional AEC, `small` preset, 64 px; (b) conventional AEC, `armed` preset, 256 px;
   (c) timm ResNet-50 (random init, no download), 128 px; (d) the mixed-effects AEC (small, 64 px)
   with bf16 on and off (channels-last as configured). Each run has many epochs and a wall-clock
   limit: once it is spent and at least `MIN_EPOCHS` epochs are in the run's `history.jsonl`, the
   command is stopped (its process group), so an unexpectedly slow model cannot eat the budget.
4. `raycell embed` of the ResNet-50 checkpoint over the 128 px data set (`infer.num_gpus=1`).

Per run (from `history.jsonl`, epochs after the first, which pays cuDNN autotuning and Ray Data's
start): training images/s, the GPU's idle time on data (`data_wait_s / train_time_s`), MFU, peak GPU
memory (`gpu_peak_mem_gib`, reported by the loop on CUDA) and, when `nvidia-smi` exists, its sampled
utilisation and memory. Every field of the JSON: bench/results/notes/2026-12-07_gpu_e2e_prepared.md.

    bash bench/gpu_e2e.sh                                        # on the GPU machine (sets up Ray)
    PYTHONPATH=. python bench/gpu_e2e.py --out bench/results/gpu_e2e.json
    PYTHONPATH=. python bench/gpu_e2e.py --dry-run               # CPU, tiny sizes, 1 epoch: a check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/gpu_e2e.py` works without PYTHONPATH=. too
    sys.path.insert(0, str(REPO))

MIN_EPOCHS = 3  # epoch 0 is warm-up; the figures come from the epochs after it
EMBED_RESERVE_S = 45.0  # kept back from --budget-s for the embed at the end

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets: H100 and H200
# "Tensor Core GPU" data sheets (bf16 1,979 / 1,671 / 1,513 TFLOPS *with sparsity* for SXM / NVL /
# PCIe: halved here), A100 data sheet (312 dense), L40S (362.05 dense), L4 (121 dense), A10 (125
# dense).
# Matched against torch.cuda.get_device_name(), first match wins (the NVL and PCIe names before the
# bare one, which is the SXM part).
PEAK_BF16_DENSE = (
    ("H200 NVL", 835e12),
    ("H200", 989.5e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.5e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)
PEAK_SOURCE = (
    "NVIDIA data sheets, dense bf16 tensor-core peak (half the 'with sparsity' figure): "
    "H100/H200 SXM 989.5 TFLOP/s, NVL 835, H100 PCIe 756; A100 312; L40S 362; L4 121; A10 125"
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU by its name (None when it is not in the table)."""
    for key, peak in PEAK_BF16_DENSE:
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(
    flops_per_image: float | None, images_per_s: float | None, peak: float | None
) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s over the GPU's peak; None without all three."""
    if not flops_per_image or not images_per_s or not peak:
        return None
    return flops_per_image * images_per_s / peak


@dataclass
class Case:
    """One `raycell train` run: what it trains on, with which settings, for how long."""

    name: str
    data: str  # key of the data set (DATASETS)
    model_type: str
    preset: str
    batch_size: int
    bf16: bool
    channels_last: bool
    limit_s: float  # wall-clock limit of the run (stopped after it once MIN_EPOCHS epochs are done)
    args: dict = field(default_factory=dict)  # model.args
    group: str = ""  # the precision comparison it belongs to


def plan_cases(dry: bool, main_s: float, compare_s: float) -> list[Case]:
    """The training runs, the judged ones first (the ResNet-50 bf16 run's checkpoint is embedded).

    The bf16 + channels-last runs of the small AEC and ResNet-50 come first (the goal: the GPU idle
    on data <= 10% of step time), then the ARMED preset, the fp32 runs, the mixed-effects pair; a
    `--budget-s` that runs out skips the last ones. A dry run trains each model once (bf16 + CL;
    on a CPU that is fp32) and the mixed-effects pair, which checks the comparison.
    """
    small, armed, r50 = ("d32", "d32", "d32") if dry else ("d64", "d256", "d128")
    b = (lambda n: 16) if dry else (lambda n: n)  # noqa: E731
    models = (
        ("aec_small_64", small, "conventional", "small", b(256), {}),
        ("resnet50_128", r50, "timm", "small", b(256), {"backbone": "resnet50", "weights": ""}),
        ("aec_armed_256", armed, "conventional", "armed", b(64), {}),
    )
    cases = [
        Case(f"{g}_bf16_cl", data, mt, preset, bs, True, True, main_s, args, g)
        for g, data, mt, preset, bs, args in models
    ]
    if not dry:
        cases += [
            Case(f"{g}_fp32", data, mt, preset, bs, False, False, compare_s, args, g)
            for g, data, mt, preset, bs, args in models
        ]
    for bf16 in (True, False):
        name = f"mixedeffects_64_{'bf16' if bf16 else 'fp32'}_cl"
        cases.append(
            Case(
                name,
                small,
                "mixedeffects",
                "small",
                b(256),
                bf16,
                True,
                compare_s,
                {},
                "mixedeffects_64",
            )
        )
    return cases


# data set key -> (crop size, cells, rows per shard); sized for training epochs of a few seconds at
# the H200's Ray-free rates (bench/results/notes/2026-11-30_gpu_h200.md), and shards of 8-65 MB
DATASETS = {"d64": (64, 120_000, 2000), "d128": (128, 30_000, 1000), "d256": (256, 10_000, 500)}
DRY_DATASETS = {"d32": (32, 480, 120)}


# ------------------------------------------------------------------------------------------ parsing


def epoch_figures(history: list[dict], batch_size: int) -> dict:
    """Training images/s and idle-on-data share of the epochs after the first (all when only one).

    `train_time_s` is the wall time of an epoch's training steps (batches awaited included);
    `data_wait_s` the part spent waiting for the next batch, during which the GPU has no work (the
    loop syncs every step). Images/s counts `steps * batch_size` (the loop drops partial batches).
    """
    recs = [r for r in history if r.get("train_time_s")]
    used = recs[1:] if len(recs) > 1 else recs
    if not used:
        return {"epochs_used": 0}
    steps = sum(int(r["steps"]) for r in used)
    t = sum(float(r["train_time_s"]) for r in used)
    wait = sum(float(r.get("data_wait_s", 0.0)) for r in used)
    ips = steps * batch_size / t if t > 0 else None
    compute = t - wait
    peak = [
        r["gpu_peak_mem_gib"] for r in recs if isinstance(r.get("gpu_peak_mem_gib"), (int, float))
    ]
    return {
        "epochs_used": len(used),
        "epochs_done": len(recs),
        "steps": steps,
        "train_time_s": round(t, 3),
        "data_wait_s": round(wait, 3),
        "images_per_s": ips,
        "images_per_s_compute": steps * batch_size / compute if compute > 0 else None,
        "idle_on_data": wait / t if t > 0 else None,
        "epoch_time_s": [round(float(r.get("epoch_time_s", 0.0)), 3) for r in recs],
        "gpu_peak_mem_gib": max(peak) if peak else None,
    }


def smi_summary(path: Path) -> dict | None:
    """Mean / max GPU utilisation (%) and max memory used (MiB) of an `nvidia-smi` sampling file."""
    if not path.is_file():
        return None
    util, mem = [], []
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and all(p.replace(".", "", 1).isdigit() for p in parts):
            util.append(float(parts[0]))
            mem.append(float(parts[1]))
    if not util:
        return None
    return {
        "samples": len(util),
        "util_mean_pct": round(sum(util) / len(util), 1),
        "util_max_pct": max(util),
        "mem_used_max_mib": max(mem),
    }


# ------------------------------------------------------------------------------------------ running


class Smi:
    """`nvidia-smi` sampling GPU utilisation and memory every 250 ms into a file (none: nothing)."""

    def __init__(self, path: Path):
        """Samples go to `path`."""
        self.path, self.proc = path, None

    def __enter__(self) -> "Smi":
        """Start sampling."""
        import shutil

        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "250",
                    "-i",
                    "0",
                ],
                stdout=self.path.open("w"),
                stderr=subprocess.DEVNULL,
            )
        return self

    def __exit__(self, *exc) -> None:
        """Stop sampling."""
        if self.proc:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)


def raycell(
    args: list[str],
    log: Path,
    limit_s: float | None = None,
    run_glob: tuple[Path, str] | None = None,
) -> dict:
    """Run `python -m raycell ...` in its own process group; stop it past `limit_s` (enough epochs).

    With `run_glob` = (runs folder, pattern) the run folder is found as it appears and its
    `history.jsonl` watched; the command is stopped (SIGINT, then SIGKILL) once `limit_s` is spent,
    `MIN_EPOCHS` epochs are recorded and the last epoch's checkpoint has had time to be persisted
    (a stopped ResNet-50 run's latest checkpoint is embedded), or at 3 x `limit_s` regardless.
    """
    cmd = [sys.executable, "-m", "raycell", *args]
    t0 = time.monotonic()
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        stopped = False
        while proc.poll() is None:
            time.sleep(0.5)
            if limit_s is None:
                continue
            el = time.monotonic() - t0
            n, settled = 0, True
            if run_glob is not None:
                runs = sorted(run_glob[0].glob(run_glob[1]))
                if runs:
                    from raycell.train.history import read_history

                    hist_file = runs[-1] / "history.jsonl"
                    hist = read_history(hist_file)
                    n = len(hist)
                    if hist:  # the epoch's checkpoint is persisted just after its history line
                        epoch_s = min(float(r.get("epoch_time_s", 0.0)) for r in hist)
                        age = time.time() - hist_file.stat().st_mtime
                        settled = age > min(3.0, 0.5 * epoch_s)
            if (el > limit_s and n >= MIN_EPOCHS and settled) or el > 3 * limit_s:
                stopped = True
                # the driver only: the Train worker and Ray Data's tasks belong to the shared Ray,
                # which ends a dead driver's actors and tasks (and frees the GPU) itself
                for sig, wait in ((signal.SIGINT, 5), (signal.SIGKILL, 5)):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
                    try:
                        proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
    return {
        "rc": proc.returncode,
        "wall_s": round(time.monotonic() - t0, 2),
        "stopped_at_limit": stopped,
        "log": str(log),
    }


def make_data(
    work: Path, key: str, size: int, cells: int, rows: int, address: str, cpus: int
) -> dict:
    """`raycell synth` + `raycell split` of a data set (reused when it exists); a chunk per CPU."""
    out = work / key
    if (out / "dataset.json").is_file():
        return {"path": str(out), "reused": True}
    t = time.monotonic()
    common = ["--address", address, "--set", "ray.progress=false"]
    chunk = max(1, -(-cells // (cpus * rows))) * rows  # whole shards, about one chunk per CPU
    r1 = raycell(
        [
            "synth",
            "--out",
            str(out),
            *common,
            "--set",
            f"synth.n_cells={cells}",
            "--set",
            f"synth.crop_size={size}",
            "--set",
            f"synth.num_workers={cpus}",
            "--set",
            f"synth.rows_per_shard={rows}",
            "--set",
            f"synth.chunk_cells={chunk}",
        ],
        work / f"synth_{key}.log",
    )
    r2 = raycell(["split", "--data", str(out), *common], work / f"split_{key}.log")
    if r1["rc"] or r2["rc"]:
        raise RuntimeError(f"synth/split of {key} failed: see {r1['log']} and {r2['log']}")
    return {
        "path": str(out),
        "crop_size": size,
        "cells": cells,
        "seconds": round(time.monotonic() - t, 1),
    }


def count_flops(case: Case, data_path: str) -> dict:
    """FLOPs of one training step of the case's model per image (CPU, batch 4, the run's size)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from raycell.config import ExperimentConfig
    from raycell.models import build_plan, create_model
    from raycell.models.random_effects import one_hot_design
    from raycell.train.loop import model_kwargs
    from raycell.train.trainer import training_setup

    cfg = ExperimentConfig()
    cfg.data.path, cfg.model.type, cfg.model.preset = data_path, case.model_type, case.preset
    cfg.model.args = dict(case.args)
    setup, _ = training_setup(cfg)
    spec, labels, batches = setup.data_spec, setup.labels, setup.batches
    torch.manual_seed(0)
    kwargs = model_kwargs(cfg, spec, labels, batches, setup.heads, setup.channel_means)
    model = create_model(case.model_type, **kwargs)
    plan = build_plan(model, cfg.loss, 1e-4, n_batches=len(batches))
    n = 4
    x = torch.rand(n, *spec.shape)
    if setup.heads:
        y = torch.zeros(n, len(setup.heads), dtype=torch.long)
    else:
        y = torch.randint(0, len(labels), (n,))
    z = one_hot_design(torch.arange(n) % len(batches), len(batches))
    model.train()
    with FlopCounterMode(display=False) as fc:
        plan.training_step(x, y, z)
    total = fc.get_total_flops()
    return {"flops_per_image": total / n, "counted_batch": n, "image_shape": list(spec.shape)}


def train_case(
    case: Case, data: dict, work: Path, address: str, dry: bool, cpus_per_worker: int, epochs: int
) -> dict:
    """One `raycell train` run; its figures from the run's history.jsonl."""
    from raycell.train.history import read_history

    runs = work / "runs" / case.name
    res = "{CPU: %d}" % cpus_per_worker if dry else "{CPU: %d, GPU: 1}" % cpus_per_worker
    sets = {
        "name": case.name,
        "model.type": case.model_type,
        "model.preset": case.preset,
        "data.batch_size": case.batch_size,
        "train.bf16": str(case.bf16).lower(),
        "train.channels_last": str(case.channels_last).lower(),
        "train.epochs": epochs,
        "train.runs_dir": str(runs),
        "scaling.use_gpu": str(not dry).lower(),
        "scaling.resources_per_worker": res,
        "ray.progress": "false",
        "train.checkpoints_to_keep": 1,
    }
    if case.args:
        sets["model.args"] = json.dumps(case.args)
    if dry:  # the armed preset is ~3 GFLOP per 32-px image: a few steps show the path works
        sets["train.max_steps_per_epoch"] = 3
    args = ["train", "--data", data["path"], "--address", address]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    with Smi(work / f"smi_{case.name}.csv"):
        cmd = raycell(
            args,
            work / f"train_{case.name}.log",
            limit_s=None if dry and epochs == 1 else case.limit_s,
            run_glob=(runs, f"{case.name}-*"),
        )
    run_dirs = sorted(runs.glob(f"{case.name}-*"))
    out = {"case": asdict(case), **cmd}
    if not run_dirs:
        out["error"] = f"no run folder (see {cmd['log']})"
        return out
    run = run_dirs[-1]
    hist = read_history(run / "history.jsonl")
    out["run_dir"] = str(run)
    out.update(epoch_figures(hist, case.batch_size))
    out["nvidia_smi"] = smi_summary(work / f"smi_{case.name}.csv")
    with contextlib.suppress(OSError, ValueError):
        import yaml

        rc = yaml.safe_load((run / "config.yaml").read_text())
        out["settings"] = {
            "data": rc["data"],
            "scaling": rc["scaling"],
            "train": {
                k: rc["train"][k]
                for k in ("bf16", "channels_last", "torch_threads", "augment", "lr", "epochs")
            },
        }
    if cmd["rc"] and not cmd["stopped_at_limit"] and not hist:
        out["error"] = f"raycell train exited {cmd['rc']} (see {cmd['log']})"
    return out


def embed_case(run_dir: str, data: dict, work: Path, address: str, dry: bool) -> dict:
    """`raycell embed` of a checkpoint over a data set: cells per second of the whole command."""
    import shutil

    import pyarrow.parquet as pq

    out_dir = work / "embed"
    shutil.rmtree(out_dir, ignore_errors=True)  # this bench's own folder: a fresh export every time
    args = [
        "embed",
        "--checkpoint",
        run_dir,
        "--data",
        data["path"],
        "--address",
        address,
        "--set",
        f"embed.out={out_dir}",
        "--set",
        "embed.well_profiles=false",
        "--set",
        "ray.progress=false",
        "--set",
        f"infer.num_gpus={0 if dry else 1}",
        "--set",
        "infer.cpus_per_actor=2",
    ]
    with Smi(work / "smi_embed.csv"):
        cmd = raycell(args, work / "embed.log")
    cells = sum(
        pq.ParquetFile(p).metadata.num_rows for p in sorted((out_dir / "shards").glob("*.parquet"))
    )
    out = {
        **cmd,
        "cells": cells,
        "images_per_s": cells / cmd["wall_s"] if cells and not cmd["rc"] else None,
        "nvidia_smi": smi_summary(work / "smi_embed.csv"),
        "note": "whole command: Ray Data start, actor start and checkpoint load included",
    }
    if cmd["rc"]:
        out["error"] = f"raycell embed exited {cmd['rc']} (see {cmd['log']})"
    return out


# ------------------------------------------------------------------------------------------ summary


def summarise(res: dict) -> list[dict]:
    """Per precision group: bf16 + channels-last vs fp32 speed-up, and the mixed-effects verdict."""
    by = {r["case"]["name"]: r for r in res["runs"]}
    rows = []
    for group in dict.fromkeys(r["case"]["group"] for r in res["runs"]):
        members = [r for r in res["runs"] if r["case"]["group"] == group]
        fast = next((r for r in members if r["case"]["bf16"]), None)
        slow = next((r for r in members if not r["case"]["bf16"]), None)
        a = fast and fast.get("images_per_s")
        b = slow and slow.get("images_per_s")
        row = {
            "group": group,
            "bf16_images_per_s": a,
            "fp32_images_per_s": b,
            "speedup_bf16": a / b if a and b else None,
        }
        if group == "mixedeffects_64":
            if res.get("dry_run"):
                row["verdict"] = "dry run on a CPU (bf16 autocast is CUDA-only): no verdict"
            elif row["speedup_bf16"] is None:
                row["verdict"] = (
                    "not measured: the mixed-effects GPU bf16 default is to be decided from "
                    "the numbers"
                )
            elif row["speedup_bf16"] < 1.0:
                row["verdict"] = (
                    "bf16 does not profit: make train.bf16 off the mixed-effects model's GPU "
                    "default (a per-model-type rule)"
                )
            else:
                row["verdict"] = "bf16 profits: keep train.bf16 on for the mixed-effects model"
        rows.append(row)
    del by
    return rows


def _cell(v, fmt: str, width: int) -> str:
    """A right-aligned table cell; '-' for a figure that was not measured."""
    return f"{'-' if v is None else fmt.format(v):>{width}}"


def print_table(res: dict) -> None:
    """The short table on stdout."""
    peak = res["env"].get("peak_bf16_flops")
    print(
        f"\n== gpu_e2e on {res['env'].get('gpu', 'CPU (dry run)')}, peak bf16 dense "
        f"{'-' if peak is None else f'{peak / 1e12:.1f}'} TFLOP/s, "
        f"Ray CPUs {res['ray']['num_cpus']}"
    )
    hdr = f"{'run':<30}{'img/s':>10}{'idle':>7}{'MFU':>8}{'GiB':>7}{'epochs':>7}  status"
    print(hdr + "\n" + "-" * len(hdr))
    for r in res["runs"]:
        ips, idle, m, mem = (
            r.get(k) for k in ("images_per_s", "idle_on_data", "mfu", "gpu_peak_mem_gib")
        )
        print(
            f"{r['case']['name']:<30}{_cell(ips, '{:,.0f}', 10)}{_cell(idle, '{:.1%}', 7)}"
            f"{_cell(m, '{:.2%}', 8)}{_cell(mem, '{:.2f}', 7)}{r.get('epochs_used', 0):>7}  "
            f"{r.get('error', 'ok')}"
        )
    e = res.get("embed") or {}
    if e:
        print(
            f"{'embed resnet50_128':<30}{e.get('images_per_s') or 0:>10,.0f}  "
            f"({e.get('cells')} cells in "
            f"{e.get('wall_s')} s, whole command)"
        )
    for row in res.get("summary", []):
        sp = row["speedup_bf16"]
        print(
            f"  {row['group']}: bf16 vs fp32 {'-' if sp is None else f'{sp:.2f}x'}"
            + (f"  -> {row['verdict']}" if "verdict" in row else "")
        )


def save(res: dict, path: Path) -> None:
    """Write the JSON atomically (a run killed part-way keeps what it measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Arguments."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", default=str(REPO / "bench" / "results" / "gpu_e2e.json"), help="JSON results"
    )
    ap.add_argument(
        "--work", default="", help="data and runs folder (default /tmp/raycell_gpu_e2e)"
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, 32 px, 480 cells, 1 epoch per run, no limits: checks the script runs",
    )
    ap.add_argument(
        "--num-cpus",
        type=int,
        default=0,
        help="logical CPUs of the Ray instance (default 2 x cores, raycell's local default)",
    )
    ap.add_argument(
        "--cpus-per-worker",
        type=int,
        default=4,
        help="CPUs held by the Train worker (the rest is for Ray Data; default 4)",
    )
    ap.add_argument(
        "--main-s", type=float, default=40.0, help="wall limit of each bf16 + CL run (40)"
    )
    ap.add_argument(
        "--compare-s", type=float, default=25.0, help="wall limit of the other runs (25)"
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="skip the runs that would end past this many seconds (45 s kept for the embed; 450)",
    )
    ap.add_argument(
        "--dry-epochs",
        type=int,
        default=1,
        help="epochs of each dry run; more than 1 applies the wall limits, as on a GPU (1)",
    )
    ap.add_argument("--only", default="", help="comma list of run names to run (default all)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run everything; exit 0 even when a run failed (its error is in the JSON)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_e2e: torch sees no GPU; use --dry-run for the CPU check")
        return 2
    work = Path(args.work or ("/tmp/raycell_gpu_e2e" + ("_dry" if dry else ""))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    cores = os.cpu_count() or 1
    num_cpus = args.num_cpus or max(4, 2 * cores)
    t0 = time.monotonic()
    env = {"cores": cores, "torch": torch.__version__, "python": sys.version.split()[0]}
    if not dry:
        name = torch.cuda.get_device_name(0)
        env.update(
            gpu=name,
            gpu_mem_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            peak_bf16_flops=peak_bf16_flops(name),
            peak_source=PEAK_SOURCE,
        )
    res: dict = {
        "bench": "gpu_e2e",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "dry_run": dry,
        "command": "python bench/gpu_e2e.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "env": env,
        "min_epochs": MIN_EPOCHS,
        "data": {},
        "flops": {},
        "runs": [],
        "skipped": [],
        "errors": [],
    }
    os.environ.setdefault(
        "RAY_AUTH_MODE", "disabled"
    )  # a private instance (as raycell's own local Ray)
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=0 if dry else 1,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    address = ray.get_runtime_context().gcs_address
    env["ray"] = ray.__version__
    res["ray"] = {
        "num_cpus": num_cpus,
        "num_gpus": 0 if dry else 1,
        "address": address,
        "train_worker_cpus": args.cpus_per_worker,
        "note": "one Ray instance for every command; Ray Data's tasks use the CPUs the Train "
        "worker does not hold",
    }
    print(
        f"gpu_e2e: {env.get('gpu', 'CPU dry run')}, Ray {address} with {num_cpus} CPUs, work {work}"
    )
    try:
        sets = DRY_DATASETS if dry else DATASETS
        for key, (size, cells, rows) in sets.items():
            try:
                res["data"][key] = make_data(work, key, size, cells, rows, address, max(1, cores))
                print(f"  data {key}: {res['data'][key]}")
            except Exception as exc:  # noqa: BLE001 - a failed data set loses its runs, not the others
                res["errors"].append(f"data {key}: {exc}")
        save(res, out)
        cases = plan_cases(dry, args.main_s, args.compare_s)
        if args.only:
            keep = set(args.only.split(","))
            cases = [c for c in cases if c.name in keep]
        for c in cases:
            key = f"{c.group}"
            if key in res["flops"] or c.data not in res["data"]:
                continue
            try:
                res["flops"][key] = count_flops(c, res["data"][c.data]["path"])
            except Exception as exc:  # noqa: BLE001
                res["errors"].append(f"flops {key}: {type(exc).__name__}: {exc}")
        save(res, out)
        r50 = None
        for c in cases:
            if c.data not in res["data"]:
                continue
            left = args.budget_s - (time.monotonic() - t0) - EMBED_RESERVE_S
            if not dry and left < c.limit_s + 10:
                res["skipped"].append(f"{c.name}: {left:.0f} s of --budget-s left")
                print(f"  SKIP {c.name}: budget spent", flush=True)
                continue
            print(f"  train {c.name} (limit {c.limit_s:g} s) ...", flush=True)
            r = train_case(
                c,
                res["data"][c.data],
                work,
                address,
                dry,
                args.cpus_per_worker,
                epochs=args.dry_epochs if dry else 200,
            )
            fl = res["flops"].get(c.group, {}).get("flops_per_image")
            r["flops_per_image"] = fl
            r["mfu"] = mfu(fl, r.get("images_per_s"), env.get("peak_bf16_flops"))
            if "error" in r:
                res["errors"].append(f"{c.name}: {r['error']}")
            elif c.name == "resnet50_128_bf16_cl":
                r50 = r["run_dir"]
            res["runs"].append(r)
            save(res, out)
            print(
                f"    {r.get('images_per_s') or 0:,.0f} img/s, "
                f"idle {100 * (r.get('idle_on_data') or 0):.1f}%, "
                f"{r.get('epochs_used', 0)} epochs, {r['wall_s']} s",
                flush=True,
            )
        if r50:
            try:
                res["embed"] = embed_case(
                    r50, res["data"][cases[-1].data if dry else "d128"], work, address, dry
                )
            except Exception as exc:  # noqa: BLE001
                res["errors"].append(f"embed: {type(exc).__name__}: {exc}")
            if "error" in res.get("embed", {}):
                res["errors"].append(f"embed: {res['embed']['error']}")
        res["summary"] = summarise(res)
    finally:
        res["elapsed_s"] = round(time.monotonic() - t0, 1)
        save(res, out)
        ray.shutdown()
    print_table(res)
    for e in res["skipped"]:
        print(f"  SKIPPED {e}")
    for e in res["errors"]:
        print(f"  ERROR {e}")
    print(f"\nwrote {out} ({res['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
