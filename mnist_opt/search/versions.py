"""A changed study file is never mixed silently into a study begun from another version.

A study stores its file's normalised search section (:meth:`StudyConfig.search_section`)
and digest. Continuing it from a file that searches differently is refused, naming each
changed key, unless the user chooses one of the two ways out: mix knowingly
(``--mix-versions``, recorded on the study and its MLflow run), or start a new version
(``--new-version``: ``NAME.v2``, a name used everywhere — Optuna, MLflow, the registry).
"""
from __future__ import annotations

from typing import Any

import optuna

from mnist_opt.errors import MnistOptError
from mnist_opt.study.config import VERSION, StudyConfig, section_changes


class StudyChangedError(MnistOptError):
    """The study file no longer searches what the stored study searched."""


def base_name(name: str) -> str:
    """``mlp_tpe`` of ``mlp_tpe.v3`` (and of ``mlp_tpe``)."""
    version = VERSION.fullmatch(name)
    return version["base"] if version else name


def _versions(storage: optuna.storages.BaseStorage, base: str) -> dict[str, dict[str, Any]]:
    """``{study name: user attrs}`` of the study ``base`` and its versions in ``storage``."""
    return {s.study_name: s.user_attrs for s in optuna.get_all_study_summaries(storage, False)
            if base_name(s.study_name) == base}


def new_version(cfg: StudyConfig, storage: optuna.storages.BaseStorage) -> StudyConfig:
    """The version of ``cfg``'s study that this file searches: an existing ``NAME.vK`` with
    the same digest (continued), else the next free ``K`` (from 2: the plain name is 1)."""
    base = base_name(cfg.name)
    versions = _versions(storage, base)
    if base not in versions:  # no study yet: the first version has the plain name
        return cfg.model_copy(update={"name": base})
    same = [name for name, attrs in versions.items() if attrs.get("config_digest") == cfg.digest]
    if same:
        return cfg.model_copy(update={"name": sorted(same)[-1]})
    taken = [int(VERSION.fullmatch(n)["number"]) for n in versions if VERSION.fullmatch(n)]
    return cfg.model_copy(update={"name": f"{base}.v{max([1, *taken]) + 1}"})


def changes(study: optuna.Study, cfg: StudyConfig) -> list[str] | None:
    """What changed since the study began ([] nothing; None: changed, keys unknown, for a
    study from before the search section was stored)."""
    old = study.user_attrs.get("config_digest")
    if not old or old == cfg.digest:
        return []
    section = study.user_attrs.get("search_section")
    return section_changes(section, cfg.search_section()) or None if section else None


def refuse(study: optuna.Study, cfg: StudyConfig, what: list[str] | None, argument: str) -> None:
    """Raise the one error that names the changes and both ways out, on one line."""
    changed = "; ".join(what) if what else (
        "changed, keys unknown: the study was begun before mnist_opt stored its search section "
        "(or under an older parameter table)")
    same = [n for n, attrs in _versions(study._storage, base_name(cfg.name)).items()
            if attrs.get("config_digest") == cfg.digest]
    hint = f", or continue {same[0]}, which this file searches: mnist-opt study {same[0]}" \
        if same else ""
    raise StudyChangedError(
        f"study {cfg.name} was begun with other search settings than {cfg.path} and this "
        f"command's options give now: {changed}. Either mix "
        f"both versions knowingly: mnist-opt study {argument} --mix-versions, or start a new "
        f"version: mnist-opt study {argument} --new-version (its own name everywhere, for "
        f"retrain and report too){hint}")


def record(study: optuna.Study, cfg: StudyConfig, mixed: list[str] | None) -> dict[str, str]:
    """Store this version's digest and search section on the study; with ``mixed`` (changes
    the user chose to mix), append them to its ``mixed_versions``. Returns what the MLflow
    parent run records of it."""
    out = {}
    if mixed is not None:
        entry = {"from": study.user_attrs.get("config_digest"), "to": cfg.digest,
                 "changed": mixed or ["keys unknown"]}
        study.set_user_attr("mixed_versions", [*study.user_attrs.get("mixed_versions", []), entry])
        out["mixed_versions"] = f"{entry['from']} → {entry['to']}: {'; '.join(entry['changed'])}"
    study.set_user_attr("config_digest", cfg.digest)
    study.set_user_attr("search_section", cfg.search_section())
    return out
