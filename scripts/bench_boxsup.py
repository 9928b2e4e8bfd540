"""Benchmark: box-supervised (boxsup) vs mask-supervised (supervised) training, same network.

Weizmann Horse (figure/ground)::

    python scripts/bench_boxsup.py horse --images ../shared/data/weizmann_horse/horse_train \
        --masks ../shared/data/weizmann_horse/mask_train --out runs/boxsup_horse

    The 278 images are split deterministically: the ids are sorted and a permutation seeded
    by --split-seed (default 0) puts round(0.2 * 278) = 56 of them in the test set, 222 in the
    training set (symlinks under OUT/data/{train,test}). Boxes for boxsup are derived from the
    training masks (which boxsup never sees).

COCO subsets (multi-class, restricted to a few classes)::

    python scripts/bench_boxsup.py coco \
        --train coco:../shared/data/coco/coco_mini/annotations/instances_train2017.json:../shared/data/coco/coco_mini/train2017 \
        --test coco:../shared/data/coco/coco_tiny/annotations/instances_val2017.json:../shared/data/coco/coco_tiny/val2017 \
        --classes person,car,dog --out runs/boxsup_coco

Both run :func:`unsup.compare.compare` (same network, epochs, seed; optional dense CRF) and
also score the masks boxsup mined in each round against the training ground truth (with the
filled boxes as the baseline). Results go to OUT (compare.md / compare.json / report.html,
mined_quality.json); the machine load is recorded.
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


def split_horse(images: Path, masks: Path, out: Path, *, test_fraction: float, seed: int):
    """Symlinked train/test folders of a deterministic split; returns the two specs."""
    ids = sorted(p.stem for p in images.glob("*.jpg") if (masks / f"{p.stem}.png").is_file())
    if not ids:
        raise SystemExit(f"no image with a mask in {images} / {masks}")
    n_test = int(round(test_fraction * len(ids)))
    perm = np.random.default_rng(seed).permutation(len(ids))
    test_ids = {ids[i] for i in perm[:n_test]}
    for part in ("train", "test"):
        for sub in ("images", "masks"):
            (out / part / sub).mkdir(parents=True, exist_ok=True)
    for i in ids:
        part = "test" if i in test_ids else "train"
        for src, sub, ext in ((images, "images", ".jpg"), (masks, "masks", ".png")):
            link = out / part / sub / f"{i}{ext}"
            if not link.exists():
                os.symlink((src / f"{i}{ext}").resolve(), link)
    (out / "split.json").write_text(json.dumps(
        {"seed": seed, "test_fraction": test_fraction, "n_train": len(ids) - n_test,
         "n_test": n_test, "test_ids": sorted(test_ids)}, indent=1))
    spec = lambda part: f"masks:{out / part / 'images'}:{out / part / 'masks'}"  # noqa: E731
    return spec("train"), spec("test")


def mined_quality(train_spec: str, model_dir: Path, *, classes=None, ignore_index=None) -> dict:
    """IoU of boxsup's mined masks (each round) and of the filled boxes vs the ground truth.

    Per class, accumulated over the training set at the working resolution; ignored mined
    pixels are reported as a fraction and left out of the mined IoU.
    """
    from unsup.augment import resize_labels
    from unsup.datasets import open_dataset
    from unsup.io import read_label_map
    from unsup.nn.losses import IGNORE

    ds = open_dataset(train_spec, ignore_index=ignore_index, boxes_from_masks=False)
    if classes:
        ds = ds.restrict_classes(classes)
    rounds = sorted((model_dir / "mined").glob("round_*"), key=lambda p: int(p.name[6:]))
    stats = {r.name: {"inter": {}, "union": {}, "ignored": 0, "pixels": 0} for r in rounds}
    stats["filled_boxes"] = {"inter": {}, "union": {}, "ignored": 0, "pixels": 0}
    own_boxes = ds.has_boxes
    for sample in ds:
        gt = sample.label_map
        void = gt == sample.ignore_index if sample.ignore_index is not None else np.zeros_like(
            gt, bool)
        for r in rounds:
            path = r / "labels" / f"{sample.id}.png"
            mined = resize_labels(read_label_map(path), gt.shape)
            _accumulate(stats[r.name], mined, gt, void | (mined == IGNORE))
            stats[r.name]["ignored"] += int(((mined == IGNORE) & ~void).sum())
            stats[r.name]["pixels"] += int((~void).sum())
        boxes = sample.boxes if own_boxes else None
        if boxes is None:
            from unsup.datasets import boxes_from_masks

            boxes = boxes_from_masks(gt, ignore_index=sample.ignore_index)
        filled = np.zeros_like(gt)
        for b in sorted((b for b in boxes if not b.ignore), key=lambda b: -b.area):
            x0, y0, x1, y1 = b.as_int()
            filled[y0:y1, x0:x1] = b.label
        _accumulate(stats["filled_boxes"], filled, gt, void)
    out = {}
    for name, s in stats.items():
        per = {c: s["inter"][c] / s["union"][c] for c in s["union"] if s["union"][c] > 0}
        fg = [v for c, v in per.items() if c != 0]
        out[name] = {"per_class_iou": per, "mean_fg_iou": float(np.mean(fg)) if fg else None,
                     "ignored_fraction": s["ignored"] / s["pixels"] if s["pixels"] else 0.0}
    return out


def _accumulate(stat, pred, gt, skip):
    keep = ~skip
    for c in np.unique(gt[keep]):
        c = int(c)
        p, g = (pred == c) & keep, (gt == c) & keep
        stat["inter"][c] = stat["inter"].get(c, 0) + int((p & g).sum())
        stat["union"][c] = stat["union"].get(c, 0) + int((p | g).sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("horse", "coco"))
    parser.add_argument("--images", type=Path, help="horse: image folder")
    parser.add_argument("--masks", type=Path, help="horse: mask folder")
    parser.add_argument("--train", help="coco: training spec")
    parser.add_argument("--test", help="coco: test spec")
    parser.add_argument("--classes", default=None, help="coco: classes to keep")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default="boxsup,supervised")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--param", "-p", action="append", default=[],
                        help="KEY=VALUE or METHOD.KEY=VALUE (see unsup compare)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--crf", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on the shared 2-core machine, "
                             "2 OpenMP threads per process spent ~14x more CPU per step)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    # Set before torch starts its OpenMP pool. Measured on the shared machine (load ~25 on 2
    # cores): a training step took 110 s wall / 7.5 s CPU with 2 intra-op threads and 14 s
    # wall / 0.55 s CPU with 1 (threads waiting at OpenMP barriers for a descheduled peer).
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from unsup.cli import parse_key_values
    from unsup.compare import compare

    torch.set_num_threads(args.threads)
    defaults = {"network__decoder": "unet", "max_side": 224, "augment__crop_size": 160,
                "network__batch_size": 8, "network__freeze_blocks": 4, "boxsup.rounds": 3}
    methods = args.methods.split(",")
    # a default scoped to a method that is not compared would be refused by compare()
    defaults = {k: v for k, v in defaults.items() if "." not in k or k.split(".")[0] in methods}
    params = {**defaults, **parse_key_values(args.param, option="--param")}
    args.out.mkdir(parents=True, exist_ok=True)
    classes = None
    if args.dataset == "horse":
        if not (args.images and args.masks):
            parser.error("horse needs --images and --masks")
        train_spec, test_spec = split_horse(args.images, args.masks, args.out / "data",
                                            test_fraction=args.test_fraction,
                                            seed=args.split_seed)
    else:
        if not (args.train and args.test):
            parser.error("coco needs --train and --test")
        train_spec, test_spec = args.train, args.test
        classes = [c.strip() for c in (args.classes or "").split(",") if c.strip()] or None
    load_before = os.getloadavg()
    t0 = time.monotonic()
    result = compare(train_spec, test_spec, methods, args.out,
                     epochs=args.epochs, max_minutes=args.max_minutes, params=params,
                     seed=args.seed, crf=args.crf, classes=classes,
                     progress=not args.no_progress)
    wall = time.monotonic() - t0
    mined = None
    if (args.out / "models" / "boxsup" / "mined").is_dir():
        mined = mined_quality(train_spec, args.out / "models" / "boxsup", classes=classes)
        (args.out / "mined_quality.json").write_text(json.dumps(mined, indent=2))
    record = {"command": sys.argv, "train": train_spec, "test": test_spec, "params": params,
              "epochs": args.epochs, "max_minutes": args.max_minutes, "seed": args.seed,
              "threads": args.threads, "wall_seconds": round(wall, 1),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    (args.out / "bench.json").write_text(json.dumps(record, indent=2))
    print(result["table_markdown"])
    if mined:
        for name, m in mined.items():
            print(f"mined {name}: mean foreground IoU {m['mean_fg_iou']:.4f}, "
                  f"ignored {m['ignored_fraction']:.3f}")
    print(f"load average before {load_before}, after {os.getloadavg()}, wall {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
