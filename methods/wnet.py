"""`wnet`: W-Net, a deep model for fully unsupervised image segmentation (Xia & Kulis 2017).

Xia & Kulis, "W-Net: A Deep Model for Fully Unsupervised Image Segmentation", arXiv
1711.08506. Two U-Nets in a row form an autoencoder: U-Enc maps the RGB image to a K-way
per-pixel softmax (the segmentation), U-Dec reconstructs the image from that softmax. Each
training batch takes one Adam step on U-Enc with the soft normalised-cut loss of its softmax,
then one step on both U-Nets with the reconstruction loss (the paper's Algorithm 1). At
inference, the argmax of U-Enc's softmax is the segmentation; the softmax is returned as
per-pixel scores for the dense CRF (``--crf``) and the hierarchical merging (``--hierarchy``),
the paper's post-processing.

Architecture (the paper's Figure 1): 18 modules, each two 3x3 convolutions followed by ReLU
and batch normalisation. U-Enc = modules 1-9 (4 max-pool downsamplings, channels ``width``
x 1, 2, 4, 8, 16, transposed-convolution upsampling, skip connections), a 1x1 convolution to K
channels and a softmax; U-Dec = modules 10-18, the same shape, from K channels back to RGB.
The first and last module of each U-Net use ordinary convolutions, the 14 inner modules
depthwise-separable ones (depthwise 3x3 + pointwise 1x1). Dropout follows every module. The
paper uses ``width=64`` (1024 channels at the bottleneck); the default here is narrower so the
model trains on a CPU (see docs/benchmarks/wnet.md).

Soft normalised cut (the paper's Eq. 3), for the softmax ``p_k`` of each image::

    J = K - sum_k  sum_{i,j} w(i,j) p_k(i) p_k(j)  /  sum_{i,j} w(i,j) p_k(i)
    w(i,j) = exp(-(F_i - F_j)^2 / sigma_i^2) * exp(-|X_i - X_j|^2 / sigma_x^2)  if |X_i - X_j| < r

with ``F`` the brightness (mean of R, G, B on the 0..255 scale) and ``X`` the pixel position
(paper: r = 5, sigma_I = 10, sigma_X = 4). It is computed locally over the (2r-1)^2 window
offsets, never as an N x N matrix (:func:`soft_ncut_loss`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from unsup.base import (
    NotFittedError,
    OptionGroup,
    RunOptions,
    Segmentation,
    SegmentationMethod,
    check_image,
)
from unsup.nn.runtime import resolve_device, seed_all, torch_threads
from unsup.registry import register

#: Folder of the shipped default model (package data).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "wnet_default"

#: Hyper-parameters (``get_params(deep=True)`` keys) that define the network's shape: the
#: shipped weights fit only when these equal the shipped model's.
ARCHITECTURE_PARAMS = ("n_classes", "network__width")

#: The shipped weights are used only when these equal the shipped model's: its shape and the
#: working resolution it was trained at (a model trained on 224-px images segments 224-px
#: images; run at another scale its regions have the wrong size).
SHIPPED_MATCH_PARAMS = ARCHITECTURE_PARAMS + ("max_side",)

#: Network stride: inputs are padded to a multiple of it (4 max-pool levels).
STRIDE = 16


# ------------------------------------------------------------------------------------------
# soft normalised cut


def ncut_offsets(radius: int) -> list[tuple[int, int]]:
    """Window offsets ``(dy, dx)`` with ``dy^2 + dx^2 < radius^2`` (69 for radius 5)."""
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    return [(dy, dx) for dy in range(-radius + 1, radius) for dx in range(-radius + 1, radius)
            if dy * dy + dx * dx < radius * radius]


def _neighbour_assoc_function():
    import torch
    import torch.nn.functional as F

    class NeighbourAssoc(torch.autograd.Function):
        """``assoc_k = sum_i p_k(i) N_k(i)`` with ``N_k(i) = sum_o w_o(i) p_k(i + o)``.

        Written as a Function so that only ``N`` is kept for the backward pass: with a
        symmetric affinity ``d assoc_k / d p_k(j) = 2 N_k(j)``. Plain autograd would keep one
        (B, K, H, W) product per offset (69 of them for r = 5).
        """

        @staticmethod
        def forward(ctx, p, weights, offsets, pad):
            h, w = p.shape[2:]
            p_pad = F.pad(p, (pad, pad, pad, pad))
            neighbours = torch.zeros_like(p)
            for index, (dy, dx) in enumerate(offsets):
                neighbours.addcmul_(p_pad[:, :, pad + dy:pad + dy + h, pad + dx:pad + dx + w],
                                    weights[:, index:index + 1])
            ctx.save_for_backward(neighbours)
            return (p * neighbours).sum(dim=(2, 3))

        @staticmethod
        def backward(ctx, grad_assoc):
            (neighbours,) = ctx.saved_tensors
            return 2.0 * neighbours * grad_assoc[:, :, None, None], None, None, None

    return NeighbourAssoc


def soft_ncut_loss(probs, image, *, radius: int = 5, sigma_i: float = 10.0,
                   sigma_x: float = 4.0, mask=None, reduction: str = "mean"):
    """Soft normalised-cut loss of per-pixel class probabilities (Xia & Kulis 2017, Eq. 3).

    Parameters
    ----------
    probs : Tensor, shape (B, K, H, W)
        Per-pixel class probabilities (softmax output).
    image : Tensor, shape (B, 3, H, W) or (B, 1, H, W)
        The images on the 0..255 scale; with 3 channels the brightness is their mean.
    radius : int
        Pixels closer than ``radius`` (Euclidean) are connected; farther pairs have w = 0.
    sigma_i : float
        Brightness scale of the affinity (0..255 units).
    sigma_x : float
        Spatial scale of the affinity (pixels).
    mask : Tensor of bool or float, shape (B, 1, H, W) or (B, H, W), optional
        Valid pixels (e.g. not padding); invalid pixels take no part in the cut.
    reduction : {"mean", "none"}
        Mean over the batch, or one value per image.

    Returns
    -------
    Tensor
        ``K - sum_k assoc(A_k, A_k) / assoc(A_k, V)``, in [0, K].

    Notes
    -----
    For every offset ``o`` of :func:`ncut_offsets` the affinity ``w_o(i) = w(i, i + o)`` is a
    (B, H, W) map (constant: it depends on the image only). Then ``assoc(A_k, A_k) = sum_i
    p_k(i) N_k(i)`` with ``N_k(i) = sum_o w_o(i) p_k(i + o)``, and ``assoc(A_k, V) = sum_i
    p_k(i) d(i)`` with the degree ``d(i) = sum_o w_o(i)``. Peak memory is a few (B, K, H, W)
    tensors plus the (B, n_offsets, H, W) affinities; time is linear in the number of offsets.
    """
    import torch
    import torch.nn.functional as F

    if probs.ndim != 4:
        raise ValueError(f"probs must be (B, K, H, W), got shape {tuple(probs.shape)}")
    b, k, h, w = probs.shape
    if image.ndim != 4 or image.shape[0] != b or image.shape[2:] != probs.shape[2:]:
        raise ValueError(f"image must be (B, C, H, W) matching probs {tuple(probs.shape)}, "
                         f"got {tuple(image.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    offsets = ncut_offsets(int(radius))
    pad = int(radius) - 1
    with torch.no_grad():
        brightness = image.to(probs.dtype).mean(dim=1, keepdim=True)
        if mask is None:
            valid = torch.ones((b, 1, h, w), dtype=probs.dtype, device=probs.device)
        else:
            valid = mask.reshape(b, 1, h, w).to(probs.dtype)
        f_pad = F.pad(brightness, (pad, pad, pad, pad))
        v_pad = F.pad(valid, (pad, pad, pad, pad))
        weights = torch.empty((b, len(offsets), h, w), dtype=probs.dtype, device=probs.device)
        for index, (dy, dx) in enumerate(offsets):
            ys, xs = slice(pad + dy, pad + dy + h), slice(pad + dx, pad + dx + w)
            weights[:, index:index + 1] = (
                torch.exp(-((brightness - f_pad[:, :, ys, xs]) ** 2) / sigma_i ** 2)
                * math.exp(-(dy * dy + dx * dx) / sigma_x ** 2) * valid * v_pad[:, :, ys, xs])
        degree = weights.sum(dim=1, keepdim=True)
    p = probs * valid
    assoc_aa = _neighbour_assoc_function().apply(p, weights, offsets, pad)
    assoc_av = (p * degree).sum(dim=(2, 3))
    eps = torch.finfo(probs.dtype).tiny ** 0.5
    loss = k - (assoc_aa / (assoc_av + eps)).sum(dim=1)
    return loss.mean() if reduction == "mean" else loss


# ------------------------------------------------------------------------------------------
# networks


def _conv(in_channels: int, out_channels: int, separable: bool):
    import torch.nn as nn

    if not separable:
        return nn.Conv2d(in_channels, out_channels, 3, padding=1)
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels),  # depthwise
        nn.Conv2d(in_channels, out_channels, 1),  # pointwise
    )


def _module(in_channels: int, out_channels: int, *, separable: bool, dropout: float):
    """One W-Net module: (3x3 conv -> ReLU -> BN) x 2, then dropout."""
    import torch.nn as nn

    layers = [_conv(in_channels, out_channels, separable), nn.ReLU(inplace=True),
              nn.BatchNorm2d(out_channels),
              _conv(out_channels, out_channels, separable), nn.ReLU(inplace=True),
              nn.BatchNorm2d(out_channels)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def build_unet(in_channels: int, out_channels: int, *, width: int, dropout: float):
    """One of W-Net's U-Nets: 9 modules (4 down, bottleneck, 4 up) and a 1x1 output conv."""
    import torch
    import torch.nn as nn

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            chans = [width * 2 ** i for i in range(5)]
            self.down = nn.ModuleList()
            previous = in_channels
            for level, c in enumerate(chans):
                # first module: ordinary convolutions; the inner ones: depthwise-separable
                self.down.append(_module(previous, c, separable=level > 0, dropout=dropout))
                previous = c
            self.up = nn.ModuleList()
            self.merge = nn.ModuleList()
            for level in range(3, -1, -1):
                self.up.append(nn.ConvTranspose2d(chans[level + 1], chans[level], 2, stride=2))
                # last module: ordinary convolutions
                self.merge.append(_module(2 * chans[level], chans[level], separable=level > 0,
                                          dropout=dropout))
            self.head = nn.Conv2d(chans[0], out_channels, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            skips = []
            for level, module in enumerate(self.down):
                if level > 0:
                    x = self.pool(x)
                x = module(x)
                skips.append(x)
            for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
                x = merge(torch.cat([skip, up(x)], dim=1))
            return self.head(x)

    return UNet()


def build_wnet(n_classes: int, *, width: int, dropout: float):
    """The W-Net: ``encoder`` (RGB -> K logits) and ``decoder`` (K probabilities -> RGB).

    ``forward(x)`` takes images normalised with :func:`normalize_images` and returns
    ``(probs, reconstruction)``; the reconstruction is on the 0..1 scale.
    """
    import torch
    import torch.nn as nn

    class WNetModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = build_unet(3, n_classes, width=width, dropout=dropout)
            self.decoder = build_unet(n_classes, 3, width=width, dropout=dropout)

        def segment(self, x):
            return torch.softmax(self.encoder(x), dim=1)

        def forward(self, x):
            probs = self.segment(x)
            return probs, self.decoder(probs)

    return WNetModel()


def normalize_images(images):
    """uint8-range (B, 3, H, W) images -> zero-centred network input."""
    return (images / 255.0 - 0.5) / 0.25


# ------------------------------------------------------------------------------------------
# training


class WNetTask:
    """The paper's alternating optimisation, as a :class:`unsup.nn.loop.TrainingTask`.

    ``train_step((images, masks))``: (1) one Adam step on U-Enc minimising
    ``ncut_weight * soft_ncut_loss`` (skipped when ``ncut_weight == 0``; the n-cut value is
    still reported); (2) one Adam step on U-Enc and U-Dec minimising the mean squared error
    of the reconstruction (0..1 scale) over the valid pixels. Each step has its own Adam
    optimiser (``ncut_optimizer`` over U-Enc, ``reconstruction_optimizer`` over the whole
    W-Net), as the paper's Algorithm 1 runs two separate minimisations. Their learning rates
    follow a cosine schedule over ``epochs`` (down to 1%), stepped at the end of each epoch.

    Why two optimisers: with one shared Adam the two losses share the first- and
    second-moment estimates. The n-cut gradient on U-Enc is ~100x larger than the
    reconstruction gradient (measured on the session-1 model: norms 3.6 vs 0.027), so the
    shared momentum made the "reconstruction step" repeat the n-cut direction and the shared
    second moment shrank the reconstruction gradient ~100x: U-Enc was in effect trained by the
    n-cut loss alone (docs/benchmarks/wnet.md, session 3).
    """

    def __init__(self, model, *, epochs: int, lr: float, ncut_weight: float, radius: int,
                 sigma_i: float, sigma_x: float, val_batches=None, device=None):
        import torch

        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.ncut_weight = float(ncut_weight)
        self.ncut_params = {"radius": int(radius), "sigma_i": float(sigma_i),
                            "sigma_x": float(sigma_x)}
        self.ncut_optimizer = torch.optim.Adam(self.model.encoder.parameters(), lr=lr)
        self.reconstruction_optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        # cosine decay to 1% of ``lr`` over ``epochs`` (T_max is part of the scheduler state:
        # a resumed run keeps the schedule it was started with)
        self.schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(int(epochs), 1), eta_min=lr * 0.01)
            for opt in (self.ncut_optimizer, self.reconstruction_optimizer)]
        self.val_batches = val_batches

    def train_step(self, batch) -> dict[str, float]:
        import torch

        images, masks = (t.to(self.device) for t in batch)
        images = images.float()
        masks = masks.float().unsqueeze(1)
        self.model.train()
        x = normalize_images(images)
        if self.ncut_weight > 0:
            self.ncut_optimizer.zero_grad(set_to_none=True)
            probs = self.model.segment(x)
            ncut = soft_ncut_loss(probs, images, mask=masks, **self.ncut_params)
            (self.ncut_weight * ncut).backward()
            self.ncut_optimizer.step()
        else:  # the ablation: report the n-cut of the current encoder without training on it
            with torch.no_grad():
                ncut = soft_ncut_loss(self.model.segment(x), images, mask=masks,
                                      **self.ncut_params)
        self.reconstruction_optimizer.zero_grad(set_to_none=True)
        probs, recon = self.model(x)
        squared = ((recon - images / 255.0) ** 2) * masks
        mse = squared.sum() / (masks.sum() * 3).clamp_min(1)
        mse.backward()
        self.reconstruction_optimizer.step()
        return {"ncut": float(ncut.detach()), "reconstruction": float(mse.detach())}

    def end_epoch(self, epoch: int) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def validate(self) -> dict[str, float]:
        """Mean n-cut and reconstruction losses on fixed validation crops (if any)."""
        import torch

        if not self.val_batches:
            return {}
        self.model.eval()
        sums, n = {"ncut": 0.0, "reconstruction": 0.0}, 0
        with torch.inference_mode():
            for images, masks in self.val_batches:
                images = images.to(self.device).float()
                masks = masks.to(self.device).float().unsqueeze(1)
                x = normalize_images(images)
                probs, recon = self.model(x)
                sums["ncut"] += float(soft_ncut_loss(probs, images, mask=masks,
                                                     **self.ncut_params))
                squared = ((recon - images / 255.0) ** 2) * masks
                sums["reconstruction"] += float(squared.sum() / (masks.sum() * 3).clamp_min(1))
                n += 1
        return {k: v / n for k, v in sums.items()}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(),
                "ncut_optimizer": self.ncut_optimizer.state_dict(),
                "reconstruction_optimizer": self.reconstruction_optimizer.state_dict(),
                "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        if "ncut_optimizer" not in state:
            raise ValueError("wnet: this checkpoint was written by the old single-optimiser "
                             "training loop; it cannot be resumed (start a new run)")
        self.model.load_state_dict(state["model"])
        self.ncut_optimizer.load_state_dict(state["ncut_optimizer"])
        self.reconstruction_optimizer.load_state_dict(state["reconstruction_optimizer"])
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)


class ImageCache:
    """Training images written once to ``directory`` as .npy files (streamed, never all in
    memory), downscaled so that the longer side is at most ``max_side``."""

    INDEX = "index.json"

    def __init__(self, directory, files: list[str]):
        self.directory = Path(directory)
        self.files = files

    @classmethod
    def build(cls, samples, directory, *, max_side: int | None, progress: bool = False):
        from tqdm import tqdm

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = []
        for i, sample in enumerate(tqdm(samples, desc="caching training images", unit="img",
                                        disable=not progress)):
            image = check_image(sample.image)
            image = _limit_side(image, max_side)
            name = f"{i:06d}.npy"
            np.save(directory / name, image)
            files.append(name)
        if not files:
            raise ValueError("W-Net fit: the training set has no image")
        (directory / cls.INDEX).write_text(json.dumps({"files": files, "max_side": max_side}))
        return cls(directory, files)

    @classmethod
    def open(cls, directory, *, max_side: int | None):
        index = Path(directory) / cls.INDEX
        if not index.is_file():
            return None
        data = json.loads(index.read_text())
        if data.get("max_side") != max_side:
            return None
        files = data["files"]
        if not all((Path(directory) / f).is_file() for f in files):
            return None
        return cls(directory, files)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> np.ndarray:
        return np.load(self.directory / self.files[index], allow_pickle=False)


class CropBatches:
    """``make_batches(epoch, start=0)`` for :func:`unsup.nn.loop.train`: one random crop of
    every cached image per epoch, shuffled per (seed, epoch); batches ``(images uint8 (B, 3,
    s, s), masks bool (B, s, s))`` where the mask marks real (not padded) pixels."""

    def __init__(self, cache: ImageCache, *, batch_size: int, crop_size: int, seed: int,
                 scale_range=(0.75, 1.25), hflip: bool = True):
        self.cache = cache
        self.batch_size = int(batch_size)
        self.crop_size = int(crop_size)
        self.seed = int(seed)
        self.scale_range = scale_range
        self.hflip = hflip
        self.steps_per_epoch = math.ceil(len(cache) / self.batch_size)

    def crop(self, epoch: int, index: int):
        from unsup.augment import augment_pair

        image = self.cache.load(index)
        rng = np.random.default_rng([self.seed, int(epoch), int(index), 0x3E7])
        valid = np.ones(image.shape[:2], np.uint8)
        image, valid = augment_pair(image, valid, rng=rng, crop_size=self.crop_size,
                                    scale_range=self.scale_range, hflip=self.hflip,
                                    color_jitter=0.0, ignore_index=0)
        return image, valid.astype(bool)

    def __call__(self, epoch: int, start: int = 0):
        import torch

        order = np.random.default_rng([self.seed, int(epoch), 0xBA7]).permutation(len(self.cache))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for indices in batches[start:]:
            crops = [self.crop(epoch, int(i)) for i in indices]
            images = torch.from_numpy(np.stack([c[0].transpose(2, 0, 1) for c in crops]))
            masks = torch.from_numpy(np.stack([c[1] for c in crops]))
            yield images, masks


def _limit_side(image: np.ndarray, max_side: int | None) -> np.ndarray:
    from unsup.augment import resize_image, working_shape

    return resize_image(image, working_shape(image.shape[:2], max_side))


# ------------------------------------------------------------------------------------------
# the method


class WNetNetwork(OptionGroup):
    """W-Net's U-Nets and their training (the method's ``network__*`` options).

    Parameters
    ----------
    width : int
        Channels of the first module (doubling at each of the 4 levels). The paper: 64; the
        default 16 trains in under an hour on a 2-core CPU.
    dropout : float
        Dropout rate after every module (the paper reports 65%; a narrow network needs
        less).
    crop_size : int
        Side of the square random training crops, taken from the images at the working
        resolution ``max_side`` (the paper trains on whole 224 x 224 images).
    batch_size : int
        Crops per step (the paper: 10).
    lr : float
        Adam learning rate of both steps, decayed by a cosine schedule to 1% over ``epochs``.
    epochs : int
        Epochs of ``fit`` (one random crop of every training image per epoch).
    """

    def __init__(self, *, width: int = 16, dropout: float = 0.1, crop_size: int = 128,
                 batch_size: int = 8, lr: float = 3e-3, epochs: int = 36):
        self.width = width
        self.dropout = dropout
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.lr = lr
        self.epochs = epochs


@register
class WNet(SegmentationMethod):
    """W-Net (Xia & Kulis 2017): U-Net autoencoder whose code is a K-way soft segmentation.

    Parameters
    ----------
    n_classes : int
        K, the number of soft classes of U-Enc's softmax (the maximum number of labels).
        The soft n-cut loss ``K - sum_k assoc_k / degree_k`` charges 1 for every unused
        class, so training drives each crop towards a K-way partition: K sets the number of
        regions per training crop, not just an upper bound. Default 8 (with 128-px crops of
        224-px images, i.e. about 16 regions per image; BSDS500 human segmentations have ~20):
        chosen on BSDS500 train images (docs/benchmarks/wnet.md, session 3); 32 fragmented.
    network : WNetNetwork or dict, optional
        The U-Nets and their training: ``network__width``, ``network__dropout``,
        ``network__crop_size``, ``network__batch_size``, ``network__lr``, ``network__epochs``
        (:class:`WNetNetwork`).
    ncut_weight : float
        Weight of the soft n-cut step; 0 = reconstruction only (the ablation). Each step
        has its own Adam optimiser, which is invariant to a loss's scale, so any positive
        weight trains (nearly) alike; only 0 vs > 0 matters.
    radius, sigma_i, sigma_x : int, float, float
        Soft n-cut affinity (the paper: 5, 10, 4); ``sigma_i`` on the 0..255 brightness
        scale (mean of R, G, B).
    max_side : int or None
        Working resolution: images whose longer side exceeds this are trained on and
        segmented at a reduced resolution (longer side = ``max_side``), scores upsampled
        bilinearly to the image; None = never. Default 224, the paper's input size: the
        n-cut's affinity radius (5 px) and K are relative to it, and the network then sees
        a whole scene per crop instead of a 96-px piece of it (the session-1 setting, full
        BSDS resolution, gave K fragments per 96-px crop, ~500 per image).
    pretrained : bool
        Without ``fit`` or ``--model``, use the model shipped with the lab (trained on
        BSDS500 train+val images, labels unused) when ``n_classes``, ``network__width``
        and ``max_side`` match it.
    n_threads : int or None
        torch intra-op threads during ``fit`` and ``predict`` (None = torch's setting); the
        previous setting is restored afterwards. On a CPU shared with other busy processes,
        1 thread is several times faster than 2 (docs/benchmarks/wnet.md).
    seed : int
        Seeds initialisation, crop sampling and dropout.
    """

    name = "wnet"
    summary = ("W-Net (Xia & Kulis 2017): U-Net autoencoder trained with soft normalised cut "
               "+ reconstruction; shipped BSDS500 model")
    supervision = "unlabeled"
    produces_scores = True
    trains_network = True
    # `unsup segment --hierarchy` merge order: the softmax is confident almost everywhere, so
    # its total-variation distance alone orders merges poorly; scores x image gradient was
    # best on BSDS500 train (SC ODS 0.468 vs 0.411 scores; docs/benchmarks/wnet.md)
    hierarchy_strength = "combined"

    def __init__(self, *, n_classes: int = 8, network=None, ncut_weight: float = 1.0,
                 radius: int = 5, sigma_i: float = 10.0, sigma_x: float = 4.0,
                 max_side: int | None = 224, pretrained: bool = True,
                 n_threads: int | None = None, seed: int = 0):
        self.n_classes = n_classes
        self.network = WNetNetwork.coerce(network, name="network")
        self.ncut_weight = ncut_weight
        self.radius = radius
        self.sigma_i = sigma_i
        self.sigma_x = sigma_x
        self.max_side = max_side
        self.pretrained = pretrained
        self.n_threads = n_threads
        self.seed = seed

    # -- checks -----------------------------------------------------------------------------
    def _check_params(self) -> None:
        params = self.get_params(deep=True)  # the names users set, network__width included

        def positive_int(name, minimum=1):
            value = params[name]
            if not isinstance(value, int | np.integer) or isinstance(value, bool) \
                    or value < minimum:
                raise ValueError(f"wnet: {name} must be an integer >= {minimum}, got {value!r}")

        positive_int("n_classes", 2)
        positive_int("network__width")
        positive_int("radius")
        positive_int("network__crop_size", STRIDE)
        positive_int("network__batch_size")
        positive_int("network__epochs", 0)
        if self.network.crop_size % STRIDE:
            raise ValueError(f"wnet: network__crop_size must be a multiple of {STRIDE}, "
                             f"got {self.network.crop_size}")
        if not 0 <= float(self.network.dropout) < 1:
            raise ValueError(f"wnet: network__dropout must be in [0, 1), "
                             f"got {self.network.dropout!r}")
        for name in ("sigma_i", "sigma_x", "network__lr"):
            if not float(params[name]) > 0:
                raise ValueError(f"wnet: {name} must be positive, got {params[name]!r}")
        if not float(self.ncut_weight) >= 0:
            raise ValueError(f"wnet: ncut_weight must be >= 0, got {self.ncut_weight!r}")
        if self.max_side is not None and int(self.max_side) < STRIDE:
            raise ValueError(f"wnet: max_side must be None or >= {STRIDE}, got {self.max_side}")

    def _build(self):
        return build_wnet(int(self.n_classes), width=int(self.network.width),
                          dropout=float(self.network.dropout))

    # -- learning ---------------------------------------------------------------------------
    def fit(self, samples, *, val_samples=None, run: RunOptions | None = None,
            progress: bool = False):
        """Train W-Net on the images of ``samples`` (annotations are ignored).

        Parameters
        ----------
        samples : iterable of unsup.datasets.Sample
            Streamed once into an on-disk image cache under ``run.out_dir``.
        val_samples : iterable of Sample, optional
            When given, the centre crop of each image is used to report validation n-cut
            and reconstruction losses every epoch.
        run : RunOptions, optional
            ``out_dir`` (checkpoint.pt, history.json, curves.png, image cache; a temporary
            directory when None), ``epochs`` (overrides ``network__epochs``),
            ``max_minutes`` (training stops cleanly after the step that spends it) and
            ``resume`` (continue from ``out_dir/checkpoint.pt``).
        progress : bool

        Returns
        -------
        self
        """
        run = RunOptions() if run is None else run
        self._check_params()
        epochs = int(self.network.epochs if run.epochs is None else run.epochs)
        with torch_threads(self.n_threads, flush_denormal=True):
            return self._fit(samples, val_samples=val_samples, out_dir=run.out_dir,
                             epochs=epochs, max_minutes=run.max_minutes, resume=run.resume,
                             progress=progress)

    def _fit(self, samples, *, val_samples, out_dir, epochs, max_minutes, resume, progress):
        from unsup.nn.loop import train

        temporary = out_dir is None
        out_dir = Path(tempfile.mkdtemp(prefix="wnet-")) if temporary else Path(out_dir)
        try:
            cache_dir = out_dir / "image_cache"
            cache = ImageCache.open(cache_dir, max_side=self.max_side) if resume else None
            if cache is None:
                if cache_dir.exists():
                    shutil.rmtree(cache_dir)
                cache = ImageCache.build(samples, cache_dir, max_side=self.max_side,
                                         progress=progress)
            batches = CropBatches(cache, batch_size=int(self.network.batch_size),
                                  crop_size=int(self.network.crop_size), seed=int(self.seed))
            val_batches = self._val_batches(val_samples) if val_samples is not None else None
            seed_all(int(self.seed))
            model = self._build()
            task = WNetTask(model, epochs=epochs, lr=float(self.network.lr),
                            ncut_weight=float(self.ncut_weight), radius=int(self.radius),
                            sigma_i=float(self.sigma_i), sigma_x=float(self.sigma_x),
                            val_batches=val_batches)
            t0 = time.monotonic()
            history = train(task, batches, out_dir=out_dir, epochs=epochs,
                            max_minutes=max_minutes, resume=resume, seed=int(self.seed),
                            progress=progress)
            self.network_ = task.model.to("cpu").eval()
            self.training_ = {"epochs_done": len(history.epochs), "stopped": history.stopped,
                              "train_seconds": round(history.train_seconds, 1),
                              "n_images": len(cache), "last": history.last,
                              "wall_seconds": round(time.monotonic() - t0, 1)}
        finally:
            if temporary:
                shutil.rmtree(out_dir, ignore_errors=True)
        return self

    def training_history(self) -> dict:
        return dict(getattr(self, "training_", {}))

    def _val_batches(self, val_samples):
        import torch

        from unsup.augment import random_crop

        batches, images, masks = [], [], []
        for i, sample in enumerate(val_samples):
            image = _limit_side(check_image(sample.image), self.max_side)
            rng = np.random.default_rng([int(self.seed), i, 0x7A1])
            crop, valid = random_crop(image, np.ones(image.shape[:2], np.uint8),
                                      int(self.network.crop_size), rng=rng, ignore_index=0)
            images.append(crop.transpose(2, 0, 1))
            masks.append(valid.astype(bool))
            if len(images) == int(self.network.batch_size):
                batches.append((torch.from_numpy(np.stack(images)),
                                torch.from_numpy(np.stack(masks))))
                images, masks = [], []
        if images:
            batches.append((torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))))
        return batches

    # -- shipped model ----------------------------------------------------------------------
    def _shipped_applies(self) -> bool:
        if not self.pretrained or not (DEFAULT_MODEL_DIR / "model.json").is_file():
            return False
        shipped = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())["params"]
        flat = {f"{k}__{key}" if isinstance(v, dict) else k: (v[key] if isinstance(v, dict)
                                                            else v)
                for k, v in shipped.items() for key in (v if isinstance(v, dict) else [k])}
        mine = self.get_params(deep=True)
        return all(flat.get(p) == mine[p] for p in SHIPPED_MATCH_PARAMS)

    def is_fitted(self) -> bool:
        return hasattr(self, "network_") or self._shipped_applies()

    def default_model_info(self) -> dict | None:
        """Which weights ``predict`` uses when the method was created without a model
        (recorded in run.json), or None when it has been fitted / loaded instead."""
        if hasattr(self, "network_") or not self._shipped_applies():
            return None
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                 for p in sorted(DEFAULT_MODEL_DIR.iterdir())
                 if p.is_file() and p.suffix in (".pt", ".json")}
        meta = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())
        info = {"path": str(DEFAULT_MODEL_DIR), "sha256": files, "shipped": True}
        training = DEFAULT_MODEL_DIR / "training.json"
        if training.is_file():
            info["training"] = json.loads(training.read_text())
        info["params"] = meta["params"]
        return info

    def _network(self):
        if hasattr(self, "network_"):
            return self.network_
        if self._shipped_applies():
            import torch

            state = torch.load(DEFAULT_MODEL_DIR / "weights.pt", map_location="cpu",
                               weights_only=True)
            self._load_state_dict(state)
            return self.network_
        raise NotFittedError(
            "method 'wnet' must be fitted before predict: call fit(samples), give a trained "
            "model (unsup segment ... --model DIR), or keep n_classes/width at the shipped "
            "model's values to use it")

    # -- inference --------------------------------------------------------------------------
    def predict(self, image: np.ndarray) -> Segmentation:
        """Segment an RGB uint8 image: U-Enc's argmax (labels) and softmax (scores)."""

        image = check_image(image)
        self._check_params()
        network = self._network()
        with torch_threads(self.n_threads, flush_denormal=True):
            return self._predict(network, image)

    def _predict(self, network, image):
        import torch
        import torch.nn.functional as F

        device = resolve_device()
        network = network.to(device).eval()
        h, w = image.shape[:2]
        work = _limit_side(image, self.max_side)
        wh, ww = work.shape[:2]
        ph, pw = (-wh) % STRIDE, (-ww) % STRIDE
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(work.transpose(2, 0, 1)))[None]
            x = normalize_images(x.to(device).float())
            # reflect padding (replicate when the image is too small to reflect)
            mode = "reflect" if ph < wh and pw < ww else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
            probs = network.segment(x)[:, :, :wh, :ww]
            if (wh, ww) != (h, w):
                probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
                probs = probs / probs.sum(dim=1, keepdim=True)
            probs = probs[0].float().cpu().numpy()
        labels = probs.argmax(axis=0).astype(np.int32)
        info = {"seconds": round(time.perf_counter() - t0, 4),
                "n_labels": int(np.unique(labels).size),
                "processed_shape": [int(wh), int(ww)]}
        return Segmentation(labels, scores=probs, info=info)

    # -- persistence ------------------------------------------------------------------------
    def _state_dict(self):
        if not hasattr(self, "network_"):
            return None
        return {k: v.detach().cpu() for k, v in self.network_.state_dict().items()}

    def _load_state_dict(self, state: dict) -> None:
        network = self._build()
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"wnet: weights do not fit n_classes={self.n_classes}, "
                             f"network__width={self.network.width}: {exc}") from None
        self.network_ = network.eval()

    def save(self, directory):
        directory = super().save(directory)
        if hasattr(self, "training_"):
            from unsup.io import atomic_write_bytes

            atomic_write_bytes(Path(directory) / "training.json",
                               json.dumps(self.training_, indent=2).encode())
        return directory
