"""``mnist-opt compare``: several search strategies on one study's space and data, each
repeated with different seeds under the same budget; curves, a table and a verdict by time to
target in ``reports/compare/NAME/`` and in one MLflow run. Strategies, budget and overrides
are checked before TensorFlow or MLflow is imported and before anything is written."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from mnist_opt.errors import StudyFailedError, StudyFileError
from mnist_opt.search.strategies import (KT_TUNERS, PRUNERS, SAMPLERS, Budget, check_workers,
                                         parse_strategies, plan)
from mnist_opt.study.config import find_study


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="study name (a file studies/NAME.yaml) or a path to one: "
                                     "its space and data are searched by every strategy")
    parser.add_argument("--strategies", nargs="+", required=True, metavar="STRATEGY",
                        help=f"SAMPLER+PRUNER, e.g. tpe+hyperband random+none; samplers "
                             f"{', '.join(SAMPLERS)}; pruners {', '.join(PRUNERS)}; add "
                             ":full-data to search all training images without promotion "
                             "(against the study's search_subset + promote), :no-promote to "
                             "leave promotion out; or keras-tuner's "
                             f"{', '.join(KT_TUNERS)} (the bench extra; one worker)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="repeats per strategy, seeds SEED..SEED+R-1 (default 5)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-seconds", type=int, metavar="S",
                        help="per repeat: no new trial after S seconds of search")
    budget.add_argument("--budget-epochs", type=int, metavar="E",
                        help="per repeat: no new trial once its trials completed E epochs")
    budget.add_argument("--budget-trials", type=int, metavar="N",
                        help="per repeat: N trials, as each tool counts them (keras-tuner's "
                             "Hyperband counts each round of a bracket as a trial)")
    parser.add_argument("--retrain", action="store_true",
                        help="also score each repeat's best configuration on the test set, "
                             "trained as `retrain` does (all training images, retrain_epochs)")
    parser.add_argument("-w", "--workers", type=int, default=1,
                        help="worker processes per repeat, the same for every strategy (default 1)")
    parser.add_argument("--target", type=float, metavar="ACC",
                        help="the validation accuracy to reach (default: the lowest median final "
                             "best of the strategies)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where the report, curves, study files and logs go (default "
                             "reports/compare/NAME; the target of the previous run is read "
                             "from there)")
    parser.add_argument("--storage", help="Optuna storage URL (default: $OPTUNA_STORAGE, "
                                          "else sqlite:///studies/optuna.db)")
    parser.add_argument("--max-epochs", type=int, help="epochs per trial (study file otherwise)")
    parser.add_argument("--train-subset", type=int,
                        help="stratified subset of the training images (study file otherwise)")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this comparison (for summary.md and MLflow)."""
    def given(*flags: str) -> list[str]:
        return [word for flag in flags if getattr(args, flag) is not None
                for word in (f"--{flag.replace('_', '-')}", str(getattr(args, flag)))]

    return shlex.join(["mnist-opt", "compare", args.name, "--strategies", *args.strategies,
                       "--repeats", str(args.repeats),
                       *given("budget_seconds", "budget_epochs", "budget_trials"),
                       "--workers", str(args.workers), *(["--retrain"] if args.retrain else []),
                       *given("target", "max_epochs", "train_subset", "out", "storage")])


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare search strategies (SAMPLER+PRUNER, or keras-tuner's) on one study: R repeats each, the same
    budget; curves, table and verdict by time to target in reports/compare/NAME/."""
    if args.workers < 1:
        raise StudyFileError(f"--workers must be a positive integer, got {args.workers}")
    if args.target is not None and not 0 < args.target <= 1:
        raise StudyFileError(f"--target is a validation accuracy in (0, 1], got {args.target}")
    cfg = find_study(args.name)
    strategies = parse_strategies(args.strategies)
    check_workers(strategies, args.workers)
    budget = Budget(seconds=args.budget_seconds, epochs=args.budget_epochs,
                    trials=args.budget_trials)
    folder = args.out or Path("reports") / "compare" / cfg.name
    repeats = plan(cfg, strategies, args.repeats, budget, folder, args.max_epochs,
                   args.train_subset)
    from mnist_opt.quiet import import_tensorflow

    import_tensorflow()  # quietly, before MLflow and Keras import it noisily
    import optuna

    from mnist_opt.search.compare import compare
    from mnist_opt.tracking.storage import resolve_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = resolve_storage(args.storage)
    print(f"compare on {cfg.name}: {len(strategies)} strategies × {args.repeats} repeats "
          f"({', '.join(s.label for s in strategies)}), budget {budget}, {args.workers} worker"
          f"{'s' * (args.workers != 1)} per repeat, storage {storage}", flush=True)
    try:
        out = compare(cfg, repeats, budget, args.workers, storage, args.target, _command(args),
                      folder, args.verbose, args.retrain)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue (finished repeats are "
              "kept, the interrupted one is redone)", file=sys.stderr)
        return 130
    except StudyFailedError as exc:
        print(f"mnist-opt: compare {cfg.name} stopped: {exc}", file=sys.stderr)
        return 1
    print(f"\ntarget: validation accuracy {out.target:.4f} ({out.target_source})\n")
    print(out.table)
    print("\n".join(out.verdict) or "one strategy: nothing to compare it with")
    print(f"\nwritten: {out.folder}/ ({', '.join(p.name for p in out.files)}); MLflow "
          f"experiment compare-{cfg.name}, run {out.run_id}")
    return 0
