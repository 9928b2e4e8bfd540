"""The box tightness prior of `boxsup` (Hsu, Hsu, Tsai, Lin & Chuang, "Weakly Supervised
Instance Segmentation using the Bounding Box Tightness Prior", NeurIPS 2019).

A tight box touches its object on every side, so every row and every column of the box holds
an object pixel. `boxsup` uses the prior twice: :func:`ignore_untight` ignores the mined
background of box rows / columns that hold no object pixel, and :func:`tightness_loss` is the
prior's multiple-instance loss, added to the cross-entropy. The boxes travel through the
training augmentation packed into the target map (:func:`encode_box_targets`).
"""

from __future__ import annotations

import numpy as np

from methods.boxsup.mining import paint_order

__all__ = ["ignore_untight", "encode_box_targets", "tightness_loss", "BOX_CODE_BASE"]

#: Multiplier separating a pixel's class (low byte) from its box code in tightness targets.
BOX_CODE_BASE = 256


def ignore_untight(labels: np.ndarray, boxes: list[list[int]]) -> np.ndarray:
    """Ignore the background pixels of box rows and columns that hold none of the box's class.

    A tight box touches its object on all four sides, so every row and every column of the
    box contains at least one object pixel. Where a mined mask leaves a whole row or column of
    a box without the box's class, the mask is wrong there (typically thin parts such as legs
    that every candidate missed): its background pixels in that row or column become
    ``IGNORE`` instead of teaching the network that they are background. Returns a new label
    map; ``labels`` is not modified. Crowd / ignore boxes are skipped.
    """
    from unsup.nn.losses import IGNORE

    out = np.array(labels, copy=True)
    for (y0, y1, x0, x1, label, ign) in boxes:
        if ign:
            continue
        region = out[y0:y1, x0:x1]  # a view: edits go to ``out``
        has_object = region == label
        rows = ~has_object.any(axis=1)
        cols = ~has_object.any(axis=0)
        untight = (rows[:, None] | cols[None, :]) & (region == 0)
        region[untight] = IGNORE
    return out


def encode_box_targets(labels: np.ndarray, boxes: list[list[int]]) -> np.ndarray:
    """Pack each pixel's training label and the box it lies in into one int32 map.

    ``code = label + 256 * box_code`` with ``box_code = 0`` outside every (non-crowd) box
    and ``1 + class + 256 * j`` inside box ``j`` of class ``class`` (smaller boxes are
    painted last, so an overlapped box keeps the pixels it does not share). The packed map
    goes through the training augmentation (nearest-neighbour rescaling, crop, flip) like a
    label map, so the boxes follow the image; :func:`tightness_loss` unpacks it.
    """
    labels = np.asarray(labels)
    if labels.max(initial=0) >= BOX_CODE_BASE:
        raise ValueError("encode_box_targets expects labels below 256")
    codes = np.zeros(labels.shape, np.int64)
    for j in paint_order(boxes):
        y0, y1, x0, x1, label, _ = boxes[j]
        codes[y0:y1, x0:x1] = 1 + int(label) + BOX_CODE_BASE * j
    packed = labels.astype(np.int64) + BOX_CODE_BASE * codes
    if packed.max(initial=0) > np.iinfo(np.int32).max:
        raise ValueError("too many boxes in one image to pack into int32 targets")
    return packed.astype(np.int32)


def tightness_loss(logits, box_codes, *, min_side: int = 4):
    """Multiple-instance loss of the box tightness prior.

    Every row and every column crossing a tight box of class ``c`` contains an object pixel:
    for each such line the loss is ``-log max_{pixels of the line in the box} p_c``, averaged
    over all lines of all boxes in the batch.

    After cropping, a box's extent is recovered from its pixels; rows are used only when the
    box is not cut by the crop's left or right edge (else the object part of a row may lie
    outside the crop), columns likewise for the top and bottom edges.

    Parameters
    ----------
    logits : Tensor, shape (N, C, H, W)
    box_codes : Tensor of int64, shape (N, H, W)
        ``box_code`` of :func:`encode_box_targets` (0 = no box).
    min_side : int
        Boxes whose extent in the crop is below this on either side contribute no lines
        (specks: a few-pixel box says nothing about where the object is on its lines). The
        default is `boxsup`'s ``tightness_min_side``.

    Returns
    -------
    Tensor (scalar); zero (with a gradient) when no line qualifies.
    """
    import torch

    log_probs = torch.log_softmax(logits.float(), dim=1)
    n, _, h, w = logits.shape
    terms = []
    for i in range(n):
        codes_i = box_codes[i]
        for code in torch.unique(codes_i).tolist():
            if code <= 0:
                continue
            cls = (code - 1) % BOX_CODE_BASE
            ys, xs = torch.nonzero(codes_i == code, as_tuple=True)
            y0, y1 = int(ys.min()), int(ys.max()) + 1
            x0, x1 = int(xs.min()), int(xs.max()) + 1
            if min(y1 - y0, x1 - x0) < min_side:
                continue
            block = log_probs[i, cls, y0:y1, x0:x1]
            if x0 > 0 and x1 < w:
                terms.append(-block.max(dim=1).values)
            if y0 > 0 and y1 < h:
                terms.append(-block.max(dim=0).values)
    if not terms:
        return logits.sum() * 0.0
    return torch.cat(terms).mean()
