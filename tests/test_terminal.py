"""What the terminal shows during training (one line per epoch, from history.jsonl), and the
data-path choice.
"""

import time

import pytest

from raycell.train.history import EpochPrinter, append_epoch, epoch_line


def test_epoch_line_shows_the_selection_metrics_and_skips_nan():
    line = epoch_line(
        {
            "epoch": 2,
            "train_loss": 0.01234,
            "val_auroc": 0.8123,
            "val_batch_probe": float("nan"),
            "epoch_time_s": 12.34,
            "val_mse": 0.1,
        },
        epochs=6,
    )
    assert line == "epoch 3/6  train_loss 0.01234  val_auroc 0.8123  12.3 s"


def test_epoch_printer_prints_each_new_epoch_once(tmp_path, capsys):
    hist = tmp_path / "history.jsonl"
    append_epoch(
        hist, {"epoch": 0, "train_loss": 1.0}
    )  # an earlier run's epoch (a resume): not repeated
    with EpochPrinter(hist, epochs=3, interval_s=0.05) as printer:
        append_epoch(hist, {"epoch": 1, "train_loss": 0.5})
        deadline = (
            time.monotonic() + 120
        )  # generous: the printer's thread may wait on a busy machine
        while 1 not in printer.shown and time.monotonic() < deadline:
            time.sleep(0.01)
        append_epoch(hist, {"epoch": 1, "train_loss": 0.4})  # a re-run epoch after a restart
        append_epoch(hist, {"epoch": 2, "train_loss": 0.25})  # written just before fit() returns
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln]
    assert lines == ["[raycell] epoch 2/3  train_loss 0.5", "[raycell] epoch 3/3  train_loss 0.25"]


def test_materialize_auto_holds_small_splits_and_streams_large_ones(tiny_data):
    from raycell.data.dataset import choose_materialize, split_nbytes
    from raycell.formats.shards import open_dataset

    ds = open_dataset(tiny_data)
    need = split_nbytes(ds, "train") + split_nbytes(ds, "val")
    assert split_nbytes(ds, "train") >= ds.manifest.counts_per_split["train"] * 2 * 32 * 32
    assert choose_materialize(ds, ("train", "val"), "auto", store_bytes=8 * need)  # fits: held
    assert not choose_materialize(
        ds, ("train", "val"), "auto", store_bytes=2 * need
    )  # > 1/4: streamed
    assert choose_materialize(ds, ("train",), "always", store_bytes=0)
    assert not choose_materialize(ds, ("train",), "never", store_bytes=1e12)


def test_raylet_messages_go_to_the_log_folder_and_only_real_problems_reach_the_terminal(
    tmp_path, capsys, monkeypatch
):
    """Not verbose: the raylet's worker-pool warnings stay in Ray's log folder; a worker killed for
    memory is one `[raycell] Ray:` line naming the file."""
    from raycell.utils import ray_utils as R

    monkeypatch.setattr(R, "ray_logs_dir", lambda: tmp_path)
    pool = (
        "WARNING: 12 PYTHON worker processes have been started on node: abc with address: 10.0.0.1. "
        "This could be a result of using a large number of actors, or due to tasks blocked in ray.get()."
    )
    R.show_raylet_message([pool])
    assert capsys.readouterr().err == ""
    oom = [
        "Task was killed due to the node running low on memory.",
        "Memory on the node was 23.1GB / 24GB.",
    ]
    R.show_raylet_message(oom)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"[raycell] Ray: {oom[0]} (whole message: {tmp_path / R.RAYLET_MESSAGES})"]
    assert (tmp_path / R.RAYLET_MESSAGES).read_text().splitlines() == [pool, *oom]


@pytest.mark.parametrize("verbose", [False, True])
def test_rays_own_start_lines_stay_off_the_terminal_unless_verbose(monkeypatch, verbose):
    """`ray.init` logs "Started a local Ray instance. View the dashboard ..." at INFO on the driver."""
    import logging

    import ray

    from raycell.utils import ray_utils as R

    got = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: got.update(kw))
    R.init_ray(progress=False, verbose=verbose)
    assert got["address"] == "local" and got["log_to_driver"] is verbose
    assert got["logging_level"] == (logging.INFO if verbose else logging.WARNING)
