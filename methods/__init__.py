"""Segmentation methods, one module each. Importing this package registers them all."""

from methods import felzenszwalb, kmeans_color  # noqa: F401
