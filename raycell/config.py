"""Typed configuration: nested dataclasses, YAML files and dotted `--set section.key=value` overrides.

One `ExperimentConfig` drives every verb (CLI, Python and `jobs/`). Unknown keys are errors that list
the valid keys. Each key's own rules are declared with its field and checked here, once, for every
key: its type (a `Literal[...]` type lists the choices; `LocalPath` and the other `Annotated` types
carry a value check), and its bounds (`_f(..., ge=, gt=, le=)`). Only checks that relate several keys
are written out, in `ExperimentConfig.validate`. Every field carries a `help` string so
`raycell config --defaults` prints a commented YAML of all keys (that is `configs/base.yaml`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from raycell.constants import (
    CORRECTIONS,
    DEFAULT_NORMALIZE,
    FEATURE_SETS,
    SELECTIONS,
    Aggregation,
    BaselineFeatures,
    ConsistencyLevel,
    ModelPreset,
    NormalizeMode,
    ParquetReader,
    ProfileDistance,
    ProfileEngine,
    ProfileFeatures,
    ProfileNormalization,
    ZMode,
)
from raycell.errors import (
    ConfigError,  # noqa: F401  (raised here; defined low so every layer can raise it)
)


def _f(
    default: Any,
    help: str,  # noqa: A002 - "help" reads best in the field declarations
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    must: str = "",
) -> Any:
    """Declare a field with a default, a help string and the bounds of its value.

    Mutable defaults are copied per instance. `ge` / `gt` / `le`: the value must be >= / > / <= these;
    `must` words the bound in the error where the plain one would not say what the values mean.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    meta = {"help": help, **bounds, **({"must": must} if must else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _posix_path(key: str, value: str) -> None:
    """URIs (s3://, gs://) are refused with a clear message until they are supported."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        raise ConfigError(
            f"{key}: {value!r} is a URI; raycell reads and writes POSIX paths only for "
            "now: mount the bucket on every node (e.g. mountpoint-s3, gcsfuse, a "
            "PersistentVolume) and give the mounted path"
        )


def _three_fractions(key: str, value: list) -> None:
    if (
        len(value) != 3
        or any(not isinstance(v, (int, float)) or v < 0 for v in value)
        or sum(value) <= 0
    ):
        raise ConfigError(f"{key} must be three non-negative numbers, got {value!r}")


def _resource_amounts(key: str, value: dict) -> None:
    bad = {
        k: v
        for k, v in value.items()
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0
    }
    if bad:
        raise ConfigError(f"{key}: amounts must be non-negative numbers, got {bad}")


def _distinct(key: str, value: list) -> None:
    if len(set(map(str, value))) != len(value):
        raise ConfigError(f"{key} has a column twice: {value}")


def _percentile_pair(key: str, value: list) -> None:
    if (
        len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        or not 0 <= value[0] < value[1] <= 100
    ):
        raise ConfigError(f"{key} must be [low, high] within 0..100, got {value}")


def _some_of(choices: tuple, what: str):
    """A check that every item of a list is one of `choices` (`what` names one item in the error)."""

    def check(key: str, value: list) -> None:
        bad = [v for v in value if v not in choices]
        if bad:
            raise ConfigError(f"{key}: unknown {what} {bad[0]!r} (use any of {', '.join(choices)})")

    return check


def _one_group(key: str, value: list) -> None:
    if not value:
        raise ConfigError(
            f"{key} is empty: name the columns of one well (e.g. [Metadata_Plate, Metadata_Well])"
        )


# Value types whose check travels with the type (the `Annotated` metadata is that check).
LocalPath = Annotated[str, _posix_path]  # a folder or file on a POSIX file system (no URI)
Fractions = Annotated[list, _three_fractions]  # train, val, test fractions
Resources = Annotated[dict, _resource_amounts]  # Ray resource name -> amount
Columns = Annotated[list, _distinct]  # column names, each once
PercentilePair = Annotated[list, _percentile_pair]  # [low, high], 0 <= low < high <= 100
Strata = Annotated[list, _one_group]  # the metadata columns of one profile, at least one
Selections = Annotated[list, _some_of(SELECTIONS, "operation")]  # pycytominer feature_select
Corrections = Annotated[list, _some_of(CORRECTIONS, "correction")]  # `profile.compare`
FeatureSets = Annotated[list, _some_of(FEATURE_SETS, "feature set")]  # `profile.compare_features`
# Ingest's image choices (`ingest.z_projection`, `.normalization`, `.scale_check`, `.dtype`; the
# code that acts on them, raycell/ingest/images.py, takes its tuples of names from these).
ZProjection = Literal["max", "mean", "middle", "best-focus"]
IntensityNormalization = Literal["global", "per-batch", "per-image"]
ScaleCheck = Literal["reject", "separate", "ignore"]
CropDtype = Literal["uint8", "uint16"]
# The main optimiser's learning-rate schedule (`train.schedule`; raycell/plans.py).
Schedule = Literal["constant", "onecycle"]


@dataclass
class SynthConfig:
    """The synthetic data set with known ground truth (`raycell synth`)."""

    out: LocalPath = _f("data/synth", "output data set folder")
    n_cells: int = _f(6000, "number of cells (crops) over all batches", ge=1)
    crop_size: int = _f(64, "crop height and width in pixels", ge=1)
    n_lines: int = _f(8, "cell lines; half carry phenotype label 'high', half 'low'", ge=1)
    n_batches: int = _f(8, "imaging batches in total, including the unseen ones", ge=1)
    n_unseen: int = _f(
        2, "batches suggested for holding out whole as 'unseen' (the last ones)", ge=0
    )
    lines_per_batch: int = _f(4, "cell lines imaged in each seen batch", ge=1)
    wells_per_line: int = _f(6, "wells per (line, batch); the split groups by well", ge=1)
    confounding: float = _f(
        0.75,
        "fraction of a seen batch's cells whose label matches the batch's "
        "majority label (0.5 = no confounding)",
        ge=0,
        le=1,
    )
    batch_strength: float = _f(
        1.0,
        "scale of the nuisance effects (gain, offset, gradient, blur, noise)",
        ge=0,
    )
    phenotype_strength: float = _f(
        1.0, "scale of the morphology signal that defines the label", ge=0
    )
    rows_per_shard: int = _f(1000, "cells per parquet shard", ge=1)
    chunk_cells: int = _f(
        0,
        "cells rendered and written per chunk (rounded up to whole shards); bounds "
        "synth's memory; 0 = 16384. Never changes the data set's bytes",
        ge=0,
    )
    num_workers: int = _f(
        -1,
        "Ray tasks writing synth chunks at once: 0 = in this process, -1 = automatic "
        "(in this process below 200,000 cells / 2,000 raw fields, else one task per "
        "CPU of the running Ray). Never changes the data set's bytes",
        ge=-1,
        must="-1 (automatic), 0 (this process) or a number of Ray tasks",
    )
    raw: bool = _f(
        False,
        "write raw fields of view (TIFF per channel and Z-slice, true masks, plate "
        "map) to exercise ingest, instead of crop shards",
    )
    raw_fov_size: int = _f(256, "raw: field-of-view height and width in pixels", ge=1)
    raw_wells: int = _f(
        4, "raw: wells per plate (one plate per batch; lines assigned to wells)", ge=1
    )
    raw_fields: int = _f(2, "raw: fields of view per well", ge=1)
    raw_cells_per_fov: int = _f(
        14,
        "raw: cells placed per field of view (fewer if they do not fit)",
        ge=1,
    )
    raw_chunk_fovs: int = _f(0, "raw: fields of view rendered and written per chunk (0 = 16)", ge=0)
    raw_z: int = _f(3, "raw: Z-slices per channel; the in-focus slice varies per field", ge=1)
    effects: Literal["basic", "varied"] = _f(
        "varied",
        "raw: batch effects: varied (each batch its own mix of background "
        "texture, channel crosstalk, debris, gamma, vignetting, shot noise; each unseen "
        "batch one mechanism stronger than any seen batch) or basic (gain, offset, "
        "illumination, blur, noise only: the easy images)",
    )
    design: Literal["phenotype", "timedose"] = _f(
        "phenotype",
        "phenotype (cell lines with a high/low phenotype, confounded batches) "
        "or timedose (a time x dose treatment design with gradual morphology changes and "
        "batch nuisance: the weak-label experiment's ground truth)",
    )
    times: list = _f([24, 48, 72], "timedose: time points in whole hours (column `time`)")
    doses: list = _f(
        [0, 0.01, 0.1, 1, 10],
        "timedose: doses in uM, >= 0; 0 is the DMSO control "
        "(column `dose`; the label is the dose as text)",
    )
    replicates: int = _f(4, "timedose: wells per time x dose x batch", ge=1)
    effect_strength: float = _f(
        1.0,
        "timedose: scale of the dose and time morphology effects (0 = no effect)",
        ge=0,
    )
    crop_effects: Literal["basic", "varied"] = _f(
        "basic",
        "crops (phenotype and timedose designs): batch effects of the crop "
        "generator: basic (per batch gain, offset, illumination gradient, blur, noise: the "
        "data set of before) or varied (also each "
        "batch its own mix of background texture, channel crosstalk, debris, gamma, "
        "vignetting, shot noise, as synth --raw; each unseen batch one mechanism stronger "
        "than any seen batch)",
    )
    unseen_extreme: float = _f(
        2.5,
        "varied (raw and crops): each unseen batch's extreme mechanism, as a multiple "
        "of the strongest seen batch's strength (> 1)",
        gt=1,
    )


@dataclass
class IngestConfig:
    """Raw fields of view -> crop shards (`raycell ingest`)."""

    input: LocalPath = _f("", "folder of TIFF/PNG images")
    out: LocalPath = _f("", "output data set folder")
    pattern: str = _f(
        "",
        "regex with named groups (batch, plate, well, field, channel, z, ...) "
        "matched against each file's path relative to `input`",
    )
    platemap: LocalPath = _f(
        "", "optional plate-map CSV joined on the columns it shares with the regex groups"
    )
    crop_size: int = _f(64, "crop height and width in pixels", ge=8)
    platemap_on: list = _f(
        [], "plate-map join columns (empty = every column shared with the regex groups)"
    )
    label_column: str = _f(
        "label", "metadata column used as the phenotype label ('' labels if absent)"
    )
    batch_column: str = _f(
        "batch", "metadata column used as the imaging batch (falls back to 'plate')"
    )
    group_column: str = _f(
        "", "metadata column used as `group` ('' = the first of line, treatment, compound present)"
    )
    channels: list = _f(
        [], "values of the regex 'channel' group to use, in output order (empty = all)"
    )
    channel_names: list = _f(
        [], "names for those channels (e.g. [DNA, PH3, actin]; empty = the values)"
    )
    nucleus_channel: str = _f(
        "", "channel (name or value) segmented for primary objects ('' = the first)"
    )
    cytoplasm_channel: str = _f("", "channel to grow cell bodies into ('' = nuclei only)")
    axes: str = _f("", "axes of multi-dimensional files, e.g. ZCYX ('' = from the file's metadata)")
    z_projection: ZProjection = _f(
        "max", "Z projection per channel: max, mean, middle or best-focus (variance of Laplacian)"
    )
    illum_correction: bool = _f(False, "divide by a per-plate, per-channel illumination function")
    illum_downscale: int = _f(4, "block-mean downscale factor for the illumination function")
    illum_filter: int = _f(
        0,
        "median filter size (downscaled px) of the illumination function "
        "(0 = a tenth of the image)",
    )
    normalization: IntensityNormalization = _f(
        "global",
        "intensity normalisation: global (one affine map per channel), per-batch or per-image",
    )
    norm_percentiles: PercentilePair = _f(
        [0.1, 99.9], "low/high percentiles mapped to 0 and the dtype maximum"
    )
    stats_fovs: int = _f(
        0, "fields of view sampled per batch for global/per-batch statistics (0 = all)"
    )
    scale_check: ScaleCheck = _f(
        "reject",
        "fields whose pixel type or intensity scale is far outside their "
        "plate's (they would wreck the pooled normalisation): reject (rejects "
        "table, code out-of-scale), separate (keep them, normalised per field) "
        "or ignore (no check)",
    )
    scale_fold: float = _f(
        20.0,
        "a field is out of scale when a channel's 99th percentile is more than "
        "this factor from its plate's median (and 5 MADs), or its pixel type differs",
        gt=1,
        must="> 1 (a factor)",
    )
    dtype: CropDtype = _f("uint8", "crop pixel type: uint8 or uint16")
    segmentation: str = _f(
        "classical", "segmentation backend: classical (scikit-image) or cellpose"
    )
    cellpose_model: str = _f(
        "", "local cellpose model file (segmentation=cellpose; never downloaded)"
    )
    cellpose_gpu: Literal["auto"] | bool = _f(
        "auto",
        "run cellpose on a GPU: true, false, or auto (when the Ray cluster has GPUs or torch "
        "sees CUDA); on a GPU each crop task requests cellpose_gpus_per_task GPUs from Ray",
    )
    cellpose_gpus_per_task: float = _f(
        1.0,
        "GPUs each crop task requests when cellpose runs on a GPU (0.25: four tasks share one)",
        gt=0,
        le=1,
        must="in (0, 1]",
    )
    diameter: float = _f(
        0.0, "expected diameter (px) of the primary objects (0 = estimate per image)"
    )
    flatten: bool = _f(True, "subtract a smooth per-image background surface before thresholding")
    tophat: bool = _f(
        True,
        "also remove background texture broader than ~2 objects (white top-hat "
        "at the object scale), and keep specks out of the diameter estimate",
    )
    diameter_min: float = _f(
        0.0, "lower bound of the estimated diameter in px (0 = max(4, crop_size / 16))"
    )
    diameter_max: float = _f(
        0.0,
        "upper bound of the estimated diameter in px (0 = crop_size: an "
        "object wider than its crop cannot be cropped whole)",
    )
    diameter_outlier_fold: float = _f(
        2.0,
        "a field whose estimated diameter is more than this factor "
        "from its plate's median uses the plate's",
    )
    scale_fovs: int = _f(
        8,
        "fields of view per plate whose diameter estimates give the plate's median "
        "(a scale pass before cropping; 0 = off)",
    )
    overlay_fields: int = _f(
        3,
        "fields per plate drawn with their objects' outlines in "
        "overlays/<plate>.png of the data set (shown by raycell report; 0 = none)",
    )
    plausibility_check: bool = _f(
        True,
        "reject fields whose segmentation looks implausible (objects far "
        "larger than the plate's, most on the border, most of the foreground "
        "in giant objects): rejects table, code implausible-segmentation",
    )
    implausible_fold: float = _f(
        4.0,
        "a field is implausible when its median object area is more than "
        "this factor above its plate's",
    )
    threshold: str = _f("otsu", "foreground threshold: otsu, li or local")
    threshold_scale: float = _f(1.0, "threshold correction factor (<1 keeps dimmer objects)")
    log_threshold: bool = _f(
        True, "threshold log intensities (robust to a few very bright objects)"
    )
    declump: str = _f(
        "shape", "splitting touching objects: shape (distance transform), intensity or none"
    )
    declump_h: float = _f(
        0.2,
        "a maximum seeds its own object when it stands this fraction of the "
        "radius above the saddle to its neighbour",
    )
    min_area: float = _f(0.0, "smallest object area in px (0 = a quarter of the expected area)")
    min_snr: float = _f(
        3.0,
        "objects must be this many pixel-noise sds above the background "
        "(empty fields then give no objects)",
    )
    max_area: float = _f(0.0, "largest object area in px (0 = 8x the expected area)")
    edge_peak: float = _f(
        0.95,
        "object edges at half their maximum over the background, the maximum "
        "being this quantile of the object's pixels (blur does not enlarge objects; "
        "a nucleus in a halo of cytoplasmic crosstalk keeps its own edge); 0 = half "
        "the object's median (use 0 for punctate cytoplasm-only primary stains)",
    )
    outlier_k: float = _f(
        3.0,
        "drop objects whose area or edge sharpness lies more than this many "
        "robust sds (median/MAD) below the rest of their field: debris specks and "
        "out-of-focus blobs; 0 = off",
    )
    cell_compactness: float = _f(
        0.05,
        "watershed compactness for cell bodies, per nucleus diameter "
        "(0 = follow edges only; larger = rounder, Voronoi-like)",
    )
    max_cell_area: float = _f(
        0.0, "a cell body larger than this (px) falls back to its nucleus (0 = no limit)"
    )
    mask_crops: bool = _f(
        True,
        "multiply each crop by its object's mask with a blurred edge, so that "
        "background texture and neighbours are not an input (the default: it generalised "
        "better to unseen imaging batches, docs/generalisation.md); false keeps the context",
    )
    mask_blur: float = _f(2.0, "Gaussian sigma (px) of the mask edge")
    crop_features: bool = _f(
        False,
        "also store each crop's CellProfiler-style features as feat_* columns "
        "(shape of the centre object, intensity inside/outside it, GLCM texture; "
        "raycell/features/morphology.py), computed in the ingest tasks; the hand-made-"
        "feature baseline then reads them instead of computing them from the crops",
    )
    rows_per_shard: int = _f(
        2000,
        "most cells per parquet shard: the crop tasks' files are compacted "
        "into shards of this many cells (0 = no row bound), whatever the number "
        "of fields",
        ge=0,
        must=">= 0 (0 = no bound)",
    )
    shard_mb: float = _f(
        128.0,
        "most MiB of crop image bytes per shard (with rows_per_shard, the "
        "smaller bound wins; 0 = no byte bound)",
        ge=0,
        must=">= 0 (0 = no bound)",
    )
    num_workers: int = _f(0, "concurrent ingest tasks (0 = as many as Ray's CPUs allow)")
    cpus_per_task: float = _f(1.0, "logical CPUs reserved by each ingest task")
    fovs_per_task: int = _f(1, "fields of view per Ray task (more = less scheduling overhead)")
    overwrite: bool = _f(
        False,
        "replace an existing data set in `out` made with other inputs or "
        "parameters (an identical one is skipped)",
    )
    preset: str = _f(
        "",
        "instrument file naming instead of `pattern`: phenix (operetta), imagexpress, "
        "cellinsight (arrayscan, cellprofiler), jump (load-data CSVs), ome-zarr (NGFF plate)",
    )
    load_data: str = _f(
        "",
        "CellProfiler load-data CSV, or a folder of load_data*.csv, listing each field's "
        "files (FileName_<Ch>/PathName_<Ch>, Metadata_Plate/Well/Site) instead of `pattern`",
    )
    masks: str = _f(
        "",
        "folder of instance masks, one per field (label images, TIFF/PNG; a binary mask "
        "is split into connected components): used instead of raycell's segmentation "
        "('' = segment); found by masks_pattern, or by name (<image stem>_cp_masks.png, "
        "_masks.tif, ...)",
    )
    masks_pattern: str = _f(
        "",
        "regex matched on mask paths relative to `masks`; its named groups "
        "(a subset of the images' field groups) pick each field's mask",
    )
    cell_masks: str = _f(
        "", "folder of cell-body masks (with `masks` as the nuclei), found like masks"
    )
    cell_masks_pattern: str = _f("", "regex for the cell masks, as masks_pattern")
    objects: str = _f(
        "",
        "CSV/parquet table of object centres used instead of segmentation: "
        "CellProfiler's Nuclei.csv (ImageNumber, ObjectNumber, Location_Center_X/Y) "
        "with objects_images, or any table with the fields' metadata columns and x/y",
    )
    objects_images: str = _f(
        "",
        "CellProfiler's Image.csv for `objects`: ImageNumber -> field, by "
        "FileName_<channel> or Metadata_<key> columns",
    )
    objects_xy: list = _f(
        [],
        "x and y column names of `objects` (empty = Location_Center_X/Y, x/y, "
        "center_x/y, centroid_x/y)",
    )


@dataclass
class DataConfig:
    """Where the crop shards are and how they are streamed to the model."""

    path: LocalPath = _f("data/synth", "data set folder (dataset.json + shards/)")
    batch_size: int = _f(64, "training batch size per worker", ge=1)
    eval_batch_size: int = _f(256, "batch size for validation and inference", ge=1)
    shuffle_buffer: int = _f(1024, "local shuffle buffer (rows) per worker; 0 = off", ge=0)
    prefetch_batches: int = _f(2, "batches prefetched by each worker's iterator", ge=0)
    fetch_batches: int = _f(
        4,
        "training batches taken from Ray Data's iterator at once and cut into "
        "batch_size rows in the worker, so Ray's per-batch cost is paid once per N; capped so a "
        "fetched batch's images stay within 4 MiB; 1 = one Ray batch per step (bench/README.md)",
        ge=1,
    )
    block_size_mb: int = _f(
        8,
        "Ray Data target block size; small data needs small blocks to shuffle",
        ge=1,
    )
    parquet_reader: ParquetReader = _f(
        "v1",
        "Ray Data's parquet reader: v1 (read tasks, one block per shard: quick to start) or "
        "v2 (Ray's DataSourceV2: footer-reading actors per read, "
        "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS; slower to start each read, faster on large crops "
        "once started: for long runs; bench/README.md)",
    )
    normalize: NormalizeMode = _f(
        DEFAULT_NORMALIZE,
        "how stored crops become model input: crop (per crop and channel: 1st/99th "
        "percentile -> 0/1, clipped, so a batch's brightness and offset are not an input; the "
        "default, docs/generalisation.md compares the two on unseen batches; a phenotype "
        "carried by absolute intensity is then lost too) or global (divide by the dtype's "
        "range, the same for every crop: absolute intensity is an input, e.g. for dose "
        "effects on a stain's intensity); saved in the checkpoint, inference applies the "
        "model's own",
    )
    shuffle_seed: int = _f(
        -1,
        "seed for the training data order (-1 = a new order every run); with a seed, "
        "each epoch's order (and the model's random draws) depends only on the seed and the epoch, "
        "so a run restarted "
        "after a failure sees the same batches as an undisturbed one (Ray Data then keeps "
        "block order: slightly slower; exact with one worker)",
        ge=-1,
    )
    materialize: Literal["auto", "always", "never"] = _f(
        "auto",
        "hold the training and validation splits in Ray's object store, read once "
        "(always), stream them from the shards every epoch (never), or auto: hold them "
        "when they take at most a quarter of the object store",
    )
    stream_buffer_mb: int = _f(
        0,
        "streamed training split (not held in the object store): the most Ray Data "
        "may read ahead of the training workers, MiB per worker; 0 = Ray's own bound. A "
        "tighter bound saves memory and slows epochs (docs/scale.md)",
        ge=0,
    )
    heads: Columns = _f(
        [],
        "weak-label columns, one classification head each, for model types with heads "
        "(timm), e.g. [time, dose]: any metadata column of the crop shards; numeric columns "
        "are ordered numerically (ordinal classes); empty = the label column",
    )


@dataclass
class SplitConfig:
    """How `raycell split` assigns train/val/test/unseen."""

    unseen: list = _f([], "batches held out whole as 'unseen' (empty: the manifest's suggestion)")
    group_by: str = _f("well", "column whose values never straddle two splits (a well, a cell)")
    stratify: list = _f(["group", "batch"], "columns whose combinations are spread over the splits")
    fractions: Fractions = _f([0.7, 0.1, 0.2], "train, val, test fractions of the seen groups")
    val_batches: list = _f(
        [],
        "seen batches held out whole as split 'valbatch' for model selection "
        "across batches (never trained on; the loop reports valbatch_auroc); names, or "
        "['auto:N'] for N seen batches picked by seed; empty = none",
    )


@dataclass
class ModelConfig:
    """Which model to build (`raycell models` lists the types) and its arguments."""

    type: str = _f("conventional", "model type from the registry")
    preset: ModelPreset = _f(
        "small", "size preset: 'small' (CPU) or 'armed' (the reference's 256x256)"
    )
    args: dict = _f({}, "extra builder arguments that override the preset (e.g. latent_dim: 32)")
    adversary_reads: Literal["latent", "all"] = _f(
        "all",
        "adversarial and mixedeffects: what the adversary reads: 'latent' (the representation that "
        "is evaluated) or 'all' (the reference: every encoder block's output and the latent, where "
        "the early blocks keep the batch's look for the decoder whatever the encoder does); "
        "model.args.adversary_reads overrides",
    )
    adversary_standardize: bool = _f(
        True,
        "adversarial and mixedeffects with adversary_reads=latent: the adversary reads the latent "
        "standardised over the minibatch, as the batch probe does, so that shrinking a direction "
        "cannot hide the batch in it; model.args.adversary_standardize overrides",
    )


@dataclass
class LossConfig:
    """Loss weights (defaults from the ARMED reference code's main.py)."""

    recon: float = _f(1.0, "weight of the reconstruction MSE", ge=0)
    cls: float = _f(0.1, "weight of the phenotype BCE", ge=0)
    adv: float = _f(
        0.1,
        "weight of the adversarial term in the encoder's objective (loss.adv_objective)",
        ge=0,
    )
    adv_objective: Literal["subtract", "confusion"] = _f(
        "subtract",
        "what the encoder does with the adversary: 'subtract' (the ARMED paper: - w_adv * "
        "CE(adversary, batch), rewarding a confidently wrong adversary) or 'confusion' (+ w_adv * CE("
        "adversary, uniform): the encoder is rewarded only for leaving the adversary unsure)",
    )
    adv_steps: int = _f(
        1,
        "adversary updates per main update (a stronger adversary for the encoder to "
        "hide the batch from)",
        ge=1,
    )
    adv_game: Literal["alternating", "reversal"] = _f(
        "alternating",
        "how the adversary and the encoder play: 'alternating' (the reference: an adversary step on "
        "the detached encoder outputs, then the main step with the adversary frozen) or 'reversal' "
        "(DANN: one simultaneous step, the adversary minimising its cross-entropy while the encoder "
        "gets its gradient reversed and scaled by loss.adv)",
    )
    adv_lr_scale: float = _f(
        1.0, "the adversary's learning rate as a multiple of train.lr", gt=0, le=1000
    )
    adv_ramp: bool = _f(
        False,
        "ramp the adversarial weight from 0 to loss.adv over training, as DANN: "
        "loss.adv * (2 / (1 + exp(-10 p)) - 1) at training progress p; the adversary learns the "
        "batch before the encoder is pushed to hide it",
    )
    adv_sees: Literal["unaugmented", "augmented"] = _f(
        "unaugmented",
        "which cells the adversary reads under train.augment: 'unaugmented' (the cells as they "
        "are evaluated; the batch-effect augmentation hides the batch from an adversary that "
        "only sees augmented cells) or 'augmented' (the cells the encoder trains on)",
    )
    align: float = _f(
        0.3,
        "adversarial and mixedeffects: weight of the batch-mean alignment term, the share of the "
        "latent's variance the batch explains within each phenotype (raycell.losses.alignment); "
        "pulls the batches' mean latents together class by class, which a linear batch probe reads "
        "and an online adversary can be fooled without removing",
        ge=0,
    )
    cluster_latent: float = _f(0.001, "weight of the latent cluster CE (random effects)", ge=0)
    cluster_image: float = _f(0.001, "weight of the image cluster CE on reconstructions", ge=0)
    kl: float = _f(1e-7, "weight of the random-effects KL", ge=0)
    heads: Literal["softmax", "multilabel"] = _f(
        "softmax",
        "weak-label heads' loss: softmax (one cross-entropy per head) or multilabel "
        "(sigmoid BCE over all heads' one-hot classes, as in the blog)",
    )


@dataclass
class TrainConfig:
    """The optimisation and the run directory of `raycell train`."""

    epochs: int = _f(6, "passes over the training split", ge=1)
    lr: float = _f(
        1e-3, "Adam learning rate (the reference uses 1e-4 for 10 epochs at 256 px)", gt=0
    )
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    runs_dir: LocalPath = _f("runs", "folder that holds one sub-folder per run")
    resume: LocalPath = _f("", "run folder to continue from its latest checkpoint")
    checkpoints_to_keep: int = _f(2, "checkpoints kept per run (the latest ones)", ge=1)
    early_stopping_patience: int = _f(
        0,
        "stop when train.early_stopping_metric has not improved for this "
        "many epochs; metrics.json then names the best epoch's checkpoint "
        "(best_checkpoint); 0 = off",
        ge=0,
    )
    early_stopping_metric: str = _f(
        "val_acc",
        "metric watched by early stopping (names with 'loss' are minimised, others maximised)",
    )
    max_failures: int = _f(
        1, "worker-group restarts from the last checkpoint before giving up", ge=-1
    )
    bf16: bool = _f(True, "bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = _f(
        True,
        "channels-last memory format for the model and its input, in training and "
        "inference, on CPU (oneDNN) and CUDA (tensor cores)",
    )
    torch_threads: int = _f(
        0,
        "CPU threads per worker (0 = Ray's choice: the worker's CPU count, "
        "which is 1 for fractional CPUs)",
        ge=0,
    )
    log_every: int = _f(0, "print a line every N steps (0 = once per epoch)", ge=0)
    max_steps_per_epoch: int = _f(
        0, "cap on steps per epoch (0 = the whole split); for smoke runs", ge=0
    )
    augment: str = _f(
        "all,flip,rot90",
        "augmentation of training cells on the device: 'all' (every batch "
        "effect), or a comma list of gain, offset, gamma, blur, noise, background, mix (channel "
        "crosstalk) and the geometric flip, rot90, or '' (none); drawn per cell from a seeded "
        "generator (raycell/data/augment.py); the default generalised best to unseen batches "
        "(docs/generalisation.md)",
    )
    augment_strength: float = _f(1.0, "scales every augmentation range (0 = off)", ge=0)
    schedule: Schedule = _f(
        "constant",
        "learning-rate schedule: constant, or onecycle (warm up to train.lr over "
        "30% of the steps, then anneal; the blog's)",
    )
    layer_decay: float = _f(
        0.0,
        "layer-wise learning rates for timm backbones: each stage below the top "
        "gets train.lr times this factor once more (e.g. 0.5; 0 = one rate for all)",
        ge=0,
        le=1,
    )
    chaos_kill_after_steps: int = _f(
        0,
        "fault drill: rank 0 exits abruptly (os._exit) after this many "
        "steps of the run, once per run folder, so that a cluster's recovery "
        "(train.max_failures) can be checked; 0 = off",
        ge=0,
    )
    composite_weight: float = _f(
        1.0,
        "weight w of the model-selection metric val_composite = val_auroc - "
        "w * (val_batch_probe - chance): the phenotype AUROC on val minus how much "
        "better than chance the val latents predict the training batch",
        ge=0,
    )


@dataclass
class ScalingConfig:
    """Mirrors `ray.train.ScalingConfig` one-to-one."""

    num_workers: int = _f(1, "Ray Train workers", ge=1)
    use_gpu: bool = _f(False, "one GPU per worker")
    resources_per_worker: Resources = _f(
        {"CPU": 0.5},
        "resources per worker; fractional CPUs leave room for Ray Data reads on small machines",
    )


@dataclass
class RayConfig:
    """How to reach Ray: a local instance on a laptop, `auto` inside `ray job submit`."""

    address: str = _f("", "cluster address ('' = start local Ray or join RAY_ADDRESS)")
    num_cpus: int = _f(
        0, "logical CPUs for a local Ray (0 = max(4, 2 x cores): reads need slack)", ge=0
    )
    object_store_mb: int = _f(0, "object store size for a local Ray (0 = Ray's default)", ge=0)
    progress: bool = _f(True, "Ray Data progress bars")
    verbose: bool = _f(
        False,
        "show Ray's own output on the terminal (every worker's prints, Ray Data's "
        "execution plans, Ray Train's reports); otherwise it stays in Ray's log folder, "
        "named in each run folder's ray_logs.txt, and the terminal shows raycell's lines",
    )
    connect_timeout_s: float = _f(
        5.0,
        "seconds to wait for a TCP connection to `address` (host:port or "
        "ray://host:port) before giving up with an error",
        gt=0,
    )
    start_timeout_s: float = _f(
        0.0,
        "seconds to keep trying to start a local Ray on a busy machine before "
        "giving up with an error (0 = 60 s times the load per core, at least 60)",
    )


@dataclass
class InferConfig:
    """Batch inference (`raycell infer`)."""

    checkpoint: LocalPath = _f("", "checkpoint folder, or a run folder (its latest checkpoint)")
    data: LocalPath = _f("", "data set to run on ('' = data.path)")
    out: LocalPath = _f("", "output folder of prediction shards ('' = <run>/predictions)")
    splits: list = _f([], "splits to run on (empty = all rows)")
    num_actors: int = _f(1, "model replicas (Ray Data actors)", ge=1)
    num_gpus: float = _f(
        0.0, "GPUs per actor (0 on machines without GPUs, or Ray waits forever)", ge=0
    )
    cpus_per_actor: float = _f(1.0, "CPUs per actor", gt=0)
    torch_threads: int = _f(
        0,
        "CPU threads per actor for the forward pass (0 = on one machine its cores "
        "shared between the actors, elsewhere the actor's CPU count; Ray itself "
        "gives an actor one thread per CPU it holds)",
        ge=0,
    )
    write_recon: bool = _f(False, "also write reconstructions (large)")
    shards_per_round: int = _f(
        64,
        "no longer used (older configs still load): inference streams every pending shard "
        "through one actor pool and writes each output shard once complete, so a killed job "
        "loses only the shards in flight",
        ge=1,
    )
    z_source: LocalPath = _f(
        "",
        "soft design matrix Z for batches the model did not see in training: the "
        "folder (or .parquet) written by `raycell infer-z`; random/mixed-effects models "
        "need it (or randomize_z) to predict unseen batches",
    )
    randomize_z: bool = _f(
        False,
        "ablation: give every cell a random one-hot Z row (fixed per cell_id) "
        "instead of its batch's",
    )
    z_mode: ZMode = _f(
        "predicted",
        "infer-z: Z for unseen batches: predicted (the Z-predictor's softmax, the "
        "reference), balanced (Z-predictor trained with each (batch, label) weighted 1/count, so "
        "labels do not predict batches), uniform (1/n_seen_batches for every seen batch, no "
        "Z-predictor) or zero (Z = 0: random effects at their prior mean, the mixed model's "
        "prediction for a new group)",
    )
    z_out: str = _f(
        "",
        "infer-z: output folder for inferred_z.parquet/.json ('' = <checkpoint run>/"
        "inferred_z, or <data>/inferred_z without a checkpoint)",
    )
    z_splits: list = _f(["unseen"], "infer-z: splits whose cells get an inferred Z")
    z_epochs: int = _f(
        10,
        "infer-z: maximum epochs of the Z-predictor (model type zpredictor, trained on "
        "Ray Train; early stopping on val accuracy)",
        ge=1,
    )
    z_patience: int = _f(3, "infer-z: epochs without a better val accuracy before stopping", ge=1)
    z_lr: float = _f(1e-4, "infer-z: NAdam learning rate of the Z-predictor", gt=0)
    z_batch_size: int = _f(32, "infer-z: training batch size per worker of the Z-predictor", ge=1)


@dataclass
class EmbedConfig:
    """Embedding export (`raycell embed`; the checkpoint, data, splits and actors are the infer.* keys)."""

    out: LocalPath = _f(
        "",
        "output folder ('' = <checkpoint run>/embeddings): shards/ in the profiling layout "
        "(Metadata_* columns, then features), embeddings.json, well_profiles.parquet",
    )
    layout: Literal["columns", "list"] = _f(
        "columns",
        "features as one float32 column each (columns: Cells_Embedding_0000, ...; "
        "what pycytominer reads) or one fixed-size list column `embedding` (list)",
    )
    well_profiles: bool = _f(
        True, "also write the median profile of every well (well_profiles.parquet)"
    )


@dataclass
class ExportConfig:
    """Embeddings -> files other tools read (`raycell export`): AnnData for scanpy, CytoTable layout."""

    embeddings: LocalPath = _f(
        "", "embeddings folder written by `raycell embed` (embeddings.json + shards/)"
    )
    out: LocalPath = _f(
        "",
        "output file (.h5ad / .parquet / .csv); its folder must exist; a file raycell did "
        "not write is never replaced, nor anything inside a data set or embeddings folder",
    )
    format: Literal["h5ad", "parquet", "csv"] = _f(
        "h5ad",
        "h5ad (AnnData: X = features, obs = metadata, obsm = X_pca/X_umap/Prob_<head>) "
        "| parquet | csv (CytoTable/pycytominer layout: Metadata_* then Cells_* features)",
    )
    level: Literal["cell", "well"] = _f(
        "cell", "cell (one row per cell) or well (median per Metadata_Plate x Metadata_Well)"
    )
    top_k: int = _f(
        0,
        "keep the k highest-variance features after dropping constant ones (0 = all; the "
        "blog's selection before PCA)",
        ge=0,
    )
    drop_zero_variance: bool = _f(True, "drop features that are constant over the exported rows")
    with_morph: bool = _f(
        False,
        "add the crop shards' morph_* shape features (standardised) as Cells_Morph_* features",
    )
    umap: bool = _f(
        False,
        "also compute obsm['X_umap'] (h5ad only; umap-learn, which compiles on its first call)",
    )
    overwrite: bool = _f(
        False,
        "replace an earlier raycell export at `out` (through a temporary name "
        "and an atomic rename)",
    )


@dataclass
class ProfileConfig:
    """Well profiles and retrieval metrics (`raycell profile`; docs/profiling.md)."""

    input: LocalPath = _f(
        "",
        "embeddings folder (`raycell embed`) or a parquet/CSV table in the CytoTable "
        "layout (Metadata_* columns, Cells_/Cytoplasm_/Nuclei_ features), per cell or per "
        "well",
    )
    out: LocalPath = _f(
        "",
        "output folder: profiles.parquet, consensus.parquet, activity_map.csv, "
        "consistency_<column>.csv, retrieval.json, profile.json",
    )
    features: ProfileFeatures = _f(
        "embedding",
        "embeddings folder: embedding (deep features), morph (the hand-made "
        "morph_* columns), all, or handmade (CellProfiler-style features computed from "
        "its crop data set; a crop data set given as input always gives these), or cpmeasure "
        "(CellProfiler's measurements by cp-measure of the same objects; slower)",
    )
    aggregate: Aggregation = _f(
        "median",
        "per-cell rows -> one per profile.strata group: median or mean "
        "(rows already one per group pass unchanged)",
    )
    engine: ProfileEngine = _f(
        "auto",
        "how per-cell rows are aggregated: memory (one pandas frame), ray (Ray Data reads the "
        "parquet in blocks and reduces each well, for inputs larger than memory), or auto (ray "
        "when the features would take more than half the available memory)",
    )
    strata: Strata = _f(["Metadata_Plate", "Metadata_Well"], "columns of one profile (a well)")
    plate_column: str = _f("Metadata_Plate", "column whose groups are normalised separately")
    controls: str = _f(
        "",
        "pandas query selecting the negative-control wells each plate is normalised "
        "against and treatments are compared with, e.g. \"Metadata_treatment == 'DMSO'\" "
        "('' = all wells, and no activity mAP)",
    )
    normalize: ProfileNormalization = _f(
        "mad_robustize",
        "per-plate normalisation (pycytominer): mad_robustize, robustize, standardize or none",
    )
    feature_select: Selections = _f(
        ["variance_threshold", "correlation_threshold", "drop_na_columns"],
        "pycytominer feature_select operations ([] = keep every feature)",
    )
    sphere: bool = _f(
        False, "ZCA-cor sphering fitted on the controls over all plates, after selection"
    )
    treatment: list = _f(
        [],
        "column(s) naming each well's treatment (e.g. [Metadata_broad_sample] or "
        "[Metadata_time, Metadata_dose]); needed for the metrics",
    )
    annotations: list = _f([], "columns for consistency mAP (e.g. [Metadata_moa, Metadata_target])")
    metrics: bool = _f(
        True, "compute retrieval metrics with copairs (activity, consistency, percent replicating)"
    )
    null_size: int = _f(10000, "permutations in each mAP null distribution (copairs)", ge=100)
    fdr: float = _f(
        0.05,
        "a treatment is retrieved when its BH-corrected p-value is below this",
        gt=0,
        le=1,
        must="between 0 and 1",
    )
    distance: ProfileDistance = _f(
        "cosine", "copairs distance: cosine, correlation, euclidean or abs_cosine"
    )
    consistency_level: ConsistencyLevel = _f(
        "treatment",
        "consistency on treatment consensus profiles (treatment) "
        "or on wells with the same treatment's replicates excluded (well)",
    )
    consistency_active_only: bool = _f(
        False,
        "consistency only over treatments retrieved against the "
        "controls (the field's recipe; needs profile.controls)",
    )
    where: str = _f(
        "",
        "pandas query keeping only these input rows before anything else, e.g. "
        "\"Metadata_Split == 'unseen'\" ('' = all)",
    )
    compare: Corrections = _f(
        [],
        "also write comparison.csv/.md: the same wells and metrics (mAP, batch "
        "mixing) for each of these corrections: raw, control (per-plate "
        "mad_robustize against the controls), harmony, control+harmony",
    )
    compare_features: FeatureSets = _f(
        [],
        "feature sets compared (embedding, morph, all, handmade, cpmeasure; [] = profile.features)",
    )
    batch_column: str = _f(
        "Metadata_Plate", "column Harmony corrects and batch mixing is measured on"
    )
    overwrite: bool = _f(False, "replace an earlier profile folder in profile.out")


@dataclass
class ReportConfig:
    """The HTML report of a folder (`raycell report`, and the end of `raycell demo`)."""

    folder: LocalPath = _f("", "run, demo, experiment, tune or embeddings folder to report on")
    out: LocalPath = _f(
        "",
        "report folder ('' = <folder>/report); an earlier report there is replaced, any "
        "other non-empty folder is refused",
    )
    max_cells: int = _f(
        2000, "at most this many cells in each scatter plot (sampled with seed)", ge=10
    )


@dataclass
class EvalConfig:
    """Metrics from inference outputs (`raycell evaluate`)."""

    predictions: LocalPath = _f("", "folder of prediction shards")
    out: LocalPath = _f(
        "", "output folder for metrics.json / metrics.csv ('' = next to predictions)"
    )
    max_cells: int = _f(5000, "cells per split sampled for the latent metrics (speed)", ge=1)
    baseline: bool = _f(
        False,
        "evaluate: also score a logistic regression on hand-made features of the "
        "predictions' data set (morph_* columns, else features from the crops), fitted on "
        "its train split",
    )
    baseline_features: BaselineFeatures = _f(
        "auto",
        "baseline features: auto (morph_* when the shards have them, else "
        "crops; `experiment medl` then adds a second row on all), morph, crops (shape, "
        "intensity and texture computed from the crops), all (morph_* and crops side by "
        "side)",
    )
    profiles: LocalPath = _f(
        "",
        "evaluate: score a profile folder or CytoTable-layout table of well profiles "
        "as it is with copairs (activity/consistency mAP; the profile.* pairing keys) "
        "into eval.out, instead of a predictions folder",
    )


@dataclass
class TuneConfig:
    """Hyperparameter search (`raycell tune`): Optuna proposes, ASHA stops poor trials early."""

    out: LocalPath = _f(
        "runs/tune",
        "search folder: Tune's storage (search/), one Train run per trial "
        "(trials/), trials.csv, best.yaml, tune_objective.png",
    )
    space: dict = _f(
        {},
        "searched keys: dotted config key (loss.adv, train.lr, model.args.latent_dim) -> "
        "{dist: loguniform|uniform|randint, low: L, high: H} or {dist: choice, values: [..]}; "
        "randint's high is exclusive",
    )
    metric: str = _f(
        "val_auroc",
        "objective: a metric the training loop reports every epoch (val_auroc, "
        "val_loss, ...); each trial counts at its best epoch (tune.select says which trials "
        "compete)",
    )
    select: Literal["budget", "best_epoch"] = _f(
        "budget",
        "which trials compete for best.yaml: 'budget' = only the trials that ran the most epochs "
        "(ASHA's survivors, all at the same budget), each at its best epoch; 'best_epoch' = every trial at "
        "its best epoch, however early ASHA stopped it",
    )
    mode: Literal["max", "min"] = _f("max", "max or min: which way the objective is better")
    num_samples: int = _f(8, "trials (sampled configurations)", ge=1)
    max_concurrent_trials: int = _f(
        0,
        "trials at once (0 = as many as the cluster's CPUs/GPUs fit, "
        "counting scaling.* per trial plus 1 CPU for its data reads; more is "
        "lowered to that)",
        ge=0,
    )
    grace_period: int = _f(1, "ASHA: epochs every trial runs before it may be stopped", ge=1)
    reduction_factor: int = _f(
        2,
        "ASHA: at each rung only the best 1/reduction_factor of trials go on",
        ge=2,
    )
    resume: LocalPath = _f(
        "",
        "search folder (tune.out) of an interrupted search to continue: finished trials "
        "are kept, unfinished ones restart from their last checkpoint",
    )
    trial_cpus: float = _f(
        0.01,
        "CPUs reserved by each trial's driver (it only builds and watches its "
        "TorchTrainer; must be > 0)",
        gt=0,
    )
    folds: int = _f(
        0,
        "cross-batch folds: each trial trains this many models side by side, each holding "
        "out a different seen batch (its train and val cells, as split valbatch), and its "
        "objective is the mean of tune.metric over them at each epoch (use "
        "tune.metric=valbatch_auroc); needs this many times the trial's resources; 0 = off",
        ge=0,
    )


# Distributions of tune.space and the keys each takes besides `dist`.
TUNE_DISTS = {
    "loguniform": ("low", "high"),
    "uniform": ("low", "high"),
    "randint": ("low", "high"),
    "choice": ("values",),
}
# Keys a search may not vary: how the search itself runs, and train.epochs (ASHA's budget per trial).
_TUNE_FIXED = ("tune.", "ray.", "train.epochs", "train.resume", "train.runs_dir")


@dataclass
class DemoConfig:
    """The one-command demo."""

    out: LocalPath = _f("runs/demo", "folder for everything the demo writes")
    models: list = _f(["conventional"], "model types to train and compare")


@dataclass
class ExperimentConfig:
    """Everything one invocation needs; each verb reads the sections it uses."""

    name: str = _f("raycell", "run name prefix")
    seed: int = _f(0, "random seed for data generation, splits and initialisation", ge=0)
    synth: SynthConfig = field(default_factory=SynthConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def validate(self) -> "ExperimentConfig":
        """Check every key's declared type, choices and bounds, then the checks that relate keys.

        `load_config` and `from_dict` call it; call it again after changing keys in code.

        Raises:
            ConfigError: naming the key, the bad value and what it must be.
        """
        _check_declared(self, "")
        if self.data.shuffle_buffer and self.data.shuffle_buffer < self.data.batch_size:
            raise ConfigError(
                f"data.shuffle_buffer ({self.data.shuffle_buffer}) must be 0 or >= "
                f"data.batch_size ({self.data.batch_size})"
            )
        if self.synth.n_unseen >= self.synth.n_batches:
            raise ConfigError(
                "synth.n_unseen must be smaller than synth.n_batches "
                f"({self.synth.n_unseen} >= {self.synth.n_batches})"
            )
        if self.synth.raw and self.synth.design != "phenotype":
            raise ConfigError(
                "synth.raw writes the phenotype design only; drop synth.raw or use "
                "synth.design=phenotype"
            )
        if self.export.umap and self.export.format != "h5ad":
            raise ConfigError(
                "export.umap: UMAP coordinates are written to h5ad only (obsm['X_umap'])"
            )
        if self.profile.compare and not self.profile.metrics:
            raise ConfigError("profile.compare scores each version: it needs profile.metrics")
        _check_tune(self.tune)
        return self

    def get(self, key: str) -> Any:
        """The value of a dotted key, e.g. `cfg.get("train.lr")`."""
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def set(self, key: str, value: Any) -> None:
        """Set a dotted key in place (no type check: use with values taken from another config)."""
        *sections, last = key.split(".")
        node: Any = self
        for part in sections:
            node = getattr(node, part)
        setattr(node, last, value)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        """Build from a nested dict, raising ConfigError on unknown keys or wrong types."""
        return _build(cls, d, prefix="").validate()


def tune_key_type(key: str) -> Any:
    """The declared type of a dotted key a search may vary; a key below a dict field (model.args.x) is Any.

    Raises:
        ConfigError: the key is not in the config (naming the valid keys there) or a search may not vary it.
    """
    if any(key == p or (p.endswith(".") and key.startswith(p)) for p in _TUNE_FIXED):
        raise ConfigError(
            f"tune.space: '{key}' cannot be searched (tune.*, ray.*, train.resume and "
            "train.runs_dir are how the search runs; train.epochs is ASHA's per-trial maximum: "
            "set it, not search it)"
        )
    cls: Any = ExperimentConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "<root>"
            raise ConfigError(
                f"tune.space: unknown config key '{key}'; valid keys in '{where}': "
                f"{', '.join(hints)}"
            )
        tp = hints[part]
        if dataclasses.is_dataclass(tp):
            cls = tp
            continue
        if tp is dict and i < len(parts) - 1:
            return (
                Any  # model.args.latent_dim: builder arguments are checked when the model is built
            )
        if i < len(parts) - 1:
            raise ConfigError(
                f"tune.space: unknown config key '{key}': '{'.'.join(parts[: i + 1])}' is a "
                f"{_type_name(tp)}, not a section"
            )
        return tp
    raise ConfigError(
        f"tune.space: '{key}' is a section; name one of its keys, e.g. '{key}."
        f"{next(iter(typing.get_type_hints(cls)))}'"
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flatten_space(space: dict, prefix: str = "") -> dict:
    """tune.space with sections (`{loss: {adv: {dist: ...}}}`, or `--set tune.space.loss.adv=...`)
    as dotted keys.
    """
    out = {}
    for k, v in space.items():
        key = f"{prefix}{k}"
        if (
            isinstance(v, dict)
            and v
            and "dist" not in v
            and all(isinstance(x, dict) for x in v.values())
        ):
            out.update(_flatten_space(v, key + "."))
        else:
            out[key] = v
    return out


def _check_tune(t: TuneConfig) -> None:
    """tune.* checks that need no data: the metric, and each tune.space entry's key, distribution, bounds."""
    if not t.metric:
        raise ConfigError(
            "tune.metric is empty; name a metric the loop reports (e.g. val_auroc, val_loss)"
        )
    t.space = _flatten_space(t.space)
    for key, spec in t.space.items():
        where = f"tune.space.{key}"
        tune_key_type(str(key))
        if not isinstance(spec, dict) or "dist" not in spec:
            raise ConfigError(
                f"{where} must be a mapping with 'dist' (e.g. {{dist: loguniform, low: 1e-4, "
                f"high: 1e-2}}), got {spec!r}"
            )
        dist = spec["dist"]
        if dist not in TUNE_DISTS:
            raise ConfigError(
                f"{where}: unknown distribution {dist!r}; use one of {', '.join(TUNE_DISTS)}"
            )
        want = set(TUNE_DISTS[dist])
        got = set(spec) - {"dist"}
        if got != want:
            raise ConfigError(
                f"{where}: {dist} takes {', '.join(sorted(want))}, got "
                f"{', '.join(sorted(got)) or 'nothing'}"
            )
        if dist == "choice":
            vals = spec["values"]
            if (
                not isinstance(vals, list)
                or not vals
                or not all(v is None or isinstance(v, (bool, int, float, str)) for v in vals)
            ):
                raise ConfigError(
                    f"{where}: choice needs a non-empty list of plain values (numbers, strings, "
                    f"true/false), got {vals!r}"
                )
            continue
        low, high = spec["low"], spec["high"]
        if dist in ("uniform", "loguniform"):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                low, high = (float(v) if isinstance(v, str) else v for v in (low, high))
            except ValueError:
                pass
        if not (_is_number(low) and _is_number(high)):
            raise ConfigError(
                f"{where}: low and high must be numbers, got low={low!r}, high={high!r}"
            )
        if dist == "randint" and not (isinstance(low, int) and isinstance(high, int)):
            raise ConfigError(
                f"{where}: randint needs integer low and high, got low={low!r}, high={high!r}"
            )
        if not low < high:
            raise ConfigError(f"{where}: low ({low}) must be smaller than high ({high})")
        if dist == "loguniform" and not low > 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
        spec["low"], spec["high"] = low, high


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _either(values: tuple) -> str:
    """'a, b or c': a key's choices as its errors name them."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


@functools.cache
def _declared(cls: type) -> dict[str, Any]:
    """A config class's field types, `Annotated` value checks included (resolved once per class)."""
    return typing.get_type_hints(cls, include_extras=True)


def _check_value(key: str, tp: Any, meta: Any, value: Any) -> None:
    """The rules declared with one key: its choices, its `Annotated` checks and its bounds."""
    if typing.get_origin(tp) is Annotated:
        for check in tp.__metadata__:
            check(key, value)
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
        raise ConfigError(f"{key} must be {_either(typing.get_args(tp))}, got {value!r}")
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if ge is None and gt is None and le is None:
        return
    # written as `not (value >= ge)` and so on, so that NaN fails every bound
    if (ge is None or value >= ge) and (gt is None or value > gt) and (le is None or value <= le):
        return
    if meta.get("must"):
        raise ConfigError(f"{key} must be {meta['must']}, got {value}")
    if le is not None:
        raise ConfigError(
            f"{key} must be between {ge if ge is not None else gt} and {le}, got {value}"
        )
    if gt is not None:
        raise ConfigError(f"{key} must be > {gt}, got {value}")
    raise ConfigError(f"{key} must be >= {ge}, got {value}")


def _check_declared(obj: Any, prefix: str) -> None:
    """`_check_value` for every key of a config section and its sub-sections."""
    hints = _declared(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_declared(value, f"{prefix}{f.name}.")
        else:
            _check_value(prefix + f.name, hints[f.name], f.metadata, value)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting ints to floats where a float is declared.

    A `Literal` type's choices are checked here, with the type; bounds and `Annotated` checks are
    checked by `validate` (`_check_value`).
    """
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be {_either(typing.get_args(tp))}, got {value!r}")
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(
            f"config key '{key}': {value!r} is not one of {[_type_name(a) for a in args]}"
        )
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp in (float, str, list, dict) and not isinstance(value, tp):
        if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, d: dict | None, prefix: str) -> Any:
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(
            f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {d!r}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys in "
            f"'{prefix.rstrip('.') or '<root>'}': {', '.join(names)}"
        )
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'a.b=value' into (['a', 'b'], parsed value); the value is parsed as YAML (1e-3, [1,2], true)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: cannot parse the value: {exc}") from None
    return key.split("."), value


def _set_nested(d: dict, path: list[str], value: Any) -> None:
    node = d
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is not a section")
    node[path[-1]] = value


def _read_file(path: str | os.PathLike) -> dict:
    """The raw mapping of a YAML config file (errors name the file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        # PyYAML's message spans several lines (with a caret drawing); keep what and where on one line
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {p} is not valid YAML{where}: {what}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {p} must hold a mapping of sections, got {type(raw).__name__}"
        )
    return raw


def _override(raw: dict, ov: str, source: str) -> None:
    """Apply one `section.key=value` override to `raw`; errors name `source` (what the user typed)."""
    keys, value = parse_override(ov)  # its errors already name the override
    try:
        _set_nested(raw, keys, value)
        _build(ExperimentConfig, raw, prefix="")  # type and key errors, blamed on this override
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple = (),
    sources: list[str] | None = None,
) -> ExperimentConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply dotted overrides.

    Errors name where the bad value came from: the file, or the override as the user typed it (so a user
    does not search a file for a value they typed on the command line). `sources` gives that name per
    override (the CLI passes `--epochs 0` for a shortcut flag); by default `--set <override>`.

    Raises:
        ConfigError: unknown key, wrong type or range, unreadable file; the message names the file or key.
    """
    raw: dict = _read_file(path) if path else {}
    if path:
        try:
            _build(ExperimentConfig, copy.deepcopy(raw), prefix="")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    sources = list(sources) if sources is not None else [f"--set {ov}" for ov in overrides]
    steps = [copy.deepcopy(raw)]
    for ov, source in zip(overrides, sources, strict=True):
        _override(raw, ov, source)
        steps.append(copy.deepcopy(raw))
    try:
        return ExperimentConfig.from_dict(raw)
    except ConfigError as exc:
        # A cross-field check failed: blame the first source after which the config stops validating.
        for i, step in enumerate(steps):
            try:
                ExperimentConfig.from_dict(step)
            except ConfigError:
                if i == 0 and path:
                    raise ConfigError(f"{path}: {exc}") from None
                if i > 0:
                    raise ConfigError(f"{sources[i - 1]}: {exc}") from None
        raise


def explicit_keys(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()
) -> list[str]:
    """Dotted keys a config file and overrides set explicitly (a dict-valued key like model.args is one key).

    `train --resume` uses this to tell a value the user asked for from a default.
    """
    raw: dict = _read_file(path) if path else {}
    for ov in overrides:
        keys, value = parse_override(ov)
        _set_nested(raw, keys, value)
    out: list[str] = []

    def walk(cls: type, d: dict, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for k, v in d.items():
            if k in hints and dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
                walk(hints[k], v, f"{prefix}{k}.")
            else:
                out.append(prefix + k)

    walk(ExperimentConfig, raw, "")
    return out


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    from raycell.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def defaults_yaml() -> str:
    """Every key with its default and help text, as commented YAML (the content of configs/base.yaml)."""
    lines = [
        "# raycell: every config key with its default (generated by `raycell config --defaults`).",
        "",
    ]

    def emit(obj: Any, indent: int) -> None:
        for f in dataclasses.fields(obj):
            val = getattr(obj, f.name)
            pad = "  " * indent
            if dataclasses.is_dataclass(val):
                doc = (type(val).__doc__ or "").strip().splitlines()[0]
                lines.append(f"{pad}{f.name}:  # {doc}")
                emit(val, indent + 1)
            else:
                dumped = yaml.safe_dump(val, default_flow_style=True).strip()
                if dumped.endswith("\n...") or dumped.endswith("..."):
                    dumped = dumped.replace("\n...", "").replace("...", "").strip()
                lines.append(f"{pad}{f.name}: {dumped}  # {f.metadata.get('help', '')}")

    emit(ExperimentConfig(), 0)
    return "\n".join(lines) + "\n"
