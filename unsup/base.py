"""The method interface every segmentation method implements.

A method is a scikit-learn style estimator: hyper-parameters are the keyword arguments of
``__init__`` (stored unchanged under the same names), learned state lives in attributes ending
with ``_``, ``fit`` learns from a stream of samples (a no-op for per-image methods) and
``predict`` maps one RGB image to a :class:`Segmentation`. ``predict`` is a pure function of
(image, fitted state): a folder run can therefore be spread over workers without a rewrite.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator

__all__ = ["Segmentation", "SegmentationMethod", "NotFittedError", "ModelLoadError", "OptionGroup",
           "RunOptions", "check_image", "params_to_json", "read_model_meta"]

MODEL_FILE = "model.json"
ARRAYS_FILE = "arrays.npz"
WEIGHTS_FILE = "weights.pt"


class NotFittedError(RuntimeError):
    """Raised when ``predict`` is called on a method that needs ``fit`` first."""


class OptionGroup(BaseEstimator):
    """A group of related hyper-parameters nested inside a method.

    A scikit-learn nested estimator: a method holding ``network=NetworkOptions(...)`` exposes
    its options as ``network__lr`` in ``get_params(deep=True)`` and accepts
    ``set_params(network__lr=0.01)`` (on the command line ``--param network__lr=0.01``).
    Subclasses take keyword-only hyper-parameters in ``__init__`` and store them unchanged.
    A saved model stores a group as a plain JSON object of its parameters.
    """

    @classmethod
    def coerce(cls, value, *, name: str):
        """The group for a method's ``name`` argument: ``None`` (defaults), a dict, or a group.

        Raises
        ------
        ValueError
            For keys the group does not have (listing the ones it has) or another type.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = cls._get_param_names()
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(
                    f"{name} has no option(s) {', '.join(unknown)}; "
                    f"its options are: {', '.join(known)}"
                )
            return cls(**value)
        raise ValueError(
            f"{name} must be a {cls.__name__} or a dict of its options, "
            f"got {type(value).__name__}"
        )


@dataclass(frozen=True)
class RunOptions:
    """How a training run of ``fit`` is carried out (not hyper-parameters of the method).

    Attributes
    ----------
    out_dir : path, optional
        Folder for checkpoints, history and curves; None trains without writing anything.
    epochs : int, optional
        Overrides the method's number of epochs.
    max_minutes : float, optional
        Wall-clock budget; training stops after the epoch that exceeds it.
    resume : bool
        Continue from the checkpoint in ``out_dir``.
    """

    out_dir: Path | None = None
    epochs: int | None = None
    max_minutes: float | None = None
    resume: bool = False


@dataclass
class Segmentation:
    """The output of a method for one image.

    Attributes
    ----------
    labels : ndarray of int32, shape (H, W)
        One label per pixel. Labels are arbitrary non-negative ids; for dataset-level methods
        the same id means the same cluster/class in every image.
    scores : ndarray of float32, shape (C, H, W), optional
        Per-pixel class scores (probabilities, rows summing to one) for the label ids
        ``0..C-1``, when the method has them. The dense CRF and the hierarchy use them.
    info : dict
        Free-form per-image diagnostics (iterations, timings, ...), JSON-serialisable
        (checked: arrays belong in ``scores`` or ``hierarchy``).
    hierarchy : ndarray of uint16, shape (H, W), optional
        The method's own region hierarchy as an ultrametric contour map in the lab's format
        (what ``unsup segment --hierarchy`` writes): pixel ``p`` carries the boundary with its
        right and lower neighbours, ``value / 65535`` is the level in [0, 1] at which that
        boundary disappears, 0 = no boundary. None: the hierarchy is built from the labels
        (:func:`unsup.hierarchy.ultrametric_contour_map`).
    """

    labels: np.ndarray
    scores: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    hierarchy: np.ndarray | None = None

    def __post_init__(self):
        labels = np.asarray(self.labels)
        if labels.ndim != 2:
            raise ValueError(f"labels must be a 2-D (H, W) array, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise ValueError("labels must be non-negative")
        self.labels = labels.astype(np.int32, copy=False)
        if self.scores is not None:
            scores = np.asarray(self.scores, dtype=np.float32)
            if scores.ndim != 3 or scores.shape[1:] != labels.shape:
                raise ValueError(
                    f"scores must have shape (C, H, W) with (H, W) = {labels.shape}, "
                    f"got {scores.shape}"
                )
            if labels.size and labels.max() >= scores.shape[0]:
                raise ValueError(
                    f"labels go up to {labels.max()} but scores have only {scores.shape[0]} channels"
                )
            self.scores = scores
        if self.hierarchy is not None:
            ucm = np.asarray(self.hierarchy)
            if ucm.shape != labels.shape or not np.issubdtype(ucm.dtype, np.integer):
                raise ValueError(f"hierarchy must be an integer (H, W) = {labels.shape} map, "
                                 f"got {ucm.dtype} of shape {ucm.shape}")
            if ucm.size and (ucm.min() < 0 or ucm.max() > 65535):
                raise ValueError("hierarchy values must lie in 0..65535")
            self.hierarchy = ucm.astype(np.uint16, copy=False)
        try:
            json.dumps(self.info, default=_json_scalar)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"info must be JSON-serialisable diagnostics ({exc}); per-pixel "
                             "arrays belong in scores or hierarchy") from None

    @property
    def n_labels(self) -> int:
        """Number of distinct labels present."""
        return int(np.unique(self.labels).size)


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate an RGB image given to ``predict``.

    Parameters
    ----------
    image : ndarray, shape (H, W, 3), dtype uint8

    Returns
    -------
    ndarray
        The same image (not copied).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be RGB of shape (H, W, 3), got shape {image.shape}; "
            "read files with unsup.io.read_image, which converts gray, palette and RGBA to RGB"
        )
    if image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image, got {image.dtype}; unsup.io.read_image returns uint8"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image has no pixels: shape {image.shape}")
    return image


class SegmentationMethod(BaseEstimator):
    """Base class of every method.

    Subclasses set the class attributes below, take their hyper-parameters as keyword
    arguments of ``__init__`` (stored as attributes of the same name, nothing else done in
    ``__init__``), and implement :meth:`predict` and, when they learn, :meth:`fit`.

    Class attributes
    ----------------
    name : str
        Registry name (``unsup segment --method NAME``).
    summary : str
        One line shown by ``unsup methods``.
    supervision : str
        What ``fit`` learns from: ``"none"`` (per-image method, ``fit`` is a no-op),
        ``"unlabeled"`` (images only), ``"boxes"`` or ``"masks"``.
    produces_scores : bool
        Whether ``predict`` returns per-pixel scores.
    trains_network : bool
        Whether ``fit`` runs the training loop and so uses ``run`` (``epochs``,
        ``max_minutes``, ``resume``, ``out_dir``); other methods ignore it, and
        ``unsup train`` refuses those options for them.
    hierarchy_strength : str
        The boundary strength ``unsup segment --hierarchy --hierarchy-strength auto`` uses for
        this method (one of :data:`unsup.hierarchy.STRENGTHS`; ``"auto"``: its scores when it
        has them, else the image gradient).

    Optional capabilities are methods with a neutral default here:
    :meth:`default_model_info` and :meth:`training_history`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    supervision: ClassVar[str] = "none"
    produces_scores: ClassVar[bool] = False
    trains_network: ClassVar[bool] = False
    hierarchy_strength: ClassVar[str] = "auto"

    # -- learning ---------------------------------------------------------------------------
    @property
    def requires_fit(self) -> bool:
        return self.supervision != "none"

    def fit(self, samples, *, val_samples=None, run: RunOptions | None = None,
            progress: bool = False):
        """Learn from a stream of samples (no-op for per-image methods).

        Every method has this signature.

        Parameters
        ----------
        samples : iterable of unsup.datasets.Sample
            Re-iterable; implementations stream it and never hold all images at once.
        val_samples : iterable of unsup.datasets.Sample, optional
            Validation samples with ground truth, for methods that monitor training.
        run : RunOptions, optional
            How a training run is carried out (methods with ``trains_network``).
        progress : bool
            Show a progress bar.

        Returns
        -------
        self
        """
        return self

    def training_history(self) -> dict:
        """A summary of the last training run (``stopped``, epochs, seconds, ...), for
        ``train.json`` and reports; empty for methods that do not train."""
        return {}

    def default_model_info(self) -> dict | None:
        """Which learned state ``predict`` uses when the method was neither fitted nor loaded
        (e.g. shipped weights), for ``run.json``; None when there is none."""
        return None

    def is_fitted(self) -> bool:
        return not self.requires_fit or any(
            k.endswith("_") and not k.startswith("_") for k in vars(self)
        )

    def _check_fitted(self):
        if not self.is_fitted():
            raise NotFittedError(
                f"method {self.name!r} must be fitted before predict: call fit(samples) or "
                "load a saved model (unsup segment ... --model DIR)"
            )

    def predict(self, image: np.ndarray) -> Segmentation:  # pragma: no cover - abstract
        """Segment one RGB uint8 image of shape (H, W, 3)."""
        raise NotImplementedError

    # -- persistence ------------------------------------------------------------------------
    def _state_arrays(self) -> dict[str, np.ndarray]:
        """Learned numpy state to save (override in methods with array state)."""
        return {}

    def _set_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for key, value in arrays.items():
            setattr(self, key, value)

    def _state_dict(self) -> dict | None:
        """Learned torch state (a ``state_dict``) to save, or None."""
        return None

    def _load_state_dict(self, state: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        """Save hyper-parameters and learned state to ``directory``.

        Writes ``model.json`` (method name and parameters), ``arrays.npz`` (numpy state, no
        pickles) and ``weights.pt`` (torch ``state_dict``), each via a temporary file and an
        atomic rename.
        """
        from unsup.io import atomic_write_bytes, atomic_write_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = self._state_arrays()
        if arrays:
            with atomic_write_path(directory / ARRAYS_FILE) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)
        state = self._state_dict()
        if state is not None:
            import torch

            with atomic_write_path(directory / WEIGHTS_FILE) as tmp:
                torch.save(state, tmp)
        meta = {
            "method": self.name,
            "params": params_to_json(self),
            "has_arrays": bool(arrays),
            "has_weights": state is not None,
        }
        atomic_write_bytes(directory / MODEL_FILE, json.dumps(meta, indent=2).encode())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SegmentationMethod:
        """Load a model saved with :meth:`save` (no pickles: ``weights_only=True``).

        Raises
        ------
        FileNotFoundError
            ``directory`` holds no ``model.json``.
        ModelLoadError
            Any defect of the folder (bad JSON, unknown parameters, missing, truncated or
            mismatching state); the message names the file and the problem.
        """
        from unsup.io import read_torch_state

        directory = Path(directory)
        meta = read_model_meta(directory)
        if cls.name and meta["method"] != cls.name:
            raise ModelLoadError(
                f"{directory}: holds a {meta['method']!r} model, not {cls.name!r}"
            )
        meta_path = directory / MODEL_FILE
        known = set(cls._get_param_names())
        unknown = sorted(set(meta["params"]) - known)
        if unknown:
            raise ModelLoadError(
                f"{meta_path}: unknown parameter(s) {', '.join(unknown)} for method "
                f"{meta['method']!r}; its parameters are: {', '.join(sorted(known)) or '(none)'}"
            )
        try:
            method = cls(**meta["params"])
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{meta_path}: invalid parameters ({exc})") from None
        try:
            if meta.get("has_arrays"):
                path = directory / ARRAYS_FILE
                if not path.is_file():
                    raise ModelLoadError(f"{path}: missing (model.json says has_arrays)")
                with np.load(path, allow_pickle=False) as data:
                    method._set_state_arrays({k: data[k] for k in data.files})
            if meta.get("has_weights"):
                path = directory / WEIGHTS_FILE
                state = read_torch_state(path)
                try:
                    method._load_state_dict(state)
                except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    raise ModelLoadError(
                        f"{path}: does not fit a {meta['method']!r} model with these "
                        f"parameters ({type(exc).__name__}: {reason[:200]})"
                    ) from None
        except ModelLoadError:
            raise
        except FileNotFoundError as exc:
            raise ModelLoadError(str(exc)) from None
        except (ValueError, OSError, EOFError) as exc:  # truncated / corrupt npz or weights
            raise ModelLoadError(str(exc) if str(exc).startswith(str(directory))
                                 else f"{directory}: unreadable learned state ({exc})") from None
        if not method.is_fitted():
            raise ModelLoadError(
                f"{meta_path}: the model holds no learned state (has_weights / has_arrays "
                f"false), but {meta['method']!r} must be fitted; train it again"
            )
        return method


class ModelLoadError(ValueError):
    """A model folder cannot be loaded; the message names the file and the problem."""


def read_model_meta(directory: str | os.PathLike) -> dict:
    """Read and check a model folder's ``model.json``.

    Returns
    -------
    dict
        With at least ``method`` (str) and ``params`` (dict).
    """
    directory = Path(directory)
    path = directory / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a saved model (no {MODEL_FILE})")
    from unsup.io import read_json

    meta = read_json(path, error=ModelLoadError)
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    for key, kind in (("method", str), ("params", dict)):
        if key not in meta:
            raise ModelLoadError(f"{path}: missing key {key!r}")
        if not isinstance(meta[key], kind):
            raise ModelLoadError(f"{path}: {key!r} must be a JSON "
                                 f"{'string' if kind is str else 'object'}, "
                                 f"got {type(meta[key]).__name__}")
    return meta


def params_to_json(estimator) -> dict:
    """The hyper-parameters of a method (or CRF) as plain JSON, nested groups as objects."""
    return _jsonable(estimator.get_params(deep=False))


def _json_scalar(value):
    # numpy scalars are how numbers often arrive; anything else is not a diagnostic
    if isinstance(value, np.generic) and value.ndim == 0:
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _jsonable(value):
    if isinstance(value, OptionGroup):
        return _jsonable(value.get_params(deep=False))
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
