"""The run setup: built once from the config and the data set, and whole after Ray Train's boundary."""

import pytest
from conftest import tiny_overrides

from raycell import constants as K
from raycell.config import ConfigError, load_config
from raycell.formats.categories import CategoryMap
from raycell.train.setup import Balance, RunSetup
from raycell.train.stopping import EarlyStopping
from raycell.train.trainer import training_setup


def test_the_setup_crosses_the_ray_boundary_whole(tiny_data, tmp_path):
    over = tiny_overrides(tiny_data, tmp_path)
    plain, ds = training_setup(load_config(None, over))
    batches = list(plain.batches.values)
    rule = EarlyStopping(2, "val_loss", "min")
    fold, _ = training_setup(load_config(None, over), fold=batches[:1], early_stopping=rule)
    assert fold.fold_batches == tuple(batches[:1]) and fold.valbatch  # the fold's held-out batch
    assert fold.batches.values == tuple(batches[1:])  # leaves the design matrix
    assert fold.channel_means and len(fold.channel_means) == fold.data_spec.shape[0]
    zcfg = load_config(None, over + ["model.type=zpredictor"])
    balance = Balance(CategoryMap(K.LABEL, ("high", "low")), ((0.5, 2.0),) * len(batches))
    zsetup, _ = training_setup(zcfg, balance=balance)
    assert zsetup.heads == (zsetup.batches,)  # the Z-predictor's head: the training batches
    for setup in (plain, fold, zsetup):
        assert RunSetup.from_dict(setup.to_dict()) == setup
    assert RunSetup.from_dict(fold.to_dict()).early_stopping == rule
    assert RunSetup.from_dict(zsetup.to_dict()).balance == balance


def test_the_setup_takes_the_config_normalisation_and_step_count(tiny_data, tmp_path):
    over = tiny_overrides(tiny_data, tmp_path)
    n_train = open_train_rows(tiny_data)
    for norm in ("global", "crop"):
        setup, _ = training_setup(load_config(None, over + [f"data.normalize={norm}"]))
        assert setup.data_spec.normalize == norm
        assert setup.steps_per_epoch == n_train // 32  # data.batch_size 32, one worker
    capped, _ = training_setup(load_config(None, over + ["train.max_steps_per_epoch=2"]))
    assert capped.steps_per_epoch == 2


def open_train_rows(data) -> int:
    from raycell.formats.shards import open_dataset

    return open_dataset(data).manifest.counts_per_split[K.TRAIN]


def test_balance_is_refused_for_a_model_type_without_a_batch_head(tiny_data, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path))
    balance = Balance(CategoryMap(K.LABEL, ("high", "low")), ((1.0, 1.0),))
    with pytest.raises(ConfigError, match="balanced loss weights are for the Z-predictor"):
        training_setup(cfg, balance=balance)


def test_a_fold_of_a_batch_head_model_is_refused_in_one_line(tiny_data, tmp_path):
    # a batch classifier has no class for the batch a fold holds out: refused, whether or not the data
    # set has a valbatch split of its own (tiny_data has none)
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path) + ["model.type=zpredictor"])
    batches = list(training_setup(cfg)[0].batches.values)
    with pytest.raises(ConfigError, match="predicts the training batches.*tune.folds=0"):
        training_setup(cfg, fold=batches[:1])


def test_early_stopping_from_the_config_minimises_losses():
    assert EarlyStopping.from_config(0, "val_acc") is None
    assert EarlyStopping.from_config(3, "val_loss") == EarlyStopping(3, "val_loss", "min")
    assert EarlyStopping.from_config(2, "valbatch_auroc") == EarlyStopping(2, "valbatch_auroc")
