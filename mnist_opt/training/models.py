"""Model builders: pure functions from a params dict to an uncompiled Keras model.

Search and retrain share them, so "retrain the best trial" is ``build_model(best_params)``.
"""
from __future__ import annotations

from typing import Any

import keras
from keras import layers

from mnist_opt.study.params import FAMILIES, layer_name

INPUT_SHAPE = (28, 28, 1)
N_CLASSES = 10


def _dense_block(x, units: int, params: dict[str, Any], dropout: float):
    # Without a bias when batch norm follows: BN's beta does the same job.
    x = layers.Dense(units, use_bias=not params["batch_norm"])(x)
    if params["batch_norm"]:
        x = layers.BatchNormalization()(x)
    x = layers.Activation(params["activation"])(x)
    return layers.Dropout(dropout)(x) if dropout > 0 else x


def build_mlp(params: dict[str, Any]) -> keras.Model:
    """Dense layers ``units_l{i}`` (Dense → [BatchNorm] → activation → [Dropout ``dropout_l{i}``])."""
    inputs = keras.Input(INPUT_SHAPE)
    x = layers.Flatten()(inputs)
    for i in range(params["n_layers"]):
        x = _dense_block(x, params[layer_name("mlp", "units", i)], params,
                         params[layer_name("mlp", "dropout", i)])
    outputs = layers.Dense(N_CLASSES, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="mlp")


def build_cnn(params: dict[str, Any]) -> keras.Model:
    """Conv blocks ``filters_b{i}`` ((conv → [BN] → act) × ``convs_per_block`` → [pool] →
    [dropout]) and a dense or GAP head.

    ``augment`` > 0 shifts training images by up to that fraction of their size (a Keras
    layer, so it is off at inference and travels with the saved model). A 'valid'
    convolution that would not fit the remaining feature map uses 'same' padding, and
    pooling is skipped below 2×2, so every point of the space builds.
    """
    inputs = keras.Input(INPUT_SHAPE)
    x, size, k = inputs, INPUT_SHAPE[0], params["kernel_size"]
    if params["augment"] > 0:
        x = layers.RandomTranslation(params["augment"], params["augment"], fill_mode="constant")(x)
    for i in range(params["n_blocks"]):
        for _ in range(params["convs_per_block"]):
            padding = params["padding"] if size - k + 1 >= 2 else "same"
            x = layers.Conv2D(params[layer_name("cnn", "filters", i)], k, padding=padding,
                              use_bias=not params["batch_norm"])(x)
            size = size if padding == "same" else size - k + 1
            if params["batch_norm"]:
                x = layers.BatchNormalization()(x)
            x = layers.Activation(params["activation"])(x)
        if params["pooling"] != "none" and size >= 2:
            pool = layers.MaxPooling2D if params["pooling"] == "max" else layers.AveragePooling2D
            x, size = pool(2)(x), size // 2
        if params["conv_dropout"] > 0:
            x = layers.Dropout(params["conv_dropout"])(x)
    if params["head"] == "gap":
        x = layers.GlobalAveragePooling2D()(x)
    else:
        x = layers.Flatten()(x)
        x = _dense_block(x, params["dense_units"], params, 0.0)
    if params["dropout"] > 0:
        x = layers.Dropout(params["dropout"])(x)
    outputs = layers.Dense(N_CLASSES, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="cnn")


BUILDERS = {"mlp": build_mlp, "cnn": build_cnn}


def build_model(params: dict[str, Any]) -> keras.Model:
    """The model for a full params dict (as returned by ``space.suggest_params``)."""
    family = next(model for model, f in FAMILIES.items() if f.depth in params)
    return BUILDERS[family](params)
