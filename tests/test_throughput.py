"""``bench/throughput.py``: the settings it compares, the study files it writes, and the table
and ratios it renders from its JSON."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mnist_opt.study.config import SearchConfig, find_study, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def throughput():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "bench"))  # as `python bench/throughput.py` has it
        spec = importlib.util.spec_from_file_location("throughput", ROOT / "bench" / "throughput.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # light: TensorFlow is imported inside its functions
        return module


def test_the_settings_are_one_worker_the_old_replacement_and_the_default(throughput):
    default = SearchConfig.model_fields["trials_per_worker"].default
    assert default > throughput.BEFORE
    labels = throughput.settings(2, default)
    assert labels == {"1 worker": (1, None),
                      f"2 workers, replaced every {throughput.BEFORE} trials": (2, throughput.BEFORE),
                      f"2 workers, replaced every {default} trials": (2, None)}


def test_study_files_search_the_shipped_study_and_differ_only_in_the_replacement(tmp_path,
                                                                                throughput):
    shipped = find_study(throughput.STUDY)
    old = load_config(throughput.study_file(tmp_path, throughput.BEFORE))
    new = load_config(throughput.study_file(tmp_path, None))
    assert old.search.trials_per_worker == throughput.BEFORE
    assert new.search.trials_per_worker == shipped.search.trials_per_worker
    assert old.digest == new.digest == shipped.digest  # the same search, a run-time key apart
    assert old.space == shipped.space


def _setting(throughput, eps: list[float]) -> dict:
    figures = {"wall_s": [100.0] * 3, "epochs": [300] * 3, "epochs_per_s": eps, "fixed_cost_s": [1.0, 1.2, 0.8],
               "outside_s": [0.5, 0.7, 0.6], "processes": [2, 2, 2], "best_val": [0.98] * 3}
    return {key: throughput._spread(v) for key, v in figures.items()}


def test_the_table_and_ratios_come_from_the_json(throughput):
    out = {"settings": {"1 worker": _setting(throughput, [1.0, 1.1, 0.9]),
                        "2 workers, replaced every 6 trials": _setting(throughput, [1.5, 1.7, 1.6]),
                        "2 workers, replaced every 20 trials": _setting(throughput, [1.9, 1.7, 1.8])}}
    table = throughput.table(out)
    assert table.count("\n") == 4  # header, rule, three settings
    assert "| 1 worker | 100 (100–100) | 300 (300–300) | 1.00 (0.90–1.10) | 1.00 (0.80–1.20) |" \
        in table
    assert throughput.ratios(out) == (
        "2 workers, replaced every 6 trials: 1.60× one worker's trial-epochs per second; "
        "2 workers, replaced every 20 trials: 1.80× one worker's trial-epochs per second.")


def test_full_runs_the_shipped_study_and_its_headline_is_the_ratio_per_pair(throughput,
                                                                           tmp_path):
    assert throughput.full_settings(2) == {"1 worker": (1, None), "2 workers": (2, None)}
    argv = throughput.command(tmp_path / "s.yaml", 2, tmp_path / "r.db", full=True)
    assert "--n-trials" not in argv and "--max-epochs" not in argv  # the file's own
    one = {"wall_s": throughput._spread([300.0, 320.0, 310.0]),
           "best_val": throughput._spread([0.983, 0.981, 0.984])}
    two = {"wall_s": throughput._spread([150.0, 224.0, 186.0]),
           "best_val": throughput._spread([0.982, 0.985, 0.979])}
    line = throughput.speedup({"workers": 2, "settings": {"1 worker": one, "2 workers": two}})
    # pairs by round: 150/300, 224/320, 186/310 = 0.50, 0.70, 0.60
    assert line.startswith("Wall time with 2 workers / with 1 worker, per pair: median **0.60** "
                           "(0.50–0.70; 0.50, 0.70, 0.60 in order; aimed at ≤ 0.6)")
    assert line.endswith("Best validation accuracy ≥ 0.982 in 4 of 6 runs.")
