"""Benchmark W-Net and the shared hierarchical merging on BSDS500 (docs/benchmarks/wnet.md).

One command runs every part (each skippable) and writes ``OUT/results.json`` and
``OUT/results.md``::

    python scripts/bench_wnet.py --bsds ../shared/data/bsds500 --split val \
        --model runs/wnet_train --out runs/bench_wnet \
        --ablation full=runs/abl_full --ablation recon=runs/abl_recon

Parts
-----
segment + evaluate
    ``unsup segment`` (in this process) on the split for W-Net (``--model``) and the ``felzenszwalb`` and
    ``kmeans-color`` baselines, each twice: without and with the dense CRF, both with
    ``--hierarchy``. Then ``unsup evaluate --protocol bsds`` on every labels folder (the method
    alone / + CRF: one segmentation per image, so ODS = OIS) and every hierarchy folder
    (+ hierarchy / + CRF + hierarchy: 99 thresholds). Existing outputs are reused (the runner
    and the evaluation skip finished work), so an interrupted benchmark continues.
ablation
    The same for each ``--ablation NAME=MODEL_DIR`` (W-Net alone and + CRF + hierarchy).
timing
    Seconds per image of W-Net inference, CRF, and hierarchy construction on the first
    ``--n-timing`` images (in this process, one image at a time), plus the load average.
memory
    Peak resident memory added by one forward + backward pass of the soft n-cut loss
    (224 x 224, K = 64, batch 1; and the training configuration), each measured in a fresh
    subprocess from ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METRICS = ("covering.ods", "covering.ois", "pri.ods", "pri.ois", "voi.ods", "voi.ois",
           "boundary.ods_f", "boundary.ois_f")  # keys of the harness's metrics.json


def _run(argv: list[str], log: Path) -> None:
    """``unsup ARGV`` in this process (one interpreter start for the whole benchmark)."""
    from unsup.cli import main as unsup_main

    line = "unsup " + " ".join(argv)
    print("$", line, flush=True)
    with open(log, "a") as fh:
        fh.write(f"$ {line}\n")
    code = unsup_main(argv)
    if code != 0:
        raise RuntimeError(f"command failed ({code}): {line}")


def _segment(args, name: str, method_args: list[str], crf: bool, out: Path) -> Path:
    run_dir = out / "runs" / name
    cmd = ["segment", f"bsds500:{args.bsds}", "--split", args.split, "--out", str(run_dir),
           "--hierarchy", "--no-progress", *method_args]
    if crf:
        cmd.append("--crf")
    _run(cmd, out / "commands.log")
    return run_dir


def _evaluate(args, pred: Path, report: Path, out: Path) -> dict:
    if not (report / "metrics.json").is_file():
        cmd = ["evaluate", "--protocol", "bsds", "--pred", str(pred), "--gt",
               f"bsds500:{args.bsds}", "--split", args.split, "--out", str(report), "--jobs",
               str(args.jobs), "--no-progress"]
        _run(cmd, out / "commands.log")
    return json.loads((report / "metrics.json").read_text())


def _pick(metrics: dict) -> dict:
    """The table's numbers from a metrics.json, whatever its nesting."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}_" if prefix or k else k, v)
        elif isinstance(value, int | float):
            flat[prefix.rstrip("_").lower()] = value

    walk("", metrics)
    return flat


def _timing(args, out: Path) -> dict:
    import numpy as np

    from unsup.crf import DenseCRF
    from unsup.datasets import open_dataset
    from unsup.hierarchy import ultrametric_contour_map
    from unsup.registry import load_method

    method = load_method(args.model)
    method.set_params(n_threads=args.threads)
    crf = DenseCRF()
    dataset = open_dataset(f"bsds500:{args.bsds}", split=args.split)
    times = {"inference": [], "crf": [], "hierarchy": []}
    for i in range(min(args.n_timing, len(dataset))):
        image = dataset.load(i).image
        t0 = time.perf_counter()
        seg = method.predict(image)
        t1 = time.perf_counter()
        refined = crf.refine_segmentation(image, seg)
        t2 = time.perf_counter()
        ultrametric_contour_map(image, refined)
        t3 = time.perf_counter()
        times["inference"].append(t1 - t0)
        times["crf"].append(t2 - t1)
        times["hierarchy"].append(t3 - t2)
    return {"median_seconds": {k: round(float(np.median(v)), 3) for k, v in times.items()},
            "n_images": len(times["inference"]), "torch_threads": args.threads,
            "loadavg": os.getloadavg()}


_MEMORY_SNIPPET = """
import resource, sys, time, torch
sys.path.insert(0, {root!r})
from methods.wnet import soft_ncut_loss
torch.manual_seed(0)
b, k, s = {b}, {k}, {s}
logits = torch.randn(b, k, s, s, requires_grad=True)
image = torch.rand(b, 3, s, s) * 255
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
loss = soft_ncut_loss(torch.softmax(logits, 1), image)
loss.backward()
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) / 1024, seconds)
"""


def _memory() -> list[dict]:
    rows = []
    for b, k, s in ((1, 64, 224), (8, 32, 96), (8, 64, 224)):
        code = _MEMORY_SNIPPET.format(root=str(ROOT), b=b, k=k, s=s)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        mb, seconds = map(float, res.stdout.split())
        rows.append({"batch": b, "n_classes": k, "size": s, "peak_extra_mb": round(mb, 1),
                     "seconds_fwd_bwd": round(seconds, 3),
                     "probs_tensor_mb": round(b * k * s * s * 4 / 2 ** 20, 1)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bsds", required=True, type=Path, help="BSDS500 root")
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", type=Path, help="trained W-Net model directory")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME=MODEL_DIR")
    parser.add_argument("--parts", default="segment,ablation,timing,memory",
                        help="comma-separated subset of: segment, ablation, timing, memory")
    parser.add_argument("--baselines", default="felzenszwalb,kmeans-color")
    parser.add_argument("--jobs", type=int, default=1, help="evaluation worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for W-Net")
    parser.add_argument("--n-timing", type=int, default=10)
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("rows", {})

    def save():
        results["loadavg_at_save"] = os.getloadavg()
        results_path.write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(_markdown(results))

    systems = []
    if "segment" in parts:
        if args.model is not None:
            systems.append(("wnet", ["--model", str(args.model), "--param",
                                     f"n_threads={args.threads}"]))
        systems += [(b, ["--method", b]) for b in args.baselines.split(",") if b]
    if "ablation" in parts:
        for item in args.ablation:
            name, _, model = item.partition("=")
            systems.append((f"ablation-{name}", ["--model", model, "--param",
                                                 f"n_threads={args.threads}"]))
    for name, method_args in systems:
        for crf in (False, True):
            if name.startswith("ablation") and not crf:
                variants = [("", "labels")]
            elif name.startswith("ablation"):
                variants = [(" + CRF + hierarchy", "hierarchy")]
            else:
                variants = ([("", "labels"), (" + hierarchy", "hierarchy")] if not crf else
                            [(" + CRF", "labels"), (" + CRF + hierarchy", "hierarchy")])
            run_name = f"{name}{'-crf' if crf else ''}"
            t0 = time.time()
            run_dir = _segment(args, run_name, method_args, crf, out)
            run = json.loads((run_dir / "run.json").read_text())
            for suffix, folder in variants:
                row = f"{name}{suffix}"
                metrics = _evaluate(args, run_dir / folder, out / "reports" / f"{run_name}-{folder}",
                                    out)
                results["rows"][row] = {"metrics": _pick(metrics), "run": str(run_dir),
                                        "segment_median_seconds":
                                            run.get("summary", {}).get("median_seconds"),
                                        "model": run.get("model")}
                save()
            print(f"{run_name}: {time.time() - t0:.0f} s", flush=True)
    if "timing" in parts and args.model is not None:
        results["timing"] = _timing(args, out)
        save()
    if "memory" in parts:
        results["ncut_memory"] = _memory()
        save()
    save()
    print((out / "results.md").read_text())
    return 0


def _markdown(results: dict) -> str:
    lines = ["| system | SC ODS | SC OIS | PRI ODS | PRI OIS | VI ODS | VI OIS | bdry F ODS | "
             "bdry F OIS |", "|---|" + "---|" * 8]
    for row, data in results.get("rows", {}).items():
        m = data["metrics"]
        cells = []
        for key in METRICS:
            value = m.get(key)
            cells.append("-" if value is None else f"{value:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if "timing" in results:
        lines.append("")
        lines.append(f"timing: {json.dumps(results['timing'])}")
    if "ncut_memory" in results:
        lines.append("")
        lines.append(f"n-cut memory: {json.dumps(results['ncut_memory'])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
