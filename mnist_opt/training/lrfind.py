"""The learning-rate range test (Smith 2017, fastai's ``lr_find``) and a search range from it.

One short run raises the learning rate exponentially, batch by batch, from ``min_lr`` towards
``max_lr`` and records the loss; it stops once the loss diverges. The curve says where
training is too slow (flat left part), where it learns (the descent) and where it blows up
(the right end), so a study's ``learning_rate`` range can be set from one cheap measurement
instead of a guessed six decades.

Suggestion rule (:func:`suggest`), on the smoothed curve:

* ``max`` = the learning rate at the minimum smoothed loss / 10 — fastai's ``minimum``
  suggestion (Howard & Gugger, *Deep Learning for Coders*, ch. 5: "one order of magnitude
  less than where the minimum loss was achieved"); the lowest point itself is already at the
  edge of divergence, and the smoothing lags behind the raw loss.
* ``min`` = ``max`` / 100: the search samples learning rates log-uniformly, so two decades
  below the stable maximum cover the steepest-descent point (Smith's and fastai's other
  choice, printed for reference) and the smaller rates a decaying schedule ends at.

Both are clamped to ``[min_lr, max_lr]`` (nothing outside was measured) and rounded to two
significant digits. The defaults sweep 1e-6 → 10 (fastai: 1e-7 → 10): Adam with batch norm on
MNIST often still trains at 1. Past the edge the MNIST loss tends to level off near ln 10
rather than explode, so the 4× stop may not fire; the rule does not depend on it.
"""
from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import math
import os
import socket
import warnings
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Callable

import keras
import matplotlib
import mlflow
import numpy as np
import optuna
from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.util import load_yaml_guess_indent

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402

from mnist_opt import interrupt  # noqa: E402
from mnist_opt.tracking import runs as tracking  # noqa: E402
from mnist_opt.study.config import Choice, Range, StudyConfig, load_config  # noqa: E402
from mnist_opt.errors import MnistOptError, RetrainError, StudyFileError  # noqa: E402
from mnist_opt.study.objectives import pick  # noqa: E402
from mnist_opt.study.params import table  # noqa: E402
from mnist_opt.study.space import MidpointTrial, suggest_params  # noqa: E402
from mnist_opt.tracking.storage import load_existing  # noqa: E402
from mnist_opt.training.loop import (classes_of, compile_model, fresh_model,  # noqa: E402
                                     make_dataset, study_split)
from mnist_opt.tracking.urls import sqlite_path  # noqa: E402

BETA = 0.98  # EMA of the loss, bias-corrected (fastai, Smith)
STOP_FACTOR = 4.0  # stop once the smoothed loss exceeds 4× its best: diverged
MAX_DIVISOR, DECADES = 10.0, 2  # the rule: max = lr at min loss / 10, min = max / 10**2
FEW_BATCHES = 50  # fewer points than this give a coarse curve: say so
RULE = ("max = LR of the lowest smoothed loss / 10 (fastai's 'minimum' suggestion), "
        "min = max / 100")


class LrFindError(MnistOptError):
    """The range test gave no usable curve (too short, or lowest at its very start)."""


# --- which configuration to test ------------------------------------------------------------

def midpoint_values(cfg: StudyConfig) -> dict[str, Any]:
    """The middle of every searched parameter (per-layer ones from each layer's spec, for
    the middle depth): values for an ``optuna.trial.FixedTrial``."""
    return suggest_params(MidpointTrial(), cfg)


def stored_study(cfg: StudyConfig, storage: str) -> optuna.Study | None:
    """The study in ``storage`` if there is one (never creates a SQLite file by looking)."""
    path = sqlite_path(storage)
    if path is not None and not path.exists():
        return None
    try:
        return load_existing(cfg.name, storage)
    except RetrainError:
        return None


def tested_params(cfg: StudyConfig, study: optuna.Study | None
                  ) -> tuple[dict[str, Any], str, int | None]:
    """The full params to test, where they came from, and the best trial's number if used.

    ``lr_schedule`` is forced to "none": a decay would fight the sweep.
    """
    best = None
    if study is not None:
        with contextlib.suppress(ValueError):  # no completed trial yet
            best = pick(study, cfg.search.pick_tolerance)
    params = _fixed(best.params, cfg) if best is not None else None
    if params is not None:
        source, number = f"config of best trial {best.number}", best.number
    else:
        why = ("best trial does not fit the current space" if best else
               "no completed trial in storage")
        params, number = _fixed(midpoint_values(cfg), cfg), None
        source = f"midpoint config of the space ({why})"
    params["lr_schedule"] = "none"
    for p in table(cfg.model).values():  # the schedule's own parameters go with it
        if p.when and p.when[0] == "lr_schedule":
            params.pop(p.name, None)
    return params, source, number


def _fixed(values: dict[str, Any], cfg: StudyConfig) -> dict[str, Any] | None:
    """``suggest_params`` on fixed values; None when they miss a parameter of the space."""
    # Out-of-range warnings are noise here: the learning rate is swept anyway, and a best
    # trial may predate an --apply that narrowed the range.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return suggest_params(optuna.trial.FixedTrial(values), cfg)
        except ValueError:
            return None


# --- the range test -------------------------------------------------------------------------

@dataclass
class Curve:
    """One point per batch: the learning rate used, the batch's loss and the smoothed loss."""
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    diverged: bool = False


class RangeTest(keras.callbacks.Callback):
    """Sets the learning rate before each batch and records that batch's loss.

    Keras 3 hands ``on_train_batch_end`` the epoch's running mean of the loss, not the
    batch's: the batch loss is recovered as ``k·mean_k − (k−1)·mean_{k−1}``.
    """

    def __init__(self, schedule: np.ndarray, beta: float = BETA, stop_factor: float = STOP_FACTOR):
        super().__init__()
        self.schedule, self.beta, self.stop_factor = schedule, beta, stop_factor
        self.curve = Curve()
        self._mean = self._avg = 0.0
        self._best = math.inf

    def on_train_begin(self, logs: dict | None = None) -> None:
        interrupt.watch(self.model)

    def on_train_end(self, logs: dict | None = None) -> None:
        interrupt.watch(None)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.model.optimizer.learning_rate.assign(float(self.schedule[batch]))

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        mean = float((logs or {})["loss"])
        loss = (batch + 1) * mean - batch * self._mean
        self._mean = mean
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smooth = self._avg / (1 - self.beta ** (batch + 1))
        self.curve.lrs.append(float(self.schedule[batch]))
        self.curve.losses.append(loss)
        self.curve.smoothed.append(smooth)
        if not math.isfinite(smooth) or smooth > self.stop_factor * self._best:
            self.curve.diverged = True
            self.model.stop_training = True
        self._best = min(self._best, smooth)


def lr_schedule(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
    """``steps`` learning rates from ``min_lr`` to ``max_lr``, a constant factor apart."""
    return min_lr * (max_lr / min_lr) ** (np.arange(steps) / max(1, steps - 1))


def range_test(params: dict[str, Any], x: np.ndarray, y: np.ndarray, min_lr: float,
               max_lr: float, steps: int, seed: int) -> Curve:
    """Train a fresh model for ``steps`` batches (at most one epoch) under the rising LR."""
    model = fresh_model(params, seed)
    compile_model(model, params, len(y), steps_per_execution=1)  # every batch seen
    test = RangeTest(lr_schedule(min_lr, max_lr, steps))
    ds = make_dataset(x, y, batch_size=params["batch_size"], shuffle_seed=seed,
                      classes=classes_of(model)).take(steps)  # one-hot under label smoothing
    model.fit(ds, epochs=1, callbacks=[test], verbose=0, shuffle=False)
    interrupt.check()
    return test.curve


# --- the suggestion -------------------------------------------------------------------------

@dataclass
class Suggestion:
    low: float
    high: float
    lr_min_loss: float
    lr_steep: float
    notes: list[str] = field(default_factory=list)


def _two_digits(value: float) -> float:
    return float(f"{value:.1e}")


def suggest(lrs: list[float], smoothed: list[float], min_lr: float, max_lr: float) -> Suggestion:
    """The rule of the module docstring on a smoothed loss curve (finite points only).

    The steepest point is the most negative d loss / d log lr before the minimum, skipping
    the first tenth of the curve, where the bias-corrected average is still mostly noise.
    """
    lr, loss = np.asarray(lrs, float), np.asarray(smoothed, float)
    keep = np.isfinite(loss)
    lr, loss = lr[keep], loss[keep]
    if len(loss) < 5:
        raise LrFindError(f"only {len(loss)} finite loss values: too few for a curve; use more "
                          "training images or a higher --steps")
    i_min = int(np.argmin(loss))
    start = min(max(1, len(loss) // 10), i_min)
    slopes = np.gradient(loss, np.log10(lr))
    i_steep = start + int(np.argmin(slopes[start:i_min + 1]))
    high = _two_digits(min(max(lr[i_min] / MAX_DIVISOR, min_lr), max_lr))
    low = _two_digits(max(high / 10 ** DECADES, min_lr))
    if low >= high:
        raise LrFindError(f"the loss was lowest at lr {lr[i_min]:.1e}, near the sweep's start "
                          f"({min_lr:.0e}): already too high there; rerun with a smaller --min-lr")
    notes = []
    if i_min >= len(loss) - max(2, len(loss) // 20):
        notes.append(f"the loss was still falling at the sweep's end (lr {lr[-1]:.1e}): a higher "
                     "--max-lr would show where it turns up")
    if low == _two_digits(min_lr):
        notes.append(f"the range's low end is --min-lr ({min_lr:.0e}); a smaller --min-lr would "
                     "show the curve below it")
    return Suggestion(low, high, float(lr[i_min]), float(lr[i_steep]), notes)


# --- outputs --------------------------------------------------------------------------------

def plot(curve: Curve, sug: Suggestion, path: Path, title: str) -> Path:
    """Loss vs learning rate (log x): raw and smoothed, the suggested range shaded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lr, raw, smooth = (np.asarray(v, float) for v in (curve.lrs, curve.losses, curve.smoothed))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lr, raw, color="0.7", lw=0.8, label="batch loss")
    ax.plot(lr, smooth, color="C0", lw=2, label=f"smoothed (EMA β={BETA})")
    ax.axvspan(sug.low, sug.high, color="C2", alpha=0.15)
    for x, style, label in ((sug.low, "--", f"suggested min {sug.low:.1e}"),
                            (sug.high, "-", f"suggested max {sug.high:.1e}")):
        ax.axvline(x, color="C2", ls=style, label=label)
    ax.axvline(sug.lr_min_loss, color="C3", ls=":",
               label=f"lowest smoothed loss {sug.lr_min_loss:.1e}")
    ax.set_xscale("log")
    finite = smooth[np.isfinite(smooth)]
    if len(finite):  # a diverged batch (loss 1e3) would squash the interesting part
        top = max(finite[0], min(finite.max(), 1.25 * STOP_FACTOR * finite.min()))
        ax.set_ylim(0, 1.1 * top)
    ax.set(xlabel="learning rate", ylabel="training loss", title=title)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_csv(curve: Curve, path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["batch", "lr", "loss", "smoothed_loss"])
        for i, row in enumerate(zip(curve.lrs, curve.losses, curve.smoothed)):
            out.writerow([i, *(f"{v:.6g}" for v in row)])
    return path


def log_run(cfg: StudyConfig, experiment: str, params: dict[str, Any], extra: dict[str, Any],
            sug: Suggestion, files: list[Path], source_trial: int | None) -> str:
    """One MLflow run, kind ``lr-find``, beside the study's runs; returns its id."""
    tags = {"mnist_opt.kind": "lr-find", "optuna.study_name": cfg.name,
            "mnist_opt.config_digest": cfg.digest, "mnist_opt.host": socket.gethostname(),
            "mnist_opt.pid": str(os.getpid())}
    if source_trial is not None:
        tags["source_trial"] = str(source_trial)
    tested = _tested(params)
    with mlflow.start_run(experiment_id=experiment, run_name="lr-find", tags=tags) as run:
        mlflow.log_params({**tested, **extra})
        mlflow.log_metrics({"suggested_lr_min": sug.low, "suggested_lr_max": sug.high,
                            "lr_min_loss": sug.lr_min_loss, "lr_steep": sug.lr_steep})
        for path in files:
            mlflow.log_artifact(str(path))
    return run.info.run_id


def _tested(params: dict[str, Any]) -> dict[str, Any]:
    """The params that shaped the test: not ``learning_rate``, which the sweep replaces."""
    return {k: v for k, v in params.items() if k != "learning_rate"}


# --- --apply: rewrite the study file's learning_rate bounds ---------------------------------

def check_appliable(cfg: StudyConfig) -> None:
    """Refuse --apply before any training when the space has no learning_rate range."""
    spec = cfg.space.get("learning_rate")
    if isinstance(spec, Range) and spec.grid is None:
        _round_trip(cfg.path)  # a file we cannot edit is refused now, not after the test
        return
    what = ("not searched (the default 1e-3 is used)" if spec is None else
            "a range with a grid: edit its grid values by hand" if isinstance(spec, Range) else
            f"a list of choices {spec.choices}" if isinstance(spec, Choice) else
            f"fixed at {spec!r}")
    raise StudyFileError(f"{cfg.path}: space.learning_rate is {what}; --apply rewrites the bounds "
                         "of a range like {low: 1.0e-4, high: 1.0e-1, log: true}. Make it one, "
                         "or run without --apply")


# How a study file may indent (mapping, block sequence, dash offset): the guess from
# ruamel.yaml.util first, then the common layouts; the first that writes the file back unchanged.
_LAYOUTS = ((2, 2, 0), (2, 4, 2), (4, 4, 0), (4, 6, 2))


def _round_trip(path: Path | None) -> tuple[str, YAML, Any]:
    """The study file's text, a ruamel.yaml round-trip instance that writes it back byte for
    byte (comments, key order, flow or block style, quotes, indentation), and the loaded document.

    A file that no such instance reproduces is refused, never reformatted.
    """
    if path is None:
        raise StudyFileError("this study has no file to apply the range to")
    text = path.read_text()
    yaml = YAML()  # typ "rt": the round-trip loader and dumper
    yaml.preserve_quotes = True
    yaml.width = 1 << 16  # never fold a long flow mapping onto two lines
    try:
        doc, indent, dash = load_yaml_guess_indent(text, yaml=yaml)
    except YAMLError as exc:
        raise StudyFileError(f"{path}: not valid YAML: {exc}") from None
    _bounds(doc, path)
    first = None
    for explicit_start in (False, True):  # a leading "---"
        for mapping, sequence, offset in ((indent or 2, indent or 2, dash or 0), *_LAYOUTS):
            yaml.explicit_start = explicit_start
            yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
            again = _dump(yaml, doc, text)
            if again == text:
                return text, yaml, doc
            first = first or again
    was, now = next(((a, b) for a, b in zip_longest(text.splitlines(), first.splitlines(),
                                                    fillvalue="") if a != b), (text, first))
    raise StudyFileError(f"{path}: ruamel.yaml would also rewrite {was!r} as {now!r}; edit the "
                         "learning_rate bounds by hand")


def _dump(yaml: YAML, doc: Any, like: str) -> str:
    """The document as text, ending like ``like`` (ruamel always ends with a newline)."""
    out = io.StringIO()
    yaml.dump(doc, out)
    text = out.getvalue()
    return text if like.endswith("\n") else text.removesuffix("\n")


def _bounds(doc: Any, path: Path) -> Any:
    """The mapping under ``space: learning_rate:`` that holds ``low`` and ``high``."""
    space = doc.get("space") if isinstance(doc, dict) else None
    spec = space.get("learning_rate") if isinstance(space, dict) else None
    if not (isinstance(spec, dict) and "low" in spec and "high" in spec):
        raise StudyFileError(f"{path}: space.learning_rate is not a mapping with low: and high:; "
                             "edit the bounds by hand")
    return spec


def yaml_float(value: float) -> str:
    """``3.2e-5``, the way the shipped studies write floats: PyYAML (YAML 1.1), which reads the
    study files, sees a float only with a dot and a signed exponent. ruamel.yaml (YAML 1.2) would
    write a plain ``1e-05`` for 1e-5, which PyYAML reads as the *string* "1e-05"."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent):+d}"


def _changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    """The lines ``after`` removed from ``before`` and the lines it added, in file order."""
    diff = list(difflib.ndiff(before.splitlines(), after.splitlines()))
    return ([line[2:] for line in diff if line.startswith("- ")],
            [line[2:] for line in diff if line.startswith("+ ")])


def apply_range(path: Path, low: float, high: float) -> tuple[list[str], list[str]]:
    """Set ``space.learning_rate.low/high`` in the study file, nothing else: a ruamel.yaml
    round trip keeps its comments, key order and layout. Re-validates the result and restores
    the file on failure. Returns the old and the new lines."""
    original, yaml, doc = _round_trip(path)
    bounds = _bounds(doc, path)
    for key, value in (("low", low), ("high", high)):
        # ruamel keeps the spelling of a float it parsed: parse ours, so it writes 2.5e-5
        bounds[key] = YAML().load(yaml_float(value))
    edited = _dump(yaml, doc, original)
    path.write_text(edited)
    try:
        spec = load_config(path).space["learning_rate"]
        if not (isinstance(spec, Range) and math.isclose(spec.low, low)
                and math.isclose(spec.high, high)):
            raise StudyFileError(f"{path}: the rewritten learning_rate reads back as {spec!r}")
    except StudyFileError as exc:
        path.write_text(original)
        raise StudyFileError(f"{exc}\n{path}: --apply left the file as it was") from None
    return _changed_lines(original, edited)


# --- the command ----------------------------------------------------------------------------

@dataclass
class LrFindResult:
    curve: Curve
    suggestion: Suggestion
    source: str
    plot: Path
    run_id: str
    applied: tuple[list[str], list[str]] | None = None
    study_trials: int = 0  # trials of this study already in storage (for the digest hint)


def run(cfg: StudyConfig, storage: str, min_lr: float = 1e-6, max_lr: float = 10.0,
        steps: int = 300, apply: bool = False, out: Callable[[str], None] = print) -> LrFindResult:
    """Run the range test on the study's training split, log it, optionally apply the range."""
    if not 0 < min_lr < max_lr:
        raise StudyFileError(f"need 0 < --min-lr < --max-lr, got {min_lr:g} and {max_lr:g}")
    if steps < 10:
        raise StudyFileError(f"--steps must be at least 10, got {steps}")
    if apply:
        check_appliable(cfg)  # before any training
    study = stored_study(cfg, storage)
    params, source, trial = tested_params(cfg, study)
    experiment = tracking.open_experiment(cfg.name)  # a bad tracking store fails before training
    split = study_split(cfg)
    n, batch = len(split.y_train), params["batch_size"]
    epoch = -(-n // batch)
    steps = min(steps, epoch)
    out(f"lr-find {cfg.name}: {params['optimizer']}, {source}, lr_schedule none, {steps} batches "
        f"of {batch} on {n} images, lr {min_lr:g} → {max_lr:g}")
    out(f"tested params: {json.dumps(_tested(params))}")
    curve = range_test(params, split.x_train, split.y_train, min_lr, max_lr, steps, cfg.search.seed)
    sug = suggest(curve.lrs, curve.smoothed, min_lr, max_lr)
    if steps < FEW_BATCHES:
        more = ("more training images" if steps == epoch else "a higher --steps")
        sug.notes.append(f"only {steps} batches: a coarse curve; {more} would give a finer one")
    folder = cfg.report_dir
    png = plot(curve, sug, folder / "lr_find.png",
               f"{cfg.name}: LR range test, {params['optimizer']}, batch {batch}")
    table = write_csv(curve, folder / "lr_find.csv")
    extra = {"lr_find.min_lr": min_lr, "lr_find.max_lr": max_lr, "lr_find.batches": len(curve.lrs),
             "lr_find.diverged": curve.diverged, "lr_find.source": source, "n_train": n}
    run_id = log_run(cfg, experiment, params, extra, sug, [png, table], trial)
    result = LrFindResult(curve, sug, source, png, run_id,
                          study_trials=len(study.trials) if study is not None else 0)
    if apply:
        result.applied = apply_range(cfg.path, sug.low, sug.high)
    return result
