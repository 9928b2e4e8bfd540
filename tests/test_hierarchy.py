"""Tests of hierarchical merging (unsup.hierarchy): merge order, nesting, finest level."""

import numpy as np
import pytest

from unsup.base import Segmentation
from unsup.hierarchy import (
    UCM_MAX,
    UltrametricHierarchy,
    cut_ultrametric_map,
    merge_regions,
    region_leaves,
    ultrametric_contour_map,
)
from unsup.synthetic import make_shapes_image


def _stripes():
    """Four vertical stripes A|B|C|D, 10 px wide: A-B differ a little, C-D more, B-C most."""
    labels = np.repeat(np.arange(4), 10)[None, :].repeat(12, axis=0)
    gray = np.array([100, 110, 200, 240])  # steps 10 (A|B), 90 (B|C), 40 (C|D)
    image = np.repeat(gray[labels][..., None], 3, axis=2).astype(np.uint8)
    return image, labels


def _same_partition(a, b):
    """True when two label maps define the same partition (up to renumbering)."""
    a, b = a.ravel(), b.ravel()
    pairs = np.unique(np.stack([a, b]), axis=1)
    return (len(np.unique(pairs[0])) == pairs.shape[1]
            and len(np.unique(pairs[1])) == pairs.shape[1])


def _is_nested(fine, coarse):
    """Every region of ``fine`` lies inside one region of ``coarse``."""
    pairs = np.unique(np.stack([fine.ravel(), coarse.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1]


def test_known_merge_order_gradient():
    image, labels = _stripes()
    ucm = ultrametric_contour_map(image, labels, strength="gradient")
    assert ucm.dtype == np.uint16 and ucm.shape == labels.shape
    # boundary pixels sit on the left of each stripe boundary (column 9, 19, 29)
    ab, bc, cd = ucm[:, 9], ucm[:, 19], ucm[:, 29]
    assert (ab > 0).all() and (bc > 0).all() and (cd > 0).all()
    assert np.count_nonzero(ucm) == 3 * labels.shape[0]
    # one level per boundary, ordered as the contrasts: A|B first, then C|D, then B|C
    assert len(np.unique(ab)) == len(np.unique(bc)) == len(np.unique(cd)) == 1
    assert ab[0] < cd[0] < bc[0]
    # cuts between the levels give 4, 3, 2, 1 regions in that order
    counts = [cut_ultrametric_map(ucm, t).max() + 1
              for t in (0.0, ab[0] / UCM_MAX, cd[0] / UCM_MAX, bc[0] / UCM_MAX)]
    assert counts == [4, 3, 2, 1]
    two = cut_ultrametric_map(ucm, cd[0] / UCM_MAX)
    assert _same_partition(two, (labels >= 2).astype(int))


def test_known_merge_order_scores():
    image, labels = _stripes()
    image = np.full_like(image, 128)  # no gradient: only the scores can order the merges
    # class probabilities: A and B nearly the same distribution, C and D in between
    dists = np.array([[0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0], [0, 0, 1.0, 0], [0, 0, 0.5, 0.5]])
    scores = dists[labels].transpose(2, 0, 1).astype(np.float32)
    seg = Segmentation(labels, scores=scores)
    ucm = ultrametric_contour_map(image, seg)  # auto -> scores
    ab, bc, cd = ucm[0, 9], ucm[0, 19], ucm[0, 29]
    # total-variation distances: A|B 0.3, C|D 0.5, B|C 1.0
    assert ab == round(0.3 * UCM_MAX) and cd == round(0.5 * UCM_MAX) and bc == UCM_MAX
    # the gradient path on the same flat image has nothing to order by: everything merges at 0
    flat = ultrametric_contour_map(image, seg, strength="gradient")
    assert set(np.unique(flat)) == {0, 1}
    assert cut_ultrametric_map(flat, 0.0).max() == 3  # but the finest level still has 4


def test_ucm_levels_are_running_max_of_mean_boundaries():
    # three regions in a row; after A+B merge, the mean of (A|C, B|C) is lower than A|B
    levels = merge_regions(np.array([0, 0, 1]), np.array([1, 2, 2]),
                           np.array([0.2, 0.0, 0.1]), np.array([1, 1, 1]))
    # edges: 0-1 weight .2, 0-2 weight 0, 1-2 weight .1 -> 0-2 first (0), then {0,2}-1 mean .15
    np.testing.assert_allclose(levels, [0.15, 0.0, 0.15])
    # non-monotone costs are lifted to the running maximum
    levels = merge_regions(np.array([0, 1]), np.array([1, 2]), np.array([0.5, 0.1]),
                           np.array([1, 3]))
    # 1-2 (cost .033) merges first at .033, then 0-{1,2} at .5
    np.testing.assert_allclose(levels, [0.5, 0.1 / 3])


@pytest.mark.parametrize("seed", range(4))
def test_nested_and_finest_level_on_thick_random_maps(seed):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 5, size=(9, 11))
    labels = np.kron(coarse, np.ones((2, 2), int))  # every pixel in a 2x2 square of its region
    image = rng.integers(0, 256, size=labels.shape + (3,)).astype(np.uint8)
    scores = rng.dirichlet(np.ones(5), size=labels.shape).transpose(2, 0, 1)
    for seg in (labels, Segmentation(labels, scores=scores.astype(np.float32))):
        ucm = ultrametric_contour_map(image, seg)
        hierarchy = UltrametricHierarchy(ucm)
        leaves = region_leaves(labels)
        finest = hierarchy.cut(0.0)
        np.testing.assert_array_equal(finest, leaves)  # same partition, same scan-order ids
        cuts = [hierarchy.cut(t) for t in [0.0, *hierarchy.levels]]
        for fine, coarse_cut in zip(cuts, cuts[1:], strict=False):
            assert _is_nested(fine, coarse_cut)
            assert coarse_cut.max() < fine.max()  # every level merges something
        assert cuts[-1].max() == 0 and hierarchy.cut(1.0).max() == 0


def test_cut_reproduces_greedy_partitions():
    rng = np.random.default_rng(7)
    labels = np.kron(rng.integers(0, 6, size=(8, 8)), np.ones((3, 3), int))
    image = rng.integers(0, 256, size=labels.shape + (3,)).astype(np.uint8)
    ucm = ultrametric_contour_map(image, labels, strength="gradient")
    leaves = region_leaves(labels)
    # the greedy merge's own partitions, from its per-leaf-pair levels
    from unsup.hierarchy import _adjacent_pairs, _gradient_dissimilarity

    p, q = _adjacent_pairs(leaves)
    a, b = leaves.ravel()[p], leaves.ravel()[q]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    n = leaves.max() + 1
    keys, inv = np.unique(lo * n + hi, return_inverse=True)
    d = _gradient_dissimilarity(image, p, q, sigma=1.0, scale=10.0)
    levels = merge_regions(keys // n, keys % n, np.bincount(inv, d), np.bincount(inv))
    quantized = np.maximum(1, np.rint(levels * UCM_MAX))
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    for value in np.unique(quantized):
        join = quantized <= value
        graph = coo_matrix((np.ones(join.sum()), (keys[join] // n, keys[join] % n)), shape=(n, n))
        expected = connected_components(graph, directed=False)[1][leaves]
        assert _same_partition(cut_ultrametric_map(ucm, value / UCM_MAX), expected)


def _thick_leaves(leaves):
    """Ids of the leaves meeting the documented exactness condition (2x2 squares, connected
    non-boundary pixels)."""
    from scipy import ndimage

    h, w = leaves.shape
    in_square = np.zeros((h, w), bool)
    square = ((leaves[:-1, :-1] == leaves[1:, :-1]) & (leaves[:-1, :-1] == leaves[:-1, 1:])
              & (leaves[:-1, :-1] == leaves[1:, 1:]))
    for dy in (0, 1):
        for dx in (0, 1):
            in_square[dy:h - 1 + dy, dx:w - 1 + dx] |= square
    interior = np.ones((h, w), bool)
    interior[:, :-1] &= leaves[:, :-1] == leaves[:, 1:]
    interior[:-1, :] &= leaves[:-1, :] == leaves[1:, :]
    thick = []
    for leaf in np.unique(leaves):
        mask = leaves == leaf
        if in_square[mask].all() and ndimage.label(mask & interior)[1] == 1:
            thick.append(leaf)
    return thick


@pytest.mark.parametrize("seed", [3, 4, 8])
def test_shapes_image_thick_regions_exact(seed):
    image, labels = make_shapes_image((64, 80), n_shapes=4, noise=4.0, seed=seed)
    ucm = ultrametric_contour_map(image, labels)
    leaves = region_leaves(labels)
    finest = cut_ultrametric_map(ucm, 0.0)
    thick = _thick_leaves(leaves)
    assert len(thick) >= 2
    targets = []
    for leaf in thick:  # a thick region lies inside one finest region, of its own
        inside = np.unique(finest[leaves == leaf])
        assert inside.size == 1
        targets.append(inside[0])
    assert len(set(targets)) == len(targets)
    if len(thick) == leaves.max() + 1:
        assert _same_partition(finest, leaves)
    assert cut_ultrametric_map(ucm, 1.0).max() == 0
    # list thresholds give a list of cuts
    cuts = cut_ultrametric_map(ucm, [0.0, 1.0])
    assert len(cuts) == 2 and cuts[1].max() == 0


def test_float_map_and_input_checks():
    image, labels = _stripes()
    ucm = ultrametric_contour_map(image, labels)
    as_float = ucm / UCM_MAX
    for t in (0.0, 0.3, 0.9):
        np.testing.assert_array_equal(cut_ultrametric_map(as_float, t),
                                      cut_ultrametric_map(ucm, t))
    original = labels.copy()
    ultrametric_contour_map(image, labels)
    np.testing.assert_array_equal(labels, original)  # input not mutated
    with pytest.raises(ValueError, match="levels in"):
        cut_ultrametric_map(as_float * 2, 0.5)
    with pytest.raises(ValueError, match="2-D"):
        cut_ultrametric_map(ucm[None], 0.5)
    with pytest.raises(ValueError, match="threshold"):
        cut_ultrametric_map(ucm, float("nan"))
    with pytest.raises(ValueError, match="scores"):
        ultrametric_contour_map(image, labels, strength="scores")
    with pytest.raises(ValueError, match="strength"):
        ultrametric_contour_map(image, labels, strength="magic")
    with pytest.raises(ValueError, match="image is"):
        ultrametric_contour_map(image[:5], labels)


def test_single_region_has_no_boundary():
    image = np.zeros((5, 7, 3), np.uint8)
    ucm = ultrametric_contour_map(image, np.zeros((5, 7), np.int32))
    assert not ucm.any()
    assert not cut_ultrametric_map(ucm, 0.0).any()
