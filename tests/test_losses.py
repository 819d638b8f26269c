"""Loss terms and the typed outputs: per-cell SSIM/MSE on the device agree with skimage/numpy, the
library calls give the hand-written formulas they replaced, and the output dataclasses refuse bad values."""

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from raycell.losses import LossOutput, ModelOutput, cluster_ce, per_cell_mse, per_cell_ssim
from raycell.models.random_effects import one_hot_design


def _pairs(n, c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g)
    # reconstructions from near-identical to unrelated, so SSIM spans its range
    noise = torch.randn(n, c, h, w, generator=g) * torch.linspace(0.01, 1, n)[:, None, None, None]
    y = (x + noise).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("shape", [(6, 2, 32, 32), (4, 1, 16, 20), (3, 3, 5, 5), (2, 2, 4, 9)])
def test_per_cell_ssim_matches_skimage(shape):
    x, y = _pairs(*shape, seed=sum(shape))
    win = min(7, shape[2], shape[3])
    win -= 1 - win % 2  # skimage's default: 7, or the largest odd size that fits
    want = [
        structural_similarity(a, b, channel_axis=0, data_range=1.0, win_size=win)
        for a, b in zip(x.numpy().astype(np.float64), y.numpy().astype(np.float64))
    ]
    got = per_cell_ssim(x, y, data_range=1.0)
    assert got.dtype == torch.float64 and got.shape == (shape[0],)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
    assert float(want[-1]) < 0.5 < float(want[0])  # the test covers low and high SSIM
    torch.testing.assert_close(per_cell_ssim(x, x), torch.ones(shape[0], dtype=torch.float64))


def test_per_cell_ssim_refuses_crops_below_3px():
    with pytest.raises(ValueError, match="too small for SSIM"):
        per_cell_ssim(torch.rand(1, 1, 2, 8), torch.rand(1, 1, 2, 8))


def test_per_cell_mse_matches_numpy():
    x, y = _pairs(5, 2, 8, 8, seed=0)
    want = (
        ((x.numpy().astype(np.float64) - y.numpy().astype(np.float64)) ** 2).reshape(5, -1).mean(1)
    )
    np.testing.assert_allclose(per_cell_mse(x, y).numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match="different shapes"):
        per_cell_mse(x, y[:, :1])


def test_cluster_ce_is_the_soft_target_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=g)
    z = torch.softmax(torch.randn(7, 4, generator=g), 1)
    z[2] = 0  # a cell of no training batch: adds 0, counts in the mean
    want = -(z * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(cluster_ce(logits, z), want)


def test_one_hot_design_has_zero_rows_for_unknown_batches():
    z = one_hot_design(torch.tensor([2, -1, 0, 1]), 3)
    want = torch.tensor([[0, 0, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float32)
    assert torch.equal(z, want)


def test_output_dataclasses_validate():
    lat, rec, log = torch.zeros(4, 3), torch.zeros(4, 1, 8, 8), torch.zeros(4, 1)
    out = ModelOutput(lat, rec, log, kl=torch.tensor(0.5))
    assert set(out.present()) == {"latent", "recon", "logits", "kl"}
    with pytest.raises(TypeError, match="logits is required"):
        ModelOutput(lat, rec, None)
    with pytest.raises(ValueError, match="batch_logits has shape"):
        ModelOutput(lat, rec, log, batch_logits=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="kl must be a scalar"):
        ModelOutput(lat, rec, log, kl=torch.zeros(2))
    lo = LossOutput(torch.tensor(1.5), {"mse": torch.tensor(0.25), "cls": torch.tensor(2.0)})
    assert lo.values() == {"loss": 1.5, "mse": 0.25, "cls": 2.0}
    with pytest.raises(ValueError, match="loss must be a scalar"):
        LossOutput(torch.zeros(3))
    with pytest.raises(ValueError, match=r"terms\['mse'\] must be a scalar"):
        LossOutput(torch.tensor(1.0), {"mse": torch.zeros(2)})
    with pytest.raises(ValueError, match="must not hold 'loss'"):
        LossOutput(torch.tensor(1.0), {"loss": torch.tensor(1.0)})
