"""`supervised`: a segmentation network trained on full masks (the baseline of box supervision).

The network is :func:`unsup.nn.networks.build_segmenter` (pretrained EfficientNet-Lite0
encoder, ``network__decoder`` = ``fcn`` / ``unet`` / ``deeplab``), trained by the shared loop
(:func:`unsup.nn.loop.train`) with cross-entropy (+ optional Dice), flips, rescaling, random
crops and colour jitter. ``predict`` returns the class labels and the softmax probabilities
(for the dense CRF). Everything that does not depend on the kind of supervision is
:class:`unsup.nn.method.NetworkMethod` (``boxsup`` shares it).
"""

from __future__ import annotations

from unsup.nn.data import prepare_mask_item
from unsup.nn.method import AugmentOptions, NetworkMethod, NetworkOptions
from unsup.registry import register

__all__ = ["Supervised"]


@register
class Supervised(NetworkMethod):
    """A pretrained-encoder segmentation network trained on full masks.

    Parameters
    ----------
    network : NetworkOptions or dict, optional
        The network and its optimisation (``network__lr``, ``network__epochs``, ...; see
        :class:`unsup.nn.method.NetworkOptions` for the keys and defaults).
    augment : AugmentOptions or dict, optional
        Augmentation of the training crops (``augment__crop_size``, ...; see
        :class:`unsup.nn.method.AugmentOptions`).
    n_classes : int, optional
        Default: the largest label in the training masks + 1.
    max_side : int
        Working resolution: longer image side (training cache and prediction).
    select_best : bool
        With validation samples: keep the weights of the epoch of best validation mIoU
        (and stop early after ``network__patience`` epochs without improvement).
    flip_test : bool
        Average the prediction with that of the mirrored image.
    seed : int
    """

    name = "supervised"
    summary = "segmentation network (pretrained encoder + FCN/U-Net/DeepLab decoder) on masks"
    supervision = "masks"

    def __init__(self, *, network=None, augment=None, n_classes: int | None = None,
                 max_side: int = 320, select_best: bool = True, flip_test: bool = True,
                 seed: int = 0):
        self.network = NetworkOptions.coerce(network, name="network")
        self.augment = AugmentOptions.coerce(augment, name="augment")
        self.n_classes = n_classes
        self.max_side = max_side
        self.select_best = select_best
        self.flip_test = flip_test
        self.seed = seed

    def _prepare_item(self, sample, index, shape, cache_dir, small_image) -> dict:
        return prepare_mask_item(sample, index, shape, cache_dir, small_image)
