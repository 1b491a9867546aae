"""Subset search, then promotion (``search.promote: {top_k, epochs}``).

A study that searched cheaply (on ``data.search_subset``, or with a smaller ``max_epochs``)
re-trains its top-k COMPLETE configurations (all when fewer) on the full training split for
``epochs`` (default ``retrain_epochs``), one seed each (the trial's), and ranks them by that
validation accuracy: the winner becomes the study's pick (``objectives.pick``), so ``retrain``
and ``report`` use the promoted ranking. Finished trials cannot take new user attributes in
Optuna, so the results are the study's user attribute ``promoted`` (trial number → full-data
validation accuracy, epochs, MLflow run) and ``promoted_best``; in MLflow, a ``promote`` run
with one nested run per configuration, tagged ``promoted``. A rerun after an interruption
promotes only what is missing.
"""
from __future__ import annotations

import contextlib
from typing import Any

import mlflow
import optuna

from mnist_opt import data
from mnist_opt.study.config import StudyConfig
from mnist_opt.study.objectives import PROMOTED, PROMOTED_BEST, top_complete
from mnist_opt.study.space import suggest_params
from mnist_opt.tracking import runs as tracking
from mnist_opt.training.callbacks import TrialCallback
from mnist_opt.training.loop import fresh_model, study_split, train


def _train_one(cfg: StudyConfig, trial: optuna.trial.FrozenTrial, split: data.Split,
               epochs: float, verbose: bool) -> dict[str, Any]:
    """One configuration on the full split, in a nested run tagged ``promoted``."""
    params = suggest_params(optuna.trial.FixedTrial(trial.params), cfg)
    parent = mlflow.active_run().info  # the promote run: its experiment, not the active one
    with mlflow.start_run(run_name=f"promote-trial-{trial.number}", nested=True,
                          experiment_id=parent.experiment_id, parent_run_id=parent.run_id,
                          tags={"promoted": "true", "trial_number": str(trial.number),
                                "mnist_opt.kind": "promote-trial"}) as run:
        mlflow.log_params({**params, "epochs": epochs, "n_train": len(split.y_train)})
        model = fresh_model(params, cfg.search.seed + trial.number)
        callback = TrialCallback(None, epochs=epochs, label=f"promote {trial.number}",
                                 verbose=verbose)
        history = train(model, params, (split.x_train, split.y_train),
                        (split.x_val, split.y_val), epochs, [callback],
                        seed=cfg.search.seed + trial.number)
        tracking.log_model(model)
    return {"val_accuracy": float(history.history["val_accuracy"][-1]), "epochs": epochs,
            "n_train": len(split.y_train), "search_value": trial.values[0],
            "mlflow_run_id": run.info.run_id,
            # its epochs count in `compare`'s time to target, as a trial's do
            "epoch_log": callback.epoch_log}


def promote(cfg: StudyConfig, study: optuna.Study, verbose: bool = False,
            out=print) -> dict[str, Any] | None:
    """Promote what is missing of the top-k, then rank them; None without ``search.promote``
    or a complete trial. Returns the ``promoted`` attribute with the winner under ``best``."""
    setting = cfg.search.promote
    top = top_complete(study, setting.top_k) if setting else []
    if not top:
        return None
    epochs = setting.epochs or cfg.retrain_epochs
    split = study_split(cfg, full=True)
    # only the current top-k, and only results of this budget: a changed promote.epochs or
    # train_subset trains them again
    same = {"epochs": epochs, "n_train": len(split.y_train)}
    earlier = study.user_attrs.get(PROMOTED, {})
    done: dict[str, Any] = {str(t.number): earlier[str(t.number)] for t in top
                            if str(t.number) in earlier and all(
                                earlier[str(t.number)].get(k) == v for k, v in same.items())}
    todo = [t for t in top if str(t.number) not in done]
    if done != earlier:
        study.set_user_attr(PROMOTED, done)
    if todo:
        out(f"promoting {len(todo)} of the top {len(top)} configurations: {len(split.y_train)} "
            f"training images, {epochs:g} epochs each")
    # a promote run in MLflow only when something is trained
    run = (mlflow.start_run(run_name="promote",
                            # under compare: its experiment, as the repeat's runs
                            experiment_id=tracking.open_experiment(cfg.name, outer=True),
                            tags={"mnist_opt.kind": "promote", "optuna.study_name": cfg.name})
           if todo else contextlib.nullcontext())
    with run:
        for trial in todo:
            done[str(trial.number)] = _train_one(cfg, trial, split, epochs, verbose)
            study.set_user_attr(PROMOTED, done)  # kept when interrupted
            out(f"  trial {trial.number}: search value {trial.values[0]:.4f}, full-data "
                f"validation accuracy {done[str(trial.number)]['val_accuracy']:.4f}")
        best = max(top, key=lambda t: (done[str(t.number)]["val_accuracy"], -t.number))
        if todo:
            mlflow.set_tag("promoted_best_trial", str(best.number))
            mlflow.log_metric("promoted_best_val_accuracy",
                              done[str(best.number)]["val_accuracy"])
    study.set_user_attr(PROMOTED_BEST, best.number)
    out(f"promoted pick: trial {best.number} (full-data validation accuracy "
        f"{done[str(best.number)]['val_accuracy']:.4f}; search's best was trial {top[0].number})")
    return {**done, "best": best.number}
