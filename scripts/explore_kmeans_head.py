"""Exploration (issue #5, session 9): does a STEGO-style projection head help dataset k-means?

STEGO (Hamilton et al., ICLR 2022) trains a small head on frozen backbone features so that the
head's feature correlations follow the backbone's, shifted by a bias ``b`` per pair kind
(the image with itself, with one of its 5 nearest images by pooled feature, with a random
image); k-means then runs on the head's outputs. The loss of one pair, with F the
spatially centred cosine correlations of the backbone features of sampled cells and S
those of the head's outputs::

    L = -mean((F - b) * max(S, 0))

This script tests that idea on EfficientNet-Lite0 taps 16/32 (the `kmeans` defaults) at an
8-px grid, without touching the method: it fits the head on the images it scores
(transductive, no labels, as `kmeans` does at dataset scope), clusters into 11 groups and
prints the one-to-one Hungarian mIoU against the masks (void ignored). Use it on a tuning
split only. Result (docs/benchmarks/kmeans.md, session 9): +0.011 on the first 50 CamVid
val images over 3 seeds, below the pre-set bar, and longer training collapses.

    python scripts/explore_kmeans_head.py \\
        --data masks:/work/shared/data/camvid/val:/work/shared/data/camvid/valannot \\
        --ignore-index 11 --n-classes 11 --limit 50 --out head.jsonl \\
        --config '{"name": "raw", "raw": true, "seeds": [0, 1, 2]}' \\
        --config '{"name": "head", "b_self": 0.1, "b_knn": 0.0, "b_rand": 0.1, "seeds": [0, 1, 2]}'

Config keys (defaults): name, seeds [0], raw (false: k-means on the raw features), steps 1000,
dim 64, lr 5e-4, points 300 (cells sampled per image and step), b_self / b_knn / b_rand 0,
w_self 0.67 / w_knn 0.33 / w_rand 0.63 (STEGO's weights for COCO-Stuff).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from unsup.clustering import assign, fit_kmeans
from unsup.datasets import open_dataset
from unsup.evaluation.confusion import class_scores, collapse, hungarian_mapping
from unsup.features import DenseFeatureExtractor


class ProjectionHead(torch.nn.Module):
    """STEGO's head: a linear map plus a two-layer MLP, summed (per cell)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = torch.nn.Linear(d_in, d_out)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_in, d_in), torch.nn.ReLU(),
                                       torch.nn.Linear(d_in, d_out))

    def forward(self, x):
        return self.linear(x) + self.mlp(x)


def correspondence_loss(fa, fb, ca, cb, shift: float):
    """STEGO's correlation loss of one pair of cell samples (features f, head outputs c)."""
    f = fa @ fb.T
    f = f - f.mean(dim=1, keepdim=True)  # spatial centring
    normalize = torch.nn.functional.normalize
    s = normalize(ca, dim=1) @ normalize(cb, dim=1).T
    return -((f - shift) * s.clamp(min=0)).mean()


def hungarian_miou(labels_per_image, truths, n_classes: int, n_clusters: int):
    table = np.zeros((n_classes, n_clusters), np.int64)
    for labels, (gt, grid, ignore) in zip(labels_per_image, truths, strict=True):
        full = np.asarray(labels)[grid.pixel_to_cell()]
        valid = (gt >= 0) & (gt < n_classes) if ignore is None else (gt != ignore) & (gt < n_classes)
        np.add.at(table, (gt[valid], full[valid]), 1)
    scores = class_scores(collapse(table, hungarian_mapping(table)))
    return scores["miou"], [None if v is None else round(v, 3)
                            for v in scores["per_class_iou"].values()]


def train_head(grids, knn, cfg, rng):
    d_in = grids[0].shape[1]
    head = ProjectionHead(d_in, int(cfg.get("dim", 64)))
    opt = torch.optim.Adam(head.parameters(), lr=float(cfg.get("lr", 5e-4)))
    points = int(cfg.get("points", 300))
    losses = []

    def cells(j):
        return grids[j][torch.from_numpy(rng.integers(0, grids[j].shape[0], points))]

    for _ in range(int(cfg.get("steps", 1000))):
        a = int(rng.integers(len(grids)))
        near = int(knn[a, rng.integers(knn.shape[1])])
        other = int(rng.integers(len(grids)))
        fa, fk, fr = cells(a), cells(near), cells(other)
        ca, ck, cr = head(fa), head(fk), head(fr)
        loss = (cfg.get("w_self", 0.67) * correspondence_loss(fa, fa, ca, ca, cfg.get("b_self", 0.0))
                + cfg.get("w_knn", 0.33) * correspondence_loss(fa, fk, ca, ck, cfg.get("b_knn", 0.0))
                + cfg.get("w_rand", 0.63) * correspondence_loss(fa, fr, ca, cr, cfg.get("b_rand", 0.0)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return head, losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a masks dataset spec")
    parser.add_argument("--ignore-index", type=int, default=None)
    parser.add_argument("--n-classes", type=int, required=True, help="= the number of clusters")
    parser.add_argument("--offset", type=int, default=0, help="first image (sorted ids)")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--out", required=True, help="JSON lines, appended")
    parser.add_argument("--config", action="append", required=True, help="a JSON object")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    dataset = open_dataset(args.data, ignore_index=args.ignore_index)
    ids = sorted(dataset.ids)[args.offset:args.offset + args.limit]
    extractor = DenseFeatureExtractor(strides=(16, 32), output_stride=8)
    grids, truths = [], []
    for image_id in ids:
        sample = dataset.load(image_id)
        grid = extractor(sample.image)
        grids.append(torch.from_numpy(np.ascontiguousarray(
            grid.features.reshape(-1, grid.features.shape[-1]), dtype=np.float32)))
        truths.append((sample.label_map, grid, args.ignore_index))
    pooled = torch.nn.functional.normalize(torch.stack([g.mean(0) for g in grids]), dim=1).numpy()
    similarity = pooled @ pooled.T
    np.fill_diagonal(similarity, -np.inf)
    knn = np.argsort(-similarity, axis=1)[:, :5]

    for cfg in map(json.loads, args.config):
        for seed in cfg.get("seeds", [0]):
            start = time.time()
            rng = np.random.default_rng(seed)
            torch.manual_seed(seed)
            row = {"name": cfg.get("name", "?"), "seed": seed, "offset": args.offset,
                   "limit": len(ids), "cfg": cfg}
            if cfg.get("raw"):
                codes = [g.numpy() for g in grids]
            else:
                head, losses = train_head(grids, knn, cfg, rng)
                with torch.inference_mode():
                    codes = [torch.nn.functional.normalize(head(g), dim=1).numpy() for g in grids]
                row["loss_first_last"] = [float(np.mean(losses[:50])), float(np.mean(losses[-50:]))]
            sample = np.concatenate([c[rng.integers(0, c.shape[0], 2000)] for c in codes])
            centroids = fit_kmeans(sample, args.n_classes, n_iter=30, n_init=3, seed=seed)
            miou, per_class = hungarian_miou([assign(c, centroids) for c in codes], truths,
                                             args.n_classes, args.n_classes)
            row.update(miou=miou, per_class=per_class, seconds=round(time.time() - start, 1))
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
