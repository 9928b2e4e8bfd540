"""Validation scores of a segmentation network, counted as the harness's ``semantic`` protocol
counts them.

Pixels are tallied with :mod:`unsup.evaluation.confusion` (the harness's code), so a
validation mIoU and a test mIoU of the same predictions are the same number. The handling of
labels outside the network's classes is the harness's: a ground-truth label outside
``0..n_classes-1`` (other than the void value) is an error, a predicted label outside it is a
wrong prediction (it counts against the true class).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from unsup.evaluation.confusion import ConfusionTable, class_scores, collapse, pair_counts
from unsup.nn.losses import IGNORE

__all__ = ["check_truth_labels", "validation_scores"]


def check_truth_labels(values: Iterable[int], n_classes: int) -> None:
    """Refuse ground-truth labels a network with ``n_classes`` outputs cannot predict.

    Raises
    ------
    ValueError
        Some value lies outside ``0..n_classes-1``.
    """
    outside = sorted({int(v) for v in values if not 0 <= int(v) < n_classes})
    if outside:
        raise ValueError(
            f"validation masks have label(s) {outside[:10]} outside the network's "
            f"{n_classes} classes 0..{n_classes - 1} (is --ignore-index right, or does the "
            "training set lack these classes?)")


def validation_scores(pairs: Iterable[tuple[np.ndarray, np.ndarray]], n_classes: int, *,
                      ignore_index: int = IGNORE) -> dict[str, float]:
    """mIoU and pixel accuracy of predicted class maps against their ground truth.

    Parameters
    ----------
    pairs : iterable of (labels, truth)
        Predicted class ids and ground-truth ids of the same shape, one pair per image.
    n_classes : int
        The network's classes ``0..n_classes-1``.
    ignore_index : int
        Ground-truth value of void pixels (left out).

    Returns
    -------
    dict
        ``miou`` (mean over the classes present in the truth or the prediction),
        ``pixel_accuracy``, and for two classes ``fg_iou`` (the IoU of class 1); 0.0 where
        nothing was annotated.

    Raises
    ------
    ValueError
        A ground-truth label outside ``0..n_classes-1`` (see :func:`check_truth_labels`).
    """
    table = ConfusionTable()
    for labels, truth in pairs:
        table.add(*pair_counts(labels, truth, ignore_index=ignore_index))
    check_truth_labels((g for g, _ in table.counts), n_classes)
    predicted = sorted({p for _, p in table.counts})
    counts, _, _ = table.dense(range(n_classes), predicted)
    # a predicted id the network has no class for is an error of its true class
    mapping = np.array([p if 0 <= p < n_classes else -1 for p in predicted], np.int64)
    scores = class_scores(collapse(counts, mapping))
    out = {"miou": _or_zero(scores["miou"]),
           "pixel_accuracy": _or_zero(scores["pixel_accuracy"])}
    if n_classes == 2:
        out["fg_iou"] = _or_zero(scores["per_class_iou"]["1"])
    return out


def _or_zero(value) -> float:
    # no annotated pixel of a class (or at all): report 0 so that the history stays numeric
    return 0.0 if value is None or not np.isfinite(value) else float(value)
