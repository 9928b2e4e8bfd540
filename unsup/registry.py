"""One registry of methods by name.

Method modules in the ``methods`` package decorate their class with :func:`register`; the
registry imports ``methods`` on first use so that every method is known.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from unsup.base import MODEL_FILE, ModelLoadError, SegmentationMethod, read_model_meta

__all__ = ["register", "get_method", "available_methods", "create_method", "load_method",
           "method_parameters"]

_REGISTRY: dict[str, type[SegmentationMethod]] = {}


def register(cls: type[SegmentationMethod]) -> type[SegmentationMethod]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _populate() -> None:
    import methods  # noqa: F401  (importing registers every method)


def available_methods() -> dict[str, type[SegmentationMethod]]:
    """All registered methods, sorted by name."""
    _populate()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[SegmentationMethod]:
    """The method class registered as ``name``."""
    methods = available_methods()
    if name not in methods:
        raise KeyError(
            f"unknown method {name!r}; available: {', '.join(methods)} (see `unsup methods`)"
        )
    return methods[name]


def method_parameters(cls: type[SegmentationMethod]) -> dict[str, object]:
    """Hyper-parameter names and defaults of a method, from its ``__init__`` signature."""
    params = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        params[p.name] = None if p.default is inspect.Parameter.empty else p.default
    return params


def create_method(name: str, **params) -> SegmentationMethod:
    """Instantiate method ``name`` with hyper-parameters, rejecting unknown names clearly."""
    cls = get_method(name)
    known = method_parameters(cls)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(
            f"method {name!r} has no parameter(s) {', '.join(unknown)}; "
            f"its parameters are: {', '.join(known) or '(none)'}"
        )
    return cls(**params)


def load_method(directory) -> SegmentationMethod:
    """Load a saved model directory, whatever method wrote it."""
    directory = Path(directory)
    meta = read_model_meta(directory)
    try:
        cls = get_method(meta["method"])
    except KeyError as exc:
        raise ModelLoadError(f"{directory / MODEL_FILE}: {exc.args[0]}") from None
    return cls.load(directory)
