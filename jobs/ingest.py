"""Ray job entry point for `ingest`: raw images -> crop shards + rejects table.

    python jobs/ingest.py --config configs/ingest/cellprofiler_example_human.yaml
    ray job submit --working-dir . -- python jobs/ingest.py \
        --config configs/ingest/synthetic_raw.yaml \
        --set ingest.input=/mnt/images --set ingest.out=/mnt/crops

Joins the cluster named by `ray.address` / RAY_ADDRESS (as under `ray job submit`), else starts a
local Ray with spare logical CPUs. Prints the ingest summary as JSON; exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse --config/--set, start or join Ray, run the ingest, print its summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", "-c", help="YAML config (see configs/ingest/)")
    ap.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set ingest.num_workers=2 (repeatable)",
    )
    args = ap.parse_args(argv)

    from raycell.config import ConfigError, load_config
    from raycell.ingest.run import check_config, run_ingest
    from raycell.ingest.segment import SegmentationError
    from raycell.ingest.sources import IngestError
    from raycell.utils.ray_utils import init_ray

    try:
        cfg = load_config(args.config, args.overrides)
        check_config(cfg)  # bad options fail here, before a Ray cluster is started
        init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_mb, cfg.ray.progress)
        summary = run_ingest(cfg)
    except (ConfigError, IngestError, SegmentationError) as exc:
        print(f"raycell ingest: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
