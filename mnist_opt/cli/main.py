"""mnist-opt: Optuna searches of Keras models on MNIST and Fashion-MNIST, tracked in MLflow.

Exit status: 0 done; 2 bad input (unknown study, invalid or changed study file, missing or
corrupt data, bad storage or tracking store, nothing to retrain); 1 a study stopped because
its trials keep failing, or anything else; 130 interrupted. Heavy imports (TensorFlow, MLflow)
are deferred so that ``--help``, ``list`` and ``check`` answer at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from mnist_opt import interrupt
from mnist_opt.cli import check, compare, serve
from mnist_opt.errors import MnistOptError, StudyFailedError, StudyFileError
from mnist_opt.study.config import find_study, known_studies, load_config, studies_dir, with_overrides
from mnist_opt.training.calibrate import FAMILIES


def _overrides(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quick-run overrides (study file values otherwise)")
    group.add_argument("--n-trials", type=int, help="the study's target of finished trials (study only)")
    group.add_argument("--timeout", type=int, help="seconds before no new trial starts (study only)")
    group.add_argument("--max-epochs", type=int, help="epochs per trial / for the retrain")
    group.add_argument("--train-subset", type=int, help="stratified subset of the training images")
    group.add_argument("--storage", help="Optuna storage URL (default: $OPTUNA_STORAGE, "
                                         "else sqlite:///studies/optuna.db)")


def _config(args: argparse.Namespace):
    for flag in ("n_trials", "timeout", "max_epochs", "train_subset", "workers"):
        value = getattr(args, flag, None)
        if isinstance(value, int) and value < 1:
            raise StudyFileError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    cfg = with_overrides(find_study(args.name), args.n_trials, args.timeout, args.max_epochs,
                         args.train_subset)
    if args.command in TRAINS:  # before anything imports Keras, which fixes its backend
        from mnist_opt.training.backend import apply, choose

        backend, args.backend = choose(cfg)
        apply(backend)
    _heavy(args)  # only now: a bad name or file is refused at once, without TensorFlow
    return cfg


# The commands that load TensorFlow (results: through MLflow's Keras flavour).
HEAVY = ("study", "retrain", "results", "predict", "lr-find")
# The commands that train a study's models, on the backend its training.backend chooses.
TRAINS = ("study", "retrain", "lr-find")


def _heavy(args: argparse.Namespace) -> None:
    """Import TensorFlow quietly (before Keras and MLflow do it noisily) if the command needs it."""
    if args.command in HEAVY:
        from mnist_opt.quiet import import_tensorflow

        import_tensorflow()


def _print_rows(rows: list[dict], cols: list[str]) -> None:
    """Rows as a plain-text table with aligned columns."""
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in cols).rstrip())


def _list_params(args: argparse.Namespace) -> int:
    """The parameter table: what a study file's space may name."""
    from mnist_opt.study import docs

    if args.update:
        from mnist_opt.textblocks import replace_between

        replace_between(Path(args.update), docs.START, docs.END, docs.markdown())
        print(f"wrote the parameter table into {args.update}")
    elif args.format == "markdown":
        print(docs.markdown(), end="")
    elif args.format == "json":
        print(json.dumps(docs.rows(), indent=2))
    else:  # the long choice lists (activations) are in full in -f json and the README
        rows = [{k: (v if len(str(v)) <= 48 else f"{str(v)[:45]}...") for k, v in row.items()}
                for row in docs.rows()]
        _print_rows(rows, list(rows[0]))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """List the studies in studies/ (dataset, model, sampler, pruner), or with --params the
    parameters a study file may search."""
    if args.params:
        return _list_params(args)
    rows = []
    for name in known_studies():
        try:
            cfg = load_config(studies_dir() / f"{name}.yaml")
            rows.append({"name": name, "dataset": cfg.dataset, "model": cfg.model,
                         "sampler": cfg.search.sampler, "pruner": cfg.search.pruner,
                         "n_trials": cfg.search.n_trials, "description": cfg.description})
        except StudyFileError as exc:
            rows.append({"name": name, "dataset": "INVALID", "model": "", "sampler": "",
                         "pruner": "", "n_trials": "", "description": str(exc).splitlines()[0]})
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    _print_rows(rows, ["name", "dataset", "model", "sampler", "pruner", "n_trials", "description"])
    return 0


def _workers(text: str) -> int | str:
    """``--workers``: a positive integer, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a number of worker processes nor 'auto'") from None


def _positive(text: str) -> int:
    """A positive integer argument."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _worker_count(requested: int | str) -> tuple[int, str]:
    """The workers to start and how the start line says it."""
    if requested != "auto":
        return int(requested), f"{requested} (--workers)"
    from mnist_opt.search.cores import auto_workers

    cores = auto_workers()
    return cores.workers, cores.describe()


def cmd_study(args: argparse.Namespace) -> int:
    """Run (or continue) a study until it has n_trials finished trials, each tracked in MLflow."""
    cfg = _config(args)
    workers, how = _worker_count(args.workers)
    import optuna

    from mnist_opt.search import runner
    from mnist_opt.search.objective import summary
    from mnist_opt.tracking.storage import resolve_storage

    storage = resolve_storage(args.storage)
    if args.mix_versions and args.new_version:
        raise StudyFileError("--mix-versions and --new-version exclude each other: choose one")
    if args.new_version:
        from mnist_opt.search.versions import new_version
        from mnist_opt.tracking.storage import make_storage

        cfg = new_version(cfg, make_storage(storage))
        print(f"this version of {cfg.path.name} is study {cfg.name}: use that name with "
              f"retrain, report and lr-find (MLflow experiment and registered model {cfg.name})")
    # the progress bar carries the best value; Optuna's per-trial lines only with -v
    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.WARNING)
    print(f"study {cfg.name}: {cfg.dataset} {cfg.model}, sampler {cfg.search.sampler}, "
          f"pruner {cfg.search.pruner}, target {cfg.search.n_trials} trials × "
          f"≤{cfg.training.max_epochs} epochs, storage {storage}; workers {how}; "
          f"backend {args.backend}", flush=True)
    interrupted, failure = False, None
    try:
        study = runner.run_study(cfg, storage, verbose=args.verbose, progress=not args.quiet,
                                 workers=workers, mix=args.mix_versions, argument=args.name,
                                 warm_from=args.warm_start, warm_top=args.warm_top)
    except KeyboardInterrupt:
        interrupted = True
        study = optuna.load_study(study_name=cfg.name, storage=storage)
    except StudyFailedError as exc:  # the study file was valid: 1, not 2
        failure = exc
        study = optuna.load_study(study_name=cfg.name, storage=storage)
    _print_summary(cfg, summary(study, cfg.search.pick_tolerance), interrupted, storage, failure,
                   workers)
    return 130 if interrupted else 1 if failure else 0


def _print_summary(cfg, result: dict, interrupted: bool, storage: str,
                   failure: StudyFailedError | None = None, workers: int = 1) -> None:
    head = "interrupted; " if interrupted else "stopped; " if failure else ""
    copies = (f", and {result['copied']} copied by a warm start (not counted toward it)"
              if result["copied"] else "")
    print(f"\n{head}study {cfg.name}: {result['complete']} complete, {result['pruned']} pruned, "
          f"{result['fail']} failed trials in storage (target: {cfg.search.n_trials} finished)"
          f"{copies}; this run: {workers} worker process{'es' * (workers != 1)}")
    second = cfg.search.second_objective
    if "pareto" in result:
        from mnist_opt.study.objectives import rule

        print(f"Pareto front ({cfg.search.metric} vs {second}): trials "
              f"{', '.join(map(str, result['pareto']))}")
        print(f"picked trial {result['best_trial']}: {cfg.search.metric} "
              f"{result['best_value']:.4f}, {second} {result['best_values'][1]:.6g} — "
              f"{rule(cfg.search.metric, second, cfg.search.pick_tolerance)}")
        print(f"its params: {json.dumps(result['best_params'])}")
    elif "best_value" in result:
        print(f"best trial {result['best_trial']}: {cfg.search.metric} {result['best_value']:.4f}")
        print(f"best params: {json.dumps(result['best_params'])}")
    if interrupted:
        print(f"run the same command again to continue: make study NAME={cfg.name}")
    import mlflow

    print(f"where to look:\n"
          f"  trials, live:  make dashboard   (optuna-dashboard {storage}) → http://127.0.0.1:8080\n"
          f"  MLflow runs:   make mlflow-ui   (experiment {cfg.name}, tracking "
          f"{mlflow.get_tracking_uri()}) → http://127.0.0.1:5000\n"
          f"  plots, table:  make report NAME={cfg.name}   (also the study run's plots/ in MLflow)")
    if failure is None:
        print(f"next: make retrain NAME={cfg.name} SEEDS=3   (tests the best trial, registers "
              f"model '{cfg.name}')")
        return
    print(f"\nmnist-opt: study {cfg.name} failed: {failure}")
    trial = failure.trial
    if trial is not None:  # what the user must fix, without opening the dashboard
        print(f"last failed trial {trial.number}: {trial.user_attrs.get('fail_reason', '?')}")
        tail = trial.user_attrs.get("traceback", "").rstrip().splitlines()[-6:]
        print("\n".join(f"  {line}" for line in tail))
        print(f"fix it, then run the same command again: make study NAME={cfg.name}")


def cmd_retrain(args: argparse.Namespace) -> int:
    """Retrain the best trial on train+validation, evaluate on test, register the model."""
    cfg = _config(args)
    from mnist_opt.training.retrain import retrain

    if args.seeds < 1:
        raise StudyFileError(f"--seeds must be a positive integer, got {args.seeds}")
    res = retrain(cfg, args.storage, verbose=not args.quiet, seeds=args.seeds)  # epochs unless -q
    print(f"\n{cfg.name}: best trial {res.trial_number} retrained for {cfg.retrain_epochs} epochs")
    if args.seeds > 1:
        print(f"test accuracy {res.test_accuracy:.4f} ± {res.test_std:.4f} (mean ± std over "
              f"{args.seeds} seeds: {', '.join(f'{a:.4f}' for a in res.test_accuracies)})")
    else:
        print(f"test accuracy {res.test_accuracy:.4f}")
    print(f"best validation accuracy {res.val_accuracy:.4f}   test loss {res.test_loss:.4f}")
    if res.baseline_accuracy is not None:
        print(f"baseline ({cfg.baseline.description}): test accuracy {res.baseline_accuracy:.4f} "
              f"→ tuned {res.test_accuracy:.4f}, "
              f"{100 * (res.test_accuracy - res.baseline_accuracy):+.2f} points")
    ev = res.evaluation
    print(f"test set: macro F1 {ev['test_macro_f1']:.4f}, {ev['test_errors']} errors, weakest "
          f"class {ev['weakest_class']} (F1 {ev['weakest_f1']:.4f}); macro AP "
          f"{ev['test_macro_ap']:.4f}, macro ROC AUC {ev['test_macro_auc']:.4f}, lowest AP class "
          f"{ev['lowest_ap_class']} (AP {ev['lowest_ap']:.4f})")
    print(f"confusion matrix, per-class report, PR/ROC curves and misclassified images in "
          f"{res.report_dir}/ and the MLflow run's evaluation/")
    print(f"MLflow run {res.run_id}; registered model {cfg.name} version {res.model_version} "
          f"(models:/{cfg.name}/{res.model_version})")
    if res.champion:
        print(f"models:/{cfg.name}@champion is version {res.champion}" +
              (" (this one)" if res.champion == res.model_version else
               " (a higher test accuracy than this one's)"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print the study's top trials and write Optuna's plots (HTML + PNG) to reports/NAME/."""
    cfg = _config(args)
    from mnist_opt.reporting.plots import write_plots
    from mnist_opt.reporting.report import table
    from mnist_opt.tracking.storage import load_existing, resolve_storage

    study = load_existing(cfg.name, resolve_storage(args.storage))
    print(table(study, args.top, cfg.search.pick_tolerance))
    folder = cfg.report_dir
    skipped = write_plots(study, folder, target_names=cfg.objective_names)
    print(f"\nplots: {folder}/ ({', '.join(p.name for p in sorted(folder.glob('*.html')))})")
    for name, reason in skipped.items():
        print(f"  {name} not drawn: {reason}")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    """The results table: each study's search and retrained test accuracy, read from MLflow."""
    from pathlib import Path

    from mnist_opt.reporting import results

    rows = results.collect(args.names)
    table = results.markdown(rows)
    if args.update:
        from mnist_opt.study.config import known_studies

        known = known_studies()
        kept = results.kept_lines(Path(args.update), {r["study"] for r in rows}, known)
        results.update_file(Path(args.update), results.markdown(rows, kept, known))
        print(f"wrote the results of {len(rows)} studies into {args.update}"
              + (f"; kept the lines of {', '.join(sorted(kept))} as they were (no retrain of "
                 f"them in this MLflow store)" if kept else ""))
    else:
        print(table, end="")
    if not rows:
        print("no study has been retrained yet: run `make study NAME=…` then "
              "`make retrain NAME=… SEEDS=3`", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify image files with a model: the class name and the top-3 probabilities."""
    from mnist_opt.training.predict import predict

    for result in predict(args.model, args.images, args.dataset):
        print(result.line())
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    """Learning-rate range test: loss vs an exponentially rising LR (plot in reports/NAME/),
    a suggested learning_rate range, written into the study file with --apply."""
    cfg = _config(args)
    from mnist_opt.training import lrfind
    from mnist_opt.tracking.storage import resolve_storage

    storage = resolve_storage(args.storage)
    try:
        res = lrfind.run(cfg, storage, args.min_lr, args.max_lr, args.steps, args.apply)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing logged, study file unchanged", file=sys.stderr)
        return 130
    sug, curve = res.suggestion, res.curve
    end = f"diverged at {curve.lrs[-1]:.1e}" if curve.diverged else f"ended at {curve.lrs[-1]:.1e}"
    print(f"{len(curve.lrs)} batches: steepest descent at lr {sug.lr_steep:.1e}, lowest smoothed "
          f"loss at {sug.lr_min_loss:.1e}, {end}")
    for note in sug.notes:
        print(f"note: {note}")
    print(f"suggested learning_rate range: [{sug.low:.1e}, {sug.high:.1e}] (rule: {lrfind.RULE})")
    print(f"plot: {res.plot}; MLflow run {res.run_id}")
    if res.applied:
        print(f"applied to {cfg.path}:")
        print("\n".join([f"- {line}" for line in res.applied[0]]
                        + [f"+ {line}" for line in res.applied[1]]))
        if res.study_trials:
            trials = f"{res.study_trials} trial{'s' * (res.study_trials != 1)}"
            print(f"note: study {cfg.name} already has {trials} in {storage}; "
                  "the edited file searches a new range, so `mnist-opt study` refuses to continue "
                  f"it until you choose: --new-version (study {cfg.name}.v2…) or --mix-versions.")
        return 0
    spec = cfg.space.get("learning_rate")
    if isinstance(spec, lrfind.Range):
        print(f"study file's range now: [{spec.low:.1e}, {spec.high:.1e}]; "
              f"apply it: mnist-opt lr-find {args.name} --apply")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Time each model family's first and later epochs under TensorFlow and JAX on this
    machine, for training.backend: auto (stored in the per-user cache; minutes)."""
    from mnist_opt.reporting.machine import describe
    from mnist_opt.training.backend import calibration_path
    from mnist_opt.training.calibrate import calibrate

    if args.train_subset is not None and args.train_subset < 100:
        raise StudyFileError(f"--train-subset must be at least 100 images (as a study file's "
                             f"data.train_subset), got {args.train_subset}")
    doc = calibrate(args.families, args.epochs, args.train_subset, describe())
    print(f"calibrated {', '.join(args.families)} in {doc['seconds']:.0f} s: "
          f"{calibration_path()} (studies with training.backend: auto now choose from it)")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": cmd_list, "check": check.cmd_check, "study": cmd_study, "retrain": cmd_retrain, "report": cmd_report,
    "results": cmd_results, "predict": cmd_predict, "lr-find": cmd_lr_find,
    "compare": compare.cmd_compare, "calibrate": cmd_calibrate, "serve": serve.cmd_serve}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-opt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in COMMANDS.items():
        p = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
        p.add_argument("-v", "--verbose", action="store_true", help="one line per epoch")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        if name == "list":
            p.add_argument("-f", "--format", choices=["table", "json", "markdown"],
                           default="table", help="markdown: with --params only")
            p.add_argument("--params", action="store_true",
                           help="list the parameter table instead of the studies")
            p.add_argument("--update", metavar="FILE", help="with --params: write the table "
                           "between the params markers of FILE (README.md)")
        elif name == "check":
            check.add_arguments(p)
        elif name == "compare":
            compare.add_arguments(p)
        elif name == "serve":
            serve.add_arguments(p)
        elif name == "results":
            p.add_argument("names", nargs="*", metavar="NAME", help="studies (default: all)")
            p.add_argument("--update", metavar="FILE",
                           help="write the table between the results markers of FILE (README.md)")
        elif name == "calibrate":
            p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                           help="model families to time (default: all)")
            p.add_argument("--epochs", type=int, default=3,
                           help="epochs per measurement, at least 2 (default 3)")
            p.add_argument("--train-subset", type=int, metavar="N",
                           help="time on N training images instead of all 54,000")
        elif name == "predict":
            p.add_argument("--model", required=True, metavar="URI",
                           help="MLflow model URI, e.g. models:/mlp_tpe/latest (from `retrain`)")
            p.add_argument("images", nargs="+", metavar="IMAGE",
                           help="image files: 28×28 MNIST-style or any size/colour (converted)")
            p.add_argument("--dataset", choices=["mnist", "fashion-mnist"],
                           help="class names and conversion (default: the model's study)")
        else:
            p.add_argument("name", help="study name (a file studies/NAME.yaml) or a path to one")
            _overrides(p)
        if name == "report":
            p.add_argument("--top", type=int, default=10, help="trials in the table (default 10)")
        if name == "retrain":
            p.add_argument("--seeds", type=int, default=1, metavar="K",
                           help="train K times with different seeds; report mean ± std")
        if name == "study":
            p.add_argument("-w", "--workers", type=_workers, default="auto", metavar="N|auto",
                           help="parallel worker processes sharing the study (default auto: "
                                "one per usable core, as far as memory allows)")
            p.add_argument("--mix-versions", action="store_true",
                           help="continue a study whose file changed, mixing trials of both "
                                "versions (recorded on the study and its MLflow run)")
            p.add_argument("--new-version", action="store_true",
                           help="run this file's version of the study under its own name, "
                                "NAME.v2, v3, …: continue the one this file searches, or start one")
            p.add_argument("--warm-start", metavar="OTHER",
                           help="seed the study with the best finished trials of study OTHER in "
                                "the same storage: copied where both measure the same way "
                                "(not counted toward n_trials), else queued to run anew")
            p.add_argument("--warm-top", type=_positive, default=5, metavar="K",
                           help="how many of OTHER's best trials (default 5)")
        if name == "lr-find":
            p.add_argument("--apply", action="store_true",
                           help="write the suggested range into the study file's learning_rate")
            p.add_argument("--min-lr", type=float, default=1e-6, help="first LR (default 1e-6)")
            p.add_argument("--max-lr", type=float, default=10.0, help="last LR (default 10)")
            p.add_argument("--steps", type=int, default=300,
                           help="batches, at most one epoch (default 300)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupt.install()
    if args.command in ("results", "predict"):  # the others check their study file first
        _heavy(args)
    try:
        return COMMANDS[args.command](args)
    except MnistOptError as exc:
        print(f"mnist-opt: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mnist-opt list --params | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
