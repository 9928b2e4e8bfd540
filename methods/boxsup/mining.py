"""Training masks from boxes: candidate selection and mask composition of `boxsup`.

A box's mask comes from its candidate segments (:func:`unsup.proposals.box_candidates`) in one
of two ways (:func:`mine_masks`):

- ``selection="consensus"`` (the default): the vote of all candidates ("Simple Does It"'s
  M∩G+, Khoreva et al. CVPR 2017, generalised to the pool; :func:`consensus_patch`), the
  pixels they dispute ignored; from round 1 on the network decides undecided pixels where it
  is sure (``network_fill``) and may overrule the agreed ones (``network_override``).
- ``selection="cost"``: the BoxSup paper's choice of one candidate per box (Dai, He & Sun,
  ICCV 2015): the lowest ``eps_o + COST_WEIGHT * eps_r``, with the overlap cost
  ``eps_o = 1 - IoU(candidate, box)`` and, once a network exists, the regression cost
  ``eps_r`` (:func:`_selection_costs`); the box pixels where the two cheapest candidates
  disagree are ignored.

Then, for both: pixels outside every box are background, boxes are painted largest first (a
smaller box lies on top of a larger one it overlaps), a mask is clipped to its box, crowd /
"difficult" boxes are void, and a box whose mask covers less than ``min_fill`` of it falls back
to "Simple Does It"'s Box^i (:func:`boxi_mask`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["mine_masks", "consensus_patch", "scale_boxes", "boxi_mask", "COST_WEIGHT",
           "OVERRIDE_MAX_FLIPS"]

#: Weight of the regression cost ``eps_r`` against the overlap cost ``eps_o`` in
#: ``selection="cost"`` (the lambda of BoxSup's objective, Dai, He & Sun 2015). Fixed at the
#: value the former ``cost_weight`` option had by default; the rule is kept to reproduce the
#: paper, the consensus is the default.
COST_WEIGHT = 1.0

#: ``network_override`` leaves a box alone when it would flip more than this fraction of the
#: pixels the candidates agree on (on Weizmann Horse most boxes flip under 1%).
OVERRIDE_MAX_FLIPS = 0.1


def scale_boxes(boxes, original_shape, shape) -> list[list[int]]:
    """Boxes in working-resolution integer pixels: ``[y0, y1, x0, x1, label, ignore]``.

    The box ``x0 <= x < x1`` maps to the pixels it covers after scaling; every box keeps at
    least one pixel.
    """
    H, W = original_shape
    h, w = shape
    sy, sx = h / H, w / W
    out = []
    for b in boxes or []:
        y0 = min(max(int(math.floor(b.y0 * sy)), 0), h - 1)
        x0 = min(max(int(math.floor(b.x0 * sx)), 0), w - 1)
        y1 = min(max(int(math.ceil(b.y1 * sy)), y0 + 1), h)
        x1 = min(max(int(math.ceil(b.x1 * sx)), x0 + 1), w)
        out.append([y0, y1, x0, x1, int(b.label), int(bool(b.ignore))])
    return out


def boxi_mask(box_shape: tuple[int, int], *, inner_fraction: float = 0.2) -> np.ndarray:
    """"Simple Does It" Box^i over a box: 1 in the centred rectangle holding
    ``inner_fraction`` of the area, 255 (ignore) elsewhere."""
    h, w = box_shape
    f = math.sqrt(inner_fraction)
    ih, iw = max(1, round(h * f)), max(1, round(w * f))
    y0, x0 = (h - ih) // 2, (w - iw) // 2
    out = np.full((h, w), 255, np.uint8)
    out[y0:y0 + ih, x0:x0 + iw] = 1
    return out


def _selection_costs(cands, label: int, probs: np.ndarray | None):
    """(eps_o, eps_r or None) of every candidate of one box.

    ``eps_r`` is the network's mean cross-entropy over the box pixels against the labelling the
    candidate induces (its pixels inside the box = the box class, the box's other pixels =
    background): BoxSup's regression objective, restricted to the pixels a box's choice
    changes.
    """
    from unsup.proposals import box_iou_scores

    eps_o = 1.0 - box_iou_scores(cands)
    if probs is None or cands.masks.shape[0] == 0:
        return eps_o, None
    wy0, wy1, wx0, wx1 = cands.window
    by0, by1, bx0, bx1 = cands.box
    p = probs[:, wy0 + by0:wy0 + by1, wx0 + bx0:wx0 + bx1]
    nll_obj = -np.log(np.clip(p[label], 1e-6, 1.0))
    nll_bg = -np.log(np.clip(p[0], 1e-6, 1.0))
    inside = cands.masks[:, by0:by1, bx0:bx1].reshape(cands.masks.shape[0], -1)
    n = nll_obj.size
    eps_r = (inside.astype(np.float64) @ (nll_obj - nll_bg).ravel() + nll_bg.sum()) / n
    return eps_o, eps_r


def _box_i_patch(shape, label):
    """The "Box^i" fallback: the box's inner rectangle as ``label``, its ring ignored."""
    patch = boxi_mask(shape)
    patch[patch == 1] = label
    return patch


def _paste(region, patch):
    """Write a box's ``patch`` into its ``region`` of the label map (in place): object pixels
    overwrite, ignored pixels only claim background or already-ignored pixels."""
    from unsup.nn.losses import IGNORE

    obj = (patch != 0) & (patch != IGNORE)
    free = (region == 0) | (region == IGNORE)
    region[obj] = patch[obj]
    region[(patch == IGNORE) & free] = IGNORE


def _start_labels(shape, boxes):
    """Empty label map with crowd / ignore boxes marked, one choice record per box, and the
    order boxes are written in (largest first, so smaller boxes on top keep their pixels)."""
    from unsup.nn.losses import IGNORE

    labels = np.zeros(shape, np.uint8)
    choices: list[dict] = [{} for _ in boxes]
    for (y0, y1, x0, x1, _, ign) in boxes:
        if ign:
            labels[y0:y1, x0:x1] = IGNORE
    return labels, choices, paint_order(boxes)


def paint_order(boxes) -> list[int]:
    """Indices of the non-crowd boxes, largest first: painting in this order leaves a smaller
    box on top of a larger one it overlaps."""
    return sorted((i for i, b in enumerate(boxes) if not b[5]),
                  key=lambda i: -(boxes[i][1] - boxes[i][0]) * (boxes[i][3] - boxes[i][2]))


def mine_masks(shape: tuple[int, int], boxes: list[list[int]], candidates: list, *,
               probs: np.ndarray | None = None, min_fill: float = 0.05,
               selection: str = "consensus", agreement: tuple[float, float] = (0.0, 1.0),
               network_fill: float | None = 0.9, network_override: float | None = 0.9):
    """Compose an image's training label map from its boxes' candidates.

    The defaults are those of :class:`methods.boxsup.BoxSup`.

    Parameters
    ----------
    shape : (h, w)
    boxes : list of [y0, y1, x0, x1, label, ignore]
        Working-resolution boxes (:func:`scale_boxes`).
    candidates : list of BoxCandidates or None
        One entry per box (None for ignore boxes).
    probs : ndarray (C, h, w), optional
        Network probabilities (the rounds after the first).
    min_fill : float
        Below this fraction of its box, a box's mask is replaced by Box^i.
    selection : {"consensus", "cost"}
        ``consensus``: no single choice; every box pixel gets the fraction ``f`` of the box's
        candidates that claim it (:func:`consensus_patch`): object if ``f >= agreement[1]``,
        background if ``f <= agreement[0]``, ignored in between ("Simple Does It"'s M∩G+:
        object where the proposals agree, the rest of the box ignored); with ``probs``,
        ``network_fill`` and ``network_override`` then relabel the vote. ``cost``: the BoxSup
        paper's rule, one candidate per box of lowest ``eps_o + COST_WEIGHT * eps_r``
        (``eps_r`` only with ``probs``), the box pixels where the two cheapest candidates
        disagree ignored.
    agreement : (float, float)
        ``(background_at_most, object_at_least)`` of ``consensus``; ``(0, 1)`` = unanimity.
    network_fill : float, optional
        ``consensus`` with ``probs``: a box pixel the candidates leave undecided takes the
        network's class (the box's class or background) where the network's probability of
        it is at least ``network_fill`` (a recursive step in the spirit of "Simple Does It";
        None = stays ignored).
    network_override : float, optional
        ``consensus`` with ``probs``: a box pixel the candidates agree on takes the other
        class (object <-> background) where the network's probability of that class is at
        least ``network_override``, except in a box where that would flip more than
        ``OVERRIDE_MAX_FLIPS`` of the agreed pixels (None = the agreed pixels stay fixed).

    Returns
    -------
    labels : ndarray of uint8, shape (h, w)
        Classes, 255 = ignored.
    choices : list of dict
        Per box: ``{"candidate": index or None, "kind", "iou_box", "fill", ...}`` (``cost``
        adds the chosen candidate's ``cost``, ``consensus`` the ``ignored`` fraction and
        ``n_candidates``).
    """
    from unsup.nn.losses import IGNORE

    if selection not in ("cost", "consensus"):
        raise ValueError(f"selection must be 'cost' or 'consensus', got {selection!r}")
    lo, hi = (float(v) for v in agreement)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"agreement must be (background_at_most, object_at_least) with "
                         f"0 <= first < second <= 1, got {agreement!r}")
    relabel = probs is not None and (network_fill is not None or network_override is not None)
    labels, choices, order = _start_labels(shape, boxes)
    for i in order:
        y0, y1, x0, x1, label, _ = boxes[i]
        cands = candidates[i]
        patch = None
        if cands is not None and cands.masks.shape[0] > 0 and selection == "consensus":
            votes = consensus_patch(cands, agreement=(lo, hi))
            obj = votes == 1
            fill = float(obj.mean())
            choices[i] = {"candidate": None, "kind": "consensus",
                          "n_candidates": int(cands.masks.shape[0]),
                          "iou_box": fill,  # the patch lies inside the box: IoU = fill
                          "ignored": float((votes == IGNORE).mean()), "fill": fill}
            if relabel:
                votes = _relabel_from_network(votes, probs, cands, label, fill=network_fill,
                                              override=network_override)
                obj = votes == 1
                fill = float(obj.mean())
                choices[i].update(fill=fill, iou_box=fill,
                                  ignored=float((votes == IGNORE).mean()))
            if fill >= min_fill:
                patch = np.where(obj, np.uint8(label), np.uint8(0))
                patch[votes == IGNORE] = IGNORE
        elif cands is not None and cands.masks.shape[0] > 0:
            eps_o, eps_r = _selection_costs(cands, label, probs)
            cost = eps_o if eps_r is None else eps_o + COST_WEIGHT * eps_r
            ranked = np.argsort(cost, kind="stable")
            best = int(ranked[0])
            by0, by1, bx0, bx1 = cands.box
            inside = cands.masks[:, by0:by1, bx0:bx1]
            chosen = inside[best]
            fill = float(chosen.mean())
            choices[i] = {"candidate": best, "kind": cands.names[best],
                          "iou_box": float(1.0 - eps_o[best]), "cost": float(cost[best]),
                          "fill": fill}
            if fill >= min_fill:
                patch = np.where(chosen, np.uint8(label), np.uint8(0))
                if ranked.size > 1:  # ignore what the runner-up disputes ("Simple Does It")
                    patch[chosen != inside[int(ranked[1])]] = IGNORE
        if patch is None:
            patch = _box_i_patch((y1 - y0, x1 - x0), label)
            choices[i] = {**choices[i], "candidate": None, "kind": "box_i"}
        _paste(labels[y0:y1, x0:x1], patch)
    return labels, choices


def consensus_patch(candidates, *, agreement: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Vote of a box's candidates over the box: 1 = object, 0 = background, 255 = ignored.

    A pixel is object when at least ``agreement[1]`` of the candidates contain it,
    background when at most ``agreement[0]`` do, ignored otherwise ("Simple Does It",
    Khoreva et al. 2017, Sec. 3.2: M∩G+ keeps the pixels where MCG and GrabCut+ agree and
    ignores the rest of the box). Returns an (h, w) uint8 array over the box.
    """
    lo, hi = agreement
    by0, by1, bx0, bx1 = candidates.box
    inside = candidates.masks[:, by0:by1, bx0:bx1]
    # small tolerance so that e.g. 2 of 3 candidates reach an agreement of 2/3
    fraction = inside.mean(0, dtype=np.float64)
    out = np.full(fraction.shape, 255, np.uint8)
    out[fraction >= hi - 1e-9] = 1
    out[fraction <= lo + 1e-9] = 0
    return out


def _relabel_from_network(votes: np.ndarray, probs: np.ndarray, candidates, label: int, *,
                          fill: float | None, override: float | None) -> np.ndarray:
    """``votes`` (over the box) relabelled where the network is sure: undecided pixels
    (255) take object (1) where P(label) >= ``fill`` and background (0) where
    P(background) >= ``fill``; with ``override``, agreed object pixels become background
    where P(background) >= ``override`` and agreed background pixels object where
    P(label) >= ``override``, unless more than ``OVERRIDE_MAX_FLIPS`` of the box's agreed
    pixels would flip. None skips a step."""
    wy0, _, wx0, _ = candidates.window
    by0, by1, bx0, bx1 = candidates.box
    p = probs[:, wy0 + by0:wy0 + by1, wx0 + bx0:wx0 + bx1]
    out = votes.copy()
    if fill is not None:
        undecided = votes == 255
        out[undecided & (p[label] >= fill)] = 1
        out[undecided & (p[0] >= fill)] = 0
    if override is not None:
        other = np.where(votes == 1, p[0], p[label])  # P(the class the candidates did not pick)
        agreed = (votes == 0) | (votes == 1)
        flip = agreed & (other >= override)
        # the network corrects a box locally; a network that contradicts the candidates on
        # much of a box is more likely wrong than they are (e.g. after very short training)
        if int(np.count_nonzero(flip)) <= OVERRIDE_MAX_FLIPS * int(np.count_nonzero(agreed)):
            out[flip] = 1 - votes[flip]
    return out


def pack_candidates(cands_list) -> dict[str, np.ndarray]:
    """The candidates of an image's boxes as arrays for ``np.savez`` (masks bit-packed)."""
    arrays = {}
    for j, c in enumerate(cands_list):
        if c is None:
            continue
        arrays[f"window_{j}"] = np.asarray(c.window, np.int64)
        arrays[f"box_{j}"] = np.asarray(c.box, np.int64)
        arrays[f"shape_{j}"] = np.asarray(c.masks.shape, np.int64)
        arrays[f"masks_{j}"] = np.packbits(c.masks.ravel())
        arrays[f"names_{j}"] = np.asarray(c.names, dtype=np.str_)
    return arrays


def unpack_candidates(path: Path, n_boxes: int) -> list:
    """The inverse of :func:`pack_candidates`, read from a ``.npz`` file."""
    from unsup.proposals import BoxCandidates

    out: list = [None] * n_boxes
    with np.load(path, allow_pickle=False) as data:
        for j in range(n_boxes):
            if f"window_{j}" not in data.files:
                continue
            shape = tuple(int(v) for v in data[f"shape_{j}"])
            count = int(np.prod(shape))
            masks = np.unpackbits(data[f"masks_{j}"], count=count).astype(bool).reshape(shape)
            out[j] = BoxCandidates(window=tuple(int(v) for v in data[f"window_{j}"]),
                                   box=tuple(int(v) for v in data[f"box_{j}"]), masks=masks,
                                   names=[str(s) for s in data[f"names_{j}"]])
    return out
