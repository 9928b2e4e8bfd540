"""One training loop for every trainable method (supervised, boxsup, wnet, ...).

A method builds a *task* (its models, optimisers, schedulers and losses) and hands it to
:func:`train` together with a batch maker; the loop owns epochs, the time budget,
checkpoints, resume, early stopping, the progress bar, the metrics history and its plot.

The task protocol (:class:`TrainingTask`)::

    train_step(batch) -> dict[str, float]   one optimisation step, returns named losses
    end_epoch(epoch) -> None                optional, e.g. an LR schedule step
    validate() -> dict[str, float]          optional, e.g. {"miou": 0.61}
    state_dict() -> dict                    models + optimisers + schedulers (tensors and
    load_state_dict(state) -> None          primitive containers only)

``make_batches(epoch)`` returns an iterable of batches and must be deterministic given the
seed and the epoch (derive its shuffling and augmentation generators from them, never from
the global RNG). If it also accepts a keyword ``start``, ``make_batches(epoch, start=k)`` must
yield the same batches without the first ``k``: resuming a run interrupted in the middle of
an epoch then skips the finished steps without loading their data (otherwise they are
generated and dropped).

Files written to ``out_dir`` (all via a temporary file and an atomic rename)::

    checkpoint.pt   every epoch and when the time budget stops a run mid-epoch:
                    {format, seed, epoch, step, partial, task, rng, history}; only tensors and
                    primitive containers, so ``torch.load(..., weights_only=True)`` reads it
    best.pt         the task state of the best epoch (when ``monitor`` is given)
    history.json    per-epoch mean losses, ``val_*`` metrics, seconds; best epoch; stop reason
    curves.png      each loss and metric per epoch (matplotlib)

Convention for trainable methods (``unsup train`` relies on it, W-Net follows it)::

    method = create_method(name, **params)
    method.fit(samples, val_samples=None, out_dir=MODEL_DIR / "training", epochs=None,
               max_minutes=None, resume=False, progress=True)
    method.save(MODEL_DIR)

``fit`` builds its task and batch maker and calls :func:`train` with ``out_dir``; ``epochs=None``
means the method's own ``epochs`` hyper-parameter; ``resume=True`` continues from the
checkpoint in ``out_dir``. Called with only ``samples`` (as ``unsup segment`` does), ``fit``
trains in a temporary directory.

The module also holds what supervised-style segmentation tasks share: a streamed training
set with augmentation over an on-disk cache (:class:`SegmentationTrainingSet`,
:func:`make_batch_maker`), the loss (:func:`segmentation_loss`), the confusion-matrix mIoU
(:func:`confusion_matrix`, :func:`iou_from_confusion`), :class:`SegmentationTask`, and the
dataset views used by ``unsup train`` / ``unsup compare`` (:class:`BoxesOnlyDataset`,
:func:`restrict_classes`).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "TrainingTask",
    "TrainingHistory",
    "train",
    "load_checkpoint",
    "plot_history",
    "get_rng_state",
    "set_rng_state",
    "seed_all",
    "default_device",
    "IGNORE",
    "segmentation_loss",
    "confusion_matrix",
    "iou_from_confusion",
    "SegmentationTrainingSet",
    "make_batch_maker",
    "SegmentationTask",
    "BoxesOnlyDataset",
    "restrict_classes",
    "split_dataset",
]

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
CHECKPOINT_FORMAT = 1

#: Target value of pixels that do not contribute to the loss (void, crowd, uncertain).
IGNORE = 255


# =============================================================================================
# the loop


@runtime_checkable
class TrainingTask(Protocol):
    """What :func:`train` needs from a method (``end_epoch`` and ``validate`` are optional)."""

    def train_step(self, batch) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainingHistory:
    """Per-epoch records and the outcome of a run.

    Attributes
    ----------
    epochs : list of dict
        One record per finished epoch: ``epoch`` (1-based), ``steps``, ``seconds``, the mean
        of each training loss, and each validation metric prefixed with ``val_``.
    monitor, mode : str or None, str
        The early-stopping quantity (a record key) and whether higher (``max``) is better.
    best_epoch, best_value : int or None, float or None
    bad_epochs : int
        Epochs since the last improvement of ``monitor``.
    stopped : str
        ``"completed"``, ``"early_stopping"``, ``"time_budget"`` or ``"running"``.
    train_seconds : float
        Wall time spent in training steps, end-of-epoch work and validation, over all
        invocations (resumes included).
    seed : int
    """

    epochs: list[dict] = field(default_factory=list)
    monitor: str | None = None
    mode: str = "max"
    best_epoch: int | None = None
    best_value: float | None = None
    bad_epochs: int = 0
    stopped: str = "running"
    train_seconds: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainingHistory:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def series(self, key: str) -> list[float]:
        """Values of ``key`` per epoch (NaN where an epoch has no such value)."""
        return [float(r.get(key, math.nan)) for r in self.epochs]

    @property
    def last(self) -> dict:
        return self.epochs[-1] if self.epochs else {}


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device():
    """``cuda`` when available, else ``cpu``."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_rng_state() -> dict:
    """Global RNG states (Python, NumPy, torch CPU and CUDA) as tensors and primitives."""
    import torch

    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version,
                   "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    import torch

    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()),
                     py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), int(nps["pos"]),
                         int(nps["has_gauss"]), float(nps["gauss"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_torch(obj, path: Path) -> None:
    import torch

    from unsup.io import atomic_write_path

    with atomic_write_path(path) as tmp:
        torch.save(obj, tmp)


def remove_stale_temporaries(directory) -> list[Path]:
    """Delete the temporary files that a killed write left in ``directory``.

    :func:`unsup.io.atomic_write_path` writes ``.<name>.<random>.tmp`` beside its target
    and renames it when complete, so such a file at the start of a run is the remainder of an
    interrupted write (a ``kill -9`` during a checkpoint leaves tens of MB) and never data.
    """
    removed = []
    for path in Path(directory).glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`train` (``weights_only=True``, no pickles).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file is not a checkpoint of this loop.
    """
    from unsup.io import read_torch_state

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    state = read_torch_state(path, what="checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint of unsup.training.train")
    return state


def _monitor_key(monitor: str | None, record: dict) -> str | None:
    if monitor is None:
        return None
    if monitor in record:
        return monitor
    if f"val_{monitor}" in record:
        return f"val_{monitor}"
    raise KeyError(
        f"monitor {monitor!r} is neither a training loss nor a validation metric; "
        f"this epoch has: {', '.join(k for k in record if k not in ('epoch', 'steps', 'seconds'))}"
    )


def _improved(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def _accepts_start(make_batches) -> bool:
    try:
        params = inspect.signature(make_batches).parameters
    except (TypeError, ValueError):
        return False
    return "start" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _batches_from(make_batches, epoch: int, start: int) -> Iterable:
    if start and _accepts_start(make_batches):
        return make_batches(epoch, start=start)
    batches = make_batches(epoch)
    return itertools.islice(batches, start, None) if start else batches


def _length(make_batches, epoch) -> int | None:
    length = getattr(make_batches, "steps_per_epoch", None)
    return int(length) if length is not None else None


def train(task, make_batches: Callable[..., Iterable], *, out_dir, epochs: int,
          max_minutes: float | None = None, resume: bool = False, seed: int = 0,
          monitor: str | None = None, mode: str = "max", patience: int | None = None,
          progress: bool = True, restore_best: bool = True) -> TrainingHistory:
    """Run (or resume) the training of ``task`` for ``epochs`` epochs.

    Parameters
    ----------
    task : TrainingTask
        Owns the models, optimisers and schedulers; ``end_epoch`` / ``validate`` optional.
    make_batches : callable
        ``make_batches(epoch) -> iterable of batches``, deterministic given the seed and the
        epoch; optionally ``make_batches(epoch, start=k)`` (see the module docstring). An
        attribute ``steps_per_epoch`` sizes the progress bar.
    out_dir : path-like
        Where checkpoint.pt, best.pt, history.json and curves.png go (created).
    epochs : int
        Total number of epochs of the run (a resumed run continues up to this number).
    max_minutes : float, optional
        Time budget of this invocation. Checked after every step: once spent, the run stops
        after the current step and saves a checkpoint that ``resume=True`` continues from.
    resume : bool
        Continue from ``out_dir/checkpoint.pt``: task state, RNG states, history and the
        position inside the epoch are restored, so the result is the same as an
        uninterrupted run. Without it, an existing checkpoint is overwritten.
    seed : int
        Seeds the global generators at the start of a fresh run (a resumed run must use the
        same seed).
    monitor : str, optional
        Early-stopping quantity: a validation metric (``"miou"`` or ``"val_miou"``) or a
        training loss name. The task state of the best epoch is saved to ``best.pt``.
    mode : {"max", "min"}
        Whether a higher or lower ``monitor`` is better.
    patience : int, optional
        Stop after this many epochs without improvement of ``monitor``.
    progress : bool
        Show a tqdm bar with the running losses and the last validation metric.
    restore_best : bool
        With ``monitor``: load the best epoch's state into the task before returning.

    Returns
    -------
    TrainingHistory
    """
    import torch
    from tqdm import tqdm

    if not isinstance(epochs, int | np.integer) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes must be positive, got {max_minutes!r}")
    if patience is not None and monitor is None:
        raise ValueError("patience needs a monitor (the metric to watch)")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience!r}")
    for name in ("train_step", "state_dict", "load_state_dict"):
        if not callable(getattr(task, name, None)):
            raise TypeError(f"task {type(task).__name__} has no {name}() method")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    ckpt_path = out_dir / CHECKPOINT_FILE
    start_epoch, start_step, partial = 0, 0, None
    if resume:
        state = load_checkpoint(ckpt_path)
        if int(state["seed"]) != int(seed):
            raise ValueError(f"{ckpt_path}: the run was started with seed {state['seed']}, "
                             f"cannot resume it with seed {seed}")
        task.load_state_dict(state["task"])
        set_rng_state(state["rng"])
        history = TrainingHistory.from_dict(json.loads(state["history"]))
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        partial = json.loads(state["partial"]) if state.get("partial") else None
    else:
        seed_all(seed)
        history = TrainingHistory(seed=int(seed))
    history.monitor, history.mode = monitor, mode

    def save_checkpoint(epoch_done: int, step: int, partial_state: dict | None) -> None:
        _save_torch({
            "format": CHECKPOINT_FORMAT,
            "seed": int(seed),
            "epoch": int(epoch_done),
            "step": int(step),
            "partial": json.dumps(partial_state) if partial_state else "",
            "task": task.state_dict(),
            "rng": get_rng_state(),
            "history": json.dumps(history.to_dict()),
        }, ckpt_path)

    def write_reports() -> None:
        from unsup.io import atomic_write_bytes

        atomic_write_bytes(out_dir / HISTORY_FILE,
                           json.dumps(history.to_dict(), indent=2).encode())
        if history.epochs:
            plot_history(history, out_dir / CURVES_FILE)

    deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
    stopped = None
    if patience is not None and history.bad_epochs >= patience:
        stopped = "early_stopping"
    epoch = start_epoch
    while stopped is None and epoch < epochs:
        first = epoch == start_epoch and start_step > 0 and partial is not None
        step = start_step if first else 0
        sums: dict[str, float] = dict(partial["sums"]) if first else {}
        epoch_seconds = float(partial["seconds"]) if first else 0.0
        t0 = time.monotonic()
        total = _length(make_batches, epoch)
        bar = tqdm(total=total, initial=step, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                   disable=not progress, file=sys.stderr, leave=False)
        last_val = history.last.get(_val_key(history)) if history.epochs else None
        budget_hit = False
        for batch in _batches_from(make_batches, epoch, step):
            losses = task.train_step(batch)
            step += 1
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            if progress:
                shown = {k: f"{v / step:.4f}" for k, v in sums.items()}
                if last_val is not None:
                    shown[_val_key(history)] = f"{last_val:.4f}"
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
            if deadline is not None and time.monotonic() >= deadline:
                budget_hit = True
                break
        bar.close()
        epoch_seconds += time.monotonic() - t0
        if budget_hit and (total is None or step < total):
            history.train_seconds += time.monotonic() - t0
            history.stopped = "time_budget"
            save_checkpoint(epoch, step, {"sums": sums, "seconds": epoch_seconds})
            write_reports()
            stopped = "time_budget"
            break
        t1 = time.monotonic()
        if callable(getattr(task, "end_epoch", None)):
            task.end_epoch(epoch)
        metrics = task.validate() if callable(getattr(task, "validate", None)) else {}
        epoch_seconds += time.monotonic() - t1
        record: dict[str, Any] = {"epoch": epoch + 1, "steps": step,
                                  "seconds": round(epoch_seconds, 3)}
        record.update({k: v / max(step, 1) for k, v in sums.items()})
        record.update({f"val_{k}": float(v) for k, v in (metrics or {}).items()})
        history.epochs.append(record)
        history.train_seconds += time.monotonic() - t0
        key = _monitor_key(monitor, record)
        if key is not None:
            value = float(record[key])
            if _improved(value, history.best_value, mode):
                history.best_epoch, history.best_value, history.bad_epochs = epoch + 1, value, 0
                _save_torch({"format": CHECKPOINT_FORMAT, "epoch": epoch + 1,
                             "task": task.state_dict()}, out_dir / BEST_FILE)
            else:
                history.bad_epochs += 1
        epoch += 1
        if patience is not None and history.bad_epochs >= patience:
            stopped = "early_stopping"
        elif deadline is not None and time.monotonic() >= deadline and epoch < epochs:
            stopped = "time_budget"
        history.stopped = stopped or ("completed" if epoch >= epochs else "running")
        save_checkpoint(epoch, 0, None)
        write_reports()
        if progress:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in record.items()
                              if k not in ("epoch", "steps") and isinstance(v, float))
            print(f"epoch {epoch}/{epochs}: {shown}", file=sys.stderr)
    if stopped is None:
        history.stopped = "completed"
        write_reports()
    if restore_best and monitor is not None and (out_dir / BEST_FILE).is_file():
        best = torch.load(out_dir / BEST_FILE, map_location="cpu", weights_only=True)
        task.load_state_dict(best["task"])
    return history


def _val_key(history: TrainingHistory) -> str | None:
    if not history.epochs:
        return None
    keys = [k for k in history.epochs[-1] if k.startswith("val_")]
    if history.monitor and (history.monitor in keys or f"val_{history.monitor}" in keys):
        return history.monitor if history.monitor in keys else f"val_{history.monitor}"
    return keys[0] if keys else None


def plot_history(history: TrainingHistory, path) -> None:
    """Plot every loss (left) and validation metric (right) per epoch to a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from unsup.io import atomic_write_path

    skip = {"epoch", "steps", "seconds"}
    keys = list(dict.fromkeys(k for r in history.epochs for k in r if k not in skip))
    losses = [k for k in keys if not k.startswith("val_")]
    metrics = [k for k in keys if k.startswith("val_")]
    x = [r["epoch"] for r in history.epochs]
    panels = [p for p in ((losses, "training losses"), (metrics, "validation (val_*)")) if p[0]]
    # the object-oriented API (no pyplot): no global state, safe in threads and workers
    fig = Figure(figsize=(5.5 * max(len(panels), 1), 3.8))
    FigureCanvasAgg(fig)
    for i, (names, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name in names:
            ax.plot(x, history.series(name), marker="o", ms=3, label=name)
        if history.best_epoch is not None and title.startswith("validation"):
            ax.axvline(history.best_epoch, color="gray", ls=":", lw=1, label="best")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


# =============================================================================================
# losses and metrics


def segmentation_loss(logits, target, *, ignore_index: int = IGNORE, class_weights=None,
                      dice_weight: float = 0.0):
    """Cross-entropy (+ ``dice_weight`` x soft Dice loss) over the non-ignored pixels.

    Parameters
    ----------
    logits : Tensor, shape (N, C, H, W)
    target : Tensor of int64, shape (N, H, W)
        Class ids ``0..C-1`` or ``ignore_index``.
    class_weights : Tensor of shape (C,), optional
        Per-class weights of the cross-entropy.
    dice_weight : float
        Weight of the soft multi-class Dice loss (mean over the classes present in the
        target or predicted), 0 = cross-entropy only.

    Returns
    -------
    Tensor (scalar)
        Zero (with a gradient) when every pixel is ignored.
    """
    import torch
    import torch.nn.functional as F

    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits.float(), target, weight=class_weights,
                         ignore_index=ignore_index)
    if dice_weight <= 0:
        return ce
    probs = torch.softmax(logits.float(), dim=1)
    n_classes = logits.shape[1]
    safe = torch.where(valid, target, torch.zeros_like(target))
    onehot = F.one_hot(safe, n_classes).permute(0, 3, 1, 2).float()
    mask = valid.unsqueeze(1).float()
    probs, onehot = probs * mask, onehot * mask
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    present = denom > 0
    dice = 1.0 - (2.0 * inter[present] + 1.0) / (denom[present] + 1.0)
    return ce + dice_weight * dice.mean()


def confusion_matrix(labels: np.ndarray, truth: np.ndarray, n_classes: int, *,
                     ignore_index: int | None = IGNORE) -> np.ndarray:
    """(n_classes, n_classes) pixel counts, rows = truth, columns = prediction.

    Pixels whose truth is ``ignore_index`` (or outside ``0..n_classes-1``) are left out.

    Raises
    ------
    ValueError
        Shapes differ, or a prediction is outside ``0..n_classes-1``.
    """
    labels = np.asarray(labels).ravel().astype(np.int64)
    truth = np.asarray(truth).ravel().astype(np.int64)
    if labels.shape != truth.shape:
        raise ValueError(f"labels {labels.shape} and truth {truth.shape} differ")
    keep = (truth >= 0) & (truth < n_classes)
    if ignore_index is not None:
        keep &= truth != ignore_index
    labels, truth = labels[keep], truth[keep]
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"predicted labels must be in 0..{n_classes - 1}, got "
                         f"{labels.min()}..{labels.max()}")
    return np.bincount(truth * n_classes + labels,
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU ``tp / (tp + fp + fn)``; NaN for classes absent from truth and prediction."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    denom = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)


# =============================================================================================
# streamed training data


class SegmentationTrainingSet:
    """A torch-style dataset of augmented (image, target) crops, loaded one item at a time.

    Parameters
    ----------
    load_pair : callable
        ``load_pair(index) -> (image uint8 (H, W, 3), target int (H, W))``, reading from
        disk; targets use :data:`IGNORE` for pixels without a label.
    n_items : int
    crop_size : int
        Side of the square training crops.
    scale_range : (float, float)
        Random rescaling factor range applied before cropping.
    hflip : bool
        Random horizontal flips.
    color_jitter : float
        Strength of the brightness / contrast / saturation jitter (0 = none).
    seed : int

    Items are indexed by ``(epoch, index)`` so that the augmentation of an item is a pure
    function of (seed, epoch, index): the same in any order, on any worker, after a resume.
    """

    def __init__(self, load_pair: Callable[[int], tuple[np.ndarray, np.ndarray]], n_items: int,
                 *, crop_size: int = 224, scale_range=(0.7, 1.3), hflip: bool = True,
                 color_jitter: float = 0.2, seed: int = 0):
        self.load_pair = load_pair
        self.n_items = int(n_items)
        self.crop_size = int(crop_size)
        self.scale_range = tuple(scale_range)
        self.hflip = hflip
        self.color_jitter = color_jitter
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, key):
        import torch

        from unsup.augment import augment_pair

        epoch, index = key
        image, target = self.load_pair(int(index))
        rng = np.random.default_rng([self.seed, int(epoch), int(index), 0x5E6])
        image, target = augment_pair(image, target, rng=rng, crop_size=self.crop_size,
                                     scale_range=self.scale_range, hflip=self.hflip,
                                     color_jitter=self.color_jitter, ignore_index=IGNORE)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(target.astype(np.int64)))


class _BatchMaker:
    """``make_batches(epoch, start=0)`` over a :class:`SegmentationTrainingSet`."""

    def __init__(self, dataset: SegmentationTrainingSet, *, batch_size: int, seed: int,
                 num_workers: int = 0, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        n = len(dataset)
        self.drop_last = drop_last and n >= batch_size
        self.steps_per_epoch = n // batch_size if self.drop_last else math.ceil(n / batch_size)

    def order(self, epoch: int) -> list[list[int]]:
        perm = np.random.default_rng([self.seed, int(epoch), 0xBA7C]).permutation(
            len(self.dataset))
        batches = [perm[i:i + self.batch_size].tolist()
                   for i in range(0, len(perm), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __call__(self, epoch: int, start: int = 0):
        import torch

        batches = [[(epoch, i) for i in b] for b in self.order(epoch)[start:]]
        if self.num_workers > 0:
            return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches,
                                               num_workers=self.num_workers)
        return ((torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))
                for items in ([self.dataset[k] for k in b] for b in batches))


def make_batch_maker(dataset: SegmentationTrainingSet, *, batch_size: int, seed: int,
                     num_workers: int = 0):
    """A ``make_batches(epoch, start=0)`` for :func:`train`: shuffled per (seed, epoch),
    uint8 image batches (N, 3, h, w) and int64 targets (N, h, w); ``steps_per_epoch`` set."""
    return _BatchMaker(dataset, batch_size=batch_size, seed=seed, num_workers=num_workers)


# =============================================================================================
# a segmentation task (supervised and box-supervised methods)


class SegmentationTask:
    """Train a segmenter with cross-entropy (+ Dice) on (image, target) batches.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a float batch of uint8-range RGB images (N, 3, H, W) to logits (N, C, H, W)
        (the networks of :mod:`unsup.models` normalise internally). Parameters of a
        submodule ``encoder`` get ``lr * encoder_lr_scale``.
    lr, weight_decay : float
        AdamW settings.
    total_steps : int
        Length of the run, for the polynomial learning-rate decay
        ``(1 - step / total_steps) ** 0.9`` after ``warmup_steps`` of linear warm-up.
    class_weights : sequence of float, optional
    dice_weight : float
    validator : callable, optional
        ``validator(model) -> dict of metrics``, called by :meth:`validate`.
    device : torch.device or str, optional
        Default: CUDA when available. Mixed precision (float16 autocast + gradient scaling)
        is used on CUDA.
    """

    def __init__(self, model, *, lr: float = 1e-3, weight_decay: float = 1e-4,
                 encoder_lr_scale: float = 0.1, total_steps: int = 1000, warmup_steps: int = 0,
                 class_weights: Sequence[float] | None = None, dice_weight: float = 0.0,
                 validator: Callable | None = None, device=None):
        import torch

        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device)
        encoder = getattr(model, "encoder", None)
        enc_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
        enc_params = [p for p in model.parameters() if id(p) in enc_ids and p.requires_grad]
        other = [p for p in model.parameters() if id(p) not in enc_ids and p.requires_grad]
        groups = [{"params": other, "lr": lr}]
        if enc_params:
            groups.append({"params": enc_params, "lr": lr * encoder_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        total = max(int(total_steps), 1)
        warm = max(int(warmup_steps), 0)

        def factor(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            return max(1.0 - step / total, 0.0) ** 0.9

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.class_weights = (None if class_weights is None else
                              torch.as_tensor(class_weights, dtype=torch.float32,
                                              device=self.device))
        self.dice_weight = float(dice_weight)
        self.validator = validator

    def train_step(self, batch) -> dict[str, float]:
        import torch

        images, targets = batch
        images = images.to(self.device, non_blocking=True).float()
        targets = targets.to(self.device, non_blocking=True).long()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = self.model(images)
        loss, parts = self.compute_loss(logits, targets, images=images)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {"loss": float(loss.detach()), **parts}

    def compute_loss(self, logits, targets, *, images=None):
        """The training loss of one batch and a dict of extra values to log (subclasses with
        other targets or image-dependent terms override this)."""
        return segmentation_loss(logits, targets, class_weights=self.class_weights,
                                 dice_weight=self.dice_weight), {}

    def validate(self) -> dict[str, float]:
        if self.validator is None:
            return {}
        self.model.eval()
        return dict(self.validator(self.model))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# =============================================================================================
# dataset views for training


class BoxesOnlyDataset:
    """A dataset view whose samples carry the image and boxes but never masks.

    Wraps an :class:`unsup.datasets.Dataset` (boxes from an annotation file, the dataset's
    own boxes, or ``boxes_from_masks``): every loaded sample has ``ground_truth`` and
    ``boundaries`` set to None, so a box-supervised method cannot see the masks.
    """

    def __init__(self, dataset):
        if not getattr(dataset, "has_boxes", False):
            raise ValueError(
                f"{getattr(dataset, 'spec', dataset)}: has no boxes; give boxes=PATH "
                "(--boxes) or boxes_from_masks=True (--boxes-from-masks)")
        self.dataset = dataset
        self.spec = dataset.spec
        self.records = dataset.records
        self.kind = dataset.kind
        self.class_names = dataset.class_names
        self.ignore_index = dataset.ignore_index
        self.has_ground_truth = False
        self.has_boxes = True

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def ids(self) -> list[str]:
        return self.dataset.ids

    def load(self, index):
        sample = self.dataset.load(index)
        return dataclasses.replace(sample, ground_truth=None, boundaries=None)

    def iter_samples(self, *, on_error: str = "raise", errors: list | None = None):
        for sample in self.dataset.iter_samples(on_error=on_error, errors=errors):
            yield dataclasses.replace(sample, ground_truth=None, boundaries=None)

    def __iter__(self):
        return self.iter_samples(on_error="raise")


def restrict_classes(dataset, classes: Sequence[str | int]):
    """A copy of ``dataset`` keeping only ``classes``: label maps and boxes are remapped.

    Parameters
    ----------
    dataset : unsup.datasets.Dataset
    classes : sequence of str or int
        Class names (looked up in ``dataset.class_names``) or label ids to keep. The kept
        classes become labels ``1..K`` in the given order; every other class becomes the
        background 0 (void stays void); boxes of other classes are dropped.

    Returns
    -------
    unsup.datasets.Dataset
        With ``class_names = ["background", *kept names]``.
    """
    from unsup.datasets import DatasetError

    names = list(dataset.class_names or [])
    ids = []
    for c in classes:
        if isinstance(c, str) and not c.strip().lstrip("-").isdigit():
            if c not in names:
                raise DatasetError(f"{dataset.spec}: unknown class {c!r}; classes are: "
                                   f"{', '.join(names) or '(no class names: use ids)'}")
            ids.append(names.index(c))
        else:
            ids.append(int(c))
    if not ids:
        raise DatasetError("restrict_classes: no class given")
    if len(set(ids)) != len(ids):
        raise DatasetError(f"restrict_classes: repeated class in {list(classes)}")
    if 0 in ids:
        raise DatasetError("restrict_classes: class 0 is the background, it is always kept")
    new_names = ["background"] + [names[i] if i < len(names) else str(i) for i in ids]
    mapping = {old: new for new, old in enumerate(ids, start=1)}
    void = dataset.ignore_index

    def remap(labels: np.ndarray) -> np.ndarray:
        out = np.zeros_like(labels)
        for old, new in mapping.items():
            out[labels == old] = new
        if void is not None:
            out[labels == void] = void
        return out

    inner_loader, inner_boxes = dataset._loader, dataset._box_source

    def loader(record, shape):
        gt, bnd, boxes = inner_loader(record, shape)
        if gt is not None:
            gt = [remap(g) for g in gt]
        return gt, bnd, _remap_boxes(boxes, mapping)

    def box_source(record, shape):
        return _remap_boxes(inner_boxes(record, shape), mapping)

    view = dataclasses.replace(dataset, class_names=new_names,
                               _loader=loader if inner_loader is not None else None,
                               _box_source=box_source if inner_boxes is not None else None)
    return view


def _remap_boxes(boxes, mapping):
    if boxes is None:
        return None
    return [dataclasses.replace(b, label=mapping[b.label]) for b in boxes if b.label in mapping]


def split_dataset(dataset, fraction: float, *, seed: int = 0):
    """Split a dataset's records into (train, held-out) views, deterministically.

    A permutation seeded by ``seed`` picks ``round(fraction * n)`` records (at least one,
    at most n - 1) for the held-out part; both parts keep the dataset's order.
    """
    n = len(dataset.records)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    if n < 2:
        raise ValueError(f"{dataset.spec}: cannot split {n} image(s)")
    k = min(max(int(round(fraction * n)), 1), n - 1)
    held = set(np.random.default_rng([int(seed), 0x5917]).permutation(n)[:k].tolist())
    train_records = [r for i, r in enumerate(dataset.records) if i not in held]
    held_records = [r for i, r in enumerate(dataset.records) if i in held]
    return (dataclasses.replace(dataset, records=train_records),
            dataclasses.replace(dataset, records=held_records))
