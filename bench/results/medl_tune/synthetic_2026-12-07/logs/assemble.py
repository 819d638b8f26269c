"""Assemble table.md/results.json of /tmp/w28s/medl_tune from the rows finished so far (no Ray, no
training): what `raycell experiment medl` writes at its end, via its own _write_tables.
"""

import json
import sys
import time
from pathlib import Path

from raycell.config import load_config
from raycell.eval.baseline import baseline_label, baseline_sources, feature_source
from raycell.experiments import MEDL_MODELS, TUNED, _write_tables, row_label

out = Path("/tmp/w28s/medl_tune")
cfg = load_config(
    "configs/experiments/medl_small.yaml",
    ["data.path=/tmp/w28s/medl_synth", "train.max_steps_per_epoch=30"],
)
seeds = [0, 1, 2]
models = MEDL_MODELS
chosen = {
    m: json.loads((out / "tune" / m / "chosen.json").read_text())
    for m in models
    if (out / "tune" / m / "chosen.json").is_file()
}
labels = [lab for m in models for lab in (row_label(m, False), row_label(m, False) + TUNED)]
sources = baseline_sources(cfg.data.path, cfg.eval.baseline_features)
labels += [baseline_label(feature_source(cfg.data.path, f)) for f in sources]
rows = []
for s in seeds:
    for m in models:
        for d in (m, f"{m}_tuned"):
            f = out / f"seed{s}" / d / "result.json"
            if f.is_file():
                rows.append(json.loads(f.read_text()))
    for f in sorted((out / f"seed{s}").glob("baseline*/result.json")):
        rows.append(json.loads(f.read_text()))
cmd = sys.argv[1] if len(sys.argv) > 1 else ""
res = _write_tables(out, cfg, seeds, models, labels, rows, cmd, time.time(), chosen=chosen)
