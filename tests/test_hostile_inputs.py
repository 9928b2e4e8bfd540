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

    method = create_method("supervised", pretrained=False)
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
