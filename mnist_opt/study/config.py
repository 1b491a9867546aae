"""Study files: YAML in ``studies/``, validated on load.

A study is data. The file names the dataset, the model family, the sampler and pruner and
the ranges of the search space; :mod:`mnist_opt.study.space` turns the ranges into
``trial.suggest_*`` calls. A bad file raises :class:`StudyFileError` naming the file, the
field and what is allowed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_serializer)

from mnist_opt.errors import StudyFileError
from mnist_opt.study.checks import Problem, check_search, check_space, did_you_mean
from mnist_opt.study.params import FAMILIES, TABLE_VERSION, table

Scalar = Union[bool, int, float, str]


class UnknownStudyError(StudyFileError):
    def __init__(self, name: str, known: list[str], directory: Path):
        self.known = known
        super().__init__(
            f"unknown study {name!r}; known studies in {directory}: {', '.join(known) or '(none)'}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Choice(_Strict):
    """A categorical parameter: ``{choices: [a, b, c]}``."""
    choices: list[Scalar] = Field(min_length=1)


class Range(_Strict):
    """A numeric range: ``{low, high, log?, step?, grid?}``. ``is_int`` comes from the
    parameter table (set on load), not from how the bounds are written."""
    low: float
    high: float
    log: bool = False
    step: Optional[float] = None
    grid: Optional[list[float]] = None  # the values GridSampler tries; required for grid studies
    is_int: bool = False


def _spec_kind(value: Any) -> str:
    """Pick the one schema a value is meant for, so a bad range gets one error, not nine."""
    if isinstance(value, (Choice, Range)):
        return "choice" if isinstance(value, Choice) else "range"
    if isinstance(value, dict):
        return "choice" if "choices" in value else "range"
    return "per-layer" if isinstance(value, list) else "fixed"


ParamSpec = Annotated[Union[Annotated[Choice, Tag("choice")], Annotated[Range, Tag("range")],
                            Annotated[Scalar, Tag("fixed")]], Discriminator(_spec_kind)]
SpaceEntry = Annotated[Union[Annotated[Choice, Tag("choice")], Annotated[Range, Tag("range")],
                             Annotated[Scalar, Tag("fixed")],
                             Annotated[list[ParamSpec], Tag("per-layer")]], Discriminator(_spec_kind)]

class DataConfig(_Strict):
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 48
    train_subset: Optional[int] = Field(None, ge=100)  # search and retrain
    # Search only (a cheaper fidelity): a trial trains on this many of the split's training
    # images and validates on its whole validation part; retrain trains on all of them.
    search_subset: Optional[int] = Field(None, ge=100)


class PromoteConfig(_Strict):
    """Re-train the top-k complete configurations of a cheaper search (``data.search_subset``
    or a smaller ``max_epochs``) on the full training split, one seed each; the best by
    full-data validation accuracy is the study's pick (``mnist_opt.search.promote``)."""
    top_k: int = Field(5, ge=1)
    epochs: Optional[Union[int, float]] = Field(None, gt=0)  # default: retrain_epochs


class SearchConfig(_Strict):
    sampler: Literal["tpe", "gp", "random", "grid", "qmc", "nsga2"] = "tpe"
    n_startup_trials: int = Field(10, ge=0)
    pruner: Literal["hyperband", "median", "none"] = "hyperband"
    # Pruner settings are in epochs, whatever report_every is (fractions of an epoch allowed
    # when they are whole numbers of reports); they become Optuna steps in make_pruner.
    min_resource: float = Field(1, gt=0)
    reduction_factor: int = Field(3, ge=2)
    n_warmup_steps: int = Field(1, ge=0)
    # How often a trial reports to the pruner, as a fraction of an epoch (1, 0.5, 0.25, …):
    # below 1, in-epoch reports are measured on a fixed stratified slice of the validation
    # set (report_val_images), and every epoch's end still reports the full validation set.
    report_every: float = Field(1, gt=0, le=1)
    report_val_images: int = Field(2000, ge=100)
    direction: Literal["maximize", "minimize"] = "maximize"
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    n_trials: int = Field(20, ge=1)
    timeout: Optional[int] = Field(None, ge=1)
    # Epochs completed by all the study's trials together (each trial's epoch_log): no new
    # trial starts once they reach it. `mnist-opt compare --budget-epochs` sets it.
    epoch_budget: Optional[int] = Field(None, ge=1)
    seed: int = 48
    # A worker process is replaced after this many trials: TensorFlow leaks traced graphs per
    # model, and a new process frees them, but its start-up (import, data) costs seconds
    # (`make bench-throughput` measures both sides; cores.WORKER_BYTES holds the growth).
    trials_per_worker: int = Field(20, ge=1)
    # A study whose trials keep failing stops instead of burning its budget (keras-tuner's
    # max_consecutive_failed_trials, also 3): failed trials in a row, in completion order.
    max_consecutive_failures: int = Field(3, ge=1)
    # A second objective, minimised beside `metric`: the study keeps a Pareto front, and
    # retrain picks the smallest/fastest model within pick_tolerance of the best accuracy.
    second_objective: Optional[Literal["n_params", "latency_ms"]] = None
    pick_tolerance: float = Field(0.005, ge=0, le=1)
    # Known configurations to run first (Optuna's enqueue_trial), each a {param: value} of
    # trial parameters (units_l0, …), checked against the space on load; missing ones are
    # sampled. They count toward n_trials like any trial.
    enqueue: list[dict[str, Scalar]] = Field(default_factory=list)
    promote: Optional[PromoteConfig] = None

    @field_serializer("min_resource", "report_every")
    def _integral_as_int(self, value: float) -> float | int:
        # 1, not 1.0: a study file's normalised search section (and its digest) stays what
        # it was before these fields took fractions
        return int(value) if float(value).is_integer() else value

    @property
    def reports_per_epoch(self) -> int:
        """Optuna steps per epoch: 4 with ``report_every: 0.25`` (checked to divide 1)."""
        return round(1 / self.report_every)

    def optuna_steps(self, epochs: float) -> int:
        """``epochs`` in Optuna steps (reports); checked to be a whole number on load."""
        return round(epochs * self.reports_per_epoch)


BACKENDS = ("tensorflow", "jax")  # Keras backends a study may train on (training.backend)


class TrainingConfig(_Strict):
    # In epochs; a fraction (2.5) when it is a whole number of search.report_every's reports:
    # the last epoch then stops part-way (training.loop.train). int | float keeps 10 an int.
    max_epochs: Union[int, float] = Field(10, gt=0)
    retrain_epochs: Optional[int] = Field(None, ge=1)
    # The Keras backend that trains the study's models: `auto` picks, per model family, the
    # faster one according to `mnist-opt calibrate`'s measurements (TensorFlow without them):
    # mnist_opt.training.backend.
    backend: Literal[("auto", *BACKENDS)] = "auto"


class Reference(_Strict):
    """A published result this study should beat (shown next to ours by ``mnist-opt results``)."""
    test_accuracy: float = Field(gt=0, le=1)
    source: str


class Baseline(_Strict):
    """A fixed, well-known configuration that ``retrain`` also trains, so the gain is shown.

    ``params`` uses the study file's parameter names with fixed values only, checked against
    the parameter table like the space; anything left out takes the table's default, not
    the study's search range.
    """
    description: str
    params: dict[str, Union[Scalar, list[Scalar]]] = {}
    epochs: Optional[int] = Field(None, ge=1)  # default: the tuned model's retrain epochs


class StudyConfig(_Strict):
    name: str
    description: str = ""
    dataset: Literal["mnist", "fashion-mnist"]
    model: Literal["mlp", "cnn"]
    data: DataConfig = DataConfig()
    search: SearchConfig = SearchConfig()
    training: TrainingConfig = TrainingConfig()
    space: dict[str, SpaceEntry]
    reference: Optional[Reference] = None
    baseline: Optional[Baseline] = None
    path: Optional[Path] = None

    @property
    def objective_names(self) -> list[str]:
        return [self.search.metric, *([self.search.second_objective] if self.search.second_objective
                                       else [])]

    @property
    def directions(self) -> list[str]:
        second = ["minimize"] if self.search.second_objective else []
        return [self.search.direction, *second]

    def trial_images(self, images: int) -> int:
        """How many images a trial trains on per epoch, of a dataset of ``images`` training
        images: its split's training part (of ``train_subset``), or ``search_subset`` of it."""
        split = round(min(self.data.train_subset or images, images) * (1 - self.data.val_fraction))
        return min(self.data.search_subset or split, split)

    def search_section(self) -> dict[str, Any]:
        """What shapes the search, normalised (defaults filled in, JSON types): stored on the
        study and its MLflow run, so a changed file can be named key by key.

        With one report per epoch the in-epoch report settings change nothing, and are left
        out: a study begun before they existed keeps its digest."""
        section = self.model_dump(mode="json", exclude=NOT_SEARCH)
        if self.search.reports_per_epoch == 1:
            for key in IN_EPOCH:
                section["search"].pop(key)
        if not self.search.enqueue:  # likewise for studies begun before search.enqueue
            section["search"].pop("enqueue")
        if self.data.search_subset is not None:
            # trials validate on the whole validation split (before, on the subset's share of
            # it): a subset study begun before is another search, not silently continued
            section["data"]["search_subset_validation"] = "whole"
        return {**section, "parameter_table_version": TABLE_VERSION}

    @property
    def hyperband_brackets(self) -> int:
        """The brackets Optuna's HyperbandPruner makes of ``min_resource``…``max_epochs``."""
        s = self.search
        return int(math.floor(math.log(self.training.max_epochs / s.min_resource,
                                        s.reduction_factor))) + 1

    @property
    def digest(self) -> str:
        """A short hash of :meth:`search_section` and the parameter table's version: equal
        for two files that search the same way, however they are written or commented."""
        section = json.dumps(self.search_section(), sort_keys=True)
        return hashlib.sha256(section.encode()).hexdigest()[:16]

    @property
    def report_dir(self) -> Path:
        """Where ``report``, ``retrain`` and ``lr-find`` write this study's files."""
        return Path("reports") / self.name

    @property
    def retrain_epochs(self) -> int | float:
        return self.training.retrain_epochs or self.training.max_epochs


class InvalidStudyFile(StudyFileError):
    """A study file with problems: all of them, each with its key path, value and what is
    allowed (``problems`` for ``mnist-opt check -f json``)."""

    def __init__(self, source: Path | str, problems: list[Problem]):
        self.source, self.problems = str(source), problems
        super().__init__("\n".join(dict.fromkeys(p.line(str(source)) for p in problems)))


# What does not change what a trial is or how the next one is chosen: the budget, the
# bookkeeping, retraining and the texts. Editing these continues a study as the same version.
NOT_SEARCH: dict[str, Any] = {
    "name": True, "path": True, "description": True, "reference": True, "baseline": True,
    "search": {"n_trials", "timeout", "epoch_budget", "trials_per_worker",
               "max_consecutive_failures", "pick_tolerance", "promote"},
    "training": {"retrain_epochs", "backend"}}  # how fast, not what, a study searches

IN_EPOCH = ("report_every", "report_val_images")  # search keys that only matter below 1

_TAGS = {"choice", "range", "fixed", "per-layer"}
_OURS = {"is_int", "name", "path"}  # keys the loader adds; never shown as the user's


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys allowed where an unknown key was found, for the error message."""
    section = {"data": DataConfig, "search": SearchConfig, "training": TrainingConfig,
               "reference": Reference, "baseline": Baseline}
    model = section.get(loc[0]) if len(loc) == 2 else StudyConfig
    return sorted(set(model.model_fields) - _OURS) if model else []


_VALIDATOR_STEP = re.compile(r"function-(after|before|wrap|plain)\[")


def _pydantic_problems(err: ValidationError) -> list[Problem]:
    problems = []
    for e in err.errors():
        # drop pydantic's validator steps ("function-after[_check(), …]"), not a user's key
        # that happens to start with "function-"
        loc = tuple(str(p) for p in e["loc"] if not _VALIDATOR_STEP.match(str(p)))
        shown = ".".join(p for p in loc if p not in _TAGS and not p.startswith(("bool", "int",
                                                                                  "float", "str")))
        msg, value = e["msg"], e.get("input")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            msg = f"unknown field{did_you_mean(loc[-1], allowed)}; allowed: {', '.join(allowed)}"
        elif e["type"] == "literal_error":
            msg += did_you_mean(value, re.findall(r"'([^']*)'", e["ctx"]["expected"]))
        if isinstance(value, dict):  # show the user's keys, not the ones we add
            value = {k: v for k, v in value.items() if k not in _OURS}
        got = "" if e["type"] == "missing" else f" (got {value!r})"
        problems.append(Problem(shown or "(top level)", f"{msg}{got}"))
    return problems


def _model(doc: dict) -> str | None:
    """The document's model family, if it names a known one."""
    model = doc.get("model")
    return model if isinstance(model, str) and model in FAMILIES else None


def _table_problems(doc: dict) -> list[Problem]:
    """What the schema alone cannot say: the space and the baseline's params against the
    parameter table, and search settings that do not go together."""
    model, space, baseline = _model(doc), doc.get("space"), doc.get("baseline")
    search = doc.get("search") if isinstance(doc.get("search"), dict) else {}
    training = doc.get("training") if isinstance(doc.get("training"), dict) else {}
    problems = check_search(search, training)
    smoothing = space.get("label_smoothing") if isinstance(space, dict) else None
    if search.get("metric") == "val_loss" and smoothing not in (None, 0, 0.0):
        problems.append(Problem("space.label_smoothing", "with metric val_loss: the smoothed "
                                "loss has a floor that grows with the smoothing, so trials "
                                "would not compare; use metric val_accuracy or label_smoothing: 0"))
    if model is None:  # the schema reports the model; nothing can be said of its parameters
        return problems
    if isinstance(space, dict):
        problems += check_space(model, space, search.get("sampler", "tpe"))
    if isinstance(baseline, dict) and isinstance(baseline.get("params"), dict):
        problems += check_space(model, baseline["params"], None, "baseline.params", fixed=True)
    return problems


def _key(path: str) -> str:
    """``space.units`` of ``space.units[1].low``: the parameter a problem is about."""
    parts = re.split(r"[.\[]", path)
    return ".".join(parts[:3] if parts[:2] == ["baseline", "params"] else parts[:2])


def _typed(doc: dict) -> dict:
    """The document with each range's ``is_int`` taken from the parameter table."""
    params = table(doc["model"])

    def typed(key: str, spec: Any) -> Any:
        if isinstance(spec, list):
            return [typed(key, item) for item in spec]
        if isinstance(spec, dict) and "choices" not in spec:
            return {**spec, "is_int": params[key].kind == "int"}
        return spec

    return {**doc, "space": {k: typed(k, v) for k, v in doc["space"].items()}}


def validate(doc: dict, source: Path) -> StudyConfig:
    """A study file's document, checked against the schema and the parameter table at once:
    :class:`InvalidStudyFile` lists every problem, or the valid config comes back."""
    problems = _table_problems(doc)
    known = _model(doc) is not None and isinstance(doc.get("space"), dict)
    try:
        # model_validate, not StudyConfig(**doc): YAML keys need not be strings ("?" is {None: None})
        cfg = StudyConfig.model_validate({**(_typed(doc) if known and not problems else doc),
                                          "name": source.stem, "path": source.resolve()})
    except ValidationError as err:  # less what is about a parameter the table already named
        schema = _pydantic_problems(err)
        named = {_key(p.path) for p in problems}
        # an unknown model: its parameters cannot be judged, the model's own error says why
        skip = () if _model(doc) else ("space.", "baseline.params.")
        problems += [p for p in schema if _key(p.path) not in named and not p.path.startswith(skip)]
        problems = problems or schema
    if problems:
        raise InvalidStudyFile(source, problems)
    return cfg


def load_config(path: Path | str) -> StudyConfig:
    """Parse and validate one study file; the study's name is the file's name."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise StudyFileError(f"{path}: cannot read study file ({exc.strerror})") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StudyFileError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise StudyFileError(f"{path}: a study file must be a YAML mapping, got {type(doc).__name__}")
    if "name" in doc or "path" in doc:
        raise StudyFileError(f"{path}: 'name' and 'path' are set from the file; remove them")
    return validate(doc, path)


def studies_dir() -> Path:
    """``$MNIST_OPT_STUDIES``, else ``./studies``, else the studies shipped beside the package."""
    env = os.environ.get("MNIST_OPT_STUDIES")
    if env:
        return Path(env).expanduser().resolve()
    local = Path.cwd() / "studies"
    # the studies shipped beside the package: <repo>/studies, two levels above this file
    return local.resolve() if local.is_dir() else Path(__file__).resolve().parents[2] / "studies"


def known_studies(directory: Path | None = None) -> list[str]:
    directory = directory or studies_dir()
    return sorted(p.stem for p in directory.glob("*.yaml"))


# A new version of a study (`mnist-opt study NAME --new-version`): the same file, its own name.
VERSION = re.compile(r"(?P<base>.+)\.v(?P<number>[0-9]+)")


def find_study(name: str, directory: Path | None = None) -> StudyConfig:
    """A study by name (``studies/NAME.yaml``), by path to a YAML file, or a version of one
    (``NAME.v2``: the file ``studies/NAME.yaml`` searched under the name ``NAME.v2``)."""
    if name.endswith((".yaml", ".yml")) and Path(name).exists():
        return load_config(name)
    directory = directory or studies_dir()
    path, version = directory / f"{name}.yaml", VERSION.fullmatch(name)
    if not path.exists() and version and (directory / f"{version['base']}.yaml").exists():
        return load_config(directory / f"{version['base']}.yaml").model_copy(update={"name": name})
    if not path.exists():
        raise UnknownStudyError(name, known_studies(directory), directory)
    return load_config(path)


_ABSENT = object()


def section_changes(old: Any, new: Any, key: str = "") -> list[str]:
    """``space.units.high: 1024.0 → 2048`` for each key whose value differs between two
    :meth:`StudyConfig.search_section` dicts (``(absent)`` where one has no such key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for k in sorted(set(old) | set(new), key=str)
                for change in section_changes(old.get(k, _ABSENT), new.get(k, _ABSENT),
                                              f"{key}.{k}" if key else str(k))]
    shown = ["(absent)" if v is _ABSENT else json.dumps(v) for v in (old, new)]
    return [] if old == new else [f"{key}: {shown[0]} → {shown[1]}"]


def with_overrides(cfg: StudyConfig, n_trials: int | None = None, timeout: int | None = None,
                   max_epochs: int | None = None, train_subset: int | None = None) -> StudyConfig:
    """A copy of ``cfg`` with the command line's quick-run overrides applied (None = keep)."""
    doc = cfg.model_dump()
    updates = {("search", "n_trials"): n_trials, ("search", "timeout"): timeout,
               ("training", "max_epochs"): max_epochs, ("training", "retrain_epochs"): max_epochs,
               ("data", "train_subset"): train_subset}
    for (section, key), value in updates.items():
        if value is not None:
            doc[section][key] = value
    if max_epochs is not None and doc.get("baseline") and doc["baseline"].get("epochs"):
        doc["baseline"]["epochs"] = max_epochs
    try:  # validated like the file itself: an override cannot slip past a bound
        return StudyConfig.model_validate(doc)
    except ValidationError as err:
        raise InvalidStudyFile(f"{cfg.path} with command-line overrides",
                               _pydantic_problems(err)) from None
