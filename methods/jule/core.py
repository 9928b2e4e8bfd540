"""The generic JULE core: recurrent agglomerative clustering with joint representation learning.

Yang, Parikh & Batra, "Joint Unsupervised Learning of Deep Representations and Image Clusters",
CVPR 2016 (arXiv 1604.03628). Works on any set of samples whose representation is produced by
a torch module (:class:`methods.jule.learning.Representation`, where the backward pass
lives); the segmentation method in :mod:`methods.jule.segmentation` and the digits benchmark
both use it.

What is implemented, following the paper:

- **Affinity** (graph degree linkage, Zhang et al., ECCV 2012): a directed ``K_s``-nearest-
  neighbour graph over the L2-normalised embeddings with weights
  ``w(i, j) = exp(-||x_i - x_j||^2 / sigma^2)`` for ``x_j`` among the ``K_s`` nearest
  neighbours of ``x_i``, ``sigma^2 = a * mean`` of those squared distances; the affinity of two
  clusters is ``A(C_i, C_j) = 1/|C_i|^2 1' W_ij W_ji 1 + 1/|C_j|^2 1' W_ji W_ij 1`` (the
  product of average in- and out-degree).
- **Merge criterion** (the paper's forward pass): at each timestep the cluster ``C_i`` that
  maximises ``A(C_i, N_1) + lambda / (K_c - 1) * sum_{k=2..K_c} (A(C_i, N_1) - A(C_i, N_k))``
  is merged with its most affine neighbour ``N_1``, where ``N_1 .. N_{K_c}`` are its ``K_c``
  most affine clusters (missing neighbours count as affinity 0, as in a dense affinity matrix).
- **Schedule**: the run is split into periods; period ``p`` merges ``ceil(eta * n_p)`` times
  (``n_p`` clusters at its start, ``eta`` the unrolling rate), never past ``n_clusters``;
  between periods the representation is updated for ``n_iter_per_period`` iterations and the
  graph and affinities are rebuilt from the new embeddings (the current clusters are kept).
- **Backward pass**: the paper's weighted triplet loss over the current clusters: an anchor
  ``x_i``, a positive ``x_j`` from its cluster and negatives ``x_k``, one from each of the
  ``K_c - 1`` most affine clusters of the anchor's cluster, weighted ``lambda / (K_c - 1)``::

      l_ijk = max(0, margin + gamma * d(x_i, x_j) - d(x_i, x_k))

  with ``d`` the squared distance of L2-normalised embeddings. This is the paper's
  ``-(gamma A(x_i, x_j) - A(x_i, x_k))`` with the sample affinity taken as ``-d`` (monotone in
  the cosine similarity the paper uses) and hinged at a margin as triplet losses are;
  ``gamma = 2`` is ``(1 + lambda) / lambda`` for the paper's ``lambda = 1``.
- **Initial over-clustering**: as in graph degree linkage, the connected components of the
  graph linking every sample to its nearest neighbour (every initial cluster has >= 2 samples).

Adaptations (documented, not in the paper): an optional ``connectivity`` restricts merges to
pairs of clusters that touch (spatial adjacency of superpixels, so that every cluster is
connected), and the touching pairs are added to the affinity graph so that touching clusters
always have a defined affinity; if no pair with a positive affinity is left before the target
count is reached (a disconnected ``K_s``-NN graph), the two allowed clusters with the closest
centroids are merged with affinity 0.

The run keeps the whole merge sequence (:class:`Dendrogram`, scipy-linkage-like ids: initial
clusters ``0..c0-1``, merge ``t`` creates cluster ``c0 + t``) with the affinity, the period and
a monotone level for each merge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from methods.jule.learning import (
    Representation,
    _MemberIndex,
    _MergeTripletSampler,
    _Optimizer,
    _update_representation,
)
from unsup.clustering import first_occurrence_order

__all__ = [
    "Dendrogram",
    "JuleResult",
    "knn_graph",
    "initial_clusters",
    "Agglomeration",
    "run_jule",
    "l2_normalize",
]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit Euclidean norm (float64)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


# ------------------------------------------------------------------------------------------
# graph and initial clusters


def _knn(x: np.ndarray, k: int, *, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest neighbours (excluding self) by squared Euclidean distance.

    Written with numpy (chunked ``x @ x.T``) so the result is deterministic, ties broken by
    index; sklearn/faiss would add threads and nothing else at these sizes (n <= ~20k).
    """
    n = x.shape[0]
    k = min(k, n - 1)
    sq = (x * x).sum(1)
    idx = np.empty((n, k), np.int64)
    dist = np.empty((n, k), np.float64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        d2 = sq[start:stop, None] - 2.0 * x[start:stop] @ x.T + sq[None, :]
        d2[np.arange(stop - start), np.arange(start, stop)] = np.inf
        np.maximum(d2, 0.0, out=d2)
        part = np.argpartition(d2, k - 1, axis=1)[:, :k] if k < n - 1 else \
            np.argsort(d2, axis=1, kind="stable")[:, :k]
        pd = np.take_along_axis(d2, part, axis=1)
        order = np.lexsort((part, pd), axis=1)  # by distance, then index
        idx[start:stop] = np.take_along_axis(part, order, axis=1)
        dist[start:stop] = np.take_along_axis(pd, order, axis=1)
    return idx, dist


def knn_graph(features: np.ndarray, *, k_neighbors: int = 20, a: float = 1.0,
              extra_edges: np.ndarray | None = None) -> sparse.csr_matrix:
    """The directed ``K_s``-NN graph of graph degree linkage, with Gaussian weights.

    Parameters
    ----------
    features : ndarray, shape (n, d)
        Sample embeddings (used as given; JULE passes L2-normalised embeddings).
    k_neighbors : int
        ``K_s``.
    a : float
        ``sigma^2 = a * mean squared distance to the K_s nearest neighbours``.
    extra_edges : ndarray of int, shape (m, 2), optional
        Undirected pairs added to the graph in both directions (e.g. touching superpixels),
        weighted with the same Gaussian.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n, n)
        ``W[i, j] = exp(-d2(i, j) / sigma^2)`` on the edges, 0 elsewhere.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (n, d), got shape {x.shape}")
    n = x.shape[0]
    if n < 2:
        return sparse.csr_matrix((n, n))
    if k_neighbors < 1:
        raise ValueError(f"k_neighbors must be >= 1, got {k_neighbors}")
    if a <= 0:
        raise ValueError(f"the affinity scale a must be > 0, got {a}")
    idx, d2 = _knn(x, int(k_neighbors))
    sigma2 = float(a) * max(float(d2.mean()), 1e-12)
    rows = np.repeat(np.arange(n), idx.shape[1])
    cols = idx.ravel()
    vals = np.exp(-d2.ravel() / sigma2)
    if extra_edges is not None and len(extra_edges):
        e = np.asarray(extra_edges, dtype=np.int64).reshape(-1, 2)
        e = e[e[:, 0] != e[:, 1]]
        ed2 = ((x[e[:, 0]] - x[e[:, 1]]) ** 2).sum(1)
        ew = np.exp(-ed2 / sigma2)
        rows = np.concatenate([rows, e[:, 0], e[:, 1]])
        cols = np.concatenate([cols, e[:, 1], e[:, 0]])
        vals = np.concatenate([vals, ew, ew])
    w = sparse.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()
    # duplicates (an extra edge that is also a k-NN edge) were summed: take the weight once
    w.data = np.minimum(w.data, 1.0) if extra_edges is None else _dedupe_weights(w, x, sigma2)
    w.eliminate_zeros()
    return w


def _dedupe_weights(w: sparse.csr_matrix, x: np.ndarray, sigma2: float) -> np.ndarray:
    rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
    d2 = ((x[rows] - x[w.indices]) ** 2).sum(1)
    return np.exp(-d2 / sigma2)


def initial_clusters(features: np.ndarray, *, connectivity: np.ndarray | None = None
                     ) -> np.ndarray:
    """Initial over-clustering: components of the graph joining each sample to its nearest
    neighbour (among its allowed neighbours when ``connectivity`` pairs are given).

    Returns labels ``0..c0-1`` (int64, shape (n,)), numbered by first sample.
    """
    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    if n == 1:
        return np.zeros(1, np.int64)
    if connectivity is None:
        nn, _ = _knn(x, 1)
        rows, cols = np.arange(n), nn[:, 0]
    else:
        e = np.asarray(connectivity, dtype=np.int64).reshape(-1, 2)
        e = e[e[:, 0] != e[:, 1]]
        if len(e) == 0:
            return np.arange(n, dtype=np.int64)
        both = np.concatenate([e, e[:, ::-1]])
        d2 = ((x[both[:, 0]] - x[both[:, 1]]) ** 2).sum(1)
        order = np.lexsort((both[:, 1], d2, both[:, 0]))  # per source: nearest first
        both = both[order]
        first = np.ones(len(both), bool)
        first[1:] = both[1:, 0] != both[:-1, 0]
        rows, cols = both[first, 0], both[first, 1]
    g = sparse.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(g, directed=True, connection="weak")
    return first_occurrence_order(labels)


# ------------------------------------------------------------------------------------------
# dendrogram


@dataclass
class Dendrogram:
    """The merge sequence of a run.

    Attributes
    ----------
    initial_labels : ndarray of int64, shape (n,)
        Initial cluster id ``0..c0-1`` of every sample.
    merges : ndarray of int64, shape (m, 2)
        The two cluster ids merged at step ``t``; the result gets id ``c0 + t``.
    affinity : ndarray of float64, shape (m,)
        Affinity ``A(C_i, C_j)`` at which each merge happened (0 for fallback merges).
    period : ndarray of int64, shape (m,)
        Period (0-based) of each merge; merges after the last learning period (hierarchy
        completion) carry the last period index.
    """

    initial_labels: np.ndarray
    merges: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    affinity: np.ndarray = field(default_factory=lambda: np.zeros(0))
    period: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def n_initial(self) -> int:
        return int(self.initial_labels.max()) + 1 if self.initial_labels.size else 0

    @property
    def n_merges(self) -> int:
        return int(len(self.merges))

    def levels(self, kind: str = "affinity") -> np.ndarray:
        """A non-decreasing level in [0, 1] for each merge.

        ``"affinity"``: the running maximum of ``1 / (1 + A_t)`` (high affinity = a weak
        boundary = low level); GDL affinities are not monotone along the sequence (and are
        recomputed after each learning period), so the running maximum makes it an ultrametric;
        levels also grow by at least 1/65535 per merge (strictly increasing, capped at 1).
        ``"rank"``: ``(t + 1) / n_merges``, the merge order alone.
        """
        m = self.n_merges
        if m == 0:
            return np.zeros(0)
        if kind == "affinity":
            raw = np.maximum.accumulate(1.0 / (1.0 + np.maximum(self.affinity, 0.0)))
            # strictly increasing by at least one uint16 step, so that every merge is its own
            # level of the contour map (cutting at a merge's level reproduces that partition)
            step = np.arange(m) / 65535.0
            return np.minimum(np.maximum.accumulate(raw - step) + step, 1.0)
        if kind == "rank":
            return np.arange(1, m + 1, dtype=np.float64) / m
        raise ValueError(f"unknown level kind {kind!r}; use 'affinity' or 'rank'")

    def cut(self, n_clusters: int) -> np.ndarray:
        """Sample labels after the merges that leave ``n_clusters`` clusters (or all merges),
        renumbered ``0..k-1`` in order of first sample."""
        c0 = self.n_initial
        n_steps = min(self.n_merges, max(0, c0 - int(n_clusters)))
        return first_occurrence_order(self.labels_after(n_steps))

    def labels_after(self, n_steps: int) -> np.ndarray:
        """Dendrogram cluster id of every sample after the first ``n_steps`` merges."""
        c0 = self.n_initial
        parent = np.arange(c0 + n_steps, dtype=np.int64)
        for t in range(n_steps):
            a, b = self.merges[t]
            parent[a] = parent[b] = c0 + t
        # ids only point to later ids: resolve from the end backwards
        for node in range(c0 + n_steps - 1, -1, -1):
            parent[node] = parent[parent[node]] if parent[node] != node else node
        return parent[self.initial_labels]

    def join_step(self, pairs: np.ndarray) -> np.ndarray:
        """For pairs of initial clusters, the merge step at which they join (``n_merges`` if
        never). ``pairs`` is (k, 2) of initial cluster ids."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        c0, m = self.n_initial, self.n_merges
        out = np.full(len(pairs), m, np.int64)
        # merge small into large, carrying pair ids still open between two clusters
        members: dict[int, list[int]] = {c: [c] for c in range(c0)}
        where = np.arange(c0, dtype=np.int64)
        open_pairs: dict[int, set[int]] = {c: set() for c in range(c0)}
        for p, (u, v) in enumerate(pairs):
            if u == v:
                out[p] = -1
                continue
            open_pairs[int(u)].add(p)
            open_pairs[int(v)].add(p)
        for t in range(m):
            a, b = (int(z) for z in self.merges[t])
            if len(members[a]) < len(members[b]):
                a, b = b, a
            closed = open_pairs[a] & open_pairs[b]
            for p in closed:
                out[p] = t
            merged = (open_pairs[a] | open_pairs[b]) - closed
            ma = members.pop(a)
            mb = members.pop(b)
            ma.extend(mb)
            new = c0 + t
            members[new] = ma
            where[mb] = new
            where[ma] = new
            open_pairs.pop(a)
            open_pairs.pop(b)
            open_pairs[new] = merged
        return out


@dataclass
class JuleResult:
    """Output of :func:`run_jule`.

    Attributes
    ----------
    labels : ndarray of int64, shape (n,)
        Cluster of every sample at ``n_clusters`` (``0..k-1``).
    dendrogram : Dendrogram
    embeddings : ndarray of float64, shape (n, d)
        Final L2-normalised embeddings.
    history : list of dict
        Per period: clusters at start and end, mean loss of the representation update.
    """

    labels: np.ndarray
    dendrogram: Dendrogram
    embeddings: np.ndarray
    history: list


# ------------------------------------------------------------------------------------------
# the agglomeration state (forward pass)


def _sparse_add(ia, va, ib, vb):
    idx = np.concatenate([ia, ib])
    val = np.concatenate([va, vb])
    u, inv = np.unique(idx, return_inverse=True)
    return u, np.bincount(inv, weights=val, minlength=len(u))


class Agglomeration:
    """Graph-degree-linkage agglomeration with JULE's merge criterion.

    The state is kept sparse so that each merge costs in proportion to the graph edges of the
    two clusters involved (a dense cluster-affinity matrix would not fit for ~10k samples).
    For each cluster ``C``: ``in_[C]`` = sum of the rows of ``W`` over ``C`` (edge weight from
    ``C`` into each sample), ``out_[C]`` = sum of the columns (from each sample into ``C``);
    ``X[k, C] = sum_{b in C_k} in_C(b) out_C(b)``, so that
    ``A(C_i, C_j) = X[j, i] / |C_i|^2 + X[i, j] / |C_j|^2``.

    Parameters
    ----------
    w : scipy.sparse matrix (n, n)
        Directed graph weights.
    labels : ndarray of int, shape (n,)
        Current cluster id of each sample (dendrogram ids; any non-negative ints).
    id_capacity : int
        Upper bound (exclusive) of cluster ids that will ever exist.
    k_clusters, locality : int, float
        ``K_c`` and ``lambda`` of the merge criterion.
    cluster_adjacency : iterable of (int, int), optional
        Pairs of cluster ids allowed to merge (and, through merges, their unions); None = all.
    centroid_features : ndarray (n, d), optional
        For the fallback merge when no positive affinity is left.
    """

    def __init__(self, w, labels, *, id_capacity: int, k_clusters: int = 5,
                 locality: float = 1.0, cluster_adjacency=None, centroid_features=None):
        w = sparse.csr_matrix(w, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        self.k_clusters = max(1, int(k_clusters))
        self.locality = float(locality)
        self.labels = labels.copy()
        ids, inverse = np.unique(labels, return_inverse=True)
        c = len(ids)
        n = len(labels)
        self.size = {int(i): int(s) for i, s in zip(ids, np.bincount(inverse, minlength=c), strict=True)}
        member = sparse.csr_matrix((np.ones(n), (inverse, np.arange(n))), shape=(c, n))
        in_m = (member @ w).tocsr()          # row C: weight from C into each sample
        out_m = (member @ w.T.tocsr()).tocsr()  # row C: weight from each sample into C
        in_m.sort_indices()
        out_m.sort_indices()
        p = in_m.multiply(out_m).tocsr()
        xc = (p @ member.T).tocsr()  # xc[C, k] = X[k, C]
        self.in_: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.out_: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.xcol: dict[int, dict[int, float]] = {}
        self.xrow: dict[int, dict[int, float]] = {int(i): {} for i in ids}
        for r, cid in enumerate(ids):
            cid = int(cid)
            s, e = in_m.indptr[r], in_m.indptr[r + 1]
            self.in_[cid] = (in_m.indices[s:e].astype(np.int64), in_m.data[s:e].copy())
            s, e = out_m.indptr[r], out_m.indptr[r + 1]
            self.out_[cid] = (out_m.indices[s:e].astype(np.int64), out_m.data[s:e].copy())
            s, e = xc.indptr[r], xc.indptr[r + 1]
            col = {int(ids[j]): float(v) for j, v in zip(xc.indices[s:e], xc.data[s:e], strict=True)
                   if ids[j] != cid and v > 0}
            self.xcol[cid] = col
        for cid, col in self.xcol.items():
            for k, v in col.items():
                self.xrow[k][cid] = v
        self.restricted = cluster_adjacency is not None
        self.adj: dict[int, set[int]] = {int(i): set() for i in ids}
        if self.restricted:
            for u, v in cluster_adjacency:
                u, v = int(u), int(v)
                if u != v:
                    self.adj[u].add(v)
                    self.adj[v].add(u)
        self.centroid_features = None
        if centroid_features is not None:
            f = np.asarray(centroid_features, dtype=np.float64)
            sums = np.zeros((c, f.shape[1]))
            np.add.at(sums, inverse, f)
            self.centroid_features = {int(i): sums[r] for r, i in enumerate(ids)}
        self.score = np.full(int(id_capacity), -np.inf)
        self.best = np.full(int(id_capacity), -1, np.int64)
        self.best_affinity = np.zeros(int(id_capacity))
        self.rows: dict[int, dict[int, float]] = {}
        for cid in self.size:
            self._rescore(cid)

    # -- affinities ------------------------------------------------------------------------
    def affinity(self, i: int, j: int) -> float:
        """``A(C_i, C_j)``."""
        return (self.xcol[i].get(j, 0.0) / self.size[i] ** 2
                + self.xrow[i].get(j, 0.0) / self.size[j] ** 2)

    def _neighbours(self, i: int):
        if self.restricted:
            return self.adj[i]
        return set(self.xcol[i]) | set(self.xrow[i])

    def _rescore(self, i: int) -> None:
        row = {j: self.affinity(i, j) for j in self._neighbours(i)}
        self.rows[i] = row
        if not row:
            self.score[i] = -np.inf
            self.best[i] = -1
            return
        # top K_c by affinity, ties by id (deterministic)
        items = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[: self.k_clusters]
        a1 = items[0][1]
        if a1 <= 0:  # no positive affinity: left to the centroid fallback (see the docstring)
            self.score[i] = -np.inf
            self.best[i] = -1
            return
        tail = [a for _, a in items[1:]] + [0.0] * (self.k_clusters - len(items))
        bonus = (self.locality / (self.k_clusters - 1) * sum(a1 - a for a in tail)
                 if self.k_clusters > 1 else 0.0)
        self.score[i] = a1 + bonus
        self.best[i] = items[0][0]
        self.best_affinity[i] = a1

    def top_neighbours(self, i: int, k: int) -> list[int]:
        """The ``k`` most affine clusters of ``i`` (allowed pairs only when restricted)."""
        row = self.rows.get(i, {})
        return [j for j, _ in sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]

    @property
    def n_clusters(self) -> int:
        return len(self.size)

    # -- merging ---------------------------------------------------------------------------
    def step(self, new_id: int):
        """Perform the best merge; the result gets ``new_id``.

        Returns ``(i, j, affinity, neighbours)`` with ``neighbours`` the ``K_c`` most affine
        clusters of ``i`` before the merge (``j`` first), or None if no merge is possible.
        """
        i = int(np.argmax(self.score))
        if not np.isfinite(self.score[i]):
            pair = self._fallback_pair()
            if pair is None:
                return None
            i, j = pair
            a = 0.0
            neighbours = [j]
        else:
            j = int(self.best[i])
            a = float(self.best_affinity[i])
            neighbours = self.top_neighbours(i, self.k_clusters)
        self.merge(i, j, new_id)
        return i, j, a, neighbours

    def _fallback_pair(self):
        if self.n_clusters < 2:
            return None
        ids = sorted(self.size)
        if self.centroid_features is None:
            if self.restricted:
                for i in ids:
                    if self.adj[i]:
                        return i, min(self.adj[i])
                return None
            return ids[0], ids[1]
        cent = np.stack([self.centroid_features[i] / self.size[i] for i in ids])
        best = None
        for r, i in enumerate(ids):
            cands = (sorted(self.adj[i]) if self.restricted else ids[r + 1:])
            if self.restricted:
                cands = [j for j in cands if j > i]
            if not cands:
                continue
            pos = np.searchsorted(ids, cands)
            d = ((cent[pos] - cent[r]) ** 2).sum(1)
            k = int(np.argmin(d))
            if best is None or d[k] < best[0]:
                best = (d[k], i, cands[k])
        return None if best is None else (best[1], best[2])

    def merge(self, a: int, b: int, c: int) -> None:
        """Merge clusters ``a`` and ``b`` into a new cluster ``c``."""
        stale = self._neighbours(a) | self._neighbours(b)
        # row c is additive: X[c, k] = sum_{s in c} in_k(s) out_k(s) = X[a, k] + X[b, k]
        row_c: dict[int, float] = {}
        for old in (a, b):
            for k, v in self.xrow[old].items():
                if k not in (a, b):
                    row_c[k] = row_c.get(k, 0.0) + v
        # drop a and b from the X structures
        for old in (a, b):
            for k in self.xcol.pop(old):
                if k not in (a, b):
                    self.xrow[k].pop(old, None)
            for k in self.xrow.pop(old):
                if k not in (a, b):
                    self.xcol[k].pop(old, None)
        self.size[c] = self.size.pop(a) + self.size.pop(b)
        self.labels[(self.labels == a) | (self.labels == b)] = c
        self.in_[c] = _sparse_add(*self.in_.pop(a), *self.in_.pop(b))
        self.out_[c] = _sparse_add(*self.out_.pop(a), *self.out_.pop(b))
        # column c is not additive (products of sums): recompute from c's in/out weights
        col_c = self._column(c)
        self.xcol[c] = col_c
        self.xrow[c] = row_c
        for k, v in col_c.items():
            self.xrow[k][c] = v
        for k, v in row_c.items():
            self.xcol[k][c] = v
        if self.restricted:
            adj_c = (self.adj.pop(a) | self.adj.pop(b)) - {a, b}
            for k in adj_c:
                self.adj[k].discard(a)
                self.adj[k].discard(b)
                self.adj[k].add(c)
            self.adj[c] = adj_c
        else:
            self.adj.pop(a, None)
            self.adj.pop(b, None)
            self.adj[c] = set()
        if self.centroid_features is not None:
            self.centroid_features[c] = (self.centroid_features.pop(a)
                                         + self.centroid_features.pop(b))
        self.score[a] = self.score[b] = -np.inf
        self.rows.pop(a, None)
        self.rows.pop(b, None)
        stale = (stale | self._neighbours(c)) - {a, b}
        for k in stale:
            self._rescore(k)
        self._rescore(c)

    def _column(self, c: int) -> dict[int, float]:
        ii, iv = self.in_[c]
        oi, ov = self.out_[c]
        common, pa, pb = np.intersect1d(ii, oi, assume_unique=True, return_indices=True)
        if len(common) == 0:
            return {}
        prod = iv[pa] * ov[pb]
        owners = self.labels[common]
        u, inv = np.unique(owners, return_inverse=True)
        sums = np.bincount(inv, weights=prod, minlength=len(u))
        return {int(k): float(v) for k, v in zip(u, sums, strict=True) if k != c and v > 0}


# ------------------------------------------------------------------------------------------
# the recurrent process


def _embed_all(representation: Representation, batch_size: int) -> np.ndarray:
    """L2-normalised embeddings of all samples (float64), in batches of ``batch_size``."""
    import torch
    import torch.nn.functional as F

    representation.train(False)
    with torch.inference_mode():
        n = representation.n_samples
        if batch_size and n > batch_size:
            parts = [representation.embed(torch.arange(s, min(n, s + batch_size)))
                     for s in range(0, n, batch_size)]
            emb = torch.cat(parts)
        else:
            emb = representation.embed(None)
        emb = F.normalize(emb.double(), dim=1)
    return emb.detach().cpu().numpy()


def _period_targets(n_start: int, n_clusters: int, unroll_rate: float) -> list[int]:
    targets = []
    n = n_start
    while n > n_clusters:
        n = max(n_clusters, n - max(1, math.ceil(unroll_rate * n)))
        targets.append(n)
    return targets


def run_jule(representation: Representation, *, n_clusters: int, unroll_rate: float = 0.9,
             k_neighbors: int = 20, affinity_a: float = 1.0, k_clusters: int = 5,
             locality: float = 1.0, gamma: float = 2.0, margin: float = 0.2,
             learn: bool = True, n_iter_per_period: int = 20, lr: float = 0.01,
             momentum: float = 0.9, weight_decay: float = 5e-4, optimizer: str = "sgd",
             batch_size: int = 256, connectivity: np.ndarray | None = None,
             complete: bool = False, rerun: bool = False,
             embed_batch_size: int = 4096, seed: int = 0, progress: bool = False,
             callback: Callable | None = None) -> JuleResult:
    """Run JULE: periods of GDL agglomeration alternating with representation updates.

    The defaults are the paper's settings (the image-clustering benchmark uses them); the
    segmentation method ``jule`` passes its own (:class:`methods.jule.segmentation.Learning`).
    Embeddings are L2-normalised before the graph and the loss, as in the paper.

    Parameters
    ----------
    representation : Representation
        The samples and their learnable embedding.
    n_clusters : int
        Stop the learning process at this many clusters.
    unroll_rate : float
        ``eta`` in (0, 1]: each period merges ``ceil(eta * clusters at its start)`` times.
    k_neighbors : int
        ``K_s`` of the sample graph.
    affinity_a : float
        ``a`` of the graph's Gaussian bandwidth.
    k_clusters : int
        ``K_c``: neighbour clusters in the merge criterion (and ``K_c - 1`` negatives per anchor).
    locality : float
        ``lambda`` of the merge criterion and of the loss weight ``lambda / (K_c - 1)``.
    gamma, margin : float
        Weighted triplet loss.
    learn : bool
        False: the same schedule on the fixed initial representation (the ablation).
    n_iter_per_period : int
        SGD iterations of the representation update after each period but the last.
    lr, momentum, weight_decay : float
        Optimiser settings (the paper: SGD, lr 0.01, momentum 0.9).
    optimizer : {"sgd", "adam"}
        The paper uses SGD; Adam (not in the paper) moves a randomly initialised network, whose
        embeddings start nearly collinear, much faster.
    batch_size : int
        Anchors per iteration; the triplets come from the merges of the period (the paper's):
        anchor in the merged cluster ``C_i``, positive in its partner ``N_1``, negatives in
        ``N_2 .. N_Kc``.
    connectivity : ndarray (m, 2), optional
        Sample pairs that touch: merges are restricted to touching clusters and these pairs
        join the affinity graph.
    complete : bool
        After reaching ``n_clusters``, keep merging (no more learning) until nothing can merge,
        so that the dendrogram is a full hierarchy.
    rerun : bool
        After learning, cluster again from a fresh initial over-clustering of the learned
        embeddings (the paper's "JULE-RC" variant); the returned dendrogram is that pass.
    seed : int
    progress : bool
    callback : callable, optional
        ``callback(period, labels)`` after each period (for monitoring).

    Returns
    -------
    JuleResult
    """
    import torch

    if not 0 < unroll_rate <= 1:
        raise ValueError(f"unroll_rate must be in (0, 1], got {unroll_rate}")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if k_clusters < 2:
        raise ValueError(f"k_clusters (K_c) must be >= 2, got {k_clusters}")
    n = representation.n_samples
    if n == 0:
        raise ValueError("no samples to cluster")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    emb = _embed_all(representation, embed_batch_size)
    labels0 = initial_clusters(emb, connectivity=connectivity)
    c0 = int(labels0.max()) + 1
    capacity = 2 * c0 + 1
    merges: list[tuple[int, int]] = []
    affinities: list[float] = []
    periods: list[int] = []
    labels = labels0.copy()
    history = []
    targets = _period_targets(c0, int(n_clusters), float(unroll_rate))
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    opt = None

    def make_optimizer():
        return _Optimizer(representation.parameters(), kind=optimizer, lr=lr, momentum=momentum,
                          weight_decay=weight_decay)

    def build_state(emb_now, labels_now):
        cluster_adj = None
        extra = None
        if connectivity is not None:
            extra = connectivity
            lab = labels_now[np.asarray(connectivity, dtype=np.int64)]
            cluster_adj = np.unique(lab[lab[:, 0] != lab[:, 1]], axis=0)
        w = knn_graph(emb_now, k_neighbors=k_neighbors, a=affinity_a, extra_edges=extra)
        return Agglomeration(w, labels_now, id_capacity=capacity, k_clusters=k_clusters,
                             locality=locality, cluster_adjacency=cluster_adj,
                             centroid_features=emb_now)

    from tqdm import tqdm

    bar = tqdm(total=max(0, c0 - int(n_clusters)), desc="jule merges", disable=not progress,
               leave=False)
    state = build_state(emb, labels)
    for p, target in enumerate(targets):
        start = state.n_clusters
        records = []  # (i, j, [N_2..N_Kc]) of each merge of the period, for the triplets
        members = _MemberIndex(state.labels)
        while state.n_clusters > target:
            new_id = c0 + len(merges)
            done = state.step(new_id)
            if done is None:
                break
            i, j, aff, nbrs = done
            records.append((i, j, [k for k in nbrs if k != j][: k_clusters - 1]))
            members.merged(i, j, new_id)
            merges.append((i, j))
            affinities.append(aff)
            periods.append(p)
            bar.update(1)
        labels = state.labels.copy()
        entry = {"period": p, "clusters_start": start, "clusters_end": state.n_clusters}
        last = p == len(targets) - 1 or state.n_clusters <= n_clusters
        if learn and not last and n_iter_per_period > 0:
            opt = opt or make_optimizer()
            sampler = _MergeTripletSampler(records, members, labels, k_clusters - 1)
            entry["loss"] = _update_representation(
                representation, opt, sampler, rng=rng, n_iter=n_iter_per_period,
                batch_size=batch_size, gamma=gamma, margin=margin,
                weight=locality / (k_clusters - 1))
            emb = _embed_all(representation, embed_batch_size)
            state = build_state(emb, labels)
        del members, records
        history.append(entry)
        if callback is not None:
            callback(p, labels)
        if state.n_clusters <= n_clusters or last:
            break
    bar.close()
    learned_any = any("loss" in e for e in history)
    if rerun and learned_any:
        # JULE-RC: run the clustering again from a fresh initial over-clustering with the
        # learned representation (no more learning); its dendrogram replaces the learned one
        labels0 = initial_clusters(emb, connectivity=connectivity)
        c0 = int(labels0.max()) + 1
        capacity = 2 * c0 + 1
        merges, affinities, periods = [], [], []
        state = build_state(emb, labels0)
        while state.n_clusters > n_clusters:
            done = state.step(c0 + len(merges))
            if done is None:
                break
            merges.append((done[0], done[1]))
            affinities.append(done[2])
            periods.append(len(history) - 1)
    n_learned = len(merges)
    final_labels = state.labels.copy()
    if complete:
        last_p = periods[-1] if periods else 0
        while state.n_clusters > 1:
            done = state.step(c0 + len(merges))
            if done is None:
                break
            merges.append((done[0], done[1]))
            affinities.append(done[2])
            periods.append(last_p)
    dendro = Dendrogram(initial_labels=labels0,
                        merges=np.asarray(merges, np.int64).reshape(-1, 2),
                        affinity=np.asarray(affinities, np.float64),
                        period=np.asarray(periods, np.int64))
    out_labels = first_occurrence_order(final_labels)
    history.append({"merges_to_n_clusters": n_learned, "merges_total": len(merges),
                    "rerun": bool(rerun and learned_any)})
    return JuleResult(labels=out_labels, dendrogram=dendro, embeddings=emb, history=history)
