"""`kanezaki`: unsupervised segmentation by backpropagation, per image.

Two variants of the same idea: a small randomly initialised CNN maps the image to ``C``
response channels, the per-pixel argmax of the (batch-normalised) responses is used as the
pseudo-target of a cross-entropy loss, and the network is trained on that single image for a
number of iterations; labels merge as training proceeds.

- ``variant="superpixel"``: Kanezaki, "Unsupervised Image Segmentation by Backpropagation",
  ICASSP 2018. The targets are refined by SLIC superpixels (each superpixel takes its majority
  label) before the loss is computed.
- ``variant="continuity"``: Kim, Kanezaki & Tanaka, "Unsupervised Learning of Image
  Segmentation Based on Differentiable Feature Clustering", IEEE TIP 2020 (arXiv 2007.09990).
  No superpixels; the loss is ``similarity_weight * CE(responses, argmax)`` plus
  ``continuity_weight`` times the mean absolute horizontal and vertical differences of the
  responses (spatial continuity loss). Optional user scribbles add a cross-entropy term on the
  scribbled pixels (weight ``scribble_weight``), the paper's interactive segmentation use.

The paper settings (``Kanezaki.reference()``) run at full resolution with 100 channels for up to
1000 iterations: 7-54 minutes per BSDS image on a 2-core CPU. The defaults instead optimise at a
reduced working resolution (``max_side``) for fewer iterations, stop when the labels stop
changing (``convergence_tol``), upsample the responses bilinearly to full resolution and average
the scores within full-resolution SLIC superpixels (``output_superpixels``) so that label
boundaries follow image edges; a dense CRF (``unsup.crf.DenseCRF``) on the scores is
recommended on top. On 6 BSDS500 val images they score matched mIoU(all) 0.306 against 0.198
for the uncapped paper settings, at ~1/200 of the time (docs/benchmarks/kanezaki.md).
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from unsup.augment import resize_image, working_shape
from unsup.base import Segmentation, SegmentationMethod, check_image
from unsup.registry import register
from unsup.superpixels import compute_superpixels, majority_vote, mean_per_segment

VARIANTS = ("superpixel", "continuity")


# ------------------------------------------------------------------------------------------
# helpers (module level so that they can be tested and reused)


def load_scribbles(scribbles, shape: tuple[int, int]) -> np.ndarray:
    """Read and check a scribble label map: 0 = unlabeled, 1..S = scribbled region ids.

    Parameters
    ----------
    scribbles : path or ndarray
        A label PNG (read with :func:`unsup.io.read_label_map`) or an (H, W) integer array.
    shape : tuple of int
        The image's (H, W); the scribbles must have the same size.

    Returns
    -------
    ndarray of int32, shape (H, W)

    Raises
    ------
    ValueError
        If the file cannot be read as a label map, the size differs from the image, values are
        negative, or no pixel is scribbled.
    """
    from unsup.io import ImageReadError, read_label_map

    if isinstance(scribbles, np.ndarray):
        source = "scribbles array"
        labels = scribbles
    else:
        source = f"scribbles file {os.fspath(scribbles)!r}"
        try:
            labels = read_label_map(scribbles)
        except ImageReadError as exc:
            raise ValueError(f"cannot read {source}: {exc.reason}") from None
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: expected a 2-D integer label map, got {labels.dtype} "
                         f"{labels.shape}")
    if labels.shape != tuple(shape):
        raise ValueError(f"{source}: size {labels.shape[1]}x{labels.shape[0]} (WxH) does not "
                         f"match the image, {shape[1]}x{shape[0]}")
    if labels.min() < 0:
        raise ValueError(f"{source}: labels must be >= 0 (0 = unlabeled)")
    if not labels.any():
        raise ValueError(f"{source}: no scribbled pixel (all values are 0 = unlabeled)")
    return labels.astype(np.int32)


def downsample_scribbles(scribbles: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Carry scribbles to the working resolution without losing thin strokes.

    Nearest-neighbour resizing would drop strokes thinner than the scale factor, so every
    scribbled pixel is instead written at its working-resolution position (when two
    scribble ids land on the same working pixel, the larger id wins).
    """
    if scribbles.shape == tuple(shape):
        return scribbles.copy()
    h, w = shape
    ys, xs = np.nonzero(scribbles)
    wy = np.minimum((ys * h) // scribbles.shape[0], h - 1)
    wx = np.minimum((xs * w) // scribbles.shape[1], w - 1)
    out = np.zeros(shape, np.int32)
    np.maximum.at(out, (wy, wx), scribbles[ys, xs])
    return out


@contextlib.contextmanager
def _torch_threads(n_threads: int):
    """Run with ``n_threads`` intra-op torch threads, restoring the previous setting."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def build_network(n_channels: int, n_conv: int, *, padding: str = "zeros"):
    """The paper's network: ``n_conv`` blocks of 3x3 conv -> ReLU -> BN, then 1x1 conv -> BN.

    The final batch normalisation is what makes the argmax a clustering: every response channel
    is standardised over the image, so no channel can win everywhere. ``padding`` is the 3x3
    convolutions' padding mode: "zeros" (the paper) makes the image border look like an edge
    and often gives the border its own label; "reflect" does not.
    """
    import torch.nn as nn

    layers = []
    in_channels = 3
    for _ in range(n_conv):
        layers += [nn.Conv2d(in_channels, n_channels, 3, padding=1, padding_mode=padding),
                   nn.ReLU(inplace=True), nn.BatchNorm2d(n_channels)]
        in_channels = n_channels
    layers += [nn.Conv2d(n_channels, n_channels, 1), nn.BatchNorm2d(n_channels)]
    return nn.Sequential(*layers)


def propagate_scribble_labels(target, scribbled, scribble_channel, n_channels: int):
    """Map every channel present on scribbled pixels to the channel of its majority scribble.

    Parameters
    ----------
    target : LongTensor, shape (N,)
        Pseudo-target channel per working pixel.
    scribbled : LongTensor, shape (S,)
        Indices of the scribbled pixels.
    scribble_channel : LongTensor, shape (S,)
        Their scribble channel (scribble id - 1).
    n_channels : int

    Returns
    -------
    LongTensor, shape (N,)
        ``target`` with the channels that touch scribbles renamed (a new tensor).
    """
    import torch

    counts = torch.bincount(target[scribbled] * n_channels + scribble_channel,
                            minlength=n_channels * n_channels).reshape(n_channels, n_channels)
    touched = counts.sum(dim=1) > 0
    mapping = torch.arange(n_channels, device=target.device)
    mapping[touched] = counts[touched].argmax(dim=1)
    return mapping[target]


def pool_scores(scores: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Average per-pixel scores over segments: every pixel gets its segment's mean scores.

    Parameters
    ----------
    scores : ndarray, shape (C, H, W)
        Per-pixel class probabilities.
    segments : ndarray of int, shape (H, W)
        Segment ids ``0..n-1`` (e.g. SLIC superpixels of the full-resolution image).

    Returns
    -------
    ndarray of float32, shape (C, H, W)
        Constant within each segment; still probabilities (means of probabilities), so the
        argmax is a superpixel-wise soft majority vote whose boundaries follow the segments'.
    """
    scores = np.asarray(scores)
    segments = np.asarray(segments)
    if scores.ndim != 3 or scores.shape[1:] != segments.shape:
        raise ValueError(f"scores {scores.shape} must be (C, H, W) with (H, W) = segments "
                         f"{segments.shape}")
    means = mean_per_segment(np.moveaxis(scores, 0, -1), segments)  # (n, C)
    return np.ascontiguousarray(np.moveaxis(means[segments], -1, 0), dtype=np.float32)


def continuity_loss(responses):
    """Spatial continuity loss: mean |R(y+1,x) - R(y,x)| + mean |R(y,x+1) - R(y,x)|.

    ``responses`` has shape (1, C, H, W); the means run over channels and pixels.
    """
    total = responses.new_zeros(())
    if responses.shape[2] > 1:
        total = total + (responses[:, :, 1:, :] - responses[:, :, :-1, :]).abs().mean()
    if responses.shape[3] > 1:
        total = total + (responses[:, :, :, 1:] - responses[:, :, :, :-1]).abs().mean()
    return total


# ------------------------------------------------------------------------------------------


@register
class Kanezaki(SegmentationMethod):
    """Unsupervised segmentation by backpropagation (Kanezaki 2018; Kim et al. 2020).

    Parameters
    ----------
    variant : {"continuity", "superpixel"}
        ``"superpixel"``: ICASSP 2018 (targets refined by SLIC superpixel majority vote);
        ``"continuity"``: TIP 2020 (similarity + spatial continuity loss, optional scribbles).
    scribbles : path or ndarray or None
        Only for ``variant="continuity"``: a label map of the image's size, 0 = unlabeled,
        value v >= 1 = region v. Scribbled pixels are trained towards response channel v-1
        (the paper's scribble loss); the run stops at ``min_labels = number of scribble ids``
        (as in the paper) or by convergence, but never while a scribbled working pixel's
        argmax differs from its scribble's channel.
        Output label v-1 is the region of scribble id v whenever all scribble ids survive
        (``info["scribble_labels"]`` gives the mapping). With ``output_superpixels`` the
        output is superpixel-wise, so a stroke pixel on a superpixel that mostly belongs to
        another region can take that region's label (the training still respects it).
    n_channels : int
        Response channels p = q (the paper: 100); also the maximum number of labels. 64 was
        better than 32 on BSDS500 train images at every working resolution tried, at about 2x
        the time (see docs/benchmarks/kanezaki.md).
    n_conv : int
        Number of 3x3 conv blocks M (the official code's default: 2).
    max_iter : int
        Maximum number of training iterations T (the paper: 1000). The defaults (max_iter 30,
        max_side 320, output_superpixels 1000, 64 channels) were chosen together on 8 BSDS500
        train images by the best matched mIoU(all) after the dense CRF (0.313 vs 0.253 for the
        previous 60 iterations at 160 px; docs/benchmarks/kanezaki.md, session 3).
    min_labels : int
        Stop as soon as the argmax uses at most this many labels (the paper: 3).
    lr, momentum : float
        SGD hyper-parameters (the paper: 0.1 and 0.9).
    n_superpixels : int
        SLIC superpixels K for the ``superpixel`` variant (the paper: 10000 at full
        resolution); the working resolution is used, so K is capped at its pixel count.
    compactness : float
        SLIC compactness (the official code: 100).
    continuity_weight : float
        Weight mu of the spatial continuity loss (``continuity`` variant).
    similarity_weight : float
        Weight of the feature-similarity cross-entropy.
    scribble_weight : float
        Weight nu of the scribble cross-entropy (the official code: 0.5).
    max_side : int or None
        Optimise at a working resolution whose longer side is at most this many pixels, then
        upsample the responses bilinearly; None = full resolution (the paper).
    convergence_tol : float
        Stop (converged) when the fraction of working pixels whose target label changed
        between consecutive iterations stays below this for ``patience`` iterations;
        0 disables the criterion (the paper).
    patience : int
        See ``convergence_tol``.
    propagate_scribbles : bool
        With scribbles: every response channel that covers scribbled pixels has its pseudo-
        targets (on all pixels) replaced by the channel of its majority scribble id. Without
        this (the paper), a free channel can win a scribbled region when the stroke is small
        against the rest of the region, and the scribble is then ignored.
    padding : {"reflect", "zeros"}
        Padding of the 3x3 convolutions. The paper pads with zeros, which makes the image
        border an "edge" that often gets a label of its own; reflection avoids that.
    score_temperature : float
        ``scores = softmax(responses / score_temperature)`` over the labels present.
    output_superpixels : int or None
        After upsampling the scores to full resolution, average them within each of about
        this many SLIC superpixels of the full-resolution image (``pool_scores``), so that the
        label boundaries follow image edges instead of the blurred working-resolution ones;
        labels are the argmax of the pooled scores. None = per-pixel output (the paper).
    output_compactness : float
        SLIC compactness of those output superpixels (scikit-image's scale; lower follows
        colour edges more closely).
    n_threads : int or None
        torch intra-op threads during ``predict`` (None = all CPUs this process may use);
        the previous setting is restored afterwards.
    seed : int
        Seeds the network initialisation (results are deterministic for a given seed and
        thread count).
    """

    name = "kanezaki"
    summary = ("CNN trained per image on its own argmax labels (Kanezaki 2018 superpixel / "
               "Kim et al. 2020 continuity loss, optional scribbles)")
    supervision = "none"
    produces_scores = True

    def __init__(self, *, variant: str = "continuity", scribbles=None, n_channels: int = 64,
                 n_conv: int = 2, max_iter: int = 30, min_labels: int = 3, lr: float = 0.1,
                 momentum: float = 0.9, n_superpixels: int = 2000, compactness: float = 100.0,
                 continuity_weight: float = 1.0, similarity_weight: float = 1.0,
                 scribble_weight: float = 0.5, max_side: int | None = 320,
                 convergence_tol: float = 0.002, patience: int = 3,
                 propagate_scribbles: bool = True, padding: str = "reflect",
                 score_temperature: float = 1.0, output_superpixels: int | None = 1000,
                 output_compactness: float = 10.0,
                 n_threads: int | None = None, seed: int = 0):
        self.variant = variant
        self.scribbles = scribbles
        self.n_channels = n_channels
        self.n_conv = n_conv
        self.max_iter = max_iter
        self.min_labels = min_labels
        self.lr = lr
        self.momentum = momentum
        self.n_superpixels = n_superpixels
        self.compactness = compactness
        self.continuity_weight = continuity_weight
        self.similarity_weight = similarity_weight
        self.scribble_weight = scribble_weight
        self.max_side = max_side
        self.convergence_tol = convergence_tol
        self.patience = patience
        self.propagate_scribbles = propagate_scribbles
        self.padding = padding
        self.score_temperature = score_temperature
        self.output_superpixels = output_superpixels
        self.output_compactness = output_compactness
        self.n_threads = n_threads
        self.seed = seed

    @classmethod
    def reference(cls, variant: str = "superpixel", **overrides) -> Kanezaki:
        """The published settings (official code defaults): full resolution, 100 channels,
        2 conv blocks, up to 1000 iterations, stop at 3 labels, SGD lr 0.1 momentum 0.9,
        10k SLIC superpixels with compactness 100, mu = 1, nu = 0.5, zero padding, no
        convergence test, per-pixel output (no output superpixels)."""
        params = dict(variant=variant, n_channels=100, n_conv=2, max_iter=1000, min_labels=3,
                      lr=0.1, momentum=0.9, n_superpixels=10000, compactness=100.0,
                      continuity_weight=1.0, similarity_weight=1.0, scribble_weight=0.5,
                      max_side=None, convergence_tol=0.0, propagate_scribbles=False,
                      padding="zeros", output_superpixels=None)
        params.update(overrides)
        return cls(**params)

    # --------------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.scribbles is not None and self.variant != "continuity":
            raise ValueError("scribbles are supported by variant='continuity' only "
                             f"(got variant={self.variant!r})")
        for name in ("n_channels", "n_conv", "max_iter", "patience"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.n_channels) < 2:
            raise ValueError(f"n_channels must be >= 2, got {self.n_channels}")
        if int(self.min_labels) < 1:
            raise ValueError(f"min_labels must be >= 1, got {self.min_labels}")
        if self.max_side is not None and int(self.max_side) < 2:
            raise ValueError(f"max_side must be >= 2 or None, got {self.max_side}")
        if self.padding not in ("reflect", "zeros"):
            raise ValueError(f"padding must be 'reflect' or 'zeros', got {self.padding!r}")
        if float(self.lr) <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if float(self.score_temperature) <= 0:
            raise ValueError(f"score_temperature must be > 0, got {self.score_temperature}")
        if self.variant == "superpixel" and int(self.n_superpixels) < 1:
            raise ValueError(f"n_superpixels must be >= 1, got {self.n_superpixels}")
        if self.output_superpixels is not None and int(self.output_superpixels) < 1:
            raise ValueError(f"output_superpixels must be >= 1 or None, got "
                             f"{self.output_superpixels}")
        if float(self.output_compactness) <= 0:
            raise ValueError(f"output_compactness must be > 0, got {self.output_compactness}")

    def predict(self, image):
        import torch

        image = check_image(image)
        self._check_params()
        height, width = image.shape[:2]
        scribbles = None
        if self.scribbles is not None:
            scribbles = load_scribbles(self.scribbles, (height, width))
            if scribbles.max() > int(self.n_channels):
                raise ValueError(f"scribble ids go up to {scribbles.max()} but the network has "
                                 f"only n_channels={self.n_channels} response channels")
        n_threads = int(self.n_threads) if self.n_threads else _default_threads()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        start = time.perf_counter()
        with _torch_threads(n_threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            logits, info = self._optimise(image, scribbles, device)
            labels, scores = self._full_resolution_output(logits, image)
        info.update(n_threads=n_threads, seconds=round(time.perf_counter() - start, 3),
                    n_labels=int(scores.shape[0]))
        if scribbles is not None:
            info["scribble_labels"] = _scribble_label_map(labels, scribbles)
        return Segmentation(labels, scores=scores, info=info)

    # --------------------------------------------------------------------------------------
    def _optimise(self, image, scribbles, device):
        """Train the network on one image; return the final responses (C, h, w) and info."""
        import torch
        import torch.nn.functional as F

        shape = working_shape(image.shape[:2], self.max_side)
        small = resize_image(image, shape)
        x = torch.from_numpy(small.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        x = x.contiguous().to(device)

        superpixels = None
        if self.variant == "superpixel":
            n_segments = min(int(self.n_superpixels), shape[0] * shape[1])
            superpixels = compute_superpixels(small, n_segments=n_segments,
                                              compactness=float(self.compactness))
        min_labels = int(self.min_labels)
        scribble_target = scribbled = None
        if scribbles is not None:
            small_scr = downsample_scribbles(scribbles, shape).ravel()
            scribbled = torch.from_numpy(np.flatnonzero(small_scr)).to(device)
            unscribbled = torch.from_numpy(np.flatnonzero(small_scr == 0)).to(device)
            scribble_target = torch.from_numpy(small_scr.astype(np.int64) - 1).to(device)
            scribble_channel = scribble_target[scribbled]
            # as in the paper's scribble setting: stop once only the scribbled ids remain
            min_labels = int(np.unique(scribbles[scribbles > 0]).size)

        net = build_network(int(self.n_channels), int(self.n_conv),
                            padding=self.padding).to(device)
        net.train()  # batch statistics of this image, also for the final forward pass
        optimizer = torch.optim.SGD(net.parameters(), lr=float(self.lr),
                                    momentum=float(self.momentum))
        n_channels = int(self.n_channels)
        tol = float(self.convergence_tol)
        previous = None
        calm = 0
        agreement = None
        stopped = "max_iter"
        history = []  # (labels before refinement, fraction of targets changed) per iteration
        for _ in range(int(self.max_iter)):
            optimizer.zero_grad(set_to_none=True)
            responses = net(x)  # (1, C, h, w)
            flat = responses[0].reshape(n_channels, -1).t()  # (h*w, C)
            raw = flat.detach().argmax(dim=1)
            n_labels = int(torch.unique(raw).numel())
            target = raw
            if superpixels is not None:
                refined = majority_vote(superpixels, target.cpu().numpy().reshape(shape))
                target = torch.from_numpy(refined.ravel().astype(np.int64)).to(device)
            if scribbled is not None and self.propagate_scribbles:
                target = propagate_scribble_labels(target, scribbled, scribble_channel,
                                                   n_channels)
            if scribbled is not None:
                loss = float(self.similarity_weight) * F.cross_entropy(
                    flat[unscribbled], target[unscribbled]) if unscribbled.numel() else 0.0
                loss = loss + float(self.scribble_weight) * F.cross_entropy(
                    flat[scribbled], scribble_target[scribbled])
            else:
                loss = float(self.similarity_weight) * F.cross_entropy(flat, target)
            if self.variant == "continuity":
                loss = loss + float(self.continuity_weight) * continuity_loss(responses)
            loss.backward()
            optimizer.step()

            changed = 1.0 if previous is None else float((target != previous).float().mean())
            previous = target
            history.append((n_labels, round(changed, 5)))
            if scribbled is not None:
                # never stop while a scribbled pixel's argmax is not its scribble's channel
                agreement = float((raw[scribbled] == scribble_channel).float().mean())
                if agreement < 1.0:
                    calm = 0
                    continue
            if n_labels <= min_labels:
                stopped = "min_labels"
                break
            calm = calm + 1 if changed < tol else 0
            if tol > 0 and calm >= int(self.patience):
                stopped = "converged"
                break

        with torch.no_grad():
            logits = net(x)[0]
        info = {
            "variant": self.variant,
            "iterations": len(history),
            "stopped": stopped,
            "converged": stopped != "max_iter",
            "working_shape": list(shape),
            "labels_per_iteration": [n for n, _ in history],
            "final_change": history[-1][1] if history else None,
        }
        if agreement is not None:
            info["scribble_agreement"] = round(agreement, 5)
        return logits, info

    def _full_resolution_output(self, logits, image):
        """Labels (H, W) and scores (C, H, W) over the labels present, consecutive 0..C-1."""
        import torch
        import torch.nn.functional as F

        shape = tuple(image.shape[:2])
        with torch.no_grad():
            present = torch.unique(logits.argmax(dim=0))
            logits = logits[present] / float(self.score_temperature)
            if tuple(logits.shape[1:]) != shape:
                logits = F.interpolate(logits[None], size=shape, mode="bilinear",
                                       align_corners=False)[0]
            scores = torch.softmax(logits, dim=0).cpu().numpy().astype(np.float32)
        if self.output_superpixels:
            n_segments = min(int(self.output_superpixels), shape[0] * shape[1])
            segments = compute_superpixels(image, n_segments=n_segments,
                                           compactness=float(self.output_compactness))
            scores = pool_scores(scores, segments)
        labels = scores.argmax(axis=0)
        # upsampling or pooling can leave a channel that wins nowhere: drop it
        keep = np.unique(labels)
        if keep.size < scores.shape[0]:
            scores = scores[keep]
            scores /= scores.sum(axis=0, keepdims=True)
            labels = np.searchsorted(keep, labels)
        return labels.astype(np.int32), np.ascontiguousarray(scores, dtype=np.float32)


def _scribble_label_map(labels: np.ndarray, scribbles: np.ndarray) -> dict[str, int]:
    """For each scribble id, the output label most of its pixels received (JSON keys)."""
    result = {}
    for sid in np.unique(scribbles[scribbles > 0]):
        values = labels[scribbles == sid]
        result[str(int(sid))] = int(np.bincount(values).argmax())
    return result
