"""The objective: suggest, build, train with the one callback, log the model; and the loop
that runs one process's share of a study's trials."""
from __future__ import annotations

import logging
import sys
import time
from datetime import datetime
from typing import Any, Callable, Sequence

import mlflow
import optuna
from mlflow.exceptions import MlflowException

from mnist_opt import data, interrupt
from mnist_opt.reporting.trial_cost import epochs_trained
from mnist_opt.errors import StudyFailedError
from mnist_opt.search.slots import FINISHED, TrialSlots, n_finished
from mnist_opt.search.warm import SEEDED, copied
from mnist_opt.study import objectives
from mnist_opt.study.config import StudyConfig
from mnist_opt.study.space import suggest_params
from mnist_opt.tracking import runs as tracking
from mnist_opt.tracking.storage import STALE, requeue
from mnist_opt.training.callbacks import InEpochReports, TrialCallback
from mnist_opt.training.loop import fresh_model, train


def rss_mb() -> float:
    """This process's resident memory in MB (MiB), from psutil."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def make_objective(cfg: StudyConfig, split: data.Split, parent: mlflow.entities.Run,
                   verbose: bool = True, freeze: bool = False):
    """``objective(trial)``: suggest, build, train with the reporting callback, log the model.

    ``freeze`` (recycled worker processes): after each trial's collection, freeze what
    survives, so the next collection scans one trial's objects, not every graph TensorFlow
    leaked. A long-lived process must not: frozen objects that die later are never freed.
    """

    second = cfg.search.second_objective
    make_callback = callback_factory(cfg, split, verbose)

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        params = suggest_params(trial, cfg)
        with tracking.trial_run(trial, params, parent):
            seeded = {k: str(v) for k, v in trial.user_attrs.items() if k in SEEDED}
            if seeded:  # a queued configuration: search.enqueue or a warm start's
                mlflow.set_tags(seeded)
            try:
                model = fresh_model(params, cfg.search.seed + trial.number, freeze)
                trial.set_user_attr("n_params", model.count_params())
                mlflow.log_param("n_params", model.count_params())
                callback = make_callback(trial)
                history = train(model, params, (split.x_train, split.y_train),
                                (split.x_val, split.y_val), cfg.training.max_epochs, [callback],
                                seed=cfg.search.seed + trial.number,
                                reports_per_epoch=callback.reports_per_epoch)
                tracking.log_model(model)
                trial.set_user_attr("val_accuracy", float(history.history["val_accuracy"][-1]))
                # a fractional max_epochs stops its last epoch part-way
                trial.set_user_attr("epochs", min(len(history.epoch), cfg.training.max_epochs))
                value = float(history.history[cfg.search.metric][-1])
                if second is None:
                    return value
                cost = (float(model.count_params()) if second == "n_params"
                        else objectives.latency_ms(model))
                mlflow.log_metric(second, cost)
                return value, cost
            finally:  # the memory figure of `make bench`, and a leak shows in the MLflow UI
                rss = rss_mb()
                trial.set_user_attr("rss_mb", rss)
                if not tracking.unreachable(sys.exc_info()[1]):  # not minutes more of retries
                    mlflow.log_metric("rss_mb", rss)

    return objective


def callback_factory(cfg: StudyConfig, split: data.Split, verbose: bool):
    """``callback(trial)``: the trial's reporting callback, with in-epoch reports on a fixed
    stratified validation slice when ``search.report_every`` is below 1 (single-objective
    studies only: Optuna cannot prune the others, so they report nothing)."""
    s = cfg.search
    kwargs = dict(monitor=s.metric, epochs=cfg.training.max_epochs, verbose=verbose)
    if s.second_objective is not None or s.reports_per_epoch == 1:
        return lambda trial: TrialCallback(trial, label=f"trial {trial.number}",
                                           report=s.second_objective is None, **kwargs)
    # the same images for every trial and worker: the split's seed draws them
    val_slice = data.stratified_subset(split.x_val, split.y_val, s.report_val_images,
                                       cfg.data.seed)
    return lambda trial: InEpochReports(trial, s.reports_per_epoch, val_slice,
                                        label=f"trial {trial.number}", **kwargs)


FAIL = optuna.trial.TrialState.FAIL


def stop_at_target(n_trials: int):
    """An Optuna callback: stop once the study has ``n_trials`` finished trials (Optuna's
    ``MaxTrialsCallback``, counting as :func:`n_finished` does)."""

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if n_finished(study) >= n_trials:
            study.stop()

    return callback


def summary(study: optuna.Study, tolerance: float) -> dict[str, Any]:
    """Trial counts, and the best trial (by :func:`objectives.pick` with two objectives).

    ``complete``, ``pruned`` and ``fail`` count the trials run in this study, as ``n_trials``
    does (:func:`n_finished`); ``copied`` counts those a warm start copied in. The best trial
    may be a copied one: its value measures the same as this study's.
    """
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name.lower() for t in trials if not copied(t)]
    out: dict[str, Any] = {s: states.count(s) for s in ("complete", "pruned", "fail")}
    out["copied"] = sum(map(copied, trials))
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
        best = objectives.pick(study, tolerance)
        out.update(best_trial=best.number, best_value=best.values[0], best_values=best.values,
                   best_params=best.params)
        if objectives.is_multi(study):
            out["pareto"] = sorted(t.number for t in study.best_trials)
    return out


def counts_as_failure(trial: optuna.trial.FrozenTrial) -> bool:
    """A failed trial, unless it was interrupted, failed as stale (its process died) or
    could not reach the tracking server: none of these says anything about its parameters."""
    reason = str(trial.user_attrs.get("fail_reason", ""))
    return trial.state == FAIL and not reason.startswith((tracking.INTERRUPTED, STALE,
                                                          tracking.AWAY))


def failure_streak(trials: Sequence[optuna.trial.FrozenTrial],
                   limit: int) -> list[optuna.trial.FrozenTrial]:
    """The first ``limit`` failed trials in a row, in completion order; [] if there are none.

    A complete or pruned trial ends a run of failures; interrupted and stale trials, and
    those the tracking server could not record, are skipped (they say nothing about the
    search). The first run, not the latest: once the
    limit is hit, a trial that another worker completes afterwards does not revive the study.
    """
    done = sorted((t for t in trials if t.state.is_finished() and t.datetime_complete),
                  key=lambda t: (t.datetime_complete, t.number))
    streak: list[optuna.trial.FrozenTrial] = []
    for trial in done:
        if trial.state != FAIL:
            streak = []
        elif counts_as_failure(trial):
            streak.append(trial)
            if len(streak) == limit:
                return streak
    return []


def epochs_done(study: optuna.Study) -> float:
    """Epochs trained by all the study's trials: completed ones, running ones included (their
    epoch_log), and the fraction of an epoch where an in-epoch report pruned a trial."""
    return sum(epochs_trained(t) for t in study.get_trials(deepcopy=False))


def budget_spent(cfg: StudyConfig, study: optuna.Study) -> bool:
    """True once the study's trials completed ``search.epoch_budget`` epochs (never without one)."""
    budget = cfg.search.epoch_budget
    return budget is not None and epochs_done(study) >= budget


def stop_at_epoch_budget(cfg: StudyConfig):
    """An Optuna callback: no new trial once the epoch budget is spent, by every worker."""

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if budget_spent(cfg, study):
            study.stop()

    return callback


def finished_since(study: optuna.Study, since: datetime) -> list[optuna.trial.FrozenTrial]:
    """Trials of every worker that finished since ``since`` (this invocation's parent run)."""
    return [t for t in study.get_trials(deepcopy=False, states=(*FINISHED, FAIL))
            if t.datetime_complete and t.datetime_complete >= since]


def started(parent: mlflow.entities.Run) -> datetime:
    """When the invocation's parent run started, in Optuna's clock (local, naive)."""
    return datetime.fromtimestamp(parent.info.start_time / 1000)


def stop_on_failures(limit: int, since: datetime):
    """An Optuna callback: stop this process's loop once ``limit`` trials failed in a row
    since ``since``, counted over all workers' trials in the storage."""

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if failure_streak(finished_since(study, since), limit):
            study.stop()

    return callback


def check_failures(study: optuna.Study, limit: int, since: datetime) -> None:
    """Raise :class:`StudyFailedError` when this invocation stopped for failures, or ended
    without a finished trial because its trials failed."""
    trials = finished_since(study, since)
    streak = failure_streak(trials, limit)
    if streak:
        raise StudyFailedError(
            f"{limit} trials failed in a row (trials {', '.join(str(t.number) for t in streak)}; "
            f"search.max_consecutive_failures={limit}): the study stopped", streak[-1])
    failed = sorted((t for t in trials if counts_as_failure(t)), key=lambda t: t.datetime_complete)
    if failed and not any(t.state in FINISHED for t in trials):
        raise StudyFailedError(f"no trial finished in this run: {len(failed)} failed", failed[-1])


def optimize(cfg: StudyConfig, study: optuna.Study, url: str, split: data.Split,
             parent: mlflow.entities.Run, n_trials: int, verbose: bool, callbacks: Sequence = (),
             freeze: bool = False, host_claim: Callable[[], bool] | None = None) -> None:
    """One worker's share: up to ``n_trials`` trials, stopping early once the study has its
    target, its epoch budget is spent, or its trials keep failing (every worker sees the same
    storage ``url``). Each trial starts only through :class:`TrialSlots`, so all the workers
    of all the hosts together finish exactly the target."""
    if budget_spent(cfg, study):
        return
    timeout = cfg.search.timeout
    slots = TrialSlots(study, url, cfg.search.n_trials, lambda: budget_spent(cfg, study),
                       None if timeout is None else time.monotonic() + timeout, host_claim)
    if n_trials <= 0 or not slots.claim():
        return
    objective = make_objective(cfg, split, parent, verbose, freeze)
    lost, left = _LostTrials(), n_trials

    def count(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal left
        lost.returned = None  # told: whatever fails from here on is not about that trial
        if lost.dropped(trial.number):  # not one of ours: its copy runs instead
            return
        left -= 1
        if left <= 0:
            study.stop()

    optuna_log = logging.getLogger("optuna.study._optimize")
    optuna_log.addFilter(lost)
    try:
        while True:
            try:
                study.optimize(  # n_trials: `count` stops it (a dropped trial is not counted)
                    lost.watch(slots.gated(objective)), timeout=timeout,
                    catch=(Exception,), gc_after_trial=False,
                    callbacks=[lost.after_outage, count, stop_at_target(cfg.search.n_trials),
                               stop_on_failures(cfg.search.max_consecutive_failures,
                                                started(parent)),
                               stop_at_epoch_budget(cfg),
                               tracking.log_best_so_far(parent.info.run_id,
                                                        cfg.search.pick_tolerance),
                               lambda study, trial: interrupt.check(), *callbacks,
                               # last: the lock is held until the next ask
                               slots.claim_next(lambda: left > 0)])
                return
            # Optuna could not tell a trial that another worker failed under us: one whose
            # objective raised TrialLost ("Cannot tell a FAIL trial"), or one whose objective had
            # returned (Optuna 5's tell then ends on its own assert, "Should not reach")
            except (ValueError, AssertionError, optuna.exceptions.UpdateFinishedTrialError):
                if lost.told() and not lost.lost_at_tell(study):
                    raise
            print(lost.line(), flush=True)
            if left <= 0 or not slots.claim():  # the lost trial does not count as one of ours
                return
    finally:
        optuna_log.removeFilter(lost)
        slots.release()  # the loop ended (timeout, stop, Ctrl-C) after a claim


class _LostTrials(logging.Filter):
    """This worker's trials that another worker failed as stale while it ran them
    (:class:`~mnist_opt.tracking.runs.TrialLost`: a long database outage, a cut link).

    Optuna cannot tell such a trial: it logs the objective's error with its traceback and
    raises out of ``study.optimize``. As a logging filter this keeps Optuna's lines about a
    lost trial out of the log; :func:`optimize` says it in one line and goes on. The same
    filter keeps out those about a trial dropped because the tracking server was away
    (:class:`~mnist_opt.tracking.runs.TrackingAway`, said by :meth:`after_outage`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[tracking.TrialLost] = []
        # trials dropped because the tracking server was away (TrackingAway)
        self.away: dict[int, tracking.TrackingAway] = {}
        self._reported = 0
        # the trial whose objective returned or was pruned, until Optuna has told it
        self.returned: optuna.Trial | None = None
        self._pruned = False

    def watch(self, objective: Callable[[optuna.Trial], object]) -> Callable[[optuna.Trial], object]:
        def run(trial: optuna.Trial) -> object:
            self.returned, self._pruned = None, False
            try:
                value = objective(trial)
                self.returned = trial
                return value
            except optuna.TrialPruned:  # told PRUNED next: lost too, if failed under us first
                self.returned, self._pruned = trial, True
                raise
            except tracking.TrialLost as exc:
                self.errors.append(exc)
                raise
            except tracking.TrackingAway as exc:  # Optuna fails it, then after_outage runs
                frozen = trial.study._storage.get_trial(trial._trial_id)
                if frozen.state != optuna.trial.TrialState.RUNNING:  # failed as stale (and
                    lost = tracking.TrialLost(trial.number)         # queued) by another
                    self.errors.append(lost)
                    raise lost from exc
                self.away[exc.number] = exc
                # queued while it still holds its slot in the gate: a copy queued after the
                # tell could lose that slot to a new trial of another worker
                exc.queued = requeue(trial.study, frozen)
                raise
            except optuna.exceptions.UpdateFinishedTrialError:  # before its MLflow run opened
                exc = tracking.TrialLost(trial.number)
                self.errors.append(exc)
                raise exc from None

        return run

    def after_outage(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """An Optuna callback, once Optuna failed a trial the tracking server could not
        record (its parameters queued again already): wait until the server answers (an
        interrupt stops the wait), close the trial's run KILLED, then go on."""
        exc = self.away.get(trial.number)
        if exc is None:
            return
        again = "queued again" if exc.queued else "not queued again (cut too often)"
        print(f"{exc}; its parameters {again}; waiting for the server", flush=True)
        waited = tracking.wait_for_server(exc.run_id, interrupt.check)
        # answering at once, the server was not away: what failed was one kind of request
        # (a broken artifact store); counted as one of this worker's trials, so it cannot
        # go on forever
        exc.counted = waited < 1.0
        try:
            tracking.close_run(exc.run_id, "KILLED", {"state": "failed", "fail_reason": str(
                trial.user_attrs.get("fail_reason"))}, ended=True)
        except MlflowException as err:  # away again already: say so, go on
            print(f"trial {exc.number}: its MLflow run could not be closed KILLED "
                  f"({type(err).__name__})", flush=True)
        print(f"MLflow tracking server answers again after {waited:.0f} s", flush=True)

    def dropped(self, number: int) -> bool:
        """Whether trial ``number`` was dropped for an outage (not one of this worker's)."""
        exc = self.away.get(number)
        return exc is not None and not exc.counted

    def lost_at_tell(self, study: optuna.Study) -> bool:
        """True when the trial whose objective returned (or was pruned) was failed as stale by
        another worker before Optuna could tell it (a link cut or an outage in that moment):
        its MLflow run, which ended meanwhile, is re-closed KILLED, and it counts as lost."""
        trial, self.returned = self.returned, None
        if trial is None:
            return False
        frozen = study._storage.get_trial(trial._trial_id)
        reason = str(frozen.user_attrs.get("fail_reason", ""))
        if frozen.state != optuna.trial.TrialState.FAIL or not reason.startswith(STALE):
            return False
        try:
            tracking.close_run(frozen.user_attrs.get("mlflow_run_id"), "KILLED",
                               {"state": "failed", "fail_reason": reason}, ended=True)
        except MlflowException as exc:  # the tracking server is away too: say so, go on
            print(f"trial {trial.number}: its MLflow run could not be closed KILLED "
                  f"({type(exc).__name__}); it stays FINISHED", flush=True)
        self.errors.append(tracking.TrialLost(trial.number))
        return True

    def told(self) -> bool:
        """True when every lost trial was reported (so an error is not about one)."""
        return self._reported == len(self.errors)

    def line(self) -> str:
        """The report of the lost trials not reported yet."""
        new, self._reported = self.errors[self._reported:], len(self.errors)
        return "\n".join(map(str, new))

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        lost = [exc.number for exc in self.errors] + list(self.away)
        if self._pruned and self.returned is not None:  # a pruned trial "fails" only when it
            lost.append(self.returned.number)           # was failed under us (lost_at_tell)
        return not any(message.startswith(f"Trial {n} failed") for n in lost)
