"""Train a W-Net on the images of one or more dataset splits (labels unused).

Used to produce the model shipped with the lab (methods/weights/wnet_default/) and the
models of docs/benchmarks/wnet.md::

    # evaluation model: BSDS500 train images only (36 epochs, ~30 CPU minutes)
    python scripts/train_wnet_default.py --data bsds500:../shared/data/bsds500 \
        --split train --out runs/wnet_train --max-minutes 38 --n-threads 1
    # shipped model: BSDS500 train + val images, then copied into the package
    python scripts/train_wnet_default.py --data bsds500:../shared/data/bsds500 \
        --split train --split val --out runs/wnet_trainval --max-minutes 45 --n-threads 1 \
        --install

``--param KEY=VALUE`` sets any W-Net hyper-parameter (``ncut_weight=0`` for the ablation).
The run can be interrupted and continued with ``--resume``. The model directory holds
model.json, weights.pt, training.json; training/ holds checkpoint.pt, history.json and
curves.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class _Chain:
    """Re-iterable concatenation of several datasets' samples (annotations dropped)."""

    def __init__(self, datasets):
        self.datasets = datasets

    def __iter__(self):
        return itertools.chain.from_iterable(d.without_annotations() for d in self.datasets)


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset spec, e.g. bsds500:ROOT")
    parser.add_argument("--split", action="append", default=None,
                        help="split(s) to train on (repeatable); default: the spec's default")
    parser.add_argument("--out", required=True, type=Path, help="model directory to write")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--n-threads", type=int, default=None,
                        help="torch threads (1 is fastest on a busy shared CPU)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--install", action="store_true",
                        help="copy the trained model into methods/weights/wnet_default/")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from unsup.base import RunOptions
    from unsup.datasets import open_dataset
    from unsup.registry import create_method

    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--param expects KEY=VALUE, got {item!r}")
        params[key.strip()] = _parse_value(value.strip())
    if args.n_threads is not None:
        params["n_threads"] = args.n_threads
    if args.epochs is not None:
        params["network__epochs"] = args.epochs  # recorded in model.json
    splits = args.split or [None]
    datasets = [open_dataset(args.data, split=s) if s else open_dataset(args.data)
                for s in splits]
    samples = _Chain(datasets)
    method = create_method("wnet", **params)
    t0 = time.time()
    method.fit(samples, run=RunOptions(out_dir=args.out / "training",
                                       max_minutes=args.max_minutes, resume=args.resume),
               progress=not args.no_progress)
    minutes = (time.time() - t0) / 60
    previous = args.out / "training.json"
    invocations = []
    if args.resume and previous.is_file():
        invocations = json.loads(previous.read_text()).get("invocations", [])
    invocations.append({"command": " ".join(sys.argv), "wall_minutes": round(minutes, 2),
                        "loadavg_at_end": os.getloadavg(),
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    method.training_.update({
        "data": args.data, "splits": [s for s in splits if s], "n_images": sum(map(len, datasets)),
        "labels_used": False, "machine": platform.platform(), "invocations": invocations,
    })
    method.save(args.out)
    print(json.dumps(method.training_, indent=2, default=str))
    if args.install:
        from methods.wnet import DEFAULT_MODEL_DIR

        DEFAULT_MODEL_DIR.mkdir(parents=True, exist_ok=True)
        for name in ("model.json", "weights.pt", "training.json"):
            shutil.copyfile(args.out / name, DEFAULT_MODEL_DIR / name)
            # atomic writes create 0600 files; package data must be readable by everyone
            os.chmod(DEFAULT_MODEL_DIR / name, 0o644)
        print(f"installed into {DEFAULT_MODEL_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
