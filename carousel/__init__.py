"""carousel: a storage-tiered replay memory for continual learning; this top level is the memory core.
It may import ``storage_backends`` and ``carousel.kinds``' face, never the daemon; this face and cli.py span the rooms.

A small episodic memory (EM) in RAM, every sample also kept on flash (LMDB) and disk (Zarr)
tiers, and a swap engine that refills EM slots with other stored samples in the background, so a
learner replays far more of its past at the same speed (Carousel Memory, CarM, DAC 2022).

Example (not a doctest: it needs a memory.toml and a running daemon)::

    from carousel import CarouselMemory
    mem = CarouselMemory.from_toml("memory.toml")  # in-process
    mem = carousel.connect()  # or served by `carousel serve`
    mem = carousel.spawn("memory.toml")  # or by a private daemon, a child process of this one

The names below are imported on first use (PEP 562), so ``import carousel`` and the command line
(``carousel --help``, ``check-config``, a ``status`` that finds no daemon) do not load torch
(~2 s here); ``from carousel import CarouselMemory`` works as before.

>>> import carousel
>>> carousel.ConfigError.__module__
'carousel.config'
>>> [name for name in carousel.__all__ if getattr(carousel, name, None) is None]  # each one resolves
[]
>>> carousel.CarouselMemry
Traceback (most recent call last):
...
AttributeError: module 'carousel' has no attribute 'CarouselMemry'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    "Batch": "batch",
    "CarouselConfig": "config", "ConfigError": "config", "load_config": "config",
    "MemoryInputError": "inputs",
    "IntegrityError": "integrity",
    "CarouselMemory": "memory",
    "WriteBehindError": "write_behind",
    "DaemonRestartedError": "daemon.client", "InFlightLostError": "daemon.client", "MemoryClient": "daemon.client",
    "connect": "daemon.client",
    "SpawnedDaemonExited": "daemon.spawn", "SpawnedMemory": "daemon.spawn", "spawn": "daemon.spawn",
    "ReplayDataset": "daemon.dataset", "StreamReplayDataset": "daemon.dataset",
    "RemoteError": "daemon.wire",
}

__all__ = ["Batch", "CarouselConfig", "CarouselMemory", "ConfigError", "DaemonRestartedError", "InFlightLostError",
           "IntegrityError", "MemoryClient", "MemoryInputError",
           "RemoteError", "ReplayDataset", "SpawnedDaemonExited", "SpawnedMemory", "StreamReplayDataset",
           "WriteBehindError", "connect", "load_config", "spawn",
           "__version__"]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ below does the imports
    from .batch import Batch
    from .config import CarouselConfig, ConfigError, load_config
    from .daemon.client import (
        DaemonRestartedError,
        InFlightLostError,
        MemoryClient,
        connect,
    )
    from .daemon.dataset import ReplayDataset, StreamReplayDataset
    from .daemon.spawn import SpawnedDaemonExited, SpawnedMemory, spawn
    from .daemon.wire import RemoteError
    from .inputs import MemoryInputError
    from .integrity import IntegrityError
    from .memory import CarouselMemory
    from .write_behind import WriteBehindError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
