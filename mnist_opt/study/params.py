"""The parameter table: every hyperparameter a study file may name, declared once.

Each :class:`Param` says which model family it belongs to, its kind, the values the model
builders and the optimizer factory accept, its default, whether it may differ per layer and
when it exists at all. Everything else is derived from this table: the study-file checks
(:mod:`mnist_opt.study.checks`), the ``trial.suggest_*`` calls, the grid, the baseline's
defaults (:mod:`mnist_opt.study.space`), the JSON Schema and the parameter list of
``mnist-opt list --params`` and the README. Adding a parameter is one entry here plus the
builder line that uses it.

``TABLE_VERSION`` is part of every study's digest: raise it when an entry's meaning changes
(a new default, a new condition), so studies begun under the old meaning are detected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal

TABLE_VERSION = 2

Kind = Literal["int", "float", "bool", "choice"]


@dataclass(frozen=True)
class Family:
    """A model family: the parameter that sets its depth and the suffix of per-layer names."""
    depth: str
    suffix: str  # units_l0, units_l1, … or filters_b0, …


FAMILIES = {"mlp": Family("n_layers", "l"), "cnn": Family("n_blocks", "b")}
TRAINING = "training"  # the family of parameters every model has

# Hidden-layer activations: every name keras.activations.get() accepts, except these
# (tests/test_params.py keeps both lists in step with the installed Keras).
ACTIVATIONS = ("relu", "relu6", "elu", "selu", "gelu", "silu", "swish", "leaky_relu", "mish",
               "celu", "tanh", "sigmoid", "hard_sigmoid", "hard_silu", "hard_swish", "hard_tanh",
               "softplus", "softsign", "log_sigmoid", "sparse_plus", "sparse_sigmoid",
               "squareplus", "tanh_shrink", "soft_shrink", "hard_shrink", "exponential", "linear")
EXCLUDED_ACTIVATIONS = {
    "softmax": "normalises across the layer's units: an output activation",
    "log_softmax": "normalises across the layer's units: an output activation",
    "sparsemax": "normalises across the layer's units: an output activation",
    "glu": "halves the layer's width, so 'units' would not be the width",
    "threshold": "needs arguments (threshold, default_value) a name cannot give",
}
# training.loop.OPTIMIZERS builds exactly these
OPTIMIZERS = ("adam", "sgd", "adamw", "sgdw", "rmsprop")


@dataclass(frozen=True)
class Param:
    name: str
    families: tuple[str, ...]
    kind: Kind
    default: Any
    help: str
    low: float | None = None  # inclusive bounds of what the builders accept (int, float)
    high: float | None = None
    choices: tuple = ()  # the accepted values (choice)
    per_layer: bool = False  # may be a list: one spec per layer / block
    when: tuple[str, tuple] | None = None  # exists only while `when[0]` is one of `when[1]`

    @property
    def allowed(self) -> str:
        """What the builders accept, in words (error messages, the README table)."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return ", ".join(map(str, self.choices))
        return f"{'an integer' if self.kind == 'int' else 'a number'} in [{self.low:g}, {self.high:g}]"

    def accepts(self, value: Any) -> bool:
        """Whether the builders take ``value`` as this parameter's (fixed) value."""
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        return self.low <= value <= self.high


MLP, CNN, BOTH = ("mlp",), ("cnn",), ("mlp", "cnn")
RATE = dict(kind="float", low=0.0, high=0.95)

PARAMS: tuple[Param, ...] = (
    # the MLP
    Param("n_layers", MLP, "int", 2, "hidden dense layers", low=1, high=8),
    Param("units", MLP, "int", 128, "units of dense layer i (units_l{i})", low=1, high=4096,
          per_layer=True),
    Param("dropout", MLP, default=0.0, help="dropout after dense layer i (dropout_l{i})",
          per_layer=True, **RATE),
    # the CNN
    Param("n_blocks", CNN, "int", 2, "convolution blocks", low=1, high=5),
    Param("filters", CNN, "int", 32, "filters of block i (filters_b{i})", low=1, high=1024,
          per_layer=True),
    Param("convs_per_block", CNN, "int", 1, "convolutions per block", low=1, high=4),
    Param("kernel_size", CNN, "int", 3, "square kernel side", low=1, high=7),
    Param("padding", CNN, "choice", "same", "convolution padding", choices=("same", "valid")),
    Param("pooling", CNN, "choice", "max", "2×2 pooling after each block",
          choices=("max", "avg", "none")),
    Param("conv_dropout", CNN, default=0.0, help="dropout after each block", **RATE),
    Param("head", CNN, "choice", "dense", "dense layer or global average pooling",
          choices=("dense", "gap")),
    Param("dense_units", CNN, "int", 128, "units of the dense head", low=1, high=4096,
          when=("head", ("dense",))),
    Param("dropout", CNN, default=0.0, help="dropout before the output layer", **RATE),
    Param("augment", CNN, "float", 0.0, "random shift, as a fraction of the image side",
          low=0.0, high=0.5),
    # both families
    Param("batch_norm", BOTH, "bool", False, "batch normalisation before each activation"),
    Param("activation", BOTH, "choice", "relu", "hidden-layer activation (keras.activations)",
          choices=ACTIVATIONS),
    # training
    Param("optimizer", (TRAINING,), "choice", "adam",
          "Adam, SGD with Nesterov momentum, AdamW, SGDW (SGD with decoupled weight decay), "
          "RMSprop (Keras' defaults: the Keras mnist_mlp example's)",
          choices=OPTIMIZERS),
    Param("learning_rate", (TRAINING,), "float", 1e-3, "initial learning rate", low=1e-7,
          high=10.0),
    Param("batch_size", (TRAINING,), "int", 128, "images per training step", low=1, high=65536),
    Param("lr_schedule", (TRAINING,), "choice", "none",
          "learning-rate schedule: per-epoch exponential decay, or per step one-cycle (with "
          "cycled momentum; learning_rate is its peak) or cosine (training.schedules)",
          choices=("none", "exponential", "one_cycle", "cosine")),
    Param("lr_decay", (TRAINING,), "float", 0.9, "factor per epoch", low=0.01, high=1.0,
          when=("lr_schedule", ("exponential",))),
    Param("weight_decay", (TRAINING,), "float", 1e-4, "decoupled weight decay (AdamW, SGDW)",
          low=0.0, high=1.0, when=("optimizer", ("adamw", "sgdw"))),
    # one-cycle (PyTorch's OneCycleLR defaults) and cosine
    Param("warmup_fraction", (TRAINING,), "float", 0.3,
          "share of the steps rising to the peak (PyTorch's pct_start)", low=0.0, high=0.9,
          when=("lr_schedule", ("one_cycle",))),
    Param("div_factor", (TRAINING,), "float", 25.0, "the cycle starts at learning_rate / this",
          low=1.0, high=1e4, when=("lr_schedule", ("one_cycle",))),
    Param("final_div", (TRAINING,), "float", 1e4, "and ends at its start / this", low=1.0,
          high=1e6, when=("lr_schedule", ("one_cycle",))),
    Param("momentum_high", (TRAINING,), "float", 0.95,
          "momentum (SGD) or β1 (Adam) at the cycle's ends", low=0.5, high=0.999,
          when=("lr_schedule", ("one_cycle",))),
    Param("momentum_low", (TRAINING,), "float", 0.85,
          "… and at the learning-rate peak (the lower of the two is)", low=0.5, high=0.999,
          when=("lr_schedule", ("one_cycle",))),
    Param("cosine_warmup", (TRAINING,), "float", 0.0,
          "share of the steps warming up linearly from 0", low=0.0, high=0.9,
          when=("lr_schedule", ("cosine",))),
    Param("label_smoothing", (TRAINING,), "float", 0.0,
          "label smoothing of the cross-entropy (one-hot targets)", low=0.0, high=0.5),
)


def params_of(model: str) -> Iterator[Param]:
    """The parameters a ``model`` study has, in the order they are suggested: depth,
    per-layer, the family's others, then training (a condition's source comes first)."""
    family = FAMILIES[model]
    mine = [p for p in PARAMS if model in p.families]
    yield next(p for p in mine if p.name == family.depth)
    yield from (p for p in mine if p.per_layer)
    yield from (p for p in mine if p.name != family.depth and not p.per_layer)
    yield from (p for p in PARAMS if TRAINING in p.families)


def table(model: str) -> dict[str, Param]:
    """``{name: Param}`` for one model family (training parameters included)."""
    return {p.name: p for p in params_of(model)}


def layer_name(model: str, name: str, i: int) -> str:
    """The trial parameter of layer/block ``i``: ``units_l0``, ``filters_b2``."""
    return f"{name}_{FAMILIES[model].suffix}{i}"
