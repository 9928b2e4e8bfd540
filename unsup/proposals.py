"""Candidate object masks for a bounding box, from unsupervised proposals.

Used by box-supervised training (``boxsup``): each box gets a small pool of candidate
segments; a candidate is chosen per box by its overlap with the box and, later, its agreement
with the network being trained.

Candidates are computed on a *context window* (the box enlarged by ``context`` of its size
on each side, clipped to the image) so that a candidate may extend beyond its box: then its
IoU with the box measures how well it fits the box (as BoxSup's MCG segments do), instead of
always preferring the fullest mask. Kinds of candidates:

``grabcut``
    OpenCV GrabCut (Rother, Kolmogorov & Blake, SIGGRAPH 2004) initialised with the box as
    its rectangle, with 1 and 5 iterations (everything outside the box is background). The
    random initialisation of its colour models is seeded (``cv2.setRNGSeed``).
``grabcut+sp``
    The 5-iteration GrabCut mask snapped to Felzenszwalb superpixels (majority vote), so its
    boundary follows image edges.
``colour``
    Unions of Felzenszwalb-Huttenlocher superpixels (several scales) whose mean
    foreground / background colour log-likelihood ratio exceeds a threshold. The colour
    models are smoothed 3-D RGB histograms of the box interior (foreground, contaminated by
    background) and of the ring of the context window outside the box (background).
``box``
    The filled box itself: kept as a fallback (and a baseline), not a regular candidate,
    because its IoU with the box is 1 by construction.

All masks are boolean arrays over the context window; :class:`BoxCandidates` records where
the window and the box are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["BoxCandidates", "box_candidates", "context_window", "box_iou_scores",
           "colour_log_ratio"]

GRABCUT_ITERATIONS = (5,)
FELZENSZWALB_SCALES = (50.0, 150.0)
COLOUR_THRESHOLDS = (0.5, 1.0)


@dataclass
class BoxCandidates:
    """Candidate masks of one box.

    Attributes
    ----------
    window : (y0, y1, x0, x1)
        The context window in image coordinates.
    box : (y0, y1, x0, x1)
        The box in window coordinates.
    masks : ndarray of bool, shape (K, h, w)
        Candidates over the window (``K`` may be 0).
    names : list of str
        Kind of each candidate.
    """

    window: tuple[int, int, int, int]
    box: tuple[int, int, int, int]
    masks: np.ndarray
    names: list[str] = field(default_factory=list)

    @property
    def box_mask(self) -> np.ndarray:
        h, w = self.masks.shape[1:] if self.masks.ndim == 3 else self.window_shape
        m = np.zeros((h, w), bool)
        y0, y1, x0, x1 = self.box
        m[y0:y1, x0:x1] = True
        return m

    @property
    def window_shape(self) -> tuple[int, int]:
        y0, y1, x0, x1 = self.window
        return y1 - y0, x1 - x0


def context_window(box_yx: tuple[int, int, int, int], shape: tuple[int, int],
                   context: float) -> tuple[int, int, int, int]:
    """The box (y0, y1, x0, x1) enlarged by ``context`` x its size per side, in the image."""
    y0, y1, x0, x1 = box_yx
    dy = int(np.ceil(context * (y1 - y0))) + 2
    dx = int(np.ceil(context * (x1 - x0))) + 2
    return max(0, y0 - dy), min(shape[0], y1 + dy), max(0, x0 - dx), min(shape[1], x1 + dx)


def colour_log_ratio(image: np.ndarray, inside: np.ndarray, *, bins: int = 16,
                     smoothing: float = 1.0) -> np.ndarray:
    """Per-pixel ``log p(colour | inside) - log p(colour | outside)`` from RGB histograms.

    ``bins`` per channel, Gaussian-smoothed by ``smoothing`` bins, with one pseudo-count per
    bin so unseen colours get a finite ratio.
    """
    from scipy import ndimage

    q = (image.astype(np.int32) * bins) // 256
    idx = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    n = bins ** 3

    def model(sel):
        h = np.bincount(idx[sel].ravel(), minlength=n).astype(np.float64).reshape(bins, bins, bins)
        if smoothing > 0:
            h = ndimage.gaussian_filter(h, smoothing, mode="constant")
        h += 1.0 / n
        return np.log(h / h.sum()).ravel()

    fg, bg = model(inside), model(~inside)
    return (fg - bg)[idx]


def _grabcut(window_image: np.ndarray, box, iterations: int, seed: int) -> np.ndarray | None:
    import cv2

    y0, y1, x0, x1 = box
    h, w = window_image.shape[:2]
    # GrabCut needs background samples outside the rectangle: shrink a box that fills the
    # whole window by one pixel per side
    if y0 == 0 and x0 == 0 and y1 == h and x1 == w:
        if h < 4 or w < 4:
            return None
        y0, y1, x0, x1 = 1, h - 1, 1, w - 1
    if y1 - y0 < 2 or x1 - x0 < 2:
        return None
    mask = np.zeros((h, w), np.uint8)
    bgd = np.zeros((1, 65), np.float64)
    fgd = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(int(seed))
    try:
        cv2.grabCut(np.ascontiguousarray(window_image), mask, (int(x0), int(y0),
                    int(x1 - x0), int(y1 - y0)), bgd, fgd, int(iterations),
                    cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        # degenerate colour statistics (e.g. a flat image): no GrabCut candidate
        return None
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def box_candidates(image: np.ndarray, box_yx: tuple[int, int, int, int], *,
                   context: float = 0.25, grabcut_iterations=GRABCUT_ITERATIONS,
                   felzenszwalb_scales=FELZENSZWALB_SCALES,
                   colour_thresholds=COLOUR_THRESHOLDS, min_pixels: int = 4,
                   seed: int = 0) -> BoxCandidates:
    """Candidate masks for one box.

    Parameters
    ----------
    image : ndarray of uint8, shape (H, W, 3)
    box_yx : (y0, y1, x0, x1)
        Integer box bounds, half-open, inside the image.
    context : float
        Context window margin as a fraction of the box size.
    grabcut_iterations : sequence of int
        One GrabCut candidate per entry (empty: none).
    felzenszwalb_scales : sequence of float
        Superpixel scales of the ``colour`` and ``grabcut+sp`` candidates.
    colour_thresholds : sequence of float
        Log-likelihood-ratio thresholds of the ``colour`` candidates.
    min_pixels : int
        Candidates with fewer pixels inside the box are dropped, as are duplicates.
    seed : int

    Returns
    -------
    BoxCandidates
        Without the filled box (see :func:`box_iou_scores` and the module docstring).
    """
    from skimage.segmentation import felzenszwalb

    from unsup.superpixels import majority_vote

    H, W = image.shape[:2]
    by0, by1, bx0, bx1 = (int(v) for v in box_yx)
    if not (0 <= by0 < by1 <= H and 0 <= bx0 < bx1 <= W):
        raise ValueError(f"box (y0, y1, x0, x1) = {box_yx} is empty or outside the "
                         f"{W}x{H} image")
    wy0, wy1, wx0, wx1 = context_window((by0, by1, bx0, bx1), (H, W), context)
    win = np.ascontiguousarray(image[wy0:wy1, wx0:wx1])
    box = (by0 - wy0, by1 - wy0, bx0 - wx0, bx1 - wx0)
    h, w = win.shape[:2]
    inside = np.zeros((h, w), bool)
    inside[box[0]:box[1], box[2]:box[3]] = True

    masks: list[np.ndarray] = []
    names: list[str] = []
    grabcuts = {}
    for it in grabcut_iterations:
        m = _grabcut(win, box, it, seed)
        if m is not None:
            grabcuts[it] = m
            masks.append(m)
            names.append(f"grabcut{it}")
    ratio = colour_log_ratio(win, inside) if inside.any() and (~inside).any() else None
    for scale in felzenszwalb_scales:
        sp = felzenszwalb(win, scale=scale, sigma=0.8, min_size=max(10, int(scale / 5)),
                          channel_axis=-1)
        if grabcuts:
            gc = grabcuts[max(grabcuts)]
            masks.append(majority_vote(sp, gc.astype(np.int32)).astype(bool))
            names.append(f"grabcut+sp{scale:g}")
        if ratio is not None:
            n_sp = int(sp.max()) + 1
            counts = np.bincount(sp.ravel(), minlength=n_sp).astype(np.float64)
            mean_ratio = np.bincount(sp.ravel(), weights=ratio.ravel(), minlength=n_sp) / counts
            for t in colour_thresholds:
                masks.append((mean_ratio > t)[sp])
                names.append(f"colour{scale:g}>{t:g}")
    kept, kept_names, seen = [], [], set()
    for m, name in zip(masks, names, strict=True):
        if int((m & inside).sum()) < min_pixels:
            continue
        key = np.packbits(m).tobytes()
        if key in seen:
            continue
        seen.add(key)
        kept.append(m)
        kept_names.append(name)
    stack = np.stack(kept) if kept else np.zeros((0, h, w), bool)
    return BoxCandidates(window=(wy0, wy1, wx0, wx1), box=box, masks=stack, names=kept_names)


def box_iou_scores(candidates: BoxCandidates) -> np.ndarray:
    """IoU of every candidate with its (filled) box, shape (K,)."""
    if candidates.masks.shape[0] == 0:
        return np.zeros(0)
    inside = candidates.box_mask
    m = candidates.masks.reshape(candidates.masks.shape[0], -1)
    b = inside.ravel()
    inter = (m & b).sum(1)
    union = (m | b).sum(1)
    return inter / np.maximum(union, 1)
