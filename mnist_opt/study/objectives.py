"""One objective or two: validation accuracy alone, or with model size or inference latency.

With two, Optuna keeps a Pareto front instead of one best trial, and "the best trial" needs
a stated rule: :func:`pick` takes the cheapest model whose accuracy is within
``search.pick_tolerance`` of the most accurate trial on the front. Everything that shows or
retrains "the best" goes through :func:`pick`, so the rule lives in one place.
"""
from __future__ import annotations

import time

import numpy as np
import optuna

SECOND = {"n_params": "parameters", "latency_ms": "ms per image"}


def is_multi(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def sign(study: optuna.Study) -> int:
    """+1 when the (first) objective is maximised, -1 when minimised: ``sign * value`` ranks."""
    return 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1


def front_best(study: optuna.Study) -> float:
    """The best first objective among the Pareto front's trials."""
    s = sign(study)
    return s * max(s * t.values[0] for t in study.best_trials)


def top_complete(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The ``k`` best COMPLETE trials by the (first) objective, ties by trial number (all of
    them when fewer): what ``search.promote`` re-trains and a warm start takes."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: (-sign(study) * t.values[0], t.number))[:k]


# study user attributes of search.promote (mnist_opt.search.promote): each promoted trial's
# full-data results, and the trial that is best on them
PROMOTED, PROMOTED_BEST = "promoted", "promoted_best"


def pick(study: optuna.Study, tolerance: float) -> optuna.trial.FrozenTrial:
    """The trial to show and retrain: ``search.promote``'s winner once there is one, else the
    best one, or the rule's choice from the Pareto front.

    Raises ValueError when no trial has completed (as ``study.best_trial`` does).
    """
    promoted = study.user_attrs.get(PROMOTED_BEST)
    if promoted is not None:  # re-trained on the full data: search.promote's winner
        return study.trials[promoted]
    if not is_multi(study):
        return study.best_trial
    front = study.best_trials
    if not front:
        raise ValueError("no completed trial")
    s, top = sign(study), front_best(study)
    near = [t for t in front if s * (t.values[0] - top) >= -tolerance]
    return min(near, key=lambda t: (t.values[1], -s * t.values[0]))


def rule(metric: str, second: str, tolerance: float) -> str:
    return (f"the smallest {second} on the Pareto front among trials within {tolerance:g} of "
            f"the front's best {metric}")


def first_value(trial: optuna.trial.FrozenTrial) -> float | None:
    """The (first) objective of a finished trial; None for pruned or failed ones."""
    return trial.values[0] if trial.values else None


def latency_ms(model, repeats: int = 30) -> float:
    """Median wall time of one single-image forward pass (what serving one request costs)."""
    x = np.zeros((1, *model.input_shape[1:]), dtype=np.float32)
    model(x, training=False)  # build and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x, training=False)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)
