"""Resizing, and joint augmentation of an image and its label map for segmentation training.

Random rescaling, a square crop (padding with zeros / the ignore label when the image is
smaller than the crop), horizontal flip and colour jitter (brightness, contrast,
saturation). Every random draw comes from the generator passed in, so an augmented pair is a
pure function of (image, target, generator state). Images are resized with OpenCV (area
interpolation when shrinking, linear when enlarging), label maps with nearest neighbour.
"""

from __future__ import annotations

import numpy as np

__all__ = ["augment_pair", "working_shape", "resize_image", "resize_labels", "random_crop",
           "color_jitter"]


def working_shape(shape, max_side: int | None) -> tuple[int, int]:
    """(h, w) of ``shape`` with the longer side scaled down to ``max_side`` (never enlarged;
    None = unchanged)."""
    h, w = int(shape[0]), int(shape[1])
    if max_side is None or max(h, w) <= int(max_side):
        return h, w
    s = int(max_side) / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, C) uint8 image to ``shape`` = (h, w)."""
    import cv2

    h, w = int(shape[0]), int(shape[1])
    if image.shape[:2] == (h, w):
        return image
    shrinking = h * w < image.shape[0] * image.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp)


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) integer label map to ``shape`` = (h, w)."""
    import cv2

    h, w = int(shape[0]), int(shape[1])
    if labels.shape[:2] == (h, w):
        return labels
    dtype = labels.dtype
    # OpenCV's nearest resize handles int32 (and uint8/uint16/int16), not int64
    work = labels.astype(np.int32) if dtype not in (np.uint8, np.uint16, np.int16, np.int32) \
        else labels
    out = cv2.resize(work, (w, h), interpolation=cv2.INTER_NEAREST)
    return out.astype(dtype, copy=False)


def random_crop(image: np.ndarray, target: np.ndarray, crop_size: int, *,
                rng: np.random.Generator, ignore_index: int = 255):
    """A random ``crop_size`` x ``crop_size`` window; pads (image 0, target ``ignore_index``)
    when a side is shorter than the crop."""
    h, w = target.shape
    ph, pw = max(crop_size - h, 0), max(crop_size - w, 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        target = np.pad(target, ((0, ph), (0, pw)), constant_values=ignore_index)
        h, w = target.shape
    y0 = int(rng.integers(0, h - crop_size + 1))
    x0 = int(rng.integers(0, w - crop_size + 1))
    return (image[y0:y0 + crop_size, x0:x0 + crop_size],
            target[y0:y0 + crop_size, x0:x0 + crop_size])


def color_jitter(image: np.ndarray, strength: float, *, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and saturation factors in ``[1 - strength, 1 + strength]``
    (applied in a random order, as torchvision's ColorJitter does); returns uint8."""
    if strength <= 0:
        return image
    out = image.astype(np.float32)
    factors = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    for op in rng.permutation(3):
        f = float(factors[op])
        if op == 0:  # brightness
            out = out * f
        elif op == 1:  # contrast: blend with the mean gray level
            gray = (out @ np.array([0.299, 0.587, 0.114], np.float32)).mean()
            out = (out - gray) * f + gray
        else:  # saturation: blend with the per-pixel gray
            gray = out @ np.array([0.299, 0.587, 0.114], np.float32)
            out = (out - gray[..., None]) * f + gray[..., None]
        out = np.clip(out, 0.0, 255.0)
    return np.round(out).astype(np.uint8)


def augment_pair(image: np.ndarray, target: np.ndarray, *, rng: np.random.Generator,
                 crop_size: int | None = 224, scale_range=(0.7, 1.3), hflip: bool = True,
                 color_jitter: float = 0.2, ignore_index: int = 255):
    """Augment an (image, target) pair; the inputs are not modified.

    Parameters
    ----------
    image : ndarray of uint8, shape (H, W, 3)
    target : ndarray of int, shape (H, W)
    rng : numpy.random.Generator
    crop_size : int or None
        Side of the random square crop (None = no crop).
    scale_range : (float, float)
        Rescaling factor drawn uniformly (``(1, 1)`` = none).
    hflip : bool
        Flip horizontally with probability 1/2.
    color_jitter : float
        Strength of :func:`color_jitter` (0 = none).
    ignore_index : int
        Target value of padded pixels.

    Returns
    -------
    image : ndarray of uint8, shape (crop_size, crop_size, 3)
    target : ndarray, same dtype as ``target``
    """
    if image.shape[:2] != target.shape:
        raise ValueError(f"image {image.shape[:2]} and target {target.shape} differ in size")
    lo, hi = float(scale_range[0]), float(scale_range[1])
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    scale = float(rng.uniform(lo, hi)) if hi > lo else lo
    if scale != 1.0:
        shape = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
        image, target = resize_image(image, shape), resize_labels(target, shape)
    if crop_size is not None:
        image, target = random_crop(image, target, int(crop_size), rng=rng,
                                    ignore_index=ignore_index)
    if hflip and rng.random() < 0.5:
        image, target = image[:, ::-1], target[:, ::-1]
    image = _color_jitter(image, color_jitter, rng=rng)
    return np.ascontiguousarray(image), np.ascontiguousarray(target)


_color_jitter = color_jitter
