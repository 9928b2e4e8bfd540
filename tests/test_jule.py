"""Tests of the `jule` method: the generic core (affinity, merges, dendrogram, digits) and the
segmentation method (synthetic regions, connectivity, hierarchy, determinism, persistence)."""

from __future__ import annotations

import numpy as np
import pytest

from methods.jule.core import (
    Agglomeration,
    Dendrogram,
    initial_clusters,
    knn_graph,
    l2_normalize,
    run_jule,
)
from methods.jule.learning import TensorRepresentation, residual_mlp, weighted_triplet_loss
from methods.jule.segmentation import Jule, dendrogram_ucm, superpixel_adjacency
from unsup.synthetic import make_shapes_image

torch = pytest.importorskip("torch")


def _direct_affinity(w, labels, i, j):
    ci, cj = np.flatnonzero(labels == i), np.flatnonzero(labels == j)
    wij, wji = w[np.ix_(ci, cj)], w[np.ix_(cj, ci)]
    return (wij @ wji).sum() / len(ci) ** 2 + (wji @ wij).sum() / len(cj) ** 2


def test_incremental_affinity_matches_graph_degree_linkage_formula():
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.normal(size=(120, 6)))
    w = knn_graph(x, k_neighbors=8)
    dense = w.toarray()
    # every sample has exactly K_s out-edges with weights in (0, 1]
    assert np.all((dense > 0).sum(1) == 8) and dense.max() <= 1.0
    labels = initial_clusters(x)
    c0 = int(labels.max()) + 1
    state = Agglomeration(w, labels, id_capacity=2 * c0, k_clusters=5)
    for t in range(c0 - 4):
        assert state.step(c0 + t) is not None
        if t % 7 == 0:
            ids = sorted(state.size)
            for i in ids[:6]:
                for j in ids:
                    if i != j:
                        assert state.affinity(i, j) == pytest.approx(
                            _direct_affinity(dense, state.labels, i, j), abs=1e-12)
    assert state.n_clusters == 4


def test_merge_criterion_prefers_locally_distinct_pairs():
    # two tight pairs (A, B) and (C, D); E is in between: JULE merges a tight pair first
    x = np.array([[0.0, 0], [0.1, 0], [5, 0], [5.1, 0], [2.5, 3]])
    w = knn_graph(x, k_neighbors=2)
    state = Agglomeration(w, np.arange(5), id_capacity=10, k_clusters=3)
    i, j, aff, nbrs = state.step(5)
    assert {i, j} in ({0, 1}, {2, 3})
    assert aff > 0 and nbrs[0] == j


def test_initial_clusters_have_at_least_two_samples_and_respect_connectivity():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3))
    labels = initial_clusters(x)
    assert np.bincount(labels).min() >= 2
    chain = np.stack([np.arange(59), np.arange(1, 60)], 1)  # a path graph
    labels_c = initial_clusters(x, connectivity=chain)
    # with a path connectivity every initial cluster is a contiguous run of indices
    for c in np.unique(labels_c):
        idx = np.flatnonzero(labels_c == c)
        assert idx.max() - idx.min() + 1 == len(idx)


def test_weighted_triplet_loss_values():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0]])
    n = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    # d(a, p) = 0; d(a, n1) = 2 (satisfied), d(a, n2) = 0 (violated by the margin)
    loss = weighted_triplet_loss(a, p, n, gamma=2.0, margin=0.2, weight=0.5)
    assert float(loss) == pytest.approx(0.5 * 0.2)
    far_p = torch.tensor([[0.0, 1.0]])  # d(a, p) = 2: gamma doubles the positive term
    loss2 = weighted_triplet_loss(a, far_p, n, gamma=2.0, margin=0.2, weight=1.0)
    assert float(loss2) == pytest.approx((0.2 + 4 - 2) + (0.2 + 4 - 0))


def test_dendrogram_levels_monotone_and_cut():
    rng = np.random.default_rng(2)
    # blobs away from the origin (JULE L2-normalises the embeddings)
    x = np.concatenate([rng.normal(0, 0.1, (30, 4)) + [3, 0, 0, 0],
                        rng.normal(0, 0.1, (30, 4)) + [0, 3, 0, 0]])
    rep = TensorRepresentation(torch.tensor(x, dtype=torch.float32), torch.nn.Identity())
    res = run_jule(rep, n_clusters=2, learn=False, k_neighbors=5, complete=True)
    d = res.dendrogram
    for kind in ("affinity", "rank"):
        lv = d.levels(kind)
        assert np.all(np.diff(lv) >= 0) and lv.min() >= 0 and lv.max() <= 1
    assert d.n_merges == d.n_initial - 1  # complete: down to one cluster
    assert np.array_equal(d.cut(2), res.labels)
    truth = np.repeat([0, 1], 30)
    assert np.array_equal(res.labels, truth) or np.array_equal(res.labels, 1 - truth)


def test_learning_changes_the_representation_and_is_deterministic():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 0.3, (40, 8)) + 3 * np.eye(8)[k] for k in range(3)])

    def run(learn, seed=0):
        torch.manual_seed(0)
        rep = TensorRepresentation(torch.tensor(x, dtype=torch.float32), residual_mlp(8, 8))
        return run_jule(rep, n_clusters=3, learn=learn, unroll_rate=0.5, n_iter_per_period=5,
                        optimizer="adam", lr=1e-2, k_neighbors=6, seed=seed)

    a, b, fixed = run(True), run(True), run(False)
    assert np.array_equal(a.labels, b.labels)
    assert np.allclose(a.embeddings, b.embeddings)
    assert any("loss" in h for h in a.history)
    assert not np.allclose(a.embeddings, fixed.embeddings)


def test_digits_nmi_fast():
    """The JULE core on sklearn's bundled digits beats 0.85 NMI (full set: docs/benchmarks)."""
    from sklearn.datasets import load_digits
    from sklearn.metrics import normalized_mutual_info_score

    x, y = load_digits(return_X_y=True)
    keep = np.random.default_rng(0).permutation(len(x))[:900]
    torch.manual_seed(0)
    rep = TensorRepresentation(torch.tensor(x[keep] / 16.0, dtype=torch.float32),
                               residual_mlp(64, 64))
    res = run_jule(rep, n_clusters=10, learn=True, unroll_rate=0.9, n_iter_per_period=20,
                   optimizer="sgd", lr=0.01, seed=0)
    assert normalized_mutual_info_score(y[keep], res.labels) > 0.85


# ------------------------------------------------------------------------------------------
# segmentation


def _fast(*, cnn=None, **kw):
    # SLIC: Felzenszwalb returns the few flat regions of these small synthetic images almost
    # as they are, leaving JULE nothing to merge or learn
    params = dict(n_superpixels=150, n_clusters=4, features="cnn", superpixels="slic",
                  learning={"n_iter_per_period": 5, "unroll_rate": 0.6},
                  cnn={"max_side": 96, "embedding_dim": 8, **(cnn or {})})
    params.update(kw)
    return Jule(**params)


@pytest.fixture(scope="module")
def shapes():
    return make_shapes_image((72, 96), n_shapes=3, noise=8.0, seed=0)


def _connected(mask):
    from scipy import ndimage

    return ndimage.label(mask)[1] == 1


def test_recovers_synthetic_regions(shapes):
    from sklearn.metrics import adjusted_rand_score

    image, truth = shapes
    for learn in (False, True):
        seg = _fast(learn=learn).predict(image)
        assert seg.labels.shape == truth.shape
        assert adjusted_rand_score(truth.ravel(), seg.labels.ravel()) > 0.8
        assert seg.scores.shape == (seg.labels.max() + 1, *truth.shape)
        assert np.allclose(seg.scores.sum(0), 1, atol=1e-4)


def test_adjacency_gives_connected_clusters(shapes):
    image, _ = shapes
    seg = _fast(n_clusters=6).predict(image)
    for c in np.unique(seg.labels):
        assert _connected(seg.labels == c)


def test_hierarchy_is_the_dendrogram(shapes):
    from unsup.hierarchy import cut_ultrametric_map

    image, truth = shapes
    seg = _fast().predict(image)
    ucm = seg.hierarchy
    assert ucm.dtype == np.uint16 and ucm.shape == truth.shape and ucm.max() > 0
    # cutting just above the level at which n_clusters was reached gives the labels back, up
    # to the lab format's known junction effects (a few leaves joined late): no two clusters
    # merged (the cut refines the labels almost everywhere) and nearly the same partition
    level = seg.info["level_at_n_clusters"]
    cut = np.asarray(cut_ultrametric_map(ucm, min(1.0, level + 1e-6)))
    from sklearn.metrics import adjusted_rand_score

    counts = np.zeros((cut.max() + 1, seg.labels.max() + 1), int)
    np.add.at(counts, (cut.ravel(), seg.labels.ravel()), 1)
    assert counts.max(1).sum() / cut.size > 0.99  # each cut region inside one label
    assert adjusted_rand_score(seg.labels.ravel(), cut.ravel()) > 0.9
    # and the coarsest cut is one region, the finest is finer than the labels
    assert np.asarray(cut_ultrametric_map(ucm, 1.0)).max() == 0
    assert np.asarray(cut_ultrametric_map(ucm, 0.0)).max() + 1 > seg.labels.max() + 1


def test_dendrogram_ucm_levels_follow_merge_order():
    sp = np.repeat(np.arange(4)[None, :], 3, axis=0).repeat(2, axis=1)  # 4 vertical strips
    d = Dendrogram(initial_labels=np.arange(4), merges=np.array([[0, 1], [2, 3], [4, 5]]),
                   affinity=np.array([3.0, 1.0, 0.1]), period=np.zeros(3, int))
    ucm = dendrogram_ucm(sp, d, levels="rank").astype(float) / 65535
    # lab convention: the pixel left of a vertical boundary carries it
    for col, level in ((1, 1 / 3), (3, 1.0), (5, 2 / 3)):
        assert ucm[0, col] == pytest.approx(level, abs=1e-4)
    for col in (0, 2, 4, 6, 7):
        assert ucm[:, col].max() == 0
    assert np.array_equal(superpixel_adjacency(sp), [[0, 1], [1, 2], [2, 3]])


def test_thicken_superpixels_makes_every_pixel_part_of_a_2x2_square():
    from methods.jule.regions import thicken_superpixels

    rng = np.random.default_rng(0)
    sp = (rng.random((30, 40)) < 0.1).astype(int)  # scattered one-pixel specks
    sp[:, 20] = 2  # a one-pixel-wide line
    th = thicken_superpixels(sp)
    h, w = th.shape
    for y in range(h):
        for x in range(w):
            ok = False
            for y0 in (y - 1, y):
                for x0 in (x - 1, x):
                    if 0 <= y0 < h - 1 and 0 <= x0 < w - 1:
                        block = th[y0:y0 + 2, x0:x0 + 2]
                        ok |= bool((block == th[y, x]).all())
            assert ok, (y, x)
    assert th.dtype == np.int32 and th.min() == 0


def test_same_seed_same_labels(shapes):
    image, _ = shapes
    a = _fast(seed=3).predict(image)
    b = _fast(seed=3).predict(image)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.hierarchy, b.hierarchy)


def test_input_not_mutated_and_bad_params(shapes):
    image, _ = shapes
    before = image.copy()
    _fast(learn=False).predict(image)
    assert np.array_equal(image, before)
    with pytest.raises(ValueError, match="scope"):
        Jule(scope="world").predict(image)
    with pytest.raises(ValueError, match="unroll_rate"):
        Jule(learning={"unroll_rate": 0}).predict(image)


def test_bad_superpixels_and_cluster_counts_raise():
    with pytest.raises(ValueError, match="superpixels"):
        Jule(superpixels="watershed").predict(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="n_clusters"):
        Jule(n_clusters=0).predict(np.zeros((8, 8, 3), np.uint8))


def test_felzenszwalb_superpixels_give_connected_regions():
    # the edge-following over-segmentation option, on a larger synthetic image
    image, truth = make_shapes_image((120, 160), n_shapes=4, noise=8.0, seed=1)
    seg = _fast(superpixels="felzenszwalb", n_clusters=3).predict(image)
    assert seg.labels.shape == truth.shape
    assert 1 <= seg.labels.max() + 1 <= 3
    for c in np.unique(seg.labels):
        assert _connected(seg.labels == c)


def test_requires_fit_depends_on_scope():
    assert not Jule(scope="image").requires_fit
    assert Jule(scope="dataset").requires_fit
    from unsup.base import NotFittedError

    with pytest.raises(NotFittedError):
        Jule(scope="dataset").predict(np.zeros((8, 8, 3), np.uint8))


def test_dataset_scope_fit_predict_save_load(tmp_path):
    from sklearn.metrics import adjusted_rand_score

    from unsup.datasets import open_dataset
    from unsup.registry import load_method
    from unsup.synthetic import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "data", n_images=3, shape=(64, 80), n_shapes=2)
    ds = open_dataset(f"masks:{root}/images:{root}/masks")
    m = _fast(scope="dataset", n_clusters=3, samples_per_image=40, n_superpixels=80,
              cnn={"patch_size": 16}, learn=True)
    m.fit(ds.without_annotations())
    sample = ds.load(0)
    seg = m.predict(sample.image)
    # consistent colours across images: one cluster id per class colour
    assert adjusted_rand_score(sample.label_map.ravel(), seg.labels.ravel()) > 0.7
    m.save(tmp_path / "model")
    loaded = load_method(tmp_path / "model")
    seg2 = loaded.predict(sample.image)
    assert np.array_equal(seg.labels, seg2.labels)


def test_felzenszwalb_superpixel_parameters_reach_the_superpixels():
    image, _ = make_shapes_image((64, 80), n_shapes=4, noise=8.0, seed=3)
    fine = Jule(superpixels="felzenszwalb", scale=5.0, min_size=5)._superpixels(image)
    coarse = Jule(superpixels="felzenszwalb", scale=500.0, min_size=50)._superpixels(image)
    assert fine.shape == coarse.shape == image.shape[:2]
    assert len(np.unique(fine)) > 2 * len(np.unique(coarse))


def test_option_groups_are_nested_parameters_and_saved_as_objects(tmp_path):
    from unsup.registry import load_method

    method = Jule(learning={"lr": 1e-3}, cnn={"max_side": 64})
    params = method.get_params(deep=True)
    assert params["learning__lr"] == 1e-3 and params["learning__unroll_rate"] == 0.2
    assert params["cnn__max_side"] == 64 and params["cnn__embedding_dim"] == 32
    method.set_params(learning__optimizer="sgd")
    assert method._jule_kwargs()["optimizer"] == "sgd"
    assert method._jule_kwargs()["weight_decay"] == 5e-4  # the paper's SGD decay
    with pytest.raises(ValueError, match="learning has no option"):
        Jule(learning={"triplets": "clusters"})
    method.save(tmp_path / "model")
    loaded = load_method(tmp_path / "model")
    assert loaded.learning.lr == 1e-3 and loaded.learning.optimizer == "sgd"
    assert loaded.cnn.max_side == 64
