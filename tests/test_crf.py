"""Tests of the dense-CRF post-processor (unsup.crf) on synthetic images with exact truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from unsup.base import Segmentation
from unsup.crf import CRFResult, DenseCRF, parse_crf_params
from unsup.synthetic import make_shapes_image


def mean_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    ious = []
    for c in np.unique(truth):
        t, p = truth == c, pred == c
        ious.append((t & p).sum() / (t | p).sum())
    return float(np.mean(ious))


def one_hot(labels: np.ndarray, n: int) -> np.ndarray:
    return (np.arange(n)[:, None, None] == labels[None]).astype(np.float32)


def blob_flips(truth: np.ndarray, n_labels: int, *, n_blobs: int, radius: int, seed: int):
    """Ground truth with ``n_blobs`` discs relabelled to random wrong labels."""
    rng = np.random.default_rng(seed)
    noisy = truth.copy()
    yy, xx = np.mgrid[: truth.shape[0], : truth.shape[1]]
    for _ in range(n_blobs):
        cy, cx = rng.integers(0, truth.shape[0]), rng.integers(0, truth.shape[1])
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        noisy[disc] = (truth[cy, cx] + rng.integers(1, n_labels)) % n_labels
    return noisy


def boundary_band(truth: np.ndarray, width: int) -> np.ndarray:
    edges = np.zeros(truth.shape, bool)
    edges[:, 1:] |= truth[:, 1:] != truth[:, :-1]
    edges[1:, :] |= truth[1:, :] != truth[:-1, :]
    return ndimage.binary_dilation(edges, iterations=width)


@pytest.fixture(scope="module")
def scene():
    image, truth = make_shapes_image((96, 128), n_shapes=4, noise=8.0, seed=9)
    n = int(truth.max()) + 1
    assert np.bincount(truth.ravel()).min() > 700  # every region is sizeable
    return image, truth, n


# -- accuracy ------------------------------------------------------------------------------
def test_blob_label_noise_is_cleaned(scene):
    image, truth, n = scene
    noisy = blob_flips(truth, n, n_blobs=25, radius=4, seed=0)
    before = mean_iou(noisy, truth)
    result = DenseCRF().refine(image, labels=noisy)
    after = mean_iou(result.labels, truth)
    assert before < 0.85
    assert after > before + 0.1
    assert after > 0.99


def test_shifted_boundaries_snap_to_colour_edges(scene):
    image, truth, n = scene
    shifted = np.roll(truth, shift=(3, -4), axis=(0, 1))  # every boundary 3-5 px off
    band = boundary_band(truth, 5)
    before = (shifted == truth)[band].mean()
    result = DenseCRF().refine(image, labels=shifted)
    after = (result.labels == truth)[band].mean()
    assert before < 0.8
    assert after > max(0.95, before + 0.15)
    assert mean_iou(result.labels, truth) > mean_iou(shifted, truth) + 0.05


def test_blurred_probabilities_are_sharpened(scene):
    image, truth, n = scene
    # Blurred, shifted one-hot: soft, misplaced boundaries (what a coarse feature map gives).
    probs = ndimage.gaussian_filter(one_hot(np.roll(truth, 3, axis=1), n), sigma=(0, 4, 4))
    probs /= probs.sum(axis=0, keepdims=True)
    band = boundary_band(truth, 4)
    before = (probs.argmax(0) == truth)[band].mean()
    result = DenseCRF().refine(image, scores=probs)
    assert (result.labels == truth)[band].mean() > before + 0.1
    assert mean_iou(result.labels, truth) > 0.98
    assert result.probabilities.shape == (n, *truth.shape)
    assert result.probabilities.dtype == np.float32
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(result.label_ids, np.arange(n))


def test_score_confidence_tempers_over_confident_scores(scene):
    image, truth, n = scene
    noisy = blob_flips(truth, n, n_blobs=25, radius=4, seed=0)
    certain = one_hot(noisy, n)  # probability 1 on wrong labels inside the blobs
    as_given = DenseCRF().refine(image, scores=certain)
    tempered = DenseCRF(score_confidence=0.8).refine(image, scores=certain)
    assert mean_iou(as_given.labels, truth) < mean_iou(noisy, truth) + 0.05
    assert mean_iou(tempered.labels, truth) > 0.99
    mixed = 0.8 * certain + 0.2 / n
    np.testing.assert_allclose(DenseCRF().refine(image, scores=mixed).probabilities,
                               tempered.probabilities, atol=1e-5)


def test_wrapper_matches_the_binding_called_directly(scene):
    import pydensecrf.densecrf as dcrf

    image, truth, n = scene
    rng = np.random.default_rng(1)
    probs = one_hot(truth, n) + rng.uniform(0, 1.5, size=(n, *truth.shape)).astype(np.float32)
    probs /= probs.sum(axis=0, keepdims=True)
    crf = DenseCRF(n_iter=5, bilateral_srgb=10.0)
    ours = crf.refine(image, scores=probs)
    h, w = truth.shape
    direct = dcrf.DenseCRF2D(w, h, n)
    direct.setUnaryEnergy(np.ascontiguousarray(-np.log(np.maximum(probs, 1e-5)).reshape(n, -1)))
    direct.addPairwiseGaussian(sxy=3.0, compat=3.0)
    direct.addPairwiseBilateral(sxy=80.0, srgb=10.0, rgbim=image.copy(), compat=10.0)
    q = np.asarray(direct.inference(5)).reshape(n, h, w)
    # Equal up to the float32 rounding of log (the wrapper uses OpenCV's vectorised log).
    np.testing.assert_allclose(ours.probabilities, q, atol=1e-5)
    agree = ours.labels == q.argmax(0)
    margin = np.sort(q, axis=0)[-1] - np.sort(q, axis=0)[-2]
    assert agree[margin > 1e-4].all()


def test_label_unary_is_pydensecrf_unary_from_labels(scene):
    from pydensecrf.utils import unary_from_labels

    _, truth, n = scene
    crf = DenseCRF(label_confidence=0.8)
    unary = crf._unary_from_labels(truth.astype(np.int32), n, truth.shape)
    expected = unary_from_labels(truth, n, 0.8, zero_unsure=False)
    np.testing.assert_allclose(unary, expected, rtol=1e-6)


# -- label ids and many labels ------------------------------------------------------------
def test_refine_segmentation_keeps_label_ids(scene):
    image, truth, _ = scene
    ids = np.array([3, 17, 250, 250, 3], np.int32)  # truth labels 0..4 -> three ids
    noisy = blob_flips(truth, 5, n_blobs=10, radius=3, seed=2)
    seg = Segmentation(ids[noisy], info={"method": "test"})
    out = DenseCRF().refine_segmentation(image, seg)
    assert isinstance(out, Segmentation)
    assert set(np.unique(out.labels)) <= {3, 17, 250}
    assert len(np.unique(out.labels)) == 3
    assert out.scores is None
    assert out.info["method"] == "test"
    assert out.info["crf"]["input"] == "labels"
    assert out.info["crf"]["params"]["n_iter"] == 10
    assert mean_iou(out.labels, ids[truth]) > mean_iou(seg.labels, ids[truth])


def test_refine_segmentation_with_scores_keeps_channel_ids(scene):
    image, truth, n = scene
    # 8 channels, of which only 0, 2, 5, 6, 7 are ever the argmax.
    channel_of = np.array([0, 2, 5, 6, 7])
    probs = np.full((8, *truth.shape), 0.02, np.float32)
    probs[channel_of[truth], *np.indices(truth.shape)] = 0.86
    seg = Segmentation(channel_of[truth].astype(np.int32), scores=probs)
    out = DenseCRF().refine_segmentation(image, seg)
    assert out.scores.shape == probs.shape
    assert set(np.unique(out.labels)) <= set(channel_of)
    np.testing.assert_array_equal(out.scores[[1, 3, 4]], 0.0)
    np.testing.assert_allclose(out.scores.sum(axis=0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(out.labels, out.scores.argmax(axis=0))
    np.testing.assert_array_equal(out.labels, channel_of[truth])
    assert out.info["crf"]["n_channels"] == 5


def test_many_labels_are_capped_by_size():
    image, truth = make_shapes_image((64, 80), n_shapes=3, noise=6.0, seed=5)
    # 8x8 blocks inside each region: 80+ labels, plus 3 large ids for big areas.
    blocks = (np.arange(64)[:, None] // 8) * 10 + np.arange(80)[None, :] // 8
    labels = truth * 1000 + blocks
    labels[truth == 0] = 7  # the background is one big label
    labels[truth == 1] = 123_456_789  # a large id (np.unique path)
    sizes = {int(v): int(c) for v, c in zip(*np.unique(labels, return_counts=True), strict=True)}
    crf = DenseCRF(max_labels=6)
    result = crf.refine(image, labels=labels)
    largest = sorted(sizes, key=lambda v: (-sizes[v], v))[:6]
    np.testing.assert_array_equal(result.label_ids, np.sort(largest))
    assert set(np.unique(result.labels)) <= set(largest)
    assert result.probabilities.shape[0] == 6
    assert result.info["n_absorbed"] == len(sizes) - 6
    # Absorbed pixels inside the background/shape-1 regions go to their big label.
    assert (result.labels[truth == 0] == 7).mean() > 0.95
    assert (result.labels[truth == 1] == 123_456_789).mean() > 0.95


def test_many_score_channels_are_capped_and_renormalised(scene):
    image, truth, n = scene
    rng = np.random.default_rng(0)
    c = 40
    logits = rng.normal(0, 0.3, size=(c, *truth.shape)).astype(np.float32)
    logits[truth * 7, *np.indices(truth.shape)] += 3.0  # channels 0, 7, 14, 21, 28
    probs = np.exp(logits)
    probs /= probs.sum(axis=0, keepdims=True)
    result = DenseCRF(max_labels=5).refine(image, scores=probs)
    np.testing.assert_array_equal(result.label_ids, [0, 7, 14, 21, 28])
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-4)
    assert mean_iou(result.labels, truth * 7) > 0.95


def test_large_image_is_processed_within_the_pixel_budget(scene):
    image, truth, n = scene
    big_image = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
    big_truth = np.repeat(np.repeat(truth, 2, axis=0), 2, axis=1)
    noisy = blob_flips(big_truth, n, n_blobs=25, radius=8, seed=4)
    result = DenseCRF(max_pixels=big_truth.size // 4).refine(big_image, labels=noisy)
    assert result.labels.shape == big_truth.shape
    assert result.info["scale"] == pytest.approx(0.5, abs=0.01)
    assert result.probabilities.shape == (n, *big_truth.shape)
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(result.labels, result.probabilities.argmax(axis=0))
    assert mean_iou(result.labels, big_truth) > max(0.97, mean_iou(noisy, big_truth) + 0.1)
    only_labels = DenseCRF(max_pixels=big_truth.size // 4).refine(
        big_image, labels=noisy, return_probabilities=False)
    assert only_labels.probabilities is None
    np.testing.assert_array_equal(only_labels.labels, result.labels)


# -- degenerate inputs ---------------------------------------------------------------------
def test_single_label(scene):
    image, truth, _ = scene
    result = DenseCRF().refine(image, labels=np.full(truth.shape, 9))
    assert isinstance(result, CRFResult)
    assert (result.labels == 9).all() and result.labels.dtype == np.int32
    np.testing.assert_array_equal(result.probabilities, 1.0)
    np.testing.assert_array_equal(result.label_ids, [9])


def test_uniform_probabilities(scene):
    image, truth, _ = scene
    result = DenseCRF().refine(image, scores=np.full((4, *truth.shape), 0.25))
    # Ties go to the lowest channel; there is no evidence to do anything else.
    assert (result.labels == 0).all()


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (13, 1)])
def test_tiny_images(shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=shape) * 5
    result = DenseCRF().refine(image, labels=labels)
    assert result.labels.shape == shape
    assert set(np.unique(result.labels)) <= set(np.unique(labels))
    probs = np.stack([labels == v for v in (0, 5, 10)]).astype(np.float32) * 0.8 + 0.2 / 3 * 1
    probs /= probs.sum(axis=0)
    out = DenseCRF().refine(image, scores=probs)
    assert out.labels.shape == shape
    np.testing.assert_allclose(out.probabilities.sum(axis=0), 1.0, atol=1e-4)


def test_inputs_are_not_modified_and_read_only_inputs_work(scene):
    image, truth, n = scene
    probs = ndimage.gaussian_filter(one_hot(truth, n), sigma=(0, 2, 2))
    probs /= probs.sum(axis=0, keepdims=True)
    probs = np.concatenate([probs, np.zeros((2, *truth.shape), np.float32)])  # unused channels
    frozen = [image.copy(), probs.copy(), truth.copy()]
    for array in frozen:
        array.flags.writeable = False
    crf = DenseCRF()
    crf.refine(frozen[0], scores=frozen[1])
    crf.refine(frozen[0], labels=frozen[2])
    np.testing.assert_array_equal(frozen[0], image)
    np.testing.assert_array_equal(frozen[1][:n], probs[:n])
    np.testing.assert_array_equal(frozen[2], truth)


def test_non_contiguous_inputs(scene):
    image, truth, n = scene
    probs = ndimage.gaussian_filter(one_hot(truth, n), sigma=(0, 2, 2))
    probs /= probs.sum(axis=0, keepdims=True)
    expected = DenseCRF().refine(image, scores=probs)
    # Pixel-major storage seen through a transposed view (what kmeans-color returns), a
    # Fortran-ordered image, and float64 probabilities.
    pixel_major = np.ascontiguousarray(probs.reshape(n, -1).T).T.reshape(probs.shape)
    assert not pixel_major.flags.c_contiguous
    result = DenseCRF().refine(np.asfortranarray(image), scores=pixel_major.astype(np.float64))
    np.testing.assert_array_equal(result.labels, expected.labels)
    np.testing.assert_allclose(result.probabilities, expected.probabilities, atol=1e-6)
    strided_labels = np.repeat(truth, 2, axis=1)[:, ::2]
    assert not strided_labels.flags.c_contiguous
    np.testing.assert_array_equal(DenseCRF().refine(image, labels=strided_labels).labels,
                                  DenseCRF().refine(image, labels=truth).labels)


def test_deterministic(scene):
    image, truth, n = scene
    noisy = blob_flips(truth, n, n_blobs=20, radius=4, seed=7)
    a = DenseCRF().refine(image, labels=noisy)
    b = DenseCRF().refine(image.copy(), labels=noisy.copy())
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)


# -- bad inputs ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda im, t: {"scores": np.full((2, 5, 5), 0.5)}, r"shape \(C, H, W\)"),
        (lambda im, t: {"scores": np.full(t.shape, 0.5)}, r"shape \(C, H, W\)"),
        (lambda im, t: {"scores": np.stack([t * 0.0 - 0.1, t * 0.0 + 1.1])}, "non-negative"),
        (lambda im, t: {"scores": np.full((2, *t.shape), 0.7)}, "summing to 1"),
        (lambda im, t: {"scores": np.where(t == 1, np.nan, 0.5)[None].repeat(2, 0)}, "NaN"),
        (lambda im, t: {"scores": np.full((2, *t.shape), "a")}, "numeric"),
        (lambda im, t: {"labels": t[:-1]}, r"shape \(H, W\)"),
        (lambda im, t: {"labels": t.astype(float)}, "integers"),
        (lambda im, t: {"labels": t - 1}, "non-negative"),
        (lambda im, t: {}, "exactly one"),
        (lambda im, t: {"labels": t, "scores": one_hot(t, 5)}, "exactly one"),
    ],
)
def test_bad_inputs_give_clear_errors(scene, make, message):
    image, truth, _ = scene
    with pytest.raises(ValueError, match=message):
        DenseCRF().refine(image, **make(image, truth))


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((8, 8, 4), np.uint8), r"RGB of shape \(H, W, 3\)"),
        (np.zeros((8, 8), np.uint8), r"RGB of shape \(H, W, 3\)"),
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        (np.zeros((0, 8, 3), np.uint8), "no pixels"),
    ],
)
def test_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        DenseCRF().refine(image, labels=np.zeros(image.shape[:2], np.int32))


def test_refine_segmentation_checks_its_inputs(scene):
    image, truth, _ = scene
    with pytest.raises(TypeError, match="Segmentation"):
        DenseCRF().refine_segmentation(image, truth)
    with pytest.raises(ValueError, match="image has shape"):
        DenseCRF().refine_segmentation(image[:, :-1], Segmentation(truth))


# -- parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, message",
    [
        ({"n_iter": 0}, "n_iter must be >= 1"),
        ({"n_iter": 2.5}, "n_iter must be an integer"),
        ({"gaussian_sxy": 0}, "gaussian_sxy"),
        ({"bilateral_srgb": -1.0}, "bilateral_srgb"),
        ({"bilateral_weight": float("nan")}, "bilateral_weight"),
        ({"label_confidence": 0.5}, "label_confidence"),
        ({"label_confidence": 1.0}, "label_confidence"),
        ({"score_confidence": 0.0}, "score_confidence"),
        ({"max_labels": 1}, "max_labels must be >= 2"),
        ({"max_pixels": "many"}, "max_pixels must be an integer or None"),
    ],
)
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        DenseCRF(**params)


def test_from_params_parses_key_value_strings():
    crf = DenseCRF.from_params(["n_iter=5", "bilateral_srgb = 8.5", "max_pixels=none",
                                "max_labels=1_000"])
    assert crf.n_iter == 5 and isinstance(crf.n_iter, int)
    assert crf.bilateral_srgb == 8.5
    assert crf.max_pixels is None and crf.max_labels == 1000
    assert crf.gaussian_weight == 3.0  # default kept
    assert DenseCRF.from_params({"label_confidence": "0.9"}).label_confidence == 0.9
    assert DenseCRF.from_params(None).get_params() == DenseCRF().get_params()
    assert parse_crf_params(["gaussian_weight=0"]) == {"gaussian_weight": 0.0}


@pytest.mark.parametrize(
    "items, message",
    [
        (["iterations=5"], "unknown CRF parameter 'iterations'; known parameters: "),
        (["n_iter"], "expected KEY=VALUE"),
        (["n_iter=five"], "n_iter: expected an integer"),
        (["n_iter=2.5"], "n_iter: expected an integer"),
        (["bilateral_sxy=wide"], "bilateral_sxy: expected a number"),
        (["n_iter=3", "n_iter=4"], "more than once"),
        (["n_iter=0"], "n_iter must be >= 1"),
    ],
)
def test_from_params_errors(items, message):
    with pytest.raises(ValueError, match=message):
        DenseCRF.from_params(items)


def test_disabled_kernels_give_the_unary_argmax(scene):
    image, truth, n = scene
    noisy = blob_flips(truth, n, n_blobs=10, radius=3, seed=1)
    result = DenseCRF(gaussian_weight=0, bilateral_weight=0).refine(image, labels=noisy)
    np.testing.assert_array_equal(result.labels, noisy)
