"""Test-set evaluation the way practitioners look at it: confusion matrix, per-class
precision/recall/F1, the misclassified images with their true and predicted labels, and
one-vs-rest precision-recall and ROC curves (with average precision and AUC) from the softmax
probabilities.

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
from sklearn.metrics import (ConfusionMatrixDisplay, PrecisionRecallDisplay,  # noqa: E402
                             RocCurveDisplay, average_precision_score, classification_report,
                             confusion_matrix, precision_recall_curve, roc_auc_score, roc_curve)


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


def one_vs_rest(ev: Evaluation, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class ``k`` against the rest: 1 where the true class is ``k``, and its softmax
    probability as the score, so a ranking metric asks how well ``k``'s images come first."""
    return (ev.y_true == k).astype(np.int64), ev.probs[:, k]


def ranking_scores(ev: Evaluation) -> dict:
    """Per-class one-vs-rest average precision and ROC AUC, then their macro means, laid out
    like sklearn's classification report (class name → numbers, plus ``"macro avg"``).

    Unlike F1 at the argmax these need no threshold: they show whether a class's probability
    ranks its images above the others even where the argmax gets them wrong. A class whose
    one-vs-rest labels are all alike (absent from ``y_true``, or the only one there) has
    neither number: it gets None and stays out of the macro means.
    """
    out: dict = {}
    for k, name in enumerate(ev.class_names):
        y, score = one_vs_rest(ev, k)
        if 0 < y.sum() < len(y):
            ap, auc = float(average_precision_score(y, score)), float(roc_auc_score(y, score))
        else:
            ap = auc = None
        out[name] = {"average_precision": ap, "roc_auc": auc, "support": int(y.sum())}
    defined = [v for v in out.values() if v["average_precision"] is not None]
    if not defined:
        raise ValueError("AP and ROC AUC need at least two classes among the true labels")
    out["macro avg"] = {key: float(np.mean([v[key] for v in defined]))
                        for key in ("average_precision", "roc_auc")}
    out["macro avg"]["support"] = len(ev.y_true)
    return out


def draw_pr_curves(ax: plt.Axes, ev: Evaluation, scores: dict) -> None:
    """scikit-learn's ``PrecisionRecallDisplay``, one curve per class on ``ax``; the legend gives
    each class's AP to four places, since on MNIST two places read 1.00 for every class."""
    for k, name in enumerate(ev.class_names):
        ap = scores[name]["average_precision"]
        if ap is None:
            continue
        precision, recall, _ = precision_recall_curve(*one_vs_rest(ev, k))
        PrecisionRecallDisplay(precision, recall, average_precision=ap, name=name).plot(
            ax=ax, curve_kwargs={"label": f"{name} (AP {ap:.4f})", "linewidth": 1.2})
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)


def draw_roc_curves(ax: plt.Axes, ev: Evaluation, scores: dict) -> None:
    """scikit-learn's ``RocCurveDisplay``, one curve per class on ``ax``, each class's AUC in
    the legend, and the diagonal of a classifier that guesses to read them against."""
    for k, name in enumerate(ev.class_names):
        auc = scores[name]["roc_auc"]
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(*one_vs_rest(ev, k))
        RocCurveDisplay(fpr=fpr, tpr=tpr, roc_auc=auc, name=name).plot(
            ax=ax, curve_kwargs={"label": f"{name} (AUC {auc:.4f})", "linewidth": 1.2})
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="chance (AUC 0.5)")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)


def plot_curves(draw, ev: Evaluation, scores: dict, path: Path, title: str) -> None:
    """All classes' one-vs-rest curves (``draw``: :func:`draw_pr_curves` or
    :func:`draw_roc_curves`) in one PNG, ``title`` above them."""
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    draw(ax, ev, scores)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_evaluation(ev: Evaluation, images: np.ndarray, folder: Path, title: str) -> dict:
    """Confusion matrix, misclassified grid, classification report, and the one-vs-rest PR and
    ROC curves with their AP/AUC numbers (``pr_roc.json``) into ``folder``.

    Returns the summary metrics worth logging (macro F1, errors, the weakest class by F1,
    macro AP and ROC AUC, the class with the lowest AP).
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
    scores = ranking_scores(ev)
    (folder / "pr_roc.json").write_text(json.dumps(scores, indent=2))
    macro = scores["macro avg"]
    plot_curves(draw_pr_curves, ev, scores, folder / "pr_curves.png",
                f"{title}: one-vs-rest precision-recall, macro AP "
                f"{macro['average_precision']:.4f}")
    plot_curves(draw_roc_curves, ev, scores, folder / "roc_curves.png",
                f"{title}: one-vs-rest ROC, macro AUC {macro['roc_auc']:.4f}")
    f1 = {name: report[name]["f1-score"] for name in ev.class_names}
    ap = {name: scores[name]["average_precision"] for name in ev.class_names
          if scores[name]["average_precision"] is not None}
    return {"test_macro_f1": report["macro avg"]["f1-score"], "test_errors": errors,
            "weakest_class": min(f1, key=f1.get), "weakest_f1": min(f1.values()),
            "test_macro_ap": scores["macro avg"]["average_precision"],
            "test_macro_auc": scores["macro avg"]["roc_auc"],
            "lowest_ap_class": min(ap, key=ap.get), "lowest_ap": min(ap.values())}
