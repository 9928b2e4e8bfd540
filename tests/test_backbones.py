"""Backbones, dense features and the feature cache (small images: each forward is milliseconds)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from unsup.backbones import BackboneError, build_encoder, get_encoder  # noqa: E402
from unsup.features import (  # noqa: E402
    DenseFeatureExtractor,
    FeatureCache,
    resized_shape,
    upsample_maps,
)
from unsup.synthetic import make_shapes_image  # noqa: E402


@pytest.fixture(scope="module")
def extractor():
    return DenseFeatureExtractor("efficientnet-lite0", device="cpu")


def test_encoder_maps_have_documented_strides_and_channels():
    enc = build_encoder("efficientnet-lite0")
    assert enc.strides == (4, 8, 16, 32)
    assert enc.channels == (24, 40, 112, 320)
    x = torch.rand(2, 3, 64, 96) * 255
    with torch.inference_mode():
        maps = enc(enc.normalize(x))
    assert [tuple(m.shape) for m in maps] == [
        (2, c, 64 // s, 96 // s) for c, s in zip(enc.channels, enc.strides, strict=True)
    ]


def test_encoder_stride_subset_and_lite2():
    enc = build_encoder("efficientnet-lite2", strides=(8, 16))
    assert enc.strides == (8, 16) and enc.channels == (48, 120)
    with torch.inference_mode():
        maps = enc(enc.normalize(torch.zeros(1, 3, 32, 64)))
    assert [tuple(m.shape) for m in maps] == [(1, 48, 4, 8), (1, 120, 2, 4)]


def test_fused_shared_encoder_matches_trainable_one():
    plain = build_encoder("efficientnet-lite0")
    fused = get_encoder("efficientnet-lite0", device="cpu")
    assert fused is get_encoder("efficientnet-lite0", device="cpu")  # shared
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    with torch.inference_mode():
        for a, b in zip(plain(plain.normalize(x)), fused(fused.normalize(x)), strict=True):
            assert torch.allclose(a, b, atol=1e-4 * float(a.abs().max()))


def test_packaged_weights_are_loaded():
    # the stem conv of the ImageNet weights is far from a random init's
    trained = build_encoder("efficientnet-lite0").stem[0].weight
    random = build_encoder("efficientnet-lite0", weights_path="none").stem[0].weight
    assert not torch.allclose(trained, random)
    assert trained.abs().max() > 0.5


def test_backbone_errors_are_clear(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_encoder("resnet9000")
    with pytest.raises(BackboneError, match="weights_path"):
        build_encoder("torchvision:resnet50")
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(BackboneError, match="not installed"):
            build_encoder("torchvision:resnet50", weights_path=weights)
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(BackboneError, match="not installed"):
            build_encoder("timm:resnet50", weights_path=weights)
    with pytest.raises(BackboneError, match="strides"):
        build_encoder("efficientnet-lite0", strides=(3,))
    with pytest.raises(BackboneError, match="not found"):
        build_encoder("efficientnet-lite0", weights_path=tmp_path / "missing.pt")


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (33, 100)])
def test_dense_features_shape_and_norm_for_odd_sizes(extractor, shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    before = image.copy()
    f = extractor(image)
    h, w = shape
    assert f.features.shape == (-(-h // 4), -(-w // 4), 496)
    assert f.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f.features, axis=-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(image, before)  # input not mutated
    assert f.image_shape == shape and f.resized == shape
    assert f.pixel_to_cell().shape == shape
    assert f.pixel_to_cell().max() == f.features.shape[0] * f.features.shape[1] - 1


def test_max_side_resize_and_output_stride():
    ex = DenseFeatureExtractor(strides=(8, 16), output_stride=8, max_side=150, device="cpu")
    image = np.zeros((100, 300, 3), np.uint8)
    assert resized_shape((100, 300), 150) == (50, 150)
    f = ex(image)
    assert f.features.shape == (7, 19, 40 + 112)
    assert f.resized == (50, 150)
    assert f.to_pixels(np.zeros((2, 7, 19), np.float32)).shape == (2, 100, 300)


def test_upscaling_gives_a_finer_grid():
    ex = DenseFeatureExtractor(strides=(16, 32), output_stride=8, scale=2.0, max_side=100,
                               device="cpu")
    assert resized_shape((20, 30), None, 2.0) == (40, 60)
    assert resized_shape((40, 60), 100, 2.0) == (67, 100)  # max_side caps the upscaled size
    f = ex(np.zeros((20, 30, 3), np.uint8))
    assert f.features.shape == (5, 8, 112 + 320) and f.resized == (40, 60)
    assert f.to_pixels(np.zeros((1, 5, 8), np.float32)).shape == (1, 20, 30)


def test_batched_extraction_matches_single_and_keeps_order(extractor):
    a, _ = make_shapes_image((48, 64), seed=1)
    b, _ = make_shapes_image((48, 64), seed=2)
    c, _ = make_shapes_image((40, 40), seed=3)
    batch = extractor.extract([a, c, b])
    for image, got in zip([a, c, b], batch, strict=True):
        single = extractor(image)
        assert got.features.shape == single.features.shape
        np.testing.assert_allclose(got.features, single.features, atol=2e-4)


def test_features_separate_regions(extractor):
    # a left/right two-colour image: cells well inside the same half are more similar to
    # each other than to cells of the other half
    image = np.zeros((64, 128, 3), np.uint8)
    image[:, :64] = (200, 40, 40)
    image[:, 64:] = (40, 160, 220)
    f = extractor(image).features
    left, left2, right = f[8, 3], f[4, 6], f[8, 28]
    assert left @ left2 > left @ right + 0.1


def test_upsample_maps_is_aligned():
    # a per-cell map equal to the cell's column index: bilinear upsampling with pixel-centre
    # alignment gives (x + 0.5) / stride - 0.5 at interior pixels
    stride, gw = 4, 8
    maps = np.tile(np.arange(gw, dtype=np.float32), (1, 3, 1))
    up = upsample_maps(maps, stride=stride, resized=(12, 32), image_shape=(12, 32))
    x = np.arange(4, 28)
    np.testing.assert_allclose(up[0, 5, x], (x + 0.5) / stride - 0.5, atol=1e-5)
    # identity when nothing is resampled
    same = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(
        upsample_maps(same, stride=1, resized=(5, 7), image_shape=(5, 7)), same)


def test_feature_cache_roundtrip(tmp_path, extractor):
    image, _ = make_shapes_image((40, 56), seed=4)
    cache = FeatureCache(tmp_path, extractor)
    assert image not in cache
    first = cache.get(image)
    assert image in cache
    files = list(cache.path.glob("*.npy"))
    assert len(files) == 1 and (cache.path / "settings.json").is_file()
    assert isinstance(first.features, np.memmap) and first.features.dtype == np.float16
    second = cache.get(image)
    np.testing.assert_array_equal(np.asarray(first.features), np.asarray(second.features))
    fresh = extractor(image).features
    np.testing.assert_allclose(np.asarray(second.features, np.float32), fresh, atol=2e-3)
    # other settings -> another folder; a changed image -> another key
    other = FeatureCache(tmp_path, DenseFeatureExtractor(strides=(8,), device="cpu"))
    assert other.path != cache.path
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    assert changed not in cache


def test_feature_cache_rejects_corrupt_entries(tmp_path, extractor):
    image, _ = make_shapes_image((40, 56), seed=5)
    cache = FeatureCache(tmp_path, extractor)
    cache.get(image)
    np.save(cache.file_for(image), np.zeros((3, 3, 496), np.float16))
    with pytest.raises(OSError, match="delete"):
        cache.get(image)
