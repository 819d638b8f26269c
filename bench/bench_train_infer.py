"""Training and inference throughput: Ray Train / `raycell infer` against plain PyTorch, one run.

On one synthetic data set, split by raycell:
  * train: the same loop (`raycell.train.loop.run_training`, same model, data, batch size and threads)
    run (a) in-process over pyarrow batches (`LocalContext`, no Ray) with all cores' threads, and (b) as a
    Ray Train `TorchTrainer` fed by Ray Data (`data.materialize`, auto by default) with 1 worker (all
    cores' threads) and with 2 workers (the cores shared); steady-state epochs only (epoch 0, with worker
    start-up, is reported separately). Ratio = Ray epoch seconds / plain epoch seconds (goal <= 1.15 on
    1 worker).
  * infer: `raycell infer` (`raycell.infer.batch.predict`: Ray Data `map_batches` over an actor pool,
    writing parquet; Ray Data start-up and actor start included, as a user sees it) with 1 and 2 actors,
    against a plain `torch.inference_mode()` loop (`CropPredictor` over pyarrow tables, nothing written)
    with the same threads per model replica (`--threads`, default 1: per core). Ratio = images/s over the
    plain loop's (goal >= 0.9); 2-actor efficiency = t(1 actor) / (2 x t(2 actors)) (goal >= 0.8).
Ray is shut down while the plain loops run, so its idle processes do not count against them.

    python bench/bench_train_infer.py                     # 3000 cells, 3 epochs
    python bench/bench_train_infer.py --quick             # a few minutes on 2 cores
    python bench/bench_train_infer.py --materialize never --out bench/results/ti_never.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, out_path, print_table, ratio, write_result  # noqa: E402


def steady(ts: list[float]) -> float | None:
    """Mean epoch seconds after epoch 0 (None with a single epoch)."""
    return sum(ts[1:]) / (len(ts) - 1) if len(ts) > 1 else None


def plain_inference(run_dir: str, ds, batch: int, threads: int) -> tuple[int, float]:
    """(cells, seconds) of a single-process inference_mode loop over every shard (outputs kept in RAM)."""
    import torch

    from raycell.infer.predictor import CropPredictor

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pred = CropPredictor(
        run_dir
    )  # timed: raycell infer's actors load the checkpoint in their time too
    n = 0
    for p in ds.shard_paths:
        t = ds.read_shard(p)
        for s in range(0, t.num_rows, batch):
            n += pred(t.slice(s, batch)).num_rows
    return n, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cells", type=int, default=0, help="synthetic cells (0 = 3000; --quick: 1500)"
    )
    ap.add_argument(
        "--epochs", type=int, default=0, help="epochs per training run (0 = 3; --quick: 2)"
    )
    ap.add_argument("--preset", default="small")
    ap.add_argument("--workers", default="1,2", help="Ray Train worker counts")
    ap.add_argument("--actors", default="1,2", help="inference actor counts")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per inference model replica"
    )
    ap.add_argument(
        "--materialize",
        default="auto",
        choices=["auto", "always", "never"],
        help="data.materialize of the Ray Train runs (never = stream the shards every epoch)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every path (repeatable), e.g. data.parquet_reader=v2",
    )
    ap.add_argument("--quick", action="store_true", help="fewer cells and epochs")
    ap.add_argument(
        "--out", help="JSON file, or folder for <date>_train_infer.json (default bench/results)"
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    cells = args.cells or (1500 if args.quick else 3000)
    epochs = args.epochs or (2 if args.quick else 3)
    workers = [int(w) for w in args.workers.split(",") if w]
    actors = [int(a) for a in args.actors.split(",") if a]

    import ray
    import torch

    from raycell.config import ExperimentConfig, load_config
    from raycell.data.dataset import CropCollate
    from raycell.data.splits import split_dataset
    from raycell.data.synthetic import write_synthetic
    from raycell.infer.batch import predict
    from raycell.train.context import LocalContext
    from raycell.train.loop import run_training
    from raycell.train.trainer import train, training_setup
    from raycell.utils.ray_utils import init_ray

    mach = machine()
    tmp = Path(tempfile.mkdtemp(prefix="raycell-bench-ti-"))
    size = 64 if args.preset == "small" else 256
    write_synthetic(
        str(tmp / "d"), n_cells=cells, crop_size=size, rows_per_shard=max(100, cells // 8)
    )
    split_dataset(str(tmp / "d"))
    cores = os.cpu_count() or 1
    base = [
        f"data.path={tmp / 'd'}",
        f"model.preset={args.preset}",
        f"train.epochs={epochs}",
        f"train.runs_dir={tmp / 'runs'}",
        "ray.progress=false",
        f"data.materialize={args.materialize}",
        *args.set,
    ]
    res = {
        "bench": "train_infer",
        "machine": mach,
        "quick": args.quick,
        "cells": cells,
        "epochs": epochs,
        "preset": args.preset,
        "crop_size": size,
        "materialize": args.materialize,
        "overrides": args.set,
        "train": {},
        "infer": {},
    }

    # (a) the plain loop, in-process, all cores' threads
    print(f"[bench] plain training loop ({cores} threads)", flush=True)
    cfg = load_config(None, base + [f"train.torch_threads={cores}"])
    torch.set_num_threads(cores)
    setup, ds = training_setup(cfg)
    col = CropCollate(setup.data_spec, setup.labels, setup.batches)
    ctx = LocalContext(ds, col, cfg.data.batch_size, cfg.data.eval_batch_size, tmp / "local")
    run_training(ctx, cfg, setup)
    n_train = ds.manifest.counts_per_split["train"]
    ep = [h["epoch_time_s"] for h in ctx.history]
    res["train"]["plain_loop"] = {
        "threads": cores,
        "epoch_s": ep,
        "steady_epoch_s": steady(ep),
        "steady_data_wait_s": steady([h.get("data_wait_s", 0.0) for h in ctx.history]),
        "steady_train_s": steady([h.get("train_time_s", 0.0) for h in ctx.history]),
    }
    res["train_cells"] = n_train

    # (b) Ray Train, 1 and 2 workers (train.torch_threads 0: the cores shared between the workers)
    run_dir = None
    init_ray(progress=False)
    for w in workers:
        print(f"[bench] Ray Train, {w} worker(s)", flush=True)
        cfg = load_config(
            None, base + [f"scaling.num_workers={w}", "train.torch_threads=0", f"name=bench{w}"]
        )
        t0 = time.perf_counter()
        out = train(cfg)
        ep = [h["epoch_time_s"] for h in out["history"]]
        wait = steady([h.get("data_wait_s", 0.0) for h in out["history"]])
        res["train"][f"ray_train_{w}_worker"] = {
            "workers": w,
            "epoch_s": ep,
            "steady_epoch_s": steady(ep),
            "steady_data_wait_s": wait,
            "fit_s": time.perf_counter() - t0,
            "steady_train_s": steady([h.get("train_time_s", 0.0) for h in out["history"]]),
        }
        run_dir = run_dir or out["run_dir"]
    ray.shutdown()
    plain_s = res["train"]["plain_loop"]["steady_epoch_s"]
    for k, r in res["train"].items():
        r["cells_per_s"] = n_train / r["steady_epoch_s"] if r["steady_epoch_s"] else None
        r["x_plain_time"] = ratio(r["steady_epoch_s"], plain_s)

    # inference: a plain loop (Ray down), then `raycell infer` with 1 and 2 actors
    if run_dir:
        bs = ExperimentConfig().data.eval_batch_size
        print(f"[bench] plain inference loop ({args.threads} thread(s))", flush=True)
        n, secs = plain_inference(run_dir, ds, bs, args.threads)
        res["infer"]["plain_loop"] = {"threads": args.threads, "cells": n, "seconds": secs}
        init_ray(progress=False)
        for a in actors:
            print(f"[bench] raycell infer, {a} actor(s)", flush=True)
            over = base + [
                f"infer.checkpoint={run_dir}",
                f"infer.out={tmp / f'pred{a}'}",
                f"infer.num_actors={a}",
                f"infer.cpus_per_actor={args.threads}",
            ]
            if hasattr(ExperimentConfig().infer, "torch_threads"):
                over.append(f"infer.torch_threads={args.threads}")
            cfg = load_config(None, over)
            t0 = time.perf_counter()
            m = predict(cfg)
            res["infer"][f"raycell_infer_{a}_actor"] = {
                "actors": a,
                "threads": args.threads,
                "cells": m["n_rows"],
                "seconds": time.perf_counter() - t0,
            }
        ray.shutdown()
        for r in res["infer"].values():
            r["cells_per_s"] = r["cells"] / r["seconds"]
            r["x_plain"] = ratio(r["cells_per_s"], res["infer"]["plain_loop"]["cells_per_s"])
        one, two = (
            res["infer"].get("raycell_infer_1_actor"),
            res["infer"].get("raycell_infer_2_actor"),
        )
        if one and two:
            two["efficiency_vs_1"] = one["seconds"] / (2 * two["seconds"])

    rows = [
        [
            f"train {k}",
            r["steady_epoch_s"],
            r.get("steady_train_s"),
            r.get("steady_data_wait_s"),
            r["epoch_s"][0] if r["epoch_s"] else None,
            r["cells_per_s"],
            r["x_plain_time"],
            None,
        ]
        for k, r in res["train"].items()
    ]
    rows += [
        [
            f"infer {k}",
            None,
            None,
            None,
            None,
            r["cells_per_s"],
            r["x_plain"],
            r.get("efficiency_vs_1"),
        ]
        for k, r in res["infer"].items()
    ]
    res["table"] = print_table(
        f"{cells} cells ({n_train} train), {size} px, preset {args.preset}, "
        f"data.materialize={args.materialize}, "
        f"{cores} cores, load average {mach['load_average'][0]} at start",
        [
            "path",
            "epoch s (steady)",
            "of it training s",
            "waiting on data s",
            "epoch 0 s",
            "img/s",
            "x plain",
            "2-actor eff",
        ],
        rows,
    )
    print(
        "train: x plain = epoch time / the plain loop's; infer: x plain = images/s / the plain loop's"
    )
    write_result(out_path(args.out, "train_infer"), res)


if __name__ == "__main__":
    main()
