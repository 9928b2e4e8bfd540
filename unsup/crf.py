"""Fully connected CRF post-processing (Krähenbühl & Koltun, NIPS 2011) for any method.

:class:`DenseCRF` refines per-pixel class probabilities (or a hard label map) with a dense
CRF whose pairwise term is a Potts model weighted by two Gaussian kernels: an appearance
("bilateral") kernel over position and RGB colour, and a smoothness kernel over position.
Mean-field inference runs in the permutohedral lattice of ``pydensecrf`` (the maintained
``pydensecrf2`` distribution), so one iteration is linear in pixels times labels.

The same post-processor serves ``unsup segment --crf`` (through
:meth:`DenseCRF.refine_segmentation`, with ``--crf-param KEY=VALUE`` parsed by
:meth:`DenseCRF.from_params`) and Python callers (:meth:`DenseCRF.refine`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from sklearn.base import BaseEstimator

from unsup.base import Segmentation, check_image, params_to_json

__all__ = ["DenseCRF", "CRFResult", "parse_crf_params"]

#: Largest label id we handle with a dense lookup table (bincount); above it, np.unique.
_DENSE_ID_LIMIT = 1 << 22
#: Allowed deviation of a pixel's probabilities from summing to one.
_SUM_TOLERANCE = 1e-3

_INT_PARAMS = ("n_iter",)
_OPTIONAL_INT_PARAMS = ("max_labels", "max_pixels")
_FLOAT_PARAMS = ("gaussian_sxy", "gaussian_weight", "bilateral_sxy", "bilateral_srgb",
                 "bilateral_weight", "score_confidence", "label_confidence", "min_probability")


@dataclass
class CRFResult:
    """What :meth:`DenseCRF.refine` returns.

    Attributes
    ----------
    labels : ndarray of int32, shape (H, W)
        Refined labels, in the caller's label ids (``label_ids[argmax of probabilities]``).
    probabilities : ndarray of float32, shape (K, H, W), or None
        Mean-field marginals (each pixel sums to one) over the K labels the CRF was run on;
        channel ``k`` belongs to label id ``label_ids[k]``. None when
        ``refine(..., return_probabilities=False)``.
    label_ids : ndarray of int64, shape (K,)
        The original id of each channel, ascending: for ``scores`` input the channel index
        in the given array, for ``labels`` input the label value.
    info : dict
        JSON-serialisable diagnostics: ``n_input_labels`` (labels present in the input, or
        channels given), ``n_present`` (labels present / channels that are the argmax of at
        least one pixel), ``n_channels`` (K), ``n_absorbed`` (present labels beyond
        ``max_labels`` whose pixels were left to the CRF), ``scale`` (resampling factor,
        1.0 = full resolution) and ``processed_shape``.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    label_ids: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


class DenseCRF(BaseEstimator):
    """Dense CRF with Gaussian (smoothness) and bilateral (appearance) Potts kernels.

    The energy is ``E(x) = sum_i -log P_i(x_i) + sum_{i<j} [x_i != x_j] k(f_i, f_j)`` with
    ``k = bilateral_weight * exp(-|p_i-p_j|^2 / 2 bilateral_sxy^2 - |I_i-I_j|^2 / 2
    bilateral_srgb^2) + gaussian_weight * exp(-|p_i-p_j|^2 / 2 gaussian_sxy^2)``, where
    ``p`` is the pixel position and ``I`` the RGB colour (0..255). Mean-field inference
    returns approximate marginals; the refined label is their argmax.

    Parameters (keyword-only)
    -------------------------
    n_iter : int, default 10
        Mean-field iterations (DeepLab and Krähenbühl & Koltun use 10; it converges in 5-10).
    gaussian_sxy : float, default 3
        Standard deviation (pixels) of the smoothness kernel. 3 everywhere in the literature.
    gaussian_weight : float, default 3
        Weight of the smoothness kernel (0 disables it). 3 everywhere in the literature.
    bilateral_sxy : float, default 80
        Spatial standard deviation (pixels) of the appearance kernel: how far colour
        evidence reaches. Krähenbühl & Koltun use 80 (on MSRC/VOC-sized images, like BSDS
        and most of the lab's data); DeepLab cross-validates 50-121.
    bilateral_srgb : float, default 13
        Colour standard deviation (0..255 scale) of the appearance kernel: pixels whose
        colours differ by much more than this do not pull each other. Krähenbühl & Koltun
        use 13, DeepLab 3-5 (DeepLab's CNN unaries are confident; the lab's unsupervised
        unaries are not, and a wider colour kernel lets them be corrected).
    bilateral_weight : float, default 10
        Weight of the appearance kernel (0 disables it). Krähenbühl & Koltun use 10,
        DeepLab 3-5.
    score_confidence : float in (0, 1], default 1
        For ``scores`` input: the probabilities are mixed with the uniform distribution over
        the K labels, ``p' = score_confidence * p + (1 - score_confidence) / K`` (as
        ``pydensecrf.utils.unary_from_softmax(scale=...)``), which bounds how much evidence
        one pixel's scores carry. 1 uses the probabilities as given; lower values suit
        over-confident scores (e.g. a softmax of k-means distances at a low temperature).
    label_confidence : float in (0.5, 1), default 0.7
        For hard ``labels`` input: the unary puts probability ``label_confidence`` on the
        given label and spreads the rest uniformly over the other K-1 labels (as
        ``pydensecrf.utils.unary_from_labels(..., zero_unsure=False)``). Above 0.5 so that
        the given label always beats all others together; 0.7 is the value of pydensecrf's
        example and is tuned in docs/benchmarks/crf.md.
    min_probability : float in (0, 0.5), default 1e-5
        Probabilities are clipped to at least this before ``-log`` (as pydensecrf's
        ``unary_from_softmax``), so a zero probability costs a large, finite energy.
    max_labels : int >= 2 or None, default 64
        At most this many labels (channels) enter the CRF: time and memory are linear in
        it. Labels are first compacted to those present (hard labels that occur; score
        channels that are the argmax of at least one pixel). When more are present, the
        ``max_labels`` largest (by pixel count) are kept and the pixels of the smaller
        ones are *absorbed*: for hard labels they get a uniform unary ("unsure", like
        pydensecrf's ``zero_unsure``), so the CRF assigns them to a kept label from colour
        and proximity alone; for scores, their probabilities are renormalised over the kept
        channels (the conditional distribution given a kept label). None = no cap.
    max_pixels : int or None, default 1_000_000
        Pixel budget. The binding's peak memory is several times K x H x W x 4 bytes (its
        message buffers and permutohedral lattice; measured 2-8x on natural images, more on
        noise, see docs/benchmarks/crf.md), so bigger images are processed at a reduced
        resolution: the image and unary probabilities are area-averaged to fit the budget,
        the kernel widths ``*_sxy`` are scaled by the same factor (so they cover the same
        part of the image), and the resulting probabilities are bilinearly upsampled to the
        full resolution before the argmax. None = always full resolution.

    Notes
    -----
    Inputs are never modified; everything the binding needs (C-contiguous float32 unaries of
    shape (K, H*W), a writable C-contiguous uint8 RGB image) is prepared here. Inference is
    deterministic. Ties in the argmax go to the lowest label id.
    """

    def __init__(self, *, n_iter: int = 10, gaussian_sxy: float = 3.0,
                 gaussian_weight: float = 3.0, bilateral_sxy: float = 80.0,
                 bilateral_srgb: float = 13.0, bilateral_weight: float = 10.0,
                 score_confidence: float = 1.0, label_confidence: float = 0.7,
                 min_probability: float = 1e-5,
                 max_labels: int | None = 64, max_pixels: int | None = 1_000_000):
        self.n_iter = n_iter
        self.gaussian_sxy = gaussian_sxy
        self.gaussian_weight = gaussian_weight
        self.bilateral_sxy = bilateral_sxy
        self.bilateral_srgb = bilateral_srgb
        self.bilateral_weight = bilateral_weight
        self.score_confidence = score_confidence
        self.label_confidence = label_confidence
        self.min_probability = min_probability
        self.max_labels = max_labels
        self.max_pixels = max_pixels
        # Fail at construction (e.g. on a bad --crf-param), not on the first image.
        self._check_params()

    # -- parameters -------------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: Mapping[str, Any] | Iterable[str] | None = None) -> DenseCRF:
        """Build a DenseCRF from ``KEY=VALUE`` strings or a mapping of strings/values.

        Parameters
        ----------
        params : mapping or iterable of str or None
            E.g. ``["n_iter=5", "bilateral_srgb=8"]`` (``unsup segment --crf-param``) or
            ``{"n_iter": "5"}``. Unspecified parameters keep their defaults; ``none`` sets
            ``max_labels`` / ``max_pixels`` to None.

        Raises
        ------
        ValueError
            For an unknown key, a malformed item, a repeated key or a value of the wrong type
            or range; the message names the parameter.
        """
        return cls(**parse_crf_params(params))

    def _check_params(self) -> None:
        def real(name, low, high, *, low_open=True, high_open=True):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"DenseCRF: {name} must be a number, got {value!r}")
            value = float(value)
            too_low = value <= low if low_open else value < low
            too_high = value >= high if high_open else value > high
            if not math.isfinite(value) or too_low or too_high:
                lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
                raise ValueError(f"DenseCRF: {name} must be in {lo}{low}, {high}{hi}, got {value}")

        def integer(name, low, *, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                what = "an integer or None" if optional else "an integer"
                raise ValueError(f"DenseCRF: {name} must be {what}, got {value!r}")
            if value < low:
                raise ValueError(f"DenseCRF: {name} must be >= {low}, got {value}")

        integer("n_iter", 1)
        real("gaussian_sxy", 0, math.inf)
        real("gaussian_weight", 0, math.inf, low_open=False)
        real("bilateral_sxy", 0, math.inf)
        real("bilateral_srgb", 0, math.inf)
        real("bilateral_weight", 0, math.inf, low_open=False)
        real("score_confidence", 0, 1, high_open=False)
        real("label_confidence", 0.5, 1)
        real("min_probability", 0, 0.5)
        integer("max_labels", 2, optional=True)
        integer("max_pixels", 1, optional=True)

    # -- public API -------------------------------------------------------------------------
    def refine(self, image: np.ndarray, *, scores: np.ndarray | None = None,
               labels: np.ndarray | None = None,
               return_probabilities: bool = True) -> CRFResult:
        """Refine per-pixel probabilities or a hard label map with the dense CRF.

        Parameters
        ----------
        image : ndarray of uint8, shape (H, W, 3)
            The RGB image the labels belong to.
        scores : array-like, shape (C, H, W), optional
            Per-pixel class *probabilities*: non-negative, finite, each pixel summing to one
            (within 1e-3). Apply a softmax to unnormalised scores first. Channel ``c`` is
            label id ``c``.
        labels : array-like of non-negative int, shape (H, W), optional
            A hard label map with arbitrary ids; turned into unaries with
            ``label_confidence``. Give exactly one of ``scores`` and ``labels``.
        return_probabilities : bool
            Also return the (K, H, W) marginals (skipping them saves K x H x W x 4 bytes
            when only labels are needed on an upsampled large image).

        Returns
        -------
        CRFResult
        """
        self._check_params()
        image = check_image(image)
        if (scores is None) == (labels is None):
            raise ValueError("DenseCRF.refine: give exactly one of scores= and labels=")
        height, width = image.shape[:2]
        n_pixels = height * width
        scale, small_shape = self._processing_scale(height, width)

        if scores is not None:
            probs, label_ids, info = self._prepare_scores(scores, (height, width))
            if label_ids.size == 1:
                return self._single_label(label_ids, (height, width), info, return_probabilities)
            if scale < 1.0:
                probs = _resize_channels(probs, small_shape, cv2.INTER_AREA)
            if self.score_confidence < 1:
                confidence = float(self.score_confidence)
                probs = probs * np.float32(confidence) + np.float32((1 - confidence) / probs.shape[0])
            unary = self._unary_from_probabilities(probs)
            del probs
        else:
            index, label_ids, info = self._prepare_labels(labels, (height, width))
            if label_ids.size == 1:
                return self._single_label(label_ids, (height, width), info, return_probabilities)
            unary = self._unary_from_labels(index, label_ids.size, small_shape)
            del index

        if scale < 1.0:
            small_image = cv2.resize(image, small_shape[::-1], interpolation=cv2.INTER_AREA)
        else:
            small_image = image
        marginals = self._run_binding(small_image, unary, scale)
        del unary

        k = label_ids.size
        if scale < 1.0:
            index, probabilities = _upsample_argmax(
                marginals.reshape(k, *small_shape), (height, width), return_probabilities
            )
        else:
            index = _argmax_channels(marginals).reshape(height, width)
            probabilities = marginals.reshape(k, height, width) if return_probabilities else None
        refined = label_ids.astype(np.int32)[index]
        info.update(scale=float(scale), processed_shape=list(small_shape),
                    n_pixels=int(n_pixels))
        return CRFResult(labels=refined, probabilities=probabilities, label_ids=label_ids,
                         info=info)

    def refine_segmentation(self, image: np.ndarray, segmentation: Segmentation) -> Segmentation:
        """Refine a method's :class:`~unsup.base.Segmentation` (what ``--crf`` calls).

        Uses ``segmentation.scores`` when present, its labels otherwise. The result keeps
        the id space: its labels are a subset of the input's label ids (or score channels),
        and it carries scores of the same shape as the input's (channels the CRF did not run
        on get probability 0) when the input had scores, None otherwise. ``info`` is the
        input's plus a ``"crf"`` entry (parameters and :attr:`CRFResult.info`); the input's
        own ``hierarchy`` is kept.
        """
        if not isinstance(segmentation, Segmentation):
            raise TypeError(
                f"refine_segmentation expects a unsup.base.Segmentation, got "
                f"{type(segmentation).__name__}"
            )
        image = check_image(image)
        if image.shape[:2] != segmentation.labels.shape:
            raise ValueError(
                f"image has shape {image.shape[:2]} but the segmentation's labels have shape "
                f"{segmentation.labels.shape}"
            )
        out_scores = None
        if segmentation.scores is not None:
            result = self.refine(image, scores=segmentation.scores)
            out_scores = np.zeros(segmentation.scores.shape, np.float32)
            out_scores[result.label_ids] = result.probabilities
        else:
            result = self.refine(image, labels=segmentation.labels, return_probabilities=False)
        info = dict(segmentation.info)
        info["crf"] = {"params": params_to_json(self),
                       "input": "scores" if out_scores is not None else "labels",
                       **result.info}
        return Segmentation(result.labels, scores=out_scores, info=info,
                            hierarchy=segmentation.hierarchy)

    # -- internals --------------------------------------------------------------------------
    def _processing_scale(self, height: int, width: int) -> tuple[float, tuple[int, int]]:
        n_pixels = height * width
        if self.max_pixels is None or n_pixels <= self.max_pixels:
            return 1.0, (height, width)
        factor = math.sqrt(self.max_pixels / n_pixels)
        small_h = max(1, math.floor(height * factor))
        small_w = max(1, math.floor(width * factor))
        # The kernels are scaled by the geometric mean of the two axes' factors.
        return math.sqrt(small_h * small_w / n_pixels), (small_h, small_w)

    def _prepare_scores(self, scores, shape):
        try:
            scores = np.asarray(scores)
        except Exception as exc:  # ragged nested lists and the like
            raise ValueError(f"scores: cannot be read as an array ({exc})") from exc
        if scores.ndim != 3 or scores.shape[1:] != shape:
            raise ValueError(
                f"scores must have shape (C, H, W) with (H, W) = {shape} (the image's), "
                f"got {scores.shape}"
            )
        if scores.shape[0] < 1:
            raise ValueError("scores have no channels (C = 0)")
        if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)
                or scores.dtype == bool):
            raise ValueError(f"scores must be numeric probabilities, got dtype {scores.dtype}")
        scores = scores.astype(np.float32, copy=False)
        n_channels = scores.shape[0]
        # float32 sums are exact to ~1e-5 over hundreds of channels, far inside the 1e-3
        # tolerance, and twice as fast as float64 ones
        totals = scores.sum(axis=0)
        if not np.isfinite(totals).all():
            bad = np.argwhere(~np.isfinite(scores).all(axis=0))
            raise ValueError(
                f"scores contain NaN or infinite values (e.g. at pixel (y, x) = "
                f"{tuple(int(v) for v in bad[0])}, {len(bad)} pixels in all)"
            )
        lowest = float(scores.min())
        if lowest < 0:
            raise ValueError(
                f"scores must be probabilities (non-negative), found {lowest:g}; "
                "apply a softmax to unnormalised scores first"
            )
        deviation = np.abs(totals - 1.0)
        worst = float(deviation.max())
        if worst > _SUM_TOLERANCE:
            y, x = np.unravel_index(int(deviation.argmax()), shape)
            raise ValueError(
                f"scores must be probabilities summing to 1 over the {n_channels} channels at "
                f"every pixel; pixel (y, x) = ({y}, {x}) sums to {float(totals[y, x]):g}. "
                "Apply a softmax to unnormalised scores first"
            )

        counts = _argmax_counts(scores)
        present = np.flatnonzero(counts)
        kept = present
        if self.max_labels is not None and present.size > self.max_labels:
            mass = scores.reshape(n_channels, -1).sum(axis=1, dtype=np.float64)
            # Largest first; ties by total probability mass, then by lower channel id.
            order = np.lexsort((present, -mass[present], -counts[present]))
            kept = np.sort(present[order[: self.max_labels]])
        info = {"n_input_labels": int(n_channels), "n_present": int(present.size),
                "n_channels": int(kept.size), "n_absorbed": int(present.size - kept.size)}
        if kept.size == n_channels:
            return scores, kept.astype(np.int64), info
        probs = scores[kept]
        totals = probs.sum(axis=0)
        # Conditional distribution given a kept label; a pixel with no mass on any kept
        # label carries no evidence and becomes uniform.
        empty = totals <= 0
        probs /= np.where(empty, 1.0, totals)
        if empty.any():
            probs[:, empty] = 1.0 / kept.size
        return probs, kept.astype(np.int64), info

    def _prepare_labels(self, labels, shape):
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.shape != shape:
            raise ValueError(
                f"labels must have shape (H, W) = {shape} (the image's), got {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        flat = labels.ravel()
        lowest, highest = int(flat.min()), int(flat.max())
        if lowest < 0:
            raise ValueError(f"labels must be non-negative, found {lowest}")
        if highest > np.iinfo(np.int32).max:
            raise ValueError(f"labels must fit in int32, found {highest}")
        if highest < _DENSE_ID_LIMIT:
            counts_all = np.bincount(flat)
            present = np.flatnonzero(counts_all)
            counts = counts_all[present]
        else:
            present, counts = np.unique(flat, return_counts=True)
        kept = present
        if self.max_labels is not None and present.size > self.max_labels:
            order = np.lexsort((present, -counts))  # largest first, ties by lower id
            kept = np.sort(present[order[: self.max_labels]])
        # Channel index of every pixel; -1 marks absorbed (unsure) pixels.
        if highest < _DENSE_ID_LIMIT:
            lookup = np.full(highest + 1, -1, np.int32)
            lookup[kept] = np.arange(kept.size, dtype=np.int32)
            index = lookup[labels]
        else:
            position = np.searchsorted(kept, labels)
            position = np.minimum(position, kept.size - 1)
            index = np.where(kept[position] == labels, position, -1).astype(np.int32)
        info = {"n_input_labels": int(present.size), "n_present": int(present.size),
                "n_channels": int(kept.size), "n_absorbed": int(present.size - kept.size)}
        return index, kept.astype(np.int64), info

    def _unary_from_probabilities(self, probs: np.ndarray) -> np.ndarray:
        k = probs.shape[0]
        # A fresh C-contiguous (K, N) array whatever the input's layout (the binding and
        # cv2 need it; methods often return transposed views).
        unary = np.empty((k, probs[0].size), np.float32)
        np.maximum(probs.reshape(k, -1), np.float32(self.min_probability), out=unary)
        # OpenCV's vectorised log is ~8x faster than np.log on float32 (within 1e-6).
        cv2.log(unary, dst=unary)
        np.negative(unary, out=unary)
        return unary

    def _unary_from_labels(self, index: np.ndarray, k: int, small_shape) -> np.ndarray:
        confidence = float(self.label_confidence)
        other = (1.0 - confidence) / (k - 1)
        floor = float(self.min_probability)
        given_energy = -math.log(max(confidence, floor))
        other_energy = -math.log(max(other, floor))
        unsure_energy = math.log(k)
        if small_shape == index.shape:
            flat = index.ravel()
            unary = np.full((k, flat.size), other_energy, np.float32)
            sure = flat >= 0
            unary[flat[sure], np.flatnonzero(sure)] = given_energy
            if not sure.all():
                unary[:, ~sure] = unsure_energy
            return unary
        # Downscaled: area-average each label's indicator, then mix the per-pixel unary
        # probabilities with those fractions, p_c = f_c*conf + (f_sure - f_c)*other + f_unsure/k.
        # One channel at a time, so memory stays O(K*h*w + H*W).
        def area_fraction(c):
            mask = (index == c).astype(np.float32)
            return cv2.resize(mask, small_shape[::-1], interpolation=cv2.INTER_AREA)

        unsure = area_fraction(-1)
        base = (1.0 - unsure) * other + unsure / k
        probs = np.empty((k, *small_shape), np.float32)
        for c in range(k):
            probs[c] = area_fraction(c) * (confidence - other) + base
        return self._unary_from_probabilities(probs)

    def _run_binding(self, image: np.ndarray, unary: np.ndarray, scale: float) -> np.ndarray:
        import pydensecrf.densecrf as dcrf

        height, width = image.shape[:2]
        k = unary.shape[0]
        # The Cython binding needs C-contiguous float32 unaries and a writable C-contiguous
        # uint8 image (its memoryviews reject read-only buffers, e.g. from read_image).
        unary = np.ascontiguousarray(unary, dtype=np.float32)
        if not (image.flags.c_contiguous and image.flags.writeable):
            image = np.array(image, dtype=np.uint8, order="C", copy=True)
        crf = dcrf.DenseCRF2D(width, height, k)
        crf.setUnaryEnergy(unary)
        if self.gaussian_weight > 0:
            crf.addPairwiseGaussian(sxy=float(self.gaussian_sxy) * scale,
                                    compat=float(self.gaussian_weight))
        if self.bilateral_weight > 0:
            crf.addPairwiseBilateral(sxy=float(self.bilateral_sxy) * scale,
                                     srgb=float(self.bilateral_srgb), rgbim=image,
                                     compat=float(self.bilateral_weight))
        # A (K, H*W) float32 view of the binding's Eigen matrix (which the view keeps alive).
        return np.asarray(crf.inference(int(self.n_iter)))

    @staticmethod
    def _single_label(label_ids, shape, info, return_probabilities) -> CRFResult:
        # One label: every configuration has the same pairwise energy; nothing to infer.
        info.update(scale=1.0, processed_shape=list(shape), n_pixels=int(shape[0] * shape[1]))
        probabilities = np.ones((1, *shape), np.float32) if return_probabilities else None
        return CRFResult(labels=np.full(shape, label_ids[0], np.int32),
                         probabilities=probabilities, label_ids=label_ids, info=info)


def parse_crf_params(params: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings (or a mapping) into typed :class:`DenseCRF` parameters.

    Only the keys given are returned (range checks happen in :class:`DenseCRF`).

    Raises
    ------
    ValueError
        Unknown key (the message lists the known ones), item without ``=``, repeated key,
        or a value that is not of the parameter's type.
    """
    if params is None:
        return {}
    if isinstance(params, str):
        params = [params]
    items: list[tuple[str, Any]] = []
    if isinstance(params, Mapping):
        items = [(str(key), value) for key, value in params.items()]
    else:
        for item in params:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"CRF parameter {item!r}: expected KEY=VALUE")
            key, value = item.split("=", 1)
            items.append((key.strip(), value.strip()))
    known = _INT_PARAMS + _OPTIONAL_INT_PARAMS + _FLOAT_PARAMS
    parsed: dict[str, Any] = {}
    for key, value in items:
        if key not in known:
            raise ValueError(
                f"unknown CRF parameter {key!r}; known parameters: {', '.join(sorted(known))}"
            )
        if key in parsed:
            raise ValueError(f"CRF parameter {key!r} given more than once")
        parsed[key] = _convert(key, value)
    return parsed


def _convert(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value  # already typed (Python callers); DenseCRF checks it
    text = value.strip()
    if key in _OPTIONAL_INT_PARAMS and text.lower() == "none":
        return None
    if key in _INT_PARAMS or key in _OPTIONAL_INT_PARAMS:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            none = " or 'none'" if key in _OPTIONAL_INT_PARAMS else ""
            raise ValueError(
                f"CRF parameter {key}: expected an integer{none}, got {value!r}"
            ) from None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"CRF parameter {key}: expected a number, got {value!r}") from None


def _resize_channels(stack: np.ndarray, shape, interpolation) -> np.ndarray:
    """Resize every channel of a (K, H, W) float32 stack to ``shape`` = (h, w)."""
    out = np.empty((stack.shape[0], *shape), np.float32)
    for c in range(stack.shape[0]):
        out[c] = cv2.resize(np.ascontiguousarray(stack[c], dtype=np.float32), shape[::-1],
                            interpolation=interpolation)
    return out


def _argmax_channels(stack: np.ndarray) -> np.ndarray:
    """``stack.argmax(axis=0)`` for a (K, ...) array, ties to the lowest channel.

    For a C-ordered stack, np.argmax along the leading axis walks memory with a stride of
    K*H*W and is about twice as slow as this channel-by-channel running maximum, which only
    makes contiguous passes. The binding's marginals are the opposite (an Eigen matrix,
    Fortran order: the K values of a pixel are adjacent); there np.argmax is ~6x faster.
    """
    if not stack.flags.c_contiguous:
        return stack.argmax(axis=0)
    best = stack[0].copy()
    index = np.zeros(stack.shape[1:], np.intp)
    better = np.empty(stack.shape[1:], bool)
    for c in range(1, stack.shape[0]):
        np.greater(stack[c], best, out=better)
        np.copyto(index, c, where=better)
        np.maximum(best, stack[c], out=best)
    return index


def _argmax_counts(stack: np.ndarray) -> np.ndarray:
    """Number of pixels at which each channel of a (K, H, W) stack is the argmax.

    Equal to ``np.bincount(argmax(stack, axis=0), minlength=K)`` (ties to the lower
    channel), about 2.5x faster for K = 100: one max-reduction and one comparison per
    channel. Without ties, each pixel equals the maximum in exactly one channel, so the
    per-channel equality counts are the argmax counts; with ties (their sum exceeds the
    pixel count) we fall back to the explicit argmax.
    """
    best = stack.max(axis=0)
    equal = np.empty(best.shape, bool)
    counts = np.empty(stack.shape[0], np.int64)
    for c in range(stack.shape[0]):
        np.equal(stack[c], best, out=equal)
        counts[c] = np.count_nonzero(equal)
    if counts.sum() != best.size:
        counts = np.bincount(_argmax_channels(stack).ravel(), minlength=stack.shape[0])
    return counts


def _upsample_argmax(marginals: np.ndarray, shape, keep: bool):
    """Bilinearly upsample (K, h, w) marginals to ``shape``; return argmax and the stack.

    Channel by channel with a running maximum, so without ``keep`` memory stays O(H*W).
    """
    best = np.full(shape, -1.0, np.float32)
    index = np.zeros(shape, np.intp)
    stack = np.empty((marginals.shape[0], *shape), np.float32) if keep else None
    for c in range(marginals.shape[0]):
        channel = cv2.resize(np.ascontiguousarray(marginals[c]), shape[::-1],
                             interpolation=cv2.INTER_LINEAR)
        better = channel > best
        index[better] = c
        np.maximum(best, channel, out=best)
        if keep:
            stack[c] = channel
    return index, stack

