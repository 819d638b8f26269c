"""The registry: a new model type is one module and one decorator, and then trains, saves, loads, infers
and evaluates with no change anywhere else (docs/models.md); registration and plans check that a type's
entry, outputs and auxiliary networks fit together."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_overrides
from torch import nn

from raycell import constants as K
from raycell.config import LossConfig, load_config
from raycell.data.dataset import CropCollate
from raycell.formats.shards import open_dataset
from raycell.losses import LossOutput, ModelOutput
from raycell.models import (
    build_plan,
    create_model,
    list_models,
    model_entry,
    register_model,
    unregister_model,
)
from raycell.models.checkpoint import load_checkpoint
from raycell.models.registry import UnknownModelError
from raycell.plans import AdversarialPlan, TrainingPlan

TOY = "toy_linear_aec"


# --- the whole of a new model type: a module, a builder and its decorator (here with its own plan) -----


class LinearAEC(nn.Module):
    """A linear autoencoder-classifier: flatten -> latent -> (sigmoid reconstruction, phenotype logit)."""

    def __init__(self, in_channels: int, n_classes: int, image_size: int, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.shape = (in_channels, image_size, image_size)
        self.encoder = nn.Linear(in_channels * image_size**2, latent_dim)
        self.decoder = nn.Linear(latent_dim, in_channels * image_size**2)
        self.head = nn.Linear(latent_dim, 1 if n_classes == 2 else n_classes)

    def encode(self, x, z=None):
        return self.encoder(x.flatten(1))

    def forward(self, x, z=None) -> ModelOutput:
        latent = self.encode(x)
        recon = torch.sigmoid(self.decoder(latent)).view(-1, *self.shape)
        return ModelOutput(latent=latent, recon=recon, logits=self.head(latent))


class ShrinkLatentPlan(TrainingPlan):
    """The default objective plus a small penalty on the latent's size, logged as its own term."""

    def compute_loss(self, out, x, y, z) -> LossOutput:
        base = super().compute_loss(out, x, y, z)
        l2 = out.latent.pow(2).mean()
        return LossOutput(base.loss + 1e-3 * l2, {**base.terms, "latent_l2": l2})


def linear_aec(
    in_channels: int,
    n_classes: int,
    n_batches: int = 1,
    preset: str = "tiny",
    image_size: int = 32,
    output_mean: list[float] | None = None,
    latent_dim: int = 6,
):
    return LinearAEC(in_channels, n_classes, image_size, latent_dim)


@pytest.fixture
def toy_type():
    """Register the toy type for one test (the decorator, applied here), and remove it afterwards."""
    register_model(TOY, plan=ShrinkLatentPlan)(linear_aec)
    yield TOY
    unregister_model(TOY)
    assert TOY not in list_models()


def test_a_registered_toy_type_trains_saves_infers_and_evaluates(toy_type, tiny_data, tmp_path):
    from raycell.eval.evaluate import split_metrics
    from raycell.infer.predictor import CropPredictor
    from raycell.train.context import LocalContext
    from raycell.train.loop import run_training
    from raycell.train.trainer import check_train, training_setup

    # train: the same loop as every type, in-process
    cfg = load_config(
        None, tiny_overrides(tiny_data, tmp_path / "runs", epochs=3) + [f"model.type={toy_type}"]
    )
    check_train(cfg)  # the driver's check accepts the new type
    setup, ds = training_setup(cfg)
    col = CropCollate(setup.data_spec, setup.labels, setup.batches)
    ctx = LocalContext(ds, col, cfg.data.batch_size, cfg.data.eval_batch_size, tmp_path / "run")
    run_training(ctx, cfg, setup)
    h = ctx.history
    assert h[-1]["train_loss"] < h[0]["train_loss"] and h[-1]["val_mse"] < h[0]["val_mse"]
    assert {"train_latent_l2", "val_latent_l2", "val_auroc"} <= set(
        h[-1]
    )  # the plan's own term is logged

    # load: the checkpoint rebuilds the toy from the registry
    model, meta = load_checkpoint(tmp_path / "run")
    assert meta.model_type == toy_type and meta.uses_z is False and meta.epoch == 2
    assert isinstance(model, LinearAEC) and not model.training

    # infer: the predictor on an Arrow table of the tiny data set
    t = pq.read_table(open_dataset(tiny_data).shard_paths[0])
    pred = CropPredictor(str(meta.path), device="cpu")(t)
    assert pred.num_rows == t.num_rows
    assert {K.LATENT, K.PROB, K.PRED, K.RECON_MSE, K.RECON_SSIM} <= set(pred.column_names)
    assert K.LATENT_RE not in pred.column_names and K.BATCH_PROB not in pred.column_names
    latents = np.stack(pred.column(K.LATENT).to_numpy(zero_copy_only=False))
    assert latents.shape == (t.num_rows, 6)

    # evaluate: the metrics of a split from these predictions
    df = pred.drop_columns([K.LATENT]).to_pandas()
    res = split_metrics(df, latents, list(meta.labels.values))
    assert res["n"] == t.num_rows and 0 <= res["auroc"] <= 1
    assert res["mse"] == pytest.approx(float(pd.Series(df[K.RECON_MSE]).mean()))
    assert -1 <= res["ssim"] <= 1 and np.isfinite(res["batch_silhouette"])


def test_entry_carries_plan_z_and_outputs_and_duplicates_or_unknowns_raise(toy_type):
    entry = model_entry(toy_type)
    assert entry.plan is ShrinkLatentPlan and entry.uses_z is False and entry.outputs == ()
    assert (
        model_entry("conventional").plan is TrainingPlan
    )  # no fallback: the default is in the entry
    assert model_entry("mixedeffects").uses_z and "latent_re" in model_entry("mixedeffects").outputs
    with pytest.raises(ValueError, match="registered twice"):
        register_model(toy_type)(linear_aec)
    with pytest.raises(
        UnknownModelError, match=f"unknown model type 'nope'; registered: .*{toy_type}"
    ):
        model_entry("nope")
    m = create_model(toy_type, in_channels=2, n_classes=2)
    assert type(build_plan(m, LossConfig(), 1e-3)) is ShrinkLatentPlan


def test_registration_refuses_outputs_that_do_not_fit_the_plan():
    with pytest.raises(ValueError, match=r"plan AdversarialPlan reads outputs \['batch_logits'\]"):
        register_model("toy_bad", plan=AdversarialPlan)(linear_aec)
    with pytest.raises(ValueError, match="not optional ModelOutput fields"):
        register_model("toy_bad", outputs=("features",))(linear_aec)
    assert "toy_bad" not in list_models()


def test_a_plan_names_the_auxiliary_network_a_model_lacks():
    register_model("toy_no_adversary", plan=AdversarialPlan, outputs=("batch_logits",))(linear_aec)
    try:
        m = create_model("toy_no_adversary", in_channels=2, n_classes=2)
        with pytest.raises(
            TypeError,
            match=r"model type 'toy_no_adversary' lacks \['adversary', "
            r"'adversary_inputs\(\) .*AdversarialPlan",
        ):
            build_plan(m, LossConfig(), 1e-3, n_batches=3)
    finally:
        unregister_model("toy_no_adversary")
