"""``mnist-opt compare``: strategies × repeats on one tiny study, each repeat its own study and
process — the report's numbers recomputed from the storage, a ``kill -9`` completed by a
rerun, and bad input refused before anything is written."""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_opt.search.strategies import (N_TRIALS, PRUNERS, SAMPLERS, Budget, StrategyError,
                                         parse_strategies, plan)
from mnist_opt.study.config import load_config

ROOT = Path(__file__).resolve().parent.parent
TS = optuna.trial.TrialState
STRATEGIES = ["tpe+hyperband", "random+none"]


def _file(tmp_path: Path) -> Path:
    """A study of one tiny dense layer on 600 images, one epoch per trial."""
    doc = {"dataset": "mnist", "model": "mlp",
           "data": {"val_fraction": 0.2, "seed": 1, "train_subset": 600},
           "search": {"sampler": "random", "pruner": "none", "n_trials": 1, "seed": 3,
                      "n_startup_trials": 2},
           "training": {"max_epochs": 1},
           "space": {"n_layers": 1, "units": {"low": 16, "high": 32}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _command(path: Path, storage: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mnist_opt", "compare", str(path), "--strategies", *STRATEGIES,
            "--repeats", "2", "--budget-epochs", "2", "--storage", storage, *extra]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _repeats(storage: str) -> dict[str, optuna.Study]:
    names = sorted(n for n in optuna.get_all_study_names(storage) if n.startswith("tiny.cmp."))
    return {n: optuna.load_study(study_name=n, storage=storage) for n in names}


def _epochs(study: optuna.Study) -> list[list]:
    return [e for t in study.get_trials(deepcopy=False) for e in t.user_attrs.get("epoch_log", [])]


# --- fast: the plan ---------------------------------------------------------------------------

def test_strategies_are_sampler_plus_pruner_from_the_study_schema():
    assert [s.label for s in parse_strategies(["tpe+hyperband", "GP+none"])] == [
        "tpe+hyperband", "gp+none"]
    assert "grid" not in SAMPLERS and set(PRUNERS) == {"hyperband", "median", "none"}
    with pytest.raises(StrategyError) as err:
        parse_strategies(["tpe+hyperband", "tpee+none", "random"])
    msg = str(err.value)
    assert "'tpee+none' (did you mean 'tpe'?)" in msg and "'random'" in msg
    assert f"SAMPLER one of {', '.join(SAMPLERS)}" in msg and "PRUNER one of hyperband" in msg
    with pytest.raises(StrategyError, match="twice"):
        parse_strategies(["tpe+none", "tpe+none"])


def test_a_variant_leaves_the_recipe_out_of_the_study_file(tmp_path):
    path = _file(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["data"]["search_subset"] = 300
    doc["search"]["promote"] = {"top_k": 2, "epochs": 2}
    path.write_text(yaml.safe_dump(doc))
    strategies = parse_strategies(["random+none", "random+none:full-data",
                                   "random+none:no-promote"])
    assert [(s.label, s.slug) for s in strategies] == [
        ("random+none", "random-none"), ("random+none:full-data", "random-none-full-data"),
        ("random+none:no-promote", "random-none-no-promote")]
    repeats = {r.strategy.label: r.config
               for r in plan(load_config(path), strategies, 1, Budget(trials=3), tmp_path / "o")}
    as_is, full, subset = (repeats[s.label] for s in strategies)
    assert (as_is.data.search_subset, as_is.search.promote.top_k) == (300, 2)
    assert (full.data.search_subset, full.search.promote) == (None, None)
    assert (subset.data.search_subset, subset.search.promote) == (300, None)
    with pytest.raises(StrategyError) as err:  # the tiny study has no promote: nothing to drop
        plan(load_config(_file(tmp_path)), parse_strategies(["random+none:no-promote"]), 1,
             Budget(trials=3), tmp_path / "o")
    assert "sets no search.promote" in str(err.value)
    no_subset = tmp_path / "no_subset.yaml"  # promotion alone: :full-data is :no-promote
    doc["data"].pop("search_subset")
    no_subset.write_text(yaml.safe_dump(doc))
    with pytest.raises(StrategyError) as err:
        plan(load_config(no_subset), parse_strategies(["random+none:full-data"]), 1,
             Budget(trials=3), tmp_path / "o")
    assert "sets no data.search_subset" in str(err.value)
    with pytest.raises(StrategyError) as err:
        parse_strategies(["tpe+none:full-dat"])
    assert "'tpe+none:full-dat' (did you mean 'full-data'?)" in str(err.value)
    assert "VARIANT one of full-data, no-promote" in str(err.value)


def test_each_repeat_has_its_seed_the_same_across_strategies_and_the_budget(tmp_path):
    cfg = load_config(_file(tmp_path))
    repeats = plan(cfg, parse_strategies(STRATEGIES), 3, Budget(seconds=30), tmp_path / "out",
                   max_epochs=2, train_subset=800)
    assert [r.name for r in repeats[:3]] == [f"tiny.cmp.tpe-hyperband.r{i}" for i in range(3)]
    assert [(r.strategy.label, r.seed) for r in repeats] == [
        (s, 3 + i) for s in STRATEGIES for i in range(3)]
    for r in repeats:
        search = r.config.search
        assert (search.sampler, search.pruner) == tuple(r.strategy.label.split("+"))
        assert (search.timeout, search.epoch_budget, search.n_trials) == (30, None, N_TRIALS)
        assert r.config.training.max_epochs == 2 and r.config.data.train_subset == 800
        assert r.config.name == r.name and r.study_file.parent == (tmp_path / "out" / "studies")
    assert not (tmp_path / "out").exists()  # a plan writes nothing
    with pytest.raises(StrategyError, match="one budget"):
        Budget()
    with pytest.raises(StrategyError, match="one budget"):
        Budget(seconds=30, trials=5)
    with pytest.raises(StrategyError, match="--budget-trials must be a positive integer"):
        Budget(trials=0)


def test_a_trial_budget_is_the_repeats_trial_count_and_nothing_else(tmp_path):
    cfg = load_config(_file(tmp_path))
    for r in plan(cfg, parse_strategies(STRATEGIES), 2, Budget(trials=7), tmp_path / "out"):
        search = r.config.search
        assert (search.timeout, search.epoch_budget, search.n_trials) == (None, None, 7)


# --- end to end -------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_two_strategies_two_repeats_give_curves_a_table_and_a_verdict(stores, tmp_path):
    path = _file(tmp_path)
    proc = subprocess.run(_command(path, stores["storage"], "--retrain"), cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    folder = tmp_path / "reports" / "compare" / "tiny"
    report = json.loads((folder / "summary.json").read_text())
    assert report["plots"], report
    assert {Path(p).suffix for p in report["plots"]} >= {".png", ".html"}
    assert all((folder / p).stat().st_size > 0 for p in report["plots"])
    md = (folder / "summary.md").read_text()
    assert "too few repeats" in md and "| strategy |" in md and report["command"] in md
    assert "--retrain" in report["command"] and "test acc: median [min, max]" in md
    assert f"{os.cpu_count()} cores" in md and "Python " in md
    # when the repeats ran, on which code (recorded as each started) and which data
    assert report["code"].endswith("(4 repeats)") and report["code"].startswith("git ")
    assert " UTC to " in report["ran"] and f"- ran: {report['ran']}" in md
    assert report["data"] == "mnist" and "- data: mnist, train_subset 600" in md

    # the table's numbers, recomputed from the storage's trials
    repeats = _repeats(stores["storage"])
    assert len(repeats) == 4
    rows = {row["strategy"]: row for row in report["rows"]}
    assert list(rows) == STRATEGIES
    for label in STRATEGIES:
        mine = [s for s in repeats.values() if s.user_attrs["compare_strategy"] == label]
        assert sorted(s.user_attrs["compare_repeat"] for s in mine) == [0, 1]
        for study in mine:  # each its own seed, the same across strategies
            assert study.user_attrs["compare_finished"] is True
            assert study.user_attrs["search_section"]["search"]["seed"] == \
                3 + study.user_attrs["compare_repeat"]
            epochs = _epochs(study)
            # the budget: 2 epochs of 1-epoch trials, and no trial after it
            assert len(epochs) == 2 and len(study.trials) == 2
            assert study.user_attrs["compare_clock_start"] < min(e[0] for e in epochs)
            # --retrain: the trial with the best epoch, scored on the test set
            best = max(study.trials, key=lambda t: max(a for _, a in t.user_attrs["epoch_log"]))
            assert study.user_attrs["compare_test_trial"] == best.number
            assert 0.1 < study.user_attrs["compare_test_accuracy"] <= 1
        finals = [max(acc for _, acc in _epochs(s)) for s in mine]
        tests = [s.user_attrs["compare_test_accuracy"] for s in mine]
        assert rows[label]["test_accuracy_median"] == pytest.approx(statistics.median(tests))
        assert rows[label]["test_accuracy_min"] == min(tests)
        assert rows[label]["final_best_median"] == pytest.approx(statistics.median(finals))
        assert rows[label]["epochs_median"] == statistics.median(len(_epochs(s)) for s in mine)
        assert rows[label]["repeats"] == 2
        assert f"| {label} | 2 | {statistics.median(finals):.4f}" in md
    assert "tpe+hyperband vs random+none: too few repeats" in proc.stdout

    # ... and from summary.json alone (its epochs), without the storage
    from mnist_opt.reporting.time_to_target import Epoch, repeat_from_epochs, summary

    again = summary([repeat_from_epochs(d["strategy"], d["repeat"],
                                        [Epoch(t, a, n) for t, a, n in d["epoch_log"]], 0.0,
                                        test_accuracy=d["test_accuracy"])
                     for d in report["repeat_studies"]], report["target"])
    for row in again:
        for key in ("final_best_median", "time_to_target_median", "epochs_median", "reached",
                    "test_accuracy_median"):
            assert row[key] == pytest.approx(rows[row["strategy"]][key], abs=1e-3), key

    # MLflow: one compare run, the four repeats' study runs nested under it
    client = MlflowClient()
    exp = client.get_experiment_by_name("compare-tiny")
    parent = client.search_runs([exp.experiment_id], "tags.`mnist_opt.kind` = 'compare'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    parent_id = parent[0].info.run_id
    nested = client.search_runs([exp.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert sorted(r.data.tags["optuna.study_name"] for r in nested) == sorted(repeats)
    assert all(r.data.tags["mnist_opt.kind"] == "study" and r.info.status == "FINISHED"
               for r in nested)
    assert client.get_experiment_by_name("tiny.cmp.tpe-hyperband.r0") is None
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"summary.md", "summary.json", "studies"} <= artifacts
    assert parent[0].data.metrics["random-none.final_best_median"] == pytest.approx(
        rows["random+none"]["final_best_median"])


def _wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"compare ended before {what}:\n{proc.communicate()[0][-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.e2e
@pytest.mark.slow
def test_subset_search_and_promotion_against_full_data_search(stores, tmp_path):
    """The study searches 300 of its 1,000 images, then promotes its top 2 (2 epochs on all
    800 training images); :full-data searches all 800 and promotes nothing. Promotion's epochs
    are on the promoting repeat's clock, and --retrain scores its best epoch's trial."""
    path = _file(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["data"].update(train_subset=1000, search_subset=300)
    doc["search"]["promote"] = {"top_k": 2, "epochs": 2}
    path.write_text(yaml.safe_dump(doc))
    command = [sys.executable, "-m", "mnist_opt", "compare", str(path), "--strategies",
               "random+none", "random+none:full-data", "--repeats", "1", "--budget-trials", "3",
               "--retrain", "--storage", stores["storage"]]
    proc = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    folder = tmp_path / "reports" / "compare" / "tiny"
    report = json.loads((folder / "summary.json").read_text())
    details = {d["strategy"]: d for d in report["repeat_studies"]}
    promoting = optuna.load_study(study_name="tiny.cmp.random-none.r0",
                                  storage=stores["storage"])
    full = optuna.load_study(study_name="tiny.cmp.random-none-full-data.r0",
                             storage=stores["storage"])
    promoted = promoting.user_attrs["promoted"]
    assert len(promoted) == 2 and "promoted" not in full.user_attrs
    # 3 one-epoch trials, then 2 × 2 promotion epochs, all after the last trial's
    log = details["random+none"]["epoch_log"]
    assert len(log) == 3 + 4 and len(details["random+none:full-data"]["epoch_log"]) == 3
    clock = promoting.user_attrs["compare_clock_start"]
    again = sorted(t - clock for p in promoted.values() for t, _ in p["epoch_log"])
    assert sorted(e[0] for e in log)[-4:] == pytest.approx(again, abs=1e-3)
    assert max(e[0] for e in _epochs(promoting)) - clock < min(again)
    assert "2 promoted (4 epochs)" in details["random+none"]["trials"]
    rows = {row["strategy"]: row for row in report["rows"]}
    assert rows["random+none"]["epochs_median"] == 7
    best = max(log, key=lambda e: (e[1], -e[2]))
    assert rows["random+none"]["final_best_median"] == pytest.approx(best[1])
    assert promoting.user_attrs["compare_test_trial"] == best[2]
    md = (folder / "summary.md").read_text()
    assert "`search.promote` re-trains the top configurations" in md
    # the full-data repeat searched every training image
    assert full.user_attrs["search_section"]["data"]["search_subset"] is None


@pytest.mark.e2e
@pytest.mark.slow
def test_a_killed_compare_is_completed_by_a_rerun(stores, tmp_path):
    path, storage = _file(tmp_path), stores["storage"]
    command = _command(path, storage)
    proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    second = "tiny.cmp.tpe-hyperband.r1"

    def second_repeat_runs() -> bool:  # its study run and a trial are open
        try:
            return len(optuna.load_study(study_name=second, storage=storage).trials) > 0
        except KeyError:
            return False

    _wait_for(second_repeat_runs, "the second repeat's first trial", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    killed_at = time.time()
    before = _repeats(storage)
    assert sorted(before) == ["tiny.cmp.tpe-hyperband.r0", second]
    first = before["tiny.cmp.tpe-hyperband.r0"]
    assert first.user_attrs["compare_finished"] is True
    assert "compare_finished" not in before[second].user_attrs
    kept = [(t._trial_id, t.datetime_start, t.datetime_complete) for t in first.trials]
    child = before[second].user_attrs["compare_process"]["pid"]
    end = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < end, "the repeat's process outlived the killed compare"
        time.sleep(0.1)

    rerun = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=600)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-4000:]
    assert "1 of 4 repeats finished earlier: kept" in out
    assert f"{second} was started but not finished" in out and "from scratch" in out
    after = _repeats(storage)
    assert len(after) == 4 and all(s.user_attrs["compare_finished"] is True
                                   for s in after.values())
    again = after["tiny.cmp.tpe-hyperband.r0"]
    assert [(t._trial_id, t.datetime_start, t.datetime_complete) for t in again.trials] == kept
    assert again.user_attrs["compare_clock_start"] == first.user_attrs["compare_clock_start"]
    redone = after[second]
    assert redone.user_attrs["compare_clock_start"] > killed_at  # its clock started again
    assert len(_epochs(redone)) == 2 and all(t.state.is_finished() for t in redone.trials)

    client = MlflowClient()
    exp = client.get_experiment_by_name("compare-tiny")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    compares = [r for r in runs if r.data.tags.get("mnist_opt.kind") == "compare"]
    assert sorted(r.info.status for r in compares) == ["FINISHED", "KILLED"]
    dead = [r for r in runs if r.data.tags.get("optuna.study_name") == second
            and r.data.tags.get("mnist_opt.kind") == "study" and r.info.status == "KILLED"]
    assert len(dead) == 1 and "killed mid-way" in dead[0].data.tags["fail_reason"]


def test_a_bad_strategy_exits_2_with_the_allowed_list_and_writes_nothing(stores, tmp_path):
    path = _file(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mnist_opt", "compare", str(path),
                           "--strategies", "tpe+hyperband", "tpe+hyperbnd", "--repeats", "2",
                           "--budget-seconds", "5"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unknown strategy 'tpe+hyperbnd' (did you mean 'hyperband'?)" in proc.stderr
    assert f"SAMPLER one of {', '.join(SAMPLERS)} and PRUNER one of {', '.join(PRUNERS)}" \
        in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlruns", "tiny.yaml"]
    assert list((tmp_path / "mlruns").iterdir()) == []


def test_finished_repeats_of_another_budget_are_not_mixed_in(tmp_path):
    from mnist_opt.search.compare import CompareChangedError, _check_setups, _setup

    cfg = load_config(_file(tmp_path))
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    old = plan(cfg, parse_strategies(["random+none"]), 1, Budget(epochs=2), tmp_path)[0]
    study = optuna.create_study(study_name=old.name, storage=storage)
    study.set_user_attr("compare_setup", _setup(old, 1))
    study.set_user_attr("compare_finished", True)
    _check_setups([old], 1, storage)  # the same command: fine
    new = plan(cfg, parse_strategies(["random+none"]), 1, Budget(epochs=3), tmp_path)
    with pytest.raises(CompareChangedError) as err:
        _check_setups(new, 2, storage)
    assert f"{old.name}: epoch_budget: 2 → 3; workers: 1 → 2" in str(err.value)
    assert "optuna delete-study" in str(err.value)


def test_the_target_is_fixed_before_the_run_when_a_previous_run_gave_one(tmp_path):
    from mnist_opt.reporting.time_to_target import Epoch, repeat_from_epochs
    from mnist_opt.search.compare import _target

    results = [repeat_from_epochs("tpe+none", r, [Epoch(100.0 + r, acc, 0)], 100.0)
               for r, acc in enumerate([0.9, 0.8, 0.7])]
    first, why = _target(None, tmp_path, results)
    assert first == 0.8 and "after the fact" in why  # the median final best of the one strategy
    (tmp_path / "summary.json").write_text('{"target": 0.85}')
    assert _target(None, tmp_path, results) == (0.85, f"the previous compare run's target "
                                                       f"({tmp_path / 'summary.json'}), fixed "
                                                       "before this run")
    assert _target(0.9, tmp_path, results) == (0.9, "--target")


def test_the_shipped_strategy_comparisons_plan_on_their_studies(tmp_path):
    """``make strategies``' commands (bench/strategies.py) are valid compares of shipped
    studies: every strategy parses and every repeat's study file validates."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import strategies as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from mnist_opt.study.config import find_study

    for name, c in bench.COMPARISONS.items():
        argv = bench.command(name)
        assert argv[:3] == ["mnist-opt", "compare", name]
        assert ("--retrain" in argv) == bool(c.get("retrain"))
        repeats = plan(find_study(name), parse_strategies(c["strategies"]), c["repeats"],
                       Budget(seconds=c["budget_seconds"]), tmp_path / name)
        assert len(repeats) == len(c["strategies"]) * c["repeats"]
