"""Parallel workers: N processes share one study, each trial nested under one MLflow run.

Small Keras models are bound by per-step overhead, not arithmetic: on 2 cores, two
single-threaded trials at once give nearly twice the throughput of one 2-thread trial.
The parent process creates storage, study, experiment and parent run first; each worker
claims the missing trials one at a time from a shared count, and has its own sampler seed
and ``cores // workers`` threads.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mnist_opt import interrupt
from mnist_opt.search.cores import cpu_limit

if TYPE_CHECKING:
    from mnist_opt.search.progress import StudyProgress


class TrialClaims:
    """How many trials this invocation's worker processes started, out of how many, in a
    file they share under an exclusive lock: each process claims a trial before it starts
    one, so together they start exactly the missing trials however unevenly their trials
    run (fixed shares left a worker idle while another still had several to run).

    The file holds two integers, ``limit claimed``."""

    def __init__(self, path: Path, limit: int | None = None):
        self.path = path
        if limit is not None:
            path.write_text(f"{limit} 0")

    def _read(self, fh) -> tuple[int, int]:
        fh.seek(0)
        limit, claimed = map(int, fh.read().split())
        return limit, claimed

    def claim(self) -> bool:
        """One more trial may start (counted), or the limit is reached (False)."""
        with open(self.path, "r+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
            limit, claimed = self._read(fh)
            if claimed >= limit:
                return False
            fh.seek(0)
            fh.truncate()
            fh.write(f"{limit} {claimed + 1}")
            return True

    def left(self) -> int:
        """Trials not claimed yet."""
        with open(self.path) as fh:
            fcntl.flock(fh, fcntl.LOCK_SH)
            limit, claimed = self._read(fh)
        return limit - claimed


def run_workers(cfg, storage: str, parent_run_id: str, remaining: int, workers: int,
                verbose: bool, progress: StudyProgress | None = None,
                stopped: Callable[[], bool] = lambda: False) -> None:
    """Keep ``workers`` processes busy until they have started ``remaining`` trials between
    them (:class:`TrialClaims`).

    A slot's process is replaced after ``cfg.search.trials_per_worker`` trials (TensorFlow
    leaks traced graphs per model; a fresh process frees them), with a new sampler seed and
    what is left of the study's timeout, unless ``stopped()`` (the storage says the study's
    trials keep failing; the workers stop themselves). Ctrl-C / SIGTERM is passed on and
    waited for.
    """
    threads = max(1, cpu_limit() // workers)  # the quota's share, not the host's cores
    deadline = time.monotonic() + cfg.search.timeout if cfg.search.timeout else None
    procs: list[subprocess.Popen | None] = [None] * workers
    spawned, failed = 0, []
    with tempfile.TemporaryDirectory(prefix="mnist_opt_") as tmp:
        config = Path(tmp) / "study.json"
        config.write_text(cfg.model_dump_json())
        claims = TrialClaims(Path(tmp) / "claims", remaining)

        def spawn(slot: int) -> None:
            nonlocal spawned
            left = None if deadline is None else max(1, int(deadline - time.monotonic()))
            procs[slot] = subprocess.Popen(
                [sys.executable, "-m", "mnist_opt.search.workers", str(config), "--storage", storage,
                 "--parent-run-id", parent_run_id,
                 "--n-trials", str(min(remaining, cfg.search.trials_per_worker)),
                 "--claims", str(claims.path), "--index", str(spawned), "--threads", str(threads),
                 *(["--timeout", str(left)] if left else []), *(["-v"] if verbose else [])])
            spawned += 1

        for slot in range(min(workers, remaining)):
            spawn(slot)
        (progress.write if progress else print)(
            f"{sum(p is not None for p in procs)} workers started "
            f"(pids {', '.join(str(p.pid) for p in procs if p)}), {threads} thread(s) each, "
            f"each replaced after {cfg.search.trials_per_worker} trials")
        polls = 0
        try:
            while any(p is not None for p in procs):
                interrupt.check()
                time.sleep(0.5)
                polls += 1
                if progress and polls % 2 == 0:  # the storage, once a second
                    progress.refresh()
                for slot, proc in enumerate(procs):
                    if proc is None or proc.poll() is None:
                        continue
                    procs[slot] = None
                    if proc.returncode:
                        failed.append(proc.returncode)
                    elif (claims.left() > 0 and (deadline is None or time.monotonic() < deadline)
                          and not stopped()):
                        spawn(slot)
        except KeyboardInterrupt:
            running = [p for p in procs if p is not None and p.poll() is None]
            for p in running:
                p.send_signal(signal.SIGINT)
            for p in running:
                p.wait(timeout=300)
            raise
    if failed:
        print(f"warning: {len(failed)} worker(s) exited with status {failed}", file=sys.stderr)


def work(config: Path, storage: str, parent_run_id: str, n_trials: int, index: int,
         verbose: bool, timeout: int | None = None, claims: Path | None = None) -> None:
    """One worker: load the data once, join the study, run up to ``n_trials`` trials, each
    claimed from ``claims`` first when given."""
    import mlflow
    import optuna

    from mnist_opt.tracking import runs as tracking
    from mnist_opt.training.loop import study_split
    from mnist_opt.study.config import StudyConfig
    from mnist_opt.search.objective import budget_spent, optimize
    from mnist_opt.search.slots import n_finished
    from mnist_opt.search.samplers import make_pruner, make_sampler
    from mnist_opt.tracking.storage import make_storage

    cfg = StudyConfig.model_validate_json(config.read_text())
    if timeout:  # what is left of the study's timeout when this process started
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"timeout": timeout})})
    study = optuna.load_study(study_name=cfg.name, storage=make_storage(storage),
                              sampler=make_sampler(cfg, seed_offset=index),
                              pruner=make_pruner(cfg))
    # A replacement process may start after the others reached the study's target.
    n_trials = min(n_trials, cfg.search.n_trials - n_finished(study))
    if n_trials <= 0 or budget_spent(cfg, study):
        return
    split = study_split(cfg)
    tracking.configure()
    # a short-lived process: freezing after each trial's collection is safe and cheap here
    optimize(cfg, study, storage, split, mlflow.get_run(parent_run_id), n_trials, verbose,
             freeze=True, host_claim=TrialClaims(claims).claim if claims else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_opt.search.workers",
                                     description="one worker of `mnist-opt study --workers N`")
    parser.add_argument("config", type=Path)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--parent-run-id", required=True)
    parser.add_argument("--n-trials", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=int)
    parser.add_argument("--claims", type=Path, help="the TrialClaims file of run_workers")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    interrupt.install()
    import optuna

    # the parent draws the progress bar; a worker's own trial lines only when asked for
    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.WARNING)
    from mnist_opt.training.backend import start_limited

    start_limited(args.threads)  # KERAS_BACKEND: the parent's choice, inherited
    try:
        work(args.config, args.storage, args.parent_run_id, args.n_trials, args.index, args.verbose,
             args.timeout, args.claims)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
