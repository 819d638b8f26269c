"""Per-crop intensity normalisation (`data.normalize: crop`): the maths on tensors, the spec round trip, and
a model trained with it served with it (the loop without Ray, then the batch-inference predictor)."""

import pytest
import torch
from conftest import tiny_overrides

from raycell.config import ConfigError, load_config
from raycell.formats.spec import DataSpec, normalize_crops

SPEC = DataSpec(("dna", "actin"), (2, 16, 16), "uint16", "global")
CROP = SPEC.with_normalize("crop")


def _crops(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 3000, (n, 2, 16, 16), generator=g, dtype=torch.int32)


def test_global_gives_todays_numbers():
    x = _crops()
    for dtype, top in (("uint8", 255.0), ("uint16", 65535.0)):
        xi = x % 256 if dtype == "uint8" else x
        spec = DataSpec(("a", "b"), (2, 16, 16), dtype, "global")
        assert torch.equal(
            spec.to_float(xi), xi.float() * (1.0 / top)
        )  # the formula before the option


def test_crop_normalises_each_crop_and_channel_to_0_1():
    x = _crops()
    x[:, 1] *= 10  # a ten times brighter channel
    y = CROP.to_float(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    flat = y.flatten(2)
    # every crop channel spans [0, 1] on its own (pixels beyond the 1st/99th percentiles are clipped)
    torch.testing.assert_close(flat.amin(2), torch.zeros(4, 2))
    torch.testing.assert_close(flat.amax(2), torch.ones(4, 2))
    # per channel: the bright channel is not brighter after normalisation
    assert abs(y[:, 0].mean().item() - y[:, 1].mean().item()) < 0.05
    # a single crop (C, H, W) works too and gives the same numbers as in a batch
    torch.testing.assert_close(CROP.to_float(x[2]), y[2])


def test_gain_and_offset_of_a_crop_do_not_change_the_model_input():
    """The point of the lever: a batch's brightness and offset no longer reach the model."""
    x = _crops()
    gain = torch.tensor([[2, 5], [3, 1], [7, 2], [1, 4]]).view(4, 2, 1, 1)
    offset = torch.tensor([[700, 0], [50, 1200], [0, 9], [3000, 30]]).view(4, 2, 1, 1)
    x2 = x * gain + offset  # per crop and per channel, still integers within uint16
    assert x2.max() < 65535
    torch.testing.assert_close(CROP.to_float(x2), CROP.to_float(x), atol=1e-5, rtol=0)
    assert not torch.allclose(SPEC.to_float(x2), SPEC.to_float(x))  # 'global' keeps the shortcut


def test_constant_crop_gives_zeros_not_nan():
    x = _crops(n=3)
    x[0] = 500  # a whole crop constant
    x[1, 1] = 0  # one channel black
    y = CROP.to_float(x)
    assert torch.isfinite(y).all()
    assert (y[0] == 0).all() and (y[1, 1] == 0).all()
    assert y[1, 0].max() == 1  # the other channel of that crop is normalised as usual


def test_percentiles_not_min_max_so_a_hot_pixel_does_not_set_the_scale():
    x = _crops(n=1).float()
    x[0, 0, 0, 0] = 60000.0  # one saturated speck
    y = normalize_crops(x)
    minmax = (x - x.amin((2, 3), keepdim=True)) / (
        x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True)
    )
    assert y[0, 0].median() > 0.3 and minmax[0, 0].median() < 0.06


def test_spec_round_trip_and_old_checkpoints():
    d = CROP.to_dict()
    assert d["normalize"] == "crop" and DataSpec.from_dict(d) == CROP
    old = {
        "channel_names": ["dna", "actin"],
        "shape": [2, 16, 16],
        "dtype": "uint16",
    }  # before the key
    assert DataSpec.from_dict(old).normalize == "global" and DataSpec.from_dict(old) == SPEC
    # a saved value this version does not know (a file's, not the config's): load_checkpoint names the file
    with pytest.raises(
        ValueError, match=r"^data_spec.normalize must be global or crop, got 'percentile'$"
    ):
        DataSpec.from_dict({**old, "normalize": "percentile"})


def test_bad_normalize_is_one_line_before_training(tiny_data, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^--set data.normalize=per-image: data.normalize must be global or crop, "
        r"got 'per-image'$",
    ):
        load_config(None, [*tiny_overrides(tiny_data, tmp_path), "data.normalize=per-image"])


def test_a_model_trained_with_crop_normalisation_is_served_with_it(tiny_data, tmp_path):
    import json

    import pyarrow as pa

    from raycell import constants as K
    from raycell.formats.checkpoint import find_checkpoint
    from raycell.formats.shards import decode_images, open_dataset
    from raycell.infer.predictor import CropPredictor
    from raycell.models.checkpoint import load_checkpoint
    from raycell.models.random_effects import one_hot_design
    from raycell.train.context import LocalContext
    from raycell.train.loop import make_collate, run_training
    from raycell.train.trainer import training_setup

    cfg = load_config(
        None, tiny_overrides(tiny_data, tmp_path, epochs=1) + ["train.max_steps_per_epoch=2"]
    )
    cfg.data.normalize = "crop"
    setup, ds = training_setup(cfg)
    assert setup.data_spec.normalize == "crop"
    ctx = LocalContext(
        ds, make_collate(setup), cfg.data.batch_size, cfg.data.eval_batch_size, tmp_path
    )
    run_training(ctx, cfg, setup)
    assert ctx.history[-1]["train_loss"] == ctx.history[-1]["train_loss"]  # finite (not NaN)
    model, meta = load_checkpoint(tmp_path)
    assert meta.data_spec.normalize == "crop"
    assert (
        json.loads((find_checkpoint(tmp_path) / "meta.json").read_text())["data_spec"]["normalize"]
        == "crop"
    )

    pred = CropPredictor(str(tmp_path), device="cpu")
    assert pred.spec.normalize == "crop"
    t = open_dataset(tiny_data).read_table(splits=[K.TEST]).slice(0, 8)
    out = pred(t)
    imgs = decode_images(t, pred.spec.shape, pred.spec.dtype)
    raw = torch.from_numpy(imgs.astype("int32"))
    z = one_hot_design(
        torch.from_numpy(pred.batch_map.encode(t.column(K.BATCH), allow_unknown=True)),
        len(pred.batch_map),
    )
    with torch.no_grad():
        want = model(pred.spec.to_float(raw), z).latent.numpy()
        other = model(pred.spec.with_normalize("global").to_float(raw), z).latent.numpy()
    got = pa.array(out.column(K.LATENT)).flatten().to_numpy().reshape(len(t), -1).copy()
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(torch.from_numpy(got), torch.from_numpy(other), atol=1e-4)
