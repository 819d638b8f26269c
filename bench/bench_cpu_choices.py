"""Two defaults chosen by measurement on CPU: Ray Data's parquet reader, and channels-last tensors.

    python bench/bench_cpu_choices.py            # ~3 min on 2 cores
    python bench/bench_cpu_choices.py --quick    # ~1 min

* **parquet reader** (`data.parquet_reader`): Ray 2.60's `read_parquet` goes through DataSourceV2 by
  default, which provisions footer-reading actors (32, `RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`) for every
  read; the V1 reader starts read tasks directly. For each reader: seconds to `read_parquet ->
  materialize()` a synthetic data set (what training does once per split) and to stream it once with
  `iter_batches` (what each streamed epoch and each inference round does), `--repeats` times, first
  call (worker start-up included) reported apart.
* **channels-last** (`train.channels_last`, applied on CPU too): milliseconds per training step (forward,
  backward, optimiser, as the training plan steps it) at batch `data.batch_size` and per inference
  forward at `data.eval_batch_size`, small conventional AEC at 64 px x 2 channels, NCHW vs
  channels-last, interleaved repeats (medians), torch threads = cores.

Prints a table and writes bench/results/<date>_cpu_choices.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, out_path, print_table, write_result  # noqa: E402


def bench_readers(data: Path, repeats: int) -> dict:
    from raycell.data.dataset import read_shards
    from raycell.formats.shards import open_dataset

    paths = open_dataset(data).shard_paths
    out = {}
    for reader in ("v2", "v1"):
        mat, stream = [], []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            read_shards(paths, reader).materialize()
            mat.append(time.perf_counter() - t)
            t = time.perf_counter()
            n = sum(
                b.num_rows
                for b in read_shards(paths, reader).iter_batches(
                    batch_size=256, batch_format="pyarrow"
                )
            )
            stream.append(time.perf_counter() - t)
        out[reader] = {
            "first_materialize_s": mat[0],
            "materialize_s": statistics.median(mat[1:]),
            "first_stream_s": stream[0],
            "stream_s": statistics.median(stream[1:]),
            "rows": n,
        }
    return out


def bench_layouts(repeats: int, batch: int, eval_batch: int) -> dict:
    import torch

    from raycell.config import ExperimentConfig
    from raycell.models.registry import build_plan, create_model

    torch.manual_seed(0)
    cfg = ExperimentConfig()
    x = torch.rand(batch, 2, 64, 64)
    xe = torch.rand(eval_batch, 2, 64, 64)
    y = torch.randint(0, 2, (batch,))
    z = torch.nn.functional.one_hot(torch.randint(0, 6, (batch,)), 6).float()
    setups = {}
    for layout in ("nchw", "channels_last"):
        m = create_model("conventional", in_channels=2, n_classes=2, preset="small")
        if layout == "channels_last":
            m = m.to(memory_format=torch.channels_last)
        setups[layout] = (m, build_plan(m, cfg.loss, 1e-3, n_batches=6))
    times: dict = {k: {"train_ms": [], "infer_ms": []} for k in setups}
    for _ in range(repeats):  # interleaved: a machine-load change hits both layouts alike
        for layout, (m, plan) in setups.items():
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            xt, xi = x.contiguous(memory_format=fmt), xe.contiguous(memory_format=fmt)
            m.train()
            plan.training_step(xt, y, z)  # warm (oneDNN primitives are cached per shape)
            t = time.perf_counter()
            plan.training_step(xt, y, z).values()
            times[layout]["train_ms"].append(1e3 * (time.perf_counter() - t))
            m.eval()
            with torch.inference_mode():
                m(xi)
                t = time.perf_counter()
                m(xi)
                times[layout]["infer_ms"].append(1e3 * (time.perf_counter() - t))
    return {k: {f: statistics.median(v[f]) for f in v} | {"samples": v} for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cells", type=int, default=6000, help="cells in the synthetic data set (64 px)"
    )
    ap.add_argument("--shards", type=int, default=6, help="parquet shards")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    ap.add_argument("--quick", action="store_true", help="3 repeats")
    ap.add_argument(
        "--out", help="JSON file or folder (default bench/results/<date>_cpu_choices.json)"
    )
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else args.repeats

    import torch

    from raycell.config import ExperimentConfig
    from raycell.data.synthetic import write_synthetic
    from raycell.utils.ray_utils import init_ray

    torch.set_num_threads(os.cpu_count() or 1)
    result = {
        "bench": "cpu_choices",
        "machine": machine(),
        "cells": args.cells,
        "shards": args.shards,
    }
    d = ExperimentConfig().data
    result["layouts"] = bench_layouts(repeats, d.batch_size, d.eval_batch_size)
    tmp = Path(tempfile.mkdtemp(prefix="raycell-bench-cpu-"))
    try:
        write_synthetic(
            str(tmp / "d"),
            n_cells=args.cells,
            crop_size=64,
            rows_per_shard=-(-args.cells // args.shards),
            progress=False,
        )
        init_ray(progress=False)
        result["readers"] = bench_readers(tmp / "d", repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r, lay = result["readers"], result["layouts"]
    print_table(
        f"Ray Data parquet readers, {args.cells} cells in {args.shards} shards, median of {repeats} "
        "(first call apart)",
        ["reader", "materialize s", "stream once s", "first materialize s", "first stream s"],
        [
            [k, v["materialize_s"], v["stream_s"], v["first_materialize_s"], v["first_stream_s"]]
            for k, v in r.items()
        ],
    )
    print_table(
        f"small AEC @ 64 px x 2 ch, {torch.get_num_threads()} threads, median of {repeats}",
        [
            "layout",
            f"train step ms (batch {d.batch_size})",
            f"inference ms (batch {d.eval_batch_size})",
        ],
        [[k, v["train_ms"], v["infer_ms"]] for k, v in lay.items()],
    )
    result["v2_over_v1"] = {k: r["v2"][k] / r["v1"][k] for k in ("materialize_s", "stream_s")}
    result["nchw_over_channels_last"] = {
        k: lay["nchw"][k] / lay["channels_last"][k] for k in ("train_ms", "infer_ms")
    }
    print(
        f"\nV2 / V1 time: {result['v2_over_v1']}\nNCHW / channels-last time: "
        f"{result['nchw_over_channels_last']}"
    )
    print(f"wrote {write_result(out_path(args.out, 'cpu_choices'), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
