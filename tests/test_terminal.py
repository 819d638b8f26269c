"""What the terminal shows during training: one line per epoch, read from history.jsonl by the driver."""

import time

from raycell.train.history import EpochPrinter, append_epoch, epoch_line


def test_epoch_line_shows_the_selection_metrics_and_skips_nan():
    line = epoch_line({"epoch": 2, "train_loss": 0.01234, "val_auroc": 0.8123, "val_batch_probe": float("nan"),
                       "epoch_time_s": 12.34, "val_mse": 0.1}, epochs=6)
    assert line == "epoch 3/6  train_loss 0.01234  val_auroc 0.8123  12.3 s"


def test_epoch_printer_prints_each_new_epoch_once(tmp_path, capsys):
    hist = tmp_path / "history.jsonl"
    append_epoch(hist, {"epoch": 0, "train_loss": 1.0})  # an earlier run's epoch (a resume): not repeated
    with EpochPrinter(hist, epochs=3, interval_s=0.05):
        append_epoch(hist, {"epoch": 1, "train_loss": 0.5})
        time.sleep(0.3)
        append_epoch(hist, {"epoch": 1, "train_loss": 0.4})  # a re-run epoch after a restart
        append_epoch(hist, {"epoch": 2, "train_loss": 0.25})  # written just before fit() returns
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln]
    assert lines == ["[raycell] epoch 2/3  train_loss 0.5", "[raycell] epoch 3/3  train_loss 0.25"]
