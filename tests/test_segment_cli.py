"""End-to-end tests of `unsup segment`: outputs, bad inputs, resume, kill -9, determinism."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unsup.cli import main
from unsup.io import read_label_map, write_image
from unsup.synthetic import make_shapes_image


def _folder(tmp_path, n=3, shape=(48, 64)):
    src = tmp_path / "in"
    for i in range(n):
        image, _ = make_shapes_image(shape, n_shapes=3, seed=i)
        write_image(src / f"img{i}.png", image)
    return src


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_segment_writes_labels_overlays_and_run_json(tmp_path):
    src = _folder(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6
    (src / "sub").mkdir()
    Image.fromarray(make_shapes_image((30, 50), seed=9)[0]).save(src / "sub" / "rot.jpg",
                                                                 exif=exif)
    before = _digest(src)
    out = tmp_path / "out"
    code = main(["segment", str(src), "--method", "kmeans-color", "--out", str(out),
                 "--param", "n_clusters=4", "--no-progress"])
    assert code == 0
    ids = ["img0", "img1", "img2", "sub/rot"]
    for i in ids:
        labels = read_label_map(out / "labels" / f"{i}.png")
        assert (out / "overlays" / f"{i}.png").is_file()
        assert 1 <= len(np.unique(labels)) <= 4
    assert read_label_map(out / "labels" / "sub/rot.png").shape == (50, 30)  # oriented
    assert read_label_map(out / "labels" / "img0.png").shape == (48, 64)
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "kmeans-color" and run["params"]["n_clusters"] == 4
    assert run["seed"] == 0 and set(run["timings"]) == set(ids) and run["failures"] == []
    assert "torch" in run["versions"] and run["complete"] is True
    assert _digest(src) == before  # inputs untouched


def test_bad_files_are_reported_and_run_continues(tmp_path, capsys):
    src = _folder(tmp_path, n=2)
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.png").write_text("not an image")
    good = (src / "img0.png").read_bytes()
    (src / "trunc.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    code = main(["segment", str(src), "--method", "felzenszwalb", "--out", str(out),
                 "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "3 image(s) failed" in err
    for name in ("empty.jpg", "text.png", "trunc.png"):
        assert name in err
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["img0.png", "img1.png"]
    run = json.loads((out / "run.json").read_text())
    assert sorted(f["id"] for f in run["failures"]) == ["empty", "text", "trunc"]
    assert run["complete"] is False


def test_rerun_skips_finished_images_and_redoes_missing_ones(tmp_path):
    src = _folder(tmp_path, n=3)
    out = tmp_path / "out"
    args = ["segment", str(src), "--method", "felzenszwalb", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    first = {p.name: p.stat().st_mtime_ns for p in (out / "labels").iterdir()}
    (out / "labels" / "img1.png").unlink()
    (out / "labels" / ".img2.png.abc.tmp").write_bytes(b"leftover of a killed run")
    time.sleep(0.01)
    assert main(args) == 0
    second = {p.name: p.stat().st_mtime_ns for p in (out / "labels").iterdir()
              if not p.name.startswith(".")}
    assert second["img0.png"] == first["img0.png"]
    assert second["img2.png"] == first["img2.png"]
    assert (out / "labels" / "img1.png").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["done"] == 1 and run["summary"]["skipped_existing"] == 2
    assert set(run["timings"]) == {"img0", "img1", "img2"}  # earlier timings kept
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["summary"]["done"] == 3


def test_kill_9_then_rerun_completes_without_truncated_files(tmp_path):
    src = _folder(tmp_path, n=14, shape=(160, 200))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "unsup", "segment", str(src), "--method", "kmeans-color",
           "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = list((out / "labels").glob("*.png")) if (out / "labels").is_dir() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in (out / "labels").glob("*.png"))
    assert 2 <= len(finished) < 14, "the run should have been killed part-way"
    for p in (out / "labels").glob("*.png"):  # every visible output decodes completely
        assert read_label_map(p).shape == (160, 200)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "labels").glob("*.png")}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(list((out / "labels").glob("*.png"))) == 14
    for name, mtime in mtimes.items():
        assert (out / "labels" / name).stat().st_mtime_ns == mtime  # not recomputed


def test_same_seed_same_labels_in_any_order(tmp_path):
    src = _folder(tmp_path, n=2)
    for run in ("a", "b"):
        assert main(["segment", str(src), "--method", "kmeans-color", "--out",
                     str(tmp_path / run), "--seed", "3", "--no-progress"]) == 0
    single = tmp_path / "single"
    assert main(["segment", str(src / "img1.png"), "--method", "kmeans-color", "--out",
                 str(single), "--seed", "3", "--no-progress"]) == 0
    a = read_label_map(tmp_path / "a" / "labels" / "img1.png")
    np.testing.assert_array_equal(a, read_label_map(tmp_path / "b" / "labels" / "img1.png"))
    np.testing.assert_array_equal(a, read_label_map(single / "labels" / "img1.png"))


def test_cli_errors_are_clear(tmp_path, capsys):
    src = _folder(tmp_path, n=1)
    assert main(["segment", str(src), "--method", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["segment", str(src), "--method", "felzenszwalb", "--param", "bogus=1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "no parameter(s) bogus" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "missing"), "--method", "felzenszwalb",
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["segment", str(src), "--method", "felzenszwalb", "--param", "novalue",
              "--out", str(tmp_path / "o")])


def test_methods_command_lists_baselines(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "felzenszwalb" in out and "kmeans-color" in out and "n_clusters=8" in out


def test_every_subcommand_has_help(capsys):
    for command in ("segment", "train", "evaluate", "compare", "methods"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: unsup " + command in capsys.readouterr().out


def test_python_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "unsup", "methods"], capture_output=True,
                            text=True, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0 and "felzenszwalb" in result.stdout


def test_segment_hierarchy_strength_option(tmp_path):
    """--hierarchy writes one uint16 map per image; --hierarchy-strength changes the merge
    order (and is recorded in run.json); a strength that needs scores is refused up front
    for a method without them, before anything is written."""
    src = _folder(tmp_path, n=2)
    maps = {}
    for strength in ("scores", "gradient"):
        out = tmp_path / strength
        assert main(["segment", str(src), "--method", "kmeans-color", "--out", str(out),
                     "--hierarchy", "--hierarchy-strength", strength, "--no-progress"]) == 0
        run = json.loads((out / "run.json").read_text())
        assert run["hierarchy"] is True and run["hierarchy_strength"] == strength
        assert (out / "hierarchy" / "_hierarchy.json").is_file()
        maps[strength] = {p.name: np.asarray(Image.open(p)) for p in
                          sorted((out / "hierarchy").glob("*.png"))}
        assert sorted(maps[strength]) == ["img0.png", "img1.png"]
        assert all(m.dtype == np.uint16 and m.shape == (48, 64)
                   for m in maps[strength].values())
    # same leaves (the same labels), different merge levels
    for name in maps["scores"]:
        assert np.array_equal(maps["scores"][name] > 0, maps["gradient"][name] > 0)
    assert any(not np.array_equal(maps["scores"][n], maps["gradient"][n]) for n in maps["scores"])

    refused = tmp_path / "refused"
    assert main(["segment", str(src), "--method", "felzenszwalb", "--out", str(refused),
                 "--hierarchy", "--hierarchy-strength", "combined", "--no-progress"]) == 2
    assert not refused.exists()


def test_wnet_hierarchy_strength_resolves_to_combined():
    from methods.wnet import WNet
    from unsup.runner import hierarchy_strength_for

    assert hierarchy_strength_for(WNet()) == "combined"
    assert hierarchy_strength_for(WNet(), "gradient") == "gradient"
    with pytest.raises(ValueError, match="hierarchy strength"):
        hierarchy_strength_for(WNet(), "sobel")


def test_cli_hierarchy_strength_choices_match_the_hierarchy_module():
    # the parser lists them literally (so that `unsup --help` does not import scipy)
    from unsup.cli import build_parser
    from unsup.hierarchy import STRENGTHS

    segment = next(a for a in build_parser()._subparsers._group_actions[0].choices["segment"]
                   ._actions if a.dest == "hierarchy_strength")
    assert tuple(segment.choices) == STRENGTHS
