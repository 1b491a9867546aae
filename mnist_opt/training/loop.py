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
from mnist_opt.training import schedules
from mnist_opt.training.callbacks import StopInEpoch
from mnist_opt.training.models import build_model


def study_split(cfg: StudyConfig, full: bool = False) -> data.Split:
    """The study's stratified train/validation split (of ``train_subset``'s images, if set);
    a trial's training part is a stratified ``search_subset`` of it, if set, while its
    validation part stays whole, so that a subset trial, a promoted one and a full-data
    search are scored on the same images. ``full``: the whole split, as promotion re-trains."""
    whole = data.split(data.load(cfg.dataset), cfg.data.val_fraction, cfg.data.seed,
                       cfg.data.train_subset)
    return whole if full else data.fewer_training_images(whole, cfg.data.search_subset,
                                                         cfg.data.seed)


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
# the two in step): Adam, SGD with Nesterov momentum, AdamW and SGDW with decoupled weight
# decay; under one-cycle, the subclasses that cycle their momentum (training.schedules).
OPTIMIZERS: dict[str, Callable[..., keras.optimizers.Optimizer]] = {
    "adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD,
    "adamw": keras.optimizers.AdamW, "sgdw": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
}
SGD_MOMENTUM = 0.9  # Nesterov, outside one-cycle


def _optimizer_args(params: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's own arguments: momentum for the SGDs, decay for the W variants."""
    name = params["optimizer"]
    args: dict[str, Any] = ({"momentum": SGD_MOMENTUM, "nesterov": True}
                            if name.startswith("sgd") else {})
    if name.endswith("w"):
        args["weight_decay"] = params["weight_decay"]
    return args


def make_optimizer(params: dict[str, Any], steps_per_epoch: int,
                   epochs: float | None = None) -> keras.optimizers.Optimizer:
    """The params' optimizer under its ``lr_schedule``: a constant learning rate, the
    codelab's per-epoch exponential decay, or per step (over ``epochs`` × ``steps_per_epoch``
    steps) cosine or one-cycle with cycled momentum (:mod:`~.schedules`)."""
    name, schedule = params["optimizer"], params.get("lr_schedule", "none")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    if schedule in ("cosine", "one_cycle") and epochs is None:
        raise ValueError(f"lr_schedule {schedule} needs the run's epochs to know its steps")
    lr: Any = params["learning_rate"]
    args = _optimizer_args(params)
    if schedule == "exponential":
        lr = keras.optimizers.schedules.ExponentialDecay(
            lr, decay_steps=steps_per_epoch, decay_rate=params["lr_decay"], staircase=True)
    elif schedule == "cosine":
        steps = schedules.total_steps(steps_per_epoch, epochs)
        lr = schedules.cosine(lr, steps, schedules.warmup_steps(params["cosine_warmup"], steps))
    elif schedule == "one_cycle":
        steps = schedules.total_steps(steps_per_epoch, epochs)
        # the lower bound at the peak whichever way the file gives them (one-cycle's shape)
        low, high = sorted(float(params[k]) for k in ("momentum_low", "momentum_high"))
        cycled = dict(momentum_low=low, momentum_high=high,
                      warmup=schedules.warmup_steps(params["warmup_fraction"], steps), steps=steps)
        lr = schedules.one_cycle_lr(params, steps)
        if name not in schedules.ONE_CYCLE:  # RMSprop: no momentum to cycle, the rate only
            return OPTIMIZERS[name](lr, **args)
        if "momentum" in args:
            args["momentum"] = high  # read by SGD's build only: above 0, so it makes slots
        return schedules.ONE_CYCLE[name](lr, **args, **cycled)
    return OPTIMIZERS[name](lr, **args)


def one_hot(params: dict[str, Any]) -> bool:
    """Whether targets are one-hot: label smoothing needs them (the sparse loss has no such
    option); otherwise integer labels, as before."""
    return params.get("label_smoothing", 0.0) > 0


def make_loss(params: dict[str, Any]) -> keras.losses.Loss | str:
    if one_hot(params):
        return keras.losses.CategoricalCrossentropy(label_smoothing=params["label_smoothing"])
    return "sparse_categorical_crossentropy"


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
                 shuffle_seed: int | None = None, classes: int | None = None) -> tf.data.Dataset:
    """An in-memory ``tf.data`` pipeline: shuffle indices, gather whole batches (with
    ``classes``, one-hot labels of that many classes).

    Gathering a batch at once keeps per-step overhead low (small models here are bound by
    it, not by arithmetic); the arrays become tensors once per process, not per trial or epoch.
    """
    xs, ys = _tensor(x), _tensor(y)
    ds = tf.data.Dataset.range(len(y))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(y), seed=shuffle_seed, reshuffle_each_iteration=True)

    def gather(idx):
        labels = tf.gather(ys, idx)
        return tf.gather(xs, idx), labels if classes is None else tf.one_hot(labels, classes)

    ds = ds.batch(batch_size).map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def classes_of(model: keras.Model) -> int | None:
    """The number of classes when ``model`` was compiled for one-hot targets, else None."""
    return model.output_shape[-1] if isinstance(model.loss, keras.losses.CategoricalCrossentropy) else None


# Batches per compiled call: small models are bound by per-step Python overhead, which 8 steps
# inside one tf.function call cut (`make bench`'s overhead figure: our epoch vs a bare fit).
# Tracing is unchanged and callbacks still see every epoch.
STEPS_PER_EXECUTION = 8


def compile_model(model: keras.Model, params: dict[str, Any], n_train: int,
                  steps_per_execution: int = 1, epochs: float | None = None) -> keras.Model:
    """Compile for ``n_train`` images a step of ``batch_size``, over ``epochs`` (schedules
    per step need them)."""
    steps = max(1, -(-n_train // params["batch_size"]))
    model.compile(optimizer=make_optimizer(params, steps, epochs), loss=make_loss(params),
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)
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
                  steps_per_execution(len(train_xy[1]), batch, reports_per_epoch), epochs)
    classes = classes_of(model)
    val = (make_dataset(*val_xy, batch_size=max(batch, 512), classes=classes)
           if val_xy is not None else None)
    return model.fit(make_dataset(*train_xy, batch_size=batch, shuffle_seed=seed,
                                  classes=classes),
                     validation_data=val, epochs=math.ceil(epochs), callbacks=list(callbacks),
                     verbose=0,
                     shuffle=False)  # the pipeline shuffles


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    loss, acc = model.evaluate(make_dataset(x, y, batch_size=1024, classes=classes_of(model)),
                               verbose=0)
    return {"loss": float(loss), "accuracy": float(acc)}
