"""Embedding throughput of a timm backbone: `raycell embed` (Ray Data actors) against a plain loop, one run.

For each crop size, a synthetic data set and an untrained timm checkpoint (the speed of a forward pass
does not depend on the weights) are made; then the same shards are embedded by
  (a) a plain single-process `torch.inference_mode()` loop: pyarrow reads, one vectorised decode per batch,
      the model, the features kept in memory (nothing written);
  (b) `raycell embed` with 1 actor, then with 2 actors (Ray Data `map_batches` over an actor pool, writing
      the profiling-layout parquet and the well profiles).
Each path gets the same CPU threads per model replica (`--threads`, default 1: per core). Prints a table
(cells/s, ratio to the plain loop, 2-actor scaling efficiency) and writes bench/results/<date>_embed.json.

    python bench/bench_embed.py                       # resnet50 at 64 and 224 px
    python bench/bench_embed.py --quick               # fewer cells (a couple of minutes on 2 cores)
    python bench/bench_embed.py --backbone resnet18 --sizes 64
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


def make_checkpoint(ds, backbone: str, out: Path) -> Path:
    """An untrained timm checkpoint with one head (the label column) for data set `ds`."""
    from raycell import constants as K
    from raycell.config import ExperimentConfig
    from raycell.formats.categories import CategoryMap
    from raycell.formats.spec import DataSpec
    from raycell.models import create_model
    from raycell.models.checkpoint import save_checkpoint

    spec = DataSpec.from_dataset(ds)
    labels = CategoryMap(K.LABEL, tuple(ds.manifest.label_vocab))
    batches = CategoryMap(K.BATCH, tuple(ds.manifest.batch_vocab))
    model = create_model(
        "timm",
        in_channels=spec.shape[0],
        n_classes=len(labels),
        backbone=backbone,
        head_names=[K.LABEL],
        head_sizes=[len(labels)],
    )
    return save_checkpoint(
        out / "checkpoint_000000",
        model,
        None,
        epoch=0,
        spec=spec,
        labels=labels,
        batches=batches,
        config=ExperimentConfig().to_dict(),
        metrics={},
        extra={"heads": [labels.to_dict()]},
    )


def plain_loop(ds, ck: Path, batch_size: int, threads: int) -> tuple[int, float]:
    """(cells, seconds) of a single-process inference loop over every shard (features kept in RAM)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from raycell.formats.shards import decode_images
    from raycell.models.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    model, meta = load_checkpoint(ck)
    spec = meta.data_spec
    feats, n = [], 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in ds.shard_paths:
            for b in pq.ParquetFile(p).iter_batches(
                batch_size=batch_size, columns=["cell_id", "image"]
            ):
                x = spec.to_float(
                    torch.from_numpy(np.array(decode_images(b, spec.shape, spec.dtype)))
                )
                feats.append(model(x).latent.numpy())
                n += len(x)
    return n, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--sizes", default="64,224", help="comma-separated crop sizes (px)")
    ap.add_argument(
        "--cells", type=int, default=0, help="cells per size (0 = 2000 at 64 px, 300 at 224)"
    )
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per model replica")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="a quarter of the cells")
    ap.add_argument("--layout", default="columns", choices=["columns", "list"], help="embed.layout")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    from raycell.config import load_config
    from raycell.data.synthetic import write_synthetic
    from raycell.formats.shards import open_dataset
    from raycell.infer.embed import embed
    from raycell.utils.ray_utils import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="raycell-bench-embed-"))
    init_ray(progress=False)
    rows = {}
    for size in [int(s) for s in args.sizes.split(",") if s]:
        n_cells = args.cells or (2000 if size <= 96 else 300)
        if args.quick:
            n_cells = max(64, n_cells // 4)
        d = tmp / f"d{size}"
        write_synthetic(
            str(d), n_cells=n_cells, crop_size=size, rows_per_shard=max(64, n_cells // 8)
        )
        ds = open_dataset(d)
        ck = make_checkpoint(ds, args.backbone, tmp / f"run{size}")
        n, secs = plain_loop(ds, ck, args.batch_size, args.threads)
        r = {"cells": n, "plain_cells_per_s": n / secs}
        for actors in (1, 2):
            cfg = load_config(
                None,
                [
                    f"data.path={d}",
                    f"infer.checkpoint={ck}",
                    f"embed.out={tmp / f'e{size}_{actors}'}",
                    f"infer.num_actors={actors}",
                    f"data.eval_batch_size={args.batch_size}",
                    "ray.progress=false",
                    f"infer.cpus_per_actor={args.threads}",
                    f"embed.layout={args.layout}",
                ],
            )
            t0 = time.perf_counter()
            embed(cfg)
            r[f"embed_{actors}_actor_cells_per_s"] = n / (time.perf_counter() - t0)
        r["embed_1_actor_vs_plain"] = r["embed_1_actor_cells_per_s"] / r["plain_cells_per_s"]
        r["two_actor_efficiency"] = r["embed_2_actor_cells_per_s"] / (
            2 * r["embed_1_actor_cells_per_s"]
        )
        rows[f"{args.backbone}@{size}px"] = r

    print(
        f"\n{args.backbone}, layout {args.layout}, {args.threads} thread(s) per replica, "
        f"{os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'model@size':<18}{'cells':>7}{'plain/s':>10}{'embed 1/s':>11}{'x plain':>9}{'embed 2/s':>11}"
        f"{'2-actor eff':>13}"
    )
    for k, r in rows.items():
        print(
            f"{k:<18}{r['cells']:>7}{r['plain_cells_per_s']:>10.1f}{r['embed_1_actor_cells_per_s']:>11.1f}"
            f"{r['embed_1_actor_vs_plain']:>9.2f}{r['embed_2_actor_cells_per_s']:>11.1f}"
            f"{r['two_actor_efficiency']:>13.2f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"{time.strftime('%Y%m%d')}_embed_{args.layout}.json"
    f.write_text(
        json.dumps(
            {
                "bench": "embed",
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "cpu_count": os.cpu_count(),
                "load_average": os.getloadavg(),
                "backbone": args.backbone,
                "threads": args.threads,
                "layout": args.layout,
                "results": rows,
                "command": "python bench/bench_embed.py " + " ".join(argv or sys.argv[1:]),
            },
            indent=2,
        )
    )
    print(f"wrote {f}")


if __name__ == "__main__":
    main()
