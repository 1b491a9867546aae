"""Study files: the shipped ones load; bad ones fail naming file, field and allowed values."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mnist_opt.study.config import (StudyConfig, UnknownStudyError, find_study, known_studies,
                              load_config, with_overrides)
from mnist_opt.errors import StudyFileError

STUDIES = Path(__file__).resolve().parent.parent / "studies"

VALID = {
    "dataset": "mnist",
    "model": "mlp",
    "search": {"sampler": "tpe", "n_trials": 5},
    "space": {"n_layers": {"low": 1, "high": 2}, "units": {"low": 32, "high": 64},
              "learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True}},
}


def _write(tmp_path: Path, doc, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def _with(**changes) -> dict:
    """VALID with nested changes: ``_with(search={"sampler": "x"})`` updates one section."""
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in VALID.items()}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key].update(value)
        else:
            doc[key] = value
    return doc


def _error(path: Path) -> str:
    with pytest.raises(StudyFileError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    return msg


def test_shipped_studies_are_listed():
    names = known_studies(STUDIES)
    assert names == sorted(p.stem for p in STUDIES.glob("*.yaml"))
    assert {"mlp_tpe", "mlp_hyperband"} <= set(names)


@pytest.mark.parametrize("name", sorted(p.stem for p in STUDIES.glob("*.yaml")))
def test_shipped_study_loads(name: str):
    cfg = find_study(name, STUDIES)
    assert isinstance(cfg, StudyConfig)
    assert cfg.name == name
    assert cfg.path == (STUDIES / f"{name}.yaml").resolve()
    assert len(cfg.digest) == 16


def test_valid_minimal_file(tmp_path: Path):
    cfg = load_config(_write(tmp_path, VALID, "tiny.yaml"))
    assert cfg.name == "tiny"
    assert cfg.search.n_trials == 5
    assert cfg.data.val_fraction == 0.1  # default
    assert cfg.space["units"].is_int and not cfg.space["learning_rate"].is_int


def test_unknown_sampler(tmp_path: Path):
    msg = _error(_write(tmp_path, _with(search={"sampler": "tpee"})))
    assert "search.sampler" in msg
    for allowed in ("'tpe'", "'gp'", "'random'", "'grid'", "'qmc'"):
        assert allowed in msg


def test_unknown_top_level_key(tmp_path: Path):
    doc = _with()
    doc["serach"] = doc.pop("search")
    msg = _error(_write(tmp_path, doc))
    assert "serach: unknown field" in msg
    assert ("allowed: baseline, data, dataset, description, model, reference, search, space, "
            "training") in msg


def test_val_fraction_out_of_range(tmp_path: Path):
    msg = _error(_write(tmp_path, _with(data={"val_fraction": 1.5})))
    assert "data.val_fraction" in msg
    assert "less than 1" in msg


def test_unknown_space_parameter(tmp_path: Path):
    space = dict(VALID["space"], filters=32)  # a CNN parameter in an MLP study
    msg = _error(_write(tmp_path, _with(space=space)))
    assert "space" in msg
    assert "'filters'" in msg
    assert "allowed:" in msg
    for allowed in ("n_layers", "units", "dropout", "learning_rate", "optimizer"):
        assert allowed in msg


def test_non_per_layer_parameter_as_list(tmp_path: Path):
    space = dict(VALID["space"], learning_rate=[0.1, 0.01])
    msg = _error(_write(tmp_path, _with(space=space)))
    assert "only per-layer parameters (units, dropout) may be lists" in msg
    assert "units" in msg


def test_low_above_high(tmp_path: Path):
    space = dict(VALID["space"], units={"low": 64, "high": 32})
    msg = _error(_write(tmp_path, _with(space=space)))
    assert "space.units" in msg
    assert "low (64) is above high (32)" in msg


def test_log_range_needs_positive_low(tmp_path: Path):
    space = dict(VALID["space"], learning_rate={"low": 0.0, "high": 0.1, "log": True})
    msg = _error(_write(tmp_path, _with(space=space)))
    assert "space.learning_rate" in msg
    assert "a log range needs low > 0" in msg


def test_not_a_mapping(tmp_path: Path):
    msg = _error(_write(tmp_path, "- dataset\n- mnist\n"))
    assert "must be a YAML mapping" in msg
    assert "list" in msg


def test_broken_yaml(tmp_path: Path):
    msg = _error(_write(tmp_path, "dataset: mnist\nspace: {units: [1, 2\n"))
    assert "not valid YAML" in msg


def test_name_is_set_from_the_file(tmp_path: Path):
    msg = _error(_write(tmp_path, _with(name="other")))
    assert "'name'" in msg


def test_grid_needs_values_for_float_ranges(tmp_path: Path):
    doc = _with(search={"sampler": "grid"},
                space={"n_layers": {"choices": [1, 2]}, "units": {"choices": [32, 64]},
                       "learning_rate": {"low": 0.001, "high": 0.01}})
    msg = _error(_write(tmp_path, doc))
    assert "space.learning_rate" in msg
    assert "grid" in msg


def test_missing_file(tmp_path: Path):
    _error(tmp_path / "absent.yaml")


def test_find_study_unknown_lists_known_names():
    with pytest.raises(UnknownStudyError) as err:
        find_study("nope", STUDIES)
    msg = str(err.value)
    assert "'nope'" in msg
    assert err.value.known == known_studies(STUDIES)
    for name in known_studies(STUDIES):
        assert name in msg
    assert isinstance(err.value, StudyFileError)


def test_find_study_by_path(tmp_path: Path):
    path = _write(tmp_path, VALID, "by_path.yaml")
    assert find_study(str(path)).name == "by_path"


def test_with_overrides_copies():
    cfg = find_study("mlp_tpe", STUDIES)
    before = cfg.model_dump()
    quick = with_overrides(cfg, n_trials=3, max_epochs=2, train_subset=3000)
    assert (quick.search.n_trials, quick.training.max_epochs, quick.data.train_subset) == (3, 2, 3000)
    assert quick.retrain_epochs == 2
    assert cfg.model_dump() == before  # the original is untouched
    assert (cfg.search.n_trials, cfg.training.max_epochs, cfg.data.train_subset) == (30, 12, None)
    assert quick.space == cfg.space and quick.name == cfg.name
    assert quick.search.sampler == cfg.search.sampler


def test_with_overrides_none_keeps_values():
    cfg = find_study("mlp_tpe", STUDIES)
    assert with_overrides(cfg).model_dump() == cfg.model_dump()


def test_search_subset_applies_to_trials_only(tmp_path):
    doc = yaml.safe_load((STUDIES / "cnn_gp.yaml").read_text())
    doc["data"]["search_subset"] = 2000
    path = tmp_path / "cnn_small.yaml"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    assert cfg.trial_images(60000) == 2000 and cfg.data.train_subset is None  # retrain: all
    assert with_overrides(cfg, train_subset=1000).trial_images(60000) == 900  # its split's 900
    # trials validate on the whole validation split: not the search of subset studies begun
    # when they validated on the subset's share
    assert cfg.search_section()["data"]["search_subset_validation"] == "whole"
    assert "search_subset_validation" not in load_config(STUDIES / "mlp_tpe.yaml").search_section()["data"]


def test_baseline_params_are_checked_like_the_space(tmp_path: Path):
    doc = _with(baseline={"description": "tutorial", "params": {"units": 350, "layers": 2}})
    msg = _error(_write(tmp_path, doc))
    assert "baseline" in msg and "unknown parameter 'layers'" in msg and "n_layers" in msg
    doc = _with(baseline={"description": "tutorial", "params": {"units": {"low": 1, "high": 2}}})
    assert "baseline.params.units" in _error(_write(tmp_path, doc))  # fixed values only


def test_baseline_builds_from_defaults_not_the_search_space(tmp_path: Path):
    from mnist_opt.study.space import DEFAULTS, baseline_params

    doc = _with(baseline={"description": "tutorial", "params": {"n_layers": 1, "units": 350}})
    params = baseline_params(load_config(_write(tmp_path, doc)))
    assert params["units_l0"] == 350 and params["n_layers"] == 1
    assert params["learning_rate"] == DEFAULTS["training"]["learning_rate"]  # not a searched range


def test_digest_ignores_what_does_not_change_the_search(tmp_path: Path):
    base = load_config(_write(tmp_path, _with())).digest
    documented = _with(description="new words", reference={"test_accuracy": 0.9, "source": "x"},
                       baseline={"description": "tutorial", "params": {"units": 128}})
    assert load_config(_write(tmp_path, documented)).digest == base
    # the budget is not the search: raising n_trials continues the same study
    budget = _with(search={"sampler": "tpe", "n_trials": 50, "timeout": 60})
    assert load_config(_write(tmp_path, budget)).digest == base
    # defaults written out, or flow style instead of block style: the same search
    explicit = _with(data={"val_fraction": 0.1, "seed": 48})
    assert load_config(_write(tmp_path, explicit)).digest == base
    assert load_config(_write(tmp_path, _with(search={"sampler": "random"}))).digest != base
    wider = _with(space={**VALID["space"], "units": {"low": 32, "high": 128}})
    assert load_config(_write(tmp_path, wider)).digest != base
