"""Shared fixtures: a tiny synthetic data set (32 px), one local Ray for the whole session, run folders.

A test that starts Ray (through `ray_local`, or a CLI verb that calls `init_ray`) must be marked `ray`, so
that `-m "not ray"` (`make test-fast`) runs without Ray: `pytest_runtest_teardown` fails an unmarked test
that left Ray running when it was not before.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

SHARED_DATA = Path(
    os.environ.get(
        "RAYCELL_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
).resolve()
TINY = dict(n_cells=480, crop_size=32, rows_per_shard=120, seed=0)


def tiny_overrides(data: Path, runs: Path, epochs: int = 2) -> list[str]:
    """Config overrides for a fast run on the tiny data set."""
    return [
        f"data.path={data}",
        "model.preset=tiny",
        f"train.epochs={epochs}",
        "data.batch_size=32",
        "data.shuffle_buffer=64",
        "data.eval_batch_size=128",
        f"train.runs_dir={runs}",
        "ray.progress=false",
        "data.block_size_mb=1",
    ]


_RAY_BEFORE = pytest.StashKey[bool]()  # per test: was Ray running before its set-up?


def _ray_running() -> bool:
    ray = sys.modules.get("ray")  # not imported: not running (and no import just to ask)
    return ray is not None and ray.is_initialized()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_RAY_BEFORE] = _ray_running()  # before any fixture of the test (ray_local included)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    started = (
        not item.stash.get(_RAY_BEFORE, True) and _ray_running()
    )  # asked before ray_local stops
    yield  # the test's own teardown runs in full first
    if started and item.get_closest_marker("ray") is None:
        pytest.fail(
            f"{item.nodeid} started Ray but is not marked `ray` (so `-m 'not ray'` would start "
            "Ray): add @pytest.mark.ray",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A split tiny synthetic data set (read-only for tests: copy it before changing it)."""
    from raycell.data.splits import split_dataset
    from raycell.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("data") / "tiny"
    write_synthetic(str(out), **TINY)
    split_dataset(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_valbatch_data(tiny_data, tmp_path_factory) -> Path:
    """The tiny data set re-split with one seen batch held out whole as `valbatch` (read-only for tests)."""
    import shutil

    from raycell.data.splits import split_dataset

    out = tmp_path_factory.mktemp("data") / "tiny_valbatch"
    shutil.copytree(tiny_data, out)
    split_dataset(str(out), val_batches=["auto:1"])
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray per test session (starting Ray costs ~5-7 s)."""
    import ray

    from raycell.utils.ray_utils import init_ray

    init_ray(num_cpus=4, progress=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_run(tiny_data, ray_local, tmp_path_factory) -> dict:
    """A conventional AEC trained for 2 epochs on the tiny data through Ray Train (shared by infer tests)."""
    from raycell.config import load_config
    from raycell.train.trainer import train

    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, tiny_overrides(tiny_data, runs, epochs=2) + ["name=shared"])
    return train(cfg)
