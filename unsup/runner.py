"""Folder runs: apply a method (and optionally the dense CRF) to every image of a dataset.

Outputs under ``out``::

    labels/<id>.png      label map, same height and width as the (EXIF-oriented) input
    overlays/<id>.png    image blended with label colours and boundaries
    run.json             method, parameters, seed, versions, per-image timings, failures

Every file is written to a temporary name and renamed, so an interrupted run (even
``kill -9``) leaves only complete files; rerunning the same command skips the images whose
outputs are all present. Per-image work (:func:`segment_image`) is a pure function of
(image, fitted method, options), so it can be mapped over workers as is.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unsup.base import Segmentation, SegmentationMethod, params_to_json
from unsup.datasets import RUN_MARKER, RUN_OUTPUT_FOLDERS, Dataset, DatasetError, Record
from unsup.io import (
    ImageReadError,
    atomic_write_bytes,
    frame_count,
    read_json,
    write_label_map,
    write_overlay,
    write_ultrametric_map,
)
from unsup.nn.runtime import seed_all

__all__ = ["segment_image", "segment_dataset", "RunResult", "RunConflictError", "output_paths",
           "hierarchy_of", "hierarchy_strength_for", "fit_if_needed", "run_fingerprint",
           "describe_differences"]

RUN_FILE = RUN_MARKER
#: The run.json entries that decide what an output is; a rerun may only reuse outputs whose
#: entries are all equal (see :func:`run_fingerprint`).
FINGERPRINT_KEYS = ("method", "params", "model", "seed", "crf", "hierarchy",
                    "hierarchy_strength")


class RunConflictError(ValueError):
    """The output folder cannot be used for this run; the message says why and what to do."""


def segment_image(image: np.ndarray, method: SegmentationMethod, *, crf=None,
                  seed: int = 0) -> Segmentation:
    """Segment one image: ``method.predict`` then, if given, ``crf.refine_segmentation``.

    Seeds the global generators first so the result does not depend on which images were
    processed before (the same image gives the same labels in any order, on any worker).
    """
    seed_all(seed)
    segmentation = method.predict(image)
    if crf is not None:
        segmentation = crf.refine_segmentation(image, segmentation)
    return segmentation


def hierarchy_of(image: np.ndarray, segmentation: Segmentation, *,
                 strength: str = "auto") -> np.ndarray:
    """The ultrametric contour map written by ``unsup segment --hierarchy``.

    A method that builds its own hierarchy (JULE's dendrogram) returns it as
    ``segmentation.hierarchy``; every other method's regions are merged greedily by
    :func:`unsup.hierarchy.ultrametric_contour_map` with boundary ``strength``.
    """
    if segmentation.hierarchy is not None:
        return segmentation.hierarchy
    from unsup.hierarchy import ultrametric_contour_map

    return ultrametric_contour_map(image, segmentation, strength=strength)


def hierarchy_strength_for(method, strength: str = "auto") -> str:
    """The boundary strength ``unsup segment --hierarchy`` uses for ``method``.

    ``"auto"`` resolves to the method's ``hierarchy_strength`` class attribute (W-Net:
    ``"combined"``, chosen on BSDS500 train images, docs/benchmarks/wnet.md; the base
    class's ``"auto"``: scores when the segmentation has them, the image gradient
    otherwise). Any other value is returned unchanged.
    """
    from unsup.hierarchy import STRENGTHS

    if strength not in STRENGTHS:
        raise ValueError(f"hierarchy strength must be one of {STRENGTHS}, got {strength!r}")
    if strength == "auto":
        return str(method.hierarchy_strength)
    return strength


def output_paths(out: Path, sample_id: str, *, hierarchy: bool = False) -> dict[str, Path]:
    """Where the outputs of one sample go."""
    paths = {
        "overlay": out / "overlays" / f"{sample_id}.png",
        "labels": out / "labels" / f"{sample_id}.png",
    }
    if hierarchy:
        paths["hierarchy"] = out / "hierarchy" / f"{sample_id}.png"
    return paths


@dataclass
class RunResult:
    """Summary of a folder run."""

    out: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("unsup", "numpy", "scipy", "scikit-image", "scikit-learn", "torch", "pydensecrf2",
                "faiss-cpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def describe_model(model_dir: Path | None) -> dict | None:
    """Identify saved weights (path + SHA-256 of each state file) for run.json."""
    if model_dir is None:
        return None
    files = {}
    for p in sorted(Path(model_dir).iterdir()):
        if p.is_file() and p.suffix in (".pt", ".npz", ".json"):
            files[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return {"path": str(Path(model_dir).resolve()), "sha256": files}


def _write_run_json(out: Path, run: dict) -> None:
    atomic_write_bytes(out / RUN_FILE, json.dumps(run, indent=2, default=str).encode())


def segment_dataset(dataset: Dataset, method: SegmentationMethod, out, *, crf=None,
                    hierarchy=None, overwrite: bool = False, seed: int = 0,
                    progress: bool = True, model_info: dict | None = None,
                    command: list[str] | None = None) -> RunResult:
    """Segment every image of ``dataset`` into ``out``, resumably.

    Parameters
    ----------
    dataset : Dataset
    method : SegmentationMethod
        Already fitted if it needs fitting (see :func:`fit_if_needed`).
    out : path-like
    crf : unsup.crf.DenseCRF, optional
    hierarchy : callable, optional
        ``hierarchy(image, segmentation) -> uint16 ultrametric contour map``; when given,
        ``hierarchy/<id>.png`` is written too.
    overwrite : bool
        Recompute images whose outputs already exist.
    seed : int
    progress : bool
    model_info : dict, optional
        Recorded in run.json (which weights were used).

    Returns
    -------
    RunResult
        Failures hold ``{"id", "file", "error"}``; the run never stops on a bad image.
    """
    from tqdm import tqdm

    out = Path(out)
    _check_output_folder(out)
    run = {
        "method": method.name,
        "params": params_to_json(method),
        "seed": seed,
        "crf": None if crf is None else params_to_json(crf),
        "hierarchy": hierarchy is not None,
        "hierarchy_strength": (None if hierarchy is None
                               else getattr(hierarchy, "keywords", {}).get("strength", "auto")),
        "model": model_info,
        "input": dataset.spec,
        "command": command,
        "versions": _versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_images": len(dataset),
    }
    run["fingerprint"] = run_fingerprint(run)
    previous = {} if overwrite else _previous_run(out, run)
    timings: dict[str, float] = dict(previous.get("timings", {}))
    infos: dict[str, dict] = dict(previous.get("info", {}))
    first_frames: dict[str, int] = dict(previous.get("first_frame_of", {}))
    records = _outside(dataset.records, out)
    if len(records) < len(dataset.records):
        print(f"unsup: note: left out {len(dataset.records) - len(records)} file(s) in the "
              f"folders this run writes under {out}; outputs are never read as input",
              file=sys.stderr)
    # written first, so that an output folder is recognisable as one from its first file on
    _write_run_json(out, {**run, "timings": timings, "info": infos, "failures": [],
                          "first_frame_of": first_frames, "complete": False})
    if hierarchy is not None:
        atomic_write_bytes(out / "hierarchy" / "_hierarchy.json",
                           json.dumps({"format": "unsup-ucm", "version": 1}).encode())
    result = RunResult(out=out)
    last_flush = time.monotonic()
    bar = tqdm(records, desc=f"segment [{method.name}]", unit="img", disable=not progress,
               file=sys.stderr)
    for record in bar:
        paths = output_paths(out, record.id, hierarchy=hierarchy is not None)
        if not overwrite and all(p.is_file() for p in paths.values()):
            result.skipped.append(record.id)
            continue
        try:
            t0 = time.perf_counter()
            image = dataset.load(record).image
            frames = frame_count(record.image_path)
            if frames > 1:  # animated GIF, multi-page TIFF: read_image takes the first frame
                first_frames[record.id] = frames
            seg = segment_image(image, method, crf=crf, seed=seed)
            if hierarchy is not None:
                write_ultrametric_map(paths["hierarchy"], hierarchy(image, seg))
            write_overlay(paths["overlay"], image, seg.labels)
            write_label_map(paths["labels"], seg.labels)  # last: its presence marks completion
            timings[record.id] = round(time.perf_counter() - t0, 4)
            summary = _scalar_info(seg.info)
            if summary:
                infos[record.id] = summary
            result.done.append(record.id)
        except KeyboardInterrupt:
            raise
        except (ImageReadError, DatasetError) as exc:
            result.failures.append(_failure(record, exc))
        except Exception as exc:  # a method crashing on one image must not end the run
            result.failures.append(_failure(record, exc, with_trace=True))
        if time.monotonic() - last_flush > 10.0:
            _write_run_json(out, {**run, "timings": timings, "info": infos,
                                  "failures": result.failures, "first_frame_of": first_frames,
                                  "complete": False})
            last_flush = time.monotonic()
    run.update(timings=timings, info=infos, failures=result.failures,
               first_frame_of=first_frames,
               complete=not result.failures,
               finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               summary={"done": len(result.done), "skipped_existing": len(result.skipped),
                        "failed": len(result.failures),
                        "median_seconds": float(np.median(list(timings.values())))
                        if timings else None})
    _write_run_json(out, run)
    return result


def run_fingerprint(run: dict) -> str:
    """SHA-256 (16 hex digits) of the run.json entries that decide what the outputs are."""
    decisive = {key: run.get(key) for key in FINGERPRINT_KEYS}
    text = json.dumps(decisive, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_output_folder(out: Path) -> None:
    """Refuse an output path that is a file or a folder that cannot be written, up front."""
    if out.exists() and not out.is_dir():
        raise RunConflictError(f"{out}: --out exists and is not a folder; give a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise RunConflictError(f"{out}: cannot write to the output folder "
                               f"({exc.strerror or exc})") from None


def _previous_run(out: Path, run: dict) -> dict:
    """The run.json of an earlier run into ``out`` that this run may resume, else {}.

    Outputs of another method, other parameters, model, seed, CRF or hierarchy setting are
    never taken as done: the run is refused, naming what differs.
    """
    path = out / RUN_FILE
    has_outputs = (out / "labels").is_dir() and any((out / "labels").iterdir())
    if not path.is_file():
        if has_outputs:
            raise RunConflictError(
                f"{out}: holds label maps but no {RUN_FILE}, so what made them is unknown; "
                "rerun with --overwrite to replace them, or choose another --out")
        return {}
    try:
        previous = read_json(path, error=RunConflictError)
    except RunConflictError as exc:
        raise RunConflictError(f"{exc}; rerun with --overwrite to start the output folder "
                               "afresh") from None
    if not isinstance(previous, dict):
        raise RunConflictError(f"{path}: not a run record; rerun with --overwrite")
    if previous.get("fingerprint") == run["fingerprint"]:
        return previous
    if not has_outputs and not previous.get("timings"):
        return {}  # an earlier run that wrote nothing yet: nothing to protect
    detail = "; ".join(describe_differences(previous, run, FINGERPRINT_KEYS)) \
        or "a run record without a fingerprint"
    raise RunConflictError(
        f"{out}: holds the outputs of a different run ({detail}); rerun with --overwrite to "
        "replace them, or choose another --out")


def describe_differences(before: dict, now: dict, keys) -> list[str]:
    """``"key: old before, new now"`` for each of ``keys`` whose value differs.

    Dict values (parameters, nested option groups) are compared entry by entry, so that the
    message names the one parameter that changed
    (``params.network.decoder: 'fcn' before, 'unet' now``).
    """
    def same(a, b):
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True,
                                                                         default=str)

    def compare(name, old, new):
        if isinstance(old, dict) and isinstance(new, dict):
            return [line for k in sorted(set(old) | set(new))
                    for line in compare(f"{name}.{k}", old.get(k), new.get(k))]
        return [] if same(old, new) else [f"{name}: {_short(old)} before, {_short(new)} now"]

    return [line for key in keys for line in compare(key, before.get(key), now.get(key))]


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _outside(records: list[Record], out: Path) -> list[Record]:
    """The records whose files do not lie in the folders this run writes under ``out``."""
    written = [(out / name).resolve() for name in RUN_OUTPUT_FOLDERS]
    return [r for r in records if r.image_path is None
            or not any(Path(r.image_path).resolve().is_relative_to(w) for w in written)]


def fit_if_needed(method: SegmentationMethod, dataset: Dataset, *, progress: bool = True,
                  seed: int = 0) -> list[dict]:
    """Fit a method that learns from images on ``dataset`` itself (annotations withheld).

    Unreadable images are skipped and returned as failures.
    """
    if not method.requires_fit or method.is_fitted():
        return []
    errors: list = []
    images_only = dataset.without_annotations()

    class _Stream:
        # re-iterable view that skips unreadable files and remembers them (once)
        def __iter__(self):
            seen = {r.id for r, _ in errors}
            new_errors: list = []
            yield from images_only.iter_samples(on_error="skip", errors=new_errors)
            errors.extend(e for e in new_errors if e[0].id not in seen)

    seed_all(seed)
    method.fit(_Stream(), progress=progress)
    return [_failure(r, e) for r, e in errors]


def _scalar_info(info: dict) -> dict:
    """The JSON-friendly scalar entries of ``Segmentation.info`` (arrays are left out)."""
    out = {}
    for key, value in info.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool | int | float | str) or value is None:
            out[key] = value
    return out


def _failure(record: Record, exc: BaseException, *, with_trace: bool = False) -> dict:
    entry = {"id": record.id, "file": str(record.image_path),
             "error": f"{type(exc).__name__}: {exc}"}
    if with_trace:
        entry["trace"] = "".join(traceback.format_exception(exc)[-3:])
    return entry
