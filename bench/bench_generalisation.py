r"""Generalisation to imaging conditions never seen: the varied raw test bed, end to end, over seeds.

    python bench/bench_generalisation.py --quick                   # 1 seed, conventional, the default config
    python bench/bench_generalisation.py --seeds 0,1,2 \\
        --models conventional,adversarial,randomeffects,mixedeffects
    python bench/bench_generalisation.py --seeds 0,1,2 --models conventional \\
        --variant default --variant "crop-norm:data.normalize=crop" --variant "augment:train.augment=all"

Per generator seed S, every step is the command a user types (printed, and saved in the JSON):

1. `raycell synth --raw` with seed S: 8 imaging batches, each its own mix of batch-effect mechanisms
   (texture, crosstalk, debris, gamma, vignetting, shot noise on top of gain/offset/illumination/blur/noise),
   the last 2 held out as unseen, each of them one mechanism stronger than in any seen batch;
2. `raycell segmentation-eval` on it: nuclei F1 at IoU 0.5 per batch, raycell's default segmentation and the
   Otsu + watershed baseline (segmentation is the first thing an unseen batch can break);
3. `raycell ingest` (configs/ingest/synthetic_raw.yaml, default segmentation) -> crops with `morph_*` columns;
4. `raycell split`, holding out the generator's suggested unseen batches;
5. `raycell experiment medl` per variant (a name and `--set` overrides; `ingest.*` overrides give the
   variant its own ingest, e.g. `masked:ingest.mask_crops=true`, and `split.*` its own split of a copy of the
   crops, e.g. `select:split.val_batches=[auto:1];train.early_stopping_patience=2`), training seed S, with
   the hand-made-feature baseline row (logistic regression on the `morph_*` columns, same train split).

The table gives, per (variant, model), mean +- s.d. over generator seeds of the unseen-batch and seen test
AUROC and the batch-probe accuracy of the latents, and the baseline row; the segmentation table gives per-seed
per-batch F1. Folders are kept under --work (re-runs skip finished steps: a bed, an ingest, an experiment
row), results go to bench/results/<date>_generalisation[_tag].json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RAYCELL = [sys.executable, "-m", "raycell"]
EXPERIMENT_CONFIG = REPO / "configs" / "experiments" / "medl_small.yaml"
INGEST_CONFIG = REPO / "configs" / "ingest" / "synthetic_raw.yaml"
# The bed: 8 plates (batches) x 16 wells (2 per cell line, so the grouped split has wells of every line in
# every split) x 2 fields of 256 px x ~21 cells = ~5,000 cells, ~20 s to generate and ~1 min to
# ingest on 2 cores.
BED = {
    "synth.n_batches": 8,
    "synth.n_lines": 8,
    "synth.raw_wells": 16,
    "synth.raw_fields": 2,
    "synth.raw_cells_per_fov": 24,
    "synth.raw_fov_size": 256,
    "synth.effects": "varied",
}


def run(cmd: list[str], log: list[str]) -> None:
    """Run one raycell command (printed and logged); a failure stops the benchmark with its output."""
    shown = " ".join(str(c) for c in cmd).replace(sys.executable + " -m raycell", "raycell")
    print(f"$ {shown}", flush=True)
    log.append(shown)
    p = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {shown}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def sets(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out += ["--set", f"{k}={v}"]
    return out


def parse_variant(spec: str) -> tuple[str, dict]:
    """'name' or 'name:key=value;key=value' -> (name, overrides) (';' since values may be lists).

    The key `models` (types joined by '+') sets the variant's model types instead of --models.
    """
    name, _, rest = spec.partition(":")
    over = {}
    for kv in filter(None, (s.strip() for s in rest.split(";"))):
        if "=" not in kv:
            sys.exit(f"--variant {spec!r}: {kv!r} is not key=value")
        k, v = kv.split("=", 1)
        over[k.strip()] = v.strip()
    return name.strip() or "default", over


def make_bed(seed: int, work: Path, log: list[str]) -> dict:
    """Steps 1-2: the raw bed of one seed and its segmentation scores (raycell and Otsu + watershed)."""
    raw = work / f"s{seed}" / "raw"
    if not (raw / "raw.json").is_file():
        run(RAYCELL + ["synth", "--raw", "--out", raw, "--set", f"seed={seed}"] + sets(BED), log)
    seg = {}
    for method in ("raycell", "otsu-watershed"):
        js = work / f"s{seed}" / f"segeval_{method}.json"
        if not js.is_file():
            run(RAYCELL + ["segmentation-eval", raw, "--method", method, "--json", js], log)
        seg[method] = json.loads(js.read_text())
    return {"raw": raw, "info": json.loads((raw / "raw.json").read_text()), "seg": seg}


def make_crops(
    seed: int, work: Path, bed: dict, ingest_over: dict, split_over: dict, tag: str, log: list[str]
) -> Path:
    """Steps 3-4: ingest the bed (default segmentation unless the variant sets ingest.*) and split it.

    A variant with only `split.*` overrides gets a copy of the default crops, split its own way.
    """
    crops = work / f"s{seed}" / f"crops{tag}"
    if not (crops / "dataset.json").is_file():
        if ingest_over or not split_over:
            run(
                RAYCELL
                + [
                    "ingest",
                    "--config",
                    INGEST_CONFIG,
                    "--input",
                    bed["raw"] / "images",
                    "--platemap",
                    bed["raw"] / "platemap.csv",
                    "--out",
                    crops,
                ]
                + sets(ingest_over),
                log,
            )
        else:
            base = make_crops(seed, work, bed, {}, {}, "", log)
            shutil.copytree(base, crops)
            (crops / ".split-pending").write_text("")
    unseen = bed["info"]["suggested_unseen"]
    manifest = json.loads((crops / "dataset.json").read_text())
    if (
        not (manifest.get("counts_per_split") or {}).get("train")
        or (crops / ".split-pending").exists()
    ):
        run(
            RAYCELL
            + [
                "split",
                "--data",
                crops,
                "--set",
                f"seed={seed}",
                "--set",
                f"split.unseen=[{','.join(unseen)}]",
            ]
            + sets(split_over),
            log,
        )
        (crops / ".split-pending").unlink(missing_ok=True)
    return crops


def per_batch_f1(seg: dict) -> dict:
    """{batch: nuclei F1} from a segmentation-eval result (its `per_batch` block)."""
    out = {}
    for b, r in (seg.get("per_batch") or {}).items():
        nuc = r.get("nuclei", r)
        out[b] = float(nuc.get("f1", math.nan))
    return out


def mean_sd(vals: list[float]) -> str:
    v = np.array([x for x in vals if x is not None and math.isfinite(x)], dtype=float)
    if not len(v):
        return "–"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--seeds", default="0,1,2", help="generator (and training) seeds, comma-separated"
    )
    ap.add_argument(
        "--models", default="conventional,mixedeffects", help="model types, comma-separated"
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="name[:key=value;...] (repeatable; default: one variant 'default' with no overrides)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        dest="common",
        help="key=value for every experiment (e.g. train.epochs=4)",
    )
    ap.add_argument(
        "--z-modes", default="", help="experiment --z-modes: extra rows for models using Z"
    )
    ap.add_argument(
        "--work", default="/tmp/raycell_generalisation", help="folder for beds, crops and runs"
    )
    ap.add_argument("--tag", default="", help="suffix of the results files")
    ap.add_argument("--quick", action="store_true", help="seed 0, conventional, default variant")
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds, a.models, a.variant = "0", "conventional", a.variant or []
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    variants = [parse_variant(v) for v in (a.variant or ["default"])]
    common = dict(parse_variant("x:" + ";".join(a.common))[1]) if a.common else {}
    work = Path(a.work).absolute()
    log: list[str] = []
    t0 = time.time()
    rows, seg_rows = [], []
    for seed in seeds:
        bed = make_bed(seed, work, log)
        for method, res in bed["seg"].items():
            f1 = per_batch_f1(res)
            seg_rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "per_batch": f1,
                    "unseen": bed["info"]["suggested_unseen"],
                    "pooled": res.get("nuclei", {}).get("f1", math.nan),
                }
            )
        for name, over in variants:
            ingest_over = {k: v for k, v in over.items() if k.startswith("ingest.")}
            split_over = {k: v for k, v in over.items() if k.startswith("split.")}
            other = {
                **common,
                **{
                    k: v
                    for k, v in over.items()
                    if not k.startswith(("ingest.", "split.")) and k != "models"
                },
            }
            over_models = {name: over["models"].replace("+", ",")} if "models" in over else {}
            # crops keyed by what makes them, so variants with the same ingest/split share one folder
            key = ";".join(f"{k}={v}" for k, v in sorted({**ingest_over, **split_over}.items()))
            tag = "" if not key else "_" + hashlib.sha1(key.encode()).hexdigest()[:8]
            crops = make_crops(seed, work, bed, ingest_over, split_over, tag, log)
            out = work / f"s{seed}" / f"exp_{name}"
            run(
                RAYCELL
                + [
                    "experiment",
                    "medl",
                    "--config",
                    EXPERIMENT_CONFIG,
                    "--set",
                    f"data.path={crops}",
                    "--seeds",
                    str(seed),
                    "--models",
                    over_models.get(name, a.models),
                    "--no-randomized-z",
                    "--out",
                    out,
                ]
                + (["--z-modes", a.z_modes] if a.z_modes else [])
                + sets(other),
                log,
            )
            res = json.loads((out / "results.json").read_text())
            for r in res["rows"]:
                rows.append(
                    {
                        "seed": seed,
                        "variant": name,
                        "overrides": over,
                        "label": r["label"],
                        "seen_auroc": r.get("test", {}).get("auroc"),
                        "unseen_auroc": r.get("unseen", {}).get("auroc"),
                        "batch_probe": r.get("test", {}).get("batch_probe_acc"),
                        "seconds": r.get("seconds"),
                    }
                )
    lines = [
        "| variant | model | seeds | unseen AUROC | seen AUROC | batch-probe acc |",
        "|---|---|---|---|---|---|",
    ]
    keys = []
    for r in rows:
        k = (r["variant"], r["label"])
        if k not in keys:
            keys.append(k)
    for v, m in keys:
        rs = [r for r in rows if (r["variant"], r["label"]) == (v, m)]
        lines.append(
            f"| {v} | {m} | {len(rs)} | {mean_sd([r['unseen_auroc'] for r in rs])} | "
            f"{mean_sd([r['seen_auroc'] for r in rs])} | {mean_sd([r['batch_probe'] for r in rs])} |"
        )
    seg_lines = [
        "| seed | method | per-batch nuclei F1 (unseen marked *) | min | pooled |",
        "|---|---|---|---|---|",
    ]
    for s in seg_rows:
        cells = " ".join(
            f"{b[-2:]}{'*' if b in s['unseen'] else ''}:{f:.2f}" for b, f in s["per_batch"].items()
        )
        mn = min(s["per_batch"].values()) if s["per_batch"] else math.nan
        seg_lines.append(
            f"| {s['seed']} | {s['method']} | {cells} | {mn:.2f} | {s['pooled']:.3f} |"
        )
    table = "\n".join(lines) + "\n\n" + "\n".join(seg_lines) + "\n"
    print(table)
    load = os.getloadavg()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "argv": sys.argv[1:],
        "seeds": seeds,
        "models": a.models,
        "variants": [{"name": n, "overrides": o} for n, o in variants],
        "common": common,
        "bed": BED,
        "rows": rows,
        "segmentation": seg_rows,
        "commands": log,
        "seconds": round(time.time() - t0, 1),
        "loadavg_end": load,
        "table": table,
    }
    res_dir = REPO / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y%m%d") + "_generalisation" + (f"_{a.tag}" if a.tag else "")
    (res_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    (res_dir / f"{stem}.md").write_text(table)
    print(
        f"wrote bench/results/{stem}.json ({result['seconds']:.0f} s; load average {load[0]:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
