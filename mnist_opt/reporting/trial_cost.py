"""A trial's fixed cost: the time it spends on anything but training its epochs.

Defined once, for every figure that quotes it: a finished trial's wall time (Optuna's start to
its completion; MLflow's logging is synchronous here, so it is done by then) minus the epochs
it trained × its steady-state epoch time, the mean time between two consecutive epoch ends.
What remains is sampling the trial's parameters, building and compiling the model, tracing,
the first epoch's extra time, and the logging and storage calls around the trial. The mean,
not the median: then the fixed cost is exactly the time before the first epoch's steady share
and after the last epoch, and an epoch slowed by the other workers (a start-up beside it)
counts as training, not as this trial's fixed cost once per later epoch. A trial needs two
completed epochs to have a steady state; trials with fewer are left out, and counted.

Outside any trial, a worker process also spends time: its start-up (importing TensorFlow,
loading the data) each time it is replaced, and the storage and callback calls between two
trials. :func:`outside_trials` measures that per finished trial.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import optuna


def epochs_trained(trial: optuna.trial.FrozenTrial) -> float:
    """Epochs the trial trained: where it was pruned (a fraction of an epoch with in-epoch
    reports: the callback records ``pruned_at_epoch``), else ``epochs`` when the objective
    recorded it (a fractional ``max_epochs``), else its completed epochs."""
    attrs = trial.user_attrs
    return float(attrs.get("pruned_at_epoch", attrs.get("epochs", len(attrs.get("epoch_log", ())))))


def fixed_cost(trial: optuna.trial.FrozenTrial) -> float | None:
    """Seconds of ``trial`` beyond its epochs × its steady-state epoch time; None for a trial
    that is not finished or has fewer than two completed epochs."""
    ends = [t for t, _ in trial.user_attrs.get("epoch_log", ())]
    if len(ends) < 2 or trial.datetime_start is None or trial.datetime_complete is None:
        return None
    diffs = np.diff(ends)
    if epochs_trained(trial) < len(ends) and len(diffs) > 1:
        diffs = diffs[:-1]  # a fractional max_epochs: the last epoch is a part of one
    steady = float(np.mean(diffs))
    wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return wall - epochs_trained(trial) * steady


@dataclass(frozen=True)
class FixedCosts:
    values: list[float]  # one per trial that has a steady state
    left_out: int  # finished trials with fewer than two epochs

    @property
    def median(self) -> float | None:
        """The median fixed cost; None when no trial has a steady state."""
        return float(np.median(self.values)) if self.values else None

    def line(self) -> str:
        """``fixed cost per trial: median 2.1 s [IQR 1.8, 2.6] over 12 trials (…)``."""
        if not self.values:
            return (f"fixed cost per trial: no trial has two completed epochs "
                    f"({self.left_out} finished trials)")
        q1, med, q3 = np.percentile(self.values, [25, 50, 75])
        return (f"fixed cost per trial: median {med:.2f} s [IQR {q1:.2f}, {q3:.2f}] over "
                f"{len(self.values)} trials (wall time minus epochs × steady-state epoch time; "
                f"left out: {self.left_out} with fewer than two epochs)")


def fixed_costs(trials: Iterable[optuna.trial.FrozenTrial]) -> FixedCosts:
    finished = [t for t in trials if t.state.is_finished()
                and t.state != optuna.trial.TrialState.FAIL]
    values = [c for c in map(fixed_cost, finished) if c is not None]
    return FixedCosts(values, len(finished) - len(values))


def outside_trials(trials: Iterable[optuna.trial.FrozenTrial], workers: int) -> float | None:
    """Worker seconds spent outside any trial while trials were still to start, per finished
    trial: ``workers`` × the time from the first trial's start to the last one's, minus the
    trials' time inside that window, over the number of finished trials. Process start-ups
    (a replaced worker's included) and the calls between two trials; not the last trial's
    run. None without two finished trials."""
    done = [t for t in trials if t.datetime_start and t.datetime_complete]
    if len(done) < 2:
        return None
    first = min(t.datetime_start for t in done)
    last = max(t.datetime_start for t in done)
    busy = sum((min(t.datetime_complete, last) - t.datetime_start).total_seconds()
               for t in done if t.datetime_start < last)
    return (workers * (last - first).total_seconds() - busy) / len(done)
