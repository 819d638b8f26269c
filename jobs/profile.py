"""Ray job entry point for `raycell profile`.

`ray job submit --working-dir . -- python jobs/profile.py [flags]`.

Thin on purpose: it runs the same code as the CLI (pycytominer and copairs in the job's driver; no
Ray tasks), so a profile step can follow `jobs/embed.py` in the same job pipeline on a cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds raycell/

from raycell.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
