"""`kmeans-color`: k-means on colour (CIELAB) + pixel position, per image.

The simplest clustering baseline, and the reference point for learned features. Position
channels make clusters spatially compact; their weight trades colour fidelity for compactness.
"""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2lab
from sklearn.cluster import KMeans

from unsup.base import Segmentation, SegmentationMethod, check_image
from unsup.registry import register


def color_position_features(image: np.ndarray, *, position_weight: float) -> np.ndarray:
    """Per-pixel features (L, a, b, w*y, w*x) with y, x scaled to the range of L (0..100).

    Returns an array of shape (H*W, 5), float32.
    """
    h, w = image.shape[:2]
    lab = rgb2lab(image).reshape(-1, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    extent = max(h, w)
    pos = np.stack([yy.ravel(), xx.ravel()], axis=1) * (100.0 / extent) * position_weight
    return np.concatenate([lab, pos], axis=1).astype(np.float32)


@register
class KMeansColor(SegmentationMethod):
    """k-means of CIELAB colour and (weighted) position, per image.

    Parameters
    ----------
    n_clusters : int
        Number of clusters (labels) per image.
    position_weight : float
        Weight of the (y, x) position channels relative to colour (0 = colour only).
    max_pixels : int
        k-means is fitted on at most this many randomly chosen pixels; every pixel is then
        assigned to its nearest centre (same result up to sampling, much faster on big images).
    temperature : float
        Scores are ``softmax(-squared_distance / temperature)`` over the centres.
    seed : int
    """

    name = "kmeans-color"
    summary = "k-means on CIELAB colour + position, per image (classical baseline)"
    supervision = "none"
    produces_scores = True

    def __init__(self, *, n_clusters: int = 8, position_weight: float = 0.5,
                 max_pixels: int = 50_000, temperature: float = 50.0, seed: int = 0):
        self.n_clusters = n_clusters
        self.position_weight = position_weight
        self.max_pixels = max_pixels
        self.temperature = temperature
        self.seed = seed

    def predict(self, image):
        image = check_image(image)
        h, w = image.shape[:2]
        if int(self.n_clusters) < 1:
            raise ValueError(f"n_clusters must be >= 1, got {self.n_clusters}")
        feats = color_position_features(image, position_weight=float(self.position_weight))
        k = min(int(self.n_clusters), feats.shape[0])
        rng = np.random.default_rng(self.seed)
        fit_on = feats
        if feats.shape[0] > self.max_pixels:
            fit_on = feats[rng.choice(feats.shape[0], int(self.max_pixels), replace=False)]
        km = KMeans(n_clusters=k, n_init=3, random_state=int(self.seed)).fit(fit_on)
        centers = km.cluster_centers_.astype(np.float32)
        d2 = (
            (feats**2).sum(1, keepdims=True) - 2.0 * feats @ centers.T + (centers**2).sum(1)[None]
        )
        labels = d2.argmin(axis=1).reshape(h, w)
        logits = -d2 / float(self.temperature)
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        scores = prob.T.reshape(k, h, w)
        return Segmentation(labels.astype(np.int32), scores=scores)
