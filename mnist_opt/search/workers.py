"""Parallel workers: N processes share one study, each trial nested under one MLflow run.

Small Keras models are bound by per-step overhead, not arithmetic: on 2 cores, two
single-threaded trials at once give nearly twice the throughput of one 2-thread trial.
The parent process creates storage, study, experiment and parent run first; each worker
gets a share of the missing trials, its own sampler seed and ``cores // workers`` threads.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mnist_opt import interrupt
from mnist_opt.search.cores import usable_cpus

if TYPE_CHECKING:
    from mnist_opt.search.progress import StudyProgress


def quotas(remaining: int, workers: int) -> list[int]:
    """Split ``remaining`` trials as evenly as possible: the total is exactly the target."""
    return [remaining // workers + (i < remaining % workers) for i in range(workers)]


def run_workers(cfg, storage: str, parent_run_id: str, remaining: int, workers: int,
                verbose: bool, progress: StudyProgress | None = None,
                stopped: Callable[[], bool] = lambda: False) -> None:
    """Keep ``workers`` processes busy until each slot has run its share of trials.

    A slot's process is replaced after ``cfg.search.trials_per_worker`` trials (TensorFlow
    leaks traced graphs per model; a fresh process frees them), with a new sampler seed and
    what is left of the study's timeout, unless ``stopped()`` (the storage says the study's
    trials keep failing; the workers stop themselves). Ctrl-C / SIGTERM is passed on and
    waited for.
    """
    threads = max(1, usable_cpus() // workers)
    deadline = time.monotonic() + cfg.search.timeout if cfg.search.timeout else None
    shares = quotas(remaining, workers)
    procs: list[subprocess.Popen | None] = [None] * workers
    given = [0] * workers  # trials handed to the slot's current process
    spawned, failed = 0, []
    with tempfile.TemporaryDirectory(prefix="mnist_opt_") as tmp:
        config = Path(tmp) / "study.json"
        config.write_text(cfg.model_dump_json())

        def spawn(slot: int) -> None:
            nonlocal spawned
            given[slot] = min(shares[slot], cfg.search.trials_per_worker)
            left = None if deadline is None else max(1, int(deadline - time.monotonic()))
            procs[slot] = subprocess.Popen(
                [sys.executable, "-m", "mnist_opt.search.workers", str(config), "--storage", storage,
                 "--parent-run-id", parent_run_id, "--n-trials", str(given[slot]),
                 "--index", str(spawned), "--threads", str(threads),
                 *(["--timeout", str(left)] if left else []), *(["-v"] if verbose else [])])
            spawned += 1

        for slot in range(workers):
            if shares[slot]:
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
                    shares[slot] -= given[slot]
                    if proc.returncode:
                        failed.append(proc.returncode)
                    elif (shares[slot] > 0 and (deadline is None or time.monotonic() < deadline)
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
         verbose: bool, timeout: int | None = None) -> None:
    """One worker: load the data once, join the study, run its share of trials."""
    import mlflow
    import optuna

    from mnist_opt.tracking import runs as tracking
    from mnist_opt.training.loop import study_split
    from mnist_opt.study.config import StudyConfig
    from mnist_opt.search.objective import budget_spent, n_finished, optimize
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
    optimize(cfg, study, split, mlflow.get_run(parent_run_id), n_trials, verbose, freeze=True)


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
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    interrupt.install()
    import optuna

    # the parent draws the progress bar; a worker's own trial lines only when asked for
    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.WARNING)
    from mnist_opt.quiet import import_tensorflow

    tf = import_tensorflow()

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    try:
        work(args.config, args.storage, args.parent_run_id, args.n_trials, args.index, args.verbose,
             args.timeout)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
