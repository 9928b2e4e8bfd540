import json

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from unsup.datasets import Box, DatasetError, boxes_from_masks, open_dataset
from unsup.io import ImageReadError, write_image, write_label_map


def _img(h, w, value=0):
    return np.full((h, w, 3), value, np.uint8)


def test_folder_is_recursive_sorted_with_relative_ids(tmp_path):
    write_image(tmp_path / "b.png", _img(4, 5))
    write_image(tmp_path / "a" / "z.jpg", _img(4, 5))
    write_image(tmp_path / "a" / "c.png", _img(4, 5))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path)
    assert ds.ids == ["a/c", "a/z", "b"]
    assert open_dataset(f"folder:{tmp_path}").ids == ds.ids
    single = open_dataset(tmp_path / "b.png")
    assert single.ids == ["b"] and single.load(0).image.shape == (4, 5, 3)


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="no image files"):
        open_dataset(tmp_path)
    with pytest.raises(DatasetError, match="no such file"):
        open_dataset(tmp_path / "missing")


def test_iter_samples_skips_and_records_bad_files(tmp_path):
    write_image(tmp_path / "good.png", _img(4, 5))
    (tmp_path / "bad.png").write_bytes(b"")
    ds = open_dataset(tmp_path)
    errors = []
    ids = [s.id for s in ds.iter_samples(on_error="skip", errors=errors)]
    assert ids == ["good"]
    assert errors[0][0].id == "bad" and isinstance(errors[0][1], ImageReadError)
    with pytest.raises(ImageReadError, match="bad.png"):
        list(ds)


def test_masks_dataset_matches_by_stem(tmp_path):
    write_image(tmp_path / "im" / "x.jpg", _img(6, 7))
    write_image(tmp_path / "im" / "y.jpg", _img(6, 7))
    labels = np.zeros((6, 7), int)
    labels[2:, 3:] = 4
    labels[0, 0] = 255
    write_label_map(tmp_path / "gt" / "x.png", labels)
    with pytest.warns(UserWarning, match="no mask for 1 image"):
        ds = open_dataset(f"masks:{tmp_path / 'im'}:{tmp_path / 'gt'}", ignore_index=255)
    assert ds.ids == ["x"]
    sample = ds.load("x")
    np.testing.assert_array_equal(sample.label_map, labels)
    assert sample.ignore_index == 255


def test_mask_size_mismatch_is_reported(tmp_path):
    write_image(tmp_path / "im" / "x.png", _img(6, 7))
    write_label_map(tmp_path / "gt" / "x.png", np.zeros((5, 7), int))
    ds = open_dataset(f"masks:{tmp_path / 'im'}:{tmp_path / 'gt'}")
    with pytest.raises(DatasetError, match=r"x.png.*\(5, 7\)"):
        ds.load(0)


def _bsds_mat(path, segs):
    cells = np.empty((1, len(segs)), dtype=object)
    for k, seg in enumerate(segs):
        bnd = np.zeros_like(seg, dtype=np.uint8)
        bnd[:, 1:][seg[:, 1:] != seg[:, :-1]] = 1
        cells[0, k] = {"Segmentation": seg.astype(np.uint16), "Boundaries": bnd}
    savemat(path, {"groundTruth": cells})


def test_bsds500_loads_all_annotators(tmp_path):
    root = tmp_path / "BSR"
    (root / "images" / "val").mkdir(parents=True)
    (root / "groundTruth" / "val").mkdir(parents=True)
    write_image(root / "images" / "val" / "12003.jpg", _img(8, 10))
    seg1 = np.ones((8, 10), int)
    seg1[:, 5:] = 2
    seg2 = np.ones((8, 10), int)
    _bsds_mat(root / "groundTruth" / "val" / "12003.mat", [seg1, seg2, seg1])
    ds = open_dataset(f"bsds500:{root}", split="val")
    s = ds.load(0)
    assert s.id == "12003" and len(s.ground_truth) == 3 and len(s.boundaries) == 3
    np.testing.assert_array_equal(s.ground_truth[0], seg1)
    assert s.boundaries[0][:, 5].all() and not s.boundaries[1].any()
    with pytest.raises(DatasetError, match="split"):
        open_dataset(f"bsds500:{root}", split="train")


def _voc_root(tmp_path):
    root = tmp_path / "VOC2012"
    write_image(root / "JPEGImages" / "2007_000001.jpg", _img(10, 12))
    seg = np.zeros((10, 12), np.uint8)
    seg[2:8, 3:9] = 13  # horse
    seg[2, 3:9] = 255   # void border
    img = Image.fromarray(seg, mode="P")
    img.putpalette(list(np.random.default_rng(0).integers(0, 255, 768)))
    (root / "SegmentationClass").mkdir(parents=True)
    img.save(root / "SegmentationClass" / "2007_000001.png")
    (root / "Annotations").mkdir()
    (root / "Annotations" / "2007_000001.xml").write_text(
        "<annotation><object><name>horse</name><difficult>0</difficult><bndbox><xmin>4</xmin>"
        "<ymin>3</ymin><xmax>9</xmax><ymax>8</ymax></bndbox></object>"
        "<object><name>unicorn</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax>"
        "<ymax>2</ymax></bndbox></object></annotation>")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")
    return root


def test_voc_palette_masks_void_and_xml_boxes(tmp_path):
    root = _voc_root(tmp_path)
    ds = open_dataset(f"voc:{tmp_path}", split="val")
    with pytest.warns(UserWarning, match="unknown class 'unicorn'"):
        s = ds.load(0)
    assert ds.ignore_index == 255 and ds.class_names[13] == "horse"
    assert s.label_map[5, 5] == 13 and s.label_map[2, 5] == 255 and s.label_map[0, 0] == 0
    assert s.boxes == [Box(3.0, 2.0, 9.0, 8.0, 13)]
    assert open_dataset(f"voc:{root}").ids == ["2007_000001"]


def _coco_json(tmp_path):
    write_image(tmp_path / "images" / "000000000001.jpg", _img(20, 30))
    rle_counts = [20 * 25, 20 * 5]  # uncompressed RLE, column-major: last 5 columns = crowd
    data = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": 20, "width": 30}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 40.0,
             "bbox": [2, 2, 8, 5], "segmentation": [[2, 2, 10, 2, 10, 7, 2, 7]]},
            {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 1, "area": 100.0,
             "bbox": [25, 0, 5, 20], "segmentation": {"counts": rle_counts, "size": [20, 30]}},
            {"id": 3, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 4.0,
             "bbox": [28, 18, 10, 10], "segmentation": [[28, 18, 29, 18, 29, 19, 28, 19]]},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_semantic_maps_crowd_void_and_boxes(tmp_path):
    ann = _coco_json(tmp_path)
    ds = open_dataset(f"coco:{ann}:{tmp_path / 'images'}")
    assert ds.class_names == ["background", "car", "dog"]
    with pytest.warns(UserWarning, match="outside"):
        s = ds.load(0)
    dog, car = 2, 1
    assert s.label_map[4, 5] == dog
    assert s.label_map[10, 27] == 255           # crowd region -> void
    assert s.label_map[15, 5] == 0
    assert any(b.label == car and b.ignore for b in s.boxes)
    clipped = [b for b in s.boxes if b.label == car and not b.ignore][0]
    assert clipped.x1 == 30 and clipped.y1 == 20


def test_csv_boxes_clip_skip_and_report(tmp_path):
    write_image(tmp_path / "im" / "a.png", _img(10, 10))
    csv = tmp_path / "boxes.csv"
    csv.write_text("image,x0,y0,x1,y1,label\n"
                   "a.png,1,1,5,5,1\n"
                   "a,-3,2,4,20,2\n"
                   "a,4,4,4,9,1\n"
                   "a,1,1,2,2,zebra\n")
    with pytest.warns(UserWarning) as record:
        ds = open_dataset(tmp_path / "im", boxes=csv)
        s = ds.load(0)
    messages = " ".join(str(w.message) for w in record)
    assert "zebra" in messages and "zero area" in messages and "clipped" in messages
    assert s.boxes == [Box(1, 1, 5, 5, 1), Box(0, 2, 4, 10, 2)]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,a,b\n")
    with pytest.raises(DatasetError, match="header"):
        open_dataset(tmp_path / "im", boxes=bad)


def test_boxes_from_masks_one_box_per_component_per_class(tmp_path):
    labels = np.zeros((10, 10), int)
    labels[1:3, 1:4] = 1
    labels[6:9, 6:8] = 1
    labels[5, 0:2] = 2
    labels[0, 9] = 255
    boxes = boxes_from_masks(labels, ignore_index=255)
    assert sorted((b.label, b.as_int()) for b in boxes) == [
        (1, (1, 1, 4, 3)), (1, (6, 6, 8, 9)), (2, (0, 5, 2, 6))]
    write_image(tmp_path / "im" / "x.png", _img(10, 10))
    write_label_map(tmp_path / "gt" / "x.png", labels)
    ds = open_dataset(f"masks:{tmp_path / 'im'}:{tmp_path / 'gt'}", ignore_index=255,
                      boxes_from_masks=True)
    assert len(ds.load(0).boxes) == 3
    with pytest.raises(DatasetError, match="needs a dataset with masks"):
        open_dataset(tmp_path / "im", boxes_from_masks=True)


def test_files_sharing_a_stem_keep_distinct_ids(tmp_path):
    write_image(tmp_path / "a.png", _img(4, 5))
    write_image(tmp_path / "a.jpg", _img(4, 5))
    write_image(tmp_path / "b.png", _img(4, 5))
    with pytest.warns(UserWarning, match="share the id"):
        ds = open_dataset(tmp_path)
    assert ds.ids == ["a.jpg", "a.png", "b"]
