"""`unsup compare`: the table, compare.json keys, the report, parameter dispatch, reuse of
finished models."""

import json

import pytest

from unsup.synthetic import make_shapes_dataset

TINY = dict(network__decoder="fcn", max_side=48, augment__crop_size=48, network__batch_size=4,
            network__lr=3e-3, flip_test=False)




@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    train = make_shapes_dataset(root / "train", 6, shape=(48, 64), n_shapes=2, seed=0)
    test = make_shapes_dataset(root / "test", 3, shape=(48, 64), n_shapes=2, seed=50)
    return (f"masks:{train}/images:{train}/masks", f"masks:{test}/images:{test}/masks")


def test_compare_writes_table_json_and_report(specs, tmp_path, capsys):
    from unsup.cli import main

    out = tmp_path / "report"
    args = ["compare", "--train", specs[0], "--test", specs[1], "--methods",
            "boxsup,supervised", "--out", str(out), "--epochs", "1", "--no-progress",
            "--crf", "--overlays", "2", "-p", "boxsup.rounds=1"]
    args += [x for k, v in TINY.items() for x in ("-p", f"{k}={v}")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| boxsup | boxes |" in printed and "| supervised | masks |" in printed
    results = json.loads((out / "compare.json").read_text())
    assert set(results) == {"boxsup", "supervised"}
    for _name, entry in results.items():
        assert 0.0 <= entry["miou"] <= 1.0
        assert set(entry["per_class_iou"]) == {"0", "1", "2"}
        assert entry["train_seconds"] > 0
        assert entry["crf"] is not None and 0.0 <= entry["crf"]["miou"] <= 1.0
        assert entry["params"]["network"]["decoder"] == "fcn" and entry["params"]["seed"] == 0
    assert results["boxsup"]["ratio_to_masks"] == pytest.approx(
        results["boxsup"]["miou"] / results["supervised"]["miou"])
    assert results["boxsup"]["params"]["rounds"] == 1
    assert "derived from the training masks" in results["boxsup"]["box_source"]
    md = (out / "compare.md").read_text()
    assert "ratio to supervised" in md and "derived from the training masks" in md
    page = (out / "report.html").read_text()
    assert "per_class_iou.png" in page and page.count("<img src='overlays/") == 2
    assert (out / "curves" / "boxsup.png").is_file()
    for name in ("boxsup", "supervised", "boxsup+crf", "supervised+crf"):
        assert len(list((out / "predictions" / name / "labels").glob("*.png"))) == 3
    # a rerun reuses the finished models instead of training again
    stamp = (out / "models" / "boxsup" / "weights.pt").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "models" / "boxsup" / "weights.pt").stat().st_mtime_ns == stamp


def test_split_params_dispatch_and_errors():
    from unsup.compare import CompareError, split_params

    out = split_params({"network__lr": 0.1, "boxsup.rounds": 2,
                        "supervised.network__decoder": "unet"}, ["boxsup", "supervised"])
    assert out == {"boxsup": {"network__lr": 0.1, "rounds": 2},
                   "supervised": {"network__lr": 0.1, "network__decoder": "unet"}}
    with pytest.raises(CompareError, match="no compared method"):
        split_params({"rounds": 2}, ["supervised"])
    with pytest.raises(CompareError, match="not one of the compared"):
        split_params({"wnet.rounds": 2}, ["boxsup"])
    with pytest.raises(CompareError, match="has no parameter"):
        split_params({"supervised.rounds": 2}, ["supervised", "boxsup"])


def test_compare_errors(specs, tmp_path, capsys):
    from unsup.cli import main

    base = ["compare", "--train", specs[0], "--test", specs[1], "--out", str(tmp_path)]
    assert main(base + ["--methods", "felzenszwalb"]) == 2
    assert "does not learn" in capsys.readouterr().err
    assert main(base + ["--methods", "supervised,supervised"]) == 2
    assert "twice" in capsys.readouterr().err
    assert main(base + ["--methods", "nosuch"]) == 2
    assert "unknown method" in capsys.readouterr().err
    folder = specs[0].split(":")[1]
    assert main(["compare", "--train", folder, "--test", specs[1], "--out", str(tmp_path),
                 "--methods", "boxsup"]) == 2
    assert "neither boxes nor masks" in capsys.readouterr().err
