"""``mnist-opt report``: the best trials of a study as a table (``plots`` draws the pictures)."""
from __future__ import annotations

import json

import optuna

from mnist_opt.reporting.trial_cost import epochs_trained, fixed_costs
from mnist_opt.study.objectives import PROMOTED, PROMOTED_BEST, first_value, is_multi, pick, sign


def _score(study: optuna.Study):
    """Sort key: completed first, then by the (first) objective, best first; pruned trials
    by their last reported value."""
    s = sign(study)

    def score(t: optuna.trial.FrozenTrial) -> tuple:
        value = first_value(t)
        if value is None and t.intermediate_values:  # may be an in-epoch (slice) report
            value = t.intermediate_values[max(t.intermediate_values)]
        rank = float("inf") if value is None else -s * value
        return (t.state != optuna.trial.TrialState.COMPLETE, rank)

    return score


def table(study: optuna.Study, top: int, tolerance: float) -> str:
    """Finished trials, best first, as text. With two objectives both values are shown,
    Pareto-front trials are marked ``*`` and the one retrain would pick ``>``."""
    multi = is_multi(study)
    front = {t.number for t in study.best_trials} if multi else set()
    try:
        picked = pick(study, tolerance).number
    except ValueError:
        picked = None
    trials = sorted((t for t in study.get_trials(deepcopy=False) if t.state.is_finished()),
                    key=_score(study))
    width = 18 if multi else 7
    lines = [f"  {'#':>4}  {'state':8}  {'value' + ('s' if multi else ''):>{width}}  "
             f"{'epochs':>6}  {'seconds':>7}  params"]
    for t in trials[:top]:
        value = " / ".join([f"{t.values[0]:.4f}", *(f"{v:.4g}" for v in t.values[1:])]
                           ) if t.values else "-"
        mark = ">" if t.number == picked else ("*" if t.number in front else " ")
        seconds = t.duration.total_seconds() if t.duration else float("nan")
        epochs = t.user_attrs.get("epochs", epochs_trained(t))
        lines.append(f"{mark} {t.number:>4}  {t.state.name:8}  {value:>{width}}  "
                     f"{epochs:>6g}  {seconds:>7.1f}  "
                     f"{json.dumps(_short(t.params))}")
    counts = {s.name: 0 for s in optuna.trial.TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    lines.append(f"{len(study.trials)} trials: " + ", ".join(
        f"{n} {name.lower()}" for name, n in counts.items() if n))
    lines.append(fixed_costs(study.get_trials(deepcopy=False)).line())
    if multi:
        lines.append(f"Pareto front (*): trials {', '.join(map(str, sorted(front)))}; "
                     f"> marks the trial retrain picks")
    lines += promoted_lines(study)
    return "\n".join(lines)


def promoted_lines(study: optuna.Study) -> list[str]:
    """search.promote's ranking on the full data, best first, and the trial retrain takes."""
    promoted = study.user_attrs.get(PROMOTED) or {}
    if not promoted:
        return []
    ranked = sorted(promoted.items(), key=lambda kv: -kv[1]["val_accuracy"])
    best = study.user_attrs.get(PROMOTED_BEST)
    return ["promoted (re-trained on the full training split; retrain takes "
            f"{'trial ' + str(best) if best is not None else 'none yet: new trials since'}):",
            *[f"  trial {n}: full-data val_accuracy {r['val_accuracy']:.4f} after "
              f"{r['epochs']:g} epochs (search value {r['search_value']:.4f})"
              for n, r in ranked]]


def _short(params: dict) -> dict:
    return {k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in params.items()}
