import numpy as np
import pytest
import torch

from unsup.base import NotFittedError, Segmentation, SegmentationMethod, check_image
from unsup.registry import create_method, get_method, load_method, method_parameters, register


class _Centroids(SegmentationMethod):
    """A tiny learning method used to test the base-class machinery."""

    name = "_test-centroids"
    summary = "test only"
    supervision = "unlabeled"

    def __init__(self, *, n_clusters: int = 2, scale: float = 1.0):
        self.n_clusters = n_clusters
        self.scale = scale

    def fit(self, samples, *, progress=False):
        means = [s.image.reshape(-1, 3).mean(0) for s in samples]
        self.centers_ = np.stack(means)[: self.n_clusters].astype(np.float32)
        self.layer_ = torch.nn.Linear(3, 2)
        return self

    def predict(self, image):
        self._check_fitted()
        d = ((image.reshape(-1, 1, 3).astype(np.float32) - self.centers_[None]) ** 2).sum(-1)
        return Segmentation(d.argmin(1).reshape(image.shape[:2]))

    def _state_arrays(self):
        return {"centers_": self.centers_}

    def _state_dict(self):
        return self.layer_.state_dict()

    def _load_state_dict(self, state):
        self.layer_ = torch.nn.Linear(3, 2)
        self.layer_.load_state_dict(state)


register(_Centroids)


class _Sample:
    def __init__(self, image):
        self.image = image


def test_save_load_round_trip_gives_identical_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 9, 3), dtype=np.uint8) for _ in range(3)]
    m = create_method("_test-centroids", n_clusters=2, scale=0.5).fit([_Sample(i) for i in images])
    m.save(tmp_path / "model")
    loaded = load_method(tmp_path / "model")
    assert type(loaded) is _Centroids and loaded.get_params() == {"n_clusters": 2, "scale": 0.5}
    np.testing.assert_array_equal(loaded.centers_, m.centers_)
    assert torch.equal(loaded.layer_.weight, m.layer_.weight)
    np.testing.assert_array_equal(loaded.predict(images[2]).labels, m.predict(images[2]).labels)
    with pytest.raises(ValueError, match="holds a '_test-centroids' model"):
        get_method("felzenszwalb").load(tmp_path / "model")


def test_predict_before_fit_is_a_clear_error():
    with pytest.raises(NotFittedError, match="must be fitted"):
        _Centroids().predict(np.zeros((2, 2, 3), np.uint8))


def test_load_refuses_non_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        load_method(tmp_path)


def test_registry_parameters_and_errors():
    assert method_parameters(get_method("kmeans-color"))["n_clusters"] == 8
    with pytest.raises(KeyError, match="available: .*felzenszwalb"):
        get_method("no-such-method")
    with pytest.raises(ValueError, match="has no parameter"):
        create_method("felzenszwalb", n_clusters=3)
    with pytest.raises(ValueError, match="registered twice"):
        register(type("Other", (_Centroids,), {}))


def test_segmentation_validates_shapes():
    labels = np.array([[0, 1], [1, 2]])
    Segmentation(labels, scores=np.full((3, 2, 2), 1 / 3))
    with pytest.raises(ValueError, match="shape"):
        Segmentation(labels, scores=np.ones((3, 2, 3)))
    with pytest.raises(ValueError, match="only 2 channels"):
        Segmentation(labels, scores=np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        Segmentation(-labels - 1)
    with pytest.raises(ValueError, match="2-D"):
        Segmentation(np.zeros(4, int))


def test_check_image_explains_how_to_fix():
    with pytest.raises(ValueError, match="read_image"):
        check_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        check_image(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("name", ["felzenszwalb", "kmeans-color"])
def test_baselines_recover_synthetic_regions(name, shapes_image):
    from scipy.optimize import linear_sum_assignment

    image, truth = shapes_image
    params = {"n_clusters": 4} if name == "kmeans-color" else {"scale": 500, "min_size": 100}
    labels = create_method(name, **params).predict(image).labels
    assert labels.shape == truth.shape
    t_ids, p_ids = np.unique(truth), np.unique(labels)
    inter = np.array([[np.sum((truth == t) & (labels == p)) for p in p_ids] for t in t_ids])
    union = (np.array([np.sum(truth == t) for t in t_ids])[:, None]
             + np.array([np.sum(labels == p) for p in p_ids])[None] - inter)
    iou = inter / union
    rows, cols = linear_sum_assignment(-iou)
    assert iou[rows, cols].sum() / len(t_ids) > 0.8
