"""Where and how torch runs: the device, the global seeds and RNG states, the thread count.

Every method, the training loop and the feature extractors use these helpers, so a device
default, a seeding rule or a thread setting is decided in one place.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np

__all__ = ["resolve_device", "seed_all", "get_rng_state", "set_rng_state", "torch_threads"]


def resolve_device(device=None):
    """The torch device to run on.

    Parameters
    ----------
    device : str or torch.device, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; None (or ``""``) picks CUDA when available,
        else the CPU.

    Returns
    -------
    torch.device
    """
    import torch

    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every GPU)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """Global RNG states (Python, NumPy, torch CPU and CUDA) as tensors and primitives, so
    that a checkpoint holding them loads with ``torch.load(..., weights_only=True)``."""
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


@contextlib.contextmanager
def torch_threads(n_threads: int | None, *, flush_denormal: bool = False):
    """Run the block with ``n_threads`` torch intra-op threads, restoring the setting after.

    Parameters
    ----------
    n_threads : int or None
        Threads to use; None leaves torch's setting unchanged.
    flush_denormal : bool
        Also flush denormal floats to zero inside the block (Adam's second moments otherwise
        hit slow denormal arithmetic on CPUs).

    Raises
    ------
    ValueError
        ``n_threads`` is below 1.
    """
    import torch

    previous = torch.get_num_threads()
    if n_threads is not None:
        if isinstance(n_threads, bool) or int(n_threads) < 1:
            raise ValueError(f"n_threads must be >= 1 or None, got {n_threads!r}")
        torch.set_num_threads(int(n_threads))
    if flush_denormal:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flush_denormal:
            torch.set_flush_denormal(False)
        torch.set_num_threads(previous)
