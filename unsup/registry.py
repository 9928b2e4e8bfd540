"""One registry of methods by name.

Method modules in the ``methods`` package decorate their class with :func:`register`; the
registry imports ``methods`` on first use so that every method is known.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from unsup.base import (
    MODEL_FILE,
    ModelLoadError,
    OptionGroup,
    SegmentationMethod,
    read_model_meta,
)

__all__ = ["register", "get_method", "available_methods", "create_method", "load_method",
           "method_parameters", "describe_parameters"]

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


def describe_parameters(cls: type[SegmentationMethod]) -> list[str]:
    """Lines describing a method's hyper-parameters and defaults for ``unsup methods``: the
    top-level ones on the first line, then one line per nested group (``group__key``)."""
    defaults = cls().get_params(deep=False)
    plain = {k: v for k, v in defaults.items() if not isinstance(v, OptionGroup)}
    lines = [", ".join(f"{k}={v!r}" for k, v in plain.items())] if plain else []
    for key, group in defaults.items():
        if isinstance(group, OptionGroup):
            lines.append(f"{key}__: " + ", ".join(
                f"{k}={v!r}" for k, v in group.get_params(deep=False).items()))
    return lines


def create_method(name: str, **params) -> SegmentationMethod:
    """Instantiate method ``name`` with hyper-parameters, rejecting unknown names clearly.

    ``group__key`` entries set an option of a nested group (``network__lr=0.01``).
    """
    cls = get_method(name)
    known = method_parameters(cls)
    top = {k: v for k, v in params.items() if "__" not in k}
    nested = {k: v for k, v in params.items() if "__" in k}
    unknown = sorted(set(top) - set(known))
    unknown += sorted(k for k in nested if k.split("__", 1)[0] not in known)
    if unknown:
        raise ValueError(
            f"method {name!r} has no parameter(s) {', '.join(unknown)}; "
            f"its parameters are: {', '.join(known) or '(none)'}"
        )
    method = cls(**top)
    if nested:
        for key in nested:
            group_name, option = key.split("__", 1)
            group = getattr(method, group_name)
            if not isinstance(group, OptionGroup):
                raise ValueError(f"method {name!r}: {group_name} is not a group of options, "
                                 f"so {key} is not a parameter")
            if option not in group.get_params(deep=False):
                raise ValueError(f"method {name!r}: {group_name} has no option {option!r}; "
                                 f"its options are: {', '.join(group.get_params(deep=False))}")
        method.set_params(**nested)
    return method


def load_method(directory) -> SegmentationMethod:
    """Load a saved model directory, whatever method wrote it."""
    directory = Path(directory)
    meta = read_model_meta(directory)
    try:
        cls = get_method(meta["method"])
    except KeyError as exc:
        raise ModelLoadError(f"{directory / MODEL_FILE}: {exc.args[0]}") from None
    return cls.load(directory)
