"""Study files: YAML in ``studies/``, validated on load.

A study is data. The file names the dataset, the model family, the sampler and pruner and
the ranges of the search space; :mod:`mnist_opt.study.space` turns the ranges into
``trial.suggest_*`` calls. A bad file raises :class:`StudyFileError` naming the file, the
field and what is allowed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_validator, model_validator)

from mnist_opt.errors import StudyFileError

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
    """A numeric range: ``{low, high, log?, step?, grid?}``; ints when low and high are ints."""
    low: float
    high: float
    log: bool = False
    step: Optional[float] = None
    grid: Optional[list[float]] = None  # the values GridSampler tries; required for grid studies
    is_int: bool = False

    @model_validator(mode="before")
    @classmethod
    def _infer_int(cls, value: Any) -> Any:
        if isinstance(value, dict) and "is_int" not in value:
            ints = all(isinstance(value.get(k), int) and not isinstance(value.get(k), bool)
                       for k in ("low", "high"))
            value = {**value, "is_int": ints}
        return value

    @model_validator(mode="after")
    def _check(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log ranges need low > 0")
        if self.log and self.step is not None:
            raise ValueError("a range cannot have both log and step")
        return self


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

MODEL_PARAMS = {
    "mlp": {"n_layers", "units", "dropout", "batch_norm", "activation"},
    "cnn": {"n_blocks", "filters", "kernel_size", "padding", "pooling", "batch_norm", "activation",
            "conv_dropout", "head", "dense_units", "dropout", "convs_per_block", "augment"},
}
TRAINING_PARAMS = {"optimizer", "learning_rate", "batch_size", "lr_schedule", "lr_decay",
                   "weight_decay"}
PER_LAYER = {"units", "dropout", "filters"}  # may be a list: one spec per layer/block


class DataConfig(_Strict):
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 48
    train_subset: Optional[int] = Field(None, ge=100)  # search and retrain
    # Search only (a cheaper fidelity); retrain still trains on train_subset / all images.
    search_subset: Optional[int] = Field(None, ge=100)


class SearchConfig(_Strict):
    sampler: Literal["tpe", "gp", "random", "grid", "qmc", "nsga2"] = "tpe"
    n_startup_trials: int = Field(10, ge=0)
    pruner: Literal["hyperband", "median", "none"] = "hyperband"
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)
    n_warmup_steps: int = Field(1, ge=0)
    direction: Literal["maximize", "minimize"] = "maximize"
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    n_trials: int = Field(20, ge=1)
    timeout: Optional[int] = Field(None, ge=1)
    seed: int = 48
    # With --workers, a worker process is replaced after this many trials: TensorFlow keeps
    # ~15 MB of traced graph per model even after clear_session (tf-keras#286), and a fresh
    # process is the one cure that works.
    trials_per_worker: int = Field(6, ge=1)
    # A study whose trials keep failing stops instead of burning its budget (keras-tuner's
    # max_consecutive_failed_trials, also 3): failed trials in a row, in completion order.
    max_consecutive_failures: int = Field(3, ge=1)
    # A second objective, minimised beside `metric`: the study keeps a Pareto front, and
    # retrain picks the smallest/fastest model within pick_tolerance of the best accuracy.
    second_objective: Optional[Literal["n_params", "latency_ms"]] = None
    pick_tolerance: float = Field(0.005, ge=0, le=1)


class TrainingConfig(_Strict):
    max_epochs: int = Field(10, ge=1)
    retrain_epochs: Optional[int] = Field(None, ge=1)


class Reference(_Strict):
    """A published result this study should beat (shown next to ours by ``mnist-opt results``)."""
    test_accuracy: float = Field(gt=0, le=1)
    source: str


class Baseline(_Strict):
    """A fixed, well-known configuration that ``retrain`` also trains, so the gain is shown.

    ``params`` uses the study file's parameter names with fixed values only; anything left
    out takes mnist_opt's default (``space.DEFAULTS``), not the study's search range.
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
    digest: str = ""

    @field_validator("space")
    @classmethod
    def _known_params(cls, space: dict, info) -> dict:
        allowed = MODEL_PARAMS[info.data["model"]] | TRAINING_PARAMS if "model" in info.data else None
        if allowed is None:
            return space
        for key, spec in space.items():
            if key not in allowed:
                raise ValueError(f"unknown parameter {key!r} for model "
                                 f"{info.data['model']!r}; allowed: {', '.join(sorted(allowed))}")
            if isinstance(spec, list) and key not in PER_LAYER:
                raise ValueError(f"{key!r} cannot be a per-layer list; only {sorted(PER_LAYER)} can")
        return space

    @field_validator("baseline")
    @classmethod
    def _baseline_params(cls, baseline: Optional[Baseline], info) -> Optional[Baseline]:
        if baseline is not None and "space" in info.data:
            cls._known_params(baseline.params, info)
        return baseline

    @model_validator(mode="after")
    def _two_objectives_need_no_pruner(self) -> "StudyConfig":
        if self.search.second_objective and self.search.pruner != "none":
            raise ValueError(f"search.pruner: Optuna's pruners work with one objective only; "
                             f"set 'pruner: none' for second_objective "
                             f"{self.search.second_objective!r} (got {self.search.pruner!r})")
        return self

    @property
    def objective_names(self) -> list[str]:
        return [self.search.metric, *([self.search.second_objective] if self.search.second_objective
                                       else [])]

    @property
    def directions(self) -> list[str]:
        second = ["minimize"] if self.search.second_objective else []
        return [self.search.direction, *second]

    @model_validator(mode="after")
    def _grid_needs_values(self) -> "StudyConfig":
        if self.search.sampler != "grid":
            return self
        for key, spec in self.space.items():
            for item in spec if isinstance(spec, list) else [spec]:
                if isinstance(item, Range) and item.grid is None and not (item.is_int and item.step):
                    raise ValueError(f"space.{key}: the grid sampler needs 'grid: [values]' "
                                     "for float ranges (or an int range with step)")
        return self

    @property
    def search_subset(self) -> int | None:
        """The training images a trial draws from: the smaller of the two subsets."""
        sizes = [n for n in (self.data.train_subset, self.data.search_subset) if n]
        return min(sizes) if sizes else None

    @property
    def report_dir(self) -> Path:
        """Where ``report``, ``retrain`` and ``lr-find`` write this study's files."""
        return Path("reports") / self.name

    @property
    def retrain_epochs(self) -> int:
        return self.training.retrain_epochs or self.training.max_epochs


_TAGS = {"choice", "range", "fixed", "per-layer"}


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys allowed where an unknown key was found, for the error message."""
    if loc and loc[0] == "space":
        return sorted(Choice.model_fields if "choice" in loc else set(Range.model_fields) - {"is_int"})
    section = {"data": DataConfig, "search": SearchConfig, "training": TrainingConfig,
               "reference": Reference, "baseline": Baseline}
    model = section.get(loc[0]) if len(loc) == 2 else StudyConfig
    return sorted(set(model.model_fields) - {"name", "path", "digest"}) if model else []


def _format_errors(path: Path | str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        shown = ".".join(p for p in loc if p not in _TAGS and not p.startswith(("bool", "int",
                                                                                  "float", "str")))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown field; allowed: {', '.join(_allowed_keys(loc))}"
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        if isinstance(e.get("input"), dict):  # show the user's keys, not the ones we add
            ours = {"is_int", "name", "path", "digest"}
            got = f" (got {({k: v for k, v in e['input'].items() if k not in ours})!r})"
        lines.append(f"{path}: {shown or '(top level)'}: {msg}{got}")
    return "\n".join(dict.fromkeys(lines))


# Sections that do not change what a search does: editing them keeps the study's digest.
NOT_SEARCH = ("description", "reference", "baseline")


def search_digest(doc: dict) -> str:
    """A short hash of the parts of a study file that shape the search (not comments or
    the baseline), so a study continued after such an edit is not called a changed one."""
    search = {str(k): v for k, v in doc.items() if k not in NOT_SEARCH}
    return hashlib.sha256(json.dumps(search, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    if "name" in doc or "path" in doc or "digest" in doc:
        raise StudyFileError(f"{path}: 'name', 'path' and 'digest' are set from the file; remove them")
    try:
        # model_validate, not StudyConfig(**doc): YAML keys need not be strings ("?" is {None: None})
        return StudyConfig.model_validate({**doc, "name": path.stem, "path": path.resolve(),
                                           "digest": search_digest(doc)})
    except ValidationError as err:
        raise StudyFileError(_format_errors(path, err)) from None


def studies_dir() -> Path:
    """``$MNIST_OPT_STUDIES``, else ``./studies``, else the studies shipped beside the package."""
    env = os.environ.get("MNIST_OPT_STUDIES")
    if env:
        return Path(env).expanduser().resolve()
    local = Path.cwd() / "studies"
    return local.resolve() if local.is_dir() else Path(__file__).resolve().parent.parent / "studies"


def known_studies(directory: Path | None = None) -> list[str]:
    directory = directory or studies_dir()
    return sorted(p.stem for p in directory.glob("*.yaml"))


def find_study(name: str, directory: Path | None = None) -> StudyConfig:
    """A study by name (``studies/NAME.yaml``) or by path to a YAML file."""
    if name.endswith((".yaml", ".yml")) and Path(name).exists():
        return load_config(name)
    directory = directory or studies_dir()
    path = directory / f"{name}.yaml"
    if not path.exists():
        raise UnknownStudyError(name, known_studies(directory), directory)
    return load_config(path)


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
        raise StudyFileError(_format_errors(f"{cfg.path} with command-line overrides", err)) from None
