"""The one training loop of every network method (supervised, boxsup, wnet, ...).

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

A method's ``fit(samples, *, val_samples=None, run=RunOptions(...), progress=False)`` builds its
task and batch maker and calls :func:`train` with ``run.out_dir``, ``run.epochs`` (None: the
method's own number), ``run.max_minutes`` and ``run.resume``.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from unsup.nn.runtime import get_rng_state, seed_all, set_rng_state

__all__ = ["TrainingTask", "TrainingHistory", "train", "load_checkpoint", "plot_history"]

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
CHECKPOINT_FORMAT = 1


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
        raise ValueError(f"{path}: not a checkpoint of unsup.nn.loop.train")
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
