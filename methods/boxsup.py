"""`boxsup`: a segmentation network trained from bounding boxes only.

BoxSup (Dai, He & Sun, "BoxSup: Exploiting Bounding Boxes to Supervise Convolutional Networks
for Semantic Segmentation", ICCV 2015, arXiv 1503.01640), with the ignore regions of "Simple
Does It" (Khoreva, Benenson, Hosang, Hein & Schiele, CVPR 2017, arXiv 1603.07485).

Procedure
---------
1. Every box gets a pool of candidate segments from unsupervised proposals
   (:mod:`unsup.proposals`: GrabCut initialised by the box, GrabCut snapped to
   Felzenszwalb superpixels, unions of multi-scale superpixels by a colour model of box
   versus surroundings). Candidates may extend beyond their box.
2. Initial assignment (round 0): each box takes the candidate of lowest overlap cost
   ``eps_o = 1 - IoU(candidate, box)`` (BoxSup's overlapping objective).
3. Rounds: the network is trained on the current masks for ``epochs / rounds`` epochs; then,
   with the network fixed, every box re-selects the candidate that minimises
   ``eps_o + cost_weight * eps_r``, where ``eps_r`` is the network's mean cross-entropy over
   the box pixels against the labelling the candidate induces (its pixels inside the box =
   the box class, the box's other pixels = background) -- BoxSup's regression objective,
   restricted to the pixels a box's choice changes. ``sample_top > 1`` draws uniformly among
   the ``sample_top`` cheapest candidates (BoxSup's randomised greedy choice; seeded).
4. Mask composition: pixels outside every box are background; boxes are painted largest
   first, so a smaller box lies on top of a larger one it overlaps; a box's mask is clipped to
   the box. With ``ignore_top=2`` ("Simple Does It" M∩G+ style), the box pixels where the
   two cheapest candidates disagree are ignored by the loss. Crowd / "difficult" boxes
   (``Box.ignore``) make their region void. A box whose chosen mask covers less than
   ``min_fill`` of it falls back to "Simple Does It"'s Box^i: the central 20% of the box is
   the object and the rest of the box is ignored.
5. ``selection="consensus"`` (the default; ``"cost"`` = steps 2-3 as in the paper)
   replaces the single choice by the vote of all of a box's candidates ("Simple Does It"'s
   M∩G+, generalised to the pool): object where they all agree, background where none
   claims the pixel, the rest of the box ignored; from round 1 on, with ``network_fill``,
   the undecided pixels take the network's class where it is confident, and with
   ``network_override`` / ``network_ignore`` the agreed pixels switch class where the
   network is sure of the other one, or are ignored where it merely disputes them. Why: with
   a small pool (no MCG), the candidate of highest IoU with its box is biased towards masks
   that fill the box; on the Weizmann Horse training split (boxes from masks) the round-0
   masks of the BoxSup choice had foreground IoU 0.65 with the true masks (0.69 with
   ``ignore_top=2``, GrabCut alone 0.70), the unanimous vote 0.86 on the 80% of pixels it
   labels (see docs/benchmarks/boxsup.md).

6. ``recursion="crf"`` ("Simple Does It" recursive training, Sec. 3.1 of Khoreva et al.)
   replaces step 5's network fill in the later rounds: every box is relabelled from the
   network's prediction refined by a dense CRF (:func:`crf_relabel`, ``MINING_CRF``),
   clipped to the box, background outside all boxes, and a box whose new object covers
   less than ``relabel_min_fill`` of it keeps its previous mask. ``round0_crf`` refines
   the round-0 vote with the same CRF (:func:`vote_probabilities`). Neither is the
   default: on the Weizmann Horse training split the relabelled masks were no better than
   the network's own prediction (0.82 foreground IoU vs 0.87 for the consensus + network
   fill on the 91% of pixels it labels), the CRF-refined round-0 vote was worse than the
   vote (0.69 vs 0.85), and a validation run carved out of the training images ended
   lower (0.787 vs 0.794 foreground IoU; docs/benchmarks/boxsup.md, Session 3).
7. Box tightness prior (Hsu, Hsu, Tsai, Lin & Chuang, "Weakly Supervised Instance
   Segmentation using the Bounding Box Tightness Prior", NeurIPS 2019): a tight box touches
   its object on every side, so every row and column of the box holds an object pixel.
   ``tightness_ignore`` ignores the mined background of box rows / columns that hold none
   (:func:`ignore_untight`; the candidates tend to miss thin parts such as legs together,
   so the consensus called them background), and ``tightness_weight`` adds the prior's
   multiple-instance loss (:func:`tightness_loss`: for every such line, ``-log`` of the
   highest object probability on it) to the cross-entropy; boxes narrower than
   ``tightness_min_side`` pixels (specks of masks) give no lines. The boxes travel through the
   training augmentation packed into the target map (:func:`encode_box_targets`). Both are on
   by default (chosen on a validation split of the Weizmann Horse training images, 3 seeds;
   docs/benchmarks/boxsup.md, Session 5); they are not part of BoxSup itself. Optional, off
   by default: ``pairwise_weight`` (BoxInst, Tian et al. CVPR 2021: inside boxes,
   neighbouring pixels of nearly the same colour should share a class;
   :func:`pairwise_color_loss`).

The mined masks of round K are written to ``OUT_DIR/mined/round_K/labels/<id>.png`` (label
maps at the working resolution, 255 = ignored) with ``overlays/<id>.png``, the chosen
candidate kinds (``choices.json``) and statistics (``summary.json``).

``fit`` reads only the samples' images and boxes (``Sample.boxes``, e.g. from
``open_dataset(..., boxes=PATH)`` or ``boxes_from_masks=True``); it never reads
``ground_truth``. Use :class:`unsup.training.BoxesOnlyDataset` to make that structural, as
``unsup train`` does. Validation samples (with masks) are only monitored, never used to pick
weights, unless ``select_best=True``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from methods.supervised import NetworkMethod, SampleCache
from unsup.registry import register

__all__ = ["BoxSup", "mine_masks", "scale_boxes", "boxi_mask", "add_network_candidates",
           "consensus_patch", "vote_probabilities", "crf_relabel", "MINING_CRF",
           "OVERRIDE_MAX_FLIPS"]

#: DenseCRF parameters of the mining CRF (``recursion="crf"``, ``round0_crf``) at the
#: working resolution (longer side ~224 px): DeepLab-like (narrow colour kernel, low
#: weight), the best of 6 settings for relabelling on the Weizmann Horse training split;
#: the segment-time defaults (colour range 13, weight 10) spread a horse's colour over its
#: surroundings and lowered the relabelled masks' foreground IoU from 0.82 to 0.74
#: (docs/benchmarks/boxsup.md, Session 3).
MINING_CRF = {"bilateral_sxy": 50.0, "bilateral_srgb": 5.0, "bilateral_weight": 4.0}


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


def _selection_costs(cands, label: int, probs: np.ndarray | None, cost_weight: float):
    """(eps_o, eps_r or None) of every candidate of one box."""
    from unsup.proposals import box_iou_scores

    eps_o = 1.0 - box_iou_scores(cands)
    if probs is None or cands.masks.shape[0] == 0 or cost_weight == 0:
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
    from unsup.training import IGNORE

    obj = (patch != 0) & (patch != IGNORE)
    free = (region == 0) | (region == IGNORE)
    region[obj] = patch[obj]
    region[(patch == IGNORE) & free] = IGNORE


def _start_labels(shape, boxes):
    """Empty label map with crowd / ignore boxes marked, one choice record per box, and the
    order boxes are written in (largest first, so smaller boxes on top keep their pixels)."""
    from unsup.training import IGNORE

    labels = np.zeros(shape, np.uint8)
    choices: list[dict] = [{} for _ in boxes]
    for (y0, y1, x0, x1, _, ign) in boxes:
        if ign:
            labels[y0:y1, x0:x1] = IGNORE
    return labels, choices, _paint_order(boxes)


def _paint_order(boxes) -> list[int]:
    """Indices of the non-crowd boxes, largest first: painting in this order leaves a smaller
    box on top of a larger one it overlaps."""
    return sorted((i for i, b in enumerate(boxes) if not b[5]),
                  key=lambda i: -(boxes[i][1] - boxes[i][0]) * (boxes[i][3] - boxes[i][2]))


def mine_masks(shape: tuple[int, int], boxes: list[list[int]], candidates: list, *,
               probs: np.ndarray | None = None, cost_weight: float = 1.0,
               ignore_top: int = 2, min_fill: float = 0.05, sample_top: int = 1,
               rng: np.random.Generator | None = None, selection: str = "cost",
               agreement: tuple[float, float] = (0.0, 1.0),
               network_fill: float | None = None, network_override: float | None = None,
               network_ignore: float | None = None):
    """Select one candidate per box and compose the image's training label map.

    Parameters
    ----------
    shape : (h, w)
    boxes : list of [y0, y1, x0, x1, label, ignore]
        Working-resolution boxes (:func:`scale_boxes`).
    candidates : list of BoxCandidates or None
        One entry per box (None for ignore boxes).
    probs : ndarray (C, h, w), optional
        Network probabilities: adds the regression cost (rounds after the first).
    cost_weight : float
        Weight of the regression cost (BoxSup's lambda).
    ignore_top : int
        1 = hard masks; 2 = pixels where the two cheapest candidates disagree are ignored.
    min_fill : float
        Below this fraction of its box, a chosen mask is replaced by Box^i.
    sample_top : int
        Choose uniformly among this many cheapest candidates (needs ``rng``).
    selection : {"cost", "consensus"}
        ``cost``: one candidate per box by the BoxSup cost (above). ``consensus``: no single
        choice; every box pixel gets the fraction ``f`` of the box's candidates that claim it
        (:func:`consensus_patch`): object if ``f >= agreement[1]``, background if
        ``f <= agreement[0]``, ignored in between ("Simple Does It"'s M∩G+: object where
        the proposals agree, the rest of the box ignored). ``probs`` is then unused (the
        network takes part only through ``add_network_candidates``).
    agreement : (float, float)
        ``(background_at_most, object_at_least)`` of ``consensus``; ``(0, 1)`` = unanimity.
    network_fill : float, optional
        ``consensus`` with ``probs``: a box pixel the candidates leave undecided takes the
        network's class (the box's class or background) where the network's probability of
        it is at least ``network_fill`` (a recursive step in the spirit of "Simple Does It";
        the pixels the candidates agree on stay fixed).
    network_override : float, optional
        ``consensus`` with ``probs``: a box pixel the candidates agree on takes the other
        class (object <-> background) where the network's probability of that class is at
        least ``network_override``, except in a box where that would flip more than
        ``OVERRIDE_MAX_FLIPS`` of the agreed pixels (None = the agreed pixels stay fixed).
    network_ignore : float, optional
        ``consensus`` with ``probs``: a box pixel the candidates agree on becomes ignored
        where the network gives the other class at least this probability and does not
        flip it ("Simple Does It"'s ignore regions for pixels in dispute); the same
        per-box guard as ``network_override`` applies.

    Returns
    -------
    labels : ndarray of uint8, shape (h, w)
        Classes, 255 = ignored.
    choices : list of dict
        Per box: ``{"candidate": index or None, "kind", "iou_box", "cost"}``.
    """
    from unsup.training import IGNORE

    if selection not in ("cost", "consensus"):
        raise ValueError(f"selection must be 'cost' or 'consensus', got {selection!r}")
    lo, hi = (float(v) for v in agreement)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"agreement must be (background_at_most, object_at_least) with "
                         f"0 <= first < second <= 1, got {agreement!r}")
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
            if probs is not None and (network_fill is not None or network_override is not None
                                      or network_ignore is not None):
                votes = _relabel_from_network(votes, probs, cands, label, fill=network_fill,
                                              override=network_override,
                                              ignore=network_ignore)
                obj = votes == 1
                fill = float(obj.mean())
                choices[i].update(fill=fill, iou_box=fill,
                                  ignored=float((votes == IGNORE).mean()))
            if fill >= min_fill:
                patch = np.where(obj, np.uint8(label), np.uint8(0))
                patch[votes == IGNORE] = IGNORE
        elif cands is not None and cands.masks.shape[0] > 0:
            eps_o, eps_r = _selection_costs(cands, label, probs, cost_weight)
            cost = eps_o if eps_r is None else eps_o + cost_weight * eps_r
            ranked = np.argsort(cost, kind="stable")
            pick = 0
            if sample_top > 1 and rng is not None:
                pick = int(rng.integers(0, min(sample_top, ranked.size)))
            best = int(ranked[pick])
            by0, by1, bx0, bx1 = cands.box
            inside = cands.masks[:, by0:by1, bx0:bx1]
            chosen = inside[best]
            fill = float(chosen.mean())
            choices[i] = {"candidate": best, "kind": cands.names[best],
                          "iou_box": float(1.0 - eps_o[best]), "cost": float(cost[best]),
                          "fill": fill}
            if fill >= min_fill:
                patch = np.where(chosen, np.uint8(label), np.uint8(0))
                others = [int(k) for k in ranked if int(k) != best]
                if ignore_top >= 2 and others:
                    patch[chosen != inside[others[0]]] = IGNORE
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


#: ``network_override`` leaves a box alone when it would flip more than this fraction of the
#: pixels the candidates agree on (on Weizmann Horse most boxes flip under 1%).
OVERRIDE_MAX_FLIPS = 0.1


def _relabel_from_network(votes: np.ndarray, probs: np.ndarray, candidates, label: int, *,
                          fill: float | None, override: float | None,
                          ignore: float | None = None) -> np.ndarray:
    """``votes`` (over the box) relabelled where the network is sure: undecided pixels
    (255) take object (1) where P(label) >= ``fill`` and background (0) where
    P(background) >= ``fill``; with ``override``, agreed object pixels become background
    where P(background) >= ``override`` and agreed background pixels object where
    P(label) >= ``override``; with ``ignore``, agreed pixels whose other class has
    P >= ``ignore`` (and that did not flip) become undecided (255). Neither of the last two
    happens in a box where more than ``OVERRIDE_MAX_FLIPS`` of the agreed pixels would flip
    (P(other) >= ``override``, or >= ``ignore`` without an override). None skips a step."""
    wy0, _, wx0, _ = candidates.window
    by0, by1, bx0, bx1 = candidates.box
    p = probs[:, wy0 + by0:wy0 + by1, wx0 + bx0:wx0 + bx1]
    out = votes.copy()
    if fill is not None:
        undecided = votes == 255
        out[undecided & (p[label] >= fill)] = 1
        out[undecided & (p[0] >= fill)] = 0
    if override is not None or ignore is not None:
        other = np.where(votes == 1, p[0], p[label])  # P(the class the candidates did not pick)
        agreed_mask = (votes == 0) | (votes == 1)
        flip = agreed_mask & (other >= override) if override is not None else None
        # the network corrects a box locally; a network that contradicts the candidates on
        # much of a box is more likely wrong than they are (e.g. after very short training)
        sure = override if override is not None else ignore
        contradicted = int(np.count_nonzero(agreed_mask & (other >= sure)))
        if contradicted <= OVERRIDE_MAX_FLIPS * int(np.count_nonzero(agreed_mask)):
            if ignore is not None:
                out[agreed_mask & (other >= ignore)] = 255
            if flip is not None:
                out[flip] = 1 - votes[flip]
    return out


def vote_probabilities(shape: tuple[int, int], boxes: list[list[int]], candidates: list, *,
                       n_classes: int, confidence: float = 0.8) -> np.ndarray:
    """Soft labelling of an image from its boxes' candidate votes, as CRF unaries.

    Inside a box of class ``c`` the object evidence of a pixel is the fraction of the box's
    candidates that contain it (:func:`consensus_patch` thresholds the same fraction);
    overlapping boxes of one class take the largest fraction, and the background evidence
    is one minus the largest object evidence. Outside every box the pixel is background.
    Crowd / ignore boxes get no evidence (uniform). The evidence is then mixed with the
    uniform distribution, ``p = confidence * evidence + (1 - confidence) / n_classes``, so
    that the CRF can overturn it where the image says otherwise.

    Returns
    -------
    ndarray of float32, shape (n_classes, h, w)
        Probabilities summing to one at every pixel.
    """
    if not 0.0 < confidence <= 1.0:
        raise ValueError(f"confidence must be in (0, 1], got {confidence!r}")
    h, w = shape
    objects = np.zeros((n_classes, h, w), np.float64)
    inside = np.zeros((h, w), bool)
    void = np.zeros((h, w), bool)
    for (y0, y1, x0, x1, label, ign), cands in zip(boxes, candidates, strict=True):
        if ign:
            void[y0:y1, x0:x1] = True
            continue
        if not 0 < label < n_classes:
            raise ValueError(f"box label {label} outside 1..{n_classes - 1}")
        inside[y0:y1, x0:x1] = True
        if cands is None or cands.masks.shape[0] == 0:
            continue
        by0, by1, bx0, bx1 = cands.box
        fraction = cands.masks[:, by0:by1, bx0:bx1].mean(0, dtype=np.float64)
        region = objects[label, y0:y1, x0:x1]
        np.maximum(region, fraction, out=region)
    evidence = objects
    evidence[0] = 1.0 - objects[1:].max(0)
    evidence[0][~inside] = 1.0
    evidence[:, void & ~inside] = 1.0 / n_classes
    evidence /= evidence.sum(0, keepdims=True)
    return (confidence * evidence + (1.0 - confidence) / n_classes).astype(np.float32)


def crf_relabel(image: np.ndarray, boxes: list[list[int]], probs: np.ndarray, *,
                previous: np.ndarray | None = None, crf=None, min_fill: float = 0.1,
                ignore_below: float | None = None):
    """Relabel every box from per-pixel probabilities refined by a dense CRF.

    "Simple Does It" (Khoreva et al. 2017, Sec. 3.1) recursive training: the network's
    output is post-processed with a dense CRF, then (1) pixels outside every box are
    background, (2) a box's object is the CRF's pixels of the box's class inside the box
    (clipped to it), (3) a box whose relabelled object covers less than ``min_fill`` of
    the box falls back to its ``previous`` mask (Box^i when there is none). Boxes are
    painted largest first, so a smaller box lies on top of a larger one it overlaps; crowd /
    ignore boxes are void.

    Parameters
    ----------
    image : ndarray of uint8, shape (h, w, 3)
        The image at the resolution of ``probs`` and ``boxes``.
    boxes : list of [y0, y1, x0, x1, label, ignore]
    probs : ndarray (C, h, w)
        Probabilities (the network's, or :func:`vote_probabilities`).
    previous : ndarray of uint8 (h, w), optional
        The previous round's training labels (255 = ignored), for the fallback.
    crf : unsup.crf.DenseCRF or False, optional
        The CRF (default parameters when None; False = no CRF, the argmax of ``probs``).
    min_fill : float
        Fallback threshold on the fraction of the box the relabelled object covers.
    ignore_below : float, optional
        Box pixels whose CRF marginal of the chosen class is below this are ignored.

    Returns
    -------
    labels : ndarray of uint8, shape (h, w)
    choices : list of dict
        Per box: ``{"kind": "crf" | "previous" | "box_i", "fill", "iou_box", ...}`` (the
        object lies inside its box, so its IoU with the box is its fill).
    """
    from unsup.crf import DenseCRF
    from unsup.training import IGNORE

    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must have shape (C, {image.shape[0]}, {image.shape[1]}) like "
                         f"the image, got {probs.shape}")
    if crf is False:
        refined, marginals = probs.argmax(0), probs
    else:
        crf = DenseCRF() if crf is None else crf
        result = crf.refine(image, scores=probs, return_probabilities=ignore_below is not None)
        refined, marginals = result.labels, result.probabilities
        if marginals is not None and result.label_ids.size != probs.shape[0]:
            # the CRF ran on the channels present only: back to one channel per class
            full = np.zeros(probs.shape, np.float32)
            full[result.label_ids] = marginals
            marginals = full
    confident = None
    if ignore_below is not None:
        confident = marginals.max(0) >= float(ignore_below)
    labels, choices, order = _start_labels(refined.shape, boxes)
    for i in order:
        y0, y1, x0, x1, label, _ = boxes[i]
        obj = refined[y0:y1, x0:x1] == label
        fill = float(obj.mean())
        if fill >= min_fill:
            patch = np.where(obj, np.uint8(label), np.uint8(0))
            if confident is not None:
                patch[~confident[y0:y1, x0:x1]] = IGNORE
            choices[i] = {"candidate": None, "kind": "crf", "fill": fill, "iou_box": fill}
        elif previous is not None:
            before = previous[y0:y1, x0:x1]
            patch = np.where(before == label, np.uint8(label), np.uint8(0))
            patch[before == IGNORE] = IGNORE
            kept = float((before == label).mean())
            choices[i] = {"candidate": None, "kind": "previous", "fill": kept,
                          "iou_box": kept, "crf_fill": fill}
        else:
            patch = _box_i_patch((y1 - y0, x1 - x0), label)
            kept = float((patch == label).mean())
            choices[i] = {"candidate": None, "kind": "box_i", "fill": kept, "iou_box": kept,
                          "crf_fill": fill}
        _paste(labels[y0:y1, x0:x1], patch)
    return labels, choices


def _mining_crf(spec):
    """The DenseCRF (or False for none) of a ``mining_crf`` parameter value."""
    from unsup.crf import DenseCRF

    if spec is None:
        return DenseCRF(**MINING_CRF)
    if spec is False:
        return False
    if isinstance(spec, str):
        if spec.strip().lower() in ("none", "off", "argmax"):
            return False
        items = [part for part in spec.replace(";", ",").split(",") if part.strip()]
        try:
            return DenseCRF.from_params(items)
        except ValueError as exc:
            raise ValueError(f"boxsup: mining_crf={spec!r}: {exc}") from None
    try:
        return DenseCRF(**dict(spec))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"boxsup: mining_crf={spec!r}: {exc}") from None


def ignore_untight(labels: np.ndarray, boxes: list[list[int]]) -> np.ndarray:
    """Ignore the background pixels of box rows and columns that hold none of the box's class.

    A tight box touches its object on all four sides, so every row and every column of the
    box contains at least one object pixel (the tightness prior of Hsu et al., NeurIPS
    2019). Where a mined mask leaves a whole row or column of a box without the box's class,
    the mask is wrong there (typically thin parts such as legs that every candidate missed):
    its background pixels in that row or column become ``IGNORE`` instead of teaching the
    network that they are background. Returns a new label map; ``labels`` is not modified.
    Crowd / ignore boxes are skipped.
    """
    from unsup.training import IGNORE

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


#: Multiplier separating a pixel's class (low byte) from its box code in tightness targets.
BOX_CODE_BASE = 256


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
    for j in _paint_order(boxes):
        y0, y1, x0, x1, label, _ = boxes[j]
        codes[y0:y1, x0:x1] = 1 + int(label) + BOX_CODE_BASE * j
    packed = labels.astype(np.int64) + BOX_CODE_BASE * codes
    if packed.max(initial=0) > np.iinfo(np.int32).max:
        raise ValueError("too many boxes in one image to pack into int32 targets")
    return packed.astype(np.int32)


def tightness_loss(logits, box_codes, *, alpha: float | None = None, min_side: int = 1):
    """Multiple-instance loss of the box tightness prior (Hsu et al., NeurIPS 2019).

    Every row and every column crossing a tight box of class ``c`` contains an object pixel:
    for each such line the loss is ``-log max_{pixels of the line in the box} p_c``, averaged
    over all lines of all boxes in the batch. With ``alpha`` the maximum is replaced by the
    alpha-softmax smooth maximum ``sum_i p_i exp(alpha p_i) / sum_i exp(alpha p_i)`` of Wang &
    Xia (MICCAI 2021), which passes a gradient to every pixel of the line instead of one.

    After cropping, a box's extent is recovered from its pixels; rows are used only when the
    box is not cut by the crop's left or right edge (else the object part of a row may lie
    outside the crop), columns likewise for the top and bottom edges.

    Parameters
    ----------
    logits : Tensor, shape (N, C, H, W)
    box_codes : Tensor of int64, shape (N, H, W)
        ``box_code`` of :func:`encode_box_targets` (0 = no box).
    alpha : float, optional
        Sharpness of the smooth maximum; None = the hard maximum.
    min_side : int
        Boxes whose extent in the crop is below this on either side contribute no lines
        (specks: a few-pixel box says nothing about where the object is on its lines).

    Returns
    -------
    Tensor (scalar); zero (with a gradient) when no line qualifies.
    """
    import torch

    def line_terms(block, dim):
        if alpha is None:
            return -block.max(dim=dim).values
        probs = block.exp()
        weights = torch.softmax(alpha * probs, dim=dim)
        return -torch.log((weights * probs).sum(dim=dim).clamp_min(1e-12))

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
                terms.append(line_terms(block, 1))
            if y0 > 0 and y1 < h:
                terms.append(line_terms(block, 0))
    if not terms:
        return logits.sum() * 0.0
    return torch.cat(terms).mean()


def pairwise_color_loss(logits, images, box_codes, *, max_color_distance: float = 8.0,
                        dilations: tuple[int, ...] = (1, 2)):
    """Pairwise term of BoxInst (Tian et al., CVPR 2021) inside boxes: neighbouring pixels of
    nearly the same colour should get the same class.

    For every pixel pair ``(i, j)`` at horizontal / vertical offsets ``dilations`` whose RGB
    distance is below ``max_color_distance`` (0..255 scale) and which both lie in a box, the
    loss is ``-log sum_c p_i(c) p_j(c)`` (the probability that both take the same class),
    averaged over such pairs. It gives the ignored pixels of the mined masks a signal from
    their labelled, similarly coloured neighbours.
    """
    import torch

    log_p = torch.log_softmax(logits.float(), dim=1)
    inside = box_codes > 0
    images = images.float()
    terms = []
    for d in dilations:
        for dy, dx in ((0, d), (d, 0)):
            h, w = logits.shape[2] - dy, logits.shape[3] - dx
            a = (slice(None), slice(None), slice(0, h), slice(0, w))
            b = (slice(None), slice(None), slice(dy, dy + h), slice(dx, dx + w))
            close = (images[a] - images[b]).pow(2).sum(1).sqrt() < max_color_distance
            keep = close & inside[:, 0:h, 0:w] & inside[:, dy:dy + h, dx:dx + w]
            if not bool(keep.any()):
                continue
            same = torch.logsumexp(log_p[a] + log_p[b], dim=1)
            terms.append(-same[keep])
    if not terms:
        return logits.sum() * 0.0
    return torch.cat(terms).mean()


def add_network_candidates(candidates: list, boxes: list[list[int]], probs: np.ndarray) -> list:
    """Append to each box's candidates the network's own segment: the pixels of the context
    window whose most probable class is the box's class (a "Simple Does It"-style recursive
    candidate, still chosen by the BoxSup cost)."""
    from unsup.proposals import BoxCandidates

    labels = probs.argmax(0)
    out = []
    for cands, box in zip(candidates, boxes, strict=True):
        if cands is None:
            out.append(None)
            continue
        wy0, wy1, wx0, wx1 = cands.window
        mine = labels[wy0:wy1, wx0:wx1] == box[4]
        out.append(BoxCandidates(window=cands.window, box=cands.box,
                                 masks=np.concatenate([cands.masks, mine[None]]),
                                 names=[*cands.names, "network"]))
    return out


def _pack_candidates(cands_list) -> dict[str, np.ndarray]:
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


def _unpack_candidates(path: Path, n_boxes: int) -> list:
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


@register
class BoxSup(NetworkMethod):
    """Segmentation network trained from boxes by candidate-mask mining (BoxSup).

    Parameters
    ----------
    rounds : int
        Mask-mining rounds: round 0 uses the candidates only; the masks are re-mined with
        the network after every ``ceil(epochs / rounds)`` epochs.
    first_round_epochs : int, optional
        Epochs trained on the round-0 masks (None = ``ceil(epochs / rounds)``); the other
        epochs are shared evenly by the later rounds. Moving the re-mining of 20 epochs from
        epoch 10 to 6 or 14 did not help on the Weizmann Horse validation split (seed 0:
        0.826 / 0.831 vs 0.832; docs/benchmarks/boxsup.md, session 7).
    cost_weight : float
        Weight of the network term in the selection cost (BoxSup's lambda).
    ignore_top : int
        2: ignore the box pixels where the two cheapest candidates disagree; 1: hard masks.
    min_fill : float
        Chosen masks covering less of their box fall back to Box^i.
    sample_top : int
        Draw among this many cheapest candidates (1 = always the cheapest).
    context : float
        Context margin of the proposals (fraction of the box size).
    network_candidate : bool
        From round 1 on, add the network's own segment (pixels of the box's class in the
        context window) to each box's candidates (an extension in the spirit of "Simple
        Does It"'s recursive training; off = the paper's candidate pool).
    selection : {"consensus", "cost"}
        How a box's mask comes from its candidates (:func:`mine_masks`): ``cost`` = the
        BoxSup paper's choice of one candidate (box overlap, then + network term);
        ``consensus`` (default) = "Simple Does It" M∩G+-style agreement of all candidates,
        disagreement ignored; the network enters the later rounds through
        ``network_fill`` / ``network_candidate``. On Weizmann Horse (train split) the
        consensus masks were far closer to the true masks (0.86 vs 0.65-0.69 foreground IoU;
        docs/benchmarks/boxsup.md).
    agreement : (float, float)
        Background / object vote thresholds of ``consensus`` ((0, 1) = unanimity).
    network_fill : float, optional
        ``consensus``, rounds after the first: the box pixels the candidates leave undecided
        take the network's class where its probability is at least this (None = never;
        without it the later rounds repeat round 0's masks).
    network_override : float, optional
        ``consensus``, rounds after the first: box pixels the candidates agree on switch
        class (object <-> background) where the network gives the other class at least this
        probability (None = they stay fixed, as before session 6). Why: all candidates miss
        the same thin parts, and the consensus then labels them background with certainty;
        a network trained with the tightness prior finds many of them. A box whose agreed
        pixels the network would flip by more than ``OVERRIDE_MAX_FLIPS`` keeps them. On the
        Weizmann Horse validation split 0.9 raised the round-1 masks' foreground IoU from
        0.899 to 0.912 (seed 0) and the network's from 0.825 to 0.828 (3 seeds, higher on
        each); test ratio 0.962 -> 0.964 (5 seeds); docs/benchmarks/boxsup.md, session 6.
    network_ignore : float, optional
        ``consensus``, rounds after the first: box pixels the candidates agree on become
        ignored where the network gives the other class at least this probability but does
        not flip them ("Simple Does It"-style ignore region for pixels in dispute; None =
        off, the default). Same per-box guard as ``network_override``. Not on by default: on
        the Weizmann Horse validation split 0.7 raised the round-1 masks' foreground IoU
        from 0.912 to 0.929 (seed 0) but not the network's (0.8278 -> 0.8280, 3 seeds; test
        ratio 0.964 -> 0.962, 5 seeds); docs/benchmarks/boxsup.md, session 7.
    mining_ema : float, optional
        Re-mine with an exponential moving average of the network's weights (this decay per
        training step, warmed up as ``min(decay, (1 + t) / (10 + t))``) instead of the
        current weights: a smoother teacher, as in BoxTeacher (Cheng et al. 2023). None (the
        default) = the current weights. The trained model is always the network itself.
        Not on by default: on the Weizmann Horse validation split 0.99 raised the round-1
        masks' foreground IoU from 0.895 to 0.905 but not the network's (0.832 vs 0.833,
        seed 0; docs/benchmarks/boxsup.md, session 9).
    recursion : {"fill", "crf"}
        How rounds after the first relabel the boxes. ``fill``: the candidates' vote stays
        and ``network_fill`` decides its undecided pixels. ``crf`` ("Simple Does It"
        recursive training): every box is relabelled from the network's prediction refined
        by a dense CRF, clipped to the box, background outside all boxes; a box whose new
        object covers less than ``relabel_min_fill`` of it keeps its previous mask
        (:func:`crf_relabel`).
    round0_crf : bool
        Refine the round-0 masks with a dense CRF over the candidates' votes
        (:func:`vote_probabilities`, then :func:`crf_relabel` with the vote as fallback).
    mining_crf : dict or str, optional
        :class:`unsup.crf.DenseCRF` parameters of the mining CRF (``recursion="crf"``,
        ``round0_crf``): a mapping or ``"key=value,key=value"``; None = ``MINING_CRF`` (a
        lighter, shorter-range CRF than the segment-time defaults, chosen on the Weizmann
        Horse training split); False / ``"argmax"`` = no CRF (the network's argmax).
    relabel_min_fill : float
        Fallback threshold of ``recursion="crf"`` / ``round0_crf``.
    tightness_weight : float
        Weight of the box tightness prior's multiple-instance loss (:func:`tightness_loss`,
        Hsu et al. 2019) added to the cross-entropy on the mined masks: every row and column
        of a box should contain an object pixel. 0 = off (the BoxSup paper's training).
    tightness_alpha : float, optional
        None (default) = the hard maximum over each line; a number = Wang & Xia's
        alpha-softmax smooth maximum with that sharpness. Not on by default: on the Weizmann
        Horse validation split alpha 4 gave 0.824 vs 0.825 mean foreground IoU (3 seeds) and
        alpha 8 0.828 vs 0.827 (seed 0 only; docs/benchmarks/boxsup.md, session 6).
    tightness_min_side : int
        Boxes narrower than this (in pixels of the training crop) on either side get no
        tightness lines. Boxes derived from masks include specks of a few pixels (on the
        Weizmann Horse training split 58 of 280 boxes are 1-12 pixels at the working
        resolution), and with the final network their lines made 40% of the prior's loss
        and its spikes late in training. 4 (the default) raised the validation foreground
        IoU from 0.8278 to 0.8313 (3 seeds; 1 = every box, as before session 7);
        docs/benchmarks/boxsup.md, session 7.
    tightness_ignore : bool
        Ignore the mined background pixels of box rows / columns without any object pixel
        (:func:`ignore_untight`), so the masks do not contradict the tightness prior.
        Why both are on by default: the candidates miss thin parts (horse legs) together, so
        the consensus labels them background; on the Weizmann Horse validation split (3
        seeds) the ignore rule raised foreground IoU from 0.802 to 0.816 and the loss at
        weight 0.2 to 0.825 (weight 0.5: 0.817, 1: 0.796 on seed 0); see
        docs/benchmarks/boxsup.md, session 5. Set ``tightness_weight=0,
        tightness_ignore=False, pairwise_weight=0, network_override=None`` for the BoxSup
        paper's training.
    pairwise_weight : float
        Weight of BoxInst's pairwise colour term inside boxes (:func:`pairwise_color_loss`);
        0 (default) = off. At 0.5 it passed the validation rule of the tightness weight by a
        hair (0.826 vs 0.825 mean foreground IoU over 3 seeds), left the Horse test ratio
        unchanged (0.963) and lowered COCO's mIoU (0.339 vs 0.357), so it is not on by
        default (docs/benchmarks/boxsup.md, session 5).
    select_best : bool
        Keep the weights of the epoch with the best validation mIoU (uses validation
        *masks*; off by default so that nothing depends on masks).
    decoder, backbone, pretrained, n_classes, epochs, batch_size, crop_size, max_side,
    scale_range, hflip, color_jitter, lr, weight_decay, encoder_lr_scale, freeze_blocks,
    dice_weight, class_weighting, patience, flip_test, num_workers, device, seed
        As for ``supervised`` (:class:`methods.supervised.Supervised`); ``n_classes``
        defaults to the largest box label + 1.
    """

    name = "boxsup"
    summary = "segmentation network trained from bounding boxes (BoxSup candidate mining)"
    supervision = "boxes"

    def __init__(self, *, rounds: int = 2, first_round_epochs: int | None = None,
                 cost_weight: float = 1.0, ignore_top: int = 2,
                 min_fill: float = 0.05, sample_top: int = 1, context: float = 0.25,
                 network_candidate: bool = False, selection: str = "consensus",
                 agreement=(0.0, 1.0), network_fill: float | None = 0.9,
                 recursion: str = "fill", round0_crf: bool = False,
                 mining_crf=None, relabel_min_fill: float = 0.1,
                 tightness_weight: float = 0.2, tightness_alpha: float | None = None,
                 tightness_ignore: bool = True, tightness_min_side: int = 4,
                 network_override: float | None = 0.9,
                 network_ignore: float | None = None,
                 mining_ema: float | None = None,
                 pairwise_weight: float = 0.0,
                 select_best: bool = False,
                 decoder: str = "unet",
                 backbone: str = "efficientnet-lite0", pretrained: bool = True,
                 n_classes: int | None = None, epochs: int = 20, batch_size: int = 8,
                 crop_size: int = 224, max_side: int = 320, scale_range=(0.7, 1.3),
                 hflip: bool = True, color_jitter: float = 0.2, lr: float = 1e-3,
                 weight_decay: float = 1e-4, encoder_lr_scale: float = 0.1,
                 freeze_blocks: int = 0, dice_weight: float = 0.0,
                 class_weighting: str = "none", patience: int | None = None,
                 flip_test: bool = True, num_workers: int = 0, device: str | None = None,
                 seed: int = 0):
        self.rounds = rounds
        self.first_round_epochs = first_round_epochs
        self.cost_weight = cost_weight
        self.ignore_top = ignore_top
        self.min_fill = min_fill
        self.sample_top = sample_top
        self.context = context
        self.network_candidate = network_candidate
        self.selection = selection
        self.agreement = agreement
        self.network_fill = network_fill
        self.network_override = network_override
        self.network_ignore = network_ignore
        self.mining_ema = mining_ema
        self.recursion = recursion
        self.round0_crf = round0_crf
        self.mining_crf = mining_crf
        self.relabel_min_fill = relabel_min_fill
        self.tightness_weight = tightness_weight
        self.tightness_alpha = tightness_alpha
        self.tightness_ignore = tightness_ignore
        self.tightness_min_side = tightness_min_side
        self.pairwise_weight = pairwise_weight
        self.select_best = select_best
        self.decoder = decoder
        self.backbone = backbone
        self.pretrained = pretrained
        self.n_classes = n_classes
        self.epochs = epochs
        self.batch_size = batch_size
        self.crop_size = crop_size
        self.max_side = max_side
        self.scale_range = scale_range
        self.hflip = hflip
        self.color_jitter = color_jitter
        self.lr = lr
        self.weight_decay = weight_decay
        self.encoder_lr_scale = encoder_lr_scale
        self.freeze_blocks = freeze_blocks
        self.dice_weight = dice_weight
        self.class_weighting = class_weighting
        self.patience = patience
        self.flip_test = flip_test
        self.num_workers = num_workers
        self.device = device
        self.seed = seed

    # -- caching: image, boxes and candidates (never the masks) --------------------------------
    def _fingerprint(self) -> dict:
        return {"kind": "boxes", "max_side": self.max_side, "context": self.context}

    def _prepare_item(self, sample, index, shape, cache_dir, small_image) -> dict:
        from unsup.proposals import box_candidates

        if sample.boxes is None:
            raise ValueError(f"{sample.path}: sample has no boxes; train boxsup with `unsup "
                             "train --method boxsup --data SPEC --boxes PATH` (or "
                             "--boxes-from-masks) and segment with --model MODEL_DIR")
        boxes = scale_boxes(sample.boxes, sample.image.shape[:2], shape)
        cands = [None if b[5] else box_candidates(small_image, tuple(b[:4]),
                                                  context=self.context, seed=self.seed + j)
                 for j, b in enumerate(boxes)]
        path = Path(cache_dir) / "extra" / f"{index:06d}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        from unsup.io import atomic_write_path

        with atomic_write_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **_pack_candidates(cands))
        labels = [b[4] for b in boxes if not b[5]]
        return {"boxes": boxes, "max_label": max(labels, default=0)}

    # -- rounds -------------------------------------------------------------------------------
    def _round_of(self, epoch: int, epochs: int) -> int:
        """The mining round that epoch ``epoch`` (0-based) of ``epochs`` trains on."""
        rounds = max(int(self.rounds), 1)
        first = self.first_round_epochs
        if first is None or rounds == 1:
            return min(epoch // max(1, math.ceil(epochs / rounds)), rounds - 1)
        if epoch < first:
            return 0
        per_round = max(1, math.ceil((epochs - first) / (rounds - 1)))
        return min(1 + (epoch - first) // per_round, rounds - 1)

    def mined_dir(self, out_dir, round_index: int) -> Path:
        return Path(out_dir) / "mined" / f"round_{round_index}"

    def _mine(self, cache: SampleCache, out_dir: Path, round_index: int, model=None,
              progress: bool = False) -> dict:
        """Mine every image's masks for ``round_index`` (with the network when given)."""
        from tqdm import tqdm

        from unsup.io import atomic_write_bytes, read_label_map, write_label_map, write_overlay
        from unsup.models import predict_probabilities

        if self.recursion not in ("fill", "crf"):
            raise ValueError(f"boxsup: recursion must be 'fill' or 'crf', got "
                             f"{self.recursion!r}")
        crf = _mining_crf(self.mining_crf)
        n_classes = max(int(self.n_classes or 0), self._n_classes_from(cache))

        target = self.mined_dir(out_dir, round_index)
        previous = self.mined_dir(out_dir, round_index - 1) if round_index > 0 else None
        prev_choices = {}
        if previous is not None and (previous / "choices.json").is_file():
            prev_choices = json.loads((previous / "choices.json").read_text())
        rng = np.random.default_rng([int(self.seed), int(round_index), 0xB0C5])
        # "crf" recursion relabels the later rounds itself: the vote is not relabelled
        relabel = {} if self.recursion == "crf" else {
            "network_fill": self.network_fill, "network_override": self.network_override,
            "network_ignore": self.network_ignore}
        # consensus selection uses the probabilities only for a network candidate or relabelling
        uses_network = (self.selection != "consensus" or self.network_candidate
                        or any(v is not None for v in relabel.values()))
        all_choices, kinds, fills, ious, changed, n_boxes = {}, {}, [], [], 0, 0
        bar = tqdm(range(len(cache)), desc=f"boxsup: mining round {round_index}",
                   unit="img", disable=not progress, leave=False)
        for i in bar:
            item = cache.items[i]
            boxes = item["boxes"]
            cands = _unpack_candidates(cache.extra_path(i, ".npz"), len(boxes))
            image = cache.image(i)
            probs = None
            if model is not None and uses_network:
                # no test-time flip here: mining runs over the whole training set each round
                # (flipping was tried: validation fg IoU 0.826 vs 0.827, session 6)
                probs = predict_probabilities(model, image)
                if self.network_candidate:
                    cands = add_network_candidates(cands, boxes, probs)
            if self.recursion == "crf" and model is not None and round_index > 0:
                # "Simple Does It" recursion: every box from the network + CRF; the previous
                # round's mask is the fallback of boxes the network (nearly) misses
                probs = predict_probabilities(model, image, flip=True)
                before = read_label_map(previous / "labels" / f"{item['id']}.png")
                labels, choices = crf_relabel(image, boxes, probs, previous=before, crf=crf,
                                              min_fill=self.relabel_min_fill)
            else:
                labels, choices = mine_masks(
                    tuple(item["shape"]), boxes, cands, probs=probs,
                    cost_weight=self.cost_weight, ignore_top=self.ignore_top,
                    min_fill=self.min_fill, sample_top=self.sample_top, rng=rng,
                    selection=self.selection, agreement=tuple(self.agreement), **relabel)
                if self.round0_crf and round_index == 0:
                    votes = vote_probabilities(tuple(item["shape"]), boxes, cands,
                                               n_classes=n_classes)
                    labels, choices = crf_relabel(image, boxes, votes, previous=labels,
                                                  crf=crf, min_fill=self.relabel_min_fill)
            if self.tightness_ignore:
                labels = ignore_untight(labels, boxes)
            write_label_map(target / "labels" / f"{item['id']}.png", labels)
            write_overlay(target / "overlays" / f"{item['id']}.png", image, labels)
            all_choices[item["id"]] = choices
            before = prev_choices.get(item["id"])
            for j, ch in enumerate(choices):
                if not ch:
                    continue
                n_boxes += 1
                kinds[ch["kind"]] = kinds.get(ch["kind"], 0) + 1
                fills.append(ch.get("fill", 0.0))
                ious.append(ch.get("iou_box", 0.0))
                if before is not None and before[j].get("candidate") != ch.get("candidate"):
                    changed += 1
        summary = {"round": round_index, "images": len(cache), "boxes": n_boxes,
                   "kinds": kinds, "mean_fill": float(np.mean(fills)) if fills else None,
                   "mean_iou_box": float(np.mean(ious)) if ious else None,
                   # candidate changes; a CRF relabelling chooses no candidate
                   "changed_fraction": (changed / n_boxes if n_boxes and prev_choices
                                        and not (self.recursion == "crf" and round_index > 0)
                                        else None),
                   "with_network": model is not None}
        atomic_write_bytes(target / "choices.json", json.dumps(all_choices).encode())
        atomic_write_bytes(target / "summary.json", json.dumps(summary, indent=2).encode())
        return summary

    # -- NetworkMethod hooks ------------------------------------------------------------------
    def _fit(self, samples, val_samples, out_dir, epochs, max_minutes, resume, progress):
        # (name, (low, high, high allowed), None allowed, what the error asks for)
        for name, (low, high, high_ok), optional, rule in (
                ("tightness_weight", (0.0, math.inf, True), False, "a number >= 0 (0 = off)"),
                ("pairwise_weight", (0.0, math.inf, True), False, "a number >= 0 (0 = off)"),
                ("tightness_alpha", (0.0, math.inf, True), True, "a number > 0 or None (off)"),
                ("tightness_min_side", (1, math.inf, True), False, "a number of pixels >= 1"),
                ("network_fill", (0.0, 1.0, True), True,
                 "a probability in (0, 1] or None (off)"),
                ("network_override", (0.0, 1.0, True), True,
                 "a probability in (0, 1] or None (off)"),
                ("network_ignore", (0.0, 1.0, True), True,
                 "a probability in (0, 1] or None (off)"),
                ("mining_ema", (0.0, 1.0, False), True, "a decay in (0, 1) or None (off)")):
            value = getattr(self, name)
            if value is None and optional:
                continue
            # the options that may be None are off with None, so 0 is refused for them
            in_range = isinstance(value, int | float) and (
                (low < value if optional else low <= value)
                and (value <= high if high_ok else value < high))
            if not in_range:
                raise ValueError(f"boxsup: {name} must be {rule}, got {value!r}")
        first = self.first_round_epochs
        if first is not None and int(self.rounds) > 1 and not (
                isinstance(first, int) and not isinstance(first, bool) and 1 <= first < epochs):
            raise ValueError(f"boxsup: first_round_epochs must be an integer in 1..{epochs - 1} "
                             f"(epochs - 1) or None, got {first!r}")
        self._run = {"out_dir": Path(out_dir), "epochs": epochs, "progress": progress}
        return super()._fit(samples, val_samples, out_dir, epochs, max_minutes, resume,
                            progress)

    def _target_loader(self, cache: SampleCache):
        from unsup.io import read_label_map

        state = self._run
        state["round"] = 0

        def load_pair(i):
            folder = self.mined_dir(state["out_dir"], state["round"])
            labels = read_label_map(folder / "labels" / f"{cache.items[i]['id']}.png")
            if self._packs_boxes():  # the boxes ride along through the augmentation
                labels = encode_box_targets(labels, cache.items[i]["boxes"])
            return cache.image(i), labels

        return load_pair

    def _packs_boxes(self) -> bool:
        return self.tightness_weight > 0 or self.pairwise_weight > 0

    def _batches(self, make_batches, cache, out_dir):
        state = self._run
        epochs = state["epochs"]
        if not (self.mined_dir(out_dir, 0) / "summary.json").is_file():
            self._mine(cache, out_dir, 0, progress=state["progress"])

        def batches(epoch, start=0):
            round_index = self._round_of(epoch, epochs)
            if not (self.mined_dir(out_dir, round_index) / "summary.json").is_file():
                # a resumed run (or one whose epochs changed) reaches a round that was not
                # mined at the end of the previous epoch: mine it now, from the same weights
                self._mine(cache, out_dir, round_index, model=state["task"].mining_model,
                           progress=state["progress"])
            state["round"] = round_index
            return make_batches(epoch, start=start)

        batches.steps_per_epoch = make_batches.steps_per_epoch
        return batches

    def _make_task(self, network, *, cache, val_cache, n_classes, total_steps, out_dir,
                   epochs):
        from unsup.training import SegmentationTask

        method = self

        class BoxSupTask(SegmentationTask):
            mined_stats: dict = {}
            teacher = None  # the weight average that re-mines (mining_ema)
            ema_steps = 0

            @property
            def mining_model(self):
                return self.model if self.teacher is None else self.teacher

            def train_step(self, batch) -> dict[str, float]:
                out = super().train_step(batch)
                if self.teacher is not None:
                    self._update_teacher()
                return out

            def _update_teacher(self) -> None:
                import torch

                t = self.ema_steps
                decay = min(float(method.mining_ema), (1.0 + t) / (10.0 + t))
                with torch.no_grad():
                    for avg, now in zip(self.teacher.state_dict().values(),
                                        self.model.state_dict().values(), strict=True):
                        if avg.dtype.is_floating_point:
                            avg.mul_(decay).add_(now.detach(), alpha=1.0 - decay)
                        else:  # e.g. batch-norm step counters
                            avg.copy_(now)
                self.ema_steps = t + 1

            def state_dict(self) -> dict:
                state = super().state_dict()
                if self.teacher is not None:
                    state["teacher"] = self.teacher.state_dict()
                    state["teacher_steps"] = self.ema_steps
                return state

            def load_state_dict(self, state: dict) -> None:
                super().load_state_dict(state)
                if self.teacher is not None and "teacher" in state:
                    self.teacher.load_state_dict(state["teacher"])
                    self.ema_steps = int(state["teacher_steps"])

            def compute_loss(self, logits, targets, *, images=None):
                if not method._packs_boxes():
                    return super().compute_loss(logits, targets, images=images)
                labels, box_codes = targets % BOX_CODE_BASE, targets // BOX_CODE_BASE
                loss, parts = super().compute_loss(logits, labels, images=images)
                if method.tightness_weight > 0:
                    tight = tightness_loss(logits, box_codes, alpha=method.tightness_alpha,
                                           min_side=method.tightness_min_side)
                    loss = loss + method.tightness_weight * tight
                    parts["tightness"] = float(tight.detach())
                if method.pairwise_weight > 0:
                    pair = pairwise_color_loss(logits, images, box_codes)
                    loss = loss + method.pairwise_weight * pair
                    parts["pairwise"] = float(pair.detach())
                return loss, parts

            def end_epoch(self, epoch: int) -> None:
                next_round = method._round_of(epoch + 1, epochs)
                if epoch + 1 < epochs and next_round > method._round_of(epoch, epochs):
                    summary = method._mine(cache, out_dir, next_round,
                                           model=self.mining_model,
                                           progress=method._run["progress"])
                    self.mined_stats = {"mined_changed": float(summary["changed_fraction"]
                                                               or 0.0),
                                        "mined_fill": float(summary["mean_fill"] or 0.0)}

            def validate(self) -> dict:
                out = super().validate()
                out.update(self.mined_stats)
                self.mined_stats = {}
                return out

        task = BoxSupTask(network, lr=self.lr, weight_decay=self.weight_decay,
                          encoder_lr_scale=self.encoder_lr_scale, total_steps=total_steps,
                          warmup_steps=min(total_steps // 10, 50),
                          class_weights=self._class_weights(cache, n_classes),
                          dice_weight=self.dice_weight,
                          validator=self._validator(val_cache, n_classes),
                          device=self._device())
        if self.mining_ema is not None:
            import copy

            task.teacher = copy.deepcopy(task.model).eval()
            for parameter in task.teacher.parameters():
                parameter.requires_grad_(False)
        self._run["task"] = task
        return task

    def _monitor(self, has_val: bool):
        return "miou" if has_val and self.select_best else None

    def _class_weights(self, cache, n_classes):
        if self.class_weighting in (None, "none"):
            return None
        raise ValueError("boxsup: class_weighting='balanced' needs label statistics of the "
                         "mined masks, which change every round; use 'none'")
