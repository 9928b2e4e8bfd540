"""Hierarchical merging of any method's regions into an ultrametric contour map (UCM).

The BSDS numbers of W-Net and gPb-owt-ucm (Arbelaez, Maire, Fowlkes & Malik, TPAMI 2011) are
measured on a *hierarchy* of segmentations rather than on one partition: regions are merged
greedily, weakest boundary first, and every boundary pixel remembers the level at which its two
sides merged. Thresholding that map at a level gives the segmentation at that level; the
benchmark picks the best level per dataset (ODS) or per image (OIS). This module builds such a
map from the output of *any* method, so every method can be evaluated the same way.

Format (the lab's ``unsup-ucm`` hierarchy format, written by ``unsup segment --hierarchy`` as
16-bit PNGs ``OUT/hierarchy/<id>.png``):

* an (H, W) ``uint16`` array, the size of the image; 0 = no boundary, ``v > 0`` = a boundary
  that survives up to level ``v / 65535`` (levels lie in [0, 1]);
* boundary pixels sit on one side of each boundary: pixel ``p`` carries the boundaries between
  ``p`` and its right neighbour and between ``p`` and its lower neighbour (the maximum of the
  two levels when both are boundaries);
* :func:`cut_ultrametric_map` is THE definition of the segmentation at a level, used by the
  runner's users and by the evaluation harness alike.

Merging (:func:`ultrametric_contour_map`)
----------------------------------------
1. Leaves: the 4-connected components of the input labels (a label present in two separate
   pieces gives two leaves).
2. Every pair of 4-adjacent pixels ``(p, q)`` in different leaves gets a dissimilarity in
   [0, 1]:

   * ``strength="scores"``: the total-variation distance of the method's per-pixel class
     probabilities, ``0.5 * sum_c |P_p(c) - P_q(c)|`` (1 = the two pixels are surely in
     different classes, 0 = identical distributions);
   * ``strength="gradient"``: ``g / (g + gradient_scale)`` where ``g`` is the mean over the two
     pixels of the CIELAB gradient magnitude (Gaussian derivatives at scale
     ``gradient_sigma`` per L*, a*, b* channel, combined in quadrature; units: Delta E per
     pixel). With the default scale 10, a crisp edge of Delta E ~ 25 gets about 0.5.
   * ``strength="combined"``: the geometric mean of the two, so a boundary is strong only
     when the class probabilities *and* the image both change there (needs scores). It
     helps methods whose softmax is confident everywhere (W-Net: the scores alone make a
     poor merge order), see docs/benchmarks/wnet.md.
   * ``"auto"`` (default): scores when the segmentation has them, the gradient otherwise.
     ``unsup segment --hierarchy`` lets a method override it (its ``hierarchy_strength``
     attribute, :func:`unsup.runner.hierarchy_strength_for`) and the user override both
     (``--hierarchy-strength``).

3. The strength of the boundary between two regions is the mean dissimilarity over all its
   pixel pairs (OWT-UCM's mean contour strength along an arc). Regions are merged greedily,
   weakest boundary first; after a merge the boundaries of the new region are the unions of
   the old ones, so their means are recomputed from summed strengths and pair counts (a region
   adjacency graph with mean-boundary weights, as in ``skimage.graph.merge_hierarchical``).
4. The level of a merge is the running maximum of the merge costs (costs are not monotone
   after recomputation; the running maximum makes the map a valid ultrametric: thresholding is
   nested). Every boundary pixel pair gets the level at which its two leaves first belong to
   one region. A boundary merged at cost 0 keeps the smallest positive value 1 so that the
   finest level (threshold 0) still separates all leaves.

The greedy loop is written with a heap and small-to-large dictionary merging instead of
``skimage.graph`` because ``skimage.graph.RAG`` is a networkx graph: building it per pixel and
merging thousands of fine leaves (a CNN's argmax easily gives 2000+) takes seconds per BSDS
image, and ``merge_hierarchical`` does not report the merge levels a UCM needs.

Cutting (:func:`cut_ultrametric_map`) and what is exact
-------------------------------------------------------
1. Leaves are recovered from the map alone: the 4-connected components of the non-boundary
   pixels (value 0). A boundary pixel takes the leaf of its left neighbour when that neighbour
   is not a boundary pixel, else of its upper neighbour when that is not a boundary pixel, else
   of its upper-left neighbour when that is not a boundary pixel, else of the nearest labelled
   pixel (Euclidean distance, ties by scan order).
2. Two adjacent leaves are joined at threshold ``t`` when some pixel pair ``(p, q)`` between
   them (``q`` right of or below ``p``) has ``value(p) <= t * 65535`` -- the pixel that
   carries that pair's boundary. Connected components of this leaf graph are the regions.

Because step 2 thresholds fixed leaf-graph weights, the cuts at increasing thresholds are
always nested (every region at ``t`` lies inside one region at ``t' > t``).

The finest level (threshold 0) reproduces the input's 4-connected components exactly (same
partition, ids renumbered in scan order) when every region is *thick*: each of its pixels lies
in a 2x2 square of pixels of that region, and its pixels whose right and lower neighbours are
in the region (i.e. its non-boundary pixels) form a 4-connected set. Proof sketch of the
assignment rule: a non-boundary pixel's right and lower neighbours are in its own region, so a
non-boundary left (upper) neighbour of a boundary pixel is in the boundary pixel's region; if
both are boundary pixels, thickness forces the pixel to be the lower-right corner of a 2x2
square of its region whose upper-left pixel is non-boundary. Regions one pixel thin, or thick
regions joined only through a diagonal step, can be absorbed or split: a single-resolution map
cannot represent them (BSDS's ``ucm2`` doubles the resolution for that reason).
Every level ``L`` of the greedy merge is reproduced exactly by ``cut(L)`` when the finest level
is exact and every merge has at least one pixel pair not at a junction of three leaves (then
the stored value of that pair is its own merge level; values never understate a pair's level).
"""

from __future__ import annotations

import heapq
import numbers
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from unsup.base import Segmentation
from unsup.clustering import first_occurrence_order

__all__ = [
    "UCM_MAX",
    "ultrametric_contour_map",
    "cut_ultrametric_map",
    "UltrametricHierarchy",
    "region_leaves",
    "merge_regions",
]

#: The value of level 1.0 in the uint16 map.
UCM_MAX = 65535

STRENGTHS = ("auto", "scores", "gradient", "combined")


# ------------------------------------------------------------------------------------------
# building the map


def region_leaves(labels: np.ndarray) -> np.ndarray:
    """4-connected components of a label map, numbered ``0..n-1`` in scan order (int32).

    A label id that occurs in two separate places gives two components. Any integer values
    (negative ones included) are allowed. The one connected-components routine of the lab:
    the ``matched`` protocol splits predictions and ground truth with it too.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) array, got shape {labels.shape}")
    if labels.size == 0:
        return np.zeros(labels.shape, np.int32)
    from skimage.measure import label as sk_label

    # skimage joins equal neighbours except the background value, so pick one that never occurs
    values = labels.astype(np.int64, copy=False)
    components = sk_label(values, background=int(values.min()) - 1, connectivity=1)
    # renumber by first pixel, so ids do not depend on skimage's own numbering
    return first_occurrence_order(components.ravel()).reshape(labels.shape).astype(np.int32)


def _adjacent_pairs(leaves: np.ndarray):
    """Flat indices (p, q) of 4-adjacent pixel pairs in different leaves, q right of / below p."""
    h, w = leaves.shape
    index = np.arange(h * w).reshape(h, w)
    horizontal = leaves[:, :-1] != leaves[:, 1:]
    vertical = leaves[:-1, :] != leaves[1:, :]
    p = np.concatenate([index[:, :-1][horizontal], index[:-1, :][vertical]])
    q = np.concatenate([index[:, 1:][horizontal], index[1:, :][vertical]])
    return p, q


def _score_dissimilarity(scores: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total-variation distance between the class distributions at pixels p and q."""
    flat = scores.reshape(scores.shape[0], -1)
    out = np.empty(p.size, np.float64)
    # chunks keep the (C, chunk) temporaries small for many-channel scores
    step = 65536
    for start in range(0, p.size, step):
        sl = slice(start, start + step)
        out[sl] = 0.5 * np.abs(flat[:, p[sl]] - flat[:, q[sl]]).sum(axis=0, dtype=np.float64)
    return np.clip(out, 0.0, 1.0)


def _gradient_magnitude(image: np.ndarray, sigma: float) -> np.ndarray:
    """CIELAB gradient magnitude (Delta E per pixel) with Gaussian derivatives at ``sigma``."""
    from skimage.color import rgb2lab

    lab = rgb2lab(image)
    squared = np.zeros(image.shape[:2], np.float64)
    for c in range(3):
        squared += ndimage.gaussian_gradient_magnitude(lab[..., c], sigma, mode="nearest") ** 2
    return np.sqrt(squared)


def _gradient_dissimilarity(image, p, q, *, sigma: float, scale: float) -> np.ndarray:
    magnitude = _gradient_magnitude(image, sigma).ravel()
    g = 0.5 * (magnitude[p] + magnitude[q])
    return g / (g + scale)


def merge_regions(edge_a: np.ndarray, edge_b: np.ndarray, edge_sum: np.ndarray,
                  edge_count: np.ndarray) -> np.ndarray:
    """Greedy mean-boundary merging of a region adjacency graph; the level of every edge.

    Parameters
    ----------
    edge_a, edge_b : ndarray of int, shape (E,)
        Leaf ids of each adjacent pair (``edge_a < edge_b``, each pair once).
    edge_sum, edge_count : ndarray, shape (E,)
        Sum of the pixel-pair dissimilarities along the boundary, and the number of pairs.

    Returns
    -------
    levels : ndarray of float64, shape (E,)
        The level at which the two leaves of each edge first belong to one region: the running
        maximum of the merge costs (mean boundary dissimilarity of the two regions merged).
    """
    n_edges = len(edge_a)
    levels = np.zeros(n_edges, np.float64)
    if n_edges == 0:
        return levels
    # record per adjacent region pair: [sum, count, leaf-edge ids, stamp]
    neighbours: dict[int, dict[int, list]] = {}
    heap: list = []
    seq = 0
    for e in range(n_edges):
        a, b = int(edge_a[e]), int(edge_b[e])
        record = [float(edge_sum[e]), int(edge_count[e]), [e], 0]
        neighbours.setdefault(a, {})[b] = record
        neighbours.setdefault(b, {})[a] = record
        heap.append((record[0] / record[1], seq, a, b, record, 0))
        seq += 1
    heapq.heapify(heap)
    level = 0.0
    while heap:
        cost, _, a, b, record, stamp = heapq.heappop(heap)
        if record[3] != stamp or neighbours.get(a, {}).get(b) is not record:
            continue  # stale entry: the record changed or an endpoint was merged away
        level = max(level, cost)
        levels[record[2]] = level
        # merge the smaller adjacency dict into the larger (small-to-large keeps it O(E log E))
        if len(neighbours[a]) < len(neighbours[b]):
            a, b = b, a
        keep, gone = neighbours[a], neighbours.pop(b)
        del keep[b]
        del gone[a]
        for c, moved in gone.items():
            other = neighbours[c]
            del other[b]
            existing = keep.get(c)
            if existing is None:
                keep[c] = moved
                other[a] = moved
                target = moved
            else:
                existing[0] += moved[0]
                existing[1] += moved[1]
                if len(existing[2]) < len(moved[2]):
                    existing[2], moved[2] = moved[2], existing[2]
                existing[2].extend(moved[2])
                target = existing
            target[3] += 1
            heapq.heappush(heap, (target[0] / target[1], seq, min(a, c), max(a, c), target,
                                  target[3]))
            seq += 1
    return levels


def ultrametric_contour_map(image: np.ndarray, segmentation, *, strength: str = "auto",
                            gradient_sigma: float = 1.0,
                            gradient_scale: float = 10.0) -> np.ndarray:
    """Merge a segmentation's regions hierarchically into an ultrametric contour map.

    Parameters
    ----------
    image : ndarray of uint8, shape (H, W, 3)
        The RGB image (used by the gradient strength).
    segmentation : unsup.base.Segmentation or ndarray of int, shape (H, W)
        The finest level: a method's output (its ``scores`` are used when present and
        ``strength`` allows) or a plain label map.
    strength : {"auto", "scores", "gradient", "combined"}
        Pixel-pair dissimilarity (see the module docstring); ``"auto"`` uses the scores when
        there are any, the image gradient otherwise.
    gradient_sigma : float
        Scale (pixels) of the Gaussian derivatives of the gradient strength.
    gradient_scale : float
        Delta E per pixel that maps to dissimilarity 0.5 in the gradient strength.

    Returns
    -------
    ucm : ndarray of uint16, shape (H, W)
        0 = no boundary; ``v`` = boundary merged at level ``v / 65535``. Cut it with
        :func:`cut_ultrametric_map`.
    """
    if isinstance(segmentation, Segmentation):
        labels, scores = segmentation.labels, segmentation.scores
    else:
        labels, scores = np.asarray(segmentation), None
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError("segmentation must be a unsup.base.Segmentation or a 2-D integer "
                             f"label map, got {labels.dtype} array of shape {labels.shape}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an RGB uint8 array (H, W, 3), got {image.dtype} "
                         f"{image.shape}")
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image is {image.shape[:2]} but the labels are {labels.shape}")
    if strength not in STRENGTHS:
        raise ValueError(f"strength must be one of {STRENGTHS}, got {strength!r}")
    if strength == "scores" and scores is None:
        raise ValueError("strength='scores' needs a segmentation with per-pixel scores")
    if gradient_sigma <= 0 or gradient_scale <= 0:
        raise ValueError("gradient_sigma and gradient_scale must be positive")
    use_scores = scores is not None and strength in ("auto", "scores")

    h, w = labels.shape
    ucm = np.zeros(h * w, np.uint16)
    leaves = region_leaves(labels)
    p, q = _adjacent_pairs(leaves)
    if p.size == 0:
        return ucm.reshape(h, w)
    if strength == "combined":
        if scores is None:
            raise ValueError("strength='combined' needs a segmentation with per-pixel scores")
        # geometric mean: a boundary is strong only when both signals support it
        dissimilarity = np.sqrt(_score_dissimilarity(scores, p, q) * _gradient_dissimilarity(
            image, p, q, sigma=float(gradient_sigma), scale=float(gradient_scale)))
    elif use_scores:
        dissimilarity = _score_dissimilarity(scores, p, q)
    else:
        dissimilarity = _gradient_dissimilarity(image, p, q, sigma=float(gradient_sigma),
                                                scale=float(gradient_scale))
    flat = leaves.ravel()
    a, b = flat[p].astype(np.int64), flat[q].astype(np.int64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    n_leaves = int(flat.max()) + 1
    keys, pair_edge = np.unique(lo * n_leaves + hi, return_inverse=True)
    edge_sum = np.bincount(pair_edge, weights=dissimilarity, minlength=keys.size)
    edge_count = np.bincount(pair_edge, minlength=keys.size)
    levels = merge_regions(keys // n_leaves, keys % n_leaves, edge_sum, edge_count)
    values = np.maximum(1, np.rint(np.clip(levels, 0.0, 1.0) * UCM_MAX)).astype(np.uint16)
    np.maximum.at(ucm, p, values[pair_edge])
    return ucm.reshape(h, w)


# ------------------------------------------------------------------------------------------
# cutting the map


class UltrametricHierarchy:
    """The leaves and leaf graph of an ultrametric contour map, for cutting it at many levels.

    ``UltrametricHierarchy(ucm).cut(t)`` equals ``cut_ultrametric_map(ucm, t)``; building the
    object once and cutting it at many thresholds (an ODS/OIS sweep) skips recomputing the
    leaves each time.

    Parameters
    ----------
    ucm : ndarray, shape (H, W)
        Unsigned integer map (values ``0..65535``, level = value / 65535), or a float map of
        levels in [0, 1].

    Attributes
    ----------
    leaves : ndarray of int32, shape (H, W)
        The finest regions, ``0..n_leaves-1`` in scan order.
    edge_a, edge_b : ndarray of int64
        Adjacent leaf pairs.
    edge_level : ndarray of float64
        Level (in [0, 1]) at which each pair is joined.
    """

    def __init__(self, ucm: np.ndarray):
        ucm = np.asarray(ucm)
        if ucm.ndim != 2:
            raise ValueError(f"an ultrametric contour map must be 2-D, got shape {ucm.shape}")
        if np.issubdtype(ucm.dtype, np.integer):
            if ucm.size and (ucm.min() < 0 or ucm.max() > UCM_MAX):
                raise ValueError(f"integer ultrametric map values must lie in 0..{UCM_MAX}")
            levels = ucm.astype(np.float64) / UCM_MAX
        elif np.issubdtype(ucm.dtype, np.floating):
            if ucm.size and not (np.isfinite(ucm).all() and ucm.min() >= 0 and ucm.max() <= 1):
                raise ValueError("float ultrametric map values must be levels in [0, 1]")
            levels = ucm.astype(np.float64)
        else:
            raise ValueError(f"ultrametric map must be integer or float, got {ucm.dtype}")
        self.shape = ucm.shape
        self.leaves = _recover_leaves(levels > 0)
        self.n_leaves = int(self.leaves.max()) + 1 if self.leaves.size else 0
        p, q = _adjacent_pairs(self.leaves)
        flat = self.leaves.ravel()
        a, b = flat[p].astype(np.int64), flat[q].astype(np.int64)
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        pair_level = levels.ravel()[p]  # the pixel that carries the pair's boundary
        keys = lo * max(self.n_leaves, 1) + hi
        order = np.lexsort((pair_level, keys))
        keys, pair_level = keys[order], pair_level[order]
        first = np.ones(keys.size, bool)
        first[1:] = keys[1:] != keys[:-1]
        self.edge_a = keys[first] // max(self.n_leaves, 1)
        self.edge_b = keys[first] % max(self.n_leaves, 1)
        self.edge_level = pair_level[first]  # minimum over the pairs of each leaf pair

    @property
    def levels(self) -> np.ndarray:
        """Sorted distinct positive levels at which the segmentation changes."""
        return np.unique(self.edge_level[self.edge_level > 0])

    def cut(self, threshold: float) -> np.ndarray:
        """The segmentation at ``threshold``: boundaries of level > threshold are kept.

        Returns
        -------
        labels : ndarray of int32, shape (H, W)
            Region ids ``0..n-1``, numbered in scan order of the regions' first pixel.
        """
        if not isinstance(threshold, numbers.Real) or not np.isfinite(threshold):
            raise ValueError(f"threshold must be a finite real number, got {threshold!r}")
        if self.n_leaves == 0:
            return self.leaves.copy()
        joined = self.edge_level <= float(threshold)
        graph = coo_matrix((np.ones(int(joined.sum()), np.int8),
                            (self.edge_a[joined], self.edge_b[joined])),
                           shape=(self.n_leaves, self.n_leaves))
        _, component = connected_components(graph, directed=False)
        # components are numbered by their smallest leaf, and leaves in scan order
        _, component = np.unique(component, return_inverse=True)
        return component.astype(np.int32)[self.leaves]


def _recover_leaves(boundary: np.ndarray) -> np.ndarray:
    """Finest regions from a boundary mask (see the module docstring, "Cutting")."""
    h, w = boundary.shape
    if boundary.size == 0:
        return np.zeros(boundary.shape, np.int32)
    components, n = ndimage.label(~boundary)  # 4-connectivity; 0 on boundary pixels
    if n == 0:  # no interior pixel at all: one region
        return np.zeros(boundary.shape, np.int32)
    leaves = components.astype(np.int32) - 1  # -1 = unresolved boundary pixel
    unresolved = boundary.copy()
    # neighbours in priority order: left, up, up-left; a non-boundary neighbour there is in
    # the boundary pixel's own region (module docstring)
    for dy, dx in ((0, -1), (-1, 0), (-1, -1)):
        neighbour = np.full((h, w), -1, np.int32)  # leaf of the pixel at (y + dy, x + dx)
        neighbour[-dy:, -dx:] = components[:h + dy, :w + dx] - 1
        take = unresolved & (neighbour >= 0)
        leaves[take] = neighbour[take]
        unresolved &= ~take
    if unresolved.any():
        _, (iy, ix) = ndimage.distance_transform_edt(unresolved, return_indices=True)
        leaves[unresolved] = leaves[iy[unresolved], ix[unresolved]]
    # renumber in scan order of first pixel so ids do not depend on the rule above
    return first_occurrence_order(leaves.ravel()).reshape(leaves.shape).astype(np.int32)


def cut_ultrametric_map(ucm: np.ndarray, threshold: float | Sequence[float]):
    """The segmentation of an ultrametric contour map at a level (THE lab definition).

    Parameters
    ----------
    ucm : ndarray, shape (H, W)
        A map from :func:`ultrametric_contour_map` (uint16, level = value / 65535) or a float
        map of levels in [0, 1].
    threshold : float or sequence of float
        Level in [0, 1]: boundaries of level > threshold separate regions, weaker ones are
        merged away. 0 gives the finest level, 1 a single region.

    Returns
    -------
    labels : ndarray of int32, shape (H, W), or a list of them (one per threshold)
        Region ids ``0..n-1`` in scan order of each region's first pixel.
    """
    hierarchy = UltrametricHierarchy(ucm)
    if isinstance(threshold, numbers.Real):
        return hierarchy.cut(threshold)
    return [hierarchy.cut(t) for t in threshold]
