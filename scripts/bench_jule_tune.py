"""Tuning `jule` on BSDS500 train for the `matched` protocol (docs/benchmarks/jule.md, session 3).

For every configuration (``jule`` parameters, or another method) the script runs ``predict``
once per image and caches the labels and the hierarchy (JULE's own dendrogram contour map
from ``Segmentation.hierarchy``; other methods through ``unsup.hierarchy``). From the cache
it scores, on the same images:

- the method's own labels: ``matched`` mIoU all / fine / coarse, AP50, AP70, segments;
- cuts of the same hierarchy at fixed levels (``--levels``, one level for every image: a
  merge stopped by the affinity instead of a region count) and at fixed region counts
  (``--regions``), with the same ``matched`` numbers;
- covering at ODS / OIS of the hierarchy (the ``bsds`` protocol's region part: 99 thresholds,
  :func:`unsup.evaluation.bsds.region_scores`; the boundary part is skipped here, it is slow
  and not part of the tuning rule).

Example::

    python scripts/bench_jule_tune.py --root /work/shared/data/bsds500 --split train \\
        --n-images 10 --stride 20 --out /work/bench/jule/tune \\
        --configs "jule:learn=false" "jule" "felzenszwalb" --levels 0.5 0.6 --regions 30 60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_=." else "_" for c in label)


def select_records(dataset, n_images: int, stride: int):
    """``n_images`` records, every ``stride``-th id in sorted order (the same for every row)."""
    records = sorted(dataset.records, key=lambda r: r.id)[::max(1, int(stride))]
    return records[: int(n_images)]


def predict_cached(config: str, dataset, out: Path, *, seed: int):
    """Run one configuration over the dataset (cached per image); returns the seconds."""
    from bench_jule import _parse_row

    from unsup.hierarchy import ultrametric_contour_map
    from unsup.nn.runtime import seed_all as seed_everything
    from unsup.registry import create_method

    label, name, params, crf = _parse_row(config)
    row_dir = out / _safe(label)
    row_dir.mkdir(parents=True, exist_ok=True)
    method = create_method(name, **params)
    crf_obj = None
    if crf:
        from unsup.crf import DenseCRF

        crf_obj = DenseCRF()
    secs_file = row_dir / "seconds.json"
    secs = json.loads(secs_file.read_text())["per_image"] if secs_file.is_file() else {}
    for record in dataset.records:
        path = row_dir / f"{record.id}.npz"
        if path.is_file():
            continue
        image = dataset.load(record).image
        seed_everything(seed)
        t0 = time.perf_counter()
        seg = method.predict(image)
        if crf_obj is not None:
            seg = crf_obj.refine_segmentation(image, seg)
        secs[record.id] = time.perf_counter() - t0
        own = seg.hierarchy if crf_obj is None else None
        ucm = own if own is not None else ultrametric_contour_map(image, seg)
        np.savez_compressed(path, labels=seg.labels.astype(np.int32),
                            ucm=np.asarray(ucm, np.uint16))
        secs_file.write_text(json.dumps({"per_image": secs, "load": _load()}))
    return secs


def _matched_mean(rows):
    keys = ("miou.all", "miou.fine", "miou.coarse", "ap50", "ap70", "n_segments")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def score_config(config: str, dataset, out: Path, *, levels, regions, n_thresholds: int = 99):
    """Matched scores of the labels and of hierarchy cuts, and covering ODS/OIS."""
    from unsup.evaluation.bsds import _GroundTruthRegions, bsds_thresholds, region_scores
    from unsup.evaluation.matched import matched_scores
    from unsup.hierarchy import UltrametricHierarchy

    row_dir = out / _safe(config)
    thresholds = bsds_thresholds(n_thresholds)
    own, by_level, by_regions = [], {t: [] for t in levels}, {k: [] for k in regions}
    cover_cnt = np.zeros(thresholds.size)
    cover_sum = np.zeros(thresholds.size)
    ois_cnt = ois_sum = 0.0
    for record in dataset.records:
        sample = dataset.load(record)
        gts = sample.ground_truth
        data = np.load(row_dir / f"{record.id}.npz")
        own.append(matched_scores(data["labels"], gts))
        hierarchy = UltrametricHierarchy(data["ucm"])
        for t in levels:
            by_level[t].append(matched_scores(hierarchy.cut(float(t)), gts))
        edge_levels = np.sort(hierarchy.edge_level)
        for k in regions:
            by_regions[k].append(matched_scores(_cut_regions(hierarchy, k), gts))
        # covering sweep (collect_eval_reg.m: ODS over summed counts, OIS per image)
        gt = _GroundTruthRegions.build(gts)
        cnt = np.zeros(thresholds.size)
        tot = np.zeros(thresholds.size)
        previous_key, scores = None, None
        for i, t in enumerate(thresholds):
            key = int(np.count_nonzero(edge_levels <= t))
            if key != previous_key:
                scores = region_scores(hierarchy.cut(float(t)), gt)
                previous_key = key
            cnt[i], tot[i] = scores.cover_cnt_r, scores.cover_sum_r
        cover_cnt += cnt
        cover_sum += tot
        best = int(np.argmax(cnt / tot))
        ois_cnt += cnt[best]
        ois_sum += tot[best]
    covering = cover_cnt / cover_sum
    ods = int(np.argmax(covering))
    return {
        "config": config,
        "labels": _matched_mean(own),
        "levels": {str(t): _matched_mean(v) for t, v in by_level.items()},
        "regions": {str(k): _matched_mean(v) for k, v in by_regions.items()},
        "covering_ods": float(covering[ods]),
        "covering_ods_threshold": float(thresholds[ods]),
        "covering_ois": float(ois_cnt / ois_sum),
    }


def _cut_regions(hierarchy, k: int) -> np.ndarray:
    """The hierarchy's cut with the fewest regions that is still >= ``k`` regions."""
    lv = hierarchy.levels
    lo, hi = 0, lv.size  # number of distinct levels merged away
    labels = hierarchy.cut(0.0)
    if int(labels.max()) + 1 <= k:
        return labels
    # binary search on the number of joined levels (regions decrease monotonically)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cut = hierarchy.cut(float(lv[mid - 1]))
        if int(cut.max()) + 1 >= k:
            lo, labels = mid, cut
        else:
            hi = mid - 1
    return labels if lo else hierarchy.cut(0.0)


def _fmt(v, digits=4):
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="BSDS500 root (bsds500:ROOT)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--n-images", type=int, default=10)
    parser.add_argument("--stride", type=int, default=20,
                        help="take every STRIDE-th id in sorted order")
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", nargs="+", required=True,
                        help="NAME[:k=v,...][+crf] rows")
    parser.add_argument("--levels", nargs="*", type=float, default=[])
    parser.add_argument("--regions", nargs="*", type=int, default=[])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.split not in ("train",):
        print("warning: tuning on a split other than train", file=sys.stderr)

    from unsup.datasets import open_dataset

    dataset = open_dataset(f"bsds500:{args.root}", split=args.split)
    dataset = dataclasses.replace(dataset, records=select_records(dataset, args.n_images,
                                                                  args.stride))
    out = Path(args.out)
    results = []
    for config in args.configs:
        secs = predict_cached(config, dataset, out, seed=args.seed)
        res = score_config(config, dataset, out, levels=args.levels, regions=args.regions)
        res["median_seconds"] = statistics.median(secs.values()) if secs else None
        res["load"] = _load()
        results.append(res)
        (out / _safe(config) / "scores.json").write_text(json.dumps(res, indent=2))
        m = res["labels"]
        print(f"{config}: mIoU all {m['miou.all']:.4f} fine {m['miou.fine']:.4f} coarse "
              f"{m['miou.coarse']:.4f} AP50 {m['ap50']:.4f} segs {m['n_segments']:.0f} | "
              f"covering ODS {res['covering_ods']:.4f} OIS {res['covering_ois']:.4f} | "
              f"{res['median_seconds'] or 0:.2f} s/img (load {res['load']})", flush=True)
        for kind in ("levels", "regions"):
            for key, mm in res[kind].items():
                print(f"    {kind[:-1]} {key}: mIoU all {mm['miou.all']:.4f} fine "
                      f"{mm['miou.fine']:.4f} coarse {mm['miou.coarse']:.4f} AP50 "
                      f"{mm['ap50']:.4f} AP70 {mm['ap70']:.4f} segs {mm['n_segments']:.0f}",
                      flush=True)
    ids = [r.id for r in dataset.records]
    print(f"\nBSDS500 {args.split}: {len(ids)} images {ids}")
    print("| row | cut | mIoU all | mIoU fine | mIoU coarse | AP50 | AP70 | segments | "
          "covering ODS | covering OIS | s/img |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for res in results:
        cuts = [("labels", res["labels"])]
        cuts += [(f"level {k}", v) for k, v in res["levels"].items()]
        cuts += [(f">= {k} regions", v) for k, v in res["regions"].items()]
        for name, m in cuts:
            print(f"| {res['config']} | {name} | {_fmt(m['miou.all'])} | {_fmt(m['miou.fine'])} "
                  f"| {_fmt(m['miou.coarse'])} | {_fmt(m['ap50'])} | {_fmt(m['ap70'])} | "
                  f"{m['n_segments']:.0f} | {_fmt(res['covering_ods'])} | "
                  f"{_fmt(res['covering_ois'])} | {_fmt(res['median_seconds'] or 0.0, 2)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
