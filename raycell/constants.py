"""Column names, split names and format versions shared by every stage.

Keeping them in one place means a shard written by `synth` or `ingest` is read by `train`, `infer` and
`evaluate` with the same names, and a rename is one edit.
"""

from __future__ import annotations

from typing import Literal, get_args

SCHEMA_VERSION = 1

# Crop-shard columns (SPEC "Crop shards").
CELL_ID = "cell_id"
IMAGE = "image"
HEIGHT = "height"
WIDTH = "width"
CHANNELS = "channels"
DTYPE = "dtype"
BATCH = "batch"
PLATE = "plate"
WELL = "well"
FIELD = "field"
GROUP = "group"
LABEL = "label"
SPLIT = "split"
SOURCE = "source"
CENTROID_Y = "centroid_y"
CENTROID_X = "centroid_x"
MORPH_PREFIX = "morph_"
FEAT_PREFIX = (
    "feat_"  # the crops' intensity and texture features stored by ingest (ingest.crop_features)
)

IMAGE_COLUMNS = (IMAGE, HEIGHT, WIDTH, CHANNELS, DTYPE)
REQUIRED_COLUMNS = (CELL_ID, IMAGE, HEIGHT, WIDTH, CHANNELS, DTYPE, BATCH, LABEL, SPLIT)
METADATA_COLUMNS = (BATCH, PLATE, WELL, FIELD, GROUP, LABEL, SPLIT, SOURCE, CENTROID_Y, CENTROID_X)

# Split values. "" means "not assigned yet" (before `raycell split`).
TRAIN, VAL, TEST, UNSEEN = "train", "val", "test", "unseen"
# Seen batches held out whole for model selection (leave-one-batch-out validation; `split.val_batches`).
VALBATCH = "valbatch"
SPLITS = (TRAIN, VAL, TEST, UNSEEN, VALBATCH)
UNASSIGNED = ""

# Data set folder layout.
MANIFEST = "dataset.json"
# Keys a data set manifest of any version has; without them the folder is not a raycell data set
# (the manifest reader refuses it, and the output rules do not recognise it as raycell's).
MANIFEST_REQUIRED_KEYS = (
    "schema_version",
    "channel_names",
    "channels",
    "crop_size",
    "dtype",
    "label_vocab",
    "batch_vocab",
    "shards",
)
SHARD_DIR = "shards"
SHARD_GLOB = "part-*.parquet"

# Inference outputs.
LATENT = "latent"
LATENT_RE = "latent_re"
PROB = "prob"
PRED = "pred"
BATCH_PROB = "batch_prob"
RECON = "recon"
RECON_MSE = "recon_mse"
RECON_SSIM = "recon_ssim"
PREDICTIONS_MANIFEST = "predictions.json"
EMBEDDINGS_MANIFEST = "embeddings.json"  # `raycell embed`: the same shards in the profiling layout
WELL_PROFILES = "well_profiles.parquet"
# cells per profile row, under the name pycytominer and CellProfiler give it
CELL_COUNT = "Metadata_Count_Cells"

# Choices of config keys that code outside raycell/config.py also names: each is declared once, as the
# `Literal` type of its config field; the tuples are the same values for `in` tests and CLI choices.
# How stored crops become model input (`data.normalize`; raycell/formats/spec.py).
NormalizeMode = Literal["global", "crop"]
NORMALIZE_MODES: tuple[str, ...] = get_args(NormalizeMode)
# The model input's normalisation when none is given (config, `DataSpec`, training): per crop, because
# it generalised better to unseen batches (docs/generalisation.md).
DEFAULT_NORMALIZE: NormalizeMode = "crop"
# Which hand-made features the baseline uses (`eval.baseline_features`; raycell/eval/baseline.py).
BaselineFeatures = Literal["auto", "morph", "crops", "all"]
BASELINE_FEATURES: tuple[str, ...] = get_args(BaselineFeatures)
# How unseen batches get their design matrix Z (`infer.z_mode`; raycell/zpredictor.py).
ZMode = Literal["predicted", "balanced", "uniform", "zero"]
Z_MODES: tuple[str, ...] = get_args(ZMode)
# Network sizes of the autoencoders (`model.preset`; the keys of raycell/models/aec.py `PRESETS`).
ModelPreset = Literal["armed", "small", "tiny"]
# `data.parquet_reader`: Ray Data's DataContext.use_datasource_v2 off / on.
ParquetReader = Literal["v1", "v2"]
PARQUET_READERS: tuple[str, ...] = get_args(ParquetReader)
# `raycell profile` (`profile.*`; raycell/profiling/): the feature set, the per-well reduction, who
# reduces (pandas or Ray Data), the per-plate normalisation, pycytominer's feature selections, copairs'
# distance and consistency level, and the batch corrections `profile.compare` scores.
ProfileFeatures = Literal["embedding", "morph", "all", "handmade", "cpmeasure"]
FEATURE_SETS: tuple[str, ...] = get_args(ProfileFeatures)
Aggregation = Literal["median", "mean"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
ProfileEngine = Literal["auto", "memory", "ray"]
ENGINES: tuple[str, ...] = get_args(ProfileEngine)
ProfileNormalization = Literal["mad_robustize", "robustize", "standardize", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(ProfileNormalization)
FeatureSelection = Literal[
    "variance_threshold",
    "correlation_threshold",
    "drop_na_columns",
    "blocklist",
    "drop_outliers",
]
SELECTIONS: tuple[str, ...] = get_args(FeatureSelection)
ProfileDistance = Literal["cosine", "correlation", "euclidean", "abs_cosine"]
ConsistencyLevel = Literal["treatment", "well"]
CONSISTENCY_LEVELS: tuple[str, ...] = get_args(ConsistencyLevel)
Correction = Literal["raw", "control", "harmony", "control+harmony"]
CORRECTIONS: tuple[str, ...] = get_args(Correction)
# parquet schema metadata key of every prediction shard (what produced it)
INFER_PROVENANCE = b"raycell.infer"
