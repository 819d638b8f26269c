"""What the statistics pass and the crop pass share: FOV records as a Ray Dataset, and reading one.

Both passes run one Ray Data task per `ingest.fovs_per_task` fields of view (FOVs): the planned FOV
records travel as JSON strings with their position in the plan (`index`, which names the crop
task's shard files), and each task reads its FOVs with `read_fov`.
"""

from __future__ import annotations

import json

import numpy as np

from raycell.ingest import images as imio
from raycell.ingest.params import IngestParams


def read_fov(fov: dict, p: IngestParams, ch: dict) -> tuple[np.ndarray, dict]:
    """Read and Z-project one planned FOV; ImageError when its channel count is not the plan's."""
    img, info = imio.load_fov_image(fov, ch["slots"], p.z_projection, p.axes)
    if img.shape[0] != len(ch["names"]):
        raise imio.ImageError(
            "channel-count",
            f"{fov['files'][0]['relpath']}: {img.shape[0]} channels, "
            f"expected {len(ch['names'])} ({ch['names']})",
        )
    return img, info


def fov_dataset(fovs: list[dict], p: IngestParams):
    """A Ray Dataset of FOV records (JSON strings) and their plan positions, `ingest.fovs_per_task`
    records per block.
    """
    import ray

    n_blocks = max(1, -(-len(fovs) // max(1, p.fovs_per_task)))
    items = [
        {"fov_id": f["fov_id"], "index": i, "record": json.dumps(f)} for i, f in enumerate(fovs)
    ]
    return ray.data.from_items(items, override_num_blocks=n_blocks)


def map_fovs(ds, fn, p: IngestParams, fn_kwargs: dict, num_gpus: float = 0.0):
    """`ds.map_batches(fn)` with the task size, CPUs and worker count of the ingest parameters.

    `num_gpus`: GPUs each task requests (the crop pass with cellpose on a GPU); Ray then runs the
    tasks on nodes with a GPU and only as many at once as the GPUs hold.
    """
    import ray

    compute = ray.data.TaskPoolStrategy(size=p.num_workers) if p.num_workers > 0 else None
    gpu = {"num_gpus": num_gpus} if num_gpus > 0 else {}
    return ds.map_batches(
        fn,
        batch_size=max(1, p.fovs_per_task),
        batch_format="pyarrow",
        num_cpus=p.cpus_per_task,
        compute=compute,
        fn_kwargs=fn_kwargs,
        **gpu,
    )
