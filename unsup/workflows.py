"""The lab's workflows as library functions: segment a dataset, train a method.

``unsup segment`` and ``unsup train`` parse their options and call :func:`segment` and
:func:`train` with plain arguments; ``unsup compare`` calls :func:`unsup.compare.compare` and
``unsup evaluate`` :func:`unsup.evaluation.evaluate`. Everything a user can get wrong raises
:class:`WorkflowError` (or the dataset / image errors, which name the file) before any work
is done, so a caller prints one sentence and exits.

How :func:`train` runs a method (any registered method whose ``supervision`` is not
``"none"``)::

    dataset = open_dataset(data, split=, ignore_index=, boxes=, boxes_from_masks=)
              [.restrict_classes(classes)] [.split(val_fraction, seed=seed)]
    samples = dataset.boxes_only()           if supervision == "boxes"   (masks stripped)
              dataset                        if supervision == "masks"
              dataset.without_annotations()  if supervision == "unlabeled"
    method = create_method(name, **params)   (seed from ``seed`` unless given)
    method.fit(samples, val_samples=VAL, run=RunOptions(out_dir, epochs, max_minutes, resume),
               progress=progress)
    method.save(out_dir)
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from unsup.base import RunOptions, params_to_json

__all__ = ["WorkflowError", "segment", "SegmentOutcome", "train", "create_seeded",
           "open_training_data", "samples_for", "fit_method", "RESUME_KEYS"]

#: Settings of a training run that ``resume=True`` must repeat exactly.
RESUME_KEYS = ("method", "params", "data", "classes", "boxes", "boxes_from_masks", "seed")


class WorkflowError(ValueError):
    """A request the workflow refuses before doing any work; the message says why."""


def _note(message: str, verbose: bool) -> None:
    if verbose:
        print(message, file=sys.stderr)


def create_seeded(method_name: str, params: dict | None = None, *, seed: int = 0):
    """``create_method(method_name, **params)``, with ``seed`` unless ``params`` give one.

    Returns
    -------
    SegmentationMethod
    """
    from unsup.registry import create_method, get_method, method_parameters

    cls = get_method(method_name)
    params = dict(params or {})
    if "seed" not in params and "seed" in method_parameters(cls):
        params["seed"] = seed
    return create_method(method_name, **params)


# ---------------------------------------------------------------------------------------------
# segment


@dataclass
class SegmentOutcome:
    """What :func:`segment` did: the run's result and the images that failed (fit included)."""

    run: object
    n_images: int
    failures: list[dict] = field(default_factory=list)


def segment(input_spec: str, out, *, method: str | None = None, model=None,
            params: dict | None = None, seed: int = 0, crf: bool = False,
            crf_params: list[str] | None = None, hierarchy: bool = False,
            hierarchy_strength: str = "auto", overwrite: bool = False,
            split: str | None = None, ignore_index: int | None = None, save_model=None,
            progress: bool = True, command=None, verbose: bool = True) -> SegmentOutcome:
    """Segment every image of a folder or dataset into ``out`` (``unsup segment``).

    Parameters
    ----------
    input_spec : str
        A folder, an image file or a dataset spec (:func:`unsup.datasets.open_dataset`).
    out : path
        Output folder: ``labels/``, ``overlays/``, ``hierarchy/`` and ``run.json``.
    method : str, optional
        Method name; or ``model``, a saved model folder (``method`` must then match it).
    params : dict, optional
        Hyper-parameters (``set_params`` keys; nested groups as ``group__key``).
    crf, crf_params : bool, list of "KEY=VALUE"
        Refine with the dense CRF (``crf_params`` implies it).
    hierarchy, hierarchy_strength : bool, str
        Also write ultrametric contour maps, with this boundary strength.
    save_model : path, optional
        After fitting a method on the input, save it here.
    overwrite, seed, split, ignore_index, progress, command
        As for :func:`unsup.runner.segment_dataset` and :func:`unsup.datasets.open_dataset`.
    verbose : bool
        Print what is being fitted on stderr.

    Returns
    -------
    SegmentOutcome
    """
    from unsup.crf import DenseCRF
    from unsup.datasets import open_dataset
    from unsup.registry import load_method
    from unsup.runner import (
        describe_model,
        fit_if_needed,
        hierarchy_of,
        hierarchy_strength_for,
        segment_dataset,
    )

    params = dict(params or {})
    dataset = open_dataset(input_spec, split=split, ignore_index=ignore_index)
    if model is not None:
        estimator = load_method(model)
        if method and method != estimator.name:
            raise WorkflowError(f"--model {model} holds a {estimator.name!r} model, but "
                                f"--method {method!r} was given")
        if params:
            estimator.set_params(**params)
        model_info = describe_model(Path(model))
    else:
        if not method:
            raise WorkflowError("give --method NAME (see `unsup methods`) or --model DIR")
        estimator = create_seeded(method, params, seed=seed)
        model_info = estimator.default_model_info()
    refiner = None
    if crf or crf_params:
        try:
            refiner = DenseCRF.from_params(crf_params or [])
        except ValueError as exc:
            raise WorkflowError(f"--crf-param: {exc}") from None
    hierarchy_fn = None
    if hierarchy:
        strength = hierarchy_strength_for(estimator, hierarchy_strength)
        if strength in ("scores", "combined") and not estimator.produces_scores:
            raise WorkflowError(f"--hierarchy-strength {strength} needs per-pixel scores, "
                                f"which {estimator.name} does not produce; use gradient or auto")
        hierarchy_fn = functools.partial(hierarchy_of, strength=strength)

    fit_failures = []
    if estimator.requires_fit and not estimator.is_fitted():
        _note(f"fitting {estimator.name} on {len(dataset)} image(s) of {input_spec} ...",
              verbose)
        fit_failures = fit_if_needed(estimator, dataset, progress=progress, seed=seed)
        if save_model:
            estimator.save(save_model)
            model_info = describe_model(Path(save_model))
        model_info = model_info or {"fitted_on": str(input_spec)}

    result = segment_dataset(dataset, estimator, out, crf=refiner, hierarchy=hierarchy_fn,
                             overwrite=overwrite, seed=seed, progress=progress,
                             model_info=model_info, command=command)
    failures = {f["id"]: f for f in fit_failures + result.failures}
    return SegmentOutcome(run=result, n_images=len(dataset), failures=list(failures.values()))


# ---------------------------------------------------------------------------------------------
# train


def open_training_data(spec: str, *, split=None, ignore_index=None, boxes=None,
                       boxes_from_masks=False, classes=None, val_fraction=None, seed=0):
    """Open a dataset for training, optionally restricted to ``classes`` and split into
    (train, held-out validation); the second item is None without ``val_fraction``."""
    from unsup.datasets import open_dataset

    dataset = open_dataset(spec, split=split, ignore_index=ignore_index, boxes=boxes,
                           boxes_from_masks=boxes_from_masks)
    if classes:
        dataset = dataset.restrict_classes(classes)
    if val_fraction:
        return dataset.split(val_fraction, seed=seed)
    return dataset, None


def samples_for(method_cls, dataset):
    """What a method of this kind of supervision may see of ``dataset``."""
    kind = method_cls.supervision
    if kind == "boxes":
        if not dataset.has_boxes:
            raise WorkflowError(
                f"{dataset.spec}: method {method_cls.name!r} learns from boxes but the dataset "
                "has none; give --boxes PATH or --boxes-from-masks")
        return dataset.boxes_only()
    if kind == "masks":
        if not dataset.has_ground_truth:
            raise WorkflowError(f"{dataset.spec}: method {method_cls.name!r} learns from masks "
                                "but the dataset has no ground truth")
        return dataset
    if kind == "unlabeled":
        return dataset.without_annotations()
    raise WorkflowError(f"method {method_cls.name!r} does not learn (supervision "
                        f"{kind!r}); use `unsup segment` for it")


def fit_method(method, samples, *, val_samples=None, run: RunOptions, progress=True) -> float:
    """Fit ``method`` the way ``unsup train`` does and save it to ``run.out_dir``.

    Methods that do not train a network (``trains_network`` False) refuse ``epochs``,
    ``max_minutes`` and ``resume``, which they would ignore.

    Returns
    -------
    float
        Wall seconds spent in ``fit`` (data caching included).
    """
    if not method.trains_network:
        refused = [n for n, v in (("--epochs", run.epochs), ("--max-minutes", run.max_minutes),
                                  ("--resume", run.resume or None)) if v is not None]
        if refused:
            raise WorkflowError(f"method {method.name!r} does not use the training loop: "
                                f"{', '.join(refused)} not supported")
    t0 = time.monotonic()
    method.fit(samples, val_samples=val_samples, run=run, progress=progress)
    seconds = time.monotonic() - t0
    method.save(run.out_dir)
    return seconds


def train(method: str, data: str, out, *, params: dict | None = None, seed: int = 0,
          split: str | None = None, ignore_index: int | None = None, classes=None,
          boxes=None, boxes_from_masks: bool = False, val: str | None = None,
          val_fraction: float | None = None, epochs: int | None = None,
          max_minutes: float | None = None, resume: bool = False, progress: bool = True,
          command=None, verbose: bool = True) -> dict:
    """Train a method on a dataset and save it to the model folder ``out`` (``unsup train``).

    Parameters
    ----------
    method : str
        A registered method that learns (``supervision`` other than ``"none"``).
    data : str
        Training dataset spec.
    out : path
        Model folder: ``model.json`` + weights, ``train.json``, checkpoints, history, curves.
    params : dict, optional
        Hyper-parameters (``group__key`` for nested groups).
    classes : list of str, optional
        Keep only these classes (:meth:`unsup.datasets.Dataset.restrict_classes`).
    boxes, boxes_from_masks
        Box annotations for box-supervised methods (ignored, with a note, for the others).
    val, val_fraction
        A validation dataset spec, or the fraction of the training images held out (seeded).
    epochs, max_minutes, resume
        The training run (:class:`unsup.base.RunOptions`); ``resume`` refuses a model folder
        whose ``train.json`` records other settings, naming them.

    Returns
    -------
    dict
        The record written to ``out/train.json``.
    """
    from unsup.datasets import open_dataset
    from unsup.io import atomic_write_bytes

    params = dict(params or {})
    out = Path(out)
    if val and val_fraction:
        raise WorkflowError("give --val or --val-fraction, not both")
    estimator = create_seeded(method, params, seed=seed)
    cls = type(estimator)
    if cls.supervision == "none":
        raise WorkflowError(f"method {cls.name!r} does not learn; use `unsup segment`")
    wants_boxes = cls.supervision == "boxes"
    dataset, val_set = open_training_data(
        data, split=split, ignore_index=ignore_index, boxes=boxes if wants_boxes else None,
        boxes_from_masks=boxes_from_masks and wants_boxes, classes=classes,
        val_fraction=val_fraction, seed=seed)
    if not wants_boxes and (boxes or boxes_from_masks):
        _note(f"unsup train: note: {cls.name!r} learns from {cls.supervision}; "
              "--boxes / --boxes-from-masks ignored", verbose)
    if val:
        val_set = open_dataset(val, split=split, ignore_index=ignore_index)
        if classes:
            val_set = val_set.restrict_classes(classes)
    samples = samples_for(cls, dataset)
    settings = {"method": estimator.name, "params": params_to_json(estimator), "data": data,
                "classes": classes, "boxes": boxes,
                "boxes_from_masks": bool(boxes_from_masks), "seed": seed}
    _check_resume(out, settings, resume=resume)
    _note(f"training {cls.name} on {len(samples)} image(s) of {data}"
          + (f" (validation: {len(val_set)} image(s))" if val_set is not None else "")
          + f" -> {out}", verbose)
    seconds = fit_method(estimator, samples, val_samples=val_set,
                         run=RunOptions(out_dir=out, epochs=epochs, max_minutes=max_minutes,
                                        resume=resume), progress=progress)
    history = estimator.training_history()
    record = {**settings, "val": val, "val_fraction": val_fraction, "epochs": epochs,
              "max_minutes": max_minutes, "resumed": bool(resume),
              "fit_seconds": round(seconds, 2), "history": history,
              "complete": history.get("stopped") != "time_budget", "command": command}
    atomic_write_bytes(out / "train.json", json.dumps(record, indent=2, default=str).encode())
    return record


def _check_resume(out: Path, settings: dict, *, resume: bool) -> None:
    """Record a run's settings in ``out/train.json`` before training, so that ``resume``
    can refuse to continue a checkpoint made with another method, decoder or data, naming
    the setting that differs (instead of failing deep inside ``load_state_dict``)."""
    from unsup.io import atomic_write_bytes, read_json
    from unsup.runner import describe_differences

    path = out / "train.json"
    if resume and path.is_file():
        previous = read_json(path, error=WorkflowError)
        differing = describe_differences(previous, settings, RESUME_KEYS)
        if differing:
            raise WorkflowError(f"{out}: --resume continues the run recorded in {path.name}, "
                                f"whose settings differ ({'; '.join(differing)}); repeat its "
                                "settings, or train into another folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({**settings, "complete": False}, indent=2,
                                        default=str).encode())
