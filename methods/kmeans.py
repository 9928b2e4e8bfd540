"""`kmeans`: k-means clustering of pretrained dense features, per image or over a dataset.

Features are the multi-scale, L2-normalised EfficientNet-Lite features of
:mod:`unsup.features` (or, with ``features="color"``, CIELAB colour + position only: the
classical baseline run through the same machinery), optionally with weighted colour and
position channels appended.

- ``scope="image"``: each image is clustered on its own (nothing to fit); ``n_clusters`` can
  be ``"auto"`` (or 0): the k in ``2..max_clusters`` with the best mean silhouette on a sample
  of the image's feature vectors.
- ``scope="dataset"``: ``fit`` streams the dataset, keeps ``samples_per_image`` random feature
  vectors per image (and at most ``max_samples`` overall, by reservoir sampling) and fits the
  centroids once; ``predict`` gives every pixel its nearest centroid, so a cluster id
  means the same thing in every image.

Scores (for the dense CRF) are ``softmax(-d^2 / (temperature * s))`` over the centroids, with
``d^2`` the squared feature distance and ``s`` the mean squared distance of the fitted samples
to their nearest centroid, so ``temperature`` is unit-free and works for any feature type.
Distances are computed on the feature grid (stride ``feature_stride``) and bilinearly
upsampled to the image before the argmin, so labels follow the features' sub-cell geometry.

Options tried and not adopted (their results are in docs/benchmarks/kmeans.md) were removed
after commit 208f86e.
"""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2lab
from tqdm.auto import tqdm

from unsup.base import Segmentation, SegmentationMethod, check_image
from unsup.clustering import (
    ClusteringError,
    Reservoir,
    choose_n_clusters,
    fit_kmeans,
    softmax_scores,
    squared_distances,
)
from unsup.features import (
    DenseFeatureExtractor,
    DenseFeatures,
    FeatureCache,
    resize_image,
    resized_shape,
)
from unsup.registry import register

_AUTO = ("auto", 0, None)


def _cell_colors(image: np.ndarray, stride: int, grid: tuple[int, int]) -> np.ndarray:
    """Mean CIELAB colour of each ``stride`` x ``stride`` cell -> (gh, gw, 3) float32."""
    lab = rgb2lab(image).astype(np.float32)
    if stride == 1:
        return lab
    gh, gw = grid
    h, w = lab.shape[:2]
    lab = np.pad(lab, ((0, gh * stride - h), (0, gw * stride - w), (0, 0)), mode="edge")
    return lab.reshape(gh, stride, gw, stride, 3).mean(axis=(1, 3))


def _cell_positions(stride: int, grid: tuple[int, int], extent: int) -> np.ndarray:
    """(y, x) of each cell centre divided by the image's longer side -> (gh, gw, 2) in [0, 1]."""
    gh, gw = grid
    ys = (np.arange(gh, dtype=np.float32) + 0.5) * stride / extent
    xs = (np.arange(gw, dtype=np.float32) + 0.5) * stride / extent
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1)


class _Rows:
    """Feature rows (one per grid cell) of one image and the grid they map back through."""

    def __init__(self, rows, grid: DenseFeatures):
        self.rows = rows
        self.grid = grid


@register
class KMeansSegmentation(SegmentationMethod):
    """k-means of dense pretrained (or colour) features, per image or dataset-wide.

    Parameters
    ----------
    scope : {"image", "dataset"}
        Cluster each image on its own, or fit centroids on a dataset (``fit``) and label
        every image with them (consistent cluster ids across images).
    n_clusters : int or "auto"
        k. ``"auto"`` or 0: chosen by the silhouette criterion among ``2..max_clusters``.
    features : {"backbone", "color"}
        Pretrained dense features, or CIELAB + position only (the classical baseline).
    backbone : str
        ``efficientnet-lite0`` (default), ``efficientnet-lite2``, or ``torchvision:ARCH`` /
        ``timm:ARCH`` with ``weights_path``.
    weights_path : str, optional
        Local backbone weights (needed only for torchvision / timm backbones).
    strides : sequence of int or None
        Backbone maps used (subset of 4, 8, 16, 32). None (default) picks by scope:
        ``(4, 8, 16, 32)`` per image, where the shallow maps place boundaries, and
        ``(16, 32)`` dataset-wide, where a cluster must mean the same thing in every image
        and the shallow (colour / texture) maps split objects by appearance. Chosen on
        COCO *train* images (hungarian mIoU 0.139 with (16, 32), 0.135 with (32,), 0.033
        with all four; docs/benchmarks/kmeans.md).
    feature_stride : int
        Resolution of the feature grid clustered (cells of this many pixels).
    max_side : int, optional
        Images larger than this (longer side) are downscaled before feature extraction.
    color_weight : float
        Weight of CIELAB channels (L, a, b divided by 100) appended to backbone features.
        Ignored with ``features="color"``, where the colour *is* the feature (weight 1).
    position_weight : float
        Weight of (y, x) / longer side channels appended to the features.
    max_clusters : int
        Upper end of the search for ``n_clusters="auto"``.
    samples_per_image : int
        Feature vectors sampled per image by the dataset-level ``fit``.
    max_samples : int
        Cap of the total sample (reservoir), and of the vectors one image is fitted on.
    n_iter, n_init : int
        Lloyd iterations and restarts (best objective kept) of faiss k-means.
    temperature : float, optional
        Score sharpness, relative to the mean squared distance to the nearest centroid.
        None (default): 0.5 for ``scope="dataset"`` with ``features="backbone"``, else 1.
        0.5 was chosen on half of CamVid val for the CRF (the other half: CRF mIoU 0.322 vs
        0.304 at 1; COCO tiny 0.108 vs 0.107); per image and for the colour baseline 1 was
        chosen (docs/benchmarks/kmeans.md).
    cache_dir : str, optional
        Store / reuse backbone features here (float16, memory-mapped). When set, features
        always go through float16, so results do not depend on whether they were cached.
    seed : int
    """

    name = "kmeans"
    summary = ("k-means of pretrained dense features (EfficientNet-Lite) or colour, per image "
               "or dataset-wide (faiss)")
    supervision = "unlabeled"
    produces_scores = True

    def __init__(self, *, scope: str = "image", n_clusters: int | str = 8,
                 features: str = "backbone", backbone: str = "efficientnet-lite0",
                 weights_path: str | None = None, strides=None,
                 feature_stride: int = 4, max_side: int | None = None,
                 color_weight: float = 0.0, position_weight: float = 0.0,
                 max_clusters: int = 10, samples_per_image: int = 2000,
                 max_samples: int = 200_000, n_iter: int = 30, n_init: int = 3,
                 temperature: float | None = None, cache_dir: str | None = None, seed: int = 0):
        self.scope = scope
        self.n_clusters = n_clusters
        self.features = features
        self.backbone = backbone
        self.weights_path = weights_path
        self.strides = strides
        self.feature_stride = feature_stride
        self.max_side = max_side
        self.color_weight = color_weight
        self.position_weight = position_weight
        self.max_clusters = max_clusters
        self.samples_per_image = samples_per_image
        self.max_samples = max_samples
        self.n_iter = n_iter
        self.n_init = n_init
        self.temperature = temperature
        self.cache_dir = cache_dir
        self.seed = seed

    # -- fitting protocol -------------------------------------------------------------------
    @property
    def requires_fit(self) -> bool:
        """Only the dataset-level scope learns anything."""
        return self.scope == "dataset"

    def is_fitted(self) -> bool:
        return self.scope != "dataset" or getattr(self, "centroids_", None) is not None

    def _validate(self) -> None:
        if self.scope not in ("image", "dataset"):
            raise ValueError(f"scope must be 'image' or 'dataset', got {self.scope!r}")
        if self.features not in ("backbone", "color"):
            raise ValueError(f"features must be 'backbone' or 'color', got {self.features!r}")
        k = self._fixed_k()
        if k is not None and k < 1:
            raise ValueError(f"n_clusters must be >= 1 (or 'auto'), got {self.n_clusters}")
        if k is None and int(self.max_clusters) < 2:
            raise ValueError(f"max_clusters must be >= 2, got {self.max_clusters}")
        for name in ("samples_per_image", "max_samples", "n_iter", "n_init", "feature_stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if float(self.color_weight) < 0 or float(self.position_weight) < 0:
            raise ValueError("color_weight and position_weight must be >= 0")
        if self.temperature is not None and not float(self.temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    # -- features ---------------------------------------------------------------------------
    def _temperature(self) -> float:
        if self.temperature is None:
            return 0.5 if self.scope == "dataset" and self.features == "backbone" else 1.0
        return float(self.temperature)

    def _strides(self) -> tuple[int, ...]:
        if self.strides is None:
            return (16, 32) if self.scope == "dataset" else (4, 8, 16, 32)
        return tuple(int(s) for s in self.strides)

    def _feature_source(self):
        """The extractor (or cache) for the current parameters, built once and reused."""
        strides = self._strides()
        key = (self.backbone, self.weights_path, strides, int(self.feature_stride),
               self.max_side, self.cache_dir)
        source = getattr(self, "_source", None)
        if source is None or source[0] != key:
            extractor = DenseFeatureExtractor(
                self.backbone, strides=strides, output_stride=int(self.feature_stride),
                max_side=self.max_side, weights_path=self.weights_path)
            cache = FeatureCache(self.cache_dir, extractor) if self.cache_dir else None
            self._source = (key, extractor, cache)
        return self._source[1], self._source[2]

    def _grids(self, images: list[np.ndarray]) -> list[DenseFeatures]:
        """Per-cell feature grids (float32) of several images."""
        if self.features == "color":
            out = []
            for image in images:
                shape = image.shape[:2]
                rh, rw = resized_shape(shape, self.max_side)
                small = resize_image(image, (rh, rw))
                parts = [_cell_colors(small, 1, (rh, rw)) / 100.0]
                if float(self.position_weight) > 0:
                    parts.append(_cell_positions(1, (rh, rw), max(rh, rw))
                                 * float(self.position_weight))
                feats = np.concatenate(parts, axis=-1).astype(np.float32)
                out.append(DenseFeatures(feats, 1, tuple(shape), (rh, rw)))
            return out
        extractor, cache = self._feature_source()
        grids = cache.get_many(images) if cache is not None else extractor.extract(images)
        out = []
        for image, g in zip(images, grids, strict=True):
            feats = np.asarray(g.features, dtype=np.float32)
            parts = [feats]
            if float(self.color_weight) > 0:
                small = resize_image(image, g.resized)
                parts.append(_cell_colors(small, g.stride, g.grid_shape) / 100.0
                             * float(self.color_weight))
            if float(self.position_weight) > 0:
                parts.append(_cell_positions(g.stride, g.grid_shape, max(g.resized))
                             * float(self.position_weight))
            if len(parts) > 1:
                feats = np.concatenate(parts, axis=-1)
            out.append(DenseFeatures(np.ascontiguousarray(feats), g.stride, g.image_shape,
                                     g.resized))
        return out

    def _rows(self, images: list[np.ndarray]) -> list[_Rows]:
        """Feature rows (one per grid cell) of several images."""
        return [_Rows(grid.features.reshape(-1, grid.features.shape[-1]), grid)
                for grid in self._grids(images)]

    def _fixed_k(self) -> int | None:
        """``n_clusters`` as an int, or None for automatic selection."""
        value = self.n_clusters
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)  # e.g. from a command line
        if value in _AUTO:
            return None
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"n_clusters must be a positive integer or 'auto', got {value!r}")
        return int(value)

    def _k_for(self, rows: np.ndarray, what: str) -> tuple[int, dict]:
        if self._fixed_k() is None:
            best, scores = choose_n_clusters(rows, range(2, int(self.max_clusters) + 1),
                                             seed=int(self.seed), n_init=int(self.n_init))
            return best, {"silhouette": {str(k): round(v, 4) for k, v in scores.items()}}
        k = self._fixed_k()
        if k > rows.shape[0]:
            raise ClusteringError(
                f"n_clusters={k} exceeds the number of feature vectors ({rows.shape[0]}) of "
                f"{what}; lower n_clusters"
                + (" or feature_stride" if self.scope == "image" else
                   " or raise samples_per_image / use more images")
            )
        return k, {}

    # -- dataset-level fit ------------------------------------------------------------------
    def fit(self, samples, *, val_samples=None, run=None, progress: bool = False):
        """Fit dataset-level centroids (``scope="dataset"``); a no-op for ``scope="image"``.

        Parameters
        ----------
        samples : iterable of unsup.datasets.Sample (or of RGB uint8 arrays)
            Streamed in chunks of a few images; never all held at once.
        val_samples, run
            Not used (nothing is trained).
        progress : bool
        """
        self._validate()
        if self.scope != "dataset":
            return self
        rng = np.random.default_rng(int(self.seed))
        reservoir = Reservoir(int(self.max_samples), seed=int(self.seed) + 1)
        n_images = 0
        chunk: list[np.ndarray] = []
        batch = 8

        bar = tqdm(disable=not progress, desc="kmeans: sampling features", unit="img")

        def consume(images):
            for r in self._rows(images):
                n, size = r.rows.shape[0], int(self.samples_per_image)
                pick = np.sort(rng.choice(n, min(size, n), replace=False))
                reservoir.add(np.asarray(r.rows[pick], dtype=np.float32))
            bar.update(len(images))

        with bar:
            for sample in samples:
                image = check_image(sample.image if hasattr(sample, "image") else sample)
                chunk.append(image)
                n_images += 1
                if len(chunk) == batch:
                    consume(chunk)
                    chunk = []
            if chunk:
                consume(chunk)
        if n_images == 0:
            raise ValueError("kmeans fit: the sample stream is empty")
        data = reservoir.array(np.float32)
        what = f"the {data.shape[0]} vectors sampled from {n_images} image(s)"
        k, info = self._k_for(data, what)
        centroids = self._fit_centroids(data, k)
        self.centroids_ = centroids
        self.scale_ = float(max(squared_distances(data, centroids).min(axis=1).mean(), 1e-12))
        self.n_features_in_ = int(data.shape[1])
        self.fit_info_ = {"n_images": n_images, "n_samples": int(data.shape[0]),
                          "n_clusters": k, **info}
        return self

    def _fit_centroids(self, rows: np.ndarray, k: int) -> np.ndarray:
        return fit_kmeans(rows, k, n_iter=int(self.n_iter), n_init=int(self.n_init),
                          seed=int(self.seed))

    # -- prediction -------------------------------------------------------------------------
    def predict(self, image) -> Segmentation:
        image = check_image(image)
        self._validate()
        self._check_fitted()
        r = self._rows([image])[0]
        rows = np.asarray(r.rows, dtype=np.float32)
        info: dict = {"feature_grid": list(r.grid.grid_shape), "feature_dim": int(rows.shape[1])}
        if self.scope == "dataset":
            if rows.shape[1] != self.centroids_.shape[1]:
                raise ValueError(f"features have width {rows.shape[1]} but the centroids "
                                 f"{self.centroids_.shape[1]}: parameters changed after fit?")
            centroids, scale = self.centroids_, self.scale_
        else:
            rng = np.random.default_rng(int(self.seed))
            fit_rows = rows
            if rows.shape[0] > int(self.max_samples):
                fit_rows = rows[np.sort(rng.choice(rows.shape[0], int(self.max_samples),
                                                   replace=False))]
            h, w = image.shape[:2]
            k, extra = self._k_for(fit_rows, f"this {w}x{h} image")
            info.update(extra)
            centroids = self._fit_centroids(fit_rows, k)
            scale = float(max(squared_distances(fit_rows, centroids).min(axis=1).mean(), 1e-12))
        info["n_clusters"] = int(centroids.shape[0])
        return self._paint(squared_distances(rows, centroids), scale, r, info)

    def _paint(self, d2: np.ndarray, scale: float, r: _Rows, info: dict) -> Segmentation:
        k = d2.shape[1]
        gh, gw = r.grid.grid_shape
        maps = r.grid.to_pixels(d2.T.reshape(k, gh, gw))
        labels = maps.argmin(axis=0).astype(np.int32)
        scores = softmax_scores(maps, self._temperature() * scale, axis=0)
        return Segmentation(labels, scores=scores, info=info)

    # -- persistence ------------------------------------------------------------------------
    def _state_arrays(self) -> dict[str, np.ndarray]:
        if getattr(self, "centroids_", None) is None:
            return {}
        return {"centroids_": self.centroids_, "scale_": np.asarray(self.scale_, dtype=np.float64)}

    def _set_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        missing = {"centroids_", "scale_"} - set(arrays)
        if missing:
            raise ValueError(f"saved kmeans model lacks {sorted(missing)}")
        self.centroids_ = np.ascontiguousarray(arrays["centroids_"], dtype=np.float32)
        self.scale_ = float(arrays["scale_"])
        self.n_features_in_ = int(self.centroids_.shape[1])
