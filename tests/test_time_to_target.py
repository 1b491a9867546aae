"""Time to target (mnist_opt.reporting.time_to_target) against studies whose answer is known:
a hand-built Optuna study with epochs at chosen times, medians with repeats that never reach
the target, and Mann–Whitney verdicts on synthetic repeats (clearly different, A/A, too few).

All fast: real Optuna trials built with ``create_trial`` and ``add_trial``, no training.
"""
from __future__ import annotations

import math
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState, create_trial

from mnist_opt.reporting import time_to_target as ttt

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0  # the hand-built repeat's clock start (unix seconds)


def _trial(state: TrialState, log: list | None, end: float | None) -> optuna.trial.FrozenTrial:
    """A trial with an ``epoch_log`` (seconds after T0) that ended at T0 + end."""
    attrs = {} if log is None else {"epoch_log": [[T0 + t, acc] for t, acc in log]}
    trial = create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                         user_attrs=attrs)
    trial.datetime_start = datetime.fromtimestamp(T0)
    trial.datetime_complete = None if end is None else datetime.fromtimestamp(T0 + end)
    return trial


def _hand_built_study(storage: str | None = None) -> optuna.Study:
    """Five trials run by two workers, so their epochs interleave in time:

    ======  ========  ======================================  =====
    trial   state     epochs (seconds after start: accuracy)  ended
    ======  ========  ======================================  =====
    0       COMPLETE  10: 0.80, 20: 0.85, 30: 0.90            31
    1       PRUNED    15: 0.70, 25: no accuracy               26
    2       FAIL      35: 0.95, then crashed (partial log)    36
    3       FAIL      none (crashed before its first epoch)   37
    4       COMPLETE  40: no accuracy, 50: 0.93               52
    ======  ========  ======================================  =====
    """
    study = optuna.create_study(storage=storage, direction="maximize")
    study.set_user_attr("compare_clock_start", T0)
    study.set_user_attr("compare_strategy", "tpe+hyperband")
    study.set_user_attr("compare_repeat", 3)
    for state, log, end in [
            (TrialState.COMPLETE, [(10, 0.80), (20, 0.85), (30, 0.90)], 31),
            (TrialState.PRUNED, [(15, 0.70), (25, None)], 26),
            (TrialState.FAIL, [(35, 0.95)], 36),
            (TrialState.FAIL, None, 37),
            (TrialState.COMPLETE, [(40, None), (50, 0.93)], 52)]:
        study.add_trial(_trial(state, log, end))
    return study


@pytest.fixture(params=["memory", "sqlite"])
def hand_built(request: pytest.FixtureRequest, tmp_path: Path) -> optuna.Study:
    """In memory, and through SQLite (user attrs and datetimes as a real storage returns them)."""
    storage = None if request.param == "memory" else f"sqlite:///{tmp_path / 'optuna.db'}"
    return _hand_built_study(storage)


def test_epochs_of_reads_every_trials_log_whatever_its_state(hand_built):
    epochs = ttt.epochs_of(hand_built.get_trials())
    assert sorted((e.trial, e.time - T0, e.accuracy) for e in epochs) == [
        (0, 10, 0.80), (0, 20, 0.85), (0, 30, 0.90), (1, 15, 0.70), (1, 25, None),
        (2, 35, 0.95), (4, 40, None), (4, 50, 0.93)]


def test_curve_of_the_hand_built_study(hand_built):
    result = ttt.repeat_result(hand_built)
    curve = result.curve
    np.testing.assert_array_equal(curve.seconds, [10, 15, 20, 25, 30, 35, 40, 50])
    np.testing.assert_array_equal(curve.epochs, [1, 2, 3, 4, 5, 6, 7, 8])
    # the pruned trial's 0.70 does not lower it, no-accuracy epochs hold it, the failed
    # trial's completed epoch (0.95) counts
    np.testing.assert_array_equal(curve.best, [.80, .80, .85, .85, .90, .95, .95, .95])
    assert (result.strategy, result.repeat) == ("tpe+hyperband", 3)
    assert result.final_best == 0.95
    assert result.wall_s == pytest.approx(52, abs=1e-3)  # the last trial's end, after its epoch
    assert result.epochs == 8
    assert (result.n_complete, result.n_pruned, result.n_failed) == (2, 1, 2)


def test_promotion_epochs_count_after_the_search_under_the_promoted_trials_number(hand_built):
    # search.promote re-trained trials 0 and 4 on all images after the search (t 60-90):
    # their epochs join the curve and the counts, and the best of them is trial 4's 0.97
    hand_built.set_user_attr("promoted", {
        "0": {"val_accuracy": 0.96, "epochs": 2, "epoch_log": [[T0 + 60, 0.94], [T0 + 70, 0.96]]},
        "4": {"val_accuracy": 0.97, "epochs": 2, "epoch_log": [[T0 + 80, 0.965], [T0 + 90, 0.97]]}})
    epochs = ttt.study_epochs(hand_built)
    assert sorted((e.trial, e.time - T0, e.accuracy) for e in epochs if e.time - T0 >= 60) == [
        (0, 60, 0.94), (0, 70, 0.96), (4, 80, 0.965), (4, 90, 0.97)]
    result = ttt.repeat_result(hand_built)
    assert result.epochs == 12 and result.final_best == 0.97
    assert result.wall_s == pytest.approx(90, abs=1e-3)  # promotion ends the repeat
    np.testing.assert_array_equal(result.curve.best[-4:], [.95, .96, .965, .97])
    assert ttt.time_to_target(result.curve, 0.96) == pytest.approx(70)
    assert ttt.epochs_to_target(result.curve, 0.96) == 10
    from mnist_opt.search.compare import best_params

    assert best_params(hand_built)[0] == 4  # compare --retrain scores the promoted winner


@pytest.mark.parametrize("target, seconds, epochs", [
    (0.50, 10.0, 1), (0.80, 10.0, 1), (0.85, 20.0, 3), (0.86, 30.0, 5), (0.90, 30.0, 5),
    (0.95, 35.0, 6), (0.96, None, None)])
def test_time_and_epochs_to_target_of_the_hand_built_study(target, seconds, epochs):
    curve = ttt.repeat_result(_hand_built_study()).curve
    assert ttt.time_to_target(curve, target) == seconds
    assert ttt.epochs_to_target(curve, target) == epochs


def test_no_accuracy_before_the_first_one_and_the_step_function_between_epochs():
    curve = ttt.curve([ttt.Epoch(T0 + 7, 0.6, 1), ttt.Epoch(T0 + 3, None, 0),
                       ttt.Epoch(T0 + 5, math.nan, 0)], clock_start=T0)
    np.testing.assert_array_equal(curve.seconds, [3, 5, 7])
    np.testing.assert_array_equal(curve.best, [np.nan, np.nan, 0.6])
    assert ttt.time_to_target(curve, 0.0) == 7.0  # nan (no accuracy yet) never reaches
    np.testing.assert_array_equal(curve.at([0, 3, 6.9, 7, 100]), [np.nan, np.nan, np.nan, .6, .6])
    np.testing.assert_array_equal(curve.at([0, 2, 3, 9], axis="epochs"), [np.nan, np.nan, .6, .6])


EPOCHS = st.lists(st.builds(ttt.Epoch, time=st.integers(0, 50).map(lambda s: T0 + s),
                            accuracy=st.none() | st.floats(0, 1), trial=st.integers(0, 3)),
                  max_size=30)


@settings(max_examples=200, deadline=None)
@given(epochs=EPOCHS, target=st.floats(0, 1))
def test_time_to_target_is_the_first_epoch_end_with_an_accuracy_at_least_the_target(epochs,
                                                                                     target):
    """Against the definition read literally, on any epochs in any order."""
    curve = ttt.curve(epochs, clock_start=T0)
    hits = [e.time - T0 for e in epochs if e.accuracy is not None and e.accuracy >= target]
    assert ttt.time_to_target(curve, target) == (min(hits) if hits else None)
    needed = ttt.epochs_to_target(curve, target)
    assert (needed is None) == (not hits)
    if hits:
        assert curve.best[needed - 1] >= target  # reached at that epoch, not one earlier
        assert needed == 1 or not curve.best[needed - 2] >= target
        assert needed > sum(e.time - T0 < min(hits) for e in epochs)  # those trained first
    accuracies = [e.accuracy for e in epochs if e.accuracy is not None]
    assert ttt.repeat_from_epochs("s", 0, epochs, T0).final_best == max(accuracies, default=None)


def test_a_repeat_without_any_epoch():
    result = ttt.repeat_from_epochs("random", 0, [], clock_start=T0, end_time=T0 + 4, n_failed=2)
    assert result.final_best is None and result.epochs == 0 and result.wall_s == 4
    assert ttt.time_to_target(result.curve, 0.1) is None
    np.testing.assert_array_equal(result.curve.at([0, 5]), [np.nan, np.nan])


def test_a_study_that_is_no_compare_repeat_is_refused():
    with pytest.raises(ValueError, match="compare_clock_start"):
        ttt.repeat_result(optuna.create_study())


def _repeat(strategy: str, reach_at: float | None, final: float | None = None,
            repeat: int = 0) -> ttt.RepeatResult:
    """A repeat reaching 0.9 after ``reach_at`` seconds (None: never; best 0.85), whose final
    best is ``final`` (default 0.95, or 0.85 when not reached)."""
    if reach_at is None:
        log = [(5.0, 0.5), (100.0, final or 0.85)]
    else:
        log = [(reach_at / 2, 0.5), (reach_at, 0.9), (reach_at + 1, final or 0.95)]
    epochs = [ttt.Epoch(T0 + t, acc, 0) for t, acc in log]
    return ttt.repeat_from_epochs(strategy, repeat, epochs, clock_start=T0)


@pytest.mark.parametrize("reach, median, reached", [
    ([10, 20, 30, None, None], 30.0, 3),
    ([20, 10, None], 20.0, 2),  # np.quantile would say nan: it weighs the inf next door by 0
    ([10, 20, None, None, None], None, 2),  # the middle repeat did not reach it
    ([10, 20, 30, None], 25.0, 3),
    ([10, 20, None, None], None, 2),  # the middle pair straddles "not reached": not reached
    ([None, None], None, 0)])
def test_median_time_to_target_ranks_not_reached_last(reach, median, reached):
    [row] = ttt.summary([_repeat("a", t) for t in reach], target=0.9)
    assert row["time_to_target_median"] == median
    assert row["reached"] == reached and row["repeats"] == len(reach)


def test_summary_row():
    results = [_repeat("a", t, f, i) for i, (t, f) in
               enumerate([(10, .91), (20, .93), (30, .95), (40, .97), (None, .85)])]
    [row] = ttt.summary(results, target=0.9)
    assert row["final_best_median"] == 0.93
    assert (row["final_best_q1"], row["final_best_q3"]) == (0.91, 0.95)
    assert (row["time_to_target_q1"], row["time_to_target_q3"]) == (20.0, 40.0)
    assert row["epochs_to_target_median"] == 2.0 and row["epochs_median"] == 3.0
    assert row["target"] == 0.9


def test_default_target_is_the_lowest_median_final_best():
    finals = {"a": [.97, .98, .99], "b": [.95, .96, .99], "c": [None, .97, .975]}
    results = [_repeat(s, 10, f) if f else ttt.repeat_from_epochs(s, 0, [], T0)
               for s, fs in finals.items() for f in fs]
    # b's median is 0.96; c's repeat without any accuracy ranks lowest, so c's median is 0.97
    assert ttt.default_target(results) == 0.96


def _synthetic(strategy: str, seed: int, n: int = 5, seconds_per_epoch: float = 1.0
               ) -> list[ttt.RepeatResult]:
    """``n`` repeats of a made-up search: epochs last an exponential time, accuracy follows a
    noisy learning curve towards 0.99, and one epoch in ten reports no accuracy."""
    rng = np.random.default_rng(seed)
    repeats = []
    for repeat in range(n):
        times = T0 + np.cumsum(rng.exponential(seconds_per_epoch, size=40))
        accuracy = 0.99 - 0.3 * np.exp(-np.arange(40) / 8) - 0.02 * rng.random(40)
        epochs = [ttt.Epoch(t, None if rng.random() < 0.1 else a, k // 4)
                  for k, (t, a) in enumerate(zip(times, accuracy))]
        repeats.append(ttt.repeat_from_epochs(strategy, repeat, epochs, clock_start=T0))
    return repeats


def test_clearly_different_strategies_are_told_apart_both_ways():
    fast = [_repeat("fast", t, 0.97, i) for i, t in enumerate([10, 11, 12, 13, 14])]
    slow = [_repeat("slow", t, 0.95, i) for i, t in enumerate([100, 101, 102, 103, 104])]
    for a, b in ((fast, slow), (slow, fast)):
        found = ttt.compare_pair(a, b, target=0.9)
        assert found["p_time"] == pytest.approx(2 / 252)  # exact: the most extreme of C(10,5)
        assert found["time"] == "fast reaches the target faster than slow (p=0.0079)"
        assert found["final"] == "fast reaches a higher final best than slow (p=0.0079)"
        assert found["verdict"].startswith(f"{a[0].strategy} vs {b[0].strategy}: fast reaches")


def test_a_strategy_that_never_reaches_the_target_is_slowest():
    """Ties (every slow repeat "not reached", final bests alike): exact permutation p."""
    fast = [_repeat("fast", t, 0.95, i) for i, t in enumerate([10, 11, 12, 13, 14])]
    never = [_repeat("never", None, 0.85, i) for i in range(5)]
    found = ttt.compare_pair(never, fast, target=0.9)
    assert found["p_time"] == pytest.approx(2 / 252)
    assert found["time"].startswith("fast reaches the target faster than never")
    assert found["final"].startswith("fast reaches a higher final best than never")


def test_synthetic_generator_slow_versus_fast():
    found = ttt.compare_pair(_synthetic("fast", 1), _synthetic("slow", 2, seconds_per_epoch=3),
                             target=0.95)
    assert found["p_time"] < 0.05
    assert found["time"].startswith("fast reaches the target faster than slow")


def test_a_a_comparison_finds_no_difference():
    """The same strategy, two seeds: "no significant difference" for both quantities."""
    found = ttt.compare_pair(_synthetic("tpe", 1), _synthetic("tpe", 2), target=0.95,
                             names=("tpe seed 1", "tpe seed 2"))
    assert found["p_time"] >= 0.05 and found["p_final"] >= 0.05
    assert found["verdict"] == (
        f"tpe seed 1 vs tpe seed 2: no significant difference in time to target "
        f"(p={found['p_time']:.2g}); no significant difference in final best "
        f"(p={found['p_final']:.2g})")


def test_a_a_comparisons_are_called_different_at_most_about_alpha_of_the_time():
    """Not just one lucky pair of seeds: over 100 A/A pairs the test keeps its level."""
    different = sum(ttt.compare_pair(_synthetic("x", 2 * i), _synthetic("x", 2 * i + 1),
                                     target=0.95)["p_time"] < 0.05 for i in range(100))
    assert different <= 10  # the exact 5-vs-5 test's real level is 0.032


@pytest.mark.parametrize("n_a, n_b", [(2, 2), (4, 5), (5, 0)])
def test_too_few_repeats_gives_no_verdict(n_a, n_b):
    found = ttt.compare_pair([_repeat("a", 10)] * n_a, [_repeat("b", 100)] * n_b, target=0.9)
    assert found["p_time"] is None and found["p_final"] is None
    assert found["time"] == f"too few repeats (n={n_a} vs {n_b}, need 5 per side)"
    assert "faster" not in found["verdict"]


def test_verdict_covers_every_pair_of_strategies():
    results = [*_synthetic("a", 1), *_synthetic("b", 2), *_synthetic("c", 3, n=2)]
    lines = ttt.verdict(results, target=0.95)
    assert [line.split(":")[0] for line in lines] == ["a vs b", "a vs c", "b vs c"]
    assert "too few repeats (n=5 vs 2" in lines[1]
    assert "Mann–Whitney" in ttt.method_note() and "0.05" in ttt.method_note()


def test_nobody_reaching_the_target_is_no_difference():
    found = ttt.compare_pair(_synthetic("a", 1), _synthetic("b", 2), target=1.0)
    assert found["p_time"] == 1.0
    assert found["time"] == "no significant difference in time to target (p=1)"


def test_tables():
    rows = ttt.summary([_repeat("tpe", 12.5, 0.95), _repeat("random", None)], target=0.9)
    markdown = ttt.markdown_table(rows).splitlines()
    assert markdown[0].startswith(
        "| strategy | repeats | final best: median [IQR] | time to 0.9000: median [IQR] |")
    assert markdown[1] == "| " + " | ".join(["---"] * 10) + " |"
    assert markdown[2].startswith(
        "| tpe | 1 | 0.9500 [0.9500, 0.9500] | 12.5 s [12.5, 12.5] | 1/1 | 2 |")
    assert markdown[3].startswith("| random | 1 | 0.8500 [0.8500, 0.8500] | not reached "
                                  "[not reached, not reached] | 0/1 | not reached |")
    text = ttt.text_table(rows).splitlines()
    assert len(text) == 4 and text[0].index("repeats") == text[2].index("1 ")


def test_median_band_of_known_step_functions():
    """Three repeats' best so far at seconds 0..4: median and quartiles by hand."""
    steps = {0: [(1, .5), (3, .9)], 1: [(2, .6)], 2: [(1, .7), (2, .8), (4, .95)]}
    group = [ttt.repeat_from_epochs("s", r, [ttt.Epoch(T0 + t, a, 0) for t, a in log], T0)
             for r, log in steps.items()]
    x = np.arange(5.0)
    median, q1, q3 = ttt.median_band(group, x)
    # at 1 s: (.5, none yet, .7); at 2: (.5, .6, .8); at 3: (.9, .6, .8); at 4: (.9, .6, .95)
    np.testing.assert_allclose(median, [np.nan, .5, .6, .8, .9])
    np.testing.assert_allclose(q1, [np.nan, np.nan, .55, .7, .75])
    np.testing.assert_allclose(q3, [np.nan, .6, .7, .85, .925])
    np.testing.assert_array_equal(ttt.grid(group, "seconds"), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(ttt.grid(group, "epochs"), [0, 1, 2, 3])


def test_plot_curves_writes_png_and_html(tmp_path):
    results = [*_synthetic("tpe+hyperband", 1), *_synthetic("random+none", 2, n=3)]
    paths = ttt.plot_curves(results, tmp_path / "compare", target=0.95)
    assert sorted(p.name for p in paths) == ["best_vs_epochs.html", "best_vs_epochs.png",
                                             "best_vs_time.html", "best_vs_time.png"]
    for path in paths:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
        else:
            html = data.decode()
            assert "cdn.plot.ly" in html and "tpe+hyperband" in html and "random+none" in html


def test_the_statistics_import_neither_plotting_nor_heavy_libraries():
    code = ("import sys, mnist_opt.reporting.time_to_target; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'matplotlib', 'plotly', 'mlflow', 'keras', 'tensorflow'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "[]"
