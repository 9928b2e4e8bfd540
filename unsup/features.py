"""Dense per-pixel features from a pretrained backbone, and an on-disk feature cache.

:class:`DenseFeatureExtractor` turns an RGB image into a grid of feature vectors:

1. optional resize: by ``scale`` (upsampling small images gives finer deep features: thin
   objects span more cells of the stride-32 map), then down so that the longer side is at
   most ``max_side`` (for speed on large images: the backbone's cost grows with the pixel
   count); area interpolation when shrinking, bilinear when enlarging;
2. replicate-padding at the bottom/right to a multiple of the backbone's largest stride (32),
   so every map is exactly ``side / stride`` and the grid stays aligned with the top-left
   corner; normalisation as the backbone expects;
3. the encoder's maps at the chosen strides (4, 8, 16, 32 by default), each L2-normalised per
   pixel (so every scale weighs the same whatever its channel count and magnitude), bilinearly
   resampled to the grid of stride ``output_stride`` (average-pooled when finer), concatenated,
   L2-normalised again, and cropped back to the image.

The result, :class:`DenseFeatures`, has ``features`` of shape
``(ceil(H' / output_stride), ceil(W' / output_stride), D)`` with ``(H', W')`` the resized image
size and ``D = sum(encoder.channels)`` (496 for EfficientNet-Lite0 at strides 4..32). Cell
``(i, j)`` describes the ``output_stride`` x ``output_stride`` block of resized-image pixels
starting at ``(i * output_stride, j * output_stride)``; :meth:`DenseFeatures.to_pixels` maps
any per-cell map (scores, distances) back to the original image grid.

:class:`FeatureCache` stores the features of a dataset once, as float16 ``.npy`` files keyed
by a hash of the image content inside a folder named after the backbone and a hash of the
extraction settings, and reads them back memory-mapped, so dataset-level fitting streams
features from disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from unsup.backbones import DEFAULT_STRIDES, default_device, get_encoder
from unsup.base import check_image

__all__ = [
    "DenseFeatures",
    "DenseFeatureExtractor",
    "FeatureCache",
    "dense_features",
    "resized_shape",
    "resize_image",
    "upsample_maps",
    "image_hash",
]

#: Bumped when the feature computation changes, so stale caches are not reused.
FEATURES_VERSION = 1


def resized_shape(shape: tuple[int, int], max_side: int | None,
                  scale: float = 1.0) -> tuple[int, int]:
    """The (H', W') an image of ``shape`` is resized to: ``scale`` times its size, then
    shrunk (keeping the aspect ratio) so that ``max(H', W') <= max_side``."""
    h, w = int(shape[0]), int(shape[1])
    if scale != 1.0:
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
    if not max_side or max(h, w) <= max_side:
        return h, w
    factor = float(max_side) / max(h, w)
    return max(1, round(h * factor)), max(1, round(w * factor))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an image to (H', W'): area interpolation when shrinking, bilinear when enlarging.

    Returns the input itself when the shape is unchanged.
    """
    h, w = image.shape[:2]
    if (h, w) == tuple(shape):
        return image
    shrink = shape[0] * shape[1] < h * w
    return cv2.resize(image, (int(shape[1]), int(shape[0])),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def upsample_maps(maps: np.ndarray, *, stride: int, resized: tuple[int, int],
                  image_shape: tuple[int, int]) -> np.ndarray:
    """Resample per-cell maps (C, h, w) to the original image grid (C, H, W), bilinearly.

    The cells are ``stride`` x ``stride`` blocks of the resized image of size ``resized``;
    both steps (cells -> resized pixels, resized -> original pixels) use pixel-centre
    alignment (``align_corners=False``), so the result is not shifted.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (C, h, w), got {maps.shape}")
    rh, rw = resized
    h, w = image_shape
    if stride == 1 and (rh, rw) == (h, w) and maps.shape[1:] == (h, w):
        return maps
    t = torch.from_numpy(np.ascontiguousarray(maps))[None]
    if stride > 1:
        t = F.interpolate(t, scale_factor=float(stride), mode="bilinear", align_corners=False)
    t = t[..., :rh, :rw]
    if (rh, rw) != (h, w):
        t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return t[0].numpy()


def image_hash(image: np.ndarray) -> str:
    """A content hash of an image array (shape, dtype and bytes), 32 hex digits."""
    image = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.shape}{image.dtype}".encode())
    digest.update(image.data)
    return digest.hexdigest()


@dataclass
class DenseFeatures:
    """Per-cell features of one image and the geometry linking cells to pixels.

    Attributes
    ----------
    features : ndarray, shape (h, w, D)
        float32 (float16, memory-mapped, when read from a :class:`FeatureCache`).
    stride : int
        Cell size in resized-image pixels.
    image_shape : (int, int)
        (H, W) of the input image.
    resized : (int, int)
        (H', W') of the image the backbone saw.
    """

    features: np.ndarray
    stride: int
    image_shape: tuple[int, int]
    resized: tuple[int, int]

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(self.features.shape[:2])

    def to_pixels(self, maps: np.ndarray) -> np.ndarray:
        """Resample per-cell maps (C, h, w) to the input image grid (C, H, W)."""
        return upsample_maps(maps, stride=self.stride, resized=self.resized,
                             image_shape=self.image_shape)

    def pixel_to_cell(self) -> np.ndarray:
        """Index (into the flattened grid) of the cell containing each input pixel, (H, W)."""
        h, w = self.image_shape
        rh, rw = self.resized
        gh, gw = self.grid_shape
        ys = np.minimum(((np.arange(h) + 0.5) * (rh / h)).astype(np.int64) // self.stride, gh - 1)
        xs = np.minimum(((np.arange(w) + 0.5) * (rw / w)).astype(np.int64) // self.stride, gw - 1)
        return ys[:, None] * gw + xs[None, :]


def _dense_from_maps(maps: Sequence[torch.Tensor], strides: Sequence[int], output_stride: int,
                     grid: tuple[int, int]) -> torch.Tensor:
    """Normalise, resample to the output grid and concatenate encoder maps -> (N, D, gh, gw)."""
    padded_grid = None
    parts = []
    for fmap, stride in zip(maps, strides, strict=True):
        fmap = F.normalize(fmap.float(), dim=1)
        if padded_grid is None:
            padded_grid = (fmap.shape[-2] * stride // output_stride,
                           fmap.shape[-1] * stride // output_stride)
        if stride > output_stride:
            fmap = F.interpolate(fmap, size=padded_grid, mode="bilinear", align_corners=False)
        elif stride < output_stride:
            fmap = F.avg_pool2d(fmap, kernel_size=output_stride // stride)
        parts.append(fmap)
    dense = F.normalize(torch.cat(parts, dim=1), dim=1)
    return dense[..., : grid[0], : grid[1]]


class DenseFeatureExtractor:
    """Dense, L2-normalised, multi-scale backbone features (see the module docstring).

    Parameters
    ----------
    backbone : str
        Encoder name (:func:`unsup.backbones.build_encoder`).
    strides : sequence of int
        Encoder maps to use, a subset of (4, 8, 16, 32) (2 too for EfficientNet-Lite).
    output_stride : int
        Cell size of the output grid, a power of two <= 32. 4 keeps 1/16 of the pixels: a
        481x321 image gives a 81x121 grid.
    max_side : int, optional
        Downscale images whose longer side exceeds this before the backbone (speed).
    scale : float
        Resize images by this factor first (> 1: finer deep features, quadratic cost).
    weights_path : path-like, optional
        Local weights (required for torchvision / timm backbones).
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.
    batch_size : int
        Images of equal size are run through the backbone this many at a time.
    """

    def __init__(self, backbone: str = "efficientnet-lite0", *, strides=DEFAULT_STRIDES,
                 output_stride: int = 4, max_side: int | None = None, scale: float = 1.0,
                 weights_path=None, device=None, batch_size: int = 8):
        self.backbone = backbone
        self.strides = tuple(sorted(int(s) for s in strides))
        self.output_stride = int(output_stride)
        if self.output_stride < 1 or self.output_stride & (self.output_stride - 1) \
                or self.output_stride > 32:
            raise ValueError(f"output_stride must be a power of two in 1..32, got {output_stride}")
        if max_side is not None and int(max_side) < 32:
            raise ValueError(f"max_side must be >= 32 (or None), got {max_side}")
        self.max_side = None if max_side is None else int(max_side)
        if not 0.05 <= float(scale) <= 8:
            raise ValueError(f"scale must be in [0.05, 8], got {scale}")
        self.scale = float(scale)
        self.weights_path = weights_path
        self.device = torch.device(device) if device is not None else default_device()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = get_encoder(self.backbone, weights_path=self.weights_path,
                                        strides=self.strides, device=self.device)
        return self._encoder

    @property
    def dim(self) -> int:
        """Feature width D."""
        return self.encoder.out_channels

    def config(self) -> dict:
        """Everything the features depend on (the feature cache hashes it)."""
        weights = None
        if self.weights_path is not None:
            p = Path(self.weights_path)
            weights = {"path": str(p.resolve()),
                       "size": p.stat().st_size if p.is_file() else None,
                       "mtime": int(p.stat().st_mtime) if p.is_file() else None}
        return {"version": FEATURES_VERSION, "backbone": self.backbone,
                "strides": list(self.strides), "output_stride": self.output_stride,
                "max_side": self.max_side, "scale": self.scale, "weights": weights}

    def grid_shape(self, image_shape: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the feature grid of an image of shape (H, W)."""
        rh, rw = resized_shape(image_shape, self.max_side, self.scale)
        return math.ceil(rh / self.output_stride), math.ceil(rw / self.output_stride)

    def __call__(self, image: np.ndarray) -> DenseFeatures:
        """Features of one RGB uint8 image (H, W, 3)."""
        return self.extract([image])[0]

    def extract(self, images: Iterable[np.ndarray]) -> list[DenseFeatures]:
        """Features of several images, batching those of equal size; results in input order."""
        images = [check_image(im) for im in images]
        out: list[DenseFeatures | None] = [None] * len(images)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(im.shape[:2], []).append(i)
        for shape, indices in by_shape.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                feats = self._run([images[i] for i in chunk], shape)
                for i, f in zip(chunk, feats, strict=True):
                    out[i] = f
        return out

    def _run(self, images: list[np.ndarray], shape: tuple[int, int]) -> list[DenseFeatures]:
        encoder = self.encoder
        rh, rw = resized_shape(shape, self.max_side, self.scale)
        images = [resize_image(im, (rh, rw)) for im in images]
        multiple = max(encoder.pad_multiple, self.output_stride)
        ph, pw = -rh % multiple, -rw % multiple
        grid = (math.ceil(rh / self.output_stride), math.ceil(rw / self.output_stride))
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(images)).to(self.device)
            x = x.permute(0, 3, 1, 2).float()
            if ph or pw:
                # replicate, not zeros: a constant border would read as an edge
                x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            maps = encoder(encoder.normalize(x))
            dense = _dense_from_maps(maps, encoder.strides, self.output_stride, grid)
            dense = dense.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return [DenseFeatures(d, self.output_stride, tuple(shape), (rh, rw)) for d in dense]


def dense_features(image: np.ndarray, *, backbone: str = "efficientnet-lite0",
                   strides=DEFAULT_STRIDES, output_stride: int = 4,
                   max_side: int | None = None, device=None) -> DenseFeatures:
    """Dense features of one image (convenience wrapper of :class:`DenseFeatureExtractor`)."""
    return DenseFeatureExtractor(backbone, strides=strides, output_stride=output_stride,
                                 max_side=max_side, device=device)(image)


class FeatureCache:
    """Features of many images computed once, stored as float16 ``.npy``, read memory-mapped.

    Layout: ``directory/<backbone>-<settings hash>/<image content hash>.npy`` plus a
    ``settings.json`` describing the extraction. Keys are content hashes rather than sample ids,
    so a changed image is never served stale features and ``predict(image)`` (which has no id)
    can use the cache too. float16 halves the disk/page-cache footprint; features are unit
    vectors, so its ~1e-3 relative precision is far below the k-means distances that matter.

    Parameters
    ----------
    directory : path-like
    extractor : DenseFeatureExtractor
    """

    def __init__(self, directory: str | os.PathLike, extractor: DenseFeatureExtractor):
        self.extractor = extractor
        config = extractor.config()
        key = hashlib.blake2b(json.dumps(config, sort_keys=True).encode(),
                              digest_size=8).hexdigest()
        safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in extractor.backbone)
        self.path = Path(directory) / f"{safe_name}-{key}"
        self._config = config

    def _ensure_dir(self):
        if not (self.path / "settings.json").is_file():
            from unsup.io import atomic_write_bytes

            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path / "settings.json",
                               json.dumps(self._config, indent=2).encode())

    def file_for(self, image: np.ndarray) -> Path:
        return self.path / f"{image_hash(image)}.npy"

    def __contains__(self, image: np.ndarray) -> bool:
        return self.file_for(image).is_file()

    def get(self, image: np.ndarray) -> DenseFeatures:
        """Features of ``image`` (float16, memory-mapped), computed and stored if missing."""
        return self.get_many([image])[0]

    def get_many(self, images: Sequence[np.ndarray]) -> list[DenseFeatures]:
        """Like :meth:`get` for several images; the missing ones are extracted in batches."""
        images = [check_image(im) for im in images]
        files = [self.file_for(im) for im in images]
        missing = [i for i, f in enumerate(files) if not f.is_file()]
        if missing:
            from unsup.io import atomic_write_path

            self._ensure_dir()
            for i, feats in zip(missing, self.extractor.extract([images[i] for i in missing]),
                                strict=True):
                with atomic_write_path(files[i]) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, feats.features.astype(np.float16))
        out = []
        for im, f in zip(images, files, strict=True):
            try:
                arr = np.load(f, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise OSError(f"{f}: unreadable feature cache entry ({exc}); delete it") from None
            expected = self.extractor.grid_shape(im.shape[:2])
            if arr.ndim != 3 or arr.shape[:2] != expected:
                raise OSError(f"{f}: cached features have shape {arr.shape}, expected "
                              f"{expected} x D; delete the file")
            out.append(DenseFeatures(arr, self.extractor.output_stride, tuple(im.shape[:2]),
                                     resized_shape(im.shape[:2], self.extractor.max_side,
                                                   self.extractor.scale)))
        return out
