"""Ray job entry point for `raycell ingest`: raw images -> crop shards + rejects table.

    python jobs/ingest.py --config configs/ingest/cellprofiler_example_human.yaml
    ray job submit --working-dir . -- python jobs/ingest.py \
        --config configs/ingest/synthetic_raw.yaml \
        --set ingest.input=/mnt/images --set ingest.out=/mnt/crops

Thin on purpose: it runs the same code as the CLI. Under `ray job submit`, RAY_ADDRESS is set and
raycell joins that cluster instead of starting a local Ray. Exit status 2 on bad input.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds raycell/

from raycell.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
