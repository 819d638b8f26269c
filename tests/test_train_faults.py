"""A training worker that dies mid-epoch: Ray Train restarts it from the last checkpoint, and with
`data.shuffle_seed` the restarted run is the same as an undisturbed one, epoch for epoch."""

import json

import pytest
from conftest import tiny_overrides

from raycell.config import load_config


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


@pytest.mark.ray
@pytest.mark.slow
def test_worker_killed_mid_epoch_restarts_and_matches_an_undisturbed_run(
    tiny_data, ray_local, tmp_path
):
    from raycell.train.loop import CHAOS_MARKER
    from raycell.train.trainer import train

    base = tiny_overrides(tiny_data, tmp_path / "runs", epochs=2) + ["data.shuffle_seed=7"]
    calm = train(load_config(None, base + ["name=calm"]))
    steps = calm["history"][0]["steps"]
    # rank 0 calls os._exit a few steps into epoch 1 (after the epoch-0 checkpoint)
    hit = train(
        load_config(
            None,
            base
            + ["name=hit", "train.max_failures=1", f"train.chaos_kill_after_steps={steps + 2}"],
        )
    )
    from pathlib import Path

    hit_dir = Path(hit["run_dir"])
    assert "after" in (hit_dir / CHAOS_MARKER).read_text()  # the drill fired
    a, b = _history(Path(calm["run_dir"])), _history(hit_dir)
    assert [h["epoch"] for h in b] == [0, 1]  # every epoch once: epoch 1 re-ran from the checkpoint
    for x, y in zip(a, b, strict=True):  # same data order and draws after the restart: same numbers
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-6)
        assert x["val_auroc"] == pytest.approx(y["val_auroc"], abs=1e-9)
    assert hit["metrics"]["epoch"] == 1


def test_shuffle_seed_and_drill_are_validated():
    from raycell.config import ConfigError

    with pytest.raises(ConfigError, match="data.shuffle_seed must be >= -1"):
        load_config(None, ["data.shuffle_seed=-2"])
    with pytest.raises(ConfigError, match="train.chaos_kill_after_steps must be >= 0"):
        load_config(None, ["train.chaos_kill_after_steps=-1"])
