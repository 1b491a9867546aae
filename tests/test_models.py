"""Model builders (layer structure, parameter counts) and the optimizer factory."""
from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from mnist_opt.study.space import DEFAULTS
from mnist_opt.training.models import build_model
from mnist_opt.training.loop import make_optimizer


def _layers(model: keras.Model, kind: type) -> list:
    return [layer for layer in model.layers if isinstance(layer, kind)]


def _mlp(units: list[int], dropout: list[float], batch_norm: bool) -> dict:
    params = {"n_layers": len(units), "batch_norm": batch_norm, "activation": "relu"}
    for i, (u, d) in enumerate(zip(units, dropout)):
        params[f"units_l{i}"], params[f"dropout_l{i}"] = u, d
    return params


def _mlp_param_count(units: list[int], batch_norm: bool) -> int:
    total, fan_in = 0, 28 * 28
    for u in units:
        total += fan_in * u + (4 * u if batch_norm else u)  # BN: gamma, beta, mean, variance
        fan_in = u
    return total + fan_in * 10 + 10


MLP_CASES = [
    ([82, 4, 76, 12], [0.1, 0.0, 0.3, 0.2], True),
    ([128, 64], [0.0, 0.5], False),
    ([300], [0.0], False),
    ([64, 32, 16], [0.2, 0.2, 0.2], True),
]


@pytest.mark.parametrize("units,dropout,batch_norm", MLP_CASES)
def test_mlp_structure(units, dropout, batch_norm):
    model = build_model(_mlp(units, dropout, batch_norm))
    dense = _layers(model, layers.Dense)
    assert len(dense) == len(units) + 1
    assert [d.units for d in dense] == units + [10]
    assert [d.use_bias for d in dense[:-1]] == [not batch_norm] * len(units)
    assert len(_layers(model, layers.BatchNormalization)) == (len(units) if batch_norm else 0)
    assert sorted(d.rate for d in _layers(model, layers.Dropout)) == sorted(r for r in dropout if r > 0)
    flatten = _layers(model, layers.Flatten)
    assert len(flatten) == 1 and flatten[0].output.shape == (None, 784)
    assert model.output_shape == (None, 10)
    assert model.count_params() == _mlp_param_count(units, batch_norm)


def test_mlp_dropout_follows_its_layer():
    model = build_model(_mlp([50, 40, 30], [0.0, 0.25, 0.0], False))
    kinds = [type(layer).__name__ for layer in model.layers]
    # Input, Flatten, Dense, Act, Dense, Act, Dropout, Dense, Act, Dense(out)
    assert kinds.index("Dropout") == kinds.index("Dense") + 4
    assert _layers(model, layers.Dropout)[0].rate == 0.25


def _cnn(**overrides) -> dict:
    """A full CNN params dict: the table's defaults (as suggest_params fills them in) and
    the values under test."""
    params = {**DEFAULTS["cnn"], "n_blocks": 2, "filters_b0": 16, "filters_b1": 32,
              "dense_units": 64}
    del params["filters"]  # per layer: filters_b{i}
    params.update(overrides)
    return params


@pytest.mark.parametrize("n_blocks,filters", [(1, [8]), (2, [16, 32]), (3, [16, 32, 64])])
def test_cnn_blocks(n_blocks, filters):
    params = _cnn(n_blocks=n_blocks, **{f"filters_b{i}": f for i, f in enumerate(filters)})
    model = build_model(params)
    convs = _layers(model, layers.Conv2D)
    assert len(convs) == n_blocks
    assert [c.filters for c in convs] == filters
    assert len(_layers(model, layers.MaxPooling2D)) == n_blocks
    assert model.output_shape == (None, 10)


def test_cnn_gap_head():
    model = build_model(_cnn(head="gap"))
    assert len(_layers(model, layers.GlobalAveragePooling2D)) == 1
    assert not _layers(model, layers.Flatten)
    assert [d.units for d in _layers(model, layers.Dense)] == [10]


def test_cnn_dense_head():
    model = build_model(_cnn(head="dense", dense_units=48, dropout=0.3))
    assert len(_layers(model, layers.Flatten)) == 1
    assert not _layers(model, layers.GlobalAveragePooling2D)
    assert [d.units for d in _layers(model, layers.Dense)] == [48, 10]
    assert [d.rate for d in _layers(model, layers.Dropout)] == [0.3]


def test_cnn_valid_padding_falls_back_to_same():
    """28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4: a third 5×5 'valid' conv cannot fit."""
    model = build_model(_cnn(n_blocks=3, filters_b2=64, kernel_size=5, padding="valid"))
    convs = _layers(model, layers.Conv2D)
    assert [c.padding for c in convs] == ["valid", "valid", "same"]
    assert [tuple(c.output.shape[1:3]) for c in convs] == [(24, 24), (8, 8), (4, 4)]
    assert model.output_shape == (None, 10)


def test_cnn_batch_norm_drops_conv_bias():
    model = build_model(_cnn(batch_norm=True))
    assert [c.use_bias for c in _layers(model, layers.Conv2D)] == [False, False]
    assert len(_layers(model, layers.BatchNormalization)) == 3  # two blocks + dense head


def test_cnn_param_count_by_hand():
    model = build_model(_cnn(n_blocks=1, filters_b0=8, padding="valid", dense_units=16))
    conv = 3 * 3 * 1 * 8 + 8          # 80; 28 -> 26 -> pool -> 13
    dense = 13 * 13 * 8 * 16 + 16     # 21648
    out = 16 * 10 + 10                # 170
    assert model.count_params() == conv + dense + out == 21898


def test_cnn_gap_param_count_by_hand():
    model = build_model(_cnn(head="gap", batch_norm=True))
    conv0 = 3 * 3 * 1 * 16 + 4 * 16    # no bias, BN
    conv1 = 3 * 3 * 16 * 32 + 4 * 32
    out = 32 * 10 + 10
    assert model.count_params() == conv0 + conv1 + out


# --- optimizers --------------------------------------------------------------------------

def test_adam():
    opt = make_optimizer({"optimizer": "adam", "learning_rate": 0.003}, 100)
    assert type(opt) is keras.optimizers.Adam
    assert float(opt.learning_rate) == pytest.approx(0.003)


def test_sgd_is_nesterov():
    opt = make_optimizer({"optimizer": "sgd", "learning_rate": 0.05}, 100)
    assert type(opt) is keras.optimizers.SGD
    assert opt.nesterov is True
    assert opt.momentum == pytest.approx(0.9)


def test_adamw_weight_decay():
    opt = make_optimizer({"optimizer": "adamw", "learning_rate": 0.001, "weight_decay": 3e-4}, 100)
    assert type(opt) is keras.optimizers.AdamW
    assert opt.weight_decay == pytest.approx(3e-4)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="adam, sgd, adamw"):
        make_optimizer({"optimizer": "adagrad", "learning_rate": 0.001}, 10)


def test_exponential_schedule_decays_once_per_epoch():
    steps = 422
    opt = make_optimizer({"optimizer": "adam", "learning_rate": 0.01, "lr_schedule": "exponential",
                          "lr_decay": 0.8}, steps)
    expected = {0: 0.01, steps - 1: 0.01, steps: 0.008, 2 * steps: 0.0064, 3 * steps - 1: 0.0064}
    for step, lr in expected.items():
        opt.iterations.assign(step)
        assert float(opt.learning_rate) == pytest.approx(lr, rel=1e-5), step


def test_no_schedule_is_constant():
    opt = make_optimizer({"optimizer": "sgd", "learning_rate": 0.1, "lr_schedule": "none",
                          "lr_decay": 0.5}, 10)
    opt.iterations.assign(100)
    assert float(opt.learning_rate) == pytest.approx(0.1)


def test_cnn_two_convs_per_block_and_augmentation_only_in_training():
    model = build_model(_cnn(convs_per_block=2, augment=0.1))
    assert [c.filters for c in _layers(model, layers.Conv2D)] == [16, 16, 32, 32]
    assert len(_layers(model, layers.MaxPooling2D)) == 2
    shift = _layers(model, layers.RandomTranslation)[0]
    assert shift.height_factor == shift.width_factor == 0.1
    x = np.random.default_rng(0).random((4, 28, 28, 1)).astype("float32")
    inference = [np.asarray(shift(x, training=False)) for _ in range(2)]
    assert np.array_equal(inference[0], x) and np.array_equal(inference[1], x)
    assert not np.array_equal(np.asarray(shift(x, training=True)), x)
