"""The per-trial fixed cost against hand-built trials whose answer is known."""
from __future__ import annotations

from datetime import datetime, timedelta

import optuna
import pytest

from mnist_opt.reporting.trial_cost import epochs_trained, fixed_cost, fixed_costs, outside_trials

T0 = datetime(2026, 11, 30, 9, 0, 0)
TS = optuna.trial.TrialState


def _trial(state: TS, wall: float | None, ends: list[float], start: float = 0,
           **attrs) -> optuna.trial.FrozenTrial:
    """A trial that started ``start`` seconds after T0, ran ``wall`` seconds and ended epochs
    ``ends`` seconds after its start."""
    t0 = T0 + timedelta(seconds=start)
    log = [[(t0 + timedelta(seconds=e)).timestamp(), 0.9] for e in ends]
    return optuna.trial.FrozenTrial(
        number=0, trial_id=0, state=state, value=0.9 if state == TS.COMPLETE else None,
        values=None, datetime_start=t0, datetime_complete=None if wall is None else t0 + timedelta(seconds=wall),
        params={}, distributions={}, user_attrs={"epoch_log": log, **attrs}, system_attrs={},
        intermediate_values={})


def test_fixed_cost_is_wall_time_minus_epochs_times_the_steady_epoch():
    # first epoch 7 s, then 3 s each (2 and 4: median 3); 20 s in all: 20 - 3 × 3 = 11
    assert fixed_cost(_trial(TS.COMPLETE, 20, [7, 9, 13])) == pytest.approx(11)


def test_the_steady_epoch_is_the_mean_interval_so_a_slow_later_epoch_is_training():
    # intervals 2, 2, 6 (a slow third): steady 10/3 s, not the median 2; the fixed cost is then
    # the time to the first epoch beyond one steady epoch plus the time after the last epoch
    trial = _trial(TS.COMPLETE, 20, [7, 9, 11, 17])
    assert fixed_cost(trial) == pytest.approx(20 - 4 * 10 / 3)
    assert fixed_cost(trial) == pytest.approx((7 - 10 / 3) + (20 - 17))


def test_worker_time_outside_trials_while_trials_were_still_to_start():
    # two workers; trials start at 0, 2 (after a 2 s start-up) and 8, the last one: in the
    # window 0-8, 16 worker-seconds, of which the trials fill 8 (0-8) and 5 (2-7): 3 outside,
    # over 3 finished trials; the last trial's run and the unevenly ending workers do not count
    trials = [_trial(TS.COMPLETE, 10, []), _trial(TS.PRUNED, 5, [], start=2),
              _trial(TS.COMPLETE, 30, [], start=8),
              _trial(TS.RUNNING, None, [], start=3)]  # still running: not counted
    assert outside_trials(trials, workers=2) == pytest.approx(3 / 3)
    assert outside_trials(trials[:1], workers=2) is None


def test_a_trial_pruned_inside_an_epoch_counts_its_fraction():
    trial = _trial(TS.PRUNED, 12, [7, 10], pruned_at_epoch=2.25)
    assert epochs_trained(trial) == 2.25
    assert fixed_cost(trial) == pytest.approx(12 - 2.25 * 3)


def test_a_fractional_max_epochs_counts_its_part_epoch_and_leaves_it_out_of_the_steady_epoch():
    # max_epochs 2.5: epochs end at 7, 10 and 11.5 (a half epoch); steady 3 s (not 2.25)
    trial = _trial(TS.COMPLETE, 14, [7, 10, 11.5], epochs=2.5)
    assert epochs_trained(trial) == 2.5
    assert fixed_cost(trial) == pytest.approx(14 - 2.5 * 3)


def test_trials_without_a_steady_state_are_left_out_and_counted():
    costs = fixed_costs([_trial(TS.COMPLETE, 20, [7, 9, 13]), _trial(TS.PRUNED, 9, [8]),
                         _trial(TS.FAIL, 3, [])])
    assert costs.values == pytest.approx([11]) and costs.left_out == 1
    assert costs.median == pytest.approx(11) and fixed_costs([]).median is None
    assert "median 11.00 s" in costs.line() and "left out: 1 with fewer" in costs.line()
    assert "no trial has two completed epochs" in fixed_costs([]).line()
