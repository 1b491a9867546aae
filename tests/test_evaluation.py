"""Test-set evaluation's precision-recall and ROC curves: AP and AUC per class against hand
computations on a nine-image, three-class table, the pictures and JSON they go out as, and the
lowest-AP class that retrain names. Real scikit-learn and matplotlib; no model, no TensorFlow."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import label_binarize

from mnist_opt.training.evaluation import (Evaluation, draw_pr_curves, draw_roc_curves,
                                           ranking_scores, write_evaluation)

NAMES = ["0", "1", "2"]
# true class, softmax row (each sums to 1). Column 0 ranks class 0's three images above every
# other (perfect); columns 1 and 2 each put one image of another class above one of their own
# and leave another of their own below some negatives, class 2 worse at the top of its ranking.
TABLE = [
    (0, [0.90, 0.05, 0.05]),
    (0, [0.80, 0.05, 0.15]),
    (0, [0.70, 0.20, 0.10]),
    (1, [0.10, 0.80, 0.10]),
    (1, [0.30, 0.60, 0.10]),
    (1, [0.05, 0.35, 0.60]),  # predicted 2
    (2, [0.15, 0.45, 0.40]),  # predicted 1
    (2, [0.10, 0.20, 0.70]),
    (2, [0.25, 0.50, 0.25]),  # predicted 1
]
# By hand. Class 1's column, descending: .80 P, .60 P, .50 N, .45 N, .35 P, .20, .20, .05, .05:
# precision at its positives 1/1, 2/2, 3/5, so AP = (1 + 1 + 0.6) / 3; its positives beat
# 6, 6 and 4 of the 6 negatives: AUC 16/18. Class 2's: .70 P, .60 N, .40 P, .25 P, .15, .10 ×3,
# .05: precisions 1/1, 2/3, 3/4, AP = (1 + 2/3 + 3/4) / 3; pairs won 6 + 5 + 5, AUC 16/18.
AP = {"0": 1.0, "1": 2.6 / 3, "2": (1 + 2 / 3 + 3 / 4) / 3}
AUC = {"0": 1.0, "1": 16 / 18, "2": 16 / 18}


def _evaluation(rows=TABLE, names=NAMES) -> Evaluation:
    return Evaluation(np.array([y for y, _ in rows], dtype=np.int64),
                      np.array([p for _, p in rows]), list(names))


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 28, 28, 1)).astype(np.float32)


def _ap_as_mean_precision(y: np.ndarray, score: np.ndarray) -> float:
    """AP the textbook way (no tied scores): the mean, over the positives in descending score
    order, of the precision among the images ranked at or above each."""
    hits = y[np.argsort(-score, kind="stable")]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits == 1].mean())


def _auc_as_pairs(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the share of (positive, negative) pairs the score orders right, ties half."""
    pos, neg = score[y == 1][:, None], score[y == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_ap_and_auc_match_hand_computation():
    scores = ranking_scores(_evaluation())
    for name in NAMES:
        assert scores[name]["average_precision"] == pytest.approx(AP[name])
        assert scores[name]["roc_auc"] == pytest.approx(AUC[name])
        assert scores[name]["support"] == 3
    assert scores["0"]["average_precision"] == 1.0 and scores["0"]["roc_auc"] == 1.0
    assert scores["macro avg"]["average_precision"] == pytest.approx(np.mean(list(AP.values())))
    assert scores["macro avg"]["roc_auc"] == pytest.approx(np.mean(list(AUC.values())))


def test_ap_and_auc_match_independent_formulas_on_random_probabilities():
    """500 images, 4 classes, continuous scores (no ties): the textbook AP and the pairwise AUC,
    and sklearn's own multi-class macro averages, agree with what ``ranking_scores`` reports."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 500)
    logits = rng.normal(size=(500, 4)) + 1.5 * np.eye(4)[y] * rng.random((500, 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    names = ["a", "b", "c", "d"]
    scores = ranking_scores(Evaluation(y, probs, names))
    for k, name in enumerate(names):
        truth = (y == k).astype(int)
        assert scores[name]["average_precision"] == pytest.approx(
            _ap_as_mean_precision(truth, probs[:, k]))
        assert scores[name]["roc_auc"] == pytest.approx(_auc_as_pairs(truth, probs[:, k]))
    assert scores["macro avg"]["average_precision"] == pytest.approx(
        average_precision_score(label_binarize(y, classes=range(4)), probs, average="macro"))
    assert scores["macro avg"]["roc_auc"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_write_evaluation_writes_curves_json_and_names_lowest_ap_class(tmp_path: Path):
    ev = _evaluation()
    summary = write_evaluation(ev, _images(len(TABLE)), tmp_path / "evaluation", "synthetic")
    folder = tmp_path / "evaluation"
    for png in ("pr_curves.png", "roc_curves.png", "confusion_matrix.png", "misclassified.png"):
        assert (folder / png).stat().st_size > 0
        with Image.open(folder / png) as im:
            assert im.format == "PNG"
            if png in ("pr_curves.png", "roc_curves.png"):
                assert min(im.size) > 300
    saved = json.loads((folder / "pr_roc.json").read_text())
    assert list(saved) == [*NAMES, "macro avg"]
    for name in NAMES:
        assert saved[name]["average_precision"] == pytest.approx(AP[name])
        assert saved[name]["roc_auc"] == pytest.approx(AUC[name])
    assert saved["macro avg"]["average_precision"] == pytest.approx(np.mean(list(AP.values())))
    assert saved["macro avg"]["roc_auc"] == pytest.approx(np.mean(list(AUC.values())))
    # class 2 ties class 1 on AUC but has the worse top of ranking: the lowest AP is its
    assert summary["lowest_ap_class"] == "2"
    assert summary["lowest_ap"] == pytest.approx(AP["2"])
    assert summary["test_macro_ap"] == pytest.approx(saved["macro avg"]["average_precision"])
    assert summary["test_macro_auc"] == pytest.approx(saved["macro avg"]["roc_auc"])
    # what it returned before stays, and every number is a plain float or int MLflow can log
    assert summary["test_errors"] == 3 and summary["weakest_class"] == "2"
    assert all(isinstance(v, (str, int, float)) for v in summary.values())


def test_legends_give_each_class_its_ap_and_auc():
    ev = _evaluation()
    scores = ranking_scores(ev)
    fig, (pr, roc) = plt.subplots(1, 2)
    try:
        draw_pr_curves(pr, ev, scores)
        draw_roc_curves(roc, ev, scores)
        pr_labels = [t.get_text() for t in pr.get_legend().get_texts()]
        roc_labels = [t.get_text() for t in roc.get_legend().get_texts()]
    finally:
        plt.close(fig)
    assert pr_labels == [f"{n} (AP {AP[n]:.4f})" for n in NAMES]
    assert roc_labels == [f"{n} (AUC {AUC[n]:.4f})" for n in NAMES] + ["chance (AUC 0.5)"]


def test_a_class_missing_from_the_test_labels_has_no_ap_and_stays_out_of_the_means(tmp_path):
    """A fourth class no test image belongs to: AP and AUC are undefined for it, so it gets
    null in the JSON, no curve, and neither the macro means nor the lowest-AP class count it."""
    rows = [(y, [*p[:2], p[2] - 0.01, 0.01]) for y, p in TABLE]
    ev = _evaluation(rows, [*NAMES, "3"])
    summary = write_evaluation(ev, _images(len(rows)), tmp_path, "missing class")
    saved = json.loads((tmp_path / "pr_roc.json").read_text())
    assert saved["3"] == {"average_precision": None, "roc_auc": None, "support": 0}
    assert saved["macro avg"]["average_precision"] == pytest.approx(np.mean(list(AP.values())))
    assert summary["lowest_ap_class"] == "2"
    assert (tmp_path / "pr_curves.png").stat().st_size > 0


def test_a_single_class_test_set_is_refused():
    with pytest.raises(ValueError, match="two classes"):
        ranking_scores(_evaluation([(0, [0.9, 0.05, 0.05]), (0, [0.6, 0.3, 0.1])]))
