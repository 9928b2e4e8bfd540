"""Generic clustering pieces: faiss k-means, nearest-centroid assignment, soft scores.

Shared by the ``kmeans`` method and other clustering-based methods. faiss does the k-means
(multi-threaded BLAS distance computations, k-means++ initialisation, empty-cluster
splitting) and uses GPUs when ``faiss-gpu`` is installed and a GPU is visible.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

# see unsup/backbones.py: spinning OpenMP threads collapse faiss's speed on a shared CPU
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: Below this many multiply-adds, BLAS runs single-threaded: OpenBLAS's worker threads gain
#: little on such sizes and, on a shared CPU, make them up to 10x slower (a 496x496 eigh took
#: 0.1 s on one thread and 0.7-4 s on two on a loaded 2-core machine).
SMALL_BLAS_WORK = 2e8


def _faiss_threads(work: float):
    """Context running faiss single-threaded for small problems (same reason as BLAS).

    The passive OpenMP wait policy would fix the slowdown at its root, but libgomp reads it
    only when first loaded, and scikit-learn (imported by unsup.base) loads the very same
    libgomp copy as faiss; so small jobs also drop to one thread, which costs nothing there.
    """
    import contextlib

    import faiss

    if work > SMALL_BLAS_WORK:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def single():
        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            yield
        finally:
            faiss.omp_set_num_threads(previous)

    return single()


def _blas_threads(work: float):
    """Context limiting BLAS to one thread for small problems (a no-op for large ones)."""
    import contextlib

    if work > SMALL_BLAS_WORK:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")

__all__ = [
    "ClusteringError",
    "fit_kmeans",
    "assign",
    "squared_distances",
    "softmax_scores",
    "first_occurrence_order",
    "choose_n_clusters",
    "Reservoir",
]


class ClusteringError(ValueError):
    """Bad input to a clustering function (too few points, wrong shapes, NaNs...)."""


def _as_points(x, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ClusteringError(f"{name} must be a 2-D array (n_points, n_features), got {x.shape}")
    if x.shape[1] < 1:
        raise ClusteringError(f"{name} has no feature columns")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ClusteringError(f"{name} contains NaN or infinite values")
    return x


def _use_gpu(gpu) -> bool:
    import faiss

    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpu is None:
        return n_gpus > 0
    if gpu and n_gpus == 0:
        raise ClusteringError("gpu=True but faiss sees no GPU (is faiss-gpu installed?)")
    return bool(gpu)


def fit_kmeans(x, n_clusters: int, *, n_iter: int = 25, n_init: int = 1, seed: int = 0,
               init: str = "k-means++", max_points_per_centroid: int | None = None,
               gpu: bool | None = None, verbose: bool = False) -> np.ndarray:
    """Lloyd k-means with faiss.

    Parameters
    ----------
    x : array, shape (n, d)
        Points (converted to float32; not modified).
    n_clusters : int
        k; must be <= n.
    n_iter : int
        Lloyd iterations per run.
    n_init : int
        Runs with different seeds; the lowest objective wins (faiss ``nredo``).
    seed : int
    init : {"k-means++", "random"}
        k-means++ (D^2 sampling) costs O(n k d) once and gives better minima than faiss's
        default uniform sampling of initial centres.
    max_points_per_centroid : int, optional
        faiss subsamples to ``k * max_points_per_centroid`` points when given; by default
        every point is used (callers sample the data themselves).
    gpu : bool, optional
        Default: use GPUs when faiss sees any.
    verbose : bool

    Returns
    -------
    centroids : ndarray of float32, shape (n_clusters, d)

    Raises
    ------
    ClusteringError
        Fewer points than clusters, k < 1, bad shapes or non-finite values.
    """
    import faiss

    x = _as_points(x)
    n, d = x.shape
    k = int(n_clusters)
    if k < 1:
        raise ClusteringError(f"n_clusters must be >= 1, got {n_clusters}")
    if n < k:
        raise ClusteringError(
            f"cannot make {k} clusters from {n} points: n_clusters must not exceed the "
            "number of samples"
        )
    inits = {"k-means++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
             "random": faiss.ClusteringInitMethod_RANDOM}
    if init not in inits:
        raise ClusteringError(f"init must be one of {list(inits)}, got {init!r}")
    if int(n_iter) < 1 or int(n_init) < 1:
        raise ClusteringError(f"n_iter and n_init must be >= 1, got {n_iter}, {n_init}")
    if max_points_per_centroid is None:
        max_points_per_centroid = -(-n // k) + 1  # = use all points
    km = faiss.Kmeans(
        d, k, niter=int(n_iter), nredo=int(n_init), seed=int(seed) & 0x7FFFFFFF,
        init_method=inits[init], max_points_per_centroid=int(max_points_per_centroid),
        # we check n >= k ourselves; faiss's "please provide at least 39 k points" warning
        # only adds noise for per-image clustering of small images
        min_points_per_centroid=1, verbose=bool(verbose), gpu=_use_gpu(gpu),
    )
    with _faiss_threads(float(min(n, k * max_points_per_centroid)) * k * d):
        km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(k, d)


def squared_distances(x, centroids) -> np.ndarray:
    """Squared Euclidean distances (n, k) between points (n, d) and centroids (k, d), float32."""
    x = _as_points(x)
    c = _as_points(centroids, "centroids")
    if c.shape[1] != x.shape[1]:
        raise ClusteringError(f"points have {x.shape[1]} features, centroids {c.shape[1]}")
    # |x|^2 - 2 x.c + |c|^2 in float32 BLAS; clipped because rounding can go slightly below 0
    with _blas_threads(float(x.shape[0]) * c.shape[0] * x.shape[1]):
        cross = x @ c.T
    d2 = (x * x).sum(1, keepdims=True) - 2.0 * cross + (c * c).sum(1)[None, :]
    return np.maximum(d2, 0.0, out=d2)


def assign(x, centroids) -> np.ndarray:
    """Index (int64, shape (n,)) of the nearest centroid of each point (exact, faiss)."""
    import faiss

    x = _as_points(x)
    c = _as_points(centroids, "centroids")
    if c.shape[1] != x.shape[1]:
        raise ClusteringError(f"points have {x.shape[1]} features, centroids {c.shape[1]}")
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c)
    with _faiss_threads(float(x.shape[0]) * c.shape[0] * c.shape[1]):
        _, nearest = index.search(x, 1)
    return nearest[:, 0].astype(np.int64)


def first_occurrence_order(labels) -> np.ndarray:
    """Labels renumbered ``0..`` in order of their first occurrence (deterministic ids).

    Parameters
    ----------
    labels : array of int, shape (n,)

    Returns
    -------
    ndarray of int64, shape (n,)
    """
    _, first, inverse = np.unique(np.asarray(labels), return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()]


def softmax_scores(sq_distances, temperature: float, *, axis: int = -1) -> np.ndarray:
    """``softmax(-sq_distances / temperature)`` along ``axis``, float32, numerically stable."""
    if not temperature > 0:
        raise ClusteringError(f"temperature must be > 0, got {temperature}")
    logits = -np.asarray(sq_distances, dtype=np.float32) / np.float32(temperature)
    logits -= logits.max(axis=axis, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=axis, keepdims=True)
    return prob


def choose_n_clusters(x, candidates: Sequence[int], *, seed: int = 0, n_iter: int = 20,
                      n_init: int = 3, sample_size: int = 3000) -> tuple[int, dict[int, float]]:
    """Pick k by the mean silhouette coefficient (Rousseeuw 1987) on a random sample.

    For each candidate k, k-means (``n_init`` restarts) is fitted on (a sample of at most
    ``sample_size`` of) the points and the silhouette of that sample's assignment is computed; the k with the highest
    silhouette wins (ties: the smaller k). The silhouette compares each point's mean distance
    to its own cluster with that to the nearest other cluster, so it needs no scale-dependent
    threshold, unlike an elbow rule.

    Returns
    -------
    best_k : int
    scores : dict
        Silhouette per candidate k (candidates above the number of points are skipped).
    """
    from sklearn.metrics import silhouette_score

    x = _as_points(x)
    rng = np.random.default_rng(seed)
    if x.shape[0] > sample_size:
        x = x[rng.choice(x.shape[0], sample_size, replace=False)]
    scores: dict[int, float] = {}
    for k in sorted({int(c) for c in candidates}):
        if k < 2:
            raise ClusteringError(f"candidate numbers of clusters must be >= 2, got {k}")
        if k >= x.shape[0]:
            continue
        centroids = fit_kmeans(x, k, n_iter=n_iter, n_init=n_init, seed=seed)
        labels = assign(x, centroids)
        if np.unique(labels).size < 2:
            scores[k] = -1.0
            continue
        scores[k] = float(silhouette_score(x, labels))
    if not scores:
        raise ClusteringError(f"too few points ({x.shape[0]}) to choose among k = "
                              f"{sorted(candidates)}")
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores


class Reservoir:
    """A uniform random sample of at most ``capacity`` rows from a stream (Vitter's algorithm R).

    Rows are stored as ``dtype`` (float16 by default, to halve the memory of wide features);
    every row seen so far has the same probability ``capacity / seen`` of being kept.
    """

    def __init__(self, capacity: int, *, seed: int = 0, dtype=np.float16):
        if int(capacity) < 1:
            raise ClusteringError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self._rows: np.ndarray | None = None
        self._size = 0

    def add(self, rows) -> None:
        rows = np.asarray(rows)
        if rows.ndim != 2:
            raise ClusteringError(f"rows must be 2-D, got shape {rows.shape}")
        if self._rows is None:
            self._rows = np.empty((self.capacity, rows.shape[1]), self.dtype)
        elif rows.shape[1] != self._rows.shape[1]:
            raise ClusteringError(f"rows have {rows.shape[1]} columns, earlier ones "
                                  f"{self._rows.shape[1]}")
        n = rows.shape[0]
        take = min(n, self.capacity - self._size)  # fill phase
        self._rows[self._size:self._size + take] = rows[:take]
        self._size += take
        self.seen += take
        if take < n:
            rest = rows[take:]
            # row t (0-based global index) replaces a random slot with probability capacity/(t+1)
            t = self.seen + np.arange(rest.shape[0])
            slots = (self.rng.random(rest.shape[0]) * (t + 1)).astype(np.int64)
            keep = slots < self.capacity
            # later rows overwrite earlier ones in the same slot, as in the sequential algorithm
            self._rows[slots[keep]] = rest[keep]
            self.seen += rest.shape[0]

    def __len__(self) -> int:
        return self._size

    def array(self, dtype=np.float32) -> np.ndarray:
        if self._rows is None:
            return np.empty((0, 0), dtype)
        return self._rows[: self._size].astype(dtype)
