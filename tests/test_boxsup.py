"""Box-supervised training (methods.boxsup, unsup.proposals) and `unsup train`: mined masks
beat filled boxes, the mask composition rules of both selection rules, the network term of
the paper's selection cost, the tightness prior, resume, the time budget, and that masks never
reach a box-supervised method."""

import json
import time

import numpy as np
import pytest
import torch

from methods.boxsup import (
    BOX_CODE_BASE,
    OVERRIDE_MAX_FLIPS,
    BoxSup,
    boxi_mask,
    encode_box_targets,
    ignore_untight,
    mine_masks,
    scale_boxes,
    tightness_loss,
)
from unsup.augment import resize_labels
from unsup.base import RunOptions
from unsup.datasets import Box, boxes_from_masks, open_dataset
from unsup.io import read_label_map, write_image, write_label_map
from unsup.nn.losses import IGNORE
from unsup.proposals import box_candidates, box_iou_scores
from unsup.registry import create_method
from unsup.synthetic import make_shapes_dataset, make_shapes_image

TINY = dict(network__decoder="fcn", max_side=48, augment__crop_size=48,
            network__batch_size=4, network__lr=3e-3, flip_test=False)


def boxsup(**params) -> BoxSup:
    return create_method("boxsup", **params)




def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def filled_boxes(shape, boxes):
    out = np.zeros(shape, np.int32)
    for b in sorted(boxes, key=lambda b: -b.area):
        x0, y0, x1, y1 = b.as_int()
        out[y0:y1, x0:x1] = b.label
    return out


def test_round0_masks_are_far_better_than_filled_boxes():
    mined_iou, box_iou = [], []
    for seed in range(6):
        image, truth = make_shapes_image((72, 96), n_shapes=2, noise=8, seed=seed)
        boxes = boxes_from_masks(truth)
        sb = scale_boxes(boxes, truth.shape, truth.shape)
        cands = [box_candidates(image, tuple(b[:4]), seed=0) for b in sb]
        mined, choices = mine_masks(truth.shape, sb, cands, selection="cost")
        assert len(choices) == len(boxes)
        filled = filled_boxes(truth.shape, boxes)
        for c in np.unique(truth)[1:]:
            known = mined != IGNORE
            mined_iou.append(iou((mined == c) & known, (truth == c) & known))
            box_iou.append(iou(filled == c, truth == c))
    assert np.mean(mined_iou) > 0.9
    assert np.mean(mined_iou) > np.mean(box_iou) + 0.1


def test_candidates_extend_beyond_box_and_iou_is_exact():
    image, truth = make_shapes_image((60, 80), n_shapes=1, noise=4, seed=3)
    (box,) = boxes_from_masks(truth)
    x0, y0, x1, y1 = box.as_int()
    cands = box_candidates(image, (y0, y1, x0, x1), context=0.5)
    wy0, wy1, wx0, wx1 = cands.window
    assert wy0 <= y0 and wy1 >= y1 and wx0 <= x0 and wx1 >= x1
    assert cands.masks.shape[1:] == (wy1 - wy0, wx1 - wx0)
    assert len(cands.names) == cands.masks.shape[0] >= 1
    packed = {np.packbits(m).tobytes() for m in cands.masks}
    assert len(packed) == len(cands.names)  # duplicates are dropped
    scores = box_iou_scores(cands)
    inb = cands.box_mask
    for m, s in zip(cands.masks, scores, strict=True):
        assert s == pytest.approx((m & inb).sum() / (m | inb).sum())
    with pytest.raises(ValueError, match="outside"):
        box_candidates(image, (0, 70, 0, 10))


class _Cands:
    """Hand-made candidates over a window equal to the box."""

    def __init__(self, box_shape, masks, names):
        from unsup.proposals import BoxCandidates

        h, w = box_shape
        self.c = BoxCandidates(window=(0, h, 0, w), box=(0, h, 0, w),
                               masks=np.stack(masks), names=names)


def _collect_ious(mined, truth, boxes, mined_ious, box_ious):
    """Append, per object class of ``truth``, the IoU of the mined mask (ignored pixels left
    out) and of the filled boxes."""
    mined = resize_labels(mined, truth.shape)
    filled = filled_boxes(truth.shape, boxes)
    for c in np.unique(truth)[1:]:
        known = mined != IGNORE
        mined_ious.append(iou((mined == c) & known, (truth == c) & known))
        box_ious.append(iou(filled == c, truth == c))


def _placed(shape, box, masks, names):
    from unsup.proposals import BoxCandidates

    y0, y1, x0, x1 = box
    return BoxCandidates(window=(y0, y1, x0, x1), box=(0, y1 - y0, 0, x1 - x0),
                         masks=np.stack(masks), names=names)


def test_composition_overlap_ignore_boxes_and_fallback():
    shape = (40, 40)
    big = [0, 30, 0, 30, 1, 0]
    small = [10, 20, 10, 20, 2, 0]
    crowd = [32, 40, 32, 40, 3, 1]
    full_big = np.ones((30, 30), bool)
    full_small = np.ones((10, 10), bool)
    cands = [_placed(shape, big[:4], [full_big], ["a"]),
             _placed(shape, small[:4], [full_small], ["b"]), None]
    labels, choices = mine_masks(shape, [big, small, crowd], cands, selection="cost")
    assert (labels[10:20, 10:20] == 2).all()  # the smaller box is on top
    assert (labels[0:10, 0:30] == 1).all()
    assert (labels[32:40, 32:40] == IGNORE).all()  # crowd box: void
    assert (labels[30:32, :] == 0).all() and (labels[:, 30:32] == 0).all()  # outside: bg
    assert choices[2] == {}
    # order of the boxes in the list does not matter
    labels2, _ = mine_masks(shape, [small, big, crowd], [cands[1], cands[0], None],
                            selection="cost")
    np.testing.assert_array_equal(labels, labels2)
    # a chosen mask covering too little of its box falls back to Box^i
    tiny = np.zeros((30, 30), bool)
    tiny[0, 0:3] = True
    labels3, choices3 = mine_masks(shape, [big], [_placed(shape, big[:4], [tiny], ["t"])],
                                   min_fill=0.05, selection="cost")
    assert choices3[0]["kind"] == "box_i"
    inner = boxi_mask((30, 30))
    assert ((labels3[:30, :30] == 1) == (inner == 1)).all()
    assert ((labels3[:30, :30] == IGNORE) == (inner == IGNORE)).all()
    assert (inner == 1).mean() == pytest.approx(0.2, abs=0.03)


def _rect(shape, y0, y1, x0, x1):
    """A boolean mask of ``shape`` that is True on the rectangle [y0:y1, x0:x1]."""
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_cost_rule_ignores_disagreement_of_two_cheapest():
    shape = (20, 20)
    box = [0, 20, 0, 20, 1, 0]
    a = _rect((20, 20), 2, 18, 2, 18)
    b = _rect((20, 20), 4, 16, 4, 16)
    labels, _ = mine_masks(shape, [box], [_placed(shape, box[:4], [a, b], ["a", "b"])],
                           selection="cost")
    assert (labels[4:16, 4:16] == 1).all()  # both agree: object
    assert (labels[a & ~b] == IGNORE).all()  # they disagree: ignored
    assert (labels[~a] == 0).all()


def test_network_term_overrides_box_overlap():
    shape = (20, 20)
    box = [0, 20, 0, 20, 1, 0]
    loose = np.ones((20, 20), bool)
    loose[:2] = False  # IoU 0.9 with the box
    tight = np.zeros((20, 20), bool)
    tight[5:15, 5:15] = True  # IoU 0.25
    cands = [_placed(shape, box[:4], [loose, tight], ["loose", "tight"])]
    _, c0 = mine_masks(shape, [box], cands, selection="cost")
    assert c0[0]["kind"] == "loose"  # round 0: highest IoU with the box
    probs = np.zeros((2, 20, 20), np.float32)
    probs[1] = np.where(tight, 0.95, 0.05)
    probs[0] = 1 - probs[1]
    _, c1 = mine_masks(shape, [box], cands, probs=probs, selection="cost")
    assert c1[0]["kind"] == "tight"  # the network agrees with the tight candidate


def test_scale_boxes_keeps_pixels():
    boxes = [Box(10.2, 5.0, 50.7, 40.0, 1), Box(0, 0, 0.5, 0.5, 2, ignore=True)]
    out = scale_boxes(boxes, (100, 200), (50, 100))
    assert out[0] == [2, 20, 5, 26, 1, 0]
    assert out[1][:4] == [0, 1, 0, 1] and out[1][5] == 1


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("boxsup") / "shapes"
    return make_shapes_dataset(root, 6, shape=(48, 64), n_shapes=2, noise=6, seed=0)


def _dataset(root):
    return open_dataset(f"masks:{root}/images:{root}/masks", boxes_from_masks=True)


def test_short_training_run_mines_masks_better_than_boxes(shapes_root, tmp_path):
    full = _dataset(shapes_root)
    # the BoxSup paper's training (the tightness prior has its own test below)
    method = boxsup(rounds=2, network__epochs=2, tightness_weight=0.0, tightness_ignore=False,
                    network_override=None, **TINY)
    method.fit(full.boxes_only(), run=RunOptions(out_dir=tmp_path))
    for r in (0, 1):
        folder = tmp_path / "mined" / f"round_{r}"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["with_network"] == (r == 1) and summary["images"] == 6
        assert (folder / "overlays").is_dir() and json.loads((folder / "choices.json")
                                                             .read_text())
    m_iou, b_iou = [], []
    for sample in full:
        truth = sample.label_map
        mined = read_label_map(tmp_path / "mined" / "round_1" / "labels" / f"{sample.id}.png")
        _collect_ious(mined, truth, sample.boxes, m_iou, b_iou)
    assert np.mean(m_iou) > np.mean(b_iou) + 0.1
    history = json.loads((tmp_path / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert "val_mined_changed" in history["epochs"][0]  # mining stats of round 1
    seg = method.predict(full.load(0).image)
    assert seg.labels.shape == full.load(0).image.shape[:2]
    assert seg.scores.shape[0] == 3
    method.save(tmp_path / "model")
    from unsup.registry import load_method

    again = load_method(tmp_path / "model")
    np.testing.assert_allclose(again.predict(full.load(0).image).scores, seg.scores,
                               atol=1e-6)


def test_resume_continues_the_same_run(shapes_root, tmp_path):
    ds = _dataset(shapes_root).boxes_only()
    opts = dict(rounds=2, network__epochs=2, **TINY)
    a = boxsup(**opts).fit(ds, run=RunOptions(out_dir=tmp_path / "a"))
    b = boxsup(**opts)
    b.fit(ds, run=RunOptions(out_dir=tmp_path / "b", max_minutes=0.001))  # stops after its first step
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    assert hb["stopped"] == "time_budget" and len(hb["epochs"]) < 2
    b2 = boxsup(**opts).fit(ds, run=RunOptions(out_dir=tmp_path / "b", resume=True))
    for sample_id in ds.ids:  # so the round-1 masks come from the same weights
        np.testing.assert_array_equal(
            read_label_map(tmp_path / "a" / "mined" / "round_1" / "labels" / f"{sample_id}.png"),
            read_label_map(tmp_path / "b" / "mined" / "round_1" / "labels" / f"{sample_id}.png"))
    for (name, pa), (_, pb) in zip(a.network_.state_dict().items(),
                                   b2.network_.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [e["loss"] for e in ha["epochs"]] == [e["loss"] for e in hb["epochs"]]


def _flat_masks_copy(root, dest):
    """Same images, masks replaced by their filled boxes (same boxes, other masks)."""
    ds = open_dataset(f"masks:{root}/images:{root}/masks")
    for sample in ds:
        write_image(dest / "images" / f"{sample.id}.png", sample.image)
        boxes = boxes_from_masks(sample.label_map)
        write_label_map(dest / "masks" / f"{sample.id}.png",
                        filled_boxes(sample.label_map.shape, boxes))
    return dest


def test_boxsup_result_does_not_depend_on_masks(tmp_path):
    # one shape per image: the filled-box masks give exactly the same boxes
    root = make_shapes_dataset(tmp_path / "one", 4, shape=(48, 64), n_shapes=1, seed=3)
    other = _flat_masks_copy(root, tmp_path / "flat")
    a_ds, b_ds = _dataset(root), _dataset(other)
    differs = []
    for sa, sb in zip(a_ds, b_ds, strict=True):
        assert sa.boxes == sb.boxes
        differs.append(not np.array_equal(sa.label_map, sb.label_map))
    assert sum(differs) >= 2  # ellipses differ from their filled boxes
    kw = dict(rounds=2, network__epochs=2, **TINY)
    a = boxsup(**kw).fit(a_ds.boxes_only(), run=RunOptions(out_dir=tmp_path / "ra"))
    b = boxsup(**kw).fit(b_ds.boxes_only(), run=RunOptions(out_dir=tmp_path / "rb"))
    for sample in a_ds:
        for r in (0, 1):
            la = read_label_map(tmp_path / "ra" / "mined" / f"round_{r}" / "labels" /
                                f"{sample.id}.png")
            lb = read_label_map(tmp_path / "rb" / "mined" / f"round_{r}" / "labels" /
                                f"{sample.id}.png")
            np.testing.assert_array_equal(la, lb)
    for pa, pb in zip(a.network_.parameters(), b.network_.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_unsup_train_never_gives_masks_to_boxsup(shapes_root, tmp_path, monkeypatch):
    from unsup.cli import main

    seen = []
    original = BoxSup.fit

    def spy(self, samples, *, val_samples=None, run=None, progress=False):
        for s in samples:
            seen.append((s.ground_truth, s.boundaries, s.boxes))
        return original(self, samples, val_samples=val_samples, run=run, progress=progress)

    monkeypatch.setattr(BoxSup, "fit", spy)
    out = tmp_path / "model"
    args = ["train", "--method", "boxsup", "--data",
            f"masks:{shapes_root}/images:{shapes_root}/masks", "--boxes-from-masks",
            "--out", str(out), "--epochs", "1", "--no-progress", "-p", "rounds=1"]
    args += [x for k, v in TINY.items() for x in ("-p", f"{k}={v}")]
    assert main(args) == 0
    assert len(seen) == 6
    assert all(gt is None and bnd is None for gt, bnd, _ in seen)
    assert all(boxes for _, _, boxes in seen)
    record = json.loads((out / "train.json").read_text())
    assert record["boxes_from_masks"] and record["method"] == "boxsup"
    assert (out / "model.json").is_file() and (out / "checkpoint.pt").is_file()
    assert (out / "mined" / "round_0" / "summary.json").is_file()


def test_unsup_train_max_minutes_stops_in_time(shapes_root, tmp_path):
    from unsup.cli import main
    from unsup.registry import load_method

    out = tmp_path / "model"
    args = ["train", "--method", "supervised", "--data",
            f"masks:{shapes_root}/images:{shapes_root}/masks", "--out", str(out),
            "--epochs", "500", "--max-minutes", "0.05", "--no-progress", "-p", "network__batch_size=2"]
    args += [x for k, v in TINY.items() if k != "network__batch_size"
             for x in ("-p", f"{k}={v}")]
    t0 = time.monotonic()
    assert main(args) == 0
    elapsed = time.monotonic() - t0
    history = json.loads((out / "history.json").read_text())
    assert history["stopped"] == "time_budget"
    assert history["train_seconds"] < 3 + 10  # 3 s budget, one step and saving
    assert elapsed < 60
    model = load_method(out)
    sample = open_dataset(f"masks:{shapes_root}/images:{shapes_root}/masks").load(0)
    assert model.predict(sample.image).labels.shape == sample.image.shape[:2]
    from unsup.nn.loop import load_checkpoint

    before = load_checkpoint(out / "checkpoint.pt")
    stale = out / ".checkpoint.pt.k1ll3d.tmp"  # what a kill -9 during a save leaves
    stale.write_bytes(b"\0" * 1024)
    assert main(args + ["--resume"]) == 0  # continues where the budget stopped it
    after = load_checkpoint(out / "checkpoint.pt")
    assert (after["epoch"], after["step"]) > (before["epoch"], before["step"])
    assert not stale.exists()


def test_resume_with_other_settings_names_the_difference(shapes_root, tmp_path, capsys):
    from unsup.cli import main

    out = tmp_path / "model"
    args = ["train", "--method", "supervised", "--data",
            f"masks:{shapes_root}/images:{shapes_root}/masks", "--out", str(out),
            "--epochs", "500", "--max-minutes", "0.02", "--no-progress"]
    args += [x for k, v in TINY.items() for x in ("-p", f"{k}={v}")]
    assert main(args) == 0
    capsys.readouterr()
    other = [a if a != "network__decoder=fcn" else "network__decoder=unet" for a in args]
    assert main(other + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "params.network.decoder: 'fcn' before, 'unet' now" in err and "Traceback" not in err
    boxes = ["train", "--method", "boxsup", "--boxes-from-masks", "-p", "rounds=1",
             *args[3:]]
    assert main(boxes + ["--resume"]) == 2
    assert "method: 'supervised' before, 'boxsup' now" in capsys.readouterr().err


def test_unsup_train_errors(shapes_root, tmp_path, capsys):
    from unsup.cli import main

    data = f"masks:{shapes_root}/images:{shapes_root}/masks"
    assert main(["train", "--method", "boxsup", "--data", data, "--out",
                 str(tmp_path / "m")]) == 2
    assert "--boxes-from-masks" in capsys.readouterr().err
    assert main(["train", "--method", "felzenszwalb", "--data", data, "--out",
                 str(tmp_path / "m")]) == 2
    assert "does not learn" in capsys.readouterr().err
    assert main(["train", "--method", "supervised", "--data", data, "--out",
                 str(tmp_path / "m"), "-p", "nope=1"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["train", "--method", "supervised", "--data", data, "--out",
                 str(tmp_path / "m"), "--resume"]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_consensus_selection_keeps_agreement_and_ignores_the_rest():
    from methods.boxsup import consensus_patch

    shape = (20, 20)
    box = [0, 20, 0, 20, 1, 0]
    a = _rect((20, 20), 2, 18, 2, 18)
    b = _rect((20, 20), 4, 16, 4, 16)
    c = _rect((20, 20), 4, 16, 2, 10)
    cands = [_placed(shape, box[:4], [a, b, c], ["a", "b", "c"])]
    labels, choices = mine_masks(shape, [box], cands, selection="consensus")
    every, some = a & b & c, a | b | c
    assert (labels[every] == 1).all() and (labels[~some] == 0).all()
    assert (labels[some & ~every] == IGNORE).all()
    assert choices[0]["kind"] == "consensus" and choices[0]["n_candidates"] == 3
    assert choices[0]["fill"] == pytest.approx(every.mean())
    # a 2-of-3 majority: object where at least 2/3 agree, background where at most 1/3 do
    votes = consensus_patch(cands[0], agreement=(1 / 3, 2 / 3))
    count = a.astype(int) + b + c
    np.testing.assert_array_equal(votes == 1, count >= 2)
    np.testing.assert_array_equal(votes == 0, count <= 1)
    # without network_fill / network_override the network probabilities do not change it
    probs = np.stack([np.ones(shape), np.zeros(shape)]).astype(np.float32)
    labels2, _ = mine_masks(shape, [box], cands, probs=probs, selection="consensus",
                            network_fill=None, network_override=None)
    np.testing.assert_array_equal(labels, labels2)
    # a consensus covering too little of the box falls back to Box^i
    disjoint = [_placed(shape, box[:4], [a & ~b, b], ["x", "y"])]
    _, c3 = mine_masks(shape, [box], disjoint, selection="consensus")
    assert c3[0]["kind"] == "box_i"
    with pytest.raises(ValueError, match="selection"):
        mine_masks(shape, [box], cands, selection="vote")
    with pytest.raises(ValueError, match="agreement"):
        mine_masks(shape, [box], cands, selection="consensus", agreement=(0.6, 0.4))


def _nested_candidates():
    """One 20 x 20 box with two nested candidates: the consensus is object in the inner
    square, background outside the outer one, undecided in between."""
    shape = (20, 20)
    box = [0, 20, 0, 20, 1, 0]
    a = np.zeros((20, 20), bool)
    a[2:18, 2:18] = True
    b = np.zeros((20, 20), bool)
    b[6:14, 6:14] = True
    cands = [_placed(shape, box[:4], [a, b], ["a", "b"])]
    base, _ = mine_masks(shape, [box], cands, selection="consensus")
    return shape, box, cands, base


def test_consensus_network_fill_decides_only_undecided_pixels():
    shape, box, cands, base = _nested_candidates()
    probs = np.zeros((2, 20, 20), np.float32)
    probs[1, :, :10] = 0.95  # sure of the object on the left half, of background on the right
    probs[0] = 1 - probs[1]
    labels, _ = mine_masks(shape, [box], cands, probs=probs, selection="consensus",
                           network_fill=0.9, network_override=None)
    undecided = base == IGNORE
    np.testing.assert_array_equal(labels[~undecided], base[~undecided])  # agreement kept
    assert (labels[undecided & (probs[1] >= 0.9)] == 1).all()
    assert (labels[undecided & (probs[0] >= 0.9)] == 0).all()
    # an unsure network leaves them ignored
    probs[:] = 0.5
    labels2, _ = mine_masks(shape, [box], cands, probs=probs, selection="consensus",
                            network_fill=0.9, network_override=None)
    np.testing.assert_array_equal(labels2, base)


def test_consensus_network_override_flips_only_agreed_pixels_the_network_is_sure_of():
    shape, box, cands, base = _nested_candidates()
    agreed = base != IGNORE
    assert (base[0:12, 0] == 0).all() and (base[6, 6:14] == 1).all()
    probs = np.full((2, 20, 20), 0.5, np.float32)
    probs[1, 0:12, 0] = 0.97  # sure of the object on a strip the candidates call background
    probs[0, 0:12, 0] = 0.03
    probs[0, 6, 6:14] = 0.97  # sure of background on a row they call object
    probs[1, 6, 6:14] = 0.03
    labels, _ = mine_masks(shape, [box], cands, probs=probs, selection="consensus",
                           network_fill=None, network_override=0.95)
    flipped = np.zeros(shape, bool)
    flipped[0:12, 0] = flipped[6, 6:14] = True
    assert (labels[0:12, 0] == 1).all() and (labels[6, 6:14] == 0).all()
    np.testing.assert_array_equal(labels[~flipped], base[~flipped])  # the rest untouched
    assert flipped.sum() <= OVERRIDE_MAX_FLIPS * agreed.sum()
    # below the threshold nothing changes
    labels2, _ = mine_masks(shape, [box], cands, probs=probs, selection="consensus",
                            network_fill=None, network_override=0.99)
    np.testing.assert_array_equal(labels2, base)
    # a network that contradicts most of the agreed pixels is not trusted for the box
    _assert_box_guarded(shape, box, cands, base, network_fill=None, network_override=0.95)


def _assert_box_guarded(shape, box, cands, base, **options):
    """A network sure of the object everywhere would flip most agreed pixels of the box:
    the per-box guard keeps the candidates' labels."""
    sure = np.zeros((2, *shape), np.float32)
    sure[1] = 1.0
    labels, _ = mine_masks(shape, [box], cands, probs=sure, selection="consensus", **options)
    np.testing.assert_array_equal(labels, base)


# -- box tightness prior ------------------------------------------------------------------------

def test_ignore_untight_ignores_background_of_rows_and_columns_without_object():
    labels = np.zeros((10, 12), np.uint8)
    labels[2:6, 3:7] = 1          # object fills rows 2-5, columns 3-6 of the box ...
    box = [2, 9, 3, 10, 1, 0]     # ... but the box spans rows 2-8 and columns 3-9
    before = labels.copy()
    out = ignore_untight(labels, [box])
    np.testing.assert_array_equal(labels, before)  # input not modified
    assert (out[6:9, 3:10] == IGNORE).all()        # rows 6-8 of the box: no object
    assert (out[2:6, 7:10] == IGNORE).all()        # columns 7-9 of the box: no object
    assert (out[2:6, 3:7] == 1).all()              # the object stays
    outside = np.ones(labels.shape, bool)
    outside[2:9, 3:10] = False
    assert (out[outside] == 0).all()               # nothing changes outside the box
    # a crowd box is left alone; a tight object changes nothing
    np.testing.assert_array_equal(ignore_untight(labels, [[2, 9, 3, 10, 1, 1]]), labels)
    np.testing.assert_array_equal(ignore_untight(labels, [[2, 6, 3, 7, 1, 0]]), labels)


def test_box_codes_survive_augmentation_and_decode():
    from unsup.augment import augment_pair

    labels = np.zeros((40, 50), np.uint8)
    labels[10:20, 5:15] = 2
    labels[0:3, 0:3] = IGNORE
    boxes = [[8, 30, 4, 40, 2, 0], [12, 16, 20, 25, 1, 0], [0, 5, 45, 50, 1, 1]]
    codes = encode_box_targets(labels, boxes)
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(codes % BOX_CODE_BASE, labels)
    box_code = codes // BOX_CODE_BASE
    assert box_code[0, 49] == 0                      # crowd box: no code
    assert box_code[14, 22] == 1 + 1 + BOX_CODE_BASE * 1   # the smaller box is on top
    assert box_code[25, 30] == 1 + 2                 # box 0, class 2
    image = np.zeros((40, 50, 3), np.uint8)
    _, aug = augment_pair(image, codes, rng=np.random.default_rng(3), crop_size=32,
                          scale_range=(0.8, 1.2), color_jitter=0, ignore_index=IGNORE)
    assert set(np.unique(aug % BOX_CODE_BASE)) <= {0, 2, IGNORE}
    assert set(np.unique(aug // BOX_CODE_BASE)) <= {0, 3, 2 + BOX_CODE_BASE}


def test_tightness_loss_wants_an_object_pixel_on_every_line_of_a_box():
    h, w = 12, 12
    codes = torch.zeros(1, h, w, dtype=torch.long)
    codes[0, 3:9, 2:10] = 1 + 1  # box of class 1, fully inside the crop
    logits = torch.zeros(1, 2, h, w)
    logits[0, 0] = 5.0           # background everywhere: every line is violated
    bad = tightness_loss(logits, codes)
    good_logits = logits.clone()
    good_logits[0, 1, 3:9, 5] = 10.0   # a vertical object stroke: every row has one ...
    good_logits[0, 1, 6, 2:10] = 10.0  # ... and a horizontal one: every column has one
    good = tightness_loss(good_logits, codes)
    assert bad > 4.0 and good < 0.01
    # only the box's lines count: an object pixel outside the box does not help
    outside = logits.clone()
    outside[0, 1, 0:2, :] = 10.0
    assert torch.isclose(tightness_loss(outside, codes), bad)
    # the gradient raises the object score of the best pixel of each violated line
    x = logits.clone().requires_grad_(True)
    tightness_loss(x, codes).backward()
    assert (x.grad[0, 1, 3:9, 2:10] <= 0).all() and (x.grad[0, 1] < 0).any()
    # a box cut by the crop's edges gives no rows (left/right cut) or columns (top/bottom)
    cut = torch.zeros(1, h, w, dtype=torch.long)
    cut[0, 0:12, 0:12] = 2
    assert float(tightness_loss(logits, cut)) == 0.0
    assert float(tightness_loss(logits, torch.zeros_like(codes))) == 0.0


def test_tightness_loss_skips_speck_boxes_below_min_side():
    h, w = 12, 12
    codes = torch.zeros(1, h, w, dtype=torch.long)
    codes[0, 3:9, 2:10] = 1 + 1            # a 6 x 8 box of class 1
    codes[0, 10:11, 4:6] = 1 + 1 + BOX_CODE_BASE  # a 1 x 2 speck, box 1
    logits = torch.zeros(1, 2, h, w)
    logits[0, 0] = 5.0
    logits[0, 1, 3:9, 5] = 10.0   # the big box is satisfied on every line
    logits[0, 1, 6, 2:10] = 10.0
    with_speck = tightness_loss(logits, codes, min_side=1)
    assert with_speck > 0.5  # 3 violated speck lines (~5 each) among 17
    assert float(tightness_loss(logits, codes, min_side=2)) < 0.01
    speck_only = torch.where(codes == 1 + 1, 0, codes)
    assert float(tightness_loss(logits, speck_only, min_side=2)) == 0.0


def test_negative_tightness_weight_is_refused(shapes_root, tmp_path):
    with pytest.raises(ValueError, match="tightness_weight must be a number >= 0"):
        boxsup(network__epochs=1, tightness_weight=-0.5, **TINY).fit(
            _dataset(shapes_root).boxes_only(), run=RunOptions(out_dir=tmp_path))


@pytest.mark.parametrize("param,value", [("network_fill", 1.5), ("network_override", -0.1),
                                         ("network_override", "x"), ("tightness_min_side", 0)])
def test_out_of_range_options_are_refused(shapes_root, tmp_path, param, value):
    with pytest.raises(ValueError, match=f"{param} must be"):
        boxsup(network__epochs=1, **{param: value}, **TINY).fit(
            _dataset(shapes_root).boxes_only(), run=RunOptions(out_dir=tmp_path))


def test_rounds_share_the_epochs_evenly():
    even = BoxSup(rounds=2)
    assert [even._round_of(e, 20) for e in range(20)] == [0] * 10 + [1] * 10
    three = BoxSup(rounds=3)  # ceil(10 / 3) = 4 epochs per round, the last one gets the rest
    assert [three._round_of(e, 10) for e in range(10)] == [0] * 4 + [1] * 4 + [2] * 2


def test_short_training_run_with_tightness_prior(shapes_root, tmp_path):
    full = _dataset(shapes_root)
    method = boxsup(rounds=2, network__epochs=2, tightness_weight=1.0, tightness_ignore=True, **TINY)
    method.fit(full.boxes_only(), run=RunOptions(out_dir=tmp_path))
    history = json.loads((tmp_path / "history.json").read_text())
    assert all(e["tightness"] >= 0 for e in history["epochs"])
    m_iou, b_iou = [], []
    for sample in full:
        mined = read_label_map(tmp_path / "mined" / "round_1" / "labels" / f"{sample.id}.png")
        _collect_ious(mined, sample.label_map, sample.boxes, m_iou, b_iou)
    assert np.mean(m_iou) > np.mean(b_iou) + 0.1
    seg = method.predict(full.load(0).image)
    assert seg.labels.shape == full.load(0).image.shape[:2]
