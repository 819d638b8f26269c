"""Model selection across batches through Ray Train: every epoch's metrics survive, valbatch metrics."""

import json

import pytest
from conftest import tiny_overrides

from raycell.config import load_config
from raycell.train.history import HISTORY_FILE, read_history


@pytest.mark.ray
def test_every_epoch_survives_and_valbatch_is_reported(tiny_valbatch_data, ray_local, tmp_path):
    """3 epochs keeping 1 checkpoint: Ray's metrics_dataframe has epoch 2 only, the history all three."""
    from raycell.train.trainer import train

    cfg = load_config(None, tiny_overrides(tiny_valbatch_data, tmp_path, epochs=3)
                      + ["train.checkpoints_to_keep=1", "train.max_steps_per_epoch=2", "name=sel"])
    res = train(cfg)
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2]
    for h in res["history"]:
        for key in ("val_auroc", "valbatch_auroc", "valbatch_loss", "val_batch_probe", "val_composite"):
            assert key in h and h[key] == h[key], (h["epoch"], key)  # present and not NaN
    run = tmp_path / res["run_dir"].rsplit("/", 1)[-1]
    assert [r["epoch"] for r in read_history(run / HISTORY_FILE)] == [0, 1, 2]
    on_disk = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in on_disk["history"]] == [0, 1, 2]
    # Ray kept one checkpoint (so its metrics_dataframe has one epoch): the file kept the rest
    assert len([d for d in run.glob("checkpoint_*") if d.is_dir()]) == 1
