"""Dataset views (unsup.datasets.Dataset): boxes only, class restriction, split, images only."""

import numpy as np
import pytest


def _tiny_dataset(tmp_path):
    from unsup.datasets import open_dataset
    from unsup.synthetic import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "shapes", 3, shape=(40, 50), n_shapes=2)
    return open_dataset(f"masks:{root}/images:{root}/masks", boxes_from_masks=True)


def test_boxes_only_dataset_strips_masks(tmp_path):
    ds = _tiny_dataset(tmp_path)
    view = ds.boxes_only()
    assert len(view) == 3 and view.ids == ds.ids
    for s in list(view) + [view.load(0)]:
        assert s.ground_truth is None and s.boundaries is None
        assert s.boxes and all(b.label in (1, 2) for b in s.boxes)
    assert ds.load(0).ground_truth is not None  # the wrapped dataset is untouched
    from unsup.datasets import open_dataset

    with pytest.raises(ValueError, match="has no boxes"):
        open_dataset(str(tmp_path / "shapes" / "images")).boxes_only()


def test_restrict_classes_remaps_labels_and_boxes(tmp_path):
    ds = _tiny_dataset(tmp_path)
    view = ds.restrict_classes([2])
    assert view.class_names == ["background", "2"]
    for i in range(3):
        orig, new = ds.load(i), view.load(i)
        np.testing.assert_array_equal(new.label_map, (orig.label_map == 2).astype(np.int32))
        assert [b.label for b in new.boxes] == [1] * sum(b.label == 2 for b in orig.boxes)
    from unsup.datasets import DatasetError

    with pytest.raises(DatasetError, match="unknown class 'zebra'"):
        ds.restrict_classes(["zebra"])



def test_split_is_seeded_disjoint_and_keeps_order(tmp_path):
    from unsup.datasets import open_dataset
    from unsup.synthetic import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "many", 10, shape=(20, 20), n_shapes=1)
    ds = open_dataset(f"masks:{root}/images:{root}/masks")
    train, held = ds.split(0.3, seed=4)
    assert len(held) == 3 and len(train) == 7
    assert set(train.ids).isdisjoint(held.ids) and set(train.ids) | set(held.ids) == set(ds.ids)
    assert train.ids == [i for i in ds.ids if i in set(train.ids)]
    again = ds.split(0.3, seed=4)[1]
    assert again.ids == held.ids and ds.split(0.3, seed=5)[1].ids != held.ids
    with pytest.raises(ValueError, match="fraction"):
        ds.split(1.0)


def test_without_annotations_drops_ground_truth_and_boxes(tmp_path):
    ds = _tiny_dataset(tmp_path)
    plain = ds.without_annotations()
    sample = plain.load(0)
    assert sample.ground_truth is None and sample.boxes is None
    assert plain.ids == ds.ids and not plain.has_ground_truth
