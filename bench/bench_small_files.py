"""The small-file tax: the same cells as N tiny shards and as compacted shards, in every stage.

One synthetic data set is written as `--shards` tiny shards (`--cells-per-shard` cells each, as
one shard per field of view gave: a real screen has 10^4-10^6 such files), then copied by
`raycell.formats.compact.compact_dataset` into shards of `--rows-per-shard` cells (the same cells,
in the same order). On each, as a user runs them (Ray up once, shared by both; each call pays its
own Ray Data start, as a user's would):
  * split: `raycell.data.splits.split_dataset` (reads the key columns, rewrites every shard);
  * train: one epoch of `raycell train` (Ray Train + Ray Data, 1 worker), the fit's wall time and
    the epoch's own time;
  * infer: `raycell infer` with the checkpoint trained on that copy (one output file per input
    shard);
  * embed: `raycell embed` with the same checkpoint (profiling layout, well profiles).
Prints a table (seconds on tiny shards, on compacted shards, ratio) and writes
bench/results/<date>_small_files.json; `x_split_epoch_infer` is the ratio of the summed split +
fit + infer seconds (the goal: compacted >= 3x faster at 10,000 shards).

    python bench/bench_small_files.py                  # 10,000 shards of 2 cells, 32 px
    python bench/bench_small_files.py --quick          # 300 shards: a check that it runs
    python bench/bench_small_files.py --shards 2000 --cells-per-shard 19 --crop-size 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, out_path, print_table, ratio, write_result  # noqa: E402

STAGES = ("split", "train", "infer", "embed")


def run_stages(path: Path, work: Path, base: list[str]) -> dict:
    """Split, one training epoch, infer and embed on the data set at `path`; seconds of each."""
    from raycell.config import load_config
    from raycell.data.splits import split_dataset
    from raycell.infer.batch import predict
    from raycell.infer.embed import embed
    from raycell.train.trainer import train

    res: dict = {}
    t0 = time.perf_counter()
    split_dataset(str(path), progress=False)
    res["split"] = {"seconds": time.perf_counter() - t0}

    cfg = load_config(
        None, base + [f"data.path={path}", f"train.runs_dir={work / 'runs'}", f"name={path.name}"]
    )
    t0 = time.perf_counter()
    out = train(cfg)
    hist = out["history"]
    res["train"] = {
        "seconds": time.perf_counter() - t0,
        "epoch_s": hist[0]["epoch_time_s"] if hist else None,
        "data_wait_s": hist[0].get("data_wait_s") if hist else None,
    }
    run_dir = out["run_dir"]

    over = [f"infer.checkpoint={run_dir}", f"infer.data={path}"]
    cfg = load_config(None, base + over + [f"infer.out={work / 'pred'}"])
    t0 = time.perf_counter()
    m = predict(cfg)
    res["infer"] = {"seconds": time.perf_counter() - t0, "cells": m["n_rows"]}

    cfg = load_config(None, base + over + [f"embed.out={work / 'emb'}"])
    t0 = time.perf_counter()
    m = embed(cfg)
    res["embed"] = {"seconds": time.perf_counter() - t0, "cells": m.get("n_rows")}
    return res


def main(argv=None):
    """Build both data sets, run the stages on each, print the table, write the JSON."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shards", type=int, default=0, help="tiny shards (0 = 10,000; --quick: 300)")
    ap.add_argument("--cells-per-shard", type=int, default=2, help="cells in each tiny shard")
    ap.add_argument("--rows-per-shard", type=int, default=2000, help="cells per compacted shard")
    ap.add_argument("--crop-size", type=int, default=32)
    ap.add_argument("--preset", default="small")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every stage (repeatable)",
    )
    ap.add_argument("--quick", action="store_true", help="300 tiny shards")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the data sets (the folder is printed) instead of deleting them",
    )
    ap.add_argument(
        "--out", help="JSON file, or folder for <date>_small_files.json (default bench/results)"
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    n_shards = args.shards or (300 if args.quick else 10_000)
    cells = n_shards * args.cells_per_shard

    import ray

    from raycell.data.synthetic import write_synthetic
    from raycell.formats.compact import compact_dataset
    from raycell.formats.shards import open_dataset
    from raycell.utils.ray_utils import init_ray

    mach = machine()
    tmp = Path(tempfile.mkdtemp(prefix="raycell-bench-sf-"))
    tiny, compact = tmp / "tiny", tmp / "compact"
    print(
        f"[bench] {cells} cells as {n_shards} shards of {args.cells_per_shard} -> {tiny}",
        flush=True,
    )
    write_synthetic(
        str(tiny),
        n_cells=cells,
        crop_size=args.crop_size,
        rows_per_shard=args.cells_per_shard,
        progress=False,
    )
    t0 = time.perf_counter()
    compact_dataset(tiny, compact, rows_per_shard=args.rows_per_shard)
    t_compact = time.perf_counter() - t0
    n_compact = len(open_dataset(compact).shard_paths)
    print(
        f"[bench] compacted into {n_compact} shards in {t_compact:.1f} s -> {compact}", flush=True
    )

    base = [
        f"model.preset={args.preset}",
        "train.epochs=1",
        "scaling.num_workers=1",
        "ray.progress=false",
        *args.set,
    ]
    res = {
        "bench": "small_files",
        "machine": mach,
        "quick": args.quick,
        "cells": cells,
        "crop_size": args.crop_size,
        "preset": args.preset,
        "overrides": args.set,
        "tiny": {"shards": n_shards, "cells_per_shard": args.cells_per_shard},
        "compacted": {
            "shards": n_compact,
            "rows_per_shard": args.rows_per_shard,
            "compact_s": t_compact,
        },
    }
    init_ray(progress=False)
    try:
        for name, path in (("tiny", tiny), ("compacted", compact)):
            print(f"[bench] stages on the {name} shards", flush=True)
            res[name]["stages"] = run_stages(path, tmp / f"work_{name}", base)
    finally:
        ray.shutdown()

    rows = []
    for st in STAGES:
        a, b = res["tiny"]["stages"][st]["seconds"], res["compacted"]["stages"][st]["seconds"]
        rows.append([st, a, b, ratio(a, b)])
    ep = [res[k]["stages"]["train"]["epoch_s"] for k in ("tiny", "compacted")]
    rows.append(["train: the epoch alone", ep[0], ep[1], ratio(ep[0], ep[1])])
    key = ("split", "train", "infer")
    sums = [sum(res[k]["stages"][s]["seconds"] for s in key) for k in ("tiny", "compacted")]
    rows.append(["split + train + infer", sums[0], sums[1], ratio(sums[0], sums[1])])
    res["x_split_epoch_infer"] = ratio(sums[0], sums[1])
    res["table"] = print_table(
        f"{cells} cells, {args.crop_size} px: {n_shards} shards of {args.cells_per_shard} vs "
        f"{n_compact} of <= {args.rows_per_shard}; {mach['cores']} cores, load average "
        f"{mach['load_average'][0]} at start",
        ["stage", "tiny shards s", "compacted s", "x (tiny / compacted)"],
        rows,
    )
    write_result(out_path(args.out, "small_files"), res)
    if args.keep:
        print(f"[bench] data sets kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
