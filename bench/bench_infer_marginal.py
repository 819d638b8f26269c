"""Inference at two sizes: fixed cost and marginal rate of `raycell infer` vs a plain `inference_mode()` loop.

    python bench/bench_infer_marginal.py                 # 2,000 and 12,000 cells, small AEC, 64 px
    python bench/bench_infer_marginal.py --threads 1 --sizes 1000,6000

Fits t(N) = fixed + N / rate to each path's wall time at two sizes, so the comparison separates what a
Ray job pays once (Ray Data's plan, the actor's start and checkpoint load, the round's output files)
from its throughput once running, which is what matters at scale. Both paths use the same torch threads
(`--threads`, `infer.torch_threads`); the model is the small conventional AEC trained for one epoch
in-process (its accuracy is irrelevant here). Prints a table and writes
bench/results/<date>_infer_marginal.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="2000,12000", help="two cell counts")
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both paths"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    n1, n2 = (int(x) for x in args.sizes.split(","))

    import torch

    from raycell.config import load_config
    from raycell.data.dataset import CropCollate
    from raycell.data.splits import split_dataset
    from raycell.data.synthetic import write_synthetic
    from raycell.formats.shards import open_dataset
    from raycell.infer.batch import predict
    from raycell.infer.predictor import CropPredictor
    from raycell.train.context import LocalContext
    from raycell.train.loop import run_training
    from raycell.train.trainer import training_setup
    from raycell.utils.ray_utils import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="raycell-bench-im-"))
    load0 = os.getloadavg()
    torch.set_num_threads(args.threads)
    write_synthetic(
        str(tmp / "train"), n_cells=2000, crop_size=64, rows_per_shard=500, progress=False
    )
    split_dataset(str(tmp / "train"))
    cfg = load_config(
        None,
        [
            f"data.path={tmp / 'train'}",
            "train.epochs=1",
            f"train.runs_dir={tmp / 'runs'}",
            "ray.progress=false",
        ],
    )
    setup, ds = training_setup(cfg)
    col = CropCollate(setup.data_spec, setup.labels, setup.batches)
    run_training(
        LocalContext(ds, col, cfg.data.batch_size, cfg.data.eval_batch_size, tmp / "run"),
        cfg,
        setup,
    )
    ck = str(next((tmp / "run").glob("checkpoint_*")))
    for n in (n1, n2):
        write_synthetic(
            str(tmp / f"n{n}"), n_cells=n, crop_size=64, rows_per_shard=1000, seed=1, progress=False
        )
    t: dict[str, dict[int, float]] = {"plain": {}, "raycell": {}}
    for n in (n1, n2):
        d = open_dataset(tmp / f"n{n}")
        pred = CropPredictor(ck)
        t0 = time.perf_counter()
        for p in d.shard_paths:
            tab = d.read_shard(p)
            for s in range(0, tab.num_rows, cfg.data.eval_batch_size):
                pred(tab.slice(s, cfg.data.eval_batch_size))
        t["plain"][n] = time.perf_counter() - t0
    init_ray(progress=False)
    for n in (n1, n2):
        c = load_config(
            None,
            [
                f"data.path={tmp / f'n{n}'}",
                f"infer.checkpoint={ck}",
                f"infer.out={tmp / 'pred'}",
                "ray.progress=false",
                f"infer.torch_threads={args.threads}",
            ],
        )
        shutil.rmtree(tmp / "pred", ignore_errors=True)
        t0 = time.perf_counter()
        predict(c)
        t["raycell"][n] = time.perf_counter() - t0
    rows = {}
    for k, v in t.items():
        rate = (n2 - n1) / (v[n2] - v[n1])
        rows[k] = {
            "seconds": v,
            "marginal_cells_per_s": rate,
            "fixed_s": v[n1] - n1 / rate,
            "end_to_end_cells_per_s": n2 / v[n2],
        }
    marg = rows["raycell"]["marginal_cells_per_s"] / rows["plain"]["marginal_cells_per_s"]
    e2e = rows["raycell"]["end_to_end_cells_per_s"] / rows["plain"]["end_to_end_cells_per_s"]
    print(
        f"\ninference, small AEC @ 64 px, {args.threads} thread(s), {os.cpu_count()} cores, "
        f"load {load0[0]:.2f}"
    )
    print(
        f"{'path':<10}{'t(' + str(n1) + ') s':>12}{'t(' + str(n2) + ') s':>13}"
        f"{'marginal/s':>12}{'fixed s':>9}"
    )
    for k, r in rows.items():
        print(
            f"{k:<10}{r['seconds'][n1]:>12.1f}{r['seconds'][n2]:>13.1f}{r['marginal_cells_per_s']:>12.0f}"
            f"{r['fixed_s']:>9.1f}"
        )
    print(f"raycell / plain: marginal {marg:.2f}x, end to end at {n2} cells {e2e:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"{time.strftime('%Y%m%d')}_infer_marginal.json"
    f.write_text(
        json.dumps(
            {
                "bench": "infer_marginal",
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "cpu_count": os.cpu_count(),
                "threads": args.threads,
                "load_average": load0,
                "results": rows,
                "marginal_ratio": marg,
                "end_to_end_ratio": e2e,
                "command": "python bench/bench_infer_marginal.py " + " ".join(argv or sys.argv[1:]),
            },
            indent=2,
            default=str,
        )
    )
    print(f"wrote {f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
