"""Loader throughput: how fast each way of feeding crops delivers training batches, in one run, as ratios.

For each crop size (64 and 256 px by default) one synthetic data set is written (a few hundred generated
cells repeated under new cell ids: generating 256-px cells is slow, and a loader does not care), split by
raycell, and its training split is delivered as training batches (uint8 (N, C, H, W) tensors + label codes,
`data.batch_size` rows) by
  (a) ray_data  : raycell's own path, as a Ray Train worker gets it: `raycell.data.dataset.ray_datasets`
                  with `data.materialize` auto (held in the object store when it fits, `choose_materialize`:
                  the read happens once, before the first batch), then `iter_torch_batches` with raycell's
                  collate, local shuffle buffer and prefetch from the config (iterated in the driver: no
                  model, no Train worker); `ray_data_stream` is the same with data.materialize=never (data
                  larger than memory: every epoch reads and filters the shards again);
  (b) pyarrow   : the shards read by pyarrow in one process, file order shuffled per epoch, one vectorised
                  decode (`CropCollate`) per batch: the format's ceiling on one core;
  (c) npz_memory: the ARMED reference's approach: every crop in RAM as one array loaded from an .npz, random
                  batches by fancy indexing (the load time, and the RAM 1 M crops of this size would need,
                  are reported separately);
  (d) png_loader: a PyTorch DataLoader over one PNG file per crop (as many worker processes as cores,
                  persistent workers, shuffled).
Reported per loader: time to the first batch (from creating the loader/dataset, Ray's start-up excluded),
steady-state images/s (every batch after the first `--warmup` batches, all epochs, epoch starts included),
the cores it used in that window (CPU seconds of this process and all its descendants, Ray's processes and
DataLoader workers included, per wall second) and images/s per core; each as a ratio to (b) and (d).
Ray is started only after the Ray-free loaders ran, so its idle processes do not count against them, and
warmed by one batch first (its start-up and worker start are reported as ray_init_s and ray_warmup_s).

    python bench/bench_dataloader.py                 # 64 and 256 px
    python bench/bench_dataloader.py --quick         # a few minutes on 2 cores
    python bench/bench_dataloader.py --sizes 64 --cells 20000 --out bench/results/dl.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Window, machine, out_path, print_table, ratio, write_result  # noqa: E402
from raycell import constants as K  # noqa: E402

LOADERS = ("ray_data", "ray_data_held", "ray_data_stream", "pyarrow", "npz_memory", "png_loader")
RAY_ROWS = {"auto": "ray_data", "always": "ray_data_held", "never": "ray_data_stream"}


def make_data(out: Path, size: int, cells: int, unique: int):
    """A split crop-shard data set of `cells` rows (`unique` generated cells repeated), ~8 MiB shards."""
    import pandas as pd

    from raycell.data.splits import split_dataset
    from raycell.data.synthetic import CHANNELS, generate
    from raycell.formats.shards import ShardWriter, open_dataset

    img, meta, _ = generate(n_cells=max(1, min(unique, cells)), crop_size=size, seed=0)
    rows = max(32, min(1000, (8 << 20) // img[0].nbytes))
    w = ShardWriter(out, CHANNELS, rows_per_shard=rows, overwrite=True)
    done, rep = 0, 0
    while done < cells:
        k = min(len(img), cells - done)
        m = meta.iloc[:k].copy()
        m[K.CELL_ID] = pd.Series([f"{c}-r{rep}" for c in m[K.CELL_ID]], index=m.index)
        w.add(img[:k], m)
        done, rep = done + k, rep + 1
    w.close(
        params={
            "generator": "raycell.data.synthetic",
            "n_cells": cells,
            "unique_cells": len(img),
            "crop_size": size,
        }
    )
    split_dataset(str(out))
    return open_dataset(out)


def _collate(ds):
    from raycell.data.dataset import CropCollate
    from raycell.formats.categories import CategoryMap
    from raycell.formats.spec import DataSpec

    return CropCollate(
        DataSpec.from_dataset(ds),
        CategoryMap(K.LABEL, ds.manifest.label_vocab),
        CategoryMap(K.BATCH, ds.manifest.batch_vocab),
    )


def measure(setup, epoch_iter, epochs: int, warmup: int) -> dict:
    """Run `epochs` epochs of `epoch_iter(state, epoch)` (batches with a 'y' or a second item).

    Time to first batch counts from before `setup()`; the steady window starts after `warmup` batches.
    """
    t0 = time.perf_counter()
    state = setup()
    n = nb = steady_n = 0
    first, firsts, win = None, [], None
    for e in range(epochs):
        te = time.perf_counter()
        for i, b in enumerate(epoch_iter(state, e)):
            k = len(b["y"]) if isinstance(b, dict) else len(b[1])
            if i == 0:
                firsts.append(time.perf_counter() - te)
            if first is None:
                first = time.perf_counter() - t0
            n, nb = n + k, nb + 1
            if nb == warmup:
                win = Window().start()
            elif nb > warmup:
                steady_n += k
    total = time.perf_counter() - t0
    r = {
        "cells": n,
        "batches": nb,
        "total_s": total,
        "first_batch_s": first,
        "epoch_first_batch_s": firsts,
    }
    if win is None or steady_n == 0:
        r.update(
            steady_cells_per_s=None,
            cores=None,
            per_core=None,
            note=f"fewer than {warmup + 1} batches: no steady state (use more --cells)",
        )
        return r
    win.stop()
    r.update(
        steady_cells=steady_n,
        steady_s=win.wall,
        steady_cells_per_s=steady_n / win.wall,
        cores=win.cores,
        per_core=steady_n / win.wall / max(win.cores, 1e-9),
    )
    return r


def bench_pyarrow(ds, batch, epochs, warmup):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    col = _collate(ds)
    paths = ds.shard_paths

    def epoch(_, e):
        for i in np.random.default_rng(e).permutation(len(paths)):
            t = pq.read_table(paths[i], columns=col.columns + [K.SPLIT])
            t = t.filter(pc.equal(t.column(K.SPLIT), K.TRAIN)).drop_columns([K.SPLIT])
            for s in range(0, t.num_rows, batch):
                yield col(t.slice(s, batch))

    return measure(lambda: None, epoch, epochs, warmup)


def bench_npz(ds, batch, epochs, warmup, tmp: Path):
    import torch

    imgs, meta = ds.load_images(splits=[K.TRAIN])
    f = tmp / "data.npz"
    np.savez(f, images=imgs, label=(meta[K.LABEL] == ds.manifest.label_vocab[-1]).to_numpy())
    del imgs
    loaded = {}

    def setup():
        t = time.perf_counter()
        d = np.load(f)
        loaded["x"], loaded["y"] = d["images"], d["label"]
        loaded["load_s"] = time.perf_counter() - t

    def epoch(_, e):
        x, y = loaded["x"], loaded["y"]
        order = np.random.default_rng(e).permutation(len(x))
        for s in range(0, len(x), batch):
            idx = order[s : s + batch]
            yield {"x": torch.from_numpy(x[idx]), "y": torch.from_numpy(y[idx])}

    r = measure(setup, epoch, epochs, warmup)
    per_crop = int(np.prod(ds.shape)) * np.dtype(ds.dtype).itemsize
    r.update(
        load_s=loaded["load_s"],
        ram_gib_per_million=per_crop * 1e6 / 2**30,
        load_s_per_million=loaded["load_s"] * 1e6 / max(1, len(loaded["y"])),
    )
    return r


class _PngSet:
    def __init__(self, files, labels):
        self.files, self.labels = files, labels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import torch
        from PIL import Image

        a = np.asarray(Image.open(self.files[i]))  # (H, W, 2): grey + alpha = the 2 channels
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))), self.labels[i]


def bench_png(ds, batch, epochs, warmup, tmp: Path, workers: int):
    import torch
    from PIL import Image

    imgs, meta = ds.load_images(splits=[K.TRAIN])
    if imgs.shape[1] != 2 or imgs.dtype != np.uint8:
        return {"note": "PNG baseline needs 2-channel uint8 crops"}
    d = tmp / "png"
    d.mkdir()
    files = []
    for i, im in enumerate(imgs):
        f = d / f"{i:07d}.png"
        Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0)), mode="LA").save(f)
        files.append(str(f))
    labels = (meta[K.LABEL] == ds.manifest.label_vocab[-1]).to_numpy().astype(np.int64)
    del imgs

    def setup():
        return torch.utils.data.DataLoader(
            _PngSet(files, labels),
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    r = measure(setup, lambda dl, e: iter(dl), epochs, warmup)
    r["workers"] = workers
    r["png_mib"] = round(sum(os.path.getsize(f) for f in files) / 2**20, 1)
    shutil.rmtree(d, ignore_errors=True)
    return r


def bench_ray(ds, cfg, epochs, warmup):
    import ray

    from raycell.data.dataset import choose_materialize, ray_datasets, train_batches

    col = _collate(ds)
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    held = choose_materialize(ds, (K.TRAIN,), cfg.data.materialize, store, col.columns)
    d = cfg.data

    def setup():
        return ray_datasets(
            ds,
            (K.TRAIN,),
            columns=col.columns,
            block_size_mb=d.block_size_mb,
            shuffle_seed=d.shuffle_seed,
            materialize=held,
            parquet_reader=d.parquet_reader,
        )[K.TRAIN]

    def epoch(
        rd, e
    ):  # as a training worker draws them (`data.fetch_batches` at a time, cut locally)
        return train_batches(
            rd, d.batch_size, col, d.fetch_batches, d.shuffle_buffer, None, d.prefetch_batches
        )

    r = measure(setup, epoch, epochs, warmup)
    r.update(
        materialized=held,
        materialize=d.materialize,
        shuffle_buffer=d.shuffle_buffer,
        prefetch_batches=d.prefetch_batches,
        block_size_mb=d.block_size_mb,
        fetch_batches=d.fetch_batches,
    )
    return r


def ray_warmup(ds, cfg) -> None:
    """One batch through a Ray Data pipeline over `ds`: starts Ray's worker processes (they import
    raycell).
    """
    from raycell.data.dataset import ray_datasets

    col = _collate(ds)
    rd = ray_datasets(
        ds,
        (K.TRAIN,),
        columns=col.columns,
        block_size_mb=cfg.data.block_size_mb,
        parquet_reader=cfg.data.parquet_reader,
    )[K.TRAIN]
    next(iter(rd.iter_torch_batches(batch_size=cfg.data.batch_size, collate_fn=col)))


def ratios(loaders: dict) -> dict:
    """Each loader against pyarrow (b) and the PNG DataLoader (d): images/s and images/s per core."""
    out = {}
    for name, r in loaders.items():
        out[name] = {
            "x_pyarrow": ratio(
                r.get("steady_cells_per_s"), loaders.get("pyarrow", {}).get("steady_cells_per_s")
            ),
            "x_png": ratio(
                r.get("steady_cells_per_s"), loaders.get("png_loader", {}).get("steady_cells_per_s")
            ),
            "per_core_x_pyarrow": ratio(
                r.get("per_core"), loaders.get("pyarrow", {}).get("per_core")
            ),
            "per_core_x_png": ratio(
                r.get("per_core"), loaders.get("png_loader", {}).get("per_core")
            ),
            "first_batch_x_pyarrow": ratio(
                r.get("first_batch_s"), loaders.get("pyarrow", {}).get("first_batch_s")
            ),
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="64,256", help="comma-separated crop sizes (px)")
    ap.add_argument(
        "--cells",
        type=int,
        default=0,
        help="cells per data set (0 = 24000 at 64 px, 3000 at 256 px; --quick: 8000 / 1200)",
    )
    ap.add_argument(
        "--unique", type=int, default=0, help="generated cells, repeated up to --cells (0 = auto)"
    )
    ap.add_argument("--epochs", type=int, default=0, help="epochs per loader (0 = 3; --quick: 2)")
    ap.add_argument("--warmup", type=int, default=3, help="batches before the steady-state window")
    ap.add_argument(
        "--batch-size", type=int, default=0, help="rows per batch (0 = data.batch_size)"
    )
    ap.add_argument(
        "--materialize",
        default="auto,never",
        help="data.materialize values of the Ray Data rows (auto = ray_data, the goal's row; "
        "never = ray_data_stream; always = ray_data_held)",
    )
    ap.add_argument("--png-workers", type=int, default=0, help="DataLoader workers (0 = cores)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (repeatable), e.g. data.parquet_reader=v2",
    )
    ap.add_argument("--quick", action="store_true", help="smaller data sets, 2 epochs")
    ap.add_argument(
        "--out", help="JSON file, or folder for <date>_dataloader.json (default bench/results)"
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import torch

    from raycell.config import load_config

    mach = machine()
    torch.set_num_threads(1)  # the collate is numpy; one thread keeps "one process" one core
    sizes = [int(s) for s in args.sizes.split(",") if s]
    epochs = args.epochs or (2 if args.quick else 3)
    modes = [m for m in args.materialize.split(",") if m]
    bad = [m for m in modes if m not in RAY_ROWS]
    if bad:
        ap.error(f"--materialize: {bad[0]!r} is not one of auto, always, never")
    over = ["ray.progress=false", *args.set]
    if args.batch_size:
        over.append(f"data.batch_size={args.batch_size}")
    cfg = load_config(None, over)
    batch = cfg.data.batch_size
    workers = args.png_workers or os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="raycell-bench-dl-"))
    res = {
        "bench": "dataloader",
        "machine": mach,
        "quick": args.quick,
        "epochs": epochs,
        "batch": batch,
        "warmup_batches": args.warmup,
        "sizes": {},
    }
    try:
        data = {}
        for size in sizes:
            cells = (
                args.cells
                or ({True: 8000, False: 24000} if size <= 96 else {True: 1200, False: 3000})[
                    args.quick
                ]
            )
            unique = args.unique or (2000 if size <= 96 else 150)
            t = time.perf_counter()
            data[size] = make_data(tmp / f"d{size}", size, cells, unique)
            n_train = data[size].manifest.counts_per_split[K.TRAIN]
            print(
                f"[bench] {size} px: {cells} cells ({n_train} train) written in "
                f"{time.perf_counter() - t:.1f} s",
                flush=True,
            )
            res["sizes"][str(size)] = {
                "cells": cells,
                "train_cells": n_train,
                "shape": list(data[size].shape),
                "shards": len(data[size].shard_paths),
                "loaders": {},
            }
        for (
            size
        ) in sizes:  # the Ray-free loaders first: Ray's idle processes would count against them
            ds, L = data[size], res["sizes"][str(size)]["loaders"]
            print(f"[bench] {size} px: pyarrow", flush=True)
            L["pyarrow"] = bench_pyarrow(ds, batch, epochs, args.warmup)
            print(f"[bench] {size} px: npz in RAM", flush=True)
            L["npz_memory"] = bench_npz(ds, batch, epochs, args.warmup, tmp)
            print(f"[bench] {size} px: PNG DataLoader ({workers} workers)", flush=True)
            L["png_loader"] = bench_png(ds, batch, epochs, args.warmup, tmp, workers)
        from raycell.utils.ray_utils import init_ray

        t = time.perf_counter()
        init_ray(progress=False)
        res["ray_init_s"] = time.perf_counter() - t
        # Ray's worker processes start (and import raycell) on first use: once, before the first Ray row,
        # so that row's time to first batch is not the only one that pays it (reported as ray_warmup_s)
        t = time.perf_counter()
        ray_warmup(data[sizes[0]], cfg)
        res["ray_warmup_s"] = time.perf_counter() - t
        for size in sizes:
            for mode in modes:
                print(f"[bench] {size} px: Ray Data (data.materialize={mode})", flush=True)
                cfg.data.materialize = mode
                res["sizes"][str(size)]["loaders"][RAY_ROWS[mode]] = bench_ray(
                    data[size], cfg, epochs, args.warmup
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for size in sizes:
        s = res["sizes"][str(size)]
        s["loaders"] = {k: s["loaders"][k] for k in LOADERS if k in s["loaders"]}
        s["ratios"] = ratios(s["loaders"])
        for name, r in s["loaders"].items():
            q = s["ratios"][name]
            rows.append(
                [
                    f"{name} @ {size}px",
                    r.get("first_batch_s"),
                    r.get("steady_cells_per_s"),
                    r.get("cores"),
                    r.get("per_core"),
                    q["x_pyarrow"],
                    q["per_core_x_pyarrow"],
                    q["x_png"],
                ]
            )
    res["table"] = print_table(
        f"training batches of {batch} (steady state after {args.warmup} batches, {epochs} epochs), "
        f"{mach['cores']} cores, load average {mach['load_average'][0]} at start",
        [
            "loader",
            "1st batch s",
            "img/s",
            "cores",
            "img/s/core",
            "x pyarrow",
            "x pyarrow/core",
            "x PNG",
        ],
        rows,
    )
    for size in sizes:
        npz = res["sizes"][str(size)]["loaders"].get("npz_memory", {})
        if "load_s" in npz:
            print(
                f"npz @ {size}px: {npz['load_s']:.2f} s to load "
                f"{res['sizes'][str(size)]['train_cells']} crops "
                f"({npz['load_s_per_million']:.0f} s per million); 1 M crops need "
                f"{npz['ram_gib_per_million']:.1f} GiB of RAM"
            )
    write_result(out_path(args.out, "dataloader"), res)


if __name__ == "__main__":
    main()
