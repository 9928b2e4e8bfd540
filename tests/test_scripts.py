"""Smoke tests of the benchmark scripts in scripts/: each runs once on tiny generated data laid
out like the dataset it expects (BSDS500, Weizmann Horse, CamVid folders) and writes results
with sane numbers. The scripts run in this process (``main(argv)``), so torch and the backbone
weights load once for the whole file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from unsup.io import write_image, write_label_map
from unsup.synthetic import make_shapes_image

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """The module of ``scripts/<name>.py``."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _in_unit_range(value) -> bool:
    return isinstance(value, int | float) and 0.0 <= value <= 1.0


@pytest.fixture(scope="module")
def bsds_root(tmp_path_factory):
    """A BSDS500-like root: ``images/val/*.jpg`` and ``groundTruth/val/*.mat`` (two
    annotators, labels from 1) of three 32 x 48 synthetic images."""
    root = tmp_path_factory.mktemp("bsds") / "bsds500"
    for split in ("val",):
        (root / "groundTruth" / split).mkdir(parents=True)
        for i in range(3):
            image, labels = make_shapes_image((32, 48), n_shapes=2, noise=6.0, seed=i)
            write_image(root / "images" / split / f"{100 + i}.jpg", image)
            cells = np.empty((1, 2), dtype=object)
            for k, seg in enumerate((labels + 1, np.where(labels > 0, 2, 1))):
                bnd = np.zeros(seg.shape, np.uint8)
                bnd[:, 1:][seg[:, 1:] != seg[:, :-1]] = 1
                bnd[1:, :][seg[1:, :] != seg[:-1, :]] = 1
                cells[0, k] = {"Segmentation": seg.astype(np.uint16), "Boundaries": bnd}
            savemat(root / "groundTruth" / split / f"{100 + i}.mat", {"groundTruth": cells})
    return root


@pytest.fixture(scope="module")
def camvid_like(tmp_path_factory):
    """CamVid-like ``images/*.jpg`` + ``masks/*.png`` with class ids and a void value 11."""
    root = tmp_path_factory.mktemp("camvid")
    for i in range(3):
        image, labels = make_shapes_image((32, 48), n_shapes=2, noise=4.0,
                                          consistent_colors=True, seed=i)
        labels = labels.astype(np.uint8)
        labels[0, :] = 11  # a void row
        write_image(root / "images" / f"f{i:03d}.jpg", image)
        write_label_map(root / "masks" / f"f{i:03d}.png", labels)
    return root


def test_bench_boxsup_horse_split_trains_both_methods(tmp_path):
    # Weizmann Horse layout: horseNNN.jpg and a 0/1 mask of the same stem
    for i in range(5):
        image, labels = make_shapes_image((40, 48), n_shapes=1, noise=6.0, seed=i)
        write_image(tmp_path / "horse" / f"horse{i:03d}.jpg", image)
        write_label_map(tmp_path / "mask" / f"horse{i:03d}.png", (labels > 0).astype(np.uint8))
    out = tmp_path / "out"
    assert _script("bench_boxsup").main([
        "horse", "--images", str(tmp_path / "horse"), "--masks", str(tmp_path / "mask"),
        "--out", str(out), "--epochs", "1", "--no-progress", "-p", "network__decoder=fcn",
        "-p", "max_side=48", "-p", "augment__crop_size=48", "-p", "network__batch_size=4",
        "-p", "boxsup.rounds=1"]) == 0
    split = json.loads((out / "data" / "split.json").read_text())
    assert (split["n_train"], split["n_test"]) == (4, 1)
    result = json.loads((out / "compare.json").read_text())
    for method in ("boxsup", "supervised"):
        assert _in_unit_range(result[method]["miou"]), method
    mined = json.loads((out / "mined_quality.json").read_text())
    assert 0.0 < mined["round_0"]["mean_fg_iou"] <= 1.0
    assert _in_unit_range(mined["round_0"]["ignored_fraction"])
    assert json.loads((out / "bench.json").read_text())["epochs"] == 1


def test_bench_crf_timing_and_accuracy(bsds_root, tmp_path):
    script = _script("bench_crf")
    rows = tmp_path / "timing.json"
    script.main(["timing", "--image", str(bsds_root / "images" / "val" / "100.jpg"),
                 "--labels", "2", "5", "--repeats", "1", "--json", str(rows)])
    timing = json.loads(rows.read_text())["rows"]
    assert [row["C"] for row in timing] == [2, 5]
    assert all(row[f"{k}_s"] > 0 for row in timing for k in ("direct_scores", "wrapper_scores"))
    out = tmp_path / "accuracy"
    script.main(["accuracy", "--dataset", f"bsds500:{bsds_root}", "--split", "val",
                 "--methods", "felzenszwalb", "--limit", "2", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 2
    assert set(summary["results"]) == {"felzenszwalb/plain", "felzenszwalb/crf-default"}
    for result in summary["results"].values():
        assert _in_unit_range(result["metrics"]["miou.all"])


def test_bench_jule_digits_bsds_and_camvid(bsds_root, camvid_like, tmp_path):
    script = _script("bench_jule")
    assert script.main(["digits", "--representations", "mlp", "--subset", "200",
                        "--iters", "2", "--out", str(tmp_path / "digits")]) == 0
    digits = json.loads((tmp_path / "digits" / "digits.json").read_text())
    assert len(digits) == 4  # Ward, eta 0.9 learn / fixed, eta 0.2 learn
    assert all(_in_unit_range(row["nmi"]) and row["nmi"] > 0.3 for row in digits)
    rows = ["jule:n_superpixels=60,n_clusters=4", "felzenszwalb"]
    assert script.main(["bsds", "--root", str(bsds_root), "--n-images", "2", "--jobs", "1",
                        "--out", str(tmp_path / "bsds"), "--rows", *rows]) == 0
    for row in ("jule_n_superpixels=60_n_clusters=4", "felzenszwalb"):
        matched = json.loads((tmp_path / "bsds" / row / "eval_matched" / "metrics.json")
                             .read_text())
        bsds = json.loads((tmp_path / "bsds" / row / "eval_bsds" / "metrics.json").read_text())
        assert matched["meta"]["n_images"] == 2 and _in_unit_range(matched["miou.all"])
        assert _in_unit_range(bsds["covering.ods"])
    camvid_rows = ["jule:scope=dataset,n_clusters=3,samples_per_image=20,n_superpixels=40",
                   "kmeans:scope=dataset,n_clusters=3,features=color"]
    assert script.main(["camvid", "--images", str(camvid_like / "images"), "--masks",
                        str(camvid_like / "masks"), "--jobs", "1",
                        "--out", str(tmp_path / "camvid"), "--rows", *camvid_rows]) == 0
    for row in ("jule_scope=dataset_n_clusters=3_samples_per_image=20_n_superpixels=40",
                "kmeans_scope=dataset_n_clusters=3_features=color"):
        metrics = json.loads((tmp_path / "camvid" / row / "eval" / "metrics.json").read_text())
        assert _in_unit_range(metrics["miou"]) and metrics["miou"] > 0.2, row


def test_bench_kanezaki_run_crf_evaluate_table(bsds_root, tmp_path, capsys):
    script = _script("bench_kanezaki")
    pred = tmp_path / "fast"
    script.main(["run", "--config", "fast", "--data", str(bsds_root), "--limit", "2",
                 "--params", '{"max_side": 48, "max_iter": 5}', "--threads", "1",
                 "--out", str(pred)])
    assert len(list((pred / "labels").glob("*.png"))) == 2
    info = json.loads(next((pred / "info").glob("*.json")).read_text())
    assert info["seconds"] > 0
    script.main(["crf", "--pred", str(pred)])
    assert len(list((pred / "crf" / "labels").glob("*.png"))) == 2
    script.main(["evaluate", "--data", str(bsds_root), "--pred", str(pred), str(pred / "crf"),
                 "--ids-from", str(pred)])
    for folder in (pred, pred / "crf"):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["n_images"] == 2
        assert _in_unit_range(metrics["metrics"]["matched"]["miou.all"])
        assert _in_unit_range(metrics["metrics"]["bsds"]["covering.ods"])
    capsys.readouterr()
    script.main(["table", "--pred", str(pred), str(pred / "crf")])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| config | images | mIoU all") and len(table) == 4


def test_bench_kmeans_run_evaluate_speed_features(camvid_like, tmp_path, capsys):
    script = _script("bench_kmeans")
    spec = f"masks:{camvid_like / 'images'}:{camvid_like / 'masks'}"
    run = tmp_path / "run"
    script.main(["run", "--data", spec, "--ignore-index", "11", "--out", str(run),
                 "--param", "scope=dataset", "--param", "n_clusters=3",
                 "--param", "features=color", "--crf"])
    assert len(list((run / "labels").glob("*.png"))) == 3
    assert len(list((run / "crf").glob("*.png"))) == 3
    assert (run / "model" / "model.json").is_file()
    script.main(["evaluate", "--data", spec, "--ignore-index", "11", "--protocol",
                 "hungarian", "--pred", str(run)])
    for sub in ("labels", "crf"):
        metrics = json.loads((run / f"eval-hungarian-{sub}" / "metrics.json").read_text())
        assert _in_unit_range(metrics["miou"]) and metrics["miou"] > 0.2, sub
    capsys.readouterr()
    script.main(["speed", "--n", "3000", "--dim", "8", "--k", "4", "--iters", "3",
                 "--sklearn-epochs", "1"])
    script.main(["features", "--images", str(camvid_like / "images"), "--limit", "1",
                 "--backbones", "efficientnet-lite0"])
    printed = capsys.readouterr().out
    assert "faiss" in printed and "efficientnet-lite0" in printed


def test_train_wnet_default_then_bench_wnet(bsds_root, tmp_path):
    model = tmp_path / "wnet"
    tiny = ["n_classes=4", "network__width=4", "network__crop_size=32", "network__batch_size=3",
            "network__epochs=2",
            "pretrained=false"]
    assert _script("train_wnet_default").main(
        ["--data", f"bsds500:{bsds_root}", "--split", "val", "--out", str(model),
         "--n-threads", "1", "--no-progress", *[x for p in tiny for x in ("--param", p)]]) == 0
    training = json.loads((model / "training.json").read_text())
    assert training["n_images"] == 3 and not training["labels_used"]
    assert len(training["invocations"]) == 1
    out = tmp_path / "bench"
    assert _script("bench_wnet").main(
        ["--bsds", str(bsds_root), "--split", "val", "--model", str(model), "--out", str(out),
         "--parts", "segment,timing", "--baselines", "", "--n-timing", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {"wnet", "wnet + hierarchy", "wnet + CRF",
                                    "wnet + CRF + hierarchy"}
    for row in results["rows"].values():
        assert _in_unit_range(row["metrics"]["covering.ods"])
    assert results["timing"]["median_seconds"]["inference"] > 0
    assert (out / "results.md").read_text().startswith("| system |")


def test_make_samples_writes_the_sample_images(tmp_path):
    _script("make_samples").main(["--out", str(tmp_path / "samples"),
                                  "--synthetic-out", str(tmp_path / "synthetic")])
    from unsup.io import read_image, read_label_map

    made = tmp_path / "samples"
    assert sorted(p.name for p in made.iterdir()) == sorted(
        p.name for p in (ROOT / "data" / "samples").iterdir())
    for name in ("shapes_0.png", "shapes_1.png"):  # the shipped synthetic samples, exactly
        np.testing.assert_array_equal(read_image(made / name),
                                      read_image(ROOT / "data" / "samples" / name))
    assert max(read_image(made / "astronaut.jpg").shape[:2]) == 320
    masks = sorted((tmp_path / "synthetic" / "masks").glob("*.png"))
    assert len(masks) == 3 and read_label_map(masks[2]).max() == 5  # 5 shapes + background
