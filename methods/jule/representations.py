"""The representations `jule` learns: superpixels embedded by a CNN or by backbone features.

- :func:`build_color_cnn`: a small CNN over the CIELAB image plus a linear map of the
  superpixel's mean colour; the CNN branch starts at zero, so the initial representation is
  the colour (``features="cnn"``).
- :class:`ImageCNNRepresentation`: one image's superpixels, the CNN run over the whole image
  and mean-pooled per superpixel through a sparse pooling matrix.
- :class:`PatchCNNRepresentation`: superpixels of many images, each as a patch around it with
  its mask (dataset scope).
- :class:`VectorRepresentation`: one descriptor per superpixel (pooled backbone features)
  through a module (the residual MLP of :func:`methods.jule.learning.residual_mlp`).
"""

from __future__ import annotations

import numpy as np

from methods.jule.learning import Representation
from methods.jule.regions import pixel_to_working, working_shape

__all__ = ["build_color_cnn", "ImageCNNRepresentation", "PatchCNNRepresentation",
           "VectorRepresentation", "superpixel_patches", "cielab", "resize"]


def cielab(image: np.ndarray) -> np.ndarray:
    """CIELAB of an RGB image, scaled by 1/100 (float32)."""
    from skimage.color import rgb2lab

    return rgb2lab(image).astype(np.float32) / 100.0  # L in [0, 1], a/b about [-1, 1]


def resize(image: np.ndarray, shape) -> np.ndarray:
    """``image`` at (h, w) ``shape`` by area interpolation (unchanged when already that size)."""
    import cv2

    if image.shape[:2] == tuple(shape):
        return image
    return cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def build_color_cnn(dim: int, width: int):
    """CNN trunk over CIELAB + head, and an orthonormal colour map (see module docstring)."""
    import torch
    import torch.nn as nn

    class ColorCNN(nn.Module):
        def __init__(self):
            super().__init__()
            groups = 8 if width % 8 == 0 else 1
            self.trunk = nn.Sequential(
                nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True),
                nn.GroupNorm(groups, width),
                nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
                nn.GroupNorm(groups, width),
                nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                nn.GroupNorm(groups, width),
            )
            self.head = nn.Linear(width, dim)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            self.color = nn.Linear(3, dim, bias=False)
            nn.init.orthogonal_(self.color.weight)

        def embed(self, lab_mean, pooled):
            e = self.color(lab_mean) + self.head(pooled)
            # constant coordinate: the L2 normalisation downstream then keeps lightness
            return torch.cat([e, torch.ones_like(e[:, :1])], dim=1)

    return ColorCNN()


class ImageCNNRepresentation(Representation):
    """Superpixels of one image embedded by a CNN run over the whole (working-res) image."""

    def __init__(self, module, lab_work, pool, lab_mean):
        import torch

        self.module = module
        self.x = torch.from_numpy(np.ascontiguousarray(lab_work.transpose(2, 0, 1)))[None]
        self.pool = pool
        self.lab_mean = torch.from_numpy(lab_mean.astype(np.float32))
        self.n_samples = int(lab_mean.shape[0])

    def embed(self, indices=None):
        z = self.module.trunk(self.x)[0]  # (C, h, w)
        pooled = self.pool_features(z)
        if indices is not None:
            return self.module.embed(self.lab_mean[indices], pooled[indices])
        return self.module.embed(self.lab_mean, pooled)

    def pool_features(self, z):
        import torch

        return torch.sparse.mm(self.pool, z.reshape(z.shape[0], -1).T)


class PatchCNNRepresentation(Representation):
    """Superpixels of many images, each as a patch around it plus its mask (dataset scope)."""

    def __init__(self, module, patches, masks, lab_mean):
        import torch

        self.module = module
        self.patches = patches  # uint8 (n, P, P, 3) RGB
        self.masks = torch.from_numpy(masks)  # float32 (n, P, P), rows sum to 1
        self.lab_mean = torch.from_numpy(lab_mean.astype(np.float32))
        self.n_samples = int(lab_mean.shape[0])

    def embed(self, indices=None):
        import torch

        if indices is None:
            indices = torch.arange(self.n_samples)
        idx = indices.numpy()
        lab = np.stack([cielab(p) for p in self.patches[idx]]).transpose(0, 3, 1, 2)
        z = self.module.trunk(torch.from_numpy(np.ascontiguousarray(lab)))
        pooled = (z * self.masks[indices][:, None]).sum((2, 3))
        return self.module.embed(self.lab_mean[indices], pooled)


class VectorRepresentation(Representation):
    """One input vector per sample (e.g. pooled backbone features), embedded by ``module``."""

    def __init__(self, module, inputs):
        import torch

        self.module = module
        self.inputs = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        self.n_samples = int(inputs.shape[0])

    def embed(self, indices=None):
        return self.module(self.inputs if indices is None else self.inputs[indices])


def superpixel_patches(image, sp, take, *, max_side, size):
    """Working-resolution RGB patches centred on superpixels and their normalised masks."""
    work = working_shape(image.shape[:2], max_side)
    img = resize(image, work)
    cells = pixel_to_working(image.shape[:2], work).ravel()
    wh, ww = work
    sp_flat = sp.ravel()
    # superpixel id of each working pixel: the full-res pixel nearest its centre
    ys = np.minimum(((np.arange(wh) + 0.5) * (sp.shape[0] / wh)).astype(np.int64),
                    sp.shape[0] - 1)
    xs = np.minimum(((np.arange(ww) + 0.5) * (sp.shape[1] / ww)).astype(np.int64),
                    sp.shape[1] - 1)
    sp_work = sp[ys[:, None], xs[None, :]]
    half = size // 2
    pad = np.pad(img, ((half, half), (half, half), (0, 0)), mode="reflect")
    sp_pad = np.pad(sp_work, half, mode="constant", constant_values=-1)
    cy = np.bincount(sp_flat, weights=(cells // ww).astype(np.float64)) / np.bincount(sp_flat)
    cx = np.bincount(sp_flat, weights=(cells % ww).astype(np.float64)) / np.bincount(sp_flat)
    patches = np.empty((len(take), size, size, 3), np.uint8)
    masks = np.empty((len(take), size, size), np.float32)
    for t, s in enumerate(take):
        y0, x0 = int(round(cy[s])), int(round(cx[s]))
        patches[t] = pad[y0:y0 + size, x0:x0 + size]
        m = (sp_pad[y0:y0 + size, x0:x0 + size] == s).astype(np.float32)
        if m.sum() == 0:  # superpixel too thin to survive the resize: its centre pixel
            m[half, half] = 1.0
        masks[t] = m / m.sum()
    return patches, masks
