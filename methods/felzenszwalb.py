"""`felzenszwalb`: graph-based segmentation of Felzenszwalb & Huttenlocher (IJCV 2004).

A classical per-image baseline, via scikit-image. It stays in every comparison table.
"""

from __future__ import annotations

from skimage.segmentation import felzenszwalb as sk_felzenszwalb

from unsup.base import Segmentation, SegmentationMethod, check_image
from unsup.registry import register
from unsup.superpixels import relabel_sequential


@register
class Felzenszwalb(SegmentationMethod):
    """Felzenszwalb-Huttenlocher graph segmentation (per image, nothing to fit).

    Parameters
    ----------
    scale : float
        Larger values give larger regions (the algorithm's k).
    sigma : float
        Gaussian pre-smoothing width.
    min_size : int
        Regions smaller than this are merged in post-processing.
    """

    name = "felzenszwalb"
    summary = "Felzenszwalb-Huttenlocher graph-based segmentation (scikit-image), per image"
    supervision = "none"

    def __init__(self, *, scale: float = 300.0, sigma: float = 0.8, min_size: int = 200):
        self.scale = scale
        self.sigma = sigma
        self.min_size = min_size

    def predict(self, image):
        image = check_image(image)
        labels = sk_felzenszwalb(image, scale=float(self.scale), sigma=float(self.sigma),
                                 min_size=int(self.min_size), channel_axis=-1)
        return Segmentation(relabel_sequential(labels))
