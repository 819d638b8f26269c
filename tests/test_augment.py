"""Batch-effect augmentation: each effect changes a tensor the way it says, in range, reproducibly."""

import pytest
import torch

from raycell.data.augment import AUGMENTATIONS, augment_batch, parse_augment


def _batch(n=8, c=2, size=32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand((n, c, size, size), generator=g) * 0.5 + 0.25
    x[:, :, 12:20, 12:20] = 0.9  # a bright object, so blur has an edge to soften
    return x


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_each_effect_keeps_shape_and_range_and_is_reproducible(name):
    x = _batch()
    a = augment_batch(x, (name,), _gen(), strength=1.0)
    b = augment_batch(x, (name,), _gen(), strength=1.0)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)  # same generator seed: same augmentation
    assert not torch.equal(
        a, augment_batch(x, (name,), _gen(2), strength=1.0)
    )  # another seed: another one
    assert not torch.allclose(a, x)  # it does something
    assert torch.equal(augment_batch(x, (name,), _gen(), strength=0.0), x)  # strength 0: unchanged
    assert torch.equal(x, _batch())  # the input is not modified in place


def test_effects_do_what_they_say():
    x = _batch()
    gain = augment_batch(x, ("gain",), _gen())
    ratio = gain.mean((2, 3)) / x.mean((2, 3))
    assert (
        ratio.std() > 0.05 and (ratio > 0.7).all() and (ratio < 1.4).all()
    )  # per cell and channel
    blur = augment_batch(x, ("blur",), _gen())
    edge = lambda t: (t[..., :, 1:] - t[..., :, :-1]).abs().mean((1, 2, 3))  # noqa: E731
    assert (edge(blur) <= edge(x) + 1e-6).all() and (
        edge(blur) < edge(x) - 1e-3
    ).any()  # some cells
    mix = augment_batch(x, ("mix",), _gen())
    corr = lambda t: torch.corrcoef(torch.stack([t[:, 0].flatten(), t[:, 1].flatten()]))[0, 1]  # noqa: E731
    assert corr(mix) > corr(x) + 0.01  # crosstalk makes the channels more alike
    bg = augment_batch(x, ("background",), _gen())
    assert (bg >= x - 1e-6).all()  # an additive, non-negative background
    noise = augment_batch(x, ("noise",), _gen())
    assert 0 < float((noise - x).std()) < 0.05


def test_parse_augment():
    assert parse_augment("") == ()
    assert parse_augment("all") == tuple(AUGMENTATIONS)
    assert parse_augment("noise, gain") == ("gain", "noise")  # fixed order
    with pytest.raises(ValueError, match=r"unknown augmentation\(s\) \['blurr'\]"):
        parse_augment("blurr")


def test_training_with_augmentation_runs_and_is_reproducible(tiny_data, tmp_path):
    from conftest import tiny_overrides
    from test_loop import _ctx

    from raycell.config import load_config
    from raycell.train.loop import run_training

    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, epochs=1) + ["train.augment=all"])
    runs = []
    for i in range(2):
        ctx, setup = _ctx(cfg, tmp_path / str(i))
        run_training(ctx, cfg, setup)
        runs.append(ctx.history[-1]["train_loss"])
    assert runs[0] == runs[1]


def test_unknown_augmentation_is_refused_before_training(tiny_data):
    from raycell.config import ConfigError, load_config
    from raycell.train.trainer import check_train

    with pytest.raises(ConfigError, match=r"train.augment: unknown augmentation\(s\) \['blurr'\]"):
        check_train(load_config(None, [f"data.path={tiny_data}", "train.augment=gain,blurr"]))
