"""Hostile but realistic inputs: outputs never read back as inputs or mistaken for another
run's, the pixel limit on every decoder, one-sentence errors for bad model folders."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unsup.cli import main
from unsup.io import MAX_PIXELS, ImageReadError, read_image, write_image
from unsup.synthetic import make_shapes_image


def _folder(tmp_path, n=3, shape=(40, 56), name="in"):
    src = tmp_path / name
    for i in range(n):
        write_image(src / f"img{i}.png", make_shapes_image(shape, n_shapes=3, seed=i)[0])
    return src


def _segment(*args):
    return main(["segment", *map(str, args), "--no-progress"])


# ------------------------------------------------------------------ outputs read back as inputs


@pytest.mark.parametrize("inside", [".", "out"])
def test_output_inside_input_is_never_read_back(tmp_path, inside):
    src = _folder(tmp_path)
    out = src if inside == "." else src / inside
    for _ in range(3):
        assert _segment(src, "--method", "kmeans-color", "--out", out) == 0
        run = json.loads((out / "run.json").read_text())
        assert run["n_images"] == 3
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["img0.png", "img1.png",
                                                                  "img2.png"]
    assert not (out / "labels" / "labels").exists()


def test_a_folder_holding_run_json_is_left_out_of_a_listing(tmp_path):
    from unsup.datasets import open_dataset

    src = _folder(tmp_path)
    old = src / "old_run"
    write_image(old / "labels" / "img0.png", np.zeros((4, 4), np.uint8))
    (old / "run.json").write_text("{}")
    with pytest.warns(UserWarning, match="left out 1 folder"):
        dataset = open_dataset(str(src))
    assert dataset.ids == ["img0", "img1", "img2"]


# ------------------------------------------------------------------ reuse of another run's outputs


def test_rerun_with_another_method_is_refused_naming_the_difference(tmp_path, capsys):
    src = _folder(tmp_path)
    out = tmp_path / "out"
    assert _segment(src, "--method", "felzenszwalb", "--out", out) == 0
    before = (out / "labels" / "img0.png").read_bytes()
    capsys.readouterr()
    assert _segment(src, "--method", "kmeans-color", "--out", out) == 2
    err = capsys.readouterr().err
    assert "unsup: error:" in err and "method" in err and "--overwrite" in err
    assert (out / "labels" / "img0.png").read_bytes() == before
    assert json.loads((out / "run.json").read_text())["method"] == "felzenszwalb"
    # other parameters or another seed are refused too; the same command resumes
    assert _segment(src, "--method", "felzenszwalb", "--out", out, "--param", "scale=50") == 2
    assert "params" in capsys.readouterr().err
    assert _segment(src, "--method", "felzenszwalb", "--out", out, "--seed", "3") == 2
    assert _segment(src, "--method", "felzenszwalb", "--out", out) == 0
    assert "0 segmented, 3 already done" in capsys.readouterr().out
    # --overwrite is the way out
    assert _segment(src, "--method", "kmeans-color", "--out", out, "--overwrite") == 0
    assert json.loads((out / "run.json").read_text())["method"] == "kmeans-color"


def test_label_maps_without_run_json_are_not_taken_as_done(tmp_path, capsys):
    src = _folder(tmp_path, n=1)
    out = tmp_path / "out"
    write_image(out / "labels" / "img0.png", np.zeros((40, 56), np.uint8))
    assert _segment(src, "--method", "kmeans-color", "--out", out) == 2
    assert "no run.json" in capsys.readouterr().err


def test_out_that_is_a_file_or_unwritable(tmp_path, capsys):
    src = _folder(tmp_path, n=1)
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert _segment(src, "--method", "kmeans-color", "--out", target) == 2
    assert "is not a folder" in capsys.readouterr().err
    # a folder that cannot be created (its parent is a file): refused before any work
    assert _segment(src, "--method", "kmeans-color", "--out", target / "sub") == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


# ------------------------------------------------------------------ decoders and the pixel limit


def _huge_tiled_tiff(path, side):
    tifffile = pytest.importorskip("tifffile")
    tile = np.zeros((256, 256, 3), np.uint8)
    n_tiles = ((side + 255) // 256) ** 2
    tifffile.imwrite(path, (tile for _ in range(n_tiles)), shape=(side, side, 3),
                     dtype=np.uint8, tile=(256, 256), compression="zlib", photometric="rgb")


def test_pixel_limit_holds_for_the_tiff_fallback(tmp_path, monkeypatch):
    import unsup.io

    path = tmp_path / "big.tif"
    _huge_tiled_tiff(path, 1024)  # 1 Mpx, above a lowered limit
    monkeypatch.setattr(unsup.io, "MAX_PIXELS", 1000 * 1000)
    with pytest.raises(ImageReadError, match="above the limit"):
        read_image(path)
    calls = []
    monkeypatch.setattr(unsup.io, "_open_checked",
                        lambda p: (_ for _ in ()).throw(ImageReadError(p, "PIL refused")))
    real_check = unsup.io._check_size
    monkeypatch.setattr(unsup.io, "_check_size", lambda *a: (calls.append(a), real_check(*a)))
    with pytest.raises(ImageReadError, match="above the limit"):
        read_image(path)  # the tifffile path checks the header size before decoding
    assert calls and calls[0][1:] == (1024, 1024)
    assert MAX_PIXELS == 200_000_000


def test_animated_gif_gives_its_first_frame_in_folder_runs_and_says_so(tmp_path):
    src = _folder(tmp_path, n=1)
    frames = [Image.fromarray(np.full((20, 30, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert read_image(src / "anim.gif")[0, 0, 0] == 10
    out = tmp_path / "out"
    assert _segment(src, "--method", "kmeans-color", "--out", out) == 0
    run = json.loads((out / "run.json").read_text())
    assert (out / "labels" / "anim.png").is_file()
    assert run["first_frame_of"] == {"anim": 2}


# ------------------------------------------------------------------ model folders


@pytest.fixture
def saved_model(tmp_path):
    from unsup.registry import create_method

    images = [make_shapes_image((32, 32), seed=i)[0] for i in range(2)]
    from unsup.datasets import Sample

    method = create_method("kmeans", scope="dataset", n_clusters=3, features="color")
    method.fit([Sample(id=str(i), image=im, path=Path(f"{i}.png"))
                for i, im in enumerate(images)])
    return method.save(tmp_path / "model"), _folder(tmp_path, n=1)


def _model_error(capsys, model, src, tmp_path):
    code = _segment(src, "--model", model, "--out", tmp_path / "o")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "weights_only=False" not in err
    return err


def test_model_json_defects_name_the_file(saved_model, tmp_path, capsys):
    model, src = saved_model
    meta_path = model / "model.json"
    meta = json.loads(meta_path.read_text())
    cases = {
        "unknown parameter": {**meta, "params": {**meta["params"], "bogus": 1}},
        "must be a JSON object": {**meta, "params": [1, 2]},
        "missing key 'method'": {k: v for k, v in meta.items() if k != "method"},
        "holds no learned state": {**meta, "has_arrays": False},
    }
    for expected, content in cases.items():
        meta_path.write_text(json.dumps(content))
        err = _model_error(capsys, model, src, tmp_path)
        assert expected in err and "model.json" in err, (expected, err)
    meta_path.write_text("{not json")
    assert "not valid JSON (line 1" in _model_error(capsys, model, src, tmp_path)


@pytest.mark.parametrize("defect", ["empty", "truncated", "pickle", "list", "wrong-shape",
                                    "missing-tensor"])
def test_weights_defects_name_the_file_and_never_suggest_unsafe_loading(tmp_path, capsys, defect):
    import pickle

    import torch

    from unsup.registry import create_method

    method = create_method("supervised", network__pretrained=False)
    method.network_ = method._build_network(2, pretrained=False)
    method.n_classes_ = 2
    model = method.save(tmp_path / "model")
    src = _folder(tmp_path, n=1)
    weights = model / "weights.pt"
    state = torch.load(weights, weights_only=True)
    if defect == "empty":
        weights.write_bytes(b"")
    elif defect == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif defect == "pickle":
        weights.write_bytes(pickle.dumps({"a": object()}))
    elif defect == "list":
        torch.save(list(state.values()), weights)
    elif defect == "wrong-shape":
        net = dict(state["network"])
        key = next(k for k, v in net.items() if v.ndim == 4)
        net[key] = torch.zeros(1, 1, 1, 1)
        torch.save({**state, "network": net}, weights)
    else:
        torch.save({**state, "network": dict(list(state["network"].items())[1:])}, weights)
    err = _model_error(capsys, model, src, tmp_path)
    assert "weights.pt" in err, err


# ------------------------------------------------------------------ annotation files


def _boxes_csv(tmp_path, rows, header="image,x0,y0,x1,y1,label"):
    path = tmp_path / "boxes.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.mark.parametrize("row, expected", [
    ("img0,1,1,10,10,-3", r"boxes.csv:2: class id -3 is outside 1..254"),
    ("img0,1,1,10,10,300", r"boxes.csv:2: class id 300 is outside 1..254"),
    ("img0,10,8", r"boxes.csv:2: missing value\(s\) for x1, y1, label"),
    ("img0,nan,1,10,10,1", r"boxes.csv:2: x0 = nan is not a finite number"),
    ("img0,1,one,10,10,1", r"boxes.csv:2: y0 = 'one' is not a number"),
])
def test_bad_csv_rows_name_file_and_line(tmp_path, row, expected):
    from unsup.datasets import DatasetError, open_dataset

    src = _folder(tmp_path, n=1)
    csv_path = _boxes_csv(tmp_path, ["img0,2,2,20,20,1", row][1:])
    with pytest.raises(DatasetError, match=expected):
        open_dataset(str(src), boxes=csv_path)


def test_csv_ids_outside_the_dataset_and_stray_class_ids_are_reported(tmp_path):
    from unsup.datasets import open_dataset

    src = _folder(tmp_path, n=2)
    csv_path = _boxes_csv(tmp_path, ["img0,2,2,20,20,1", "img1,3,3,30,30,7",
                                     "ghost,1,1,5,5,1", "phantom,1,1,5,5,1"])
    with pytest.warns(UserWarning) as caught:
        dataset = open_dataset(str(src), boxes=csv_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "2 image id(s) are not in" in messages and "ghost, phantom" in messages
    assert "not contiguous; mapped to 1..2 (7 -> 2)" in messages
    assert dataset.class_names == ["background", "1", "7"]
    assert [b.label for b in dataset.load("img1").boxes] == [2]


def _coco_json(tmp_path, data):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def _coco_data():
    return {"images": [{"id": 1, "file_name": "img0.png", "height": 40, "width": 56}],
            "categories": [{"id": 3, "name": "thing"}],
            "annotations": [{"id": 11, "image_id": 1, "category_id": 3,
                             "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0,
                             "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}]}


@pytest.mark.parametrize("defect, expected", [
    ("string bbox", r"annotation 11: bbox must be 4 finite numbers"),
    ("3-number bbox", r"annotation 11: bbox must be 4 finite numbers .* got \[2, 2, 10\]"),
    ("top-level list", r"a COCO instances json is an object .* got a list"),
    ("no categories", r"missing list 'categories'"),
    ("no bbox", r"annotation 11 has no 'bbox'"),
    ("no file_name", r"image #0 has no 'file_name'"),
    ("unknown category", r"annotation 11: unknown category_id 99"),
])
def test_bad_coco_json_names_file_and_annotation(tmp_path, defect, expected):
    from unsup.datasets import DatasetError, open_dataset

    src = _folder(tmp_path, n=1)
    data = _coco_data()
    ann = data["annotations"][0]
    if defect == "string bbox":
        ann["bbox"] = [2, "2", 10, 10]
    elif defect == "3-number bbox":
        ann["bbox"] = [2, 2, 10]
    elif defect == "top-level list":
        data = [data]
    elif defect == "no categories":
        del data["categories"]
    elif defect == "no bbox":
        del ann["bbox"]
    elif defect == "no file_name":
        del data["images"][0]["file_name"]
    else:
        ann["category_id"] = 99
    path = _coco_json(tmp_path, data)
    with pytest.raises(DatasetError, match="ann.json: " + expected):
        open_dataset(f"coco:{path}:{src}")
    with pytest.raises(DatasetError, match="ann.json: " + expected):
        open_dataset(str(src), boxes=path)


def test_ground_truth_values_outside_label_range_fail_that_item(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    from unsup.datasets import DatasetError, open_dataset

    src = _folder(tmp_path, n=2)
    masks = tmp_path / "masks"
    masks.mkdir()
    good = np.zeros((40, 56), np.int32)
    bad = good.copy()
    bad[0, 0], bad[0, 1] = -5, 70000
    tifffile.imwrite(masks / "img0.tif", good)
    tifffile.imwrite(masks / "img1.tif", bad)
    dataset = open_dataset(f"masks:{src}:{masks}")
    assert dataset.load("img0").ground_truth[0].max() == 0
    with pytest.raises(DatasetError, match=r"img1.tif: label value\(s\) -5, 70000 outside"):
        dataset.load("img1")


# ------------------------------------------------------------------ predictions


@pytest.mark.parametrize("protocol", ["matched", "semantic"])
def test_mat_prediction_with_nan_is_refused(tmp_path, capsys, protocol):
    from scipy.io import savemat

    src = _folder(tmp_path, n=1)
    masks = tmp_path / "masks"
    write_image(masks / "img0.png", (make_shapes_image((40, 56), seed=0)[1] > 0).astype(np.uint8))
    pred = tmp_path / "pred"
    pred.mkdir()
    seg = np.ones((40, 56))
    seg[3, 4] = np.nan
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = seg
    savemat(pred / "img0.mat", {"segs": cell})
    code = main(["evaluate", "--protocol", protocol, "--pred", str(pred),
                 "--gt", f"masks:{src}:{masks}", "--out", str(tmp_path / "ev"), "--jobs", "1"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "img0.mat: segs{1} holds 1 NaN or infinite label(s)" in err


# ------------------------------------------------------------------ the whole set, as a user runs it


def test_bad_input_set_through_the_cli_never_prints_a_traceback(tmp_path):
    import os
    import subprocess
    import sys

    src = _folder(tmp_path, n=2)
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    coco = _coco_json(tmp_path, [_coco_data()])
    bad_csv = _boxes_csv(tmp_path, ["img0,10,8"])
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text('{"method": "kmeans", "params": [1]}')
    pred = tmp_path / "pred"
    pred.mkdir()
    from scipy.io import savemat

    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = np.full((40, 56), np.nan)
    savemat(pred / "img0.mat", {"segs": cell})
    write_image(pred / "img1.png", np.zeros((40, 56), np.uint8))
    masks = tmp_path / "masks"
    for i in range(2):
        write_image(masks / f"img{i}.png", np.zeros((40, 56), np.uint8))
    done = tmp_path / "done"
    assert _segment(src, "--method", "felzenszwalb", "--out", done) == 0
    cases = [
        ["segment", src, "--method", "kmeans-color", "--out", not_a_folder],
        ["segment", src, "--method", "kmeans-color", "--out", done],
        ["segment", src, "--model", model, "--out", tmp_path / "o1"],
        ["segment", f"coco:{coco}:{src}", "--method", "kmeans-color", "--out", tmp_path / "o2"],
        ["train", "--method", "boxsup", "--data", src, "--boxes", bad_csv,
         "--out", tmp_path / "o3"],
        ["evaluate", "--protocol", "matched", "--pred", pred, "--gt", f"masks:{src}:{masks}",
         "--out", tmp_path / "o4", "--jobs", "1"],
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for case in cases:
        run = subprocess.run([sys.executable, "-m", "unsup", *map(str, case), "--no-progress"
                              if case[0] != "evaluate" else "--jobs=1"],
                             capture_output=True, text=True, env=env, timeout=120)
        output = run.stdout + run.stderr
        assert run.returncode in (1, 2), (case, output)
        assert "Traceback" not in output, (case, output)
        assert "error:" in output or "failed" in output, (case, output)
