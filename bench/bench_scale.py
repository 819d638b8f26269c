"""Scale on one machine: every stage at growing sizes, wall time, cells/s and peak memory of its process tree.

    python bench/bench_scale.py --quick              # 100 k and 300 k cells (32 px), ingest at 50
    / 150 fields
    python bench/bench_scale.py                      # 100 k, 300 k and 1 M cells
    python bench/bench_scale.py --sizes 1000000 --stages synth   # one stage, one size

Each stage runs as the command a user types (`python -m raycell <verb>`), in its own process, so its numbers
include starting Ray; a sampler reads the proportional set size (PSS, from /proc/<pid>/smaps_rollup) of that
process and all its descendants (Ray's GCS, raylet, workers, actors) every 0.25 s for a stage's first 20 s,
then every 2 s (`--interval`; the sampler's own CPU seconds are in the JSON). PSS splits pages shared
between processes (the object store, libraries) fairly, so the sum is the tree's real footprint, unlike a
sum of RSS. Stages, per size N (crops 32 px, the `tiny` AEC preset):

* `synth`: `raycell synth` of N cells;
* `split`: `raycell split` (rewrites the split column of every shard);
* `train`: `raycell train`, one epoch (the epoch's own seconds from history.jsonl are reported too);
* `infer`: `raycell infer` over all cells;
* `embed`: `raycell embed` over all cells (profiling layout + well profiles);
* `ingest`: `raycell ingest` of `synth --raw` fields (512 x 512, 2 channels); its sizes are fields of view
  (`--fields`), since ingest costs ~0.1-0.5 s of CPU per field.

Growth from one size to the next: `time ratio / size ratio` (1.00 = linear) and the marginal cells/s
(extra cells / extra seconds); peak memory growth in percent. Goals: time within 10% of the marginal
rate, peak memory within 20% from the smallest to the largest size. Prints a table and writes
bench/results/<date>_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["synth", "split", "train", "infer", "embed", "ingest"]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _role(pid: int) -> str:
    """What a process is, for the breakdown: Ray's process title (`ray::ReadParquet->Filter`,
    `raylet`, ...).
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            arg0 = f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "?"
    if arg0.startswith("ray::"):
        return arg0.split(" ")[0].split(".")[0][:40]  # ray::RayTrainWorker, ray::MapBatches(...)
    name = Path(arg0.split(" ")[0]).name
    return "driver" if name.startswith("python") else name[:40]


def tree_pss(root: int) -> dict:
    """PSS (MB) of `root` and all its descendants: total, split into anonymous memory (heaps), shared memory
    (Ray's object store is /dev/shm, so its pages are Pss_Shmem) and file pages, and per process role.
    """
    kids, todo = _children(), [root]
    out = {"total": 0.0, "anon": 0.0, "shmem": 0.0, "file": 0.0, "roles": {}}
    keys = {"Pss:": "total", "Pss_Anon:": "anon", "Pss_Shmem:": "shmem", "Pss_File:": "file"}
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        got = {}
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    k = line.split(":", 1)[0] + ":"
                    if k in keys:
                        got[keys[k]] = int(line.split()[1]) / 1024
        except OSError:
            continue
        for k, v in got.items():
            out[k] += v
        role = _role(pid)
        out["roles"][role] = out["roles"].get(role, 0.0) + got.get("total", 0.0)
    return out


SAMPLE_S = 2.0  # seconds between memory samples after a stage's first FAST_FOR_S (--interval)
FAST_S, FAST_FOR_S = 0.25, 20.0  # short stages (split: a few seconds) are sampled every 0.25 s


def run_stage(cmd: list[str], log: Path) -> dict:
    """Run one CLI command, sampling its process tree's PSS; returns seconds and peak MB.

    The sampler's own CPU time is reported (`sampler_cpu_s`): reading smaps_rollup makes the kernel walk
    every mapping of every Ray process (the object store's included), which on 2 cores is not free. At
    4 Hz throughout, a 100 k-cell training command took 201 s (epoch 89.7 s, sampler 37 CPU s) against
    102 s (epoch 71.7 s, 5 CPU s) at one sample per 2 s, with the same peak (3,565 vs 3,555 MB): so 4 Hz
    only for a stage's first 20 s, then every `--interval` seconds (training's peaks are plateaus).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        peak, cpu = [{"total": 0.0}], [0.0]

        def sample():
            c0, t_start = time.thread_time(), time.perf_counter()
            while proc.poll() is None:
                now = tree_pss(proc.pid)
                if now["total"] > peak[0]["total"]:
                    peak[0] = now
                cpu[0] = time.thread_time() - c0
                time.sleep(FAST_S if time.perf_counter() - t_start < FAST_FOR_S else SAMPLE_S)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        th.join()
    secs = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"stage failed ({rc}): {' '.join(cmd)}\n" + "\n".join(tail))
    p = peak[0]
    at_peak = {k: round(p.get(k, 0.0), 1) for k in ("anon", "shmem", "file")}
    at_peak["roles"] = {
        r: round(v, 1)
        for r, v in sorted(p.get("roles", {}).items(), key=lambda kv: -kv[1])
        if v >= 20
    }
    return {
        "seconds": round(secs, 2),
        "peak_mb": round(p["total"], 1),
        "at_peak_mb": at_peak,
        "sample_interval_s": SAMPLE_S,
        "sampler_cpu_s": round(cpu[0], 2),
        "command": " ".join(cmd[2:]),
    }


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _rc(*args: str) -> list[str]:
    return [sys.executable, "-m", "raycell", *args]


def _newest_run(runs: Path) -> Path:
    """The latest run folder (<runs>/<name>-<type>-<time>): a reused --work may hold older ones."""
    return max(p for p in runs.iterdir() if p.is_dir())


def cell_stages(
    n: int,
    work: Path,
    stages: list[str],
    logs: Path,
    workers: int,
    materialize: str = "auto",
    train_sets: list[str] | None = None,
) -> dict:
    """Synth -> split -> train (1 epoch) -> infer -> embed at n cells; returns a row per stage."""
    d, runs = work / f"d{n}", work / f"runs{n}"
    common = ["--set", f"data.path={d}"]
    rows: dict[str, dict] = {}
    if "synth" in stages or not (d / "dataset.json").is_file():
        shutil.rmtree(d, ignore_errors=True)
        r = run_stage(
            _rc(
                "synth",
                "--set",
                f"synth.out={d}",
                "--set",
                f"synth.n_cells={n}",
                "--set",
                "synth.crop_size=32",
                "--set",
                f"synth.num_workers={workers}",
            ),
            logs / f"synth{n}.log",
        )
        r["disk_bytes_per_cell"] = round(_du(d) / n, 1)
        rows["synth"] = r
    if any(s in stages for s in ("split", "train", "infer", "embed")):
        rows["split"] = run_stage(_rc("split", *common), logs / f"split{n}.log")
    if any(s in stages for s in ("train", "infer", "embed")):
        r = run_stage(
            _rc(
                "train",
                *common,
                "--set",
                "model.preset=tiny",
                "--set",
                "train.epochs=1",
                "--set",
                f"train.runs_dir={runs}",
                "--set",
                f"data.materialize={materialize}",
                *[a for kv in train_sets or [] for a in ("--set", kv)],
            ),
            logs / f"train{n}.log",
        )
        run = _newest_run(runs)  # <runs>/<name>-<type>-<time>
        hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines() if x]
        r["epoch_s"] = hist[-1].get("epoch_time_s")
        r["cells"] = json.loads((d / "dataset.json").read_text())["counts_per_split"].get("train")
        rows["train"] = r
    if "infer" in stages:
        rows["infer"] = run_stage(
            _rc(
                "infer",
                *common,
                "--checkpoint",
                str(_newest_run(runs)),
                "--set",
                f"infer.out={work / f'pred{n}'}",
            ),
            logs / f"infer{n}.log",
        )
        rows["infer"]["disk_bytes_per_cell"] = round(_du(work / f"pred{n}") / n, 1)
    if "embed" in stages:
        rows["embed"] = run_stage(
            _rc(
                "embed",
                *common,
                "--checkpoint",
                str(_newest_run(runs)),
                "--set",
                f"embed.out={work / f'emb{n}'}",
            ),
            logs / f"embed{n}.log",
        )
        rows["embed"]["disk_bytes_per_cell"] = round(_du(work / f"emb{n}") / n, 1)
    for r in rows.values():
        r.setdefault("cells", n)
        r["cells_per_s"] = round(r["cells"] / r["seconds"], 1)
    return rows


def ingest_stage(fields: int, work: Path, logs: Path) -> dict:
    """`synth --raw` of `fields` 512 x 512 fields (not timed), then `raycell ingest` of them (timed)."""
    raw, out = work / f"raw{fields}", work / f"ing{fields}"
    wells = max(1, fields // 8)  # 2 batches x wells x 4 fields
    shutil.rmtree(raw, ignore_errors=True)
    subprocess.run(
        _rc(
            "synth",
            "--raw",
            "--set",
            f"synth.out={raw}",
            "--set",
            "synth.n_batches=2",
            "--set",
            "synth.n_unseen=1",
            "--set",
            f"synth.raw_wells={wells}",
            "--set",
            "synth.raw_fields=4",
            "--set",
            "synth.raw_fov_size=512",
            "--set",
            "synth.raw_cells_per_fov=60",
        ),
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from raycell.data.synthetic_raw import DEFAULT_PATTERN

    r = run_stage(
        _rc(
            "ingest",
            "--set",
            f"ingest.input={raw / 'images'}",
            "--set",
            f"ingest.pattern={DEFAULT_PATTERN}",
            "--set",
            f"ingest.platemap={raw / 'platemap.csv'}",
            "--set",
            f"ingest.out={out}",
            "--set",
            "ingest.channels=[nucleus, cytoplasm]",
            "--set",
            "ingest.crop_size=32",
        ),
        logs / f"ingest{fields}.log",
    )
    summ = json.loads((out / "ingest_summary.json").read_text())
    r.update(
        fields=summ["n_fovs_in"],
        cells=summ["n_cells"],
        fields_per_s=round(summ["n_fovs_in"] / r["seconds"], 2),
        cells_per_s=round(summ["n_cells"] / r["seconds"], 1),
        disk_bytes_per_cell=round(_du(out) / max(1, summ["n_cells"]), 1),
    )
    return r


def growth(rows: list[dict], key: str = "cells") -> list[dict]:
    """Per consecutive pair of sizes: time ratio over size ratio, marginal rate, memory growth."""
    out = []
    for a, b in zip(rows, rows[1:]):
        size_r = b[key] / a[key]
        out.append(
            {
                "from": a[key],
                "to": b[key],
                "time_per_size": round(b["seconds"] / a["seconds"] / size_r, 3),
                "marginal_per_s": round(
                    (b[key] - a[key]) / max(1e-9, b["seconds"] - a["seconds"]), 1
                ),
                "peak_growth_pct": round(100 * (b["peak_mb"] / a["peak_mb"] - 1), 1),
            }
        )
    return out


def main(argv=None):
    global SAMPLE_S
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="100 k and 300 k cells; ingest at 50 and 150 fields"
    )
    ap.add_argument(
        "--sizes", default="", help="comma-separated cell counts (default 100000,300000,1000000)"
    )
    ap.add_argument(
        "--fields", default="", help="comma-separated ingest sizes in fields (default 50,150,500)"
    )
    ap.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)}")
    ap.add_argument("--workers", type=int, default=2, help="synth.num_workers")
    ap.add_argument(
        "--materialize",
        default="auto",
        choices=["auto", "always", "never"],
        help="data.materialize of the training stage (never: stream every epoch)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for the training stage (repeatable), e.g. data.stream_buffer_mb=256",
    )
    ap.add_argument(
        "--interval",
        type=float,
        default=SAMPLE_S,
        help="seconds between memory samples after a stage's first 20 s (sampled every 0.25 s); "
        "default 2: on 2 cores a 0.25 s sampler made a training command 2x slower",
    )
    ap.add_argument("--tag", default="", help="suffix of the JSON's name")
    ap.add_argument(
        "--work", default="", help="scratch folder (default: a new temp folder, deleted after)"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    SAMPLE_S = args.interval
    sizes = [
        int(x)
        for x in (args.sizes or ("100000,300000" if args.quick else "100000,300000,1000000")).split(
            ","
        )
    ]
    fields = [
        int(x) for x in (args.fields or ("48,144" if args.quick else "48,144,480")).split(",")
    ]
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"--stages: unknown {bad}; stages are {STAGES}")
    work = Path(args.work or tempfile.mkdtemp(prefix="raycell-scale-")).absolute()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    res: dict[str, list[dict]] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"{time.strftime('%Y%m%d')}_scale{'_' + args.tag if args.tag else ''}.json"

    def save():
        report = {
            stage: {
                "rows": rows,
                "growth": growth(rows, "fields" if stage == "ingest" else "cells"),
            }
            for stage, rows in res.items()
        }
        f.write_text(
            json.dumps(
                {
                    "bench": "scale",
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                    "cpu_count": os.cpu_count(),
                    "load_average_start": load0,
                    "load_average_end": os.getloadavg(),
                    "sizes": sizes,
                    "fields": fields,
                    "materialize": args.materialize,
                    "train_overrides": args.set,
                    "results": report,
                    "command": "python bench/bench_scale.py " + " ".join(argv or sys.argv[1:]),
                },
                indent=2,
            )
        )
        return report

    for n in sizes if set(stages) - {"ingest"} else []:
        for stage, row in cell_stages(
            n, work, stages, logs, args.workers, args.materialize, args.set
        ).items():
            if stage in stages:
                res.setdefault(stage, []).append(row)
                save()
                print(
                    f"{stage:<7}{n:>9} cells  {row['seconds']:>8.1f} s  {row['cells_per_s']:>9.0f} cells/s  "
                    f"peak {row['peak_mb']:>7.0f} MB (object store / shm {row['at_peak_mb']['shmem']:.0f}, "
                    f"heaps {row['at_peak_mb']['anon']:.0f}; sampler {row['sampler_cpu_s']:.0f} CPU s)",
                    flush=True,
                )
        for d in work.glob(f"*{n}"):  # free the disk before the next size
            if d.is_dir() and d.name != "logs" and not args.work:
                shutil.rmtree(d, ignore_errors=True)
    if "ingest" in stages:
        for nf in fields:
            row = ingest_stage(nf, work, logs)
            res.setdefault("ingest", []).append(row)
            save()
            print(
                f"ingest {row['fields']:>6} fields ({row['cells']} cells) {row['seconds']:>8.1f} s  "
                f"{row['fields_per_s']:.2f} fields/s  peak {row['peak_mb']:.0f} MB",
                flush=True,
            )
    print(
        f"\n{'stage':<8}{'size':>9}{'s':>9}{'cells/s':>10}{'peak MB':>9}{'B/cell':>9}   growth (time/size, "
        "marginal/s, peak %)"
    )
    report = save()
    for stage, item in report.items():
        key = "fields" if stage == "ingest" else "cells"
        rows, g = item["rows"], item["growth"]
        for i, r in enumerate(rows):
            gr = g[i - 1] if i else None
            gs = (
                f"   {gr['time_per_size']:.2f}  {gr['marginal_per_s']:.0f}  {gr['peak_growth_pct']:+.0f}%"
                if gr
                else ""
            )
            print(
                f"{stage:<8}{r[key]:>9}{r['seconds']:>9.1f}{r['cells_per_s']:>10.0f}{r['peak_mb']:>9.0f}"
                f"{r.get('disk_bytes_per_cell', 0):>9.0f}{gs}"
            )
    print(f"wrote {f}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
