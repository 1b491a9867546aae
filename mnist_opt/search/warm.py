"""Warm start: seed a study with the best finished trials of another one.

``mnist-opt study NAME --warm-start OTHER`` takes OTHER's top-k COMPLETE trials. Where the
two studies measure the same thing — dataset, split, metric and direction, ``max_epochs``,
reports per epoch — and a trial's every parameter has the same distribution in both spaces,
it is copied as a finished trial (``study.add_trial``: the sampler learns from it at once,
Hyperband's brackets do not; it is marked ``warm_start: copied`` and does not count toward
``n_trials``). Fixed entries of the two spaces, the model and the table version must match too.
Otherwise its parameters are queued (``study.enqueue_trial``) and run anew as ordinary trials.
This is also how a new version of a changed study file starts from the old one.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import mlflow
import optuna
from mlflow.entities import Metric, Param

from mnist_opt.errors import StudyFileError
from mnist_opt.study.config import StudyConfig
from mnist_opt.study.objectives import top_complete
from mnist_opt.study.space import suggest_params, value_problems
from mnist_opt.tracking.storage import load_existing

SOURCE = "warm_start_from"  # trial user attribute: "OTHER#number"
KIND = "warm_start"  # trial user attribute: "copied" or "enqueued"
ENQUEUED = "enqueued_from"  # trial user attribute of search.enqueue's configurations
SEEDED = (SOURCE, KIND, ENQUEUED)  # what a queued trial's MLflow run is tagged with
# what a copied trial's value must mean the same in both studies (their search sections)
SAME = (("dataset",), ("model",), ("data",), ("search", "metric"), ("search", "direction"),
        ("search", "report_every"), ("training", "max_epochs"), ("parameter_table_version",))
# the source's bookkeeping that would be wrong here: its epochs count toward no budget of this
# study, its timestamps are of another run (fixed cost, time to target)
NOT_COPIED = ("epoch_log", "epochs", "pruned_at_epoch", "rss_mb", "pid")


def copied(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial copied from another study: it does not count toward ``n_trials``."""
    return trial.user_attrs.get(KIND) == "copied"


@dataclass
class WarmStart:
    source: str
    copied: list[int] = field(default_factory=list)  # OTHER's trial numbers
    enqueued: list[int] = field(default_factory=list)
    already: int = 0  # seeded by an earlier invocation
    why_not_copied: str = ""

    def line(self) -> str:
        why = f" ({self.why_not_copied})" if self.enqueued and self.why_not_copied else ""
        return (f"warm start from {self.source}: {len(self.copied)} trials copied, "
                f"{len(self.enqueued)} queued to run anew{why}"
                + (f", {self.already} seeded before" if self.already else ""))


def _section(study: optuna.Study) -> dict[str, Any]:
    return study.user_attrs.get("search_section") or {}


def _get(section: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        section = section.get(key, {}) if isinstance(section, dict) else {}
    return section


def mismatch(source: optuna.Study, cfg: StudyConfig) -> str:
    """Why values of ``source``'s trials mean something else here ("" when they do not)."""
    theirs, ours = _section(source), cfg.search_section()
    if not theirs:
        return f"{source.study_name} records no search section (begun before mnist_opt stored it)"
    ours["search"].setdefault("report_every", 1)
    theirs.get("search", {}).setdefault("report_every", 1)
    differ = [f"{'.'.join(p)} {_get(theirs, p)!r} there, {_get(ours, p)!r} here"
              for p in SAME if _get(theirs, p) != _get(ours, p)]
    fixed = (_fixed(theirs.get("space", {})), _fixed(ours.get("space", {})))
    differ += [f"space.{key} fixed at {fixed[0].get(key)!r} there, {fixed[1].get(key)!r} here"
               for key in sorted(set(fixed[0]) | set(fixed[1])) if fixed[0].get(key) !=
               fixed[1].get(key)]
    return "; ".join(differ)


def _fixed(space: dict[str, Any]) -> dict[str, Any]:
    """A space's fixed entries (a recipe such as ``lr_schedule: one_cycle``): not searched,
    so no distribution shows them, yet they change what a trial's value means."""
    def searched(spec: Any) -> bool:
        return isinstance(spec, dict) or (isinstance(spec, list) and
                                           any(isinstance(s, dict) for s in spec))
    return {key: spec for key, spec in space.items() if not searched(spec)}


def _as_here(trial: optuna.trial.FrozenTrial,
             cfg: StudyConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``trial``'s parameters as this study's space asks them, on a throw-away in-memory
    study: the parameters and distributions this space gives them (a value outside the
    space here shows as a different distribution)."""
    probe = optuna.create_study(directions=cfg.directions)
    probe.enqueue_trial(trial.params)
    asked = probe.ask()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "out of range": compared below
        suggest_params(asked, cfg)
    return asked.params, asked.distributions


def warm_start(study: optuna.Study, cfg: StudyConfig, source_name: str, storage: str,
               top: int, parent: mlflow.entities.Run | None = None) -> WarmStart:
    """Copy or queue ``source_name``'s ``top`` best COMPLETE trials into ``study`` (once:
    a rerun skips what an earlier one seeded); with ``parent``, record it in MLflow."""
    if source_name == study.study_name:
        raise StudyFileError(f"--warm-start names the study itself ({source_name}); give "
                             "another study, e.g. the previous version of this one")
    source = load_existing(source_name, storage)
    if len(source.directions) != len(cfg.directions):
        raise StudyFileError(f"--warm-start {source_name}: it has {len(source.directions)} "
                             f"objectives, {cfg.name} has {len(cfg.directions)}")
    seeded = {t.user_attrs.get(SOURCE) for t in study.get_trials(deepcopy=False)}
    out = WarmStart(source_name, why_not_copied=mismatch(source, cfg))
    for trial in top_complete(source, top):
        tag = f"{source_name}#{trial.number}"
        if tag in seeded:
            out.already += 1
            continue
        outside = {key for key, _ in value_problems(cfg, trial.params)}
        if not out.why_not_copied and not outside and \
                _as_here(trial, cfg) == (trial.params, trial.distributions):
            kept = {k: v for k, v in trial.user_attrs.items() if k not in NOT_COPIED}
            attrs = {**kept, SOURCE: tag, KIND: "copied",
                     "source_mlflow_run_id": trial.user_attrs.get("mlflow_run_id")}
            if parent is not None:
                attrs["mlflow_run_id"] = _log_copy(study, parent, trial, tag)
            study.add_trial(optuna.trial.create_trial(
                params=trial.params, distributions=trial.distributions, values=trial.values,
                intermediate_values=trial.intermediate_values, user_attrs=attrs))
            out.copied.append(trial.number)
        else:
            out.why_not_copied = out.why_not_copied or "the spaces differ"
            # values this space would not suggest (a narrowed range, a choice it lacks, a
            # dropped layer) are left to the sampler
            study.enqueue_trial({k: v for k, v in trial.params.items() if k not in outside},
                                user_attrs={SOURCE: tag, KIND: "enqueued"})
            out.enqueued.append(trial.number)
    if parent is not None:
        mlflow.log_params({"warm_start_from": source_name, "warm_start_copied": len(out.copied),
                           "warm_start_enqueued": len(out.enqueued)})
    return out


def _log_copy(study: optuna.Study, parent: mlflow.entities.Run,
              trial: optuna.trial.FrozenTrial, tag: str) -> str:
    """A nested run for a copied trial (params, value; no model: it was not trained here),
    beside the trials that run, so the MLflow UI compares them all."""
    client = mlflow.tracking.MlflowClient()
    run = client.create_run(parent.info.experiment_id, run_name=f"copy-{tag}", tags={
        "mlflow.parentRunId": parent.info.run_id, "mnist_opt.kind": "trial", KIND: "copied",
        SOURCE: tag, "state": "complete", "optuna.study_name": study.study_name})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in trial.params.items()],
                     metrics=[Metric(name, value, int(time.time() * 1000), 0) for name, value
                              in zip(study.metric_names or ["value"], trial.values)])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
