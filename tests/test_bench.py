"""``bench/bench.py``'s own arithmetic: per-repeat figures with "not reached", the ratios,
"final val" from a hand-built study, and that the README block is replaced from the JSON."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # light: TensorFlow is imported inside its functions
    return module


def test_not_reached_ranks_last_in_medians_and_ratios(bench):
    assert bench._spread([10.0, 30.0, 20.0]) == {"values": [10.0, 30.0, 20.0], "median": 20.0,
                                                 "min": 10.0, "max": 30.0}
    one_missing = bench._spread([10.0, None, 20.0])
    assert (one_missing["median"], one_missing["min"], one_missing["max"]) == (20.0, 10.0, None)
    assert bench._spread([None, None, 5.0])["median"] is None  # the middle one not reached
    assert bench._ratio(10.0, 40.0) == 0.25
    assert bench._ratio(10.0, None) is None and bench._ratio(None, 40.0) is None
    assert "not reached" in bench._cell(one_missing, 0)
    # the ratio of medians, its range over every pair that both reached, and who reached
    ours = {"time_to_target": bench._spread([10.0, 20.0, 30.0])}
    theirs = {"time_to_target": bench._spread([40.0, None, 50.0])}
    got = bench.ratio_figures(ours, theirs)
    assert got["ratio"] == 20.0 / 50.0
    assert (got["pairs_min"], got["pairs_max"]) == (10.0 / 50.0, 30.0 / 40.0)
    assert got["reached"] == [3, 3] and got["reached_theirs"] == [2, 3]
    assert bench._headline(got) == "**0.40** (0.20–0.75 over all pairs)"
    none = bench.ratio_figures(ours, {"time_to_target": bench._spread([None, None, 5.0])})
    assert none["ratio"] is None
    assert bench._headline(none) == "– (keras-tuner's median not reached)"


def test_final_val_is_the_last_epoch_of_trials_trained_to_the_full_budget(bench):
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for log, attrs in (([[1, 0.5], [2, 0.9], [3, 0.7]], {}),          # 3 epochs: last 0.7
                       ([[1, 0.95]], {}),                            # pruned after 1 epoch
                       ([[4, 0.6], [5, 0.8]], {"kt_hyperband": {"epochs": 3,
                                                                "initial_epoch": 1}}),
                       ([[6, 0.99], [7, 0.98]], {"kt_hyperband": {"epochs": 2}})):
        study.add_trial(optuna.trial.create_trial(
            value=max(a for _, a in log), params={"x": 0.1}, distributions=dist,
            user_attrs={"epoch_log": log, **attrs}))
    assert bench.final_val(study, max_epochs=3) == 0.8
    assert bench.final_val(study, max_epochs=5) is None


def test_render_replaces_only_the_readme_block(bench, tmp_path, monkeypatch):
    side = {"time_to_target": bench._spread([10.0, 12.0, 14.0]),
            "wall_s": bench._spread([100.0, 110.0, 120.0]),
            "best_val": bench._spread([0.96, 0.97, 0.98]),
            "final_val": bench._spread([0.95, 0.96, None]),
            "test_acc": bench._spread([0.95, 0.955, 0.96]),
            "epochs": bench._spread([100, 120, 140]), "trials": bench._spread([30, 30, 30]),
            "fixed_cost_s": bench._spread([1.0, 2.0, 3.0])}
    theirs = {**side, "time_to_target": bench._spread([20.0, 24.0, None])}
    out = {"command": "make bench", "started": "s", "finished": "f", "machine": "m",
           "workloads": {"classic": {
               "title": "classic", "trials": 30, "max_epochs": 10, "target": 0.95,
               "data": "fashion-mnist (the offline copy: …)",
               "target_source": "default_target: …", "command": "mnist-opt compare …",
               "summaries": ["bench/results/classic"], "repeats": 3,
               "verdict": ["tpe+hyperband vs kt-hyperband: too few repeats", "a vs b: no",
                           "tpe+hyperband, 2 workers vs kt-defaults: too few repeats"],
               "strategies": {"tpe+hyperband": side, "kt-hyperband": theirs,
                              "tpe+hyperband, 2 workers": side, "kt-defaults": theirs},
               "modes": {"like_for_like": {"ours": "tpe+hyperband",
                                           "keras_tuner": "kt-hyperband"},
                         "out_of_the_box": {"ours": "tpe+hyperband, 2 workers",
                                            "keras_tuner": "kt-defaults",
                                            "ours_workers": 2}}}},
           "overhead": {"ours_epoch_s": 0.5, "bare_epoch_s": 0.8, "ratio": 0.625, "epochs": 6},
           "memory": {
               "one_process": {"trials": 3, "processes": 1,
                               "rss_after_each_trial_mb": [1000.0, 1100.0, 1200.0],
                               "per_process": [{"trials": 3, "first_mb": 1000.0,
                                                "max_mb": 1200.0, "growth_mb": 200.0}]},
               "workers": {"trials": 3, "processes": 2, "rss_after_each_trial_mb": [1, 2, 3],
                           "per_process": [{"trials": 2, "first_mb": 1, "max_mb": 2,
                                            "growth_mb": 1}, {"trials": 1, "first_mb": 3,
                                                              "max_mb": 3, "growth_mb": 0}]}}}
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{bench.README_START}\nold\n{bench.README_END}\nafter\n")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    assert bench.render(out, readme=True, folder=tmp_path) == 0
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    # ratio of medians 12/24; pairs 10/24 … 14/20; keras-tuner reached 2 of 3
    # epochs ratio 120/120 beside the wall ratio 110/110
    assert "**0.50** (0.42–0.70 over all pairs) | 3/3, 2/3 | 1.00 | 1.00 |" in text
    assert "Data: classic: fashion-mnist (the offline copy: …)." in text
    assert "| like for like |" in text and "chosen after the fact" in text
    assert "- classic: tpe+hyperband vs kt-hyperband: too few repeats" in text
    assert "a vs b" not in text  # only the pairs the table shows
    assert "12 (10–14) vs 24 (20–not reached)" in text   # ours vs theirs, seconds to target
    assert "+200 MB" in text and "2 processes over the run" in text
    # out of the box, ours on every core: its own row, verdict and the workers it had
    assert "| out of the box | tpe+hyperband, 2 workers vs kt-defaults |" in text
    assert "- classic: tpe+hyperband, 2 workers vs kt-defaults: too few repeats" in text
    assert "except ours out of the box: 2 workers (`--workers auto`" in text
    assert "classic, tpe+hyperband: 2.00 s (1.00–3.00)" in text  # fixed cost per trial
    assert "- classic: tpe+hyperband vs kt-hyperband: too few repeats" in (
        tmp_path / "latest.md").read_text()
    assert not math.isnan(out["overhead"]["ratio"])


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_strategies_section_comes_from_the_compare_summaries(tmp_path, monkeypatch):
    from mnist_opt.reporting.time_to_target import pair_verdicts, repeat_from_epochs, summary
    from mnist_opt.reporting.time_to_target import Epoch

    strategies = _load("strategies")
    cmd = strategies.command("mlp_tpe")
    assert cmd[:3] == ["mnist-opt", "compare", "mlp_tpe"] and "--target" in cmd
    assert cmd[cmd.index("--out") + 1] == "bench/results/compare/mlp_tpe"
    results = [repeat_from_epochs(s, r, [Epoch(100.0 + 10 * k, acc, 0) for k, acc in
                                         enumerate(accs)], 100.0)
               for s, r, accs in (("tpe+hyperband", 0, [0.5, 0.9]),
                                  ("random+none", 0, [0.7, 0.8]))]
    rows = summary(results, 0.85)
    folder = tmp_path / "bench" / "results" / "compare" / "mlp_tpe"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "study": "mlp_tpe", "budget": {"seconds": 300, "epochs": None}, "workers": 2,
        "repeats": 1, "target": 0.85, "target_source": "--target", "date": "D",
        "ran": "R", "data": "fashion-mnist (the offline copy: …)", "machine": "M", "command": "mnist-opt compare mlp_tpe …", "rows": rows,
        "verdict": ["tpe+hyperband vs random+none: too few repeats"],
        "pairs": pair_verdicts(results, 0.85)}))
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{strategies.README_START}\n{strategies.README_END}\nb\n")
    monkeypatch.setattr(strategies, "ROOT", tmp_path)
    monkeypatch.setattr(strategies, "RESULTS", tmp_path / "bench" / "results" / "compare")
    assert strategies.render() == 0
    text = readme.read_text()
    assert ("**mlp_tpe**: 2 strategies (a part: 2 of the 6 planned; the others not run yet) × 1 "
            "repeats, 300 s of search each") in text
    assert "target validation accuracy 0.8500 (fixed before the run)" in text
    assert "ran R, M; data: fashion-mnist (the offline copy: …);" in text
    assert "| tpe+hyperband | 1 | 0.9000" in text and "| random+none | 1 | 0.8000" in text
    assert "| 10.0 s [10.0, 10.0] |" in text  # tpe+hyperband reached 0.85 at its second epoch
    assert "- tpe+hyperband vs random+none: too few repeats" in text
    assert "group=False" in text and text.startswith("a\n") and text.endswith("b\n")
    assert ("the lowest median time to target is tpe+hyperband's (10.0 s), the highest median "
            "final best tpe+hyperband's (0.9000). Of the 1 pairs, 0 differ") in text


def test_the_reading_counts_significant_pairs_and_what_chance_gives():
    strategies = _load("strategies")
    rows = [{"strategy": name, "time_to_target_median": t, "final_best_median": f}
            for name, t, f in (("a", 30.0, 0.98), ("b", None, 0.99), ("c", 50.0, 0.97))]
    # a vs b: both differ; a vs c: neither; b vs c: final best only
    pairs = [{"a": a, "b": b, "p_time": t, "p_final": f}
             for a, b, t, f in (("a", "b", 0.0079, 0.024), ("a", "c", 0.3, 0.5),
                                ("b", "c", 0.2, 0.0079))]
    text = strategies.reading({"rows": rows, "repeats": 5, "pairs": pairs})
    assert "lowest median time to target is a's (30.0 s)" in text
    assert "highest median final best b's (0.9900)" in text
    assert "1 differ significantly in time to target and 2 in final best" in text
    assert "about 0.15 of each would by chance" in text
    # 3 pairs: Bonferroni 0.0167; two p of 0.0079 survive it, and 5 a side can go below it
    assert "(Bonferroni, p < 0.017), 2 survive." in text


def test_kept_workloads_carry_when_they_ran_not_the_new_runs_header(bench):
    """A run of some workloads keeps the others: each says when it ran, with which code and
    command (files written before workloads carried it: that run's header)."""
    old = {"command": "make bench", "started": "old-s", "finished": "old-f", "code": "git a",
           "workloads": {"classic": {"title": "c"},
                         "mlp_tpe": {"title": "m", "ran": {"started": "s2", "finished": "f2",
                                                           "code": "git b", "command": "x"}}}}
    kept = bench.kept_workloads(old)
    assert kept["classic"]["ran"] == {"started": "old-s", "finished": "old-f", "code": "git a",
                                      "command": "make bench"}
    assert kept["mlp_tpe"]["ran"]["code"] == "git b"
    assert bench._ran(kept["classic"]) == "old-s to old-f, code git a, by `make bench`"
