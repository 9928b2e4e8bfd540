"""Reading predictions for the evaluation harness.

A prediction folder holds one file per sample, named by the sample id (ids may contain ``/``
for nested folder datasets): ``<id>.png`` or ``<id>.mat``. What a file means:

==============  ==============================================================================
kind            file
==============  ==============================================================================
``labels``      ``<id>.png``: a label map (gray / palette / 16-bit PNG, values = labels), or a
                ``.mat`` file with a ``segs`` cell array of label maps (BSDS format; several
                segmentations are benchmarked like thresholds, as the official code does).
``ucm2``        ``.mat`` with ``ucm2``: a BSDS ultrametric contour map at double resolution,
                ``(2H+1, 2W+1)``, values in [0, 1].
``hierarchy``   the lab's ``unsup-ucm`` format: a folder with ``_hierarchy.json`` =
                ``{"format": "unsup-ucm", "version": 1}`` and 16-bit ``<id>.png`` maps at image
                resolution (0 = no boundary, ``v`` = boundary surviving up to level
                ``v / 65535``; see :mod:`unsup.hierarchy`).
``boundaries``  soft boundary maps: 8-bit PNG (probability = value / 255) or 16-bit PNG
                (value / 65535).
==============  ==============================================================================

``pred_type="auto"`` picks ``hierarchy`` when the marker file exists, else looks at the files:
a ``.mat`` with ``ucm2`` is a ucm2 hierarchy, a ``.mat`` with ``segs`` a set of segmentations,
PNGs are label maps. Soft boundary PNGs cannot be told from label maps by looking at them, so
they need ``pred_type="boundaries"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unsup.io import ImageReadError, read_label_map

__all__ = [
    "PRED_TYPES",
    "HIERARCHY_MARKER",
    "HIERARCHY_FORMAT",
    "PredictionError",
    "Prediction",
    "detect_pred_type",
    "find_prediction_file",
    "read_prediction",
    "check_predictions_exist",
]

PRED_TYPES = ("auto", "labels", "hierarchy", "boundaries")
HIERARCHY_MARKER = "_hierarchy.json"
HIERARCHY_FORMAT = {"format": "unsup-ucm", "version": 1}
_EXTENSIONS = (".png", ".mat")


class PredictionError(ValueError):
    """A prediction folder or file is unusable; the message names it and says why."""


@dataclass
class Prediction:
    """One sample's prediction.

    Attributes
    ----------
    kind : {"segs", "ucm2", "hierarchy", "boundaries"}
        ``segs`` covers single label maps too (a list of one).
    data : ndarray or list of ndarray
        ``segs``: list of int label maps (H, W); ``ucm2``: float64 (2H+1, 2W+1);
        ``hierarchy``: uint16 (H, W); ``boundaries``: float64 (H, W) in [0, 1].
    path : Path
    """

    kind: str
    data: object
    path: Path

    @property
    def shape(self) -> tuple[int, int]:
        """Image size (H, W) the prediction is for."""
        if self.kind == "segs":
            return tuple(self.data[0].shape)
        if self.kind == "ucm2":
            return ((self.data.shape[0] - 1) // 2, (self.data.shape[1] - 1) // 2)
        return tuple(self.data.shape)

    def check_shape(self, shape) -> None:
        """Raise :class:`PredictionError` unless the prediction fits an image of ``shape``."""
        shape = tuple(shape)
        if self.kind == "ucm2":
            expected = (2 * shape[0] + 1, 2 * shape[1] + 1)
            if self.data.shape != expected:
                raise PredictionError(
                    f"{self.path}: ucm2 has shape {self.data.shape}, expected {expected} "
                    f"(double resolution of the {shape[0]}x{shape[1]} image)"
                )
            return
        maps = self.data if self.kind == "segs" else [self.data]
        for k, m in enumerate(maps):
            if m.shape != shape:
                what = f"segmentation {k + 1}" if len(maps) > 1 else "prediction"
                raise PredictionError(
                    f"{self.path}: {what} has shape {m.shape}, but the image is {shape} "
                    "(height, width)"
                )


def _marker(pred_dir: Path) -> bool:
    marker = pred_dir / HIERARCHY_MARKER
    if not marker.is_file():
        return False
    try:
        content = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PredictionError(f"{marker}: unreadable hierarchy marker ({exc})") from None
    if not isinstance(content, dict) or content.get("format") != HIERARCHY_FORMAT["format"]:
        raise PredictionError(f"{marker}: expected {json.dumps(HIERARCHY_FORMAT)}, got {content}")
    if content.get("version") != HIERARCHY_FORMAT["version"]:
        raise PredictionError(
            f"{marker}: hierarchy format version {content.get('version')} is not supported "
            f"(this reader knows version {HIERARCHY_FORMAT['version']})"
        )
    return True


def _load_mat(path: Path) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(path)
    except Exception as exc:  # scipy raises many types on bad files
        raise PredictionError(f"{path}: unreadable .mat file ({exc})") from None


def detect_pred_type(pred_dir, ids=None) -> str:
    """Resolve ``pred_type="auto"`` for a folder (see the module docstring).

    Returns one of ``"hierarchy"`` (lab format), ``"ucm2"``, ``"segs"``, ``"labels"``.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise PredictionError(f"{pred_dir}: prediction folder does not exist")
    if _marker(pred_dir):
        return "hierarchy"
    candidates = []
    if ids is not None:
        for i in ids:
            path = find_prediction_file(pred_dir, i, required=False)
            if path is not None:
                candidates.append(path)
                break
    if not candidates:
        candidates = sorted(p for p in pred_dir.rglob("*")
                            if p.is_file() and p.suffix.lower() in _EXTENSIONS)[:1]
    if not candidates:
        raise PredictionError(f"{pred_dir}: no .png or .mat prediction files")
    path = candidates[0]
    if path.suffix.lower() == ".mat":
        mat = _load_mat(path)
        if "ucm2" in mat:
            return "ucm2"
        if "segs" in mat:
            return "segs"
        raise PredictionError(f"{path}: a .mat prediction needs a 'ucm2' or 'segs' variable, "
                              f"found {sorted(k for k in mat if not k.startswith('__'))}")
    return "labels"


def find_prediction_file(pred_dir, sample_id: str, *, required: bool = True) -> Path | None:
    """``pred_dir/<id>.png`` or ``pred_dir/<id>.mat`` (PNG first)."""
    pred_dir = Path(pred_dir)
    for ext in _EXTENSIONS:
        path = pred_dir / f"{sample_id}{ext}"
        if path.is_file():
            return path
    if required:
        raise PredictionError(
            f"{pred_dir}: no prediction for sample {sample_id!r} "
            f"(looked for {sample_id}.png and {sample_id}.mat)"
        )
    return None


def check_predictions_exist(pred_dir, ids) -> None:
    """Raise one clear error listing the samples without a prediction file."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise PredictionError(f"{pred_dir}: prediction folder does not exist")
    missing = [i for i in ids if find_prediction_file(pred_dir, i, required=False) is None]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise PredictionError(
            f"{pred_dir}: no prediction for {len(missing)} of {len(ids)} samples: {shown}{more} "
            f"(expected <id>.png or <id>.mat)"
        )


def _read_png_array(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            array = np.asarray(img)
    except FileNotFoundError:
        raise PredictionError(f"{path}: file does not exist") from None
    except Exception as exc:  # PIL raises many types on corrupt data
        raise PredictionError(f"{path}: unreadable PNG ({exc})") from None
    return mode, array


def _read_hierarchy_png(path: Path) -> np.ndarray:
    mode, array = _read_png_array(path)
    if mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise PredictionError(
            f"{path}: a hierarchy map must be a 16-bit gray PNG (mode I;16), got mode {mode}"
        )
    array = np.asarray(array)
    if array.ndim != 2 or array.min(initial=0) < 0 or array.max(initial=0) > 65535:
        raise PredictionError(f"{path}: hierarchy values must be 16-bit (0..65535)")
    return array.astype(np.uint16)


def _read_soft_boundaries(path: Path) -> np.ndarray:
    mode, array = _read_png_array(path)
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(array).astype(np.float64) / 65535.0
    if mode == "L":
        return np.asarray(array).astype(np.float64) / 255.0
    if mode in ("RGB", "RGBA") and np.array_equal(array[..., 0], array[..., 1]) \
            and np.array_equal(array[..., 0], array[..., 2]):
        return array[..., 0].astype(np.float64) / 255.0
    raise PredictionError(f"{path}: a soft boundary map must be a gray PNG, got mode {mode}")


def _integer_labels(array: np.ndarray, where: str) -> np.ndarray:
    """A 2-D label map as int64; NaN, infinite or fractional labels are refused, not cast."""
    if array.ndim != 2:
        raise PredictionError(f"{where} is not a 2-D label map")
    if not np.issubdtype(array.dtype, np.integer):
        try:
            values = array.astype(np.float64)
        except (TypeError, ValueError):
            raise PredictionError(f"{where} holds non-numeric values") from None
        if not np.isfinite(values).all():
            raise PredictionError(f"{where} holds {int((~np.isfinite(values)).sum())} NaN or "
                                  "infinite label(s)")
        if (values != np.round(values)).any():
            raise PredictionError(f"{where} holds fractional labels; labels are integers")
        array = values
    return array.astype(np.int64)


def read_prediction(pred_dir, sample_id: str, pred_type: str = "auto") -> Prediction:
    """Read one sample's prediction.

    Parameters
    ----------
    pred_dir : path-like
    sample_id : str
    pred_type : {"auto", "labels", "hierarchy", "boundaries"} or a resolved kind
        (``"ucm2"``, ``"segs"``), e.g. from :func:`detect_pred_type`.

    Raises
    ------
    PredictionError
        Missing or unreadable file, or content that does not fit ``pred_type``.
    """
    pred_dir = Path(pred_dir)
    path = find_prediction_file(pred_dir, sample_id)
    if pred_type not in PRED_TYPES + ("ucm2", "segs"):
        raise PredictionError(f"pred_type must be one of {PRED_TYPES}, got {pred_type!r}")
    if path.suffix.lower() == ".mat":
        if pred_type == "boundaries":
            raise PredictionError(f"{path}: soft boundary maps must be PNG files")
        mat = _load_mat(path)
        if "ucm2" in mat and pred_type in ("auto", "hierarchy", "ucm2"):
            ucm2 = np.asarray(mat["ucm2"], dtype=np.float64)
            if ucm2.ndim != 2 or ucm2.shape[0] % 2 != 1 or ucm2.shape[1] % 2 != 1:
                raise PredictionError(f"{path}: ucm2 must be a 2-D (2H+1, 2W+1) array, "
                                      f"got shape {ucm2.shape}")
            if not np.isfinite(ucm2).all():
                raise PredictionError(f"{path}: ucm2 holds {int((~np.isfinite(ucm2)).sum())} "
                                      "NaN or infinite value(s)")
            return Prediction("ucm2", ucm2, path)
        if "segs" in mat and pred_type in ("auto", "labels", "segs"):
            cells = np.asarray(mat["segs"], dtype=object).ravel()
            if cells.size == 0:
                raise PredictionError(f"{path}: 'segs' is empty")
            segs = [_integer_labels(np.asarray(c), f"{path}: segs{{{k + 1}}}")
                    for k, c in enumerate(cells)]
            return Prediction("segs", segs, path)
        raise PredictionError(
            f"{path}: expected a 'ucm2' or 'segs' variable for pred_type={pred_type!r}, "
            f"found {sorted(k for k in mat if not k.startswith('__'))}"
        )
    if pred_type in ("hierarchy", "ucm2") or (pred_type == "auto" and _marker(pred_dir)):
        return Prediction("hierarchy", _read_hierarchy_png(path), path)
    if pred_type == "boundaries":
        return Prediction("boundaries", _read_soft_boundaries(path), path)
    try:
        labels = read_label_map(path)
    except ImageReadError as exc:
        raise PredictionError(str(exc)) from None
    return Prediction("segs", [labels.astype(np.int64)], path)
