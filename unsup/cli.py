"""The ``unsup`` command line: segment, train, evaluate, compare, methods.

Each subcommand parses its options and calls one library function
(:func:`unsup.workflows.segment`, :func:`unsup.workflows.train`,
:func:`unsup.compare.compare`, :func:`unsup.evaluation.evaluate`), then prints a summary. The
option definitions of every subcommand are in this file, so the whole CLI reads in one place;
no library module imports it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from unsup.argtypes import fraction, positive_float, positive_int

__all__ = ["main", "console_main", "parse_key_values"]


def parse_value(text: str):
    """Parse a ``--param`` value: bool / None / int / float / list literal, else the string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, int | float | list | tuple) else text


def parse_key_values(items: list[str] | None, *, option: str) -> dict:
    """Turn ``["k=v", ...]`` into a dict with parsed values; a clear error for bad items."""
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"unsup: error: {option} expects KEY=VALUE, got {item!r}")
        params[key.strip().replace("-", "_")] = parse_value(value)
    return params


def _add_dataset_options(parser):
    parser.add_argument("--split", default=None,
                        help="split of bsds500/voc datasets (train, val, test; default val)")
    parser.add_argument("--ignore-index", type=int, default=None, metavar="N",
                        help="void label of masks:... datasets (COCO crowd: 255)")


def _add_training_options(parser) -> None:
    """The options ``train`` and ``compare`` share."""
    _add_dataset_options(parser)
    parser.add_argument("--classes", default=None, metavar="A,B,...",
                        help="keep only these classes (names or label ids, comma-separated): "
                             "they become labels 1..K, every other class background")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="training epochs (default: the method's `epochs` parameter)")
    parser.add_argument("--max-minutes", type=positive_float, default=None, metavar="M",
                        help="time budget of the training loop; stops cleanly with a usable "
                             "checkpoint")
    parser.add_argument("--param", "-p", action="append", metavar="KEY=VALUE",
                        help="method hyper-parameter (repeatable; nested groups as "
                             "group__key, e.g. network__lr=0.01)")
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


def _class_list(text: str | None) -> list[str] | None:
    if not text:
        return None
    items = [c.strip() for c in text.split(",") if c.strip()]
    if not items:
        raise SystemExit("unsup: error: --classes is empty")
    return items


def _error(exc: Exception) -> int:
    """Print a refused command's reason; its exit code."""
    # str(KeyError) quotes its message; show the message itself
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"unsup: error: {message}", file=sys.stderr)
    return 2


def _user_errors() -> tuple[type[Exception], ...]:
    from unsup.datasets import DatasetError
    from unsup.io import ImageReadError
    from unsup.runner import RunConflictError
    from unsup.workflows import WorkflowError

    return (WorkflowError, RunConflictError, DatasetError, ImageReadError, KeyError,
            ValueError, FileNotFoundError)


# ------------------------------------------------------------------------------- subcommands


def cmd_methods(args) -> int:
    from unsup.registry import available_methods, describe_parameters

    for name, cls in available_methods().items():
        print(f"{name:16s} {cls.summary}  [learns from: {cls.supervision}]")
        for line in describe_parameters(cls):
            print("    " + line)
    return 0


def cmd_segment(args) -> int:
    from unsup import workflows

    try:
        outcome = workflows.segment(
            args.input, args.out, method=args.method, model=args.model,
            params=parse_key_values(args.param, option="--param"), seed=args.seed,
            crf=args.crf, crf_params=args.crf_param, hierarchy=args.hierarchy,
            hierarchy_strength=args.hierarchy_strength, overwrite=args.overwrite,
            split=args.split, ignore_index=args.ignore_index, save_model=args.save_model,
            progress=not args.no_progress, command=sys.argv)
    except _user_errors() as exc:
        return _error(exc)
    result = outcome.run
    print(f"{len(result.done)} segmented, {len(result.skipped)} already done, "
          f"{len(result.failures)} failed, of {outcome.n_images} image(s) -> {args.out}")
    if outcome.failures:
        print(f"\n{len(outcome.failures)} image(s) failed:", file=sys.stderr)
        for f in outcome.failures:
            print(f"  {f['file']}: {f['error']}", file=sys.stderr)
        return 1
    return 0


def cmd_train(args) -> int:
    from unsup import workflows

    try:
        record = workflows.train(
            args.method, args.data, args.out,
            params=parse_key_values(args.param, option="--param"), seed=args.seed,
            split=args.split, ignore_index=args.ignore_index,
            classes=_class_list(args.classes), boxes=args.boxes,
            boxes_from_masks=args.boxes_from_masks, val=args.val,
            val_fraction=args.val_fraction, epochs=args.epochs, max_minutes=args.max_minutes,
            resume=args.resume, progress=not args.no_progress, command=sys.argv)
    except _user_errors() as exc:
        return _error(exc)
    stopped = record["history"].get("stopped", "completed")
    print(f"trained {record['method']} in {record['fit_seconds'] / 60:.1f} min ({stopped}) "
          f"-> {args.out}" + ("" if stopped != "time_budget" else "; continue with --resume"))
    return 0


def cmd_compare(args) -> int:
    from unsup.compare import CompareError, compare

    params = parse_key_values(args.param, option="--param")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        if not methods:
            raise ValueError("--methods is empty")
        if args.val and args.val_fraction:
            raise ValueError("give --val or --val-fraction, not both")
        result = compare(args.train, args.test, methods, args.out, epochs=args.epochs,
                         max_minutes=args.max_minutes, params=params, seed=args.seed,
                         crf=args.crf, split=args.split, test_split=args.test_split,
                         ignore_index=args.ignore_index, classes=_class_list(args.classes),
                         boxes=args.boxes, val=args.val, val_fraction=args.val_fraction,
                         n_overlays=args.overlays, progress=not args.no_progress)
    except (CompareError, *_user_errors()) as exc:
        return _error(exc)
    print(result["table_markdown"])
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def cmd_evaluate(args) -> int:
    from unsup.datasets import DatasetError, open_dataset
    from unsup.evaluation import evaluate
    from unsup.evaluation.harness import EvaluationError
    from unsup.evaluation.predictions import PredictionError
    from unsup.evaluation.report import HEADLINE, format_value
    from unsup.io import ImageReadError

    try:
        dataset = open_dataset(args.gt, split=args.split, ignore_index=args.ignore_index)
        metrics = evaluate(
            args.protocol, args.pred, dataset, args.out, thresholds=args.thresholds,
            pred_type=args.pred_type, many_to_one=args.many_to_one, n_jobs=args.jobs,
            progress=not args.no_progress, correspondence=args.correspondence)
    except (EvaluationError, PredictionError, DatasetError, ImageReadError) as exc:
        print(f"unsup evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.protocol} on {dataset.spec} ({len(dataset)} images), predictions {args.pred}")
    width = max(len(k) for k in HEADLINE[args.protocol])
    for key in HEADLINE[args.protocol]:
        print(f"  {key:<{width}}  {format_value(metrics.get(key))}")
    per_class = metrics.get("per_class_iou")
    if per_class:
        shown = sorted(((v, k) for k, v in per_class.items() if v is not None))
        if shown:
            print("  lowest class IoU: " + ", ".join(f"{k} {v:.3f}" for v, k in shown[:3]))
    print(f"report: {args.out}/report.html (metrics.json, per_image.csv, report.md)")
    return 0


# ------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unsup",
        description="Unsupervised and weakly supervised image segmentation lab.",
    )
    parser.add_argument("--version", action="version", version=f"unsup {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("methods", help="list the methods and their parameters")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser(
        "segment", help="segment a folder (or dataset) of images",
        description="Segment every image of INPUT; writes OUT/labels/<id>.png, "
                    "OUT/overlays/<id>.png and OUT/run.json. Rerunning skips finished images.")
    p.add_argument("input", metavar="INPUT",
                   help="a folder, an image file, or a dataset spec (folder:DIR, "
                        "masks:IMAGES:MASKS, bsds500:ROOT, voc:ROOT, coco:JSON:IMAGES)")
    p.add_argument("--method", "-m", help="method name (see `unsup methods`)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--param", "-p", action="append", metavar="KEY=VALUE",
                   help="method hyper-parameter (repeatable), by its __init__ name")
    p.add_argument("--model", help="use a saved / trained model folder instead of fitting")
    p.add_argument("--save-model", metavar="DIR",
                   help="after fitting a method on INPUT, save the model here")
    p.add_argument("--crf", action="store_true", help="refine with the dense CRF")
    p.add_argument("--crf-param", action="append", metavar="KEY=VALUE",
                   help="dense-CRF parameter (repeatable; implies --crf)")
    p.add_argument("--hierarchy", action="store_true",
                   help="also write OUT/hierarchy/<id>.png ultrametric contour maps")
    p.add_argument("--hierarchy-strength", default="auto",
                   # = unsup.hierarchy.STRENGTHS (a test checks), literal so --help stays light
                   choices=("auto", "scores", "gradient", "combined"),
                   help="boundary strength of the hierarchical merging (auto: the method's "
                        "choice, else its scores when it has them, else the image gradient)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="recompute finished images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_dataset_options(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("train", help="train a method on a dataset (boxes, masks or unlabeled)",
                       description="Train a method and save it to a model folder.")
    p.add_argument("--method", "-m", required=True,
                   help="a method that learns (boxsup, supervised, ...; see `unsup methods`, "
                        "`learns from` other than none)")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="training dataset spec (masks:IMAGES:MASKS, coco:JSON:IMAGES, "
                        "voc:ROOT, folder:DIR, ...)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR",
                   help="model folder: model.json + weights, checkpoints, history, curves "
                        "(and boxsup's mined masks)")
    p.add_argument("--boxes-from-masks", action="store_true",
                   help="derive boxes from the masks (tight box per connected component of "
                        "each class); box-supervised methods never see the masks")
    p.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in MODEL_DIR")
    _add_training_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score predictions against ground truth",
                       description="Evaluate a folder of predictions with a protocol "
                                   "(bsds, matched, hungarian, semantic).")
    from unsup.evaluation.correspond import METHODS as CORRESPONDENCES
    from unsup.evaluation.harness import PROTOCOLS
    from unsup.evaluation.predictions import PRED_TYPES

    p.add_argument("--protocol", required=True, choices=PROTOCOLS,
                   help="bsds: Berkeley benchmark (boundaries, covering, PRI, VOI); matched: "
                        "per-image one-to-one segment mIoU; hungarian: dataset-level "
                        "cluster-to-class matching; semantic: class ids")
    p.add_argument("--pred", required=True, metavar="DIR",
                   help="prediction folder: <id>.png label maps, <id>.mat (ucm2 / segs), a lab "
                        "hierarchy folder or soft boundary PNGs")
    p.add_argument("--gt", required=True, metavar="SPEC",
                   help="dataset spec with ground truth, e.g. bsds500:ROOT, masks:IMAGES:MASKS, "
                        "voc:ROOT, coco:JSON:IMAGES")
    p.add_argument("--out", required=True, metavar="REPORT_DIR",
                   help="report folder: metrics.json, per_image.csv, report.md/html")
    p.add_argument("--thresholds", type=positive_int, default=99, metavar="N",
                   help="bsds: number of thresholds for hierarchies and soft boundary maps "
                        "(default 99, as the benchmark)")
    p.add_argument("--pred-type", default="auto", choices=PRED_TYPES,
                   help="how to read the predictions (default: auto-detect; soft boundary "
                        "PNGs need 'boundaries')")
    p.add_argument("--many-to-one", action="store_true",
                   help="hungarian: map every cluster to its majority class")
    p.add_argument("--jobs", type=positive_int, default=2, metavar="N",
                   help="worker processes (default 2)")
    p.add_argument("--correspondence", choices=CORRESPONDENCES, default="assignment",
                   help="bsds boundary matching: exact assignment (default) or the official "
                        "CSA code (slow, for cross-checks)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_dataset_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="train several methods alike and compare them",
                       description="Train methods with the same network, budget and seed and "
                                   "evaluate them on a test set.",
                       epilog="--param KEY=VALUE applies to every method that has KEY; "
                              "METHOD.KEY=VALUE to one method only.")
    p.add_argument("--train", required=True, metavar="SPEC", help="training dataset spec")
    p.add_argument("--test", required=True, metavar="SPEC", help="test dataset spec (with masks)")
    p.add_argument("--methods", required=True, metavar="A,B,...",
                   help="trainable methods to compare, e.g. boxsup,supervised")
    p.add_argument("--out", required=True, metavar="REPORT_DIR",
                   help="report folder: compare.json, compare.md, report.html, models/, "
                        "predictions/")
    p.add_argument("--test-split", default=None, help="split of the test dataset")
    p.add_argument("--crf", action="store_true",
                   help="also report every method refined by the dense CRF")
    p.add_argument("--overlays", type=int, default=6, metavar="N",
                   help="test images shown side by side in report.html (default 6)")
    _add_training_options(p)
    p.set_defaults(func=cmd_compare)
    return parser


def _version() -> str:
    from unsup import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # a user of the command needs the sentence, not the library line that raised it
    print(f"unsup: warning: {message}", file=sys.stderr if file is None else file)


def console_main() -> int:
    """The ``unsup`` executable: :func:`main` with warnings printed as one line each."""
    import warnings

    warnings.showwarning = _show_warning
    return main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console_main())
