"""Benchmarks of the `kmeans` method, its features and faiss clustering.

Sub-commands (one command each; `run` is resumable: images with outputs are skipped)::

    # segment a dataset (fits first when scope=dataset; the model is saved in OUT/model)
    python scripts/bench_kmeans.py run --data masks:../shared/data/camvid/val:../shared/data/camvid/valannot \
        --ignore-index 11 --out runs/kmeans/camvid-lite0 --method kmeans \
        --param scope=dataset --param n_clusters=11 [--crf] [--cache-dir runs/kmeans/cache]
    # evaluate prediction folders (OUT/labels and, with --crf, OUT/crf) with the harness
    python scripts/bench_kmeans.py evaluate --data SPEC --ignore-index 11 --protocol hungarian \
        --pred runs/kmeans/camvid-lite0
    # markdown table of evaluated runs
    python scripts/bench_kmeans.py table --pred runs/kmeans/camvid-*
    # faiss vs scikit-learn k-means on random vectors (10^7 x 64 by default)
    python scripts/bench_kmeans.py speed --n 10000000 --dim 64 --k 100 --iters 20 --lloyd
    # dense-feature extraction seconds per image (BSDS val: 481x321)
    python scripts/bench_kmeans.py features --images ../shared/data/bsds500/images/val --limit 20

Every timing line records the 1-minute load average (the machine is shared; compare only
numbers taken at a similar load).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before numpy/torch/faiss load libgomp

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def parse_params(items) -> dict:
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--param expects key=value, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def open_data(args):
    from unsup.datasets import open_dataset

    return open_dataset(args.data, split=args.split, ignore_index=args.ignore_index)


def select_records(dataset, offset: int = 0, limit: int | None = None) -> list:
    """Records ``offset .. offset + limit`` of the dataset in sorted-id order.

    Sorting makes "the first 50 images" (the tuning split) and "the rest" (held out) the
    same whatever order the dataset lists them in.
    """
    records = sorted(dataset.records, key=lambda r: r.id)
    if offset < 0 or offset >= len(records):
        raise SystemExit(f"--offset {offset} is outside the dataset's {len(records)} images")
    end = offset + limit if limit else None
    return records[offset:end]


# -- run ------------------------------------------------------------------------------------------


def cmd_run(args) -> None:
    from tqdm import tqdm

    from unsup.io import write_label_map
    from unsup.registry import create_method, load_method

    dataset = open_data(args)
    records = select_records(dataset, args.offset, args.limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = parse_params(args.param)
    if args.cache_dir and args.method == "kmeans":
        params.setdefault("cache_dir", args.cache_dir)
    model_dir = out / "model"
    if (model_dir / "model.json").is_file():
        method = load_method(model_dir)
        if method.get_params() != {**method.get_params(), **_jsonable(params)}:
            raise SystemExit(f"{model_dir} was fitted with other parameters; use a new --out")
    else:
        method = create_method(args.method, **params)
    config = {"method": args.method, "params": _jsonable(method.get_params()),
              "data": args.data, "split": args.split, "offset": args.offset,
              "limit": args.limit, "crf": args.crf}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    info_path = out / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {"images": {}}
    if method.requires_fit and not method.is_fitted():
        from unsup.datasets import Dataset

        subset = Dataset(spec=dataset.spec, records=list(records), kind=dataset.kind,
                         class_names=dataset.class_names, _loader=None)
        load0 = load_average()
        t0 = time.perf_counter()
        method.fit(subset, progress=True)
        info["fit"] = {"seconds": round(time.perf_counter() - t0, 2), "load_before": load0,
                       "load_after": load_average(), **getattr(method, "fit_info_", {})}
        method.save(model_dir)
        info_path.write_text(json.dumps(info, indent=2))
    crf = None
    if args.crf:
        from unsup.crf import DenseCRF

        crf = DenseCRF(**parse_params(args.crf_param))
    for record in tqdm(records, desc=f"{args.method} -> {out}", unit="img"):
        label_path = out / "labels" / f"{record.id}.png"
        crf_path = out / "crf" / f"{record.id}.png"
        if label_path.is_file() and (crf is None or crf_path.is_file()):
            continue
        image = dataset.load(record).image
        t0 = time.perf_counter()
        seg = method.predict(image)
        seconds = time.perf_counter() - t0
        entry = {"seconds": round(seconds, 3), "load": load_average(),
                 "n_clusters": seg.info.get("n_clusters")}
        if crf is not None:
            t0 = time.perf_counter()
            refined = crf.refine_segmentation(image, seg)
            entry["crf_seconds"] = round(time.perf_counter() - t0, 3)
            write_label_map(crf_path, refined.labels)
        write_label_map(label_path, seg.labels)
        info["images"][record.id] = entry
        info_path.write_text(json.dumps(info, indent=2))
    times = [v["seconds"] for v in info["images"].values()]
    print(f"{out}: {len(times)} images, median predict {np.median(times):.3f} s "
          f"(load {load_average()})")


def _jsonable(value):
    from unsup.base import _jsonable as base_jsonable

    return base_jsonable(value)


# -- evaluate / table -------------------------------------------------------------------------


def cmd_evaluate(args) -> None:
    from unsup.evaluation import evaluate

    dataset = open_data(args)
    for pred in args.pred:
        pred = Path(pred)
        for sub in ("labels", "crf"):
            folder = pred / sub
            if not folder.is_dir():
                continue
            ids = {p.relative_to(folder).with_suffix("").as_posix()
                   for p in folder.rglob("*.png")}
            subset = dataset
            if len(ids) < len(dataset):
                from unsup.datasets import Dataset

                subset = Dataset(spec=dataset.spec,
                                 records=[r for r in dataset.records if r.id in ids],
                                 kind=dataset.kind, ignore_index=dataset.ignore_index,
                                 class_names=dataset.class_names,
                                 has_ground_truth=dataset.has_ground_truth,
                                 _loader=dataset._loader)
            out = pred / f"eval-{args.protocol}-{sub}"
            metrics = evaluate(args.protocol, folder, subset, out, n_jobs=args.jobs,
                               progress=True)
            keys = [k for k in metrics if any(s in k for s in ("miou", "mIoU", "pixel", "ap"))]
            print(pred, sub, {k: metrics[k] for k in keys[:8]})


def cmd_table(args) -> None:
    rows = []
    for pred in args.pred:
        pred = Path(pred)
        config = json.loads((pred / "config.json").read_text()) \
            if (pred / "config.json").is_file() else {}
        info = json.loads((pred / "info.json").read_text()) \
            if (pred / "info.json").is_file() else {"images": {}}
        times = [v["seconds"] for v in info["images"].values()]
        for metrics_file in sorted(pred.glob("eval-*/metrics.json")):
            metrics = json.loads(metrics_file.read_text())
            rows.append((pred.name, metrics_file.parent.name, config.get("params", {}), metrics,
                         np.median(times) if times else float("nan")))
    for name, ev, params, metrics, sec in rows:
        short = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        print(f"| {name} | {ev} | {json.dumps(_short_params(params))} | "
              + ", ".join(f"{k}={v:.4g}" for k, v in list(short.items())[:6])
              + f" | {sec:.2f} |")


def _short_params(params: dict) -> dict:
    defaults = {}
    try:
        from unsup.registry import get_method, method_parameters

        defaults = method_parameters(get_method("kmeans"))
    except Exception:  # noqa: BLE001 - only used to shorten the display
        pass
    return {k: v for k, v in params.items()
            if k in defaults and _jsonable(defaults[k]) != v and k != "cache_dir"}


# -- speed ----------------------------------------------------------------------------------------


def cmd_speed(args) -> None:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    from unsup.clustering import fit_kmeans, squared_distances

    rng = np.random.default_rng(0)
    x = rng.random((args.n, args.dim), dtype=np.float32)
    print(f"data {x.shape} float32, k={args.k}, iterations={args.iters}, load {load_average()}",
          flush=True)

    def inertia(centroids):
        total = 0.0
        for start in range(0, x.shape[0], 1_000_000):
            total += float(squared_distances(x[start:start + 1_000_000], centroids)
                           .min(axis=1).sum())
        return total / x.shape[0]

    results = []

    def timed(name, fit):
        # wall time and this process's CPU time (all threads): on a shared machine the CPU
        # time is the comparable number, the wall time depends on what else runs
        load0 = load_average()
        w0, c0 = time.perf_counter(), time.process_time()
        centroids = fit()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        results.append((name, wall, cpu, inertia(centroids), f"{load0}-{load_average()}"))
        print(results[-1], flush=True)

    timed("faiss Kmeans (all points, random init)",
          lambda: fit_kmeans(x, args.k, n_iter=args.iters, seed=0, init="random"))
    if not args.skip_sklearn:
        # MiniBatchKMeans costs the same per epoch (tol=0, no early stop): --sklearn-epochs
        # below --iters times fewer epochs and scales the time to the same number of passes
        epochs = args.sklearn_epochs or args.iters
        timed(f"sklearn MiniBatchKMeans (batch {args.batch}, {epochs} epochs)",
              lambda: MiniBatchKMeans(n_clusters=args.k, max_iter=epochs,
                                      batch_size=args.batch, n_init=1, init="random",
                                      random_state=0, tol=0.0, max_no_improvement=None,
                                      compute_labels=False).fit(x).cluster_centers_
              .astype(np.float32))
    if args.lloyd:
        timed(f"sklearn KMeans (Lloyd, {args.iters} iterations)",
              lambda: KMeans(n_clusters=args.k, max_iter=args.iters, n_init=1, init="random",
                             random_state=0, tol=0.0, algorithm="lloyd").fit(x)
              .cluster_centers_.astype(np.float32))
        if epochs != args.iters:
            name, wall, cpu, inert, load = results[-1]
            scale = args.iters / epochs
            results.append((f"... scaled to {args.iters} epochs (x{scale:g})", wall * scale,
                            cpu * scale, float("nan"), load))
    print("| implementation | wall s | CPU s | mean squared distance | load avg |")
    print("|---|---|---|---|---|")
    for name, wall, cpu, inert, load in results:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {inert:.4f} | {load} |")
    faiss_cpu = results[0][2]
    for name, _, cpu, _, _ in results[1:]:
        print(f"{name}: {cpu / faiss_cpu:.1f}x the CPU time of faiss")


# -- features -------------------------------------------------------------------------------------


def cmd_features(args) -> None:
    import torch

    from unsup.features import DenseFeatureExtractor
    from unsup.io import read_image

    files = sorted(Path(args.images).glob("*.jpg"))[: args.limit]
    if not files:
        raise SystemExit(f"{args.images}: no .jpg images")
    images = [read_image(f) for f in files]
    print(f"{len(images)} images, e.g. {images[0].shape}, torch threads "
          f"{torch.get_num_threads()}, load {load_average()}")
    print("| backbone | max_side | feature grid x D | median s / image | load avg |")
    print("|---|---|---|---|---|")
    for backbone in args.backbones:
        for max_side in args.max_side:
            ex = DenseFeatureExtractor(backbone, max_side=max_side or None, device=args.device,
                                       batch_size=1)
            ex(images[0])  # warm-up: builds the encoder
            seconds = []
            load0 = load_average()
            for image in images:
                t0 = time.perf_counter()
                f = ex(image)
                seconds.append(time.perf_counter() - t0)
            print(f"| {backbone} | {max_side or 'none'} | {f.features.shape} | "
                  f"{np.median(seconds):.3f} | {load0}-{load_average()} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def data_args(p):
        p.add_argument("--data", required=True, help="dataset spec (unsup.datasets)")
        p.add_argument("--split", default=None)
        p.add_argument("--ignore-index", type=int, default=None)

    p = sub.add_parser("run")
    data_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="kmeans")
    p.add_argument("--param", action="append", help="key=value (JSON value or string)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--crf", action="store_true", help="also write DenseCRF-refined labels")
    p.add_argument("--crf-param", action="append")
    p.add_argument("--offset", type=int, default=0,
                   help="skip this many images (sorted by id) before --limit")
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("evaluate")
    data_args(p)
    p.add_argument("--protocol", required=True)
    p.add_argument("--pred", nargs="+", required=True)
    p.add_argument("--jobs", type=int, default=1)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("table")
    p.add_argument("--pred", nargs="+", required=True)
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("speed")
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--batch", type=int, default=1024, help="MiniBatchKMeans batch (its default)")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--sklearn-epochs", type=int, default=None,
                   help="run MiniBatchKMeans for this many epochs (default --iters) and scale")
    p.add_argument("--lloyd", action="store_true", help="also time sklearn KMeans (Lloyd)")
    p.set_defaults(func=cmd_speed)

    p = sub.add_parser("features")
    p.add_argument("--images", required=True)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--backbones", nargs="+", default=["efficientnet-lite0", "efficientnet-lite2"])
    p.add_argument("--max-side", nargs="+", type=int, default=[0])
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_features)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
