"""Segmentation methods, one module each. Importing this package registers them all."""

from methods import boxsup  # noqa: F401
from methods import felzenszwalb, kmeans_color  # noqa: F401
from methods import kanezaki  # noqa: F401
from methods import jule  # noqa: F401
from methods import kmeans  # noqa: F401
from methods import supervised  # noqa: F401
from methods import wnet  # noqa: F401
