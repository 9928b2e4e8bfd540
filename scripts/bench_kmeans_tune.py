"""Quick multi-seed tuning of dataset-level `kmeans` on a labelled subset (no files written).

Fits each configuration on the first ``--limit`` images of a masks dataset, predicts them, and
prints the Hungarian mIoU (one-to-one cluster-to-class matching over the subset, void pixels
ignored: the harness's ``hungarian`` protocol, recomputed in memory) for several seeds::

    python scripts/bench_kmeans_tune.py \
        --data masks:/work/shared/data/camvid/val:/work/shared/data/camvid/valannot \
        --ignore-index 11 --limit 50 --seeds 0 1 2 --cache-dir runs/kmeans/cache \
        --config base= --config ninit10=n_init=10 --config pca64=pca_dim=64

``--config NAME=k=v,k=v`` adds a configuration on top of ``--base`` (``scope=dataset,
n_clusters=11`` by default). Use it on a tuning split only.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_kv(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def hungarian_miou(confusion: np.ndarray) -> float:
    """mIoU after one-to-one matching of clusters (columns) to classes (rows)."""
    rows, cols = linear_sum_assignment(-confusion)
    # predicted class of each cluster: its matched class, or none
    cls_of = -np.ones(confusion.shape[1], np.int64)
    cls_of[cols] = rows
    n_cls = confusion.shape[0]
    table = np.zeros((n_cls, n_cls + 1))
    for cluster, cls in enumerate(cls_of):
        table[:, cls if cls >= 0 else n_cls] += confusion[:, cluster]
    inter = np.diag(table[:, :n_cls])
    union = table.sum(1) + table[:, :n_cls].sum(0) - inter
    defined = union > 0
    return float((inter[defined] / union[defined]).mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--ignore-index", type=int, default=None)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--base", default="scope=dataset,n_clusters=11")
    parser.add_argument("--config", action="append", required=True)
    args = parser.parse_args(argv)

    from unsup.datasets import open_dataset
    from unsup.registry import create_method

    dataset = open_dataset(args.data, ignore_index=args.ignore_index)
    records = dataset.records[: args.limit]
    n_classes = None
    print("| config | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | sd |")
    print("|---|" + "---|" * (len(args.seeds) + 2))
    for config in args.config:
        name, _, extra = config.partition("=")
        params = {**parse_kv(args.base), **parse_kv(extra)}
        if args.cache_dir:
            params.setdefault("cache_dir", args.cache_dir)
        scores = []
        for seed in args.seeds:
            method = create_method("kmeans", **{**params, "seed": seed})
            images = (dataset.load(r).image for r in records)
            t0 = time.perf_counter()
            method.fit(images)
            confusion = None
            for record in records:
                sample = dataset.load(record)
                labels = method.predict(sample.image).labels
                gt = sample.label_map
                valid = gt != dataset.ignore_index if dataset.ignore_index is not None \
                    else np.ones(gt.shape, bool)
                if n_classes is None:
                    n_classes = int(args.ignore_index) if args.ignore_index else int(gt.max()) + 1
                k = int(method.groups_.max()) + 1
                if confusion is None:
                    confusion = np.zeros((n_classes, k), np.int64)
                np.add.at(confusion, (gt[valid], labels[valid]), 1)
            scores.append(hungarian_miou(confusion))
            print(f"  {name} seed {seed}: {scores[-1]:.4f} ({time.perf_counter() - t0:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        print(f"| {name} | " + " | ".join(f"{s:.3f}" for s in scores)
              + f" | {np.mean(scores):.3f} | {np.std(scores):.3f} |", flush=True)


if __name__ == "__main__":
    main()
