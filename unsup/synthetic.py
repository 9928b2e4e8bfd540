"""Synthetic images with exact ground truth: flat or textured shapes on a background, plus noise.

Used by the tests (no external data needed) and handy for sanity-checking a method.
"""

from __future__ import annotations

import numpy as np

__all__ = ["make_shapes_image", "make_shapes_dataset", "DISTINCT_COLORS"]

#: Well-separated colours; region k of an image gets ``DISTINCT_COLORS[k]`` when
#: ``consistent_colors=True`` so the same colour means the same class across images.
DISTINCT_COLORS = np.array([
    [30, 30, 160], [220, 60, 40], [40, 180, 60], [240, 220, 60], [160, 60, 200],
    [60, 200, 220], [250, 150, 40], [120, 120, 120], [250, 250, 250], [20, 90, 40],
], dtype=np.float64)


def make_shapes_image(shape=(96, 128), *, n_shapes: int = 3, noise: float = 8.0,
                      texture: float = 0.0, consistent_colors: bool = True,
                      seed: int | None = 0):
    """An RGB image of a background plus ``n_shapes`` ellipses/rectangles, and its labels.

    Parameters
    ----------
    shape : tuple of int
        (H, W).
    n_shapes : int
        Number of foreground shapes (at most 9); label 0 is the background, shape k has label k.
        Shapes are drawn in order and may occlude each other; a label that ends up with no
        pixel is not present.
    noise : float
        Standard deviation of additive Gaussian noise (0..255 scale).
    texture : float
        Amplitude of a per-region sinusoidal stripe texture (0 = flat colours).
    consistent_colors : bool
        Label k always gets colour ``DISTINCT_COLORS[k]`` (dataset-level consistency); else
        colours are drawn at random per image.
    seed : int or None

    Returns
    -------
    image : ndarray of uint8, shape (H, W, 3)
    labels : ndarray of int32, shape (H, W)
    """
    if not 0 <= n_shapes <= len(DISTINCT_COLORS) - 1:
        raise ValueError(f"n_shapes must be in 0..{len(DISTINCT_COLORS) - 1}")
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    labels = np.zeros((h, w), np.int32)
    for k in range(1, n_shapes + 1):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.12, 0.3) * h, rng.uniform(0.12, 0.3) * w
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:
            mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        labels[mask] = k
    if consistent_colors:
        colors = DISTINCT_COLORS[: n_shapes + 1]
    else:
        colors = rng.uniform(0, 255, size=(n_shapes + 1, 3))
    image = colors[labels].astype(np.float64)
    if texture > 0:
        for k in range(n_shapes + 1):
            angle, freq = rng.uniform(0, np.pi), rng.uniform(0.2, 0.6)
            stripes = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
            image[labels == k] += texture * stripes[labels == k][:, None]
    if noise > 0:
        image += rng.normal(0.0, noise, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), labels


def make_shapes_dataset(directory, n_images: int = 4, *, shape=(96, 128), n_shapes: int = 3,
                        noise: float = 8.0, texture: float = 0.0, seed: int = 0):
    """Write ``n_images`` synthetic images and label maps under ``directory``.

    Creates ``directory/images/img_XXX.png`` and ``directory/masks/img_XXX.png`` (usable as the
    dataset spec ``masks:DIR/images:DIR/masks``) and returns the directory as a Path.
    """
    from pathlib import Path

    from unsup.io import write_image, write_label_map

    directory = Path(directory)
    for i in range(n_images):
        image, labels = make_shapes_image(shape, n_shapes=n_shapes, noise=noise,
                                          texture=texture, seed=seed + i)
        write_image(directory / "images" / f"img_{i:03d}.png", image)
        write_label_map(directory / "masks" / f"img_{i:03d}.png", labels)
    return directory
