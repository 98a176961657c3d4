"""Continual-learning methods, one module each, registered by name in :data:`METHODS`."""

from __future__ import annotations

from .base import Context, Method, PhaseTimer, ReplayMemory

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to ``python -m trainers run --method NAME``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    _load_builtin()
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def _load_builtin() -> None:
    import importlib
    for module in ("er", "derpp", "icarl", "gdumb", "gcr"):
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":
                raise


__all__ = ["METHODS", "Context", "Method", "PhaseTimer", "ReplayMemory", "get_method", "register"]
