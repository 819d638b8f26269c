"""`raycell profile` on per-cell embeddings: the in-memory engine against Ray Data's streamed one.

A per-cell embeddings folder in the `raycell embed` layout (embeddings.json + shards/part-*.parquet,
`Metadata_Plate`, `Metadata_Well`, `Metadata_treatment`, then `Cells_Embedding_XXXX` float32 columns) is
generated shard by shard and row group by row group, so writing 10^6 cells x 64 features never holds more
than one row group. Then the same command, `python -m raycell profile` (each run in its own process,
Ray started by the command when it needs it), runs with `profile.engine=memory` (one pandas frame) and
`profile.engine=ray` (Ray Data reads blocks, groups by well and reduces each), aggregation only
(`--normalize none --feature-select '' --no-metrics`, so the numbers are the read and the reduction).
For each: wall seconds and the peak proportional set size of the command's whole process tree (Ray's
workers and object store included; sampled as in `bench_scale.py`). Both profiles.parquet must agree
(same wells, counts, metadata; features to 1e-6), else the script fails.

    python bench/bench_profile_stream.py                     # 10^6 cells x 64 features
    python bench/bench_profile_stream.py --quick             # 20,000 cells (a smoke run)
    python bench/bench_profile_stream.py --cells 10000000 --work /big/disk

Prints a table and writes bench/results/<date>_profile_stream.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ENGINES = ("memory", "ray")


def write_cells(
    folder: Path,
    n_cells: int,
    dim: int,
    plates: int,
    wells: int,
    shards: int,
    row_group: int,
    seed: int = 0,
) -> dict:
    """An embeddings folder of `n_cells` cells, written one row group at a time; its manifest.

    Cells are spread evenly over `plates` x `wells` wells (each well in every shard, as a screen's
    shards cut across wells); each well's features are a random well mean plus per-cell noise, so
    medians differ from well to well. Treatments repeat every 8 wells.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raycell import constants as K
    from raycell.formats.embeddings import embedding_name

    rng = np.random.default_rng(seed)
    names = [embedding_name(i) for i in range(dim)]
    n_wells = plates * wells
    centres = rng.normal(size=(n_wells, dim)).astype(np.float32)
    plate_of = np.repeat([f"P{p:02d}" for p in range(plates)], wells)
    well_of = np.tile([f"W{w:04d}" for w in range(wells)], plates)
    treat_of = np.array([f"T{i % 8}" for i in range(n_wells)])
    (folder / K.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n_cells, shards + 1).astype(np.int64)
    for s in range(shards):
        path = folder / K.SHARD_DIR / f"part-{s:05d}.parquet"
        with pq.ParquetWriter(path, _schema(names)) as w:
            for start in range(bounds[s], bounds[s + 1], row_group):
                stop = min(start + row_group, bounds[s + 1])
                well = np.arange(start, stop) % n_wells
                X = centres[well] + rng.normal(scale=0.5, size=(stop - start, dim)).astype(
                    np.float32
                )
                cols = {
                    "Metadata_Plate": pa.array(plate_of[well]),
                    "Metadata_Well": pa.array(well_of[well]),
                    "Metadata_treatment": pa.array(treat_of[well]),
                    "Metadata_CellID": pa.array(np.arange(start, stop)),
                }
                cols.update({n: pa.array(X[:, j]) for j, n in enumerate(names)})
                w.write_table(pa.table(cols, schema=_schema(names)))
    manifest = {"layout": "columns", "features": names, "n_cells": int(n_cells), "heads": {}}
    (folder / K.EMBEDDINGS_MANIFEST).write_text(json.dumps(manifest))
    return manifest


def _schema(names: list[str]):
    import pyarrow as pa

    return pa.schema(
        [
            ("Metadata_Plate", pa.string()),
            ("Metadata_Well", pa.string()),
            ("Metadata_treatment", pa.string()),
            ("Metadata_CellID", pa.int64()),
            *((n, pa.float32()) for n in names),
        ]
    )


def profile_command(inp: Path, out: Path, engine: str, num_cpus: int) -> list[str]:
    """The `raycell profile` command line of one engine (aggregation only)."""
    cmd = [sys.executable, "-m", "raycell", "profile", "--input", str(inp), "--out", str(out)]
    cmd += ["--normalize", "none", "--feature-select", "", "--no-metrics", "--overwrite"]
    cmd += ["--set", f"profile.engine={engine}"]
    if num_cpus:
        cmd += ["--set", f"ray.num_cpus={num_cpus}"]
    return cmd


def compare_profiles(a: Path, b: Path, atol: float = 1e-6) -> float:
    """The largest feature difference between two profile folders; raises when they disagree."""
    import numpy as np
    import pandas as pd

    x = pd.read_parquet(a / "profiles.parquet")
    y = pd.read_parquet(b / "profiles.parquet")
    if list(x.columns) != list(y.columns) or len(x) != len(y):
        raise SystemExit(f"profiles differ in shape: {x.shape} {list(x.columns)[:6]} vs {y.shape}")
    meta = [c for c in x.columns if c.startswith("Metadata_")]
    pd.testing.assert_frame_equal(x[meta], y[meta], check_dtype=False)
    feats = [c for c in x.columns if c not in meta]
    diff = float(np.abs(x[feats].to_numpy(np.float64) - y[feats].to_numpy(np.float64)).max())
    if not diff <= atol:
        raise SystemExit(f"profiles differ: largest feature difference {diff:g} > {atol:g}")
    return diff


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64, help="features per cell")
    ap.add_argument("--plates", type=int, default=4)
    ap.add_argument("--wells", type=int, default=384, help="wells per plate")
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--row-group", type=int, default=50_000, help="rows per parquet row group")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated engines to run")
    ap.add_argument("--num-cpus", type=int, default=0, help="ray.num_cpus (0 = Ray's default)")
    ap.add_argument("--quick", action="store_true", help="20,000 cells, 2 plates x 24 wells")
    ap.add_argument("--work", default="", help="folder for the data and outputs (default: a temp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and outputs")
    ap.add_argument("--out", default=None, help="result JSON (file or folder)")
    args = ap.parse_args(argv)
    if args.quick:
        args.cells, args.plates, args.wells, args.shards = 20_000, 2, 24, 4
        args.row_group = min(args.row_group, 2_000)
    engines = [e for e in args.engines.split(",") if e]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        ap.error(f"--engines: unknown engine {bad[0]!r} (use {', '.join(ENGINES)})")

    from bench_scale import run_stage
    from common import machine, out_path, print_table, write_result

    info = machine()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="raycell_profbench_"))
    try:
        data = work / "cells"
        if (data / "embeddings.json").is_file():
            print(f"reusing {data}", flush=True)
        else:
            print(f"writing {args.cells:,} cells x {args.dim} features -> {data}", flush=True)
            write_cells(
                data, args.cells, args.dim, args.plates, args.wells, args.shards, args.row_group
            )
        data_mb = sum(f.stat().st_size for f in (data / "shards").glob("*.parquet")) / 2**20
        runs = {}
        for engine in engines:
            out = work / f"profile_{engine}"
            print(f"raycell profile, profile.engine={engine} ...", flush=True)
            runs[engine] = run_stage(
                profile_command(data, out, engine, args.num_cpus), work / f"{engine}.log"
            )
        diff = None
        if len(engines) == 2:
            diff = compare_profiles(work / "profile_memory", work / "profile_ray")
        n_profiles = json.loads((work / f"profile_{engines[0]}" / "profile.json").read_text())[
            "n_profiles"
        ]
        rows = [[e, r["seconds"], args.cells / r["seconds"], r["peak_mb"]] for e, r in runs.items()]
        print_table(
            f"raycell profile: {args.cells:,} cells x {args.dim} features -> {n_profiles} wells "
            f"({data_mb:,.0f} MB of parquet)",
            ["engine", "seconds", "cells/s", "peak MB (tree PSS)"],
            rows,
        )
        if diff is not None:
            print(f"profiles agree: largest feature difference {diff:.3g} (<= 1e-6)", flush=True)
        result = {
            "machine": info,
            "cells": args.cells,
            "dim": args.dim,
            "plates": args.plates,
            "wells_per_plate": args.wells,
            "shards": args.shards,
            "row_group": args.row_group,
            "parquet_mb": round(data_mb, 1),
            "n_profiles": n_profiles,
            "runs": runs,
            "max_feature_difference": diff,
        }
        write_result(out_path(args.out, "profile_stream"), result)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
