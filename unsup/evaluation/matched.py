"""Per-image unsupervised segment matching: mIoU with one-to-one matching, and AP50 / AP70.

Protocol (``matched``), per image and per annotator:

1. Predicted labels are split into connected segments (4-connectivity): a cluster id that
   occurs in two separate places gives two segments (Kanezaki's evaluation relabels connected
   components before matching for the same reason). Ground-truth segments are the 4-connected
   components of the annotator's labels too, so that a prediction equal to the ground truth
   scores 1 (BSDS labels are nearly always connected already). Pixels equal to
   ``ignore_index`` are left out of every area and intersection.
2. IoU between every predicted segment and every ground-truth segment.
3. mIoU: predicted and ground-truth segments are matched one-to-one maximising the total IoU
   (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``); the mIoU is the sum of the
   matched IoUs divided by the number of ground-truth segments, so unmatched ground-truth
   segments count as 0.
4. AP50 / AP70 (after Kanezaki, ICASSP 2018): a ground-truth segment is correctly detected when
   its best IoU with any predicted segment (no one-to-one constraint) exceeds 0.5 / 0.7 (strictly);
   the score is the fraction of ground-truth segments detected.

Per image, ``miou.all`` is the mean over annotators, ``miou.fine`` the value for the annotator
with the most segments (first one on ties), ``miou.coarse`` for the one with the fewest;
``ap50`` / ``ap70`` are means over annotators. Dataset values are means over images.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from unsup.hierarchy import region_leaves

__all__ = ["connected_segments", "segment_iou", "matched_scores", "summarize_matched",
           "AP_THRESHOLDS"]

AP_THRESHOLDS = (0.5, 0.7)


def connected_segments(labels: np.ndarray) -> np.ndarray:
    """Split every label into its 4-connected components; ids ``0..n-1`` in scan order.

    The lab's one definition, :func:`unsup.hierarchy.region_leaves`.
    """
    return region_leaves(labels)


def segment_iou(segments: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None):
    """IoU matrix between predicted segments (ids ``0..P-1``) and ground-truth labels.

    Returns
    -------
    iou : ndarray, shape (P, G)
    gt_values : ndarray, shape (G,)
        The ground-truth label of each column.
    """
    seg = np.asarray(segments).ravel()
    g = np.asarray(gt).ravel()
    if valid is not None:
        keep = np.asarray(valid).ravel()
        seg, g = seg[keep], g[keep]
    n_seg = int(np.asarray(segments).max()) + 1 if np.asarray(segments).size else 0
    gt_values, g_inv = np.unique(g, return_inverse=True)
    n_gt = gt_values.size
    if n_gt == 0 or n_seg == 0:
        return np.zeros((n_seg, n_gt)), gt_values
    counts = np.bincount(seg * n_gt + g_inv, minlength=n_seg * n_gt).reshape(n_seg, n_gt)
    counts = counts.astype(np.float64)
    seg_area = counts.sum(axis=1, keepdims=True)
    gt_area = counts.sum(axis=0, keepdims=True)
    union = seg_area + gt_area - counts
    iou = np.divide(counts, union, out=np.zeros_like(counts), where=union > 0)
    return iou, gt_values


def matched_scores(labels: np.ndarray, ground_truth, *, ignore_index: int | None = None) -> dict:
    """Matched mIoU and AP of one image against every annotator (see the module docstring).

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Predicted labels (cluster ids; any values).
    ground_truth : list of ndarray of int, shape (H, W)
        One label map per annotator.
    ignore_index : int, optional
        Void label of the ground truth.

    Returns
    -------
    dict with ``miou.all``, ``miou.fine``, ``miou.coarse``, ``ap50``, ``ap70``, per-annotator
    lists ``miou_per_annotator`` and ``n_gt_segments``, and ``n_segments`` (predicted).
    """
    labels = np.asarray(labels)
    if not ground_truth:
        raise ValueError("empty ground truth (no annotator)")
    segments = connected_segments(labels)
    mious, n_gt, aps = [], [], {t: [] for t in AP_THRESHOLDS}
    for k, gt in enumerate(ground_truth):
        gt = np.asarray(gt)
        if gt.shape != labels.shape:
            raise ValueError(f"annotator {k}: ground truth {gt.shape} and prediction "
                             f"{labels.shape} differ in size")
        valid = None if ignore_index is None else gt != ignore_index
        if valid is not None and not valid.any():
            continue  # nothing annotated by this annotator
        iou, gt_values = segment_iou(segments, connected_segments(gt), valid)
        if gt_values.size == 0:
            continue
        # the predicted segments that exist on valid pixels are the candidates
        rows, cols = linear_sum_assignment(iou, maximize=True)
        mious.append(float(iou[rows, cols].sum() / gt_values.size))
        n_gt.append(int(gt_values.size))
        best = iou.max(axis=0) if iou.shape[0] else np.zeros(gt_values.size)
        for t in AP_THRESHOLDS:
            aps[t].append(float(np.mean(best > t)))
    if not mious:
        raise ValueError("ground truth has no annotated pixel (all void)")
    fine = int(np.argmax(n_gt))
    coarse = int(np.argmin(n_gt))
    return {
        "miou.all": float(np.mean(mious)),
        "miou.fine": mious[fine],
        "miou.coarse": mious[coarse],
        "ap50": float(np.mean(aps[0.5])),
        "ap70": float(np.mean(aps[0.7])),
        "n_segments": int(segments.max()) + 1 if segments.size else 0,
        "n_gt_segments": n_gt,
        "miou_per_annotator": mious,
    }


def summarize_matched(rows: list[dict]) -> dict:
    """Dataset means of the per-image scores."""
    if not rows:
        raise ValueError("no images to summarize")
    keys = ("miou.all", "miou.fine", "miou.coarse", "ap50", "ap70")
    metrics = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    metrics["n_segments.mean"] = float(np.mean([r["n_segments"] for r in rows]))
    return metrics
