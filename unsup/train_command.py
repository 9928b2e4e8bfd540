"""``unsup train`` and ``unsup compare``: command-line glue.

``unsup/cli.py`` calls :func:`configure_train_parser` / :func:`configure_compare_parser` on
the sub-parsers and :func:`run_train` / :func:`run_compare` with the parsed arguments.

How ``unsup train`` runs a method (any registered method whose ``supervision`` is not
``"none"``)::

    dataset = open_dataset(--data, split=, ignore_index=, boxes=--boxes,
                           boxes_from_masks=--boxes-from-masks)     [+ --classes view]
    samples = BoxesOnlyDataset(dataset)      if supervision == "boxes"  (masks stripped)
              dataset                        if supervision == "masks"
              dataset.without_annotations()  if supervision == "unlabeled"
    method = create_method(--method, **--param)      (seed from --seed unless given)
    method.fit(samples, val_samples=VAL, out_dir=MODEL_DIR, epochs=--epochs,
               max_minutes=--max-minutes, resume=--resume, progress=True)
    method.save(MODEL_DIR)

Methods whose ``fit`` does not take these options are called as ``fit(samples,
progress=...)`` (``--epochs`` / ``--max-minutes`` / ``--resume`` are then refused).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

from unsup.argtypes import fraction, positive_float, positive_int

__all__ = ["configure_train_parser", "run_train", "configure_compare_parser", "run_compare",
           "open_training_data", "fit_method", "LOOP_OPTIONS"]

#: Keyword options of ``fit`` for trainable methods following the loop convention.
LOOP_OPTIONS = ("val_samples", "out_dir", "epochs", "max_minutes", "resume")








def _report_error(exc: Exception) -> int:
    """Print a command error the user can act on; the exit code of a refused command."""
    # str(KeyError) quotes its message; show the message itself
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"unsup: error: {message}", file=sys.stderr)
    return 2


def _add_common(parser) -> None:
    parser.add_argument("--split", default=None,
                        help="split of bsds500/voc datasets (train, val, test)")
    parser.add_argument("--ignore-index", type=int, default=None, metavar="N",
                        help="void label of masks:... datasets (COCO crowd: 255)")
    parser.add_argument("--classes", default=None, metavar="A,B,...",
                        help="keep only these classes (names or label ids, comma-separated): "
                             "they become labels 1..K, every other class background")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="training epochs (default: the method's `epochs` parameter)")
    parser.add_argument("--max-minutes", type=positive_float, default=None, metavar="M",
                        help="time budget of the training loop; stops cleanly with a usable "
                             "checkpoint")
    parser.add_argument("--param", "-p", action="append", metavar="KEY=VALUE",
                        help="method hyper-parameter (repeatable)")
    parser.add_argument("--boxes", default=None, metavar="PATH",
                        help="box annotations: CSV (image,x0,y0,x1,y1,label), COCO json or a "
                             "folder of VOC XML")
    parser.add_argument("--val", default=None, metavar="SPEC",
                        help="validation dataset spec (with masks): per-epoch mIoU")
    parser.add_argument("--val-fraction", type=fraction, default=None, metavar="F",
                        help="hold out this fraction of the training images (seeded) as "
                             "validation instead of --val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def configure_train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` options to ``parser``."""
    parser.add_argument("--method", "-m", required=True,
                        help="a method that learns (boxsup, supervised, ...; see "
                             "`unsup methods`, `learns from` other than none)")
    parser.add_argument("--data", required=True, metavar="SPEC",
                        help="training dataset spec (masks:IMAGES:MASKS, coco:JSON:IMAGES, "
                             "voc:ROOT, folder:DIR, ...)")
    parser.add_argument("--out", required=True, metavar="MODEL_DIR",
                        help="model folder: model.json + weights, checkpoints, history, "
                             "curves (and boxsup's mined masks)")
    parser.add_argument("--boxes-from-masks", action="store_true",
                        help="derive boxes from the masks (tight box per connected component "
                             "of each class); box-supervised methods never see the masks")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run whose checkpoint is in MODEL_DIR")
    _add_common(parser)
    return parser


# ---------------------------------------------------------------------------------------------
# shared helpers


class CommandError(Exception):
    """A user error: printed as ``unsup: error: ...`` with exit code 2."""


def _class_list(text: str | None) -> list[str] | None:
    if not text:
        return None
    items = [c.strip() for c in text.split(",") if c.strip()]
    if not items:
        raise CommandError("--classes is empty")
    return items


def open_training_data(spec: str, *, split=None, ignore_index=None, boxes=None,
                       boxes_from_masks=False, classes=None, val_fraction=None, seed=0):
    """Open a dataset for training, optionally restricted to ``classes`` and split into
    (train, held-out validation)."""
    from unsup.datasets import open_dataset
    from unsup.training import restrict_classes, split_dataset

    dataset = open_dataset(spec, split=split, ignore_index=ignore_index, boxes=boxes,
                           boxes_from_masks=boxes_from_masks)
    if classes:
        dataset = restrict_classes(dataset, classes)
    if val_fraction:
        return split_dataset(dataset, val_fraction, seed=seed)
    return dataset, None


def samples_for(method_cls, dataset):
    """What a method of this kind of supervision may see of ``dataset``."""
    from unsup.training import BoxesOnlyDataset

    kind = method_cls.supervision
    if kind == "boxes":
        if not dataset.has_boxes:
            raise CommandError(
                f"{dataset.spec}: method {method_cls.name!r} learns from boxes but the dataset "
                "has none; give --boxes PATH or --boxes-from-masks")
        return BoxesOnlyDataset(dataset)
    if kind == "masks":
        if not dataset.has_ground_truth:
            raise CommandError(f"{dataset.spec}: method {method_cls.name!r} learns from masks "
                               "but the dataset has no ground truth")
        return dataset
    if kind == "unlabeled":
        return dataset.without_annotations()
    raise CommandError(f"method {method_cls.name!r} does not learn (supervision "
                       f"{kind!r}); use `unsup segment` for it")


def follows_loop_convention(method) -> bool:
    """Whether ``method.fit`` takes the training-loop options (see the module docstring)."""
    try:
        params = inspect.signature(method.fit).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in LOOP_OPTIONS)


def fit_method(method, samples, *, val_samples=None, out_dir, epochs=None, max_minutes=None,
               resume=False, progress=True):
    """Call ``fit`` the way ``unsup train`` does and save the model to ``out_dir``.

    Returns
    -------
    float
        Wall seconds spent in ``fit`` (data caching included).
    """
    t0 = time.monotonic()
    if follows_loop_convention(method):
        method.fit(samples, val_samples=val_samples, out_dir=out_dir, epochs=epochs,
                   max_minutes=max_minutes, resume=resume, progress=progress)
    else:
        refused = [n for n, v in (("--epochs", epochs), ("--max-minutes", max_minutes),
                                  ("--resume", resume or None)) if v is not None]
        if refused:
            raise CommandError(f"method {method.name!r} does not use the training loop: "
                               f"{', '.join(refused)} not supported")
        method.fit(samples, progress=progress)
    seconds = time.monotonic() - t0
    method.save(out_dir)
    return seconds


def _create(method_name: str, params: dict, seed: int):
    from unsup.registry import create_method, get_method, method_parameters

    cls = get_method(method_name)
    params = dict(params)
    if "seed" not in params and "seed" in method_parameters(cls):
        params["seed"] = seed
    return cls, create_method(method_name, **params)


# ---------------------------------------------------------------------------------------------
# unsup train


def run_train(args: argparse.Namespace) -> int:
    """Run ``unsup train``; returns the exit code."""
    from unsup.base import params_to_json
    from unsup.cli import parse_key_values
    from unsup.datasets import DatasetError, open_dataset
    from unsup.io import ImageReadError, atomic_write_bytes
    from unsup.training import restrict_classes

    params = parse_key_values(args.param, option="--param")
    out = Path(args.out)
    try:
        if args.val and args.val_fraction:
            raise CommandError("give --val or --val-fraction, not both")
        cls, method = _create(args.method, params, args.seed)
        if cls.supervision == "none":
            raise CommandError(f"method {cls.name!r} does not learn; use `unsup segment`")
        classes = _class_list(args.classes)
        wants_boxes = cls.supervision == "boxes"
        dataset, val = open_training_data(
            args.data, split=args.split, ignore_index=args.ignore_index,
            boxes=args.boxes if wants_boxes else None,
            boxes_from_masks=args.boxes_from_masks and wants_boxes, classes=classes,
            val_fraction=args.val_fraction, seed=args.seed)
        if not wants_boxes and (args.boxes or args.boxes_from_masks):
            print(f"unsup train: note: {cls.name!r} learns from {cls.supervision}; "
                  "--boxes / --boxes-from-masks ignored", file=sys.stderr)
        if args.val:
            val = open_dataset(args.val, split=args.split, ignore_index=args.ignore_index)
            if classes:
                val = restrict_classes(val, classes)
        samples = samples_for(cls, dataset)
        settings = {"method": method.name, "params": params_to_json(method), "data": args.data,
                    "classes": classes, "boxes": args.boxes,
                    "boxes_from_masks": bool(args.boxes_from_masks), "seed": args.seed}
        _check_resume(out, settings, resume=args.resume)
        print(f"training {cls.name} on {len(samples)} image(s) of {args.data}"
              + (f" (validation: {len(val)} image(s))" if val is not None else "")
              + f" -> {out}", file=sys.stderr)
        seconds = fit_method(method, samples, val_samples=val, out_dir=out, epochs=args.epochs,
                             max_minutes=args.max_minutes, resume=args.resume,
                             progress=not args.no_progress)
    except (CommandError, KeyError, ValueError, FileNotFoundError, DatasetError,
            ImageReadError) as exc:
        return _report_error(exc)
    history = getattr(method, "history_", None) or {}
    record = {"method": method.name, "params": params_to_json(method), "data": args.data,
              "val": args.val, "val_fraction": args.val_fraction, "classes": classes,
              "boxes": args.boxes, "boxes_from_masks": bool(args.boxes_from_masks),
              "seed": args.seed, "epochs": args.epochs, "max_minutes": args.max_minutes,
              "resumed": bool(args.resume), "fit_seconds": round(seconds, 2),
              "history": history, "complete": history.get("stopped") != "time_budget",
              "command": sys.argv}
    atomic_write_bytes(out / "train.json", json.dumps(record, indent=2, default=str).encode())
    stopped = history.get("stopped", "completed")
    print(f"trained {method.name} in {seconds / 60:.1f} min ({stopped}) -> {out}"
          + ("" if stopped != "time_budget" else "; continue with --resume"))
    return 0


#: Settings of a training run that ``--resume`` must repeat exactly.
RESUME_KEYS = ("method", "params", "data", "classes", "boxes", "boxes_from_masks", "seed")


def _check_resume(out: Path, settings: dict, *, resume: bool) -> None:
    """Record a run's settings in ``out/train.json`` before training, so that ``--resume``
    can refuse to continue a checkpoint made with another method, decoder or data, naming
    the setting that differs (instead of failing deep inside ``load_state_dict``)."""
    from unsup.io import atomic_write_bytes, read_json
    from unsup.runner import describe_differences

    path = out / "train.json"
    if resume and path.is_file():
        previous = read_json(path, error=CommandError)
        differing = describe_differences(previous, settings, RESUME_KEYS)
        if differing:
            raise CommandError(f"{out}: --resume continues the run recorded in {path.name}, "
                               f"whose settings differ ({'; '.join(differing)}); repeat its "
                               "settings, or train into another folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({**settings, "complete": False}, indent=2,
                                        default=str).encode())


# ---------------------------------------------------------------------------------------------
# unsup compare


def configure_compare_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``compare`` options to ``parser``."""
    parser.add_argument("--train", required=True, metavar="SPEC", help="training dataset spec")
    parser.add_argument("--test", required=True, metavar="SPEC",
                        help="test dataset spec (with masks)")
    parser.add_argument("--methods", required=True, metavar="A,B,...",
                        help="trainable methods to compare, e.g. boxsup,supervised")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR",
                        help="report folder: compare.json, compare.md, report.html, models/, "
                             "predictions/")
    parser.add_argument("--test-split", default=None, help="split of the test dataset")
    parser.add_argument("--crf", action="store_true",
                        help="also report every method refined by the dense CRF")
    parser.add_argument("--overlays", type=int, default=6, metavar="N",
                        help="test images shown side by side in report.html (default 6)")
    _add_common(parser)
    parser.epilog = ("--param KEY=VALUE applies to every method that has KEY; "
                     "METHOD.KEY=VALUE to one method only.")
    return parser


def run_compare(args: argparse.Namespace) -> int:
    """Run ``unsup compare``; returns the exit code."""
    from unsup.cli import parse_key_values
    from unsup.compare import CompareError, compare
    from unsup.datasets import DatasetError
    from unsup.io import ImageReadError

    params = parse_key_values(args.param, option="--param")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        if not methods:
            raise CommandError("--methods is empty")
        if args.val and args.val_fraction:
            raise CommandError("give --val or --val-fraction, not both")
        result = compare(args.train, args.test, methods, args.out, epochs=args.epochs,
                         max_minutes=args.max_minutes, params=params, seed=args.seed,
                         crf=args.crf, split=args.split, test_split=args.test_split,
                         ignore_index=args.ignore_index, classes=_class_list(args.classes),
                         boxes=args.boxes, val=args.val, val_fraction=args.val_fraction,
                         n_overlays=args.overlays, progress=not args.no_progress)
    except (CommandError, CompareError, KeyError, ValueError, FileNotFoundError, DatasetError,
            ImageReadError) as exc:
        return _report_error(exc)
    print(result["table_markdown"])
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0
