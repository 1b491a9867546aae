"""Worker processes claim the missing trials one at a time from a shared, locked count: however
many processes race for them, exactly the limit is handed out (run_workers relies on it to stop
a study at exactly its target without fixed shares per worker)."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from mnist_opt.search.slots import POLL_SECONDS, TrialSlots
from mnist_opt.search.workers import TrialClaims

RACER = """
import sys
from pathlib import Path
from mnist_opt.search.slots import POLL_SECONDS, TrialSlots
from mnist_opt.search.workers import TrialClaims
claims = TrialClaims(Path(sys.argv[1]))
print(sum(claims.claim() for _ in range(int(sys.argv[2]))))
"""


def test_racing_processes_claim_exactly_the_limit(tmp_path: Path):
    claims = TrialClaims(tmp_path / "claims", limit=37)
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(claims.path), "200"],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    got = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(got) == 37
    assert claims.left() == 0 and not claims.claim()


def _run(study: optuna.Study, url: str, target: int, n_trials: int, objective,
         host_claim=None) -> None:
    """What ``objective.optimize`` does around ``study.optimize``, with a trivial objective."""
    slots = TrialSlots(study, url, target, host_claim=host_claim)
    if not slots.claim():
        return
    try:
        study.optimize(slots.gated(objective), n_trials=n_trials,
                       callbacks=[slots.claim_next(n_trials)])
    finally:
        slots.release()


@pytest.mark.parametrize("limit, n_trials, runs", [
    (10, 3, 3),  # the process's own cap ends it: no claim is wasted on a 4th trial
    (2, 5, 2),   # the shared limit ends it: the study stops after the 2nd trial
])
def test_slots_claim_only_trials_that_will_run(tmp_path: Path, limit, n_trials, runs):
    claims = TrialClaims(tmp_path / "claims", limit=limit)
    study = optuna.create_study()
    _run(study, "", 100, n_trials, lambda t: t.suggest_float("x", 0, 1), claims.claim)
    assert len(study.trials) == runs
    assert claims.left() == limit - runs


SLOT_RACER = """
import sys, time
import optuna
from mnist_opt.search.slots import TrialSlots
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, target = sys.argv[1], int(sys.argv[2])
study = optuna.load_study(study_name="race", storage=url)
slots = TrialSlots(study, url, target)

def objective(trial):
    time.sleep(0.05)
    return trial.suggest_float("x", 0, 1)

if slots.claim():
    try:
        study.optimize(slots.gated(objective), n_trials=target,
                       callbacks=[slots.claim_next(target)])
    finally:
        slots.release()
"""


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def storage_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'race.db'}"
    url = request.getfixturevalue("postgres")["optuna"]
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name="race", storage=url)
    return url


def test_processes_that_each_count_the_target_finish_exactly_it(storage_url: str):
    """Each process would run the whole target alone (as k hosts that each start `mnist-opt
    study` do): the study's lock makes them finish exactly the target between them."""
    optuna.create_study(study_name="race", storage=storage_url)
    procs = [subprocess.Popen([sys.executable, "-c", SLOT_RACER, storage_url, "9"])
             for _ in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    study = optuna.load_study(study_name="race", storage=storage_url)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 9, states


@pytest.mark.parametrize("outcome, claimed", [
    (optuna.trial.TrialState.FAIL, True),       # a failed trial gives its slot back
    (optuna.trial.TrialState.COMPLETE, False),  # a finished one reaches the target
])
def test_a_worker_waits_for_a_running_trial_when_every_slot_is_taken(outcome, claimed):
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    running = study.ask()  # another worker's trial: 1 finished + 1 running = the target, 2
    slots = TrialSlots(study, "", 2)
    ends = threading.Timer(2 * POLL_SECONDS, study.tell, (running, 0.5 if claimed is False
                                                          else None), {"state": outcome})
    ends.start()
    start = time.monotonic()
    assert slots.claim() is claimed
    assert time.monotonic() - start >= 2 * POLL_SECONDS  # it waited for that trial
    slots.release()
