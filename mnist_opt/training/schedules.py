"""Learning-rate schedules per step, and the one-cycle policy's momentum.

``lr_schedule`` (the parameter table) names them: ``exponential`` decays once per epoch (the
MNIST codelab's), ``cosine`` is Keras' ``CosineDecay`` over all of a trial's steps with an
optional linear warm-up from 0, and ``one_cycle`` is Smith's policy (Smith 2018, "A
disciplined approach…"; PyTorch's ``OneCycleLR``): the learning rate rises linearly from
``learning_rate / div_factor`` to the peak ``learning_rate`` over ``warmup_fraction`` of the
steps, then anneals along a cosine to ``learning_rate / div_factor / final_div``, while the
momentum (SGD's, or Adam's β1) moves the other way, from ``momentum_high`` down to
``momentum_low`` at the peak and back up.

The learning rate is Keras' own ``CosineDecay`` (its warm-up is exactly the rising phase).
Keras takes momentum and β1 as constants, so the one-cycle optimizers are subclasses that
compute them from their step count (``iterations``) in every update; they are registered
Keras serializables, so a model compiled with one saves and loads in a process that imported
this module (``tracking.runs.log_model`` logs such models without their optimizer, so that
they load anywhere Keras does).
"""
from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

PACKAGE = "mnist_opt"  # the Keras registration package of the classes below


def total_steps(steps_per_epoch: int, epochs: float) -> int:
    """Optimizer steps of a training run of ``epochs`` (a fraction stops part-way)."""
    return max(1, math.ceil(steps_per_epoch * epochs))


def warmup_steps(fraction: float, steps: int) -> int:
    """The rising phase: ``fraction`` of ``steps``, at least one step short of all of them."""
    return min(steps - 1, round(fraction * steps))


def cosine(peak: float, steps: int, warmup: int, start: float = 0.0,
           end: float = 0.0) -> keras.optimizers.schedules.CosineDecay:
    """Linear from ``start`` to ``peak`` over ``warmup`` steps, then a cosine from ``peak`` to
    ``end`` over the remaining ones (Keras clamps past the last step)."""
    return keras.optimizers.schedules.CosineDecay(
        start if warmup else peak, decay_steps=steps - warmup, alpha=end / peak,
        warmup_target=peak if warmup else None, warmup_steps=warmup)


def one_cycle_lr(params: dict[str, Any], steps: int) -> keras.optimizers.schedules.CosineDecay:
    lr, div = params["learning_rate"], params["div_factor"]
    return cosine(lr, steps, warmup_steps(params["warmup_fraction"], steps), start=lr / div,
                  end=lr / div / params["final_div"])


class CycledMomentum:
    """Mixin for a Keras optimizer: momentum (or β1) from ``high`` down to ``low`` while the
    learning rate rises over ``warmup`` steps, then back up along the cosine of its descent,
    as a tensor of the optimizer's current step."""

    def __init__(self, *args, momentum_low: float, momentum_high: float, warmup: int,
                 steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.momentum_low, self.momentum_high = momentum_low, momentum_high
        self.warmup, self.steps = warmup, steps

    def cycled_momentum(self, dtype: str = "float32"):
        step = ops.cast(self.iterations, dtype)
        low, high = self.momentum_low, self.momentum_high
        rising = high - (high - low) * step / max(1, self.warmup)
        done = ops.minimum(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        annealing = low + (high - low) * (1 - ops.cos(math.pi * done)) / 2
        return ops.where(step < self.warmup, rising, annealing)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "momentum_low": self.momentum_low,
                "momentum_high": self.momentum_high, "warmup": self.warmup, "steps": self.steps}


class _CycledBeta1(CycledMomentum):
    """Adam's β1 is read in ``update_step`` only as a number, so the step's value is put in
    its place for the update (Adam's bias correction then uses the current β1, as PyTorch's
    one-cycle Adam does)."""

    def update_step(self, gradient, variable, learning_rate):
        constant, self.beta_1 = self.beta_1, self.cycled_momentum(variable.dtype)
        try:
            super().update_step(gradient, variable, learning_rate)
        finally:
            self.beta_1 = constant


@keras.saving.register_keras_serializable(PACKAGE)
class OneCycleAdam(_CycledBeta1, keras.optimizers.Adam):
    """Adam with a cycled β1."""


@keras.saving.register_keras_serializable(PACKAGE)
class OneCycleAdamW(_CycledBeta1, keras.optimizers.AdamW):
    """AdamW (decoupled weight decay) with a cycled β1."""


@keras.saving.register_keras_serializable(PACKAGE)
class OneCycleSGD(CycledMomentum, keras.optimizers.SGD):
    """SGD (Nesterov; with decoupled weight decay as SGDW) with a cycled momentum. Keras'
    SGD branches on ``momentum != 0`` in its update, so the update is written out here:
    the same two lines with the step's momentum."""

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        momentum = self.cycled_momentum(variable.dtype)
        m = self.momentums[self._get_variable_index(variable)]
        self.assign(m, ops.subtract(ops.multiply(m, momentum), ops.multiply(gradient, lr)))
        if self.nesterov:
            self.assign_add(variable, ops.subtract(ops.multiply(m, momentum),
                                                   ops.multiply(gradient, lr)))
        else:
            self.assign_add(variable, m)


ONE_CYCLE = {"adam": OneCycleAdam, "adamw": OneCycleAdamW, "sgd": OneCycleSGD,
             "sgdw": OneCycleSGD}
