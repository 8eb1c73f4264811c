"""Segmentation metrics as the Caffe release computes them.

hszhao/PSPNet evaluation/eval_acc.m with intersectionAndUnion.m and
pixelAccuracy.m: one confusion matrix is accumulated over the whole set, then
per class IoU = TP / (TP + FP + FN) and accuracy = TP / (TP + FN), their means,
and pixel accuracy = sum of TP / labelled pixels. Label ids outside
0 .. classes - 1 (255 marks unlabelled pixels) count nowhere. Classes whose
union is empty over the evaluated images are left out of the means and given as
None (eval_acc.m counts them as 0); so are the accuracies of classes without a
labelled pixel.

    confusion = np.zeros((classes, classes), np.int64)
    for label_ids, predicted_ids in pairs:
        confusion += confusion_matrix(label_ids, predicted_ids, classes)
    summary(confusion)["miou"]
"""

import numpy as np


def confusion_matrix(label_ids, predicted_ids, classes):
    """Pixel counts indexed [label class, predicted class] over the labelled pixels of one image.

    `label_ids` and `predicted_ids` are integer arrays of one shape; labels outside
    0 .. classes - 1 are unlabelled. Raises ValueError for a prediction outside
    that range or arrays of different shapes.
    """
    label_ids = np.asarray(label_ids)
    predicted_ids = np.asarray(predicted_ids)
    if label_ids.shape != predicted_ids.shape:
        raise ValueError(f"labels of shape {label_ids.shape} and predictions of shape {predicted_ids.shape}")
    labelled = (label_ids >= 0) & (label_ids < classes)
    predicted = predicted_ids[labelled].astype(np.int64)
    if predicted.size and (predicted.min() < 0 or predicted.max() >= classes):
        raise ValueError(f"predicted class ids lie in 0..{classes - 1}; found {predicted.min()}..{predicted.max()}")
    pairs = label_ids[labelled].astype(np.int64) * classes + predicted
    return np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def class_iou(confusion):
    """Per-class IoU, TP / (TP + FP + FN), of a [label, prediction] confusion matrix; None where the union is empty."""
    true_positives = np.diag(confusion)
    union = confusion.sum(axis=1) + confusion.sum(axis=0) - true_positives
    return [int(tp) / int(u) if u else None for tp, u in zip(true_positives, union)]


def class_accuracy(confusion):
    """Per-class accuracy, TP / (TP + FN), of a [label, prediction] confusion matrix; None without a labelled pixel."""
    labelled = confusion.sum(axis=1)
    return [int(tp) / int(n) if n else None for tp, n in zip(np.diag(confusion), labelled)]


def pixel_accuracy(confusion):
    """The share of labelled pixels predicted right; None without a labelled pixel."""
    labelled = int(confusion.sum())
    return int(np.trace(confusion)) / labelled if labelled else None


def mean_of_defined(values):
    """The mean of the values that are not None; None when there are none."""
    defined = [value for value in values if value is not None]
    return sum(defined) / len(defined) if defined else None


def summary(confusion):
    """Every metric of a confusion matrix: mIoU, pixel accuracy, mean class accuracy and the per-class lists."""
    iou = class_iou(confusion)
    accuracy = class_accuracy(confusion)
    return {
        "miou": mean_of_defined(iou),
        "pixel_acc": pixel_accuracy(confusion),
        "mean_acc": mean_of_defined(accuracy),
        "iou": iou,
        "acc": accuracy,
    }
