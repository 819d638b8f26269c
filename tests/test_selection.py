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

    cfg = load_config(
        None,
        tiny_overrides(tiny_valbatch_data, tmp_path, epochs=3)
        + ["train.checkpoints_to_keep=1", "train.max_steps_per_epoch=2", "name=sel"],
    )
    res = train(cfg)
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2]
    for h in res["history"]:
        for key in (
            "val_auroc",
            "valbatch_auroc",
            "valbatch_loss",
            "val_batch_probe",
            "val_composite",
        ):
            assert key in h and h[key] == h[key], (h["epoch"], key)  # present and not NaN
    run = tmp_path / res["run_dir"].rsplit("/", 1)[-1]
    assert [r["epoch"] for r in read_history(run / HISTORY_FILE)] == [0, 1, 2]
    on_disk = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in on_disk["history"]] == [0, 1, 2]
    # Ray kept one checkpoint (so its metrics_dataframe has one epoch): the file kept the rest
    assert len([d for d in run.glob("checkpoint_*") if d.is_dir()]) == 1


def test_train_infer_evaluate_serves_the_early_stopping_pick(monkeypatch, tmp_path):
    """Model selection reaches the user: with early stopping, the best epoch's checkpoint is
    inferred, not the last.
    """
    import raycell.pipeline as pipeline

    run = tmp_path / "run"
    best, last = run / "checkpoint_000001", run / "checkpoint_000003"
    seen = {}

    def fake_train(cfg):
        return {
            "run_dir": str(run),
            "checkpoint": str(last),
            "metrics": {},
            "history": [],
            "best_epoch": 1,
            "best_checkpoint": str(best),
        }

    def fake_infer_evaluate(cfg, checkpoint, out, z_source="", quiet=False):
        seen["checkpoint"] = str(checkpoint)
        return {"splits": {}}

    monkeypatch.setattr(pipeline, "run_train", fake_train)
    monkeypatch.setattr(pipeline, "infer_evaluate", fake_infer_evaluate)
    res = pipeline.train_infer_evaluate(load_config(None, []), tmp_path / "out")
    assert seen["checkpoint"] == str(best) and res["checkpoint"] == str(best)
    # without early stopping: the run folder, i.e. its latest checkpoint
    monkeypatch.setattr(
        pipeline,
        "run_train",
        lambda cfg: {"run_dir": str(run), "checkpoint": str(last), "metrics": {}, "history": []},
    )
    pipeline.train_infer_evaluate(load_config(None, []), tmp_path / "out")
    assert seen["checkpoint"] == str(run)
