"""Superpixel geometry of `jule`: adjacency, thick superpixels, pooling and the contour map.

The lab's one-pixel-wide ultrametric contour map format (:mod:`unsup.hierarchy`) represents a
region hierarchy exactly only when every region is *thick* (:func:`thicken_superpixels`);
:func:`dendrogram_ucm` turns JULE's dendrogram over such superpixels into that map.
"""

from __future__ import annotations

import numpy as np

__all__ = ["superpixel_adjacency", "thicken_superpixels", "relabel", "working_shape",
           "pixel_to_working", "pooling_matrix", "dendrogram_ucm", "UCM_MAX"]

UCM_MAX = 65535


def superpixel_adjacency(superpixels: np.ndarray) -> np.ndarray:
    """Pairs ``(p, q)``, ``p < q``, of 4-adjacent superpixels, shape (m, 2), sorted."""
    sp = np.asarray(superpixels)
    pairs = [np.stack([sp[:, :-1].ravel(), sp[:, 1:].ravel()], 1),
             np.stack([sp[:-1, :].ravel(), sp[1:, :].ravel()], 1)]
    pairs = np.concatenate(pairs)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs = np.sort(pairs, axis=1)
    return np.unique(pairs, axis=0).astype(np.int64) if len(pairs) else np.zeros((0, 2), np.int64)


def thicken_superpixels(superpixels: np.ndarray, *, max_iter: int = 20) -> np.ndarray:
    """Remove one-pixel-thin parts of a superpixel map so every region is *thick*.

    A pixel is kept when it lies in some 2x2 square of its own superpixel; other pixels take the
    most frequent label among their 8 neighbours that are kept, repeatedly. Pieces cut off
    become superpixels of their own (4-connected components), ids ``0..n-1``. Thick regions
    are what the lab's one-pixel-wide contour map format represents exactly
    (:mod:`unsup.hierarchy`); SLIC and Felzenszwalb boundaries are jagged and often are not.
    """
    from skimage.measure import label as connected

    sp = np.asarray(superpixels).astype(np.int64)
    h, w = sp.shape
    if h < 2 or w < 2:
        return relabel(sp)
    for _ in range(max_iter):
        same = ((sp[:-1, :-1] == sp[1:, :-1]) & (sp[:-1, :-1] == sp[:-1, 1:])
                & (sp[:-1, :-1] == sp[1:, 1:]))  # 2x2 square with top-left (y, x) uniform
        ok = np.zeros((h, w), bool)
        ok[:-1, :-1] |= same
        ok[:-1, 1:] |= same
        ok[1:, :-1] |= same
        ok[1:, 1:] |= same
        bad = np.flatnonzero(~ok.ravel())
        if bad.size == 0:
            break
        ys, xs = np.divmod(bad, w)
        n_lab = int(sp.max()) + 1
        votes = {}
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy == 0 and dx == 0:
                    continue
                yy, xx = ys + dy, xs + dx
                inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                yy, xx = np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)
                good = inside & ok[yy, xx]
                key = np.arange(bad.size) * n_lab + sp[yy, xx]
                for k in key[good]:
                    votes[k] = votes.get(k, 0) + 1
        if not votes:
            break
        keys = np.fromiter(votes, np.int64)
        counts = np.fromiter(votes.values(), np.int64)
        order = np.lexsort((keys % n_lab, -counts, keys // n_lab))
        keys = keys[order]
        first = np.ones(keys.size, bool)
        first[1:] = keys[1:] // n_lab != keys[:-1] // n_lab
        which, new = keys[first] // n_lab, keys[first] % n_lab
        flat = sp.ravel()
        flat[bad[which]] = new
        sp = flat.reshape(h, w)
    return relabel(connected(sp + 1, connectivity=1, background=0) - 1)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Ids ``0..n-1`` in increasing order of the old ids (int32)."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(np.shape(labels)).astype(np.int32)


def working_shape(shape, max_side):
    """(h, w) with the longer side at most ``max_side`` (unchanged if already small)."""
    h, w = int(shape[0]), int(shape[1])
    if not max_side or max(h, w) <= int(max_side):
        return h, w
    s = int(max_side) / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def pixel_to_working(shape, work) -> np.ndarray:
    """Flat index of the working-resolution pixel containing each full-resolution pixel."""
    h, w = shape
    wh, ww = work
    ys = np.minimum(((np.arange(h) + 0.5) * (wh / h)).astype(np.int64), wh - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * (ww / w)).astype(np.int64), ww - 1)
    return ys[:, None] * ww + xs[None, :]


def pooling_matrix(superpixels: np.ndarray, cells: np.ndarray, n_cells: int):
    """Sparse (n_sp, n_cells) torch matrix averaging per-cell values over each superpixel.

    ``cells`` gives the cell (working pixel or feature cell) of every full-resolution pixel;
    entry (s, c) is the fraction of superpixel ``s``'s pixels that fall in cell ``c``, so the
    product with per-cell features is the exact superpixel mean of the upsampled
    (nearest-neighbour) features.
    """
    import torch

    sp = np.asarray(superpixels).ravel()
    n_sp = int(sp.max()) + 1
    key = sp.astype(np.int64) * n_cells + np.asarray(cells).ravel()
    uniq, counts = np.unique(key, return_counts=True)
    rows, cols = uniq // n_cells, uniq % n_cells
    size = np.bincount(sp, minlength=n_sp).astype(np.float64)
    vals = counts / size[rows]
    idx = torch.from_numpy(np.stack([rows, cols]))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(vals.astype(np.float32)),
                                   (n_sp, n_cells), check_invariants=False).coalesce()


def dendrogram_ucm(superpixels: np.ndarray, dendrogram, *, levels: str = "affinity"
                   ) -> np.ndarray:
    """Ultrametric contour map (uint16, lab format) of a superpixel dendrogram.

    A boundary between superpixels ``u`` and ``v`` disappears at the level of the merge that
    first joins their clusters (1.0 if they never join; no boundary when they start in the same
    initial cluster). Lab convention: pixel ``p`` carries the boundaries with its right and
    lower neighbours (the larger level when both are boundaries). The lab's cut
    (:func:`unsup.hierarchy.cut_ultrametric_map`) reproduces every merge's partition exactly
    when all superpixels are thick (see :func:`thicken_superpixels`, which ``Jule`` applies).
    """
    sp = np.asarray(superpixels)
    lv = dendrogram.levels(levels)
    lv_ext = np.concatenate([lv, [1.0]])  # "never joined" -> level 1
    init = dendrogram.initial_labels
    pairs = superpixel_adjacency(sp)
    if len(pairs) == 0:
        return np.zeros(sp.shape, np.uint16)
    steps = dendrogram.join_step(init[pairs])
    pair_level = np.where(steps < 0, 0.0, lv_ext[np.maximum(steps, 0)])
    values = np.where(steps < 0, 0, np.maximum(1, np.round(pair_level * UCM_MAX))).astype(
        np.int64)
    n_sp = int(sp.max()) + 1
    key = pairs[:, 0] * n_sp + pairs[:, 1]
    order = np.argsort(key)
    key_sorted = key[order]
    ucm = np.zeros(sp.shape, np.int64)
    for axis in (1, 0):
        a = sp[:, :-1] if axis == 1 else sp[:-1, :]
        b = sp[:, 1:] if axis == 1 else sp[1:, :]
        diff = a != b
        lo, hi = np.minimum(a[diff], b[diff]), np.maximum(a[diff], b[diff])
        pos = order[np.searchsorted(key_sorted, lo.astype(np.int64) * n_sp + hi)]
        target = ucm[:, :-1] if axis == 1 else ucm[:-1, :]
        target[diff] = np.maximum(target[diff], values[pos])
    return ucm.astype(np.uint16)
