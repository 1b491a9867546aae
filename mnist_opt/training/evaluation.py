"""Test-set evaluation the way practitioners look at it: confusion matrix, per-class
precision/recall/F1, and the misclassified images with their true and predicted labels.

Pictures are matplotlib PNGs (no browser needed); the numbers also go out as JSON so a
script can compare runs without reading images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import (ConfusionMatrixDisplay, classification_report,  # noqa: E402
                             confusion_matrix)


@dataclass
class Evaluation:
    """Predictions on the test set and what they add up to."""
    y_true: np.ndarray
    probs: np.ndarray  # (n, classes) softmax outputs
    class_names: list[str]

    @property
    def y_pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def accuracy(self) -> float:
        return float((self.y_pred == self.y_true).mean())

    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.y_true, self.y_pred, labels=range(len(self.class_names)))

    def report(self) -> dict:
        """sklearn's classification report: per class and macro/weighted precision, recall, F1."""
        return classification_report(self.y_true, self.y_pred, labels=range(len(self.class_names)),
                                     target_names=self.class_names, output_dict=True,
                                     zero_division=0)

    def report_text(self) -> str:
        return classification_report(self.y_true, self.y_pred, digits=4, zero_division=0,
                                     labels=range(len(self.class_names)),
                                     target_names=self.class_names)


def predict_probs(model, x: np.ndarray, batch: int = 2048) -> np.ndarray:
    """Softmax outputs in batches by direct calls (``model.predict`` traces a new function)."""
    return np.concatenate([np.asarray(model(x[i:i + batch], training=False))
                           for i in range(0, len(x), batch)])


def plot_confusion(ev: Evaluation, path: Path, title: str) -> None:
    """scikit-learn's ``ConfusionMatrixDisplay``: counts, true classes down, predicted across."""
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    ConfusionMatrixDisplay(ev.confusion(), display_labels=ev.class_names).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d", text_kw={"fontsize": 8})
    # Fashion-MNIST's names ("Ankle boot", "T-shirt/top") overlap unless slanted, ending at the tick
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}: test accuracy {ev.accuracy:.2%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_misclassified(ev: Evaluation, images: np.ndarray, path: Path, limit: int = 36) -> int:
    """A grid of the most confidently wrong test images; returns how many errors there are."""
    wrong = np.flatnonzero(ev.y_pred != ev.y_true)
    shown = wrong[np.argsort(-ev.probs[wrong].max(axis=1))][:limit]
    cols = 6
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.7, rows * 1.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown):
        ax.imshow(images[i].squeeze(), cmap="gray_r")
        ax.set_title(f"true {ev.class_names[ev.y_true[i]]}\npred {ev.class_names[ev.y_pred[i]]} "
                     f"({ev.probs[i].max():.2f})", fontsize=7, color="darkred")
    fig.suptitle(f"{len(wrong)} of {len(ev.y_true)} test images misclassified "
                 f"(the {len(shown)} most confident shown)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(wrong)


def write_evaluation(ev: Evaluation, images: np.ndarray, folder: Path, title: str) -> dict:
    """Confusion matrix, misclassified grid and classification report into ``folder``.

    Returns the summary metrics worth logging (macro F1, errors, the weakest class).
    """
    folder.mkdir(parents=True, exist_ok=True)
    plot_confusion(ev, folder / "confusion_matrix.png", title)
    errors = plot_misclassified(ev, images, folder / "misclassified.png")
    report = ev.report()
    (folder / "classification_report.json").write_text(json.dumps(report, indent=2))
    (folder / "classification_report.txt").write_text(ev.report_text())
    cm = ev.confusion()
    (folder / "confusion_matrix.json").write_text(json.dumps(
        {"labels": ev.class_names, "rows_true_cols_predicted": cm.tolist()}))
    f1 = {name: report[name]["f1-score"] for name in ev.class_names}
    return {"test_macro_f1": report["macro avg"]["f1-score"], "test_errors": errors,
            "weakest_class": min(f1, key=f1.get), "weakest_f1": min(f1.values())}
