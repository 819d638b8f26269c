"""Ingest throughput: fields of view per second (and per core), 1 vs 2 Ray workers, vs a plain loop.

    python bench/bench_ingest.py       # synthetic raw FOVs (+ AS_09047 if ../shared/data is there)
    python bench/bench_ingest.py --fovs 64 --size 512 --repeats 3

What is timed, for each data set:

* `plain loop`: `process_fov` over every FOV in one process, no Ray (the per-core ceiling: reading,
  projection, segmentation, crops, features; no statistics pass, no shard writing);
* `ray, N workers`: the whole `run_ingest` (planning, statistics pass, crop pass, shard writing)
  with at most N concurrent tasks on a local Ray with 4 logical CPUs. A warm-up run first starts the
  workers.

FOVs/s per core = FOVs/s / N (N = 1 for the plain loop); scaling = FOVs/s(2) / FOVs/s(1).
FOV/cpu-s divides by the CPU time of the per-FOV work instead (measured inside the tasks; the
statistics pass is not included), which other processes on the machine do not change. Each row is
the median of `--repeats` runs. The load average is recorded, because on a shared 2-core machine
other processes change the wall-clock numbers. Prints a table and writes
bench/results/<date>_ingest.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
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
    from raycell.ingest.fov import process_fov
    from raycell.ingest.plan import plan_ingest
    from raycell.ingest.stats import compute_stats

    p = dataclasses.asdict(cfg.ingest)
    plan = plan_ingest(p)
    stats = compute_stats(
        plan["fovs"], p, plan["channels"]
    )  # not timed: a Ray pass, as in run_ingest
    from threadpoolctl import threadpool_limits

    # one BLAS/OpenMP thread, as Ray gives a num_cpus=1 task (OMP_NUM_THREADS=1): fair per core
    with threadpool_limits(1):
        t, c = time.perf_counter(), time.process_time()
        n_cells = sum(process_fov(f, p, plan["channels"], stats)["n_cells"] for f in plan["fovs"])
        return time.perf_counter() - t, time.process_time() - c, n_cells


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fovs", type=int, default=32, help="synthetic fields of view")
    ap.add_argument("--size", type=int, default=256, help="synthetic field size (px)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the JSON")
    args = ap.parse_args(argv)

    import ray

    from raycell.config import load_config
    from raycell.ingest.driver import run_ingest

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    rows = []
    load_before = os.getloadavg()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        data_sets = [_synthetic(tmp, args.fovs, args.size), _as_09047()]
        for name, cfg_path, sets in filter(None, data_sets):
            overrides = sets + [
                f"ingest.out={tmp / 'out'}",
                "ingest.overwrite=true",
                "ray.progress=false",
            ]
            cfg = load_config(cfg_path, overrides)
            secs, cpu, n_cells = zip(*[_plain_loop(cfg) for _ in range(args.repeats)])
            n_fovs = run_ingest(cfg)["n_fovs_in"]  # also the warm-up for the Ray rows
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
                    s = run_ingest(cfg)
                    runs.append((time.perf_counter() - t, s))
                secs = float(np.median([r[0] for r in runs]))
                rows.append(
                    {
                        "data": name,
                        "mode": "ray run_ingest",
                        "workers": w,
                        "n_fovs": n_fovs,
                        "n_cells": runs[0][1]["n_cells"],
                        "seconds": secs,
                        "stats_pass_s": float(np.median([r[1]["seconds"]["stats"] for r in runs])),
                        "cpu_seconds": float(
                            np.median([r[1]["seconds"]["crop_task_cpu_total"] for r in runs])
                        ),
                    }
                )
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r["fovs_per_s"] = r["n_fovs"] / r["seconds"]
        r["fovs_per_s_per_core"] = r["fovs_per_s"] / r["workers"]
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
        "cores": os.cpu_count(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "repeats": args.repeats,
        "rows": rows,
    }
    head = (
        f"{'data':32} {'mode':15} {'wk':>3} {'FOVs':>5} {'cells':>6} {'s':>7} {'FOV/s':>7} "
        f"{'/core':>7} {'x1':>5} {'FOV/cpu-s':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['data']:32} {r['mode']:15} {r['workers']:>3} {r['n_fovs']:>5} {r['n_cells']:>6} "
            f"{r['seconds']:>7.2f} {r['fovs_per_s']:>7.2f} {r['fovs_per_s_per_core']:>7.2f} "
            f"{r.get('scaling_vs_1', float('nan')):>5.2f} {r['fovs_per_cpu_s']:>9.2f}"
        )
    print(
        f"load average before/after: {load_before} / {result['load_avg_after']} "
        f"on {os.cpu_count()} cores"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y-%m-%d')}_ingest.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
