"""Benchmark of the `kanezaki` method: fast defaults vs the paper settings vs baselines.

Sub-commands (each one command, resumable: images whose outputs exist are skipped)::

    # 1. segment a BSDS split with a named configuration; saves labels, scores, per-image info
    python scripts/bench_kanezaki.py run --config fast --data ../shared/data/bsds500 \
        --split val --out runs/kanezaki/fast [--limit 5] [--ids 101085 101087] [--threads 1]
    # 2. dense-CRF refinement of saved labels + scores (needs unsup.crf)
    python scripts/bench_kanezaki.py crf --pred runs/kanezaki/fast
    # 3. evaluate prediction folders with the harness (protocols `matched` and `bsds`)
    python scripts/bench_kanezaki.py evaluate --data ../shared/data/bsds500 --split val \
        --pred runs/kanezaki/fast runs/kanezaki/fast/crf --ids-from runs/kanezaki/reference
    # 4. markdown table of evaluated folders (+ median seconds per image)
    python scripts/bench_kanezaki.py table --pred runs/kanezaki/fast runs/kanezaki/reference
    # timing only: median seconds per image of a configuration (records the load average)
    python scripts/bench_kanezaki.py timing --data ../shared/data/bsds500 --limit 10

Prediction folder layout: ``labels/<id>.png`` (label map), ``scores/<id>.npz`` (float16
``scores`` (C, H, W), when the method has them), ``info/<id>.json`` (method info, seconds, load
average when the image was run), ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Named configurations: (method name, parameters). "fast*" are the kanezaki defaults.
CONFIGS = {
    "fast": ("kanezaki", {}),
    "fast-superpixel": ("kanezaki", {"variant": "superpixel"}),
    "reference": ("kanezaki", "reference:superpixel"),
    "reference-continuity": ("kanezaki", "reference:continuity"),
    "kmeans-color": ("kmeans-color", {}),
    "felzenszwalb": ("felzenszwalb", {}),
}


def make_method(config: str, overrides: dict):
    from methods.kanezaki import Kanezaki
    from unsup.registry import create_method

    if config not in CONFIGS:
        raise SystemExit(f"unknown --config {config!r}; choose from {', '.join(CONFIGS)}")
    name, params = CONFIGS[config]
    if isinstance(params, str):  # "reference:<variant>"
        return Kanezaki.reference(variant=params.split(":", 1)[1], **overrides)
    return create_method(name, **{**params, **overrides})


def select_records(dataset, ids=None, limit=None, ids_from=None):
    records = list(dataset.records)
    if ids_from:
        wanted = {p.stem for p in (Path(ids_from) / "labels").glob("*.png")}
        records = [r for r in records if r.id in wanted]
    if ids:
        wanted = set(ids)
        missing = wanted - {r.id for r in records}
        if missing:
            raise SystemExit(f"--ids not in the split: {', '.join(sorted(missing))}")
        records = [r for r in records if r.id in wanted]
    if limit:
        records = records[: int(limit)]
    return records


def cmd_run(args) -> None:
    from tqdm import tqdm

    from unsup.datasets import open_dataset
    from unsup.io import write_label_map

    overrides = json.loads(args.params) if args.params else {}
    if args.threads and args.config.startswith(("fast", "reference")):
        overrides.setdefault("n_threads", args.threads)
    method = make_method(args.config, overrides)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    dataset = open_dataset(f"bsds500:{args.data}", split=args.split)
    records = select_records(dataset, args.ids, args.limit)
    out = Path(args.out)
    for sub in ("labels", "scores", "info"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(
        {"config": args.config, "method": method.name, "params": _jsonable(method.get_params()),
         "split": args.split, "data": str(args.data)}, indent=2))
    for record in tqdm(records, desc=f"run [{args.config}]", unit="img"):
        label_path = out / "labels" / f"{record.id}.png"
        if label_path.is_file() and not args.overwrite:
            continue
        image = dataset.load(record).image
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        seg = method.predict(image)
        seconds = time.perf_counter() - t0
        info = {"id": record.id, "seconds": round(seconds, 3),
                "loadavg_before": [round(v, 2) for v in load_before],
                "loadavg_after": [round(v, 2) for v in os.getloadavg()],
                "n_labels": seg.n_labels, "info": _jsonable(seg.info)}
        if seg.scores is not None:
            np.savez_compressed(out / "scores" / f"{record.id}.npz",
                                scores=seg.scores.astype(np.float16))
        (out / "info" / f"{record.id}.json").write_text(json.dumps(info))
        write_label_map(label_path, seg.labels)  # last: marks the image as done
        tqdm.write(f"{record.id}: {seconds:.1f}s, {seg.n_labels} labels, "
                   f"{seg.info.get('iterations', '-')} it, {seg.info.get('stopped', '-')}, "
                   f"load {load_before[0]:.2f}")


def cmd_crf(args) -> None:
    from tqdm import tqdm

    from unsup.base import Segmentation
    from unsup.crf import DenseCRF
    from unsup.io import read_image, read_label_map, write_label_map

    params = json.loads(args.params) if args.params else {}
    crf = DenseCRF(**params)
    for pred in args.pred:
        pred = Path(pred)
        config = json.loads((pred / "config.json").read_text())
        out = Path(args.out) if args.out else pred / "crf"
        (out / "labels").mkdir(parents=True, exist_ok=True)
        image_dir = Path(config["data"]) / "images" / config["split"]
        for label_path in tqdm(sorted((pred / "labels").glob("*.png")), desc=f"crf {pred}"):
            target = out / "labels" / label_path.name
            if target.is_file() and not args.overwrite:
                continue
            score_path = pred / "scores" / f"{label_path.stem}.npz"
            if not score_path.is_file():
                raise SystemExit(f"{score_path}: no scores saved; the CRF needs them")
            image = read_image(image_dir / f"{label_path.stem}.jpg")
            labels = read_label_map(label_path)
            with np.load(score_path) as data:
                scores = data["scores"].astype(np.float32)
            scores /= scores.sum(axis=0, keepdims=True)
            seg = crf.refine_segmentation(image, Segmentation(labels, scores=scores))
            write_label_map(target, seg.labels)
        (out / "config.json").write_text(json.dumps(
            {**config, "config": config["config"] + "+crf", "crf": _jsonable(params)}, indent=2))


def cmd_evaluate(args) -> None:
    from unsup.datasets import open_dataset
    from unsup.evaluation import evaluate

    dataset = open_dataset(f"bsds500:{args.data}", split=args.split)
    if args.ids_from or args.ids or args.limit:
        records = select_records(dataset, args.ids, args.limit, args.ids_from)
        dataset = _subset(dataset, records)
    for pred in args.pred:
        pred = Path(pred)
        ids = [r.id for r in dataset.records]
        metrics_path = pred / f"metrics{args.tag}.json"
        results = {}
        if metrics_path.is_file():  # keep protocols evaluated earlier on the same images
            previous = json.loads(metrics_path.read_text())
            if previous.get("ids") == ids:
                results = previous["metrics"]
        for protocol in args.protocols:
            t0 = time.perf_counter()
            metrics = evaluate(protocol, pred / "labels", dataset,
                               pred / f"eval_{protocol}{args.tag}", n_jobs=args.jobs,
                               progress=True)
            results[protocol] = _jsonable(metrics)
            print(f"{pred} [{protocol}] ({time.perf_counter() - t0:.0f}s): "
                  f"{_short(metrics)}", flush=True)
        metrics_path.write_text(json.dumps(
            {"n_images": len(dataset), "ids": ids, "metrics": results}, indent=2))


def cmd_table(args) -> None:
    rows = []
    for pred in args.pred:
        pred = Path(pred)
        metrics_path = pred / f"metrics{args.tag}.json"
        if not metrics_path.is_file():
            print(f"(skipping {pred}: no {metrics_path.name})", file=sys.stderr)
            continue
        data = json.loads(metrics_path.read_text())
        config = json.loads((pred / "config.json").read_text())
        m = data["metrics"]
        matched = m.get("matched", {})
        bsds = m.get("bsds", {})
        seconds = _seconds(pred if not config["config"].endswith("+crf") else pred.parent,
                           data["ids"])
        rows.append([config["config"], str(data["n_images"]),
                     *[_fmt(_get(matched, k)) for k in
                       ("miou.all", "miou.fine", "miou.coarse", "ap50", "ap70")],
                     *[_fmt(_get(bsds, k)) for k in args.bsds_keys],
                     _fmt(seconds, 1)])
    header = ["config", "images", "mIoU all", "mIoU fine", "mIoU coarse", "AP50", "AP70",
              *args.bsds_keys, "s/img (median)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def cmd_timing(args) -> None:
    from unsup.datasets import open_dataset

    overrides = json.loads(args.params) if args.params else {}
    if args.threads:
        overrides.setdefault("n_threads", args.threads)
    method = make_method(args.config, overrides)
    dataset = open_dataset(f"bsds500:{args.data}", split=args.split)
    records = select_records(dataset, args.ids, args.limit)
    load_before = os.getloadavg()
    seconds = []
    for record in records:
        image = dataset.load(record).image
        t0 = time.perf_counter()
        seg = method.predict(image)
        seconds.append(time.perf_counter() - t0)
        print(f"{record.id}: {seconds[-1]:.2f}s ({seg.info.get('iterations')} it, "
              f"{seg.info.get('stopped')}, {seg.n_labels} labels)", flush=True)
    print(json.dumps({"config": args.config, "overrides": overrides, "images": len(seconds),
                      "median_seconds": round(float(np.median(seconds)), 3),
                      "mean_seconds": round(float(np.mean(seconds)), 3),
                      "loadavg_before": load_before, "loadavg_after": os.getloadavg()}))


# ------------------------------------------------------------------------------------------


def _subset(dataset, records):
    from dataclasses import replace

    return replace(dataset, records=list(records))


def _seconds(pred: Path, ids) -> float | None:
    values = []
    for i in ids:
        p = pred / "info" / f"{i}.json"
        if p.is_file():
            values.append(json.loads(p.read_text())["seconds"])
    return float(np.median(values)) if values else None


def _get(metrics: dict, dotted: str):
    value = metrics
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, dict) and dotted in value:
            return value[dotted]
        else:
            return None
    return value


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return f"{value:.{digits}f}"
    return str(value)


def _short(metrics) -> str:
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, int | float):
            flat[prefix] = round(float(value), 4)

    walk("", metrics)
    return json.dumps(flat)


def _jsonable(value):
    from unsup.base import _jsonable as base_jsonable

    value = base_jsonable(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def data_args(p):
        p.add_argument("--data", type=Path, required=True,
                       help="BSDS500 root (images/, groundTruth/), e.g. ../shared/data/bsds500")
        p.add_argument("--split", default="val")
        p.add_argument("--ids", nargs="*", help="only these image ids")
        p.add_argument("--limit", type=int, help="only the first N images (sorted ids)")

    p = sub.add_parser("run", help="segment a split with a named configuration")
    data_args(p)
    p.add_argument("--config", default="fast", help=f"one of {', '.join(CONFIGS)}")
    p.add_argument("--params", help="JSON parameter overrides, e.g. '{\"max_side\": 200}'")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, help="torch threads (default: all CPUs)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("crf", help="dense-CRF refinement of saved predictions")
    p.add_argument("--pred", nargs="+", required=True, type=Path)
    p.add_argument("--out", type=Path, help="output folder (default: PRED/crf)")
    p.add_argument("--params", help="JSON DenseCRF parameters")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_crf)

    p = sub.add_parser("evaluate", help="evaluate prediction folders with unsup.evaluation")
    data_args(p)
    p.add_argument("--pred", nargs="+", required=True, type=Path)
    p.add_argument("--ids-from", type=Path, help="evaluate only the images this folder has")
    p.add_argument("--protocols", nargs="+", default=["matched", "bsds"])
    p.add_argument("--tag", default="", help="suffix of the metrics file name")
    p.add_argument("--jobs", type=int, default=1, help="evaluation worker processes")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("table", help="markdown table of evaluated folders")
    p.add_argument("--pred", nargs="+", required=True, type=Path)
    p.add_argument("--tag", default="")
    p.add_argument("--bsds-keys", nargs="*", default=["boundary.ods_f", "covering.ods",
                                                      "pri.ods", "voi.ods"])
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("timing", help="median seconds per image of a configuration")
    data_args(p)
    p.add_argument("--config", default="fast")
    p.add_argument("--params")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_timing, limit=None)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
