"""Every registered model: forward/backward on a tiny batch, shapes, no NaN, every parameter gets a gradient,
and the optional outputs its registry entry declares (and no others)."""

import typing

import pytest
import torch

from raycell.constants import ModelPreset
from raycell.losses import OPTIONAL_OUTPUTS, ModelOutput
from raycell.models import create_model, list_models, model_entry
from raycell.models.aec import PRESETS
from raycell.models.registry import UnknownModelError


@pytest.mark.parametrize("model_type", list_models())
def test_forward_backward_every_parameter_gets_gradient(model_type):
    torch.manual_seed(0)
    m = create_model(
        model_type, in_channels=2, n_classes=2, n_batches=3, preset="tiny", image_size=32
    )
    m.train()
    with (
        torch.no_grad()
    ):  # timm's ResNets start each residual branch at zero (zero_init_last): a zero
        for mod in (
            m.modules()
        ):  # norm scale passes no gradient back yet, by design; open it for the check
            if (
                isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)
                and mod.weight is not None
                and not mod.weight.abs().sum() > 0
            ):
                mod.weight.fill_(1.0)
    x = torch.rand(6, 2, 32, 32)
    z = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    out = m(x, z)
    entry = model_entry(model_type)
    assert isinstance(out, ModelOutput)
    assert out.latent.shape == (6, m.latent_dim)
    if entry.reconstructs:
        assert out.recon.shape == x.shape
    else:  # a classifier (timm backbones): no reconstruction, one softmax head of 2 classes
        assert out.recon is None
    assert out.logits.shape == ((6, 2) if entry.weak_labels else (6, 1))
    filled = out.present()
    assert [k for k in OPTIONAL_OUTPUTS if k in filled] == [
        k for k in OPTIONAL_OUTPUTS if k in model_entry(model_type).outputs
    ]
    total = 0
    for k, t in filled.items():
        assert torch.isfinite(t).all(), f"{k} has NaN/inf"
        total = total + t.float().sum()
    total.backward()
    missing = [
        n
        for n, p in m.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, f"parameters without gradient: {missing}"
    assert m.encode(x, z).shape == (6, m.latent_dim)


def test_reconstruction_in_unit_range_and_tied_decoder():
    m = create_model(
        "conventional", in_channels=2, n_classes=2, preset="tiny", output_mean=[0.1, 0.2]
    )
    out = m(torch.rand(4, 2, 32, 32))
    assert out.recon.min() >= 0 and out.recon.max() <= 1
    # tied: the decoder owns no conv kernels of its own, only biases, norms and the dense layer
    dec = {n for n, _ in m.decoder.named_parameters()}
    assert not any(
        "weight" in n and "norm" not in n and "dense" not in n and "act" not in n for n in dec
    )


def test_armed_preset_matches_reference_shapes():
    m = create_model("conventional", in_channels=1, n_classes=2, preset="armed")
    assert m.latent_dim == 56 and m.encoder.out_shape == (512, 32, 32)
    assert m.encoder.dense.in_features == 32 * 32 * 512


def test_multiclass_head_and_errors():
    m = create_model("conventional", in_channels=1, n_classes=4, preset="tiny")
    assert m(torch.rand(2, 1, 32, 32)).logits.shape == (2, 4)
    with pytest.raises(
        UnknownModelError, match="unknown model type 'nope'; registered: .*conventional"
    ):
        create_model("nope", in_channels=1, n_classes=2)
    with pytest.raises(TypeError, match="does not take argument.*latent_size"):
        create_model("conventional", in_channels=1, n_classes=2, latent_size=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        create_model("conventional", in_channels=1, n_classes=2, preset="huge")
    # the config's choices of model.preset are exactly the presets the builders know
    assert set(PRESETS) == set(typing.get_args(ModelPreset))
    with pytest.raises(ValueError, match="not divisible"):
        create_model("conventional", in_channels=1, n_classes=2, preset="tiny", image_size=30)
