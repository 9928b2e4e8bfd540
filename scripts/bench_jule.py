"""Benchmarks of the `jule` method (docs/benchmarks/jule.md).

Subcommands (each one command; data paths are arguments):

``digits``
    Image clustering where JULE was published: scikit-learn's bundled digits (1,797 8x8
    images, no download). NMI of the core with ``learn=true`` / ``learn=false`` for two
    representations (a CNN from scratch, as in the paper, and a residual MLP on the pixels)
    vs ``AgglomerativeClustering(n_clusters=10, linkage="ward")`` on raw pixels.
``bsds``
    BSDS500 (``--root``, ``--split``), per image, on a fixed subset (``--n-images``, the first
    ids in sorted order, the same for every row): ``matched`` protocol on the labels and
    ``bsds`` protocol on the hierarchies (JULE's own dendrogram UCM from
    ``Segmentation.hierarchy``; other methods through ``unsup.hierarchy``), with and without
    the dense CRF. Also the median seconds per image of each row.
``camvid``
    CamVid (``--images``, ``--masks``, ignore index 11), dataset scope, ``hungarian`` protocol:
    ``jule scope=dataset`` vs ``kmeans scope=dataset`` on the same backbone, both fitted on the
    evaluation images themselves (unsupervised; annotations withheld).

Examples::

    python scripts/bench_jule.py digits --out runs/jule_digits
    python scripts/bench_jule.py bsds --root ../shared/data/bsds500 --split val \\
        --n-images 20 --out runs/jule_bsds
    python scripts/bench_jule.py camvid --images ../shared/data/camvid/val \\
        --masks ../shared/data/camvid/valannot --out runs/jule_camvid
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


def _print_row(cells):
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


# ------------------------------------------------------------------------------------------
# digits


def digits_nmi(*, representation: str, learn: bool, seed: int = 0, n_iter_per_period: int = 50,
               unroll_rate: float = 0.9, lr: float = 0.01, optimizer: str = "sgd",
               gamma: float = 2.0, margin: float = 0.2, k_neighbors: int = 20,
               rerun: bool = False, subset: int | None = None) -> tuple[float, float]:
    """NMI and seconds of the JULE core on sklearn's digits."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.metrics import normalized_mutual_info_score

    from methods.jule.core import run_jule
    from methods.jule.learning import TensorRepresentation, residual_mlp, small_convnet

    x, y = load_digits(return_X_y=True)
    if subset:
        keep = np.random.default_rng(seed).permutation(len(x))[:subset]
        x, y = x[keep], y[keep]
    torch.manual_seed(seed)
    if representation == "cnn":
        module = small_convnet(1, 160, width=16)
        inputs = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    elif representation == "mlp":
        module = residual_mlp(64, 64, hidden=256)
        inputs = torch.tensor(x / 16.0, dtype=torch.float32)
    else:
        raise ValueError(f"unknown representation {representation!r}")
    start = time.perf_counter()
    result = run_jule(TensorRepresentation(inputs, module), n_clusters=10, learn=learn,
                      unroll_rate=unroll_rate, n_iter_per_period=n_iter_per_period, lr=lr,
                      optimizer=optimizer, gamma=gamma, margin=margin,
                      k_neighbors=k_neighbors, rerun=rerun, seed=seed)
    return (normalized_mutual_info_score(y, result.labels), time.perf_counter() - start)


def cmd_digits(args) -> int:
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.datasets import load_digits
    from sklearn.metrics import normalized_mutual_info_score

    x, y = load_digits(return_X_y=True)
    if args.subset:  # the digits digits_nmi clusters
        keep = np.random.default_rng(args.seed).permutation(len(x))[:args.subset]
        x, y = x[keep], y[keep]
    t0 = time.perf_counter()
    ward = AgglomerativeClustering(n_clusters=10, linkage="ward").fit_predict(x)
    rows = [("sklearn Ward, raw pixels", "-", normalized_mutual_info_score(y, ward),
             time.perf_counter() - t0)]
    configs = [
        ("jule core, CNN from scratch (paper setting: SGD lr 0.01, eta 0.9)", "cnn",
         dict(optimizer="sgd", lr=0.01, unroll_rate=0.9)),
        ("jule core, CNN from scratch, eta 0.2", "cnn",
         dict(optimizer="sgd", lr=0.01, unroll_rate=0.2)),
        ("jule core, residual MLP on pixels (SGD lr 0.01, eta 0.9)", "mlp",
         dict(optimizer="sgd", lr=0.01, unroll_rate=0.9)),
        ("jule core, residual MLP on pixels, eta 0.2", "mlp",
         dict(optimizer="sgd", lr=0.01, unroll_rate=0.2)),
    ]
    for label, rep, kw in configs:
        if rep not in args.representations:
            continue
        for learn in (True, False):
            if not learn and kw["unroll_rate"] != 0.9:
                continue  # the fixed-representation run does not depend on the schedule
            nmi, secs = digits_nmi(representation=rep, learn=learn, seed=args.seed,
                                   n_iter_per_period=args.iters, subset=args.subset, **kw)
            rows.append((label, f"learn={str(learn).lower()}", nmi, secs))
            print(rows[-1], flush=True)
    print(f"\nload average: {_load()}")
    _print_row(["method", "learn", "NMI", "seconds"])
    _print_row(["---"] * 4)
    for label, learn, nmi, secs in rows:
        _print_row([label, learn, f"{nmi:.4f}", f"{secs:.1f}"])
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "digits.json").write_text(json.dumps(
            [dict(method=r[0], learn=r[1], nmi=r[2], seconds=r[3]) for r in rows], indent=2))
    return 0


# ------------------------------------------------------------------------------------------
# BSDS


def _parse_row(text: str):
    """``NAME[:k=v,k=v][+crf]`` -> (label, method name, params, crf)."""
    from unsup.cli import parse_value

    label = text
    crf = text.endswith("+crf")
    if crf:
        text = text[: -len("+crf")]
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        params[k.strip()] = parse_value(v)
    return label, name, params, crf


DEFAULT_BSDS_ROWS = [
    "jule:learn=true",
    "jule:learn=false",
    "jule:learn=true+crf",
    "jule:learn=false+crf",
    "felzenszwalb",
    "felzenszwalb+crf",
    "kmeans-color",
    "kmeans-color+crf",
]


def _run_rows(rows, dataset, out: Path, *, hierarchy: bool, seed: int):
    from unsup.hierarchy import ultrametric_contour_map
    from unsup.io import atomic_write_bytes, write_label_map, write_ultrametric_map
    from unsup.nn.runtime import seed_all as seed_everything
    from unsup.registry import create_method

    crf_obj = None
    timings = {}
    for row in rows:
        label, name, params, crf = _parse_row(row)
        safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in label)
        row_dir = out / safe
        method = create_method(name, **params)
        if crf and crf_obj is None:
            from unsup.crf import DenseCRF

            crf_obj = DenseCRF()
        if hierarchy:
            atomic_write_bytes(row_dir / "hierarchy" / "_hierarchy.json",
                               json.dumps({"format": "unsup-ucm", "version": 1}).encode())
        secs = []
        for record in dataset.records:
            lab_path = row_dir / "labels" / f"{record.id}.png"
            hier_path = row_dir / "hierarchy" / f"{record.id}.png"
            if lab_path.is_file() and (not hierarchy or hier_path.is_file()):
                continue
            image = dataset.load(record).image
            seed_everything(seed)
            t0 = time.perf_counter()
            seg = method.predict(image)
            if crf:
                seg = crf_obj.refine_segmentation(image, seg)
            secs.append(time.perf_counter() - t0)
            if hierarchy:
                own = seg.hierarchy if not crf else None
                ucm = own if own is not None else ultrametric_contour_map(image, seg)
                write_ultrametric_map(hier_path, ucm)
            write_label_map(lab_path, seg.labels)
        if secs:
            timings[label] = statistics.median(secs)
            (row_dir / "seconds.json").write_text(json.dumps(
                {"median": timings[label], "per_image": secs, "load": _load()}))
        elif (row_dir / "seconds.json").is_file():
            timings[label] = json.loads((row_dir / "seconds.json").read_text())["median"]
        print(f"{label}: median {timings.get(label, float('nan')):.2f} s/img "
              f"(load {_load()})", flush=True)
    return timings


def cmd_bsds(args) -> int:
    from unsup.datasets import open_dataset
    from unsup.evaluation import evaluate

    dataset = open_dataset(f"bsds500:{args.root}", split=args.split)
    records = sorted(dataset.records, key=lambda r: r.id)[: args.n_images]
    dataset = dataclasses.replace(dataset, records=records)
    out = Path(args.out)
    rows = args.rows or DEFAULT_BSDS_ROWS
    timings = _run_rows(rows, dataset, out, hierarchy=True, seed=args.seed)
    table = []
    for row in rows:
        label = row
        safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in label)
        row_dir = out / safe
        m = evaluate("matched", row_dir / "labels", dataset, row_dir / "eval_matched",
                     n_jobs=args.jobs, progress=False)
        b = evaluate("bsds", row_dir / "hierarchy", dataset, row_dir / "eval_bsds",
                     n_jobs=args.jobs, progress=False)
        table.append((label, m, b, timings.get(label)))
        print(label, json.dumps({k: v for k, v in {**m, **b}.items()
                                 if isinstance(v, int | float)}), flush=True)
    print(f"\nBSDS500 {args.split}, first {len(records)} images (sorted ids), "
          f"load average {_load()}")
    keys_m = ["miou_all", "miou_fine", "miou_coarse", "ap50", "ap70"]
    keys_b = ["boundary_ods_f", "boundary_ois_f", "covering_ods", "covering_ois", "pri_ods",
              "voi_ods"]
    _print_row(["row", *keys_m, *keys_b, "s/img"])
    _print_row(["---"] * (2 + len(keys_m) + len(keys_b)))
    for label, m, b, secs in table:
        _print_row([label, *[_fmt(_find(m, k)) for k in keys_m],
                    *[_fmt(_find(b, k)) for k in keys_b],
                    "-" if secs is None else f"{secs:.2f}"])
    return 0


def _find(metrics: dict, key: str):
    """Look a metric up by key, tolerating the harness's naming (exact, then suffix match)."""
    if key in metrics:
        return metrics[key]
    for k, v in metrics.items():
        if k.replace("/", "_").replace(".", "_").lower().endswith(key):
            return v
    return None


def _fmt(v):
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


# ------------------------------------------------------------------------------------------
# CamVid


def cmd_camvid(args) -> int:
    from unsup.datasets import open_dataset
    from unsup.evaluation import evaluate
    from unsup.registry import create_method
    from unsup.runner import fit_if_needed

    dataset = open_dataset(f"masks:{args.images}:{args.masks}", ignore_index=11)
    records = sorted(dataset.records, key=lambda r: r.id)
    if args.n_images:
        records = records[: args.n_images]
    dataset = dataclasses.replace(dataset, records=records)
    out = Path(args.out)
    rows = args.rows or [
        "jule:scope=dataset,features=backbone,n_clusters=11,learn=true",
        "jule:scope=dataset,features=backbone,n_clusters=11,learn=false",
        "kmeans:scope=dataset,n_clusters=11",
    ]
    results = []
    for row in rows:
        label, name, params, crf = _parse_row(row)
        safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in label)
        row_dir = out / safe
        method = create_method(name, **params)
        t0 = time.perf_counter()
        fit_if_needed(method, dataset, progress=True, seed=args.seed)
        fit_secs = time.perf_counter() - t0
        crf_obj = None
        if crf:
            from unsup.crf import DenseCRF

            crf_obj = DenseCRF()
        secs = []
        from unsup.io import write_label_map

        for record in dataset.records:
            image = dataset.load(record).image
            t1 = time.perf_counter()
            seg = method.predict(image)
            if crf_obj is not None:
                seg = crf_obj.refine_segmentation(image, seg)
            secs.append(time.perf_counter() - t1)
            write_label_map(row_dir / "labels" / f"{record.id}.png", seg.labels)
        metrics = evaluate("hungarian", row_dir / "labels", dataset, row_dir / "eval",
                           n_jobs=args.jobs, progress=False)
        results.append((label, metrics, fit_secs, statistics.median(secs)))
        print(label, json.dumps({k: v for k, v in metrics.items()
                                 if isinstance(v, int | float)}), flush=True)
    print(f"\nCamVid val ({len(records)} images), load average {_load()}")
    _print_row(["row", "mIoU", "pixel acc", "fit s", "predict s/img"])
    _print_row(["---"] * 5)
    for label, m, fs, ps in results:
        _print_row([label, _fmt(_find(m, "miou")), _fmt(_find(m, "pixel_accuracy")),
                    f"{fs:.0f}", f"{ps:.2f}"])
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("digits")
    p.add_argument("--out", default=None)
    p.add_argument("--iters", type=int, default=50, help="updates per period")
    p.add_argument("--subset", type=int, default=None,
                   help="cluster this many randomly chosen digits (default: all 1,797)")
    p.add_argument("--representations", nargs="+", default=["cnn", "mlp"],
                   choices=["cnn", "mlp"], help="which JULE representations to run")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_digits)
    p = sub.add_parser("bsds")
    p.add_argument("--root", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--n-images", type=int, default=20)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", nargs="*", help="NAME[:k=v,...][+crf] (default: the doc's rows)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bsds)
    p = sub.add_parser("camvid")
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--n-images", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", nargs="*")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_camvid)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
