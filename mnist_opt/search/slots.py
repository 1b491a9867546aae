"""Exactly ``search.n_trials`` finished trials, however many workers on however many hosts.

A worker starts a trial only while the study's finished and running trials together are
fewer than its target. Counting them and asking Optuna for the trial (which records it
RUNNING) happen under the study's lock (:class:`~mnist_opt.tracking.storage.StudyLock`),
which every worker of every host takes: without it, two hosts that count at once both start
the last trial, and k hosts end up to k - 1 trials over.

A worker that finds every slot taken waits, failing stale trials as it polls: a running
trial whose worker died is failed (its parameters re-queued) once its heartbeat is older than
the grace period, or at once on its own host, and its slot is free again. A running trial
that is pruned counts as finished, one that fails frees its slot.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import optuna

from mnist_opt import interrupt
from mnist_opt.search.warm import copied
from mnist_opt.tracking.storage import StudyLock, fail_dead_owners

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
RUNNING = optuna.trial.TrialState.RUNNING
POLL_SECONDS = 2.0  # a waiting worker reads the storage this often


def n_finished(study: optuna.Study) -> int:
    """Finished trials toward ``n_trials``: complete or pruned, less those copied in by a
    warm start (they did not run here)."""
    return sum(not copied(t) for t in study.get_trials(deepcopy=False, states=FINISHED))


def taken(study: optuna.Study) -> tuple[int, int]:
    """Finished trials toward the target (as :func:`n_finished`) and running trials, from one
    read of the storage: read apart, a trial that finishes in between is counted in neither."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, RUNNING))
    running = sum(t.state == RUNNING for t in trials)
    return sum(t.state != RUNNING and not copied(t) for t in trials), running


def fail_stale(study: optuna.Study, url: str | None = None) -> None:
    """Fail the trials whose process died, each closed in MLflow and re-queued: on this host
    at once (its recorded owner is gone), elsewhere once its heartbeat is older than the grace
    period. With the storage's ``url``: under the study's lock (see :meth:`TrialSlots.claim`)."""
    if url is not None:
        lock = StudyLock(url, study.study_name)
        lock.acquire()
        try:
            return fail_stale(study)
        finally:
            lock.release()
    with warnings.catch_warnings():  # experimental since 2.9, and what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    for number in fail_dead_owners(study):
        print(f"trial {number} was left RUNNING by a process that is gone: failed, its "
              "parameters queued again", flush=True)


class TrialSlots:
    """The gate in front of each trial a worker starts (see the module's docstring).

    :meth:`claim` returns holding the study's lock; the objective :meth:`gated` releases it
    as it begins, when Optuna has recorded the trial RUNNING. ``host_claim``: the worker's
    share of its own invocation's trials (:class:`~mnist_opt.search.workers.TrialClaims`),
    asked first, once per trial.
    """

    def __init__(self, study: optuna.Study, url: str, target: int,
                 stop: Callable[[], bool] = lambda: False, deadline: float | None = None,
                 host_claim: Callable[[], bool] | None = None):
        self.study, self.target, self.stop, self.deadline = study, target, stop, deadline
        self.host_claim = host_claim
        self.lock = StudyLock(url, study.study_name)

    def claim(self) -> bool:
        """True, holding the lock, when one more trial may start; False once the study has
        its target, ``stop()`` says so or the deadline (``time.monotonic()``) has passed."""
        if self.host_claim is not None and not self.host_claim():
            return False
        while True:
            interrupt.check()
            self.lock.acquire()
            # under the lock: a trial failed as stale frees a slot only once its copy is
            # queued, else another worker takes the slot with a new trial in between and the
            # copy is left WAITING (tests/test_multihost_faults.py, link cut: 2 runs in 3)
            fail_stale(self.study)
            finished, running = taken(self.study)
            if finished + running < self.target:
                return True
            self.lock.release()
            if (finished >= self.target or self.stop()
                    or (self.deadline is not None and time.monotonic() >= self.deadline)):
                return False
            time.sleep(POLL_SECONDS)  # every slot is taken by a running trial: wait for one

    def release(self) -> None:
        self.lock.release()

    def gated(self, objective: Callable[[optuna.Trial], object]) -> Callable[[optuna.Trial], object]:
        """``objective``, releasing the lock first: its trial is RUNNING, so it is counted."""

        def run(trial: optuna.Trial) -> object:
            self.release()
            return objective(trial)

        return run

    def claim_next(self, n_trials: int | Callable[[], bool]):
        """An Optuna callback, the last of a loop that runs up to ``n_trials`` trials (or
        while ``n_trials()`` says another follows) and claimed its first: claim the next
        before Optuna asks for it, or stop the loop."""
        done = 0

        def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            nonlocal done
            done += 1
            more = n_trials() if callable(n_trials) else done < n_trials
            if more and not self.claim():
                study.stop()

        return callback
