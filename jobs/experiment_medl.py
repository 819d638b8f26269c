"""Ray job entry point for `raycell experiment medl`: conventional vs adversarial vs random/mixed effects.

    python jobs/experiment_medl.py --config configs/experiments/medl_small.yaml --seeds 0,1,2 \
        --out runs/medl_small
    ray job submit --working-dir . -- python jobs/experiment_medl.py \
        --config configs/experiments/medl_armed_gpu.yaml --seeds 0,1,2 --out /mnt/results/medl_armed

Trains every model for every seed through Ray Train, infers a soft Z for the unseen batches, runs Ray
Data inference (a second time with randomized Z for the models that use Z, unless --no-randomized-z)
and the evaluation, and writes `table.md`, `table.csv` and `results.json` into `--out` (re-running the
same command continues an interrupted experiment). Thin on purpose: the CLI verb.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds raycell/

from raycell.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["experiment", "medl", *sys.argv[1:]]))
