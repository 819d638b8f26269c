"""Training and inference throughput: Ray Train / Ray Data against plain single-process PyTorch, one run.

  * train: the same loop (`raycell.train.loop.run_training`) run (a) in-process over pyarrow batches
    (`LocalContext`, no Ray) and (b) as a Ray Train `TorchTrainer` with 1 worker fed by Ray Data; the
    ratio is Ray's overhead (or gain, with prefetching) per epoch. Steady-state epochs only (epoch 0 is
    reported separately: it includes worker start-up).
  * infer: `raycell infer` (Ray Data `map_batches` over an actor pool, writing parquet) against a plain
    `torch.inference_mode()` loop over the same shards that computes the same outputs and writes nothing.
Prints a table and writes bench/results/<date>_train_infer.json.

    python bench/bench_train_infer.py [--cells 3000] [--epochs 3] [--preset small]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--materialize", default="auto", choices=["auto", "always", "never"],
                    help="data.materialize of the Ray Train run (never = stream the shards every epoch)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    import torch

    from raycell.config import load_config
    from raycell.data.dataset import CropCollate
    from raycell.data.splits import split_dataset
    from raycell.data.synthetic import write_synthetic
    from raycell.formats.categories import CategoryMap
    from raycell.formats.spec import DataSpec
    from raycell.infer.batch import predict
    from raycell.infer.predictor import CropPredictor
    from raycell.train.context import LocalContext
    from raycell.train.loop import run_training
    from raycell.train.trainer import train, training_setup
    from raycell.utils.ray_utils import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="raycell-bench-"))
    size = 64 if args.preset == "small" else 32
    write_synthetic(str(tmp / "d"), n_cells=args.cells, crop_size=size, rows_per_shard=500)
    split_dataset(str(tmp / "d"))
    threads = os.cpu_count() or 1
    over = [f"data.path={tmp / 'd'}", f"model.preset={args.preset}", f"train.epochs={args.epochs}",
            f"train.runs_dir={tmp / 'runs'}", "ray.progress=false", f"train.torch_threads={threads}",
            f"data.materialize={args.materialize}"]
    cfg = load_config(None, over)

    # (a) plain loop, in-process
    torch.set_num_threads(threads)
    setup, ds = training_setup(cfg)
    col = CropCollate(DataSpec.from_dict(setup["data_spec"]), CategoryMap.from_dict(setup["labels"]),
                      CategoryMap.from_dict(setup["batches"]))
    ctx = LocalContext(ds, col, cfg.data.batch_size, cfg.data.eval_batch_size, tmp / "local")
    run_training(ctx, cfg, setup)
    local_ep = [h["epoch_time_s"] for h in ctx.history]
    n_train = ds.manifest["counts_per_split"]["train"]

    # (b) Ray Train, 1 worker
    init_ray(progress=False)
    res = train(cfg)
    ray_ep = [h["epoch_time_s"] for h in res["history"]]

    def steady(ts):
        return sum(ts[1:]) / max(1, len(ts) - 1)

    # inference: Ray Data actor pool vs plain loop
    cfg.infer.checkpoint = res["run_dir"]
    cfg.infer.out = str(tmp / "pred")
    t0 = time.perf_counter()
    predict(cfg)
    ray_inf = time.perf_counter() - t0
    pred = CropPredictor(res["run_dir"])
    t0 = time.perf_counter()
    n_inf = 0
    for p in ds.shard_paths:
        t = ds.read_shard(p)
        for s in range(0, t.num_rows, cfg.data.eval_batch_size):
            n_inf += pred(t.slice(s, cfg.data.eval_batch_size)).num_rows
    plain_inf = time.perf_counter() - t0

    rows = {
        "train_plain_loop": {"cells_per_s": n_train / steady(local_ep), "epoch_s": local_ep},
        "train_ray_train_1_worker": {"cells_per_s": n_train / steady(ray_ep), "epoch_s": ray_ep},
        "infer_plain_no_grad": {"cells_per_s": n_inf / plain_inf, "seconds": plain_inf},
        "infer_ray_data": {"cells_per_s": n_inf / ray_inf, "seconds": ray_inf},
    }
    rows["train_ray_train_1_worker"]["ratio_vs_plain"] = (rows["train_ray_train_1_worker"]["cells_per_s"]
                                                         / rows["train_plain_loop"]["cells_per_s"])
    rows["infer_ray_data"]["ratio_vs_plain"] = (rows["infer_ray_data"]["cells_per_s"]
                                               / rows["infer_plain_no_grad"]["cells_per_s"])
    print(f"\n{args.cells} cells ({n_train} train), {size} px, preset {args.preset}, {threads} cores")
    print(f"{'path':<28}{'cells/s':>10}{'x plain':>9}")
    for k, r in rows.items():
        print(f"{k:<28}{r['cells_per_s']:>10.0f}{r.get('ratio_vs_plain', 1.0):>9.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"{time.strftime('%Y%m%d')}_train_infer_{args.materialize}.json"
    f.write_text(json.dumps({"bench": "train_infer", "date": time.strftime("%Y-%m-%d %H:%M"),
                             "cpu_count": os.cpu_count(), "cells": args.cells, "preset": args.preset,
                             "materialize": args.materialize, "load_average": os.getloadavg(),
                             "results": rows, "command": "python bench/bench_train_infer.py "
                             + " ".join(argv or sys.argv[1:])}, indent=2))
    print(f"wrote {f}")


if __name__ == "__main__":
    main()
