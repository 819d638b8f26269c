"""Loader throughput: how fast each way of feeding crops to a model delivers batches, in one run.

Compared on the same cells (the synthetic default unless --data is given), batch size 256, uint8 tensors:
  * pyarrow   : the parquet shards read by pyarrow in one process + the vectorised collate (the format's
                ceiling on one core);
  * ray_data  : Ray Data streaming the same shards (`iter_torch_batches` with the same collate), as Ray
                Train workers consume them;
  * npz_memory: the ARMED reference's approach, everything in RAM as one array (memory speed, bounded by
                RAM; the load time is reported separately);
  * png_loader: a PyTorch DataLoader over one PNG file per cell (2 worker processes), the common
                folder-of-images baseline.
Prints a table (cells/s and the ratio to pyarrow) and writes bench/results/<date>_dataloader.json.

    python bench/bench_dataloader.py [--data FOLDER] [--cells 6000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raycell import constants as K  # noqa: E402
from raycell.data.dataset import TRAIN_COLUMNS, CropCollate  # noqa: E402
from raycell.formats.categories import CategoryMap  # noqa: E402
from raycell.formats.shards import open_dataset  # noqa: E402
from raycell.formats.spec import DataSpec  # noqa: E402

BATCH = 256


def _collate(ds):
    return CropCollate(DataSpec.from_dataset(ds), CategoryMap(K.LABEL, ds.manifest["label_vocab"]),
                       CategoryMap(K.BATCH, ds.manifest["batch_vocab"]))


def bench_pyarrow(ds, epochs):
    import pyarrow.parquet as pq

    col = _collate(ds)
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for p in ds.shard_paths:
            t = pq.read_table(p, columns=TRAIN_COLUMNS)
            for s in range(0, t.num_rows, BATCH):
                n += len(col(t.slice(s, BATCH))["y"])
    return n, time.perf_counter() - t0


def bench_ray(ds, epochs):
    import ray.data

    from raycell.utils.ray_utils import init_ray

    init_ray(progress=False)
    ray.data.DataContext.get_current().target_max_block_size = 8 << 20
    rd = ray.data.read_parquet(ds.shard_paths).select_columns(TRAIN_COLUMNS)
    col = _collate(ds)
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for b in rd.iter_torch_batches(batch_size=BATCH, collate_fn=col, prefetch_batches=4):
            n += len(b["y"])
    return n, time.perf_counter() - t0


def bench_npz(ds, epochs, tmp):
    import torch

    imgs, meta = ds.load_images()
    f = Path(tmp) / "data.npz"
    np.savez_compressed(f, images=imgs, label=(meta[K.LABEL] == ds.manifest["label_vocab"][-1]).to_numpy())
    t0 = time.perf_counter()
    d = np.load(f)
    x, y = d["images"], d["label"]
    load_s = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for s in range(0, len(x), BATCH):
            idx = order[s:s + BATCH]
            xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
            n += len(yb) + 0 * xb.shape[0]
    return n, time.perf_counter() - t0, load_s


class _PngSet:
    def __init__(self, files, labels):
        self.files, self.labels = files, labels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import torch
        from PIL import Image

        a = np.asarray(Image.open(self.files[i]))  # (H, W, 2) grey+alpha = 2 channels
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))), self.labels[i]


def bench_png(ds, epochs, tmp):
    import torch
    from PIL import Image

    imgs, meta = ds.load_images()
    if imgs.shape[1] != 2:
        return None, None
    d = Path(tmp) / "png"
    d.mkdir()
    files = []
    for i, im in enumerate(imgs):
        f = d / f"{i:07d}.png"
        Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0)), mode="LA").save(f)
        files.append(str(f))
    labels = (meta[K.LABEL] == ds.manifest["label_vocab"][-1]).to_numpy().astype(np.int64)
    dl = torch.utils.data.DataLoader(_PngSet(files, labels), batch_size=BATCH, shuffle=True, num_workers=2)
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in dl:
            n += len(y)
    return n, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="crop-shard data set (default: generate the synthetic default)")
    ap.add_argument("--cells", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="raycell-bench-")
    if args.data:
        ds = open_dataset(args.data)
    else:
        from raycell.data.synthetic import write_synthetic

        write_synthetic(f"{tmp}/synth", n_cells=args.cells, rows_per_shard=500)
        ds = open_dataset(f"{tmp}/synth")
    rows = {}
    n, s = bench_pyarrow(ds, args.epochs)
    rows["pyarrow"] = {"cells": n, "seconds": s}
    n, s = bench_ray(ds, args.epochs)
    rows["ray_data"] = {"cells": n, "seconds": s}
    n, s, load = bench_npz(ds, args.epochs, tmp)
    rows["npz_memory"] = {"cells": n, "seconds": s, "load_seconds": load}
    n, s = bench_png(ds, args.epochs, tmp)
    if n:
        rows["png_loader"] = {"cells": n, "seconds": s}
    base = rows["pyarrow"]["cells"] / rows["pyarrow"]["seconds"]
    print(f"\nloader throughput, {ds.manifest['n_cells']} cells x {args.epochs} epochs, crops "
          f"{ds.shape} {ds.dtype}, batch {BATCH}, {os.cpu_count()} cores")
    print(f"{'loader':<12}{'cells/s':>12}{'x pyarrow':>11}")
    for k, r in rows.items():
        r["cells_per_s"] = r["cells"] / r["seconds"]
        r["ratio_vs_pyarrow"] = r["cells_per_s"] / base
        extra = f"   (+{r['load_seconds']:.1f}s to load into RAM)" if "load_seconds" in r else ""
        print(f"{k:<12}{r['cells_per_s']:>12.0f}{r['ratio_vs_pyarrow']:>11.2f}{extra}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"bench": "dataloader", "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(),
           "n_cells": ds.manifest["n_cells"], "shape": list(ds.shape), "batch": BATCH, "epochs": args.epochs,
           "results": rows, "command": "python bench/bench_dataloader.py " + " ".join(argv or sys.argv[1:])}
    f = out / f"{time.strftime('%Y%m%d')}_dataloader.json"
    f.write_text(json.dumps(res, indent=2))
    print(f"wrote {f}")


if __name__ == "__main__":
    main()
