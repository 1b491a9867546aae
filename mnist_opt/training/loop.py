"""The one training loop: search, retrain, lr-find and the benchmark all call
:func:`study_split` for their data, :func:`fresh_model` for a model and :func:`train`."""
from __future__ import annotations

import gc
import math
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from mnist_opt import data
from mnist_opt.study.config import StudyConfig
from mnist_opt.training.callbacks import StopInEpoch
from mnist_opt.training.models import build_model


def study_split(cfg: StudyConfig) -> data.Split:
    """The study's stratified train/validation split (of its search subset, if it has one)."""
    return data.split(data.load(cfg.dataset), cfg.data.val_fraction, cfg.data.seed,
                      cfg.search_subset)


_IMPORTS_FROZEN = False


def fresh_model(params: dict[str, Any], seed: int, freeze: bool = False) -> keras.Model:
    """A new model for ``params``, initialised from ``seed``, in a fresh Keras session.

    Clearing the session gives fresh layer names and lets the last model be collected. A
    full collection scans every object the process holds, about 0.4 s once TensorFlow is
    imported (``bench/trial_phases.py --long-lived``), so what survives the first one (the
    imported modules, the data: they live as long as the process) is frozen out of later
    scans. ``freeze`` (short-lived worker processes only): freeze what survives every
    collection, so later ones scan one trial's objects, not every graph TensorFlow leaked;
    a long-lived process must not, since frozen objects that die later are never freed.
    """
    global _IMPORTS_FROZEN
    keras.backend.clear_session(free_memory=False)
    gc.collect()
    if freeze or not _IMPORTS_FROZEN:
        gc.freeze()
        _IMPORTS_FROZEN = True
    keras.utils.set_random_seed(seed)
    return build_model(params)


# The optimizers a study may name (the parameter table's `optimizer` choices; a test keeps
# the two in step): Adam, SGD with Nesterov momentum, AdamW with decoupled weight decay.
OPTIMIZERS: dict[str, Callable[[Any, dict[str, Any]], keras.optimizers.Optimizer]] = {
    "adam": lambda lr, params: keras.optimizers.Adam(lr),
    "sgd": lambda lr, params: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
    "adamw": lambda lr, params: keras.optimizers.AdamW(lr, weight_decay=params["weight_decay"]),
}


def make_optimizer(params: dict[str, Any], steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The params' optimizer, with an optional per-epoch exponential decay.

    The schedule decays by ``lr_decay`` once per epoch, as in the well-known MNIST codelab.
    """
    lr: Any = params["learning_rate"]
    if params.get("lr_schedule") == "exponential":
        lr = keras.optimizers.schedules.ExponentialDecay(
            lr, decay_steps=steps_per_epoch, decay_rate=params["lr_decay"], staircase=True)
    name = params["optimizer"]
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](lr, params)


_TENSORS: dict[int, tuple[np.ndarray, tf.Tensor]] = {}


def _tensor(array: np.ndarray) -> tf.Tensor:
    """``array`` as a tensor, copied once per process: every trial trains on the same split.

    Keyed by identity (the cache holds the array, so the id stays valid); a few entries
    (train and validation images and labels) are all a process needs.
    """
    hit = _TENSORS.get(id(array))
    if hit is None:
        if len(_TENSORS) >= 8:
            _TENSORS.clear()
        hit = _TENSORS[id(array)] = (array, tf.constant(array))
    return hit[1]


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int,
                 shuffle_seed: int | None = None) -> tf.data.Dataset:
    """An in-memory ``tf.data`` pipeline: shuffle indices, gather whole batches.

    Gathering a batch at once keeps per-step overhead low (small models here are bound by
    it, not by arithmetic); the arrays become tensors once per process, not per trial or epoch.
    """
    xs, ys = _tensor(x), _tensor(y)
    ds = tf.data.Dataset.range(len(y))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(y), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda idx: (tf.gather(xs, idx), tf.gather(ys, idx)),
                                  num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


# Batches per compiled call: small models are bound by per-step Python overhead, which 8 steps
# inside one tf.function call cut (`make bench`'s overhead figure: our epoch vs a bare fit).
# Tracing is unchanged and callbacks still see every epoch.
STEPS_PER_EXECUTION = 8


def compile_model(model: keras.Model, params: dict[str, Any], n_train: int,
                  steps_per_execution: int = 1) -> keras.Model:
    steps = max(1, -(-n_train // params["batch_size"]))
    model.compile(optimizer=make_optimizer(params, steps),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=steps_per_execution)
    return model


def steps_per_execution(n_train: int, batch_size: int, reports_per_epoch: int = 1) -> int:
    """:data:`STEPS_PER_EXECUTION`, fewer when an epoch's share between two in-epoch reports
    is shorter: callbacks only see the batches that end a compiled call, so a report comes
    up to ``steps_per_execution - 1`` batches after its share (the ``epoch`` metric says
    where; on full MNIST at most 7 of 106–1,688 batches)."""
    if reports_per_epoch == 1:
        return STEPS_PER_EXECUTION
    return max(1, min(STEPS_PER_EXECUTION, -(-n_train // batch_size) // reports_per_epoch))


def train(model: keras.Model, params: dict[str, Any], train_xy: tuple[np.ndarray, np.ndarray],
          val_xy: tuple[np.ndarray, np.ndarray] | None, epochs: float,
          callbacks: Sequence[keras.callbacks.Callback] = (), seed: int = 0,
          reports_per_epoch: int = 1) -> keras.callbacks.History:
    """Compile and fit ``model`` for ``epochs`` (a fraction ends part-way through the last
    one: :class:`~.callbacks.StopInEpoch`); the callbacks do the reporting, logging and
    pruning (``reports_per_epoch`` times per epoch: see :class:`~.callbacks.InEpochReports`)."""
    if not float(epochs).is_integer():
        callbacks = [StopInEpoch(epochs), *callbacks]
    batch = params["batch_size"]
    compile_model(model, params, len(train_xy[1]),
                  steps_per_execution(len(train_xy[1]), batch, reports_per_epoch))
    val = make_dataset(*val_xy, batch_size=max(batch, 512)) if val_xy is not None else None
    return model.fit(make_dataset(*train_xy, batch_size=batch, shuffle_seed=seed),
                     validation_data=val, epochs=math.ceil(epochs), callbacks=list(callbacks),
                     verbose=0,
                     shuffle=False)  # the pipeline shuffles


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    loss, acc = model.evaluate(make_dataset(x, y, batch_size=1024), verbose=0)
    return {"loss": float(loss), "accuracy": float(acc)}
