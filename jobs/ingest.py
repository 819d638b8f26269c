"""Ray job entry point for `raycell ingest`: raw images -> crop shards + rejects table.

    python jobs/ingest.py --config configs/ingest/cellprofiler_example_human.yaml
    ray job submit --working-dir . -- python jobs/ingest.py \
        --config configs/ingest/synthetic_raw.yaml \
        --set ingest.input=/mnt/images --set ingest.out=/mnt/crops
    python jobs/ingest.py --preset phenix --input /mnt/plate1 --out /mnt/crops \
        --masks /mnt/plate1_cellpose        # instrument layout + the lab's own masks
    python jobs/ingest.py --preset jump --input /mnt/jump/images \
        --load-data /mnt/jump/load_data_csv --out /mnt/crops \
        --objects Nuclei.csv --objects-images Image.csv     # CellProfiler's objects

Thin on purpose: it runs the same code as the CLI. Under `ray job submit`, RAY_ADDRESS is set and
raycell joins that cluster instead of starting a local Ray. Exit status 2 on bad input.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds raycell/

from raycell.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
