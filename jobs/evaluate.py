"""Ray job entry point for `raycell evaluate`.

    ray job submit --working-dir . -- python jobs/evaluate.py [flags]

Thin on purpose: it runs the same code as the CLI. Under `ray job submit`, RAY_ADDRESS is set and
raycell joins that cluster instead of starting a local Ray.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds raycell/

from raycell.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
