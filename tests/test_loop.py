"""The training loop without Ray (LocalContext): the loss goes down, checkpoints resume where they stopped."""

from dataclasses import replace

import pytest
import torch
from conftest import tiny_overrides

from raycell.config import load_config
from raycell.data.dataset import CropCollate
from raycell.formats.categories import CategoryMap, UnknownCategoryError
from raycell.formats.checkpoint import find_checkpoint
from raycell.formats.spec import DataSpec
from raycell.models.checkpoint import load_checkpoint
from raycell.train.context import LocalContext
from raycell.train.loop import run_training
from raycell.train.trainer import training_setup


def _ctx(cfg, tmp_path, resume=None, labels=None):
    setup, ds = training_setup(cfg)
    if labels is not None:
        setup = replace(setup, labels=labels)
    col = CropCollate(setup.data_spec, setup.labels, setup.batches)
    return LocalContext(
        ds, col, cfg.data.batch_size, cfg.data.eval_batch_size, tmp_path, resume=resume
    ), setup


def test_training_lowers_the_loss(tiny_data, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, epochs=4))
    ctx, setup = _ctx(cfg, tmp_path)
    run_training(ctx, cfg, setup)
    h = ctx.history
    assert len(h) == 4
    assert h[-1]["train_loss"] < 0.8 * h[0]["train_loss"]
    assert h[-1]["train_mse"] < 0.8 * h[0]["train_mse"]  # the reconstruction is learnt
    assert (
        h[-1]["val_mse"] < 1.1 * h[0]["val_mse"]
    )  # and does not get worse on held-out cells (on 480
    # cells and 4 epochs val_mse barely moves: a strict decrease depended on package versions)
    assert all(k in h[-1] for k in ("val_auroc", "val_acc", "train_cls", "val_loss"))


def test_resume_continues_from_the_checkpoint(tiny_data, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path / "a", epochs=2))
    ctx, setup = _ctx(cfg, tmp_path / "a")
    run_training(ctx, cfg, setup)
    ck = find_checkpoint(tmp_path / "a")
    assert ck.name == "checkpoint_0001"
    model, meta = load_checkpoint(ck)
    assert meta.epoch == 1 and meta.labels.values == ("high", "low")
    assert meta.config["train"]["epochs"] == 2 and meta.data_spec.shape == (2, 32, 32)
    # continue to 4 epochs: starts at epoch 2 from the saved weights and optimiser state
    cfg4 = load_config(None, tiny_overrides(tiny_data, tmp_path / "b", epochs=4))
    ctx2, _ = _ctx(cfg4, tmp_path / "b", resume=ck)
    run_training(ctx2, cfg4, setup)
    assert [h["epoch"] for h in ctx2.history] == [2, 3]
    # a resumed run does not restart from scratch: its first loss is near where the first run ended
    assert ctx2.history[0]["train_loss"] < ctx.history[0]["train_loss"]


def test_label_outside_vocabulary_is_a_clear_error(tiny_data, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, epochs=1))
    ctx, setup = _ctx(cfg, tmp_path, labels=CategoryMap("label", ("high",)))
    with pytest.raises(
        UnknownCategoryError, match="label value 'low' is not in the training vocabulary"
    ):
        run_training(ctx, cfg, setup)


def test_loaded_checkpoint_is_the_model_that_was_saved(tiny_data, tmp_path, monkeypatch):
    import copy

    import raycell.train.loop as loop

    saved, save = [], loop.save_checkpoint  # the trained model as the loop saved it, epoch by epoch

    def spy(path, model, *a, **k):
        saved.append(copy.deepcopy(model).eval())
        return save(path, model, *a, **k)

    monkeypatch.setattr(loop, "save_checkpoint", spy)
    cfg = load_config(
        None, tiny_overrides(tiny_data, tmp_path, epochs=2) + ["train.max_steps_per_epoch=2"]
    )
    ctx, setup = _ctx(cfg, tmp_path)
    run_training(ctx, cfg, setup)
    model, meta = load_checkpoint(tmp_path)  # the run folder: its latest checkpoint
    # bit-identical needs the same memory format (train.channels_last picks other convolution kernels)
    assert cfg.train.channels_last
    model = model.to(memory_format=torch.channels_last)
    assert len(saved) == 2 and meta.epoch == 1 and not model.training
    x = torch.rand(3, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = x.contiguous(memory_format=torch.channels_last)
        got, want = model(x), saved[-1](x)
        torch.testing.assert_close(got.latent, want.latent, rtol=0, atol=0)
        torch.testing.assert_close(got.recon, want.recon, rtol=0, atol=0)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        # the comparison can tell models apart: the first epoch's weights give other outputs
        assert not torch.allclose(saved[0](x).latent, want.latent)


def test_history_file_appends_and_last_write_wins(tmp_path):
    from raycell.train.history import append_epoch, read_history

    f = tmp_path / "run" / "history.jsonl"
    assert read_history(f) == []
    append_epoch(f, {"epoch": 0, "val_auroc": 0.5})
    append_epoch(f, {"epoch": 1, "val_auroc": float("nan")})
    with open(f, "ab") as fh:  # a worker killed mid-line
        fh.write(b'{"epoch": 2, "val_au')
    append_epoch(f, {"epoch": 1, "val_auroc": 0.7})  # a restarted run re-runs epoch 1
    append_epoch(f, {"epoch": 2, "val_auroc": 0.8})
    h = read_history(f)
    assert [r["epoch"] for r in h] == [0, 1, 2]
    assert [r["val_auroc"] for r in h] == [0.5, 0.7, 0.8]
    assert len(f.read_text().splitlines()) == 5  # appended, never rewritten


def test_valbatch_metrics_and_history(tiny_valbatch_data, tmp_path):
    from raycell.formats.shards import open_dataset
    from raycell.train.history import read_history

    cfg = load_config(
        None,
        tiny_overrides(tiny_valbatch_data, tmp_path, epochs=2)
        + ["train.max_steps_per_epoch=2", "train.composite_weight=0.5"],
    )
    ctx, setup = _ctx(cfg, tmp_path)
    assert setup.valbatch
    vb = open_dataset(tiny_valbatch_data).manifest.split_params["val_batches"]
    assert vb and not set(vb) & set(setup.batches.values)  # never a training batch (Z row all zero)
    run_training(ctx, cfg, setup, history_file=str(tmp_path / "history.jsonl"))
    h = ctx.history[-1]
    for key in (
        "valbatch_auroc",
        "valbatch_loss",
        "valbatch_acc",
        "val_batch_probe",
        "val_batch_probe_chance",
        "val_composite",
    ):
        assert key in h, key
    assert 0 <= h["valbatch_auroc"] <= 1 and 0 <= h["val_batch_probe"] <= 1
    assert h["val_batch_probe_chance"] == pytest.approx(1 / len(setup.batches), abs=0.15)
    assert h["val_composite"] == pytest.approx(
        h["val_auroc"] - 0.5 * (h["val_batch_probe"] - h["val_batch_probe_chance"])
    )
    assert h["valbatch_loss"] != h["val_loss"]
    rec = read_history(tmp_path / "history.jsonl")
    assert [r["epoch"] for r in rec] == [0, 1] and rec[-1]["valbatch_auroc"] == h["valbatch_auroc"]


def test_no_valbatch_split_no_valbatch_metrics(tiny_data, tmp_path):
    cfg = load_config(
        None, tiny_overrides(tiny_data, tmp_path, epochs=1) + ["train.max_steps_per_epoch=2"]
    )
    ctx, setup = _ctx(cfg, tmp_path)
    assert not setup.valbatch
    run_training(ctx, cfg, setup)
    h = ctx.history[-1]
    assert not any(k.startswith("valbatch_") for k in h)
    assert "val_composite" in h and "val_batch_probe" in h


def test_timed_counts_only_the_time_spent_waiting_for_batches(monkeypatch):
    from types import SimpleNamespace

    import raycell.train.loop as loop

    now = [0.0]  # a clock that moves only when told: the count is exact on a busy machine too
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def slow():
        for i in range(3):
            now[0] += 0.5  # the data path
            yield i
        now[0] += 0.25  # finding out there is no more

    waited = [0.0]
    got = []
    for b in loop.timed(slow(), waited):
        got.append(b)
        now[0] += 10.0  # the model's step: not waiting on data
    assert got == [0, 1, 2]
    assert waited[0] == 1.75


def test_trimming_passes_every_batch_and_trims_on_its_cadence(monkeypatch):
    import raycell.utils.memory as mem

    calls = []
    monkeypatch.setattr(mem, "trim_heap", lambda: calls.append(1) or True)
    assert list(mem.trimming(iter(range(7)), every=3)) == list(range(7))
    assert len(calls) == 3  # after items 3 and 6, and once at the end


def test_trim_heap_returns_free_pages_to_the_os():
    """glibc only (the CI and cluster images): a freed fragmented heap shrinks after a trim."""
    import ctypes

    from raycell.utils.memory import trim_heap

    try:
        ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("not glibc: trim_heap is a no-op here")

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    # many heap-sized (below the mmap threshold) blocks with a small survivor after each: freeing the big
    # ones leaves holes that glibc keeps resident until a trim
    big, keep = [], []
    for _ in range(4000):
        big.append(bytearray(60_000))
        keep.append(bytearray(100))
    before = rss_mb()
    del big
    after_free = rss_mb()
    assert trim_heap() is True  # glibc's malloc_trim: memory was released
    after_trim = rss_mb()
    assert before - after_trim > 150, (before, after_free, after_trim)  # ~230 MB were freed
    del keep


def test_streamed_training_split_reads_ahead_a_bounded_amount():
    from raycell.train.trainer import stream_options

    cfg = load_config(None, ["data.stream_buffer_mb=100", "scaling.num_workers=3"])
    opts = stream_options(cfg, held=False)
    assert set(opts) == {
        "train"
    }  # validation keeps Ray's defaults (a bound throttled its read tasks)
    assert opts["train"].resource_limits.object_store_memory == 300 * 2**20
    assert stream_options(cfg, held=True) is None  # materialised splits are in the store already
    assert stream_options(load_config(None, ["data.stream_buffer_mb=0"]), held=False) is None
    with pytest.raises(Exception, match="stream_buffer_mb"):
        load_config(None, ["data.stream_buffer_mb=-1"])


def test_sliced_cuts_big_batches_into_views_and_drops_the_short_tail():
    from raycell.data.dataset import sliced

    big = [
        {"x": torch.arange(10).reshape(10, 1), "y": torch.arange(10)},
        {"x": torch.arange(10, 17).reshape(7, 1), "y": torch.arange(10, 17)},
    ]
    got = list(sliced(iter(big), 4, drop_last=True))
    assert [b["y"].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13]]
    assert (
        got[0]["x"].untyped_storage().data_ptr() == big[0]["x"].untyped_storage().data_ptr()
    )  # views
    assert [len(b["y"]) for b in sliced(iter(big), 4, drop_last=False)] == [4, 4, 2, 4, 3]


@pytest.mark.ray
@pytest.mark.parametrize("fetch", [1, 4])
def test_train_batches_from_ray_are_full_and_cover_the_split(ray_local, fetch):
    """`data.fetch_batches`: N batches' rows per Ray batch, cut in the worker.

    Every batch has batch_size rows, no row twice, and only the last incomplete batch's rows are
    left out (as Ray's drop_last does).
    """
    import ray.data
    from ray.data.collate_fn import ArrowBatchCollateFn

    from raycell.data.dataset import train_batches

    n, bs = 1000, 32

    class Ids(ArrowBatchCollateFn):  # an Arrow collate, as CropCollate is
        def __call__(self, t):
            return {"y": torch.as_tensor(t.column("id").to_numpy())}

    rd = ray.data.range(n, override_num_blocks=7)
    got = list(train_batches(rd, bs, Ids(), fetch=fetch, shuffle_buffer=128, shuffle_seed=3))
    assert all(len(b["y"]) == bs for b in got) and len(got) == n // bs
    ids = torch.cat([b["y"] for b in got]).tolist()
    assert len(set(ids)) == len(ids) == n // bs * bs
    assert ids != sorted(ids)  # shuffled


def test_fetch_factor_is_capped_for_large_crops():
    from raycell.data.dataset import fetch_factor

    spec = lambda px: DataSpec(("a", "b"), (2, px, px), "uint8")  # noqa: E731
    assert fetch_factor(4, 64, spec(64)) == 4  # 0.5 MiB per batch: fetched 4 at a time
    assert fetch_factor(4, 64, spec(128)) == 2  # 2 MiB per batch
    assert fetch_factor(4, 64, spec(256)) == 1  # 8 MiB per batch: no fetching ahead
    assert fetch_factor(1, 64, spec(64)) == 1 and fetch_factor(4, 64, None) == 4


def _stopping_run(cfg, root, history, rule, resume=None):
    """A LocalContext run of `cfg` under an early-stopping rule, recording into `history`."""
    setup, ds = training_setup(cfg, early_stopping=rule)
    ctx = LocalContext(
        ds,
        CropCollate(setup.data_spec, setup.labels, setup.batches),
        cfg.data.batch_size,
        cfg.data.eval_batch_size,
        root,
        resume=resume,
    )
    run_training(ctx, cfg, setup, history_file=str(history))
    return ctx


def test_early_stopping_ends_the_loop_after_the_report_that_spends_the_patience(
    tiny_data, tmp_path, capsys
):
    from raycell.train.history import read_history
    from raycell.train.stopping import EarlyStopping

    # the epoch number, minimised: epoch 0 stays the best, so the patience of 2 is spent after epoch 2
    rule = EarlyStopping(patience=2, metric="epoch", mode="min")
    over = tiny_overrides(tiny_data, tmp_path, epochs=6) + ["train.max_steps_per_epoch=2"]
    ctx = _stopping_run(load_config(None, over), tmp_path, tmp_path / "h.jsonl", rule)
    assert [h["epoch"] for h in ctx.history] == [0, 1, 2]  # reported, then stopped
    assert [c.name for c in ctx.checkpoints] == [f"checkpoint_000{e}" for e in range(3)]
    assert [r["epoch"] for r in read_history(tmp_path / "h.jsonl")] == [0, 1, 2]
    assert (
        "[raycell] early stopping after epoch 2: epoch has not improved on 0.0000 (epoch 0) "
        "for 2 epoch(s)" in capsys.readouterr().out
    )


def test_a_resumed_run_counts_its_recorded_epochs_towards_the_patience(tiny_data, tmp_path):
    from raycell.train.stopping import EarlyStopping

    rule = EarlyStopping(patience=3, metric="epoch", mode="min")
    hist = tmp_path / "h.jsonl"
    steps = ["train.max_steps_per_epoch=2"]
    cfg2 = load_config(None, tiny_overrides(tiny_data, tmp_path / "a", epochs=2) + steps)
    _stopping_run(cfg2, tmp_path / "a", hist, rule)  # epochs 0 (the best) and 1: not yet spent
    cfg8 = load_config(None, tiny_overrides(tiny_data, tmp_path / "b", epochs=8) + steps)
    ck = find_checkpoint(tmp_path / "a")
    ctx = _stopping_run(cfg8, tmp_path / "b", hist, rule, resume=ck)
    assert [h["epoch"] for h in ctx.history] == [2, 3]  # 3 epochs after epoch 0, not after epoch 2


def test_val_auroc_is_evaluates_auroc_on_the_same_predictions(tiny_data, tmp_path):
    """The loop's last val_auroc and `raycell evaluate`'s AUROC of the saved model on the val split."""
    import numpy as np

    from raycell import constants as K
    from raycell.eval.evaluate import split_metrics
    from raycell.formats.shards import open_dataset
    from raycell.infer.predictor import CropPredictor

    cfg = load_config(
        None, tiny_overrides(tiny_data, tmp_path, epochs=2) + ["train.max_steps_per_epoch=3"]
    )
    ctx, setup = _ctx(cfg, tmp_path)
    run_training(ctx, cfg, setup)
    val = open_dataset(tiny_data).read_table(splits=[K.VAL])
    pred = CropPredictor(str(tmp_path), device="cpu")(val)
    df = pred.drop_columns([K.LATENT]).to_pandas()
    latents = np.stack(pred.column(K.LATENT).to_numpy(zero_copy_only=False))
    res = split_metrics(df, latents, list(setup.labels.values))
    assert 0.0 < res["auroc"] < 1.0 and res["n"] == val.num_rows
    assert res["auroc"] == pytest.approx(ctx.history[-1]["val_auroc"], abs=1e-12)
