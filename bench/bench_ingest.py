"""Ingest throughput: seconds per field of view per core, 1 vs 2 Ray workers, vs a plain loop.

    python bench/bench_ingest.py       # synthetic 512x512 2-channel raw FOVs (+ AS_09047 if
    ../shared/data is there)
    python bench/bench_ingest.py --quick            # 8 FOVs, 1 repeat, synthetic only: a few
    minutes on 2 cores
    python bench/bench_ingest.py --fovs 64 --size 512 --repeats 3

What is timed, for each data set:

* `plain loop`: `process_fov` over every FOV in one process, no Ray (the per-core ceiling: reading,
  projection, segmentation, crops, features; the statistics and scale passes run before, untimed; no
  shard writing);
* `ray, N workers`: the whole `ingest_fields` (planning, statistics pass, crop pass, shard writing)
  with at most N concurrent tasks on a local Ray with 4 logical CPUs. A warm-up run first starts the
  workers.

FOVs/s per core = FOVs/s / N (N = 1 for the plain loop); seconds per field per core = N x seconds /
FOVs (the goal: <= 0.25 s for a 512x512 two-channel field); scaling = FOVs/s(2) / FOVs/s(1).
FOV/cpu-s divides by the CPU time of the per-FOV work instead (measured inside the tasks; the
statistics pass is not included), which other processes on the machine do not change. Each row is
the median of `--repeats` runs. The load average is recorded, because on a shared 2-core machine
other processes change the wall-clock numbers. Prints a table and writes
bench/results/<date>_ingest.json (or `--out`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import machine, out_path, print_table, write_result  # noqa: E402

SHARED = Path(os.environ.get("RAYCELL_SHARED_DATA", REPO / ".." / "shared" / "data")).resolve()


def _synthetic(tmp: Path, fovs: int, size: int) -> tuple[str, str | None, list[str]]:
    from raycell.data.synthetic_raw import DEFAULT_PATTERN, write_synthetic_raw

    wells = max(1, fovs // 4)
    cells = max(8, int(24 * (size / 256) ** 2))
    write_synthetic_raw(
        tmp / "raw",
        effects="basic",  # the speed numbers stay comparable with earlier runs
        seed=0,
        n_batches=2,
        n_lines=4,
        wells=wells,
        fields=2,
        fov_size=size,
        cells_per_fov=cells,
    )
    sets = [
        f"ingest.input={tmp / 'raw' / 'images'}",
        f"ingest.platemap={tmp / 'raw' / 'platemap.csv'}",
        f"ingest.pattern={DEFAULT_PATTERN}",
        "ingest.channels=[nucleus, cytoplasm]",
        "ingest.nucleus_channel=nucleus",
        "ingest.cytoplasm_channel=cytoplasm",
        "ingest.z_projection=best-focus",
        "ingest.illum_correction=true",
    ]
    return f"synthetic {size}x{size}, 2 ch x 3 z", None, sets


def _as_09047() -> tuple[str, str | None, list[str]] | None:
    src = SHARED / "cellprofiler_examples" / "ExampleIlluminationCorrection_AS_09047"
    if not src.is_dir():
        return None
    return (
        "AS_09047 512x512, 1 ch (real)",
        str(REPO / "configs/ingest/cellprofiler_illum_AS_09047.yaml"),
        [f"ingest.input={src}"],
    )


def _plain_loop(cfg) -> tuple[float, float, int]:
    from raycell.ingest.driver import plate_diameters
    from raycell.ingest.fov import process_fov
    from raycell.ingest.params import IngestParams
    from raycell.ingest.plan import plan_ingest
    from raycell.ingest.stats import compute_stats

    p = IngestParams.from_config(cfg.ingest)
    plan = plan_ingest(p)
    # not timed: the statistics and scale passes (Ray passes in ingest_fields), so that each field is
    # segmented as the crop pass segments it (with its plate's diameter)
    stats = compute_stats(plan["fovs"], p, plan["channels"])
    stats["diameter_ref"] = plate_diameters(plan["fovs"], p, plan["channels"], stats)
    from threadpoolctl import threadpool_limits

    # one BLAS/OpenMP thread, as Ray gives a num_cpus=1 task (OMP_NUM_THREADS=1): fair per core
    with threadpool_limits(1):
        t, c = time.perf_counter(), time.process_time()
        n_cells = sum(process_fov(f, p, plan["channels"], stats)["n_cells"] for f in plan["fovs"])
        return time.perf_counter() - t, time.process_time() - c, n_cells


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--fovs", type=int, default=0, help="synthetic fields of view (0 = 32; --quick: 8)"
    )
    ap.add_argument("--size", type=int, default=512, help="synthetic field size (px)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="timed runs per row, median reported (0 = 3; --quick: 1)",
    )
    ap.add_argument("--quick", action="store_true", help="fewer FOVs, one repeat, no real data set")
    ap.add_argument(
        "--out", help="JSON file, or folder for <date>_ingest.json (default bench/results)"
    )
    args = ap.parse_args(argv)
    args.fovs = args.fovs or (8 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 3)

    import ray

    from raycell.config import load_config
    from raycell.ingest.driver import ingest_fields

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault(
        "RAY_AUTH_MODE", "disabled"
    )  # a private local Ray (as init_ray does): no token warning
    tmp = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    rows = []
    mach = machine()
    load_before = os.getloadavg()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    import ray.data  # noqa: F401 - configures its loggers; then keep its per-execution INFO lines off the table

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        data_sets = [_synthetic(tmp, args.fovs, args.size), None if args.quick else _as_09047()]
        for name, cfg_path, sets in filter(None, data_sets):
            overrides = sets + [
                f"ingest.out={tmp / 'out'}",
                "ingest.overwrite=true",
                "ray.progress=false",
            ]
            cfg = load_config(cfg_path, overrides)
            secs, cpu, n_cells = zip(*[_plain_loop(cfg) for _ in range(args.repeats)])
            n_fovs = ingest_fields(cfg)["n_fovs_in"]  # also the warm-up for the Ray rows
            rows.append(
                {
                    "data": name,
                    "mode": "plain loop",
                    "workers": 1,
                    "n_fovs": n_fovs,
                    "n_cells": n_cells[0],
                    "seconds": float(np.median(secs)),
                    "cpu_seconds": float(np.median(cpu)),
                }
            )
            for w in (1, 2):
                cfg = load_config(cfg_path, overrides + [f"ingest.num_workers={w}"])
                runs = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    s = ingest_fields(cfg)
                    runs.append((time.perf_counter() - t, s))
                secs = float(np.median([r[0] for r in runs]))
                rows.append(
                    {
                        "data": name,
                        "mode": "ray ingest_fields",
                        "workers": w,
                        "n_fovs": n_fovs,
                        "n_cells": runs[0][1]["n_cells"],
                        "seconds": secs,
                        "stats_pass_s": float(
                            np.median([r[1].get("seconds", {}).get("stats", np.nan) for r in runs])
                        ),
                        "cpu_seconds": float(
                            np.median(
                                [
                                    r[1].get("seconds", {}).get("crop_task_cpu_total", np.nan)
                                    for r in runs
                                ]
                            )
                        ),
                    }
                )
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r["fovs_per_s"] = r["n_fovs"] / r["seconds"]
        r["fovs_per_s_per_core"] = r["fovs_per_s"] / r["workers"]
        r["s_per_fov_per_core"] = r["workers"] * r["seconds"] / r["n_fovs"]
        # load-independent: FOVs per CPU-second of the per-FOV work (crop tasks, no stats pass)
        r["fovs_per_cpu_s"] = r["n_fovs"] / r["cpu_seconds"] if r["cpu_seconds"] else float("nan")
    for name in dict.fromkeys(r["data"] for r in rows):
        ray_rows = {
            r["workers"]: r for r in rows if r["data"] == name and r["mode"] != "plain loop"
        }
        if 1 in ray_rows and 2 in ray_rows:
            ray_rows[2]["scaling_vs_1"] = ray_rows[2]["fovs_per_s"] / ray_rows[1]["fovs_per_s"]
    result = {
        "bench": "ingest",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": mach,
        "quick": args.quick,
        "field": f"{args.size}x{args.size}, 2 channels x 3 z (synthetic)",
        "cores": os.cpu_count(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "repeats": args.repeats,
        "rows": rows,
    }
    result["table"] = print_table(
        f"ingest, {os.cpu_count()} cores, load average {load_before[0]:.2f} before / "
        f"{result['load_avg_after'][0]:.2f} after",
        ["data / mode", "workers", "FOVs", "cells", "s", "FOV/s", "s/FOV/core", "x1", "FOV/cpu-s"],
        [
            [
                f"{r['data']} / {r['mode']}",
                r["workers"],
                r["n_fovs"],
                r["n_cells"],
                r["seconds"],
                r["fovs_per_s"],
                r["s_per_fov_per_core"],
                r.get("scaling_vs_1"),
                r["fovs_per_cpu_s"],
            ]
            for r in rows
        ],
    )
    write_result(out_path(args.out, "ingest"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
