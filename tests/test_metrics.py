"""Tests of metrics.py: confusion counts and metrics of tiny label/prediction pairs worked out by hand."""

import numpy as np
import pytest

from pspnet_keras import metrics

# Labels and predictions of 3 classes, row by row; 255 and 7 are no class and count nowhere.
LABELS = np.array([
    [0, 0, 1, 1],
    [0, 255, 1, 7],
    [2, 2, 2, 2],
])
PREDICTIONS = np.array([
    [0, 1, 1, 1],
    [0, 2, 2, 0],
    [2, 2, 1, 0],
])
# [label, prediction]: label 0 -> 0, 1, 0; label 1 -> 1, 1, 2; label 2 -> 2, 2, 1, 0.
CONFUSION = [
    [2, 1, 0],
    [0, 2, 1],
    [1, 1, 2],
]


def test_confusion_matrix_counts_labelled_pixels_only():
    confusion = metrics.confusion_matrix(LABELS, PREDICTIONS, 3)
    assert confusion.tolist() == CONFUSION
    assert confusion.sum() == 10


def test_summary_by_hand():
    result = metrics.summary(np.array(CONFUSION))
    # Labelled per class 3, 3, 4; predicted per class 3, 4, 3.
    assert result["iou"] == pytest.approx([2 / (3 + 3 - 2), 2 / (3 + 4 - 2), 2 / (4 + 3 - 2)])
    assert result["acc"] == pytest.approx([2 / 3, 2 / 3, 2 / 4])
    assert result["miou"] == pytest.approx((2 / 4 + 2 / 5 + 2 / 5) / 3)
    assert result["mean_acc"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert result["pixel_acc"] == pytest.approx(6 / 10)


def test_classes_without_union_or_label_are_left_out_of_the_means():
    """Class 1 is predicted but never labelled (IoU 0, accuracy undefined); class 2 appears nowhere."""
    confusion = metrics.confusion_matrix(np.array([[0, 0, 0]]), np.array([[0, 1, 0]]), 3)
    result = metrics.summary(confusion)
    assert result["iou"] == [2 / 3, 0.0, None]
    assert result["acc"] == [2 / 3, None, None]
    assert result["miou"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert result["mean_acc"] == pytest.approx(2 / 3)


def test_nothing_labelled_gives_undefined_metrics():
    confusion = metrics.confusion_matrix(np.full((2, 2), 255), np.zeros((2, 2), int), 4)
    assert confusion.sum() == 0
    assert metrics.summary(confusion) == {
        "miou": None, "pixel_acc": None, "mean_acc": None, "iou": [None] * 4, "acc": [None] * 4
    }


def test_predictions_outside_the_classes_and_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match=r"predicted class ids lie in 0\.\.2; found 0\.\.3"):
        metrics.confusion_matrix(np.zeros((1, 2), int), np.array([[0, 3]]), 3)
    with pytest.raises(ValueError, match="shape"):
        metrics.confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)
