"""The command-line parser (and nothing else): one sub-command per pipeline verb.

Every verb takes `--config FILE` and repeatable `--set section.key=value`; its own flags are shortcuts
for config keys (listed in each flag's help) and are applied after `--set`. `raycell.__main__` turns the
parsed arguments into an `ExperimentConfig` and calls the same functions the `jobs/` scripts call.
"""

from __future__ import annotations

import argparse

# flag dest -> config key; a flag left unset does not override anything.
FLAG_KEYS = {
    "synth": {"out": "synth.out", "n_cells": "synth.n_cells", "crop_size": "synth.crop_size",
              "raw": "synth.raw"},
    "ingest": {"input": "ingest.input", "out": "ingest.out", "pattern": "ingest.pattern",
               "platemap": "ingest.platemap", "overwrite": "ingest.overwrite"},
    "infer-z": {"checkpoint": "infer.checkpoint", "data": "infer.data", "out": "infer.z_out"},
    "split": {"data": "data.path", "unseen": "split.unseen", "group_by": "split.group_by"},
    "train": {"data": "data.path", "model": "model.type", "preset": "model.preset", "epochs": "train.epochs",
              "resume": "train.resume", "workers": "scaling.num_workers", "gpu": "scaling.use_gpu",
              "runs_dir": "train.runs_dir"},
    "infer": {"checkpoint": "infer.checkpoint", "data": "infer.data", "out": "infer.out",
              "splits": "infer.splits", "actors": "infer.num_actors", "gpus": "infer.num_gpus"},
    "evaluate": {"predictions": "eval.predictions", "out": "eval.out"},
    "demo": {"out": "demo.out", "models": "demo.models"},
}

EPILOG = """examples:
  raycell demo                                   # synth -> split -> train -> infer -> evaluate
  raycell ingest --config configs/ingest/cellprofiler_example_human.yaml
  raycell import-armed /data/melanoma --out data/melanoma
  raycell infer-z --checkpoint runs/raycell-mixedeffects-20261121-101500
  raycell experiment medl --config configs/experiments/medl_small.yaml --seeds 0,1,2
  raycell synth --out data/synth
  raycell split --data data/synth
  raycell train --data data/synth --model conventional --epochs 6
  raycell train --resume runs/raycell-conventional-20261121-101500
  raycell infer --checkpoint runs/raycell-conventional-20261121-101500 --data data/synth
  raycell evaluate --predictions runs/raycell-conventional-20261121-101500/predictions
  raycell config --defaults > my.yaml             # every key with its default
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (see configs/)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--address", help="Ray cluster address: host:port, ray://host:port or auto (sets "
                   "ray.address; default: local Ray or RAY_ADDRESS); nothing answering there is an error "
                   "after ray.connect_timeout_s (5 s)")


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def build_parser() -> argparse.ArgumentParser:
    """The `raycell` argument parser."""
    p = argparse.ArgumentParser(
        prog="raycell", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Batch-robust single-cell image representations (ARMED/MEDL autoencoder-classifiers) "
                    "on Ray: synthetic data, splits, distributed training, batch inference, evaluation.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("synth", help="generate the synthetic data set (crop shards with known truth)")
    _common(s)
    s.add_argument("--out", help="output folder (synth.out)")
    s.add_argument("--n-cells", type=int, help="number of cells (synth.n_cells)")
    s.add_argument("--crop-size", type=int, help="crop size in pixels (synth.crop_size)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier raycell output in --out (a "
                   "folder of other files, or one holding the inputs, is always refused)")
    s.add_argument("--raw", action="store_const", const=True, help="write raw fields of view (TIFFs, true "
                   "masks, plate map) for `raycell ingest` instead of crops (synth.raw)")

    s = sub.add_parser("ingest", help="raw images (TIFF/PNG) -> segmentation -> crop shards + rejects table")
    _common(s)
    s.add_argument("--input", help="folder of images (ingest.input)")
    s.add_argument("--out", help="output data set folder (ingest.out)")
    s.add_argument("--pattern", help="regex with named groups matched on relative paths (ingest.pattern)")
    s.add_argument("--platemap", help="plate-map CSV (ingest.platemap)")
    s.add_argument("--overwrite", action="store_const", const=True, help="replace a raycell data set made "
                   "from other inputs or parameters (ingest.overwrite); a folder of other files, or one "
                   "holding the inputs, is always refused")

    s = sub.add_parser("segmentation-eval", help="score the segmentation on synthetic raw fields of view "
                       "against their true masks (precision, recall, F1 at IoU 0.5)")
    s.add_argument("raw_dir", help="folder written by `raycell synth --raw`")
    s.add_argument("--iou", type=float, default=0.5, help="IoU for a match (default 0.5)")

    s = sub.add_parser("import-armed", help="ARMED data_*.npz + data_*.csv -> crop shards (date = batch)")
    s.add_argument("src", help="folder with data_{train,val,test,unseen}.npz and .csv (or one .npz)")
    s.add_argument("--out", required=True, help="output data set folder")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier raycell output in --out (a "
                   "folder of other files, or one holding the inputs, is always refused)")

    s = sub.add_parser("split", help="assign train/val/test (grouped, stratified) and hold out unseen batches")
    _common(s)
    s.add_argument("--data", help="data set folder (data.path)")
    s.add_argument("--unseen", type=_csv, help="comma-separated batches to hold out (split.unseen)")
    s.add_argument("--group-by", help="column kept within one split (split.group_by)")

    s = sub.add_parser("train", help="train a model with Ray Train (checkpoints every epoch)")
    _common(s)
    s.add_argument("--data", help="data set folder (data.path)")
    s.add_argument("--model", help="model type (model.type); see `raycell models`")
    s.add_argument("--preset", help="model size preset (model.preset): small | armed | tiny")
    s.add_argument("--epochs", type=int, help="epochs (train.epochs)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint "
                   "(train.resume). The run's recorded config.yaml is used (data, model, loss, ...); only "
                   "--epochs (to extend it), --workers, --gpu, --address, train.max_failures, "
                   "train.checkpoints_to_keep, train.log_every, train.torch_threads, ray.* and scaling.* "
                   "may change, name, --runs-dir and sections training does not read are ignored, and any other "
                   "option that differs from the run's is refused")
    s.add_argument("--workers", type=int, help="Ray Train workers (scaling.num_workers)")
    s.add_argument("--gpu", action="store_const", const=True, help="one GPU per worker (scaling.use_gpu)")
    s.add_argument("--runs-dir", help="folder for run folders (train.runs_dir)")

    s = sub.add_parser("infer", help="batch inference with Ray Data: latents and predictions to parquet")
    _common(s)
    s.add_argument("--checkpoint", help="checkpoint or run folder (infer.checkpoint)")
    s.add_argument("--data", help="data set folder (infer.data; default data.path)")
    s.add_argument("--out", help="output folder (infer.out; default <run>/predictions)")
    s.add_argument("--splits", type=_csv, help="comma-separated splits (infer.splits; default all)")
    s.add_argument("--actors", type=int, help="model replicas (infer.num_actors)")
    s.add_argument("--gpus", type=float, help="GPUs per actor (infer.num_gpus)")

    s = sub.add_parser("infer-z", help="train the Z-predictor on seen batches; write soft Z for unseen cells")
    _common(s)
    s.add_argument("--checkpoint", help="run of the random/mixed-effects model the Z is for (infer.checkpoint)")
    s.add_argument("--data", help="data set folder (infer.data; default data.path)")
    s.add_argument("--out", help="output folder (infer.z_out)")

    s = sub.add_parser("evaluate", help="metrics per split from inference outputs (JSON, CSV, table)")
    _common(s)
    s.add_argument("--predictions", help="predictions folder (eval.predictions)")
    s.add_argument("--out", help="output folder (eval.out)")

    s = sub.add_parser("demo", help="synth -> split -> train -> infer -> evaluate on local Ray")
    _common(s)
    s.add_argument("--out", help="output folder (demo.out)")
    s.add_argument("--models", type=_csv, help="comma-separated model types (demo.models)")

    s = sub.add_parser("experiment", help="multi-model, multi-seed experiments (`experiment medl`)")
    s.add_argument("which", choices=["medl"], help="medl: conventional vs adversarial vs random/mixed "
                   "effects (+ randomized Z), seen test vs unseen batches")
    _common(s)
    s.add_argument("--seeds", type=_csv, default=["0", "1", "2"], help="comma-separated integer seeds "
                   "(default 0,1,2)")
    s.add_argument("--models", type=_csv, default=None, help="comma-separated model types (default: conventional, adversarial, randomeffects, "
                   "mixedeffects, mixedeffects_randz = mixed effects with randomized Z at inference)")
    s.add_argument("--out", default="runs/medl", help="output folder for table.md/csv and results.json")

    s = sub.add_parser("models", help="list the registered model types")
    s = sub.add_parser("config", help="print the resolved config (or every key with --defaults)")
    _common(s)
    s.add_argument("--defaults", action="store_true", help="print every key with its default and help")
    return p


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """`--set` values followed by the verb's shortcut flags as `key=value` strings."""
    import json

    out = list(getattr(args, "overrides", []) or [])
    if getattr(args, "address", None):
        out.append(f"ray.address={args.address}")
    for dest, key in FLAG_KEYS.get(args.command, {}).items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        # JSON is valid YAML: lists, bools and numbers keep their types; strings are quoted safely.
        out.append(f"{key}={json.dumps(v)}")
    return out
