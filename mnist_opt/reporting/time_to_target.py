"""Time to target: the one definition of how fast a search reaches a validation accuracy.

Every figure, table and verdict in the project that speaks of "best so far" or "time to
target" comes from here, for Optuna studies (:func:`repeat_result`) and for other tools once
their runs are converted into the same epoch records (:func:`repeat_from_epochs`):

* **Clock.** It starts when the tool's process starts (the study's ``compare_clock_start``,
  unix seconds), for both tools alike, so start-up and data loading count as time spent.
* **Best so far.** The highest validation accuracy over the *completed epochs* of all the
  repeat's trials, whatever became of the trial afterwards (complete, pruned, failed, or still
  running when the process ended), in the order the epochs ended. An epoch with no accuracy
  counts as trained but improves nothing. The epochs of ``search.promote``'s re-trainings on
  the full data, after the search, count as well (:func:`study_epochs`). This is the same
  statistic for every tool; it is not Optuna's best value, which sees only complete trials and
  the study's metric (maybe a loss).
* **Target.** A validation accuracy fixed before the run: given, or the previous run's
  :func:`default_target`. Choosing it after looking at the run being judged would let the
  target favour whichever strategy happened to do well.
* **Time to target.** Seconds from the clock start to the end of the first epoch at which the
  best so far is >= the target; epochs to target counts the epochs of all trials up to and
  including that one. A repeat that never reaches it is "not reached" and ranks last (+inf) in
  medians and in the tests, instead of being dropped, which would flatter a strategy that
  mostly fails.

Differences between strategies are judged by a two-sided Mann–Whitney U test at α = 0.05
(:func:`compare_pair`), and only with at least 5 repeats per side; below that the verdict is
"too few repeats". With 3 vs 3 even a perfect separation gives p = 0.1, and with 4 vs 4 only a
perfect one gets under 0.05 (p = 0.029), so a smaller comparison would mostly say "no
difference" for want of data, which reads like evidence that there is none.

Plotting imports matplotlib and plotly inside :func:`plot_curves` only, so the statistics
stay cheap to import for a command that only prints the table and the verdict.
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, TypedDict

import numpy as np
import optuna
from optuna.trial import TrialState
from scipy import stats

from mnist_opt.study.objectives import PROMOTED

ALPHA = 0.05
MIN_REPEATS = 5
# Up to this many ways of splitting the pooled sample (8 vs 8 has 12,870), p-values with tied
# values (several "not reached") come from enumerating every split: exact. Beyond it, the
# tie-corrected normal approximation is already good.
EXACT_SPLITS = 20_000
Axis = Literal["seconds", "epochs"]


@dataclass(frozen=True)
class Epoch:
    """One completed epoch of one trial: when it ended and its validation accuracy.

    Attributes:
        time: unix seconds at the end of the epoch.
        accuracy: validation accuracy, or None when the epoch produced none (or a non-finite one).
        trial: the trial's number, to tell parallel trials' epochs apart.
    """

    time: float
    accuracy: float | None
    trial: int


@dataclass(frozen=True, eq=False)
class Curve:
    """Best so far as a step function: after ``epochs[i]`` epochs, ``seconds[i]`` seconds after
    the clock start, the best validation accuracy was ``best[i]`` (nan until the first accuracy).

    One point per completed epoch of any trial, in time order; the value holds until the next.
    """

    seconds: np.ndarray
    epochs: np.ndarray
    best: np.ndarray

    def at(self, x: np.ndarray, axis: Axis = "seconds") -> np.ndarray:
        """The best so far at each ``x`` (seconds, or epochs trained): nan before the first
        accuracy, and the final value after the last epoch (what was found stays found)."""
        steps = self.seconds if axis == "seconds" else self.epochs
        index = np.searchsorted(steps, np.asarray(x, dtype=float), side="right") - 1
        if not len(self.best):
            return np.full(index.shape, np.nan)
        return np.where(index >= 0, self.best[np.clip(index, 0, None)], np.nan)


@dataclass(frozen=True, eq=False)
class RepeatResult:
    """One repeat of one strategy, reduced to what the comparison needs.

    Attributes:
        strategy: e.g. ``"tpe+hyperband"``.
        repeat: the repeat's index (its seed differs from the other repeats').
        curve: best so far over its completed epochs.
        final_best: the curve's last value; None when no epoch had an accuracy.
        wall_s: seconds from the clock start to the last trial's end (or last epoch, if later).
        epochs: epochs trained, all trials together.
        n_complete, n_pruned, n_failed: trials in each state.
        test_accuracy: its best configuration retrained and scored on the test set
            (``compare --retrain``), else None.
    """

    strategy: str
    repeat: int
    curve: Curve
    final_best: float | None
    wall_s: float
    epochs: int
    n_complete: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    test_accuracy: float | None = None


class SummaryRow(TypedDict):
    """One strategy's line of the table; medians over its repeats, None where not reached."""

    strategy: str
    repeats: int
    target: float
    final_best_median: float | None
    final_best_q1: float | None
    final_best_q3: float | None
    time_to_target_median: float | None
    time_to_target_q1: float | None
    time_to_target_q3: float | None
    reached: int
    epochs_to_target_median: float | None
    epochs_median: float
    wall_s_median: float
    n_complete: int
    n_pruned: int
    n_failed: int
    test_accuracy_median: float | None  # of the repeats retrained (compare --retrain)
    test_accuracy_min: float | None
    test_accuracy_max: float | None


class PairVerdict(TypedDict):
    """What :func:`compare_pair` found for strategies ``a`` and ``b``."""

    a: str
    b: str
    n_a: int
    n_b: int
    alpha: float
    p_time: float | None
    p_final: float | None
    time: str
    final: str
    verdict: str


def _accuracy(value: object) -> float | None:
    """A logged accuracy as a float; None (no accuracy) for None and non-finite values."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def epochs_of(trials: Iterable[optuna.trial.FrozenTrial]) -> list[Epoch]:
    """The completed epochs of Optuna trials, from each trial's ``epoch_log`` user attr
    (``[[unix_time, val_accuracy_or_None], ...]``, written by the training callback).

    A trial without the attr (failed or still sampling before its first epoch) has none.
    """
    return [Epoch(float(time), _accuracy(accuracy), trial.number)
            for trial in trials for time, accuracy in trial.user_attrs.get("epoch_log", ())]


def study_epochs(study: optuna.Study) -> list[Epoch]:
    """The completed epochs of a study: its trials' (:func:`epochs_of`) and those of
    ``search.promote``'s re-trainings on the full data (the study's ``promoted`` user attr,
    each under the number of the trial it re-trained). Promotion trains after the search,
    inside the same process and clock, so its epochs count in time and epochs to target."""
    promoted = study.user_attrs.get(PROMOTED) or {}
    return epochs_of(study.get_trials(deepcopy=False)) + [
        Epoch(float(time), _accuracy(accuracy), int(number))
        for number, result in promoted.items()
        for time, accuracy in result.get("epoch_log", ())]


def curve(epochs: Iterable[Epoch], clock_start: float) -> Curve:
    """The best-so-far step function of a repeat's epochs, given in any order (the epochs of
    parallel trials interleave)."""
    ordered = sorted(epochs, key=lambda e: (e.time, e.trial))
    accuracy = np.array([np.nan if e.accuracy is None else e.accuracy for e in ordered], float)
    return Curve(seconds=np.array([e.time - clock_start for e in ordered], float),
                 epochs=np.arange(1, len(ordered) + 1),
                 best=np.fmax.accumulate(accuracy) if len(ordered) else accuracy)


def _first_reaching(curve: Curve, target: float) -> int | None:
    with np.errstate(invalid="ignore"):  # nan (no accuracy yet) never reaches
        hits = np.flatnonzero(curve.best >= target)
    return int(hits[0]) if hits.size else None


def time_to_target(curve: Curve, target: float) -> float | None:
    """Seconds from the clock start until the best so far first is >= target; None: not reached."""
    index = _first_reaching(curve, target)
    return None if index is None else float(curve.seconds[index])


def epochs_to_target(curve: Curve, target: float) -> int | None:
    """Epochs trained (all trials) until the best so far first is >= target; None: not reached."""
    index = _first_reaching(curve, target)
    return None if index is None else int(curve.epochs[index])


def repeat_from_epochs(strategy: str, repeat: int, epochs: Iterable[Epoch], clock_start: float,
                       end_time: float | None = None, n_complete: int = 0, n_pruned: int = 0,
                       n_failed: int = 0, test_accuracy: float | None = None) -> RepeatResult:
    """A repeat from plain epoch records: the common ground of Optuna and other tools.

    ``end_time`` (unix seconds) is when its last trial ended; the last epoch's end if later or
    not given.
    """
    steps = curve(epochs, clock_start)
    final = float(steps.best[-1]) if len(steps.best) else math.nan
    ends = [t for t in (end_time, steps.seconds[-1] + clock_start if len(steps.seconds) else None)
            if t is not None]
    return RepeatResult(strategy=strategy, repeat=repeat, curve=steps,
                        final_best=final if math.isfinite(final) else None,
                        wall_s=max(0.0, max(ends, default=clock_start) - clock_start),
                        epochs=len(steps.epochs), n_complete=n_complete, n_pruned=n_pruned,
                        n_failed=n_failed, test_accuracy=test_accuracy)


def repeat_result(study: optuna.Study) -> RepeatResult:
    """A repeat of ``mnist-opt compare`` from its study's user attrs ``compare_clock_start``,
    ``compare_strategy`` and ``compare_repeat``, and its epochs (:func:`study_epochs`)."""
    attrs = study.user_attrs
    missing = [k for k in ("compare_clock_start", "compare_strategy", "compare_repeat")
               if k not in attrs]
    if missing:
        raise ValueError(f"study {study.study_name!r} is not a compare repeat: no user attr "
                         f"{', '.join(missing)}")
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    # Optuna's datetimes are naive local time, as is what .timestamp() assumes
    ends = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete]
    return repeat_from_epochs(
        str(attrs["compare_strategy"]), int(attrs["compare_repeat"]), study_epochs(study),
        float(attrs["compare_clock_start"]), end_time=max(ends, default=None),
        n_complete=states[TrialState.COMPLETE], n_pruned=states[TrialState.PRUNED],
        n_failed=states[TrialState.FAIL], test_accuracy=attrs.get("compare_test_accuracy"))


def by_strategy(results: Iterable[RepeatResult]) -> dict[str, list[RepeatResult]]:
    """Repeats grouped by strategy, strategies in order of first appearance."""
    groups: dict[str, list[RepeatResult]] = {}
    for result in results:
        groups.setdefault(result.strategy, []).append(result)
    return groups


def _quantile(values: np.ndarray, q: float) -> np.ndarray:
    """Quantile along axis 0, interpolated like numpy's default ("linear"); not finite when it
    involves an infinite value (not reached, no accuracy yet: they rank last or first).

    ``np.quantile`` cannot be used here: it interpolates towards the next value even with
    weight 0, so its median of [10, 20, inf] is nan instead of 20.
    """
    ranked = np.sort(np.asarray(values, dtype=float), axis=0)
    position = q * (ranked.shape[0] - 1)
    low, high = ranked[math.floor(position)], ranked[math.ceil(position)]
    with np.errstate(invalid="ignore"):
        return low + (position - math.floor(position)) * (high - low)


def _finite(value: np.ndarray | float) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _times(group: list[RepeatResult], target: float) -> np.ndarray:
    """Times to target, not reached as +inf (slowest)."""
    times = (time_to_target(r.curve, target) for r in group)
    return np.array([math.inf if t is None else t for t in times], float)


def _finals(group: list[RepeatResult]) -> np.ndarray:
    """Final bests, no accuracy at all as -inf (worst)."""
    return np.array([-math.inf if r.final_best is None else r.final_best for r in group], float)


def default_target(results: Iterable[RepeatResult]) -> float:
    """The lowest of the strategies' median final bests: a target every strategy reaches in at
    least about half its repeats. Record it for the *next* run; as the target of the run it was
    computed from it would be chosen afterwards."""
    medians = [_finite(_quantile(_finals(group), 0.5)) for group in by_strategy(results).values()]
    finite = [m for m in medians if m is not None]
    if not finite:
        raise ValueError("no strategy has a median final best: no epoch reported an accuracy")
    return min(finite)


def _row(strategy: str, group: list[RepeatResult], target: float) -> SummaryRow:
    times, finals = _times(group, target), _finals(group)
    tests = [r.test_accuracy for r in group if r.test_accuracy is not None]
    needed = [epochs_to_target(r.curve, target) for r in group]
    return SummaryRow(
        strategy=strategy, repeats=len(group), target=target,
        final_best_median=_finite(_quantile(finals, 0.5)),
        final_best_q1=_finite(_quantile(finals, 0.25)),
        final_best_q3=_finite(_quantile(finals, 0.75)),
        time_to_target_median=_finite(_quantile(times, 0.5)),
        time_to_target_q1=_finite(_quantile(times, 0.25)),
        time_to_target_q3=_finite(_quantile(times, 0.75)),
        reached=int(np.isfinite(times).sum()),
        epochs_to_target_median=_finite(_quantile(
            np.array([math.inf if n is None else n for n in needed], float), 0.5)),
        epochs_median=float(np.median([r.epochs for r in group])),
        wall_s_median=float(np.median([r.wall_s for r in group])),
        n_complete=sum(r.n_complete for r in group), n_pruned=sum(r.n_pruned for r in group),
        n_failed=sum(r.n_failed for r in group),
        test_accuracy_median=float(np.median(tests)) if tests else None,
        test_accuracy_min=min(tests, default=None), test_accuracy_max=max(tests, default=None))


def summary(results: Iterable[RepeatResult], target: float) -> list[SummaryRow]:
    """One row per strategy: medians and quartiles over its repeats, not-reached ranked last
    (so the median time is None, "not reached", when the middle repeat, or one of the middle
    two, did not reach it)."""
    return [_row(name, group, target) for name, group in by_strategy(results).items()]


def _mann_whitney(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(U of x, two-sided p). Without ties scipy's "auto" (exact for small samples); with ties
    an exact permutation p-value while the splits are few enough to enumerate."""
    pooled = np.concatenate([x, y])
    if np.all(pooled == pooled[0]):  # e.g. nobody reached the target: nothing tells them apart
        return len(x) * len(y) / 2, 1.0
    ties = len(np.unique(pooled)) < len(pooled)
    method: str | stats.PermutationMethod = "auto"
    if ties and math.comb(len(pooled), len(x)) <= EXACT_SPLITS:
        method = stats.PermutationMethod(n_resamples=EXACT_SPLITS)
    result = stats.mannwhitneyu(x, y, alternative="two-sided", method=method)
    return float(result.statistic), float(result.pvalue)


def _judge(x: np.ndarray, y: np.ndarray, names: tuple[str, str], alpha: float,
           lower_wins: bool, claim: str, quantity: str) -> tuple[float, str]:
    """(p, verdict) for one quantity: a winner is named only when p < alpha, and which side
    wins is read from U (the side whose values rank lower), as the test itself does."""
    u, p = _mann_whitney(x, y)
    if p >= alpha:
        return p, f"no significant difference in {quantity} (p={p:.2g})"
    a_lower = u < len(x) * len(y) / 2
    winner, loser = names if a_lower == lower_wins else names[::-1]
    return p, f"{winner} {claim} {loser} (p={p:.2g})"


def method_note(alpha: float = ALPHA, min_repeats: int = MIN_REPEATS) -> str:
    """The test behind every verdict, to print above them."""
    return (f"Two-sided Mann–Whitney U tests at α = {alpha:g} on time to target (a repeat that "
            f"never reaches it counts as slowest) and on final best; at least {min_repeats} "
            "repeats per strategy, or no verdict.")


def compare_pair(a: list[RepeatResult], b: list[RepeatResult], target: float,
                 alpha: float = ALPHA, min_repeats: int = MIN_REPEATS,
                 names: tuple[str, str] | None = None) -> PairVerdict:
    """Whether ``a`` and ``b`` differ in time to target and in final best.

    ``names`` defaults to the repeats' strategies; give it for an A/A comparison (the same
    strategy twice). "A is faster than B" is said only when the two-sided test rejects "no
    difference" at ``alpha``; with fewer than ``min_repeats`` per side, "too few repeats".
    """
    names = names or (a[0].strategy if a else "A", b[0].strategy if b else "B")
    head = f"{names[0]} vs {names[1]}: "
    common = {"a": names[0], "b": names[1], "n_a": len(a), "n_b": len(b), "alpha": alpha}
    if min(len(a), len(b)) < min_repeats:
        few = f"too few repeats (n={len(a)} vs {len(b)}, need {min_repeats} per side)"
        return PairVerdict(**common, p_time=None, p_final=None, time=few, final=few,
                           verdict=head + few)
    p_time, time = _judge(_times(a, target), _times(b, target), names, alpha, True,
                          "reaches the target faster than", "time to target")
    p_final, final = _judge(_finals(a), _finals(b), names, alpha, False,
                            "reaches a higher final best than", "final best")
    return PairVerdict(**common, p_time=p_time, p_final=p_final, time=time, final=final,
                       verdict=f"{head}{time}; {final}")


def pair_verdicts(results: Iterable[RepeatResult], target: float, alpha: float = ALPHA,
                  min_repeats: int = MIN_REPEATS) -> list[PairVerdict]:
    """:func:`compare_pair` of every pair of strategies, in order of first appearance."""
    groups = by_strategy(results)
    return [compare_pair(groups[a], groups[b], target, alpha, min_repeats)
            for a, b in itertools.combinations(groups, 2)]


def verdict(results: Iterable[RepeatResult], target: float, alpha: float = ALPHA,
            min_repeats: int = MIN_REPEATS) -> list[str]:
    """One line per pair of strategies (in order of first appearance): :func:`compare_pair`."""
    return [p["verdict"] for p in pair_verdicts(results, target, alpha, min_repeats)]


def _number(value: float | None, digits: int, unit: str = "") -> str:
    return "not reached" if value is None else f"{value:.{digits}f}{unit}"


def _cells(rows: list[SummaryRow]) -> tuple[list[str], list[list[str]]]:
    """The table's header and cells, shared by the Markdown and the terminal versions."""
    target = f"{rows[0]['target']:.4f}" if rows else "target"
    header = ["strategy", "repeats", "final best: median [IQR]",
              f"time to {target}: median [IQR]", "reached", "epochs to target", "epochs",
              "complete", "pruned", "failed"]
    cells = [[r["strategy"], str(r["repeats"]),
              f"{_number(r['final_best_median'], 4)} [{_number(r['final_best_q1'], 4)}, "
              f"{_number(r['final_best_q3'], 4)}]",
              f"{_number(r['time_to_target_median'], 1, ' s')} "
              f"[{_number(r['time_to_target_q1'], 1)}, {_number(r['time_to_target_q3'], 1)}]",
              f"{r['reached']}/{r['repeats']}",
              _number(r["epochs_to_target_median"], 0), f"{r['epochs_median']:.0f}",
              str(r["n_complete"]), str(r["n_pruned"]), str(r["n_failed"])] for r in rows]
    if any(r.get("test_accuracy_median") is not None for r in rows):  # compare --retrain
        header.append("test acc: median [min, max]")
        for row, line in zip(rows, cells):
            line.append("–" if row.get("test_accuracy_median") is None else
                        f"{row['test_accuracy_median']:.4f} [{row['test_accuracy_min']:.4f}, "
                        f"{row['test_accuracy_max']:.4f}]")
    return header, cells


def markdown_table(rows: list[SummaryRow]) -> str:
    """The summary as a Markdown table (README, MLflow, reports/)."""
    header, cells = _cells(rows)
    lines = [header, ["---"] * len(header), *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def text_table(rows: list[SummaryRow]) -> str:
    """The summary as aligned plain text for the terminal."""
    header, cells = _cells(rows)
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *cells]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in lines) + "\n"


COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")  # matplotlib's tab10, the same in PNG and HTML
X_LABELS = {"seconds": "seconds since the process started", "epochs": "epochs trained (all trials)"}
MAX_POINTS = 4000  # a finer time grid only makes the HTML heavier
Bands = dict[str, tuple[int, np.ndarray, np.ndarray, np.ndarray]]  # name: (n, median, q1, q3)


def grid(results: list[RepeatResult], axis: Axis) -> np.ndarray:
    """A common x grid for every repeat: each step of every curve (the median of step
    functions steps only there), from 0 to the longest repeat's end."""
    if axis == "epochs":
        return np.arange(0, max((r.epochs for r in results), default=0) + 1, dtype=float)
    end = max((r.wall_s for r in results), default=0.0)
    points = np.unique(np.concatenate([[0.0, end], *(r.curve.seconds for r in results)]))
    return points if len(points) <= MAX_POINTS else np.linspace(0.0, end, MAX_POINTS)


def median_band(group: list[RepeatResult], x: np.ndarray,
                axis: Axis = "seconds") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(median, q1, q3) of the repeats' best so far at each ``x``; nan where fewer than the
    quantile's share of repeats has an accuracy yet (no accuracy ranks lowest)."""
    values = np.stack([r.curve.at(x, axis) for r in group])
    values = np.where(np.isnan(values), -np.inf, values)
    bands = [_quantile(values, q) for q in (0.5, 0.25, 0.75)]
    median, q1, q3 = (np.where(np.isfinite(b), b, np.nan) for b in bands)
    return median, q1, q3


def _png(bands: Bands, x: np.ndarray, axis: Axis, target: float | None, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no backend, no global state

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for color, (name, (n, median, q1, q3)) in zip(itertools.cycle(COLORS), bands.items()):
        ax.fill_between(x, q1, q3, step="post", color=color, alpha=0.2, linewidth=0)
        ax.step(x, median, where="post", color=color, label=f"{name} (median of {n}, IQR)")
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:.4f}")
    ax.set(xlabel=X_LABELS[axis], ylabel="best validation accuracy so far")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=100, bbox_inches="tight")


def _rgba(color: str, alpha: float) -> str:
    red, green, blue = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red},{green},{blue},{alpha})"


def _html(bands: Bands, x: np.ndarray, axis: Axis, target: float | None, path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for color, (name, (n, median, q1, q3)) in zip(itertools.cycle(COLORS), bands.items()):
        edge = {"width": 0, "shape": "hv"}
        fig.add_scatter(x=x, y=q3, mode="lines", line=edge, legendgroup=name, showlegend=False,
                        hoverinfo="skip")
        fig.add_scatter(x=x, y=q1, mode="lines", line=edge, legendgroup=name, showlegend=False,
                        fill="tonexty", fillcolor=_rgba(color, 0.2), name=f"{name} IQR")
        fig.add_scatter(x=x, y=median, mode="lines", line={"color": color, "shape": "hv"},
                        legendgroup=name, name=f"{name} (median of {n}, IQR)")
    if target is not None:
        fig.add_hline(y=target, line_dash="dash", annotation_text=f"target {target:.4f}")
    fig.update_layout(xaxis_title=X_LABELS[axis], yaxis_title="best validation accuracy so far",
                      template="plotly_white")
    fig.write_html(path, include_plotlyjs="cdn")


def plot_curves(results: Iterable[RepeatResult], folder: Path,
                target: float | None = None) -> list[Path]:
    """``best_vs_time`` and ``best_vs_epochs`` as PNG (matplotlib) and HTML (plotly, plotly.js
    from its CDN) in ``folder``: per strategy the median best so far over its repeats with an
    interquartile band, and ``target`` (when given) as a dashed line. Returns the four paths."""
    results = list(results)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for axis, stem in (("seconds", "best_vs_time"), ("epochs", "best_vs_epochs")):
        x = grid(results, axis)
        bands = {name: (len(group), *median_band(group, x, axis))
                 for name, group in by_strategy(results).items()}
        for suffix, write in ((".png", _png), (".html", _html)):
            write(bands, x, axis, target, folder / f"{stem}{suffix}")
            paths.append(folder / f"{stem}{suffix}")
    return paths
