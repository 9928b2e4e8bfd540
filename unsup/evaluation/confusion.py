"""Confusion-matrix protocols: ``hungarian`` (unsupervised semantic) and ``semantic`` (supervised).

Both accumulate, image by image, the number of pixels with each (ground-truth class, predicted
id) pair; void pixels (``ignore_index``) are dropped. Nothing larger than one image's labels is
ever held, the accumulated table has one cell per (class, id) pair seen.

``hungarian`` (PiCIE, Cho et al. CVPR 2021; STEGO, Hamilton et al. ICLR 2022)
    Predicted ids are cluster ids. After the whole dataset, clusters are mapped to classes
    one-to-one by the Hungarian algorithm on the dataset-level table (maximising the pixels
    that agree). With more clusters than classes, clusters left without a class predict
    "nothing": their pixels count as errors (false negatives of their true class). With
    ``many_to_one=True`` every cluster goes to its majority class instead (ties: the smallest
    class id), so several clusters can share a class.
``semantic``
    Predicted ids are class ids. Ids outside the class range are errors (like unmatched
    clusters).

Scores from the (class x predicted class) table ``M``: IoU per class
``M[c,c] / (sum_j M[c,j] + sum_i M[i,c] - M[c,c])`` (undefined, NaN, when the class is
neither in the ground truth nor predicted), mIoU = mean over defined classes, pixel accuracy
= correct / annotated pixels, mean accuracy = mean over classes present in the ground truth of
their recall, frequency-weighted IoU = sum over classes of (class pixel share) x IoU.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "pair_counts",
    "ConfusionTable",
    "hungarian_mapping",
    "class_scores",
    "collapse",
]


def pair_counts(labels: np.ndarray, gt: np.ndarray, *, ignore_index: int | None = None):
    """Pixel counts of each (ground-truth value, predicted value) pair of one image.

    Returns
    -------
    gt_values, pred_values, counts : ndarray of int64
    """
    labels = np.asarray(labels)
    gt = np.asarray(gt)
    if labels.shape != gt.shape:
        raise ValueError(f"prediction {labels.shape} and ground truth {gt.shape} differ in size")
    g = gt.ravel().astype(np.int64)
    p = labels.ravel().astype(np.int64)
    if ignore_index is not None:
        keep = g != ignore_index
        g, p = g[keep], p[keep]
    if g.size == 0:
        empty = np.empty(0, np.int64)
        return empty, empty, empty
    pairs, counts = np.unique(np.stack([g, p], 1), axis=0, return_counts=True)
    return pairs[:, 0], pairs[:, 1], counts.astype(np.int64)


class ConfusionTable:
    """A sparse, growing (ground-truth value x predicted value) pixel-count table."""

    def __init__(self):
        self.counts: dict[tuple[int, int], int] = defaultdict(int)

    def add(self, gt_values, pred_values, counts) -> None:
        for g, p, c in zip(np.asarray(gt_values).tolist(), np.asarray(pred_values).tolist(),
                           np.asarray(counts).tolist(), strict=True):
            self.counts[(g, p)] += c

    def dense(self, classes=None, predicted=None):
        """The table as a dense array with sorted row (class) and column (predicted) values."""
        gts = sorted({g for g, _ in self.counts}) if classes is None else list(classes)
        preds = sorted({p for _, p in self.counts}) if predicted is None else list(predicted)
        gi = {v: i for i, v in enumerate(gts)}
        pi = {v: i for i, v in enumerate(preds)}
        table = np.zeros((len(gts), len(preds)), np.int64)
        for (g, p), c in self.counts.items():
            if g in gi and p in pi:
                table[gi[g], pi[p]] += c
        return table, np.array(gts, np.int64), np.array(preds, np.int64)


def hungarian_mapping(table: np.ndarray, *, many_to_one: bool = False) -> np.ndarray:
    """Class index (row) of each cluster (column) of a (class x cluster) table, -1 = none.

    One-to-one: ``linear_sum_assignment`` maximising the matched pixels. Many-to-one: every
    cluster to its majority class (first maximum).
    """
    table = np.asarray(table)
    n_classes, n_clusters = table.shape
    mapping = np.full(n_clusters, -1, np.int64)
    if n_classes == 0 or n_clusters == 0:
        return mapping
    if many_to_one:
        mapping[:] = np.argmax(table, axis=0)
        return mapping
    rows, cols = linear_sum_assignment(table, maximize=True)
    mapping[cols] = rows
    return mapping


def class_scores(matrix: np.ndarray, class_names=None) -> dict:
    """Scores of a (true class x predicted class) matrix with an optional extra last column.

    Parameters
    ----------
    matrix : ndarray, shape (C, C) or (C, C + 1)
        ``matrix[i, j]`` = pixels of true class ``i`` predicted as class ``j``; a column ``C``
        holds pixels predicted as no valid class.
    class_names : list of str, optional
        Names for ``per_class_iou`` (defaults to the class index as a string).
    """
    m = np.asarray(matrix, dtype=np.float64)
    c = m.shape[0]
    tp = np.diag(m[:, :c])
    gt_total = m.sum(axis=1)
    pred_total = m[:, :c].sum(axis=0)
    union = gt_total + pred_total - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        recall = np.where(gt_total > 0, tp / gt_total, np.nan)
    total = gt_total.sum()
    names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
    defined = ~np.isnan(iou)
    freq = gt_total / total if total > 0 else np.zeros(c)
    return {
        "miou": float(np.mean(iou[defined])) if defined.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_accuracy": float(np.nanmean(recall)) if (gt_total > 0).any() else float("nan"),
        "fw_iou": float(np.sum(freq[defined] * iou[defined])),
        "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou,
                                                                                  strict=True)},
        "n_pixels": int(total),
    }


def collapse(table: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(class x cluster) table -> (class x class + "none") matrix under a cluster mapping."""
    table = np.asarray(table)
    mapping = np.asarray(mapping)
    n_classes = table.shape[0]
    out = np.zeros((n_classes, n_classes + 1), np.int64)
    target = np.where(mapping >= 0, mapping, n_classes)
    for j in range(table.shape[1]):
        out[:, target[j]] += table[:, j]
    return out
