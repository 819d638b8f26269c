"""Run experiment medl --tune's search of one model type (raycell.experiments.tune_model) in its own Ray."""

import sys
from pathlib import Path

from raycell.config import load_config
from raycell.experiments import tune_model
from raycell.utils.ray_utils import init_ray

model = sys.argv[1]
cfg = load_config(
    "configs/experiments/medl_small.yaml",
    ["data.path=/tmp/w28s/medl_synth", "train.max_steps_per_epoch=30", "ray.progress=false"],
)
init_ray(num_cpus=0)
print(tune_model(cfg, model, Path("/tmp/w28s/medl_tune/tune") / model, 2, 2), flush=True)
