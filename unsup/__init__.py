"""unsup: a lab for unsupervised and weakly supervised image segmentation.

The path an image takes through the lab::

    image --(method.predict)--> Segmentation --(optional DenseCRF)--> labels --(harness)--> metrics

Methods live in the ``methods`` package and register themselves by name; the shared pieces
(I/O, datasets, CRF, hierarchy, evaluation, training) live here.
"""

from unsup.base import Segmentation, SegmentationMethod
from unsup.registry import available_methods, create_method, get_method, load_method

__version__ = "0.1.0"

__all__ = [
    "Segmentation",
    "SegmentationMethod",
    "available_methods",
    "create_method",
    "get_method",
    "load_method",
    "__version__",
]
