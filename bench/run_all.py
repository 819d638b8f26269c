"""Run the benchmarks in sequence and print the speed goals table (measured, met or missed).

Each benchmark runs in its own process (one Ray at a time, nothing left over between them) and writes its
JSON to `--results` (bench/results/run_all/<name>.json); then bench/results/summary.json holds the date,
the machine (cores, RAM, load average at the start), every benchmark's exit status and command, and the
goals table. A benchmark that fails leaves its goals "not measured"; the others still run.

    python bench/run_all.py --quick                 # a check that everything runs (numbers are rough)
    python bench/run_all.py                         # the full runs, on a quiet machine
    python bench/run_all.py --only dataloader --quick
    python bench/run_all.py --no-run                # the table from the JSONs already in --results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, machine, print_table, write_result  # noqa: E402
from bench.goals import goals_table  # noqa: E402

BENCHES = {  # name -> script (each takes --quick and --out FILE.json)
    "dataloader": "bench/bench_dataloader.py",
    "train_infer": "bench/bench_train_infer.py",
    "ingest": "bench/bench_ingest.py",
}


def run_bench(name: str, out: Path, quick: bool, timeout_s: float) -> dict:
    """Run one benchmark script; {'rc', 'seconds', 'command', 'json'} (rc None: timed out)."""
    cmd = [sys.executable, BENCHES[name], *(["--quick"] if quick else []), "--out", str(out)]
    shown = " ".join(["python", BENCHES[name], *(["--quick"] if quick else [])])
    print(f"\n[run_all] {shown}", flush=True)
    t0 = time.perf_counter()
    out.unlink(missing_ok=True)  # a stale JSON must not pass for this run's
    try:
        rc = subprocess.run(cmd, cwd=REPO, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        rc = None
    return {
        "rc": rc,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": shown,
        "json": str(out),
    }


def load_results(folder: Path, names: list[str]) -> dict:
    """{name: JSON} for every benchmark whose JSON is in `folder` (unreadable ones are left out)."""
    out = {}
    for n in names:
        f = folder / f"{n}.json"
        try:
            out[n] = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
    return out


def render(goals: list[dict], mach: dict) -> str:
    """Print the goals table (figure, goal, measured, met?, command) under the date and machine."""
    head = (
        f"speed goals, {mach.get('date')}, {mach.get('cores')} cores, {mach.get('ram_gib')} GiB RAM, "
        f"load average {mach.get('load_average')} at start"
    )
    return print_table(
        head,
        ["figure", "goal", "measured", "met?", "command"],
        [[g["figure"], g["goal"], g["measured"], g["status"], g["command"] or "-"] for g in goals],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHES)}")
    ap.add_argument(
        "--results", default=str(RESULTS / "run_all"), help="folder for each benchmark's JSON"
    )
    ap.add_argument("--summary", default=str(RESULTS / "summary.json"), help="the summary JSON")
    ap.add_argument("--timeout-s", type=float, default=3600, help="per benchmark")
    ap.add_argument(
        "--no-run", action="store_true", help="only build the table from the JSONs in --results"
    )
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"--only: unknown benchmark {unknown[0]!r} (known: {', '.join(BENCHES)})")
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    mach = machine()
    runs = {}
    if not args.no_run:
        for n in names:
            runs[n] = run_bench(n, folder / f"{n}.json", args.quick, args.timeout_s)
            rc = runs[n]["rc"]
            if rc != 0:
                why = "timed out" if rc is None else f"exited with status {rc}"
                print(f"[run_all] {n} {why}; its goals stay unmeasured", flush=True)
    results = load_results(folder, names)
    for n, r in runs.items():  # the command a reader re-runs is the short one, not the --out path
        if n in results:
            results[n]["command"] = r["command"]
    goals = goals_table(results)
    table = render(goals, mach)
    write_result(
        Path(args.summary),
        {
            "bench": "summary",
            "machine": mach,
            "quick": args.quick,
            "load_average_end": list(os.getloadavg()),
            "runs": runs,
            "goals": goals,
            "table": table,
        },
    )
    return 0 if all(r["rc"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
