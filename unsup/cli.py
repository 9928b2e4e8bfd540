"""The ``unsup`` command line: segment, train, evaluate, compare, methods.

Each subcommand is a thin layer over the Python API; the argument definitions of every
subcommand are in this file so the whole CLI can be read in one place (``evaluate``'s options
come from the harness, which owns them).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

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
    parser.add_argument("--ignore-index", type=int, default=None,
                        help="void label of masks:... datasets")


# ------------------------------------------------------------------------------- subcommands


def cmd_methods(args) -> int:
    from unsup.registry import available_methods, method_parameters

    for name, cls in available_methods().items():
        print(f"{name:16s} {cls.summary}  [learns from: {cls.supervision}]")
        params = method_parameters(cls)
        if params:
            print("    " + ", ".join(f"{k}={v!r}" for k, v in params.items()))
    return 0


def cmd_segment(args) -> int:
    from unsup.datasets import DatasetError, open_dataset
    from unsup.registry import create_method, load_method
    from unsup.runner import RunConflictError, describe_model, fit_if_needed, segment_dataset

    params = parse_key_values(args.param, option="--param")
    try:
        dataset = open_dataset(args.input, split=args.split, ignore_index=args.ignore_index)
    except DatasetError as exc:
        print(f"unsup: error: {exc}", file=sys.stderr)
        return 2
    model_info = None
    try:
        if args.model:
            method = load_method(args.model)
            if args.method and args.method != method.name:
                print(f"unsup: error: --model {args.model} holds a {method.name!r} model, "
                      f"but --method {args.method!r} was given", file=sys.stderr)
                return 2
            if params:
                method.set_params(**params)
            model_info = describe_model(Path(args.model))
        else:
            if not args.method:
                print("unsup: error: give --method NAME (see `unsup methods`) or --model DIR",
                      file=sys.stderr)
                return 2
            if "seed" not in params and _has_param(args.method, "seed"):
                params["seed"] = args.seed
            method = create_method(args.method, **params)
            model_info = getattr(method, "default_model_info", lambda: None)()
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"unsup: error: {exc}", file=sys.stderr)
        return 2

    crf = None
    if args.crf or args.crf_param:
        crf = _make_crf(args.crf_param)
        if crf is None:
            return 2
    hierarchy = None
    if args.hierarchy:
        import functools

        from unsup.runner import hierarchy_of, hierarchy_strength_for

        strength = hierarchy_strength_for(method, args.hierarchy_strength)
        if strength in ("scores", "combined") and not method.produces_scores:
            print(f"unsup: error: --hierarchy-strength {strength} needs per-pixel scores, "
                  f"which {method.name} does not produce; use gradient or auto",
                  file=sys.stderr)
            return 2
        hierarchy = functools.partial(hierarchy_of, strength=strength)

    fit_failures = []
    if method.requires_fit and not method.is_fitted():
        print(f"fitting {method.name} on {len(dataset)} image(s) of {args.input} ...",
              file=sys.stderr)
        fit_failures = fit_if_needed(method, dataset, progress=not args.no_progress,
                                     seed=args.seed)
        if args.save_model:
            method.save(args.save_model)
            model_info = describe_model(Path(args.save_model))
        model_info = model_info or {"fitted_on": args.input}

    try:
        result = segment_dataset(dataset, method, args.out, crf=crf, hierarchy=hierarchy,
                                 overwrite=args.overwrite, seed=args.seed,
                                 progress=not args.no_progress, model_info=model_info,
                                 command=sys.argv)
    except RunConflictError as exc:
        print(f"unsup: error: {exc}", file=sys.stderr)
        return 2
    n = len(dataset)
    print(f"{len(result.done)} segmented, {len(result.skipped)} already done, "
          f"{len(result.failures)} failed, of {n} image(s) -> {args.out}")
    failures = {f["id"]: f for f in fit_failures + result.failures}
    if failures:
        print(f"\n{len(failures)} image(s) failed:", file=sys.stderr)
        for f in failures.values():
            print(f"  {f['file']}: {f['error']}", file=sys.stderr)
        return 1
    return 0


def _has_param(method_name: str, param: str) -> bool:
    from unsup.registry import get_method, method_parameters

    try:
        return param in method_parameters(get_method(method_name))
    except KeyError:
        return False


def _make_crf(crf_params):
    from unsup.crf import DenseCRF

    try:
        return DenseCRF.from_params(crf_params or [])
    except ValueError as exc:
        print(f"unsup: error: --crf-param: {exc}", file=sys.stderr)
        return None


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
    from unsup import train_command

    train_command.configure_train_parser(p)
    p.set_defaults(func=train_command.run_train)

    p = sub.add_parser("evaluate", help="score predictions against ground truth",
                       description="Evaluate a folder of predictions with a protocol "
                                   "(bsds, matched, hungarian, semantic).")
    from unsup.evaluation import command as evaluate_command

    evaluate_command.configure_parser(p)
    p.set_defaults(func=evaluate_command.run)

    p = sub.add_parser("compare", help="train several methods alike and compare them",
                       description="Train methods with the same network, budget and seed and "
                                   "evaluate them on a test set.")
    train_command.configure_compare_parser(p)
    p.set_defaults(func=train_command.run_compare)
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
