"""faiss clustering helpers and the `kmeans` method (per image and dataset-level)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from unsup.base import NotFittedError  # noqa: E402
from unsup.clustering import (  # noqa: E402
    ClusteringError,
    Reservoir,
    assign,
    choose_n_clusters,
    fit_kmeans,
    softmax_scores,
    squared_distances,
)
from unsup.registry import create_method, get_method, load_method  # noqa: E402
from unsup.synthetic import make_shapes_image  # noqa: E402


def _blobs(n_per=200, centers=((0, 0), (10, 0), (0, 10)), seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, 0.5, size=(n_per, 2)) for c in centers])
    y = np.repeat(np.arange(len(centers)), n_per)
    return x.astype(np.float32), y


# -- clustering helpers -------------------------------------------------------------------------


def test_fit_kmeans_recovers_blobs_and_is_deterministic():
    x, y = _blobs()
    before = x.copy()
    c1 = fit_kmeans(x, 3, seed=3)
    c2 = fit_kmeans(x, 3, seed=3)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(x, before)
    labels = assign(x, c1)
    assert adjusted_rand_score(y, labels) == 1.0
    np.testing.assert_array_equal(labels, squared_distances(x, c1).argmin(axis=1))
    found = sorted(map(tuple, np.round(c1).astype(int)))
    assert found == [(0, 0), (0, 10), (10, 0)]


def test_fit_kmeans_errors():
    x, _ = _blobs(n_per=2)
    with pytest.raises(ClusteringError, match="cannot make 10 clusters from 6 points"):
        fit_kmeans(x, 10)
    with pytest.raises(ClusteringError, match=">= 1"):
        fit_kmeans(x, 0)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ClusteringError, match="NaN"):
        fit_kmeans(bad, 2)
    with pytest.raises(ClusteringError, match="2-D"):
        fit_kmeans(x.ravel(), 2)


def test_squared_distances_and_softmax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 7)).astype(np.float32)
    c = rng.normal(size=(4, 7)).astype(np.float32)
    exact = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    np.testing.assert_allclose(squared_distances(x, c), exact, rtol=1e-4, atol=1e-4)
    p = softmax_scores(exact, 0.5)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(p.argmax(axis=1), exact.argmin(axis=1))
    # larger temperature -> flatter
    assert softmax_scores(exact, 50.0).max() < p.max()


def test_reservoir_is_uniform_and_bounded():
    kept_means = []
    for seed in range(20):
        r = Reservoir(100, seed=seed, dtype=np.float64)
        for start in range(0, 10_000, 250):  # stream of row indices, in chunks
            r.add(np.arange(start, start + 250, dtype=np.float64)[:, None])
        assert len(r) == 100 and r.seen == 10_000
        kept = r.array(np.float64)[:, 0]
        assert np.unique(kept).size == 100
        kept_means.append(kept.mean())
    # uniform over 0..9999: mean 5000; the average of 20 sample means has sd ~ 2887/sqrt(2000)
    assert abs(np.mean(kept_means) - 4999.5) < 300


def test_choose_n_clusters_silhouette():
    x, _ = _blobs(n_per=100, centers=((0, 0), (10, 0), (0, 10), (10, 10)))
    best, scores = choose_n_clusters(x, range(2, 7))
    assert best == 4 and set(scores) == {2, 3, 4, 5, 6}


# -- the method -------------------------------------------------------------------------------


def _flat_regions_image():
    """Three flat colour regions with mild noise, (H, W, 3) uint8, and its labels."""
    labels = np.zeros((48, 60), np.int32)
    labels[:, 20:40] = 1
    labels[:, 40:] = 2
    colors = np.array([[200, 40, 40], [40, 160, 60], [30, 60, 200]], np.float64)
    noise = np.random.default_rng(0).normal(0, 4, size=(48, 60, 3))
    return np.clip(colors[labels] + noise, 0, 255).astype(np.uint8), labels


def test_registered_and_fit_requirement_depends_on_scope():
    assert get_method("kmeans").name == "kmeans"
    per_image = create_method("kmeans", scope="image")
    dataset = create_method("kmeans", scope="dataset")
    assert not per_image.requires_fit and per_image.is_fitted()
    assert dataset.requires_fit and not dataset.is_fitted()
    image, _ = _flat_regions_image()
    with pytest.raises(NotFittedError):
        dataset.predict(image)
    with pytest.raises(ValueError, match="no parameter"):
        create_method("kmeans", clusters=3)


@pytest.mark.parametrize("features", ["color", "backbone"])
def test_per_image_segments_flat_regions(features):
    image, truth = _flat_regions_image()
    method = create_method("kmeans", n_clusters=3, features=features,
                           color_weight=2.0 if features == "backbone" else 0.0)
    seg = method.predict(image)
    assert seg.labels.shape == truth.shape and seg.labels.dtype == np.int32
    assert seg.scores.shape == (3, *truth.shape)
    np.testing.assert_allclose(seg.scores.sum(axis=0), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(seg.scores.argmax(axis=0), seg.labels)
    assert adjusted_rand_score(truth.ravel(), seg.labels.ravel()) > 0.9
    again = method.predict(image)
    np.testing.assert_array_equal(again.labels, seg.labels)  # deterministic


def test_per_image_auto_k():
    image, truth = _flat_regions_image()
    method = create_method("kmeans", n_clusters="auto", features="color", max_clusters=6)
    seg = method.predict(image)
    assert seg.info["n_clusters"] == 3
    assert "silhouette" in seg.info
    assert adjusted_rand_score(truth.ravel(), seg.labels.ravel()) > 0.9


def test_per_image_too_many_clusters_is_a_clear_error():
    image = np.zeros((9, 11, 3), np.uint8)  # a 3x3 grid of stride-4 cells
    image[:, 5:] = 255
    with pytest.raises(ClusteringError, match="exceeds the number of feature vectors"):
        create_method("kmeans", n_clusters=20).predict(image)


def _consistent_dataset(n, shape, seed0=0):
    return [make_shapes_image(shape, n_shapes=3, noise=6.0, consistent_colors=True,
                              seed=seed0 + s) for s in range(n)]


@pytest.mark.parametrize("features,shape,kwargs", [
    ("color", (48, 64), {}),
    # the synthetic regions differ by colour only: the shallow taps (the per-image default)
    # carry it; the dataset default (16, 32) is for semantic classes on real images
    ("backbone", (96, 128), {"color_weight": 2.0, "strides": (4, 8, 16, 32)}),
])
def test_dataset_level_labels_are_consistent_across_images(features, shape, kwargs):
    data = _consistent_dataset(4, shape)
    method = create_method("kmeans", scope="dataset", n_clusters=4, features=features,
                           samples_per_image=400, **kwargs)
    method.fit([image for image, _ in data])
    assert method.centroids_.shape[0] == 4 and method.fit_info_["n_images"] == 4
    mapping = {}
    for image, truth in data:
        seg = method.predict(image)
        assert adjusted_rand_score(truth.ravel(), seg.labels.ravel()) > 0.85
        for region in np.unique(truth):
            cluster = int(np.bincount(seg.labels[truth == region]).argmax())
            # the same colour (= same ground-truth label) always lands in the same cluster
            assert mapping.setdefault(int(region), cluster) == cluster
    assert len(set(mapping.values())) == len(mapping)  # and different colours do not merge


def test_save_load_roundtrip_gives_identical_labels(tmp_path):
    data = _consistent_dataset(3, (40, 48))
    method = create_method("kmeans", scope="dataset", n_clusters=4,
                           samples_per_image=300, color_weight=1.0, seed=7)
    method.fit(image for image, _ in data)
    method.save(tmp_path / "model")
    loaded = load_method(tmp_path / "model")
    # JSON stores tuples as lists; every parameter survives otherwise
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in method.get_params().items()} \
        == loaded.get_params()
    np.testing.assert_array_equal(loaded.centroids_, method.centroids_)
    for image, _ in data:
        a, b = method.predict(image), loaded.predict(image)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_dataset_level_errors():
    data = _consistent_dataset(2, (24, 24))
    method = create_method("kmeans", scope="dataset", n_clusters=30, samples_per_image=5,
                           features="color")
    with pytest.raises(ClusteringError, match="exceeds the number of feature vectors"):
        method.fit(image for image, _ in data)
    with pytest.raises(ValueError, match="empty"):
        create_method("kmeans", scope="dataset").fit([])
    with pytest.raises(ValueError, match="scope"):
        create_method("kmeans", scope="everything").fit([])


def test_feature_cache_gives_identical_results(tmp_path):
    data = _consistent_dataset(2, (48, 56))
    kwargs = dict(scope="dataset", n_clusters=4, samples_per_image=300, color_weight=2.0,
                  cache_dir=str(tmp_path / "cache"))
    first = create_method("kmeans", **kwargs).fit([image for image, _ in data])
    files = list((tmp_path / "cache").rglob("*.npy"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = create_method("kmeans", **kwargs).fit([image for image, _ in data])
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # read, not recomputed
    np.testing.assert_array_equal(first.centroids_, second.centroids_)
    np.testing.assert_array_equal(first.predict(data[0][0]).labels,
                                  second.predict(data[0][0]).labels)


def test_default_taps_depend_on_scope():
    # shallow maps place boundaries in one image; dataset-wide clusters use the deep ones
    assert create_method("kmeans", scope="image")._strides() == (4, 8, 16, 32)
    assert create_method("kmeans", scope="dataset")._strides() == (16, 32)
    assert create_method("kmeans", scope="dataset", strides=[8, 32])._strides() == (8, 32)


def test_default_score_temperature_depends_on_scope_and_features():
    assert create_method("kmeans", scope="dataset")._temperature() == 0.5
    assert create_method("kmeans", scope="dataset", features="color")._temperature() == 1.0
    assert create_method("kmeans")._temperature() == 1.0
    assert create_method("kmeans", scope="dataset", temperature=2.0)._temperature() == 2.0
    data = _consistent_dataset(2, (40, 48))
    images = [image for image, _ in data]
    default = create_method("kmeans", scope="dataset", features="color", n_clusters=4,
                            samples_per_image=300).fit(images)
    explicit = create_method("kmeans", scope="dataset", features="color", n_clusters=4,
                             samples_per_image=300, temperature=1.0).fit(images)
    # flat synthetic colours saturate the scores at small temperatures: compare large ones
    soft = create_method("kmeans", scope="dataset", features="color", n_clusters=4,
                         samples_per_image=300, temperature=400.0).fit(images)
    softer = create_method("kmeans", scope="dataset", features="color", n_clusters=4,
                           samples_per_image=300, temperature=800.0).fit(images)
    a, b, c, d = (m.predict(images[0]) for m in (default, explicit, soft, softer))
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(c.labels, d.labels)  # the temperature never moves labels
    assert c.scores.max(axis=0).mean() > d.scores.max(axis=0).mean()
