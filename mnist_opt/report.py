"""``mnist-opt report``: the best trials of a study as a table (``plots`` draws the pictures)."""
from __future__ import annotations

import json

import optuna


def table(study: optuna.Study, top: int = 10) -> str:
    """Finished trials, best first (then pruned by their last reported value), as text."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE

    def score(t: optuna.trial.FrozenTrial) -> float:
        value = t.value if t.value is not None else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        if value is None:
            return float("inf")
        return -value if maximize else value

    trials = sorted((t for t in study.get_trials(deepcopy=False) if t.state.is_finished()),
                    key=lambda t: (t.state != optuna.trial.TrialState.COMPLETE, score(t)))
    lines = [f"{'#':>4}  {'state':8}  {'value':>7}  {'epochs':>6}  {'seconds':>7}  params"]
    for t in trials[:top]:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        seconds = t.duration.total_seconds() if t.duration else float("nan")
        lines.append(f"{t.number:>4}  {t.state.name:8}  {value:>7}  "
                     f"{len(t.intermediate_values):>6}  {seconds:>7.1f}  "
                     f"{json.dumps(_short(t.params))}")
    counts = {s.name: 0 for s in optuna.trial.TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    lines.append(f"{len(study.trials)} trials: " + ", ".join(
        f"{n} {name.lower()}" for name, n in counts.items() if n))
    return "\n".join(lines)


def _short(params: dict) -> dict:
    return {k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in params.items()}
