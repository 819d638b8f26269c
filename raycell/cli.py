"""The command-line parser (and nothing else): one sub-command per pipeline verb.

Every verb takes `--config FILE` and repeatable `--set section.key=value`; its own flags are shortcuts
for config keys, each declared once with its key (`_flag`, named in the flag's help), applied after
`--set`. `raycell.__main__` turns the parsed arguments into an `ExperimentConfig` (`config_overrides`)
and calls the same functions the `jobs/` scripts call.
"""

from __future__ import annotations

import argparse

from raycell.constants import FEATURE_SETS, NORMALIZATIONS, Z_MODES

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
  raycell tune --config configs/tune/adversarial_small.yaml
  raycell infer --checkpoint runs/raycell-conventional-20261121-101500 --data data/synth
  raycell evaluate --predictions runs/raycell-conventional-20261121-101500/predictions
  raycell synth --design timedose --out data/timedose && raycell split --data data/timedose
  raycell train --config configs/profiling/timedose_resnet18.yaml
  raycell embed --checkpoint runs/profiling-timm-20261201-101500 --data data/timedose
  raycell export --embeddings runs/profiling-timm-20261201-101500/embeddings --out cells.h5ad
  raycell report runs/profiling-timm-20261201-101500/embeddings   # -> .../report/report.html
  raycell profile --input wells.csv --out runs/prof --controls "Metadata_x == 'DMSO'" --treatment Metadata_x
  raycell config --defaults > my.yaml             # every key with its default
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (see configs/)")
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=2 (repeatable)",
    )
    p.add_argument(
        "--address",
        help="Ray cluster address: host:port, ray://host:port or auto (sets "
        "ray.address; default: local Ray or RAY_ADDRESS); nothing answering there is an error "
        "after ray.connect_timeout_s (5 s)",
    )
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show Ray's own output (workers, Ray Data, "
        "Ray Train) on the terminal (sets ray.verbose; default: Ray's log folder, named in the run "
        "folder's ray_logs.txt)",
    )


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _flag(p: argparse.ArgumentParser, name: str, *, key: str, help: str, **kw) -> None:  # noqa: A002
    """Add a shortcut flag for the config key `key`: its only declaration, so flag and key cannot drift.

    `help` names the key through `{key}`; the verb's parser records `dest -> (key, flag)` in its defaults,
    which `config_overrides` reads back from the parsed namespace.
    """
    action = p.add_argument(name, help=help.format(key=key), **kw)
    p.set_defaults(flag_keys={**(p.get_default("flag_keys") or {}), action.dest: (key, name)})


def build_parser() -> argparse.ArgumentParser:
    """The `raycell` argument parser."""
    p = argparse.ArgumentParser(
        prog="raycell",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Batch-robust single-cell image representations (ARMED/MEDL autoencoder-classifiers) "
        "on Ray: synthetic data, splits, distributed training, batch inference, evaluation.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser(
        "synth", help="generate the synthetic data set (crop shards with known truth)"
    )
    _common(s)
    _flag(s, "--out", key="synth.out", help="output folder ({key})")
    _flag(s, "--n-cells", key="synth.n_cells", type=int, help="number of cells ({key})")
    _flag(s, "--crop-size", key="synth.crop_size", type=int, help="crop size in pixels ({key})")
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier raycell output in --out (a "
        "folder of other files, or one holding the inputs, is always refused)",
    )
    _flag(
        s,
        "--raw",
        key="synth.raw",
        action="store_const",
        const=True,
        help="write raw fields of view "
        "(TIFFs, true masks, plate map) for `raycell ingest` instead of crops ({key})",
    )
    _flag(
        s,
        "--design",
        key="synth.design",
        choices=["phenotype", "timedose"],
        help="phenotype (confounded cell lines) or timedose (a time x dose treatment design for "
        "weak-label profiling) ({key})",
    )

    s = sub.add_parser(
        "ingest", help="raw images (TIFF/PNG) -> segmentation -> crop shards + rejects table"
    )
    _common(s)
    _flag(s, "--input", key="ingest.input", help="folder of images ({key})")
    _flag(s, "--out", key="ingest.out", help="output data set folder ({key})")
    _flag(
        s,
        "--pattern",
        key="ingest.pattern",
        help="regex with named groups matched on relative paths ({key})",
    )
    _flag(s, "--platemap", key="ingest.platemap", help="plate-map CSV ({key})")
    _flag(
        s,
        "--preset",
        key="ingest.preset",
        help="instrument file naming instead of --pattern: "
        "phenix, operetta, imagexpress, cellinsight, arrayscan, cellprofiler, jump, ome-zarr ({key})",
    )
    _flag(
        s,
        "--load-data",
        key="ingest.load_data",
        help="CellProfiler/JUMP load-data CSV or folder of "
        "load_data*.csv listing each field's files, instead of --pattern ({key})",
    )
    _flag(
        s,
        "--masks",
        key="ingest.masks",
        help="folder of instance masks per field, used instead of "
        "segmenting (cellpose's <image>_cp_masks.png found by name; else --set "
        "ingest.masks_pattern=REGEX) ({key})",
    )
    _flag(
        s,
        "--cell-masks",
        key="ingest.cell_masks",
        help="folder of cell-body masks, with --masks as the nuclei ({key})",
    )
    _flag(
        s,
        "--objects",
        key="ingest.objects",
        help="CSV/parquet table of object centres used instead "
        "of segmenting: CellProfiler's Nuclei.csv (with --objects-images) or any table with the "
        "fields' metadata and x/y columns ({key})",
    )
    _flag(
        s,
        "--objects-images",
        key="ingest.objects_images",
        help="CellProfiler's Image.csv for "
        "--objects (ImageNumber -> field by FileName_<channel> or Metadata_ columns) ({key})",
    )
    _flag(
        s,
        "--overwrite",
        key="ingest.overwrite",
        action="store_const",
        const=True,
        help="replace a raycell data set made from other inputs or parameters ({key}); a folder of "
        "other files, or one holding the inputs, is always refused",
    )

    s = sub.add_parser(
        "segmentation-eval",
        help="score raycell's segmentation against true instance masks "
        "(precision, recall, F1 at IoU 0.5): a `raycell synth --raw` folder, or any "
        "images + masks (--images, --masks), per plate/batch group",
    )
    s.add_argument(
        "raw_dir",
        nargs="?",
        default="",
        help="folder written by `raycell synth --raw` (or give --images and --masks)",
    )
    s.add_argument(
        "--images", default="", help="glob or folder of images, e.g. 'data/**/*_img.tif'"
    )
    s.add_argument(
        "--masks",
        default="",
        help="glob or folder of instance masks (0 = background; a "
        "binary mask is split into connected components)",
    )
    s.add_argument(
        "--pair-regex",
        default="",
        help="regex searched in each path; its (?P<key>...) group "
        "pairs an image with its mask (default: the file stem, mask suffixes such as "
        "_masks removed)",
    )
    s.add_argument(
        "--group-by",
        default="",
        help="report per group: a named group of --pair-regex "
        "(e.g. plate) or 'parent' (the image's folder)",
    )
    s.add_argument(
        "--channel", type=int, default=0, help="channel of multi-channel images to segment"
    )
    s.add_argument(
        "--method",
        choices=("raycell", "otsu-watershed"),
        default="raycell",
        help="raycell's segmentation or the plain Otsu + watershed baseline (nuclei only with "
        "RAW_DIR)",
    )
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ingest.KEY=VALUE",
        help="segmentation parameters, e.g. --set ingest.diameter=18",
    )
    s.add_argument(
        "--json", default="", help="also write the full result (with per-image rows) here"
    )
    s.add_argument("--iou", type=float, default=0.5, help="IoU for a match (default 0.5)")
    s.add_argument(
        "--perturb",
        action="store_true",
        help="images without masks (--images only): segment "
        "each image clean (pseudo ground truth), apply each simulated plate effect alone (texture, "
        "crosstalk, debris, gamma, vignetting, shot noise) at the seen range's ends and the unseen "
        "extreme, segment again and report F1 at IoU 0.5 against the clean objects, for raycell and "
        "the Otsu + watershed baseline",
    )
    s.add_argument(
        "--crosstalk-from",
        default="",
        metavar="INDEX|OLD=NEW",
        help="--perturb: where crosstalk "
        "bleeds from: a channel index of the same file, or OLD=NEW naming the other channel's file "
        "(e.g. d0.tif=d2.tif); without it crosstalk is skipped",
    )
    s.add_argument(
        "--effects",
        type=_csv,
        default=None,
        help="--perturb: comma-separated mechanisms (default: all)",
    )
    s.add_argument(
        "--levels", type=_csv, default=None, help="--perturb: seen-low,seen-high,unseen (default)"
    )
    s.add_argument(
        "--seeds",
        type=_csv,
        default=["0", "1", "2"],
        help="--perturb: random seeds (default 0,1,2)",
    )
    s.add_argument(
        "--unseen-extreme",
        type=float,
        default=2.5,
        help="--perturb: the unseen level's factor over the seen range's high end (default 2.5)",
    )
    s.add_argument(
        "--out", default="", help="--perturb: folder for robustness.json and robustness.md"
    )

    s = sub.add_parser(
        "import-armed", help="ARMED data_*.npz + data_*.csv -> crop shards (date = batch)"
    )
    s.add_argument(
        "src", help="folder with data_{train,val,test,unseen}.npz and .csv (or one .npz)"
    )
    s.add_argument("--out", required=True, help="output data set folder")
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier raycell output in --out (a "
        "folder of other files, or one holding the inputs, is always refused)",
    )

    s = sub.add_parser(
        "split", help="assign train/val/test (grouped, stratified) and hold out unseen batches"
    )
    _common(s)
    _flag(s, "--data", key="data.path", help="data set folder ({key})")
    _flag(
        s,
        "--unseen",
        key="split.unseen",
        type=_csv,
        help="comma-separated batches to hold out ({key})",
    )
    _flag(s, "--group-by", key="split.group_by", help="column kept within one split ({key})")
    _flag(
        s,
        "--val-batches",
        key="split.val_batches",
        type=_csv,
        help="comma-separated seen batches held "
        "out whole as split 'valbatch' for cross-batch model selection, or auto:N ({key})",
    )

    s = sub.add_parser("train", help="train a model with Ray Train (checkpoints every epoch)")
    _common(s)
    _flag(s, "--data", key="data.path", help="data set folder ({key})")
    _flag(s, "--model", key="model.type", help="model type ({key}); see `raycell models`")
    _flag(s, "--preset", key="model.preset", help="model size preset ({key}): small | armed | tiny")
    _flag(s, "--epochs", key="train.epochs", type=int, help="epochs ({key})")
    _flag(
        s,
        "--resume",
        key="train.resume",
        metavar="RUN_DIR",
        help="continue a run from its latest checkpoint ({key}). The run's recorded config.yaml is used "
        "(data, model, loss, ...); only --epochs (to extend it), --workers, --gpu, --address, "
        "train.max_failures, train.checkpoints_to_keep, train.log_every, train.torch_threads, ray.* "
        "and scaling.* may change, name, --runs-dir and sections training does not read are "
        "ignored, and any other option that differs from the run's is refused",
    )
    _flag(s, "--workers", key="scaling.num_workers", type=int, help="Ray Train workers ({key})")
    _flag(
        s,
        "--gpu",
        key="scaling.use_gpu",
        action="store_const",
        const=True,
        help="one GPU per worker ({key})",
    )
    _flag(s, "--runs-dir", key="train.runs_dir", help="folder for run folders ({key})")

    s = sub.add_parser(
        "tune",
        help="Ray Tune search over config keys (tune.space): Optuna + ASHA, one "
        "Ray Train run per trial; writes trials.csv, best.yaml, tune_objective.png",
        description="Search the keys of tune.space (e.g. loss.adv, loss.cls, train.lr, "
        "model.args.latent_dim; distributions loguniform, uniform, randint, choice) with "
        "Optuna, ASHA stopping poor trials after tune.grace_period epochs. Every trial fits "
        "a TorchTrainer for up to train.epochs. In tune.out: trials.csv, best.yaml (`raycell "
        "train --config best.yaml` reproduces the best trial's best epoch), best (that "
        "epoch's checkpoint, for `raycell infer --checkpoint`) and tune_objective.png. "
        "See docs/tune.md.",
    )
    _common(s)
    _flag(s, "--data", key="data.path", help="data set folder ({key})")
    _flag(s, "--model", key="model.type", help="model type ({key}); see `raycell models`")
    _flag(
        s,
        "--epochs",
        key="train.epochs",
        type=int,
        help="epochs per trial at most ({key}; ASHA's max_t)",
    )
    _flag(s, "--samples", key="tune.num_samples", type=int, help="trials ({key})")
    _flag(
        s,
        "--concurrent",
        key="tune.max_concurrent_trials",
        type=int,
        help="trials at once ({key}; 0 = as many as the cluster fits)",
    )
    _flag(
        s,
        "--metric",
        key="tune.metric",
        help="objective reported by the loop ({key}, e.g. val_auroc)",
    )
    _flag(
        s,
        "--mode",
        key="tune.mode",
        choices=["max", "min"],
        help="max or min the objective ({key})",
    )
    _flag(
        s,
        "--select",
        key="tune.select",
        choices=["budget", "best_epoch"],
        help="which trials compete for best.yaml ({key}): budget = only those that ran the most epochs, "
        "best_epoch = all; each at its best epoch",
    )
    _flag(s, "--out", key="tune.out", help="search folder ({key})")
    _flag(
        s,
        "--resume",
        key="tune.resume",
        metavar="SEARCH_DIR",
        help="continue an interrupted search ({key}): its recorded config.yaml is used; finished trials "
        "are kept, unfinished ones continue from their last checkpoint; only ray.* may change",
    )

    s = sub.add_parser(
        "infer", help="batch inference with Ray Data: latents and predictions to parquet"
    )
    _common(s)
    _flag(s, "--checkpoint", key="infer.checkpoint", help="checkpoint or run folder ({key})")
    _flag(s, "--data", key="infer.data", help="data set folder ({key}; default data.path)")
    _flag(s, "--out", key="infer.out", help="output folder ({key}; default <run>/predictions)")
    _flag(
        s,
        "--splits",
        key="infer.splits",
        type=_csv,
        help="comma-separated splits ({key}; default all)",
    )
    _flag(s, "--actors", key="infer.num_actors", type=int, help="model replicas ({key})")
    _flag(s, "--gpus", key="infer.num_gpus", type=float, help="GPUs per actor ({key})")

    s = sub.add_parser(
        "embed",
        help="embeddings of any checkpoint (AEC latent or timm features) over crop "
        "shards, in the profiling layout (Metadata_* columns, then features) + well profiles",
        description="Runs the checkpoint over the data set with Ray Data (an actor pool; GPU "
        "actors with --gpus) and writes <out>/shards/part-*.parquet in the layout CytoTable, "
        "pycytominer and copairs read (Metadata_Plate, Metadata_Well, Metadata_Site, "
        "Metadata_ObjectNumber, Metadata_<column>, morph_*, Pred_<head>, Prob_<head>, "
        "Cells_Embedding_XXXX), embeddings.json and well_profiles.parquet (medians per well). "
        "Atomic and resumable like infer: a re-run skips finished shards.",
    )
    _common(s)
    _flag(s, "--checkpoint", key="infer.checkpoint", help="checkpoint or run folder ({key})")
    _flag(s, "--data", key="infer.data", help="data set folder ({key}; default data.path)")
    _flag(s, "--out", key="embed.out", help="output folder ({key}; default <run>/embeddings)")
    _flag(
        s,
        "--layout",
        key="embed.layout",
        choices=["columns", "list"],
        help="features as columns or one list column ({key})",
    )
    _flag(
        s,
        "--splits",
        key="infer.splits",
        type=_csv,
        help="comma-separated splits ({key}; default all)",
    )
    _flag(s, "--actors", key="infer.num_actors", type=int, help="model replicas ({key})")
    _flag(s, "--gpus", key="infer.num_gpus", type=float, help="GPUs per actor ({key})")

    s = sub.add_parser(
        "export",
        help="embeddings -> AnnData .h5ad (scanpy) or the CytoTable/pycytominer "
        "layout (parquet/csv), per cell or per well",
        description="h5ad: X = the embedding features, obs = every metadata column, obsm = "
        "X_pca (standardised), Prob_<head> and with --umap X_umap, uns = the embeddings "
        "manifest. parquet/csv: Metadata_* columns first, then Cells_Embedding_XXXX features.",
    )
    _common(s)
    _flag(
        s,
        "--embeddings",
        key="export.embeddings",
        help="embeddings folder from `raycell embed` ({key})",
    )
    _flag(s, "--out", key="export.out", help="output file ({key})")
    _flag(
        s,
        "--format",
        key="export.format",
        choices=["h5ad", "parquet", "csv"],
        help="file format ({key})",
    )
    _flag(
        s,
        "--level",
        key="export.level",
        choices=["cell", "well"],
        help="one row per cell or well ({key})",
    )
    _flag(
        s,
        "--top-k",
        key="export.top_k",
        type=int,
        help="keep the k highest-variance features after dropping constant ones ({key}; 0 = all)",
    )
    _flag(
        s,
        "--with-morph",
        key="export.with_morph",
        action="store_const",
        const=True,
        help="add the morph_* shape features, standardised ({key})",
    )
    _flag(
        s,
        "--umap",
        key="export.umap",
        action="store_const",
        const=True,
        help="also write UMAP coordinates to obsm['X_umap'] (h5ad; {key})",
    )
    _flag(
        s,
        "--overwrite",
        key="export.overwrite",
        action="store_const",
        const=True,
        help="replace an earlier raycell export at --out ({key}); any other file is always refused",
    )

    s = sub.add_parser(
        "profile",
        help="features (embeddings folder or CytoTable-layout table) -> well "
        "profiles normalised per plate against controls, feature-selected (pycytominer), "
        "+ copairs retrieval metrics (activity / consistency mAP, percent replicating)",
        description="Aggregates per-cell rows to wells (median/mean), normalises each plate "
        "against its control wells (profile.controls, a pandas query; mad_robustize by "
        "default), selects features and optionally spheres, all with pycytominer; then "
        "scores the profiles with copairs: mAP of each treatment's replicates against the "
        "controls with permutation p-values (retrieved = BH-corrected p < profile.fdr), "
        "consistency mAP per annotation column and percent replicating. Writes "
        "profiles.parquet, consensus.parquet, activity_map.csv, consistency_<col>.csv, "
        "retrieval.json and profile.json into --out (atomically). See docs/profiling.md.",
    )
    _common(s)
    _flag(s, "--input", key="profile.input", help="embeddings folder or parquet/CSV table ({key})")
    _flag(s, "--out", key="profile.out", help="output folder ({key})")
    _flag(
        s,
        "--features",
        key="profile.features",
        choices=FEATURE_SETS,
        help="embeddings folder: which features ({key})",
    )
    _flag(
        s,
        "--controls",
        key="profile.controls",
        help="pandas query of the control wells, e.g. \"Metadata_compound == 'DMSO'\" ({key})",
    )
    _flag(
        s,
        "--normalize",
        key="profile.normalize",
        choices=NORMALIZATIONS,
        help="per-plate method ({key})",
    )
    _flag(
        s,
        "--feature-select",
        key="profile.feature_select",
        type=_csv,
        help="comma-separated pycytominer operations, '' for none ({key})",
    )
    _flag(
        s,
        "--sphere",
        key="profile.sphere",
        action="store_const",
        const=True,
        help="ZCA-cor sphering on the controls ({key})",
    )
    _flag(
        s,
        "--treatment",
        key="profile.treatment",
        type=_csv,
        help="comma-separated treatment column(s) ({key})",
    )
    _flag(
        s,
        "--annotations",
        key="profile.annotations",
        type=_csv,
        help="comma-separated columns for consistency mAP ({key})",
    )
    _flag(
        s,
        "--where",
        key="profile.where",
        help="pandas query keeping only these input rows, e.g. "
        "\"Metadata_Split == 'unseen'\" ({key})",
    )
    _flag(
        s,
        "--compare",
        key="profile.compare",
        type=_csv,
        help="comma-separated batch corrections "
        "to compare on the same wells: raw, control, harmony, control+harmony ({key})",
    )
    _flag(
        s,
        "--compare-features",
        key="profile.compare_features",
        type=_csv,
        help="comma-separated feature sets in the comparison: embedding, morph, all, "
        "handmade, cpmeasure ({key})",
    )
    _flag(
        s,
        "--no-metrics",
        key="profile.metrics",
        action="store_const",
        const=False,
        help="profiles only, no retrieval metrics ({key})",
    )
    _flag(
        s,
        "--overwrite",
        key="profile.overwrite",
        action="store_const",
        const=True,
        help="replace an earlier profile folder in --out ({key})",
    )

    s = sub.add_parser(
        "report",
        help="one self-contained HTML page (figures embedded, no network) and its "
        "PNGs for a run, demo, experiment, tune or embeddings folder",
    )
    _common(s)
    _flag(s, "folder", key="report.folder", nargs="?", help="the folder to report on ({key})")
    _flag(s, "--out", key="report.out", help="report folder ({key}; default FOLDER/report)")
    _flag(s, "--max-cells", key="report.max_cells", type=int, help="cells per scatter plot ({key})")

    s = sub.add_parser(
        "infer-z", help="train the Z-predictor on seen batches; write soft Z for unseen cells"
    )
    _common(s)
    _flag(
        s,
        "--checkpoint",
        key="infer.checkpoint",
        help="run of the random/mixed-effects model the Z is for ({key})",
    )
    _flag(s, "--data", key="infer.data", help="data set folder ({key}; default data.path)")
    _flag(s, "--out", key="infer.z_out", help="output folder ({key})")
    _flag(
        s,
        "--z-mode",
        key="infer.z_mode",
        choices=list(Z_MODES),
        help="Z for unseen cells ({key}): the Z-predictor's softmax, a label-balanced Z-predictor, "
        "uniform 1/n_seen_batches, or zero (random effects at their prior mean)",
    )

    s = sub.add_parser(
        "evaluate", help="metrics per split from inference outputs (JSON, CSV, table)"
    )
    _common(s)
    _flag(s, "--predictions", key="eval.predictions", help="predictions folder ({key})")
    _flag(s, "--out", key="eval.out", help="output folder ({key})")
    _flag(
        s,
        "--baseline",
        key="eval.baseline",
        action="store_const",
        const=True,
        help="also score a logistic regression on hand-made features of the data set ({key})",
    )
    _flag(
        s,
        "--profiles",
        key="eval.profiles",
        help="instead: copairs retrieval metrics of a profile "
        "folder or well-profile table as given, into --out; pairing from profile.treatment, "
        "profile.controls, profile.annotations ({key})",
    )

    s = sub.add_parser("demo", help="synth -> split -> train -> infer -> evaluate on local Ray")
    _common(s)
    _flag(s, "--out", key="demo.out", help="output folder ({key})")
    _flag(s, "--models", key="demo.models", type=_csv, help="comma-separated model types ({key})")

    s = sub.add_parser("experiment", help="multi-model, multi-seed experiments (`experiment medl`)")
    s.add_argument(
        "which",
        choices=["medl"],
        help="medl: conventional vs adversarial vs random/mixed "
        "effects (+ randomized Z), seen test vs unseen batches",
    )
    _common(s)
    s.add_argument(
        "--seeds",
        type=_csv,
        default=["0", "1", "2"],
        help="comma-separated integer seeds (default 0,1,2)",
    )
    s.add_argument(
        "--models",
        type=_csv,
        default=None,
        help="comma-separated registered model types "
        "(default: conventional, adversarial, randomeffects, mixedeffects)",
    )
    s.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add rows per seed for a logistic regression on hand-made features (the morph_* "
        "columns, and those plus the crops' intensity and texture; without morph_* columns, "
        "features computed from the crops; eval.baseline_features picks one set), trained on "
        "the same train split (default: on)",
    )
    s.add_argument(
        "--tune",
        action="store_true",
        help="first search each model type's own loss weights "
        "(loss.cls, loss.adv, loss.cluster_latent as its objective has them) with `raycell tune` "
        "on held-out seen batches, and add a '<model> (tuned)' row trained with the chosen "
        "weights; the table notes them",
    )
    s.add_argument(
        "--tune-samples", type=int, default=6, help="trials per model type's search (default 6)"
    )
    s.add_argument(
        "--tune-folds",
        type=int,
        default=3,
        help="cross-batch folds per trial (tune.folds; "
        "0 = the data set's valbatch split, or val_auroc) (default 3)",
    )
    s.add_argument(
        "--randomized-z",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also infer each trained model whose type uses Z (randomeffects, mixedeffects) "
        "with a random one-hot Z row per cell (infer.randomize_z, the reference's ablation): "
        "one more row, '<model> + randomized Z', from the same checkpoint (default: on)",
    )
    _flag(
        s,
        "--z-mode",
        key="infer.z_mode",
        choices=list(Z_MODES),
        help="Z for unseen cells of random/mixed-effects models ({key}): the Z-predictor's softmax, a "
        "label-balanced Z-predictor, uniform 1/n_seen_batches, or zero (random effects at their prior "
        "mean)",
    )
    s.add_argument(
        "--z-modes",
        type=_csv,
        default=None,
        help="also infer each trained model whose type "
        "uses Z with the unseen cells' Z made in each of these modes (comma-separated: predicted, "
        "balanced, uniform, zero): one more row each, '<model> (Z <mode>)', from the same "
        "checkpoint",
    )
    s.add_argument(
        "--out", default="runs/medl", help="output folder for table.md/csv and results.json"
    )

    s = sub.add_parser("models", help="list the registered model types")
    s = sub.add_parser(
        "check-cluster",
        help="check cluster configs offline (no cloud, no Kubernetes, no Ray "
        "started): Ray cluster-launcher YAMLs and KubeRay RayJob manifests",
        description="Validate each file against the schema Ray ships (cluster launcher) or the "
        "KubeRay RayJob fields (raycell/cluster_schemas/rayjob-crd-schema.yaml, shipped with "
        "raycell), plus raycell's own expectations (the pinned Ray version, a CPU-0 head, worker "
        "bounds, shared storage). The first problem is one line naming the file and the key.",
    )
    s.add_argument("files", nargs="+", metavar="FILE", help="e.g. cluster.yaml k8s/rayjob.yaml")
    s = sub.add_parser("config", help="print the resolved config (or every key with --defaults)")
    _common(s)
    s.add_argument(
        "--defaults", action="store_true", help="print every key with its default and help"
    )
    return p


def config_overrides(args: argparse.Namespace) -> list[tuple[str, str]]:
    """`(key=value, source)` pairs: `--set` values, then `--address`, then the verb's shortcut flags.

    `source` is what the user typed (`--set train.epochs=0`, `--epochs 0`), so that a bad value's error
    names it; a flag left unset overrides nothing.
    """
    import json

    out = [(ov, f"--set {ov}") for ov in getattr(args, "overrides", None) or []]
    if getattr(args, "address", None):
        out.append((f"ray.address={args.address}", f"--address {args.address}"))
    if getattr(args, "verbose", False):
        out.append(("ray.verbose=true", "--verbose"))
    for dest, (key, flag) in (getattr(args, "flag_keys", None) or {}).items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        shown = ",".join(v) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else v
        typed = flag if v is True else f"{flag} {shown}"
        # JSON is valid YAML: lists, bools and numbers keep their types; strings are quoted safely.
        out.append((f"{key}={json.dumps(v)}", typed))
    return out


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """`--set` values followed by the verb's shortcut flags as `key=value` strings."""
    return [ov for ov, _ in config_overrides(args)]
