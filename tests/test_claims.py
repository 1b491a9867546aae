"""Worker processes claim the missing trials one at a time from a shared, locked count: however
many processes race for them, exactly the limit is handed out (run_workers relies on it to stop
a study at exactly its target without fixed shares per worker)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from mnist_opt.search.workers import TrialClaims

RACER = """
import sys
from pathlib import Path
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


@pytest.mark.parametrize("limit, n_trials, runs", [
    (10, 3, 3),  # the process's own cap ends it: no claim is wasted on a 4th trial
    (2, 5, 2),   # the shared limit ends it: the study stops after the 2nd trial
])
def test_claim_next_claims_only_trials_that_will_run(tmp_path: Path, limit, n_trials, runs):
    claims = TrialClaims(tmp_path / "claims", limit=limit)
    assert claims.claim()  # the process's first trial, claimed before study.optimize
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n_trials,
                   callbacks=[claims.claim_next(n_trials)])
    assert len(study.trials) == runs
    assert claims.left() == limit - runs
