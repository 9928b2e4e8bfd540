"""matched / hungarian / semantic protocols, prediction reading, reports, CLI and bad inputs."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from unsup.cli import build_parser
from unsup.datasets import open_dataset
from unsup.evaluation import EvaluationError, PredictionError, evaluate
from unsup.evaluation.confusion import class_scores, collapse, hungarian_mapping
from unsup.evaluation.matched import connected_segments, matched_scores
from unsup.evaluation.predictions import (
    HIERARCHY_FORMAT,
    HIERARCHY_MARKER,
    detect_pred_type,
    read_prediction,
)
from unsup.io import write_image, write_label_map
from unsup.synthetic import make_shapes_image

# ---------------------------------------------------------------------------------------------
# matched


def test_matched_by_hand():
    pred = np.array([[0, 0, 1, 1],
                     [0, 0, 1, 1]])  # P0 = columns 0-1, P1 = columns 2-3
    gt_a = np.array([[5, 5, 5, 7],
                     [5, 5, 5, 7]])  # A = columns 0-2 (6 px), B = column 3 (2 px)
    gt_b = np.full((2, 4), 3)  # one segment
    # annotator a: IoU(P0, A) = 4/6, IoU(P1, A) = 2/8, IoU(P1, B) = 2/4, IoU(P0, B) = 0.
    #   Hungarian: P0-A + P1-B = 2/3 + 1/2 -> mIoU = 7/12 over its 2 segments.
    #   best IoU per segment: A 2/3, B 1/2 -> AP50: 1 of 2 (0.5 is not > 0.5), AP70: 0.
    # annotator b: IoU(P0) = IoU(P1) = 4/8 -> mIoU = 1/2, AP50 = AP70 = 0.
    s = matched_scores(pred, [gt_a, gt_b])
    assert s["miou_per_annotator"] == pytest.approx([7 / 12, 1 / 2])
    assert s["miou.fine"] == pytest.approx(7 / 12)  # annotator a has more segments
    assert s["miou.coarse"] == pytest.approx(1 / 2)
    assert s["miou.all"] == pytest.approx(13 / 24)
    assert s["ap50"] == pytest.approx(0.25) and s["ap70"] == 0.0


def test_matched_splits_disconnected_clusters():
    pred = np.array([[0, 1, 0]])
    np.testing.assert_array_equal(connected_segments(pred), [[0, 1, 2]])
    # any integer ids, negative ones included, numbered by first pixel in scan order
    np.testing.assert_array_equal(connected_segments(np.array([[-1, 5], [5, -1]])), [[0, 1], [2, 3]])
    np.testing.assert_array_equal(connected_segments(np.array([[7, 7], [-3, 7]])), [[0, 0], [1, 0]])
    # cluster 0 appears twice: as two segments it cannot cover both ground-truth pieces' union
    gt = np.array([[1, 2, 2]])
    s = matched_scores(pred, [gt])
    # segments {0}, {1}, {2}; GT {0}, {1, 2}: best one-to-one = 1 + 1/2, over 2 segments
    assert s["miou.all"] == pytest.approx(0.75)


def test_matched_properties():
    _, labels = make_shapes_image((48, 64), n_shapes=3, seed=1)
    perfect = matched_scores(labels, [labels])
    assert perfect["miou.all"] == 1.0 and perfect["ap70"] == 1.0
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 3, size=labels.shape)
    pred[:24] = 5
    perm = np.array([9, 4, 0, 0, 0, 1])  # relabel 0->9, 1->4, 2->0, 5->1
    a, b = matched_scores(pred, [labels]), matched_scores(perm[pred], [labels])
    assert a["miou.all"] == pytest.approx(b["miou.all"]) and a["ap50"] == b["ap50"]
    # ignore index: wrong predictions on void pixels do not count
    gt = labels.copy()
    gt[:, :10] = 255
    noisy = labels.copy()
    noisy[:24, :10] = 7  # the void strip predicted as two segments
    noisy[24:, :10] = 8
    assert matched_scores(noisy, [gt], ignore_index=255)["miou.all"] == 1.0
    assert matched_scores(noisy, [gt])["miou.all"] < 1.0
    with pytest.raises(ValueError, match="empty ground truth"):
        matched_scores(labels, [])
    with pytest.raises(ValueError, match="all void"):
        matched_scores(labels, [np.full(labels.shape, 255)], ignore_index=255)


# ---------------------------------------------------------------------------------------------
# confusion protocols


def test_hungarian_and_class_scores_by_hand():
    # classes x clusters (5, 7), summed over two images:
    #   image 1: gt [0 0 1 1], pred [5 5 7 7]; image 2: gt [0 1 1 1], pred [7 7 5 5]
    table = np.array([[2, 1],   # class 0: 2 px in cluster 5, 1 in cluster 7
                      [2, 3]])  # class 1
    mapping = hungarian_mapping(table)  # 5->0, 7->1 keeps 2 + 3 = 5 px (the other way: 3)
    np.testing.assert_array_equal(mapping, [0, 1])
    m = collapse(table, mapping)
    s = class_scores(m, ["a", "b"])
    # IoU(a) = 2 / (3 + 4 - 2) = 2/5, IoU(b) = 3 / (5 + 4 - 3) = 1/2
    assert s["per_class_iou"] == pytest.approx({"a": 0.4, "b": 0.5})
    assert s["miou"] == pytest.approx(0.45) and s["pixel_accuracy"] == pytest.approx(5 / 8)
    # three clusters, two classes: one-to-one leaves one cluster unmapped (its pixels wrong),
    # many-to-one gives every cluster its majority class
    table3 = np.array([[4, 0, 3],
                       [0, 5, 1]])
    np.testing.assert_array_equal(hungarian_mapping(table3), [0, 1, -1])
    np.testing.assert_array_equal(hungarian_mapping(table3, many_to_one=True), [0, 1, 0])
    assert class_scores(collapse(table3, hungarian_mapping(table3)))["pixel_accuracy"] == \
        pytest.approx(9 / 13)
    assert class_scores(collapse(table3, [0, 1, 0]))["pixel_accuracy"] == pytest.approx(12 / 13)


def test_semantic_scores_by_hand():
    # true x predicted for gt [0 0 1 1 2 2], pred [0 1 1 1 2 0] (void pixels dropped)
    m = np.array([[1, 1, 0],
                  [0, 2, 0],
                  [1, 0, 1]])
    s = class_scores(m)
    # IoU: 1/(2+2-1), 2/(2+3-2), 1/(2+1-1) = 1/3, 2/3, 1/2
    assert list(s["per_class_iou"].values()) == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert s["miou"] == pytest.approx(0.5) and s["pixel_accuracy"] == pytest.approx(4 / 6)
    assert s["mean_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert s["fw_iou"] == pytest.approx(0.5)
    # a class neither present nor predicted is undefined, not 0
    s2 = class_scores(np.array([[3, 0], [0, 0]]))
    assert s2["per_class_iou"]["1"] is None and s2["miou"] == 1.0


# ---------------------------------------------------------------------------------------------
# end to end on a small masks dataset


def _masks_dataset(tmp_path, n=4, void=False):
    images, masks = tmp_path / "images", tmp_path / "masks"
    gts = {}
    for k in range(n):
        image, labels = make_shapes_image((40, 56), n_shapes=3, seed=10 + k)
        labels = labels.astype(np.int32)
        if void:
            labels[:4] = 255
        write_image(images / f"im{k}.png", image)
        write_label_map(masks / f"im{k}.png", labels)
        gts[f"im{k}"] = labels
    return f"masks:{images}:{masks}", gts


def _write_preds(folder, preds):
    for i, labels in preds.items():
        write_label_map(folder / f"{i}.png", labels)


def test_evaluate_semantic_end_to_end(tmp_path):
    spec, gts = _masks_dataset(tmp_path, void=True)
    ds = open_dataset(spec, ignore_index=255)
    pred_dir = tmp_path / "pred"
    _write_preds(pred_dir, {i: np.where(g == 255, 0, g) for i, g in gts.items()})
    metrics = evaluate("semantic", pred_dir, ds, tmp_path / "out", n_jobs=1, progress=False)
    assert metrics["miou"] == 1.0 and metrics["pixel_accuracy"] == 1.0
    payload = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(payload["per_class_iou"]) == {str(c) for c in np.unique(list(gts.values()))
                                              if c != 255}
    # a wrong class on a third of the pixels of one image lowers the scores
    bad = {i: np.where(g == 255, 0, g) for i, g in gts.items()}
    bad["im0"][:12] = 1
    _write_preds(pred_dir, bad)
    worse = evaluate("semantic", pred_dir, ds, tmp_path / "out2", n_jobs=2, progress=False)
    assert worse["miou"] < 1.0 and worse["pixel_accuracy"] < 1.0
    with open(tmp_path / "out2" / "per_image.csv") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    assert float(rows["im0"]["miou"]) < 1.0 == float(rows["im1"]["miou"])


def test_evaluate_hungarian_is_permutation_invariant(tmp_path):
    spec, gts = _masks_dataset(tmp_path)
    ds = open_dataset(spec)
    perm = np.array([11, 4, 7, 2, 9, 0, 1, 3, 5, 6, 8, 10])
    pred_dir = tmp_path / "pred"
    _write_preds(pred_dir, {i: perm[g] for i, g in gts.items()})
    m = evaluate("hungarian", pred_dir, ds, tmp_path / "out", n_jobs=2, progress=False)
    assert m["miou"] == 1.0 and m["pixel_accuracy"] == 1.0
    payload = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert payload["cluster_to_class"][str(perm[1])] == "1"
    # matched is per image and also label-permutation invariant
    m2 = evaluate("matched", pred_dir, ds, tmp_path / "out_m", n_jobs=1, progress=False)
    assert m2["miou.all"] == 1.0 and m2["ap50"] == 1.0


def test_evaluate_hungarian_many_to_one(tmp_path):
    spec, gts = _masks_dataset(tmp_path, n=2)
    ds = open_dataset(spec)
    pred_dir = tmp_path / "pred"
    # over-segment: every class split into a left and a right cluster
    preds = {}
    for i, g in gts.items():
        p = g * 2
        p[:, 28:] += 1
        preds[i] = p
    _write_preds(pred_dir, preds)
    one = evaluate("hungarian", pred_dir, ds, tmp_path / "a", n_jobs=1, progress=False)
    many = evaluate("hungarian", pred_dir, ds, tmp_path / "b", many_to_one=True, n_jobs=1,
                    progress=False)
    assert many["pixel_accuracy"] == 1.0 and one["pixel_accuracy"] < 1.0


def test_evaluate_bsds_on_lab_hierarchy(tmp_path):
    from skimage.segmentation import felzenszwalb

    from unsup.hierarchy import UltrametricHierarchy, ultrametric_contour_map

    spec, gts = _masks_dataset(tmp_path, n=2)
    ds = open_dataset(spec)
    folder = tmp_path / "hier" / "hierarchy"
    folder.mkdir(parents=True)
    (folder / HIERARCHY_MARKER).write_text(json.dumps(HIERARCHY_FORMAT))
    for record in ds.records:
        image = ds.load(record).image
        ucm = ultrametric_contour_map(image, felzenszwalb(image, scale=20, min_size=8))
        Image.fromarray(ucm.astype(np.uint16)).save(folder / f"{record.id}.png")
    assert detect_pred_type(folder) == "hierarchy"
    pred = read_prediction(folder, ds.records[0].id)
    assert pred.kind == "hierarchy" and pred.data.dtype == np.uint16
    from unsup.evaluation.bsds import prediction_sweep

    sweep = prediction_sweep(pred, 9)  # regions are the hierarchy module's cut
    np.testing.assert_array_equal(sweep.regions(4), UltrametricHierarchy(pred.data).cut(0.5))
    m = evaluate("bsds", folder, ds, tmp_path / "out", thresholds=9, n_jobs=2, progress=False)
    assert 0 < m["boundary.ods_f"] <= 1 and 0 < m["covering.ods"] <= 1
    assert m["voi.ods"] >= 0 and 0 < m["pri.ods"] <= 1


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_missing_prediction_names_id_and_folder(tmp_path):
    spec, gts = _masks_dataset(tmp_path, n=3)
    pred_dir = tmp_path / "pred"
    _write_preds(pred_dir, {"im0": gts["im0"], "im2": gts["im2"]})
    with pytest.raises(PredictionError, match=r"pred.*'im1'"):
        evaluate("matched", pred_dir, open_dataset(spec), tmp_path / "out", progress=False)
    with pytest.raises(PredictionError, match="does not exist"):
        evaluate("matched", tmp_path / "nowhere", open_dataset(spec), tmp_path / "o",
                 progress=False)


def test_size_mismatch_is_reported(tmp_path):
    spec, gts = _masks_dataset(tmp_path, n=2)
    pred_dir = tmp_path / "pred"
    _write_preds(pred_dir, {"im0": gts["im0"], "im1": gts["im1"][:, :50]})
    with pytest.raises(PredictionError, match=r"im1\.png.*\(40, 50\).*\(40, 56\)"):
        evaluate("semantic", pred_dir, open_dataset(spec), tmp_path / "out", n_jobs=1,
                 progress=False)


def test_bad_arguments_and_formats(tmp_path):
    spec, gts = _masks_dataset(tmp_path, n=1)
    ds = open_dataset(spec)
    pred_dir = tmp_path / "pred"
    _write_preds(pred_dir, gts)
    with pytest.raises(EvaluationError, match="protocol"):
        evaluate("nope", pred_dir, ds, tmp_path / "o")
    with pytest.raises(EvaluationError, match="pred_type"):
        evaluate("bsds", pred_dir, ds, tmp_path / "o", pred_type="ucm")
    with pytest.raises(EvaluationError, match="needs label maps"):
        evaluate("matched", pred_dir, ds, tmp_path / "o", pred_type="boundaries")
    # no ground truth
    with pytest.raises(EvaluationError, match="no ground truth"):
        evaluate("matched", pred_dir, open_dataset(tmp_path / "images"), tmp_path / "o")
    # hierarchy folder with an 8-bit map, and a wrong marker
    (pred_dir / HIERARCHY_MARKER).write_text(json.dumps(HIERARCHY_FORMAT))
    with pytest.raises(PredictionError, match="16-bit"):
        read_prediction(pred_dir, "im0")
    (pred_dir / HIERARCHY_MARKER).write_text('{"format": "other"}')
    with pytest.raises(PredictionError, match="unsup-ucm"):
        detect_pred_type(pred_dir)


def test_empty_ground_truth_is_an_error(tmp_path):
    from unsup.evaluation.bsds import evaluate_bsds_image
    from unsup.evaluation.predictions import Prediction

    with pytest.raises(ValueError, match="empty ground truth"):
        evaluate_bsds_image(Prediction("segs", [np.zeros((4, 4), int)], "x"), [], sample_id="x")


# ---------------------------------------------------------------------------------------------
# CLI glue


def _parse(argv):
    return build_parser().parse_args(["evaluate", *argv])


def run(args) -> int:
    return args.func(args)


def test_cli_run(tmp_path, capsys):
    spec, gts = _masks_dataset(tmp_path, n=2)
    pred_dir = tmp_path / "pred"
    _write_preds(pred_dir, gts)
    args = _parse(["--protocol", "matched", "--pred", str(pred_dir), "--gt", spec,
                   "--out", str(tmp_path / "rep"), "--jobs", "1", "--no-progress"])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "miou.all" in out and "1.0000" in out
    assert (tmp_path / "rep" / "report.html").exists()
    # a missing prediction: exit code 2 and a message naming the sample
    (pred_dir / "im1.png").unlink()
    assert run(args) == 2
    assert "im1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--protocol", "bsds", "--pred", "x", "--gt", "y", "--out", "z",
                "--thresholds", "0"])
