"""carousel on Ray: a replay memory sharded over Ray actors, one carousel memory per shard (a front).
May import the memory core (and Ray, lazily); never the daemon; nothing in the core imports it.

``pip install 'carousel[ray]'``. See :mod:`carousel.ray.sharded` for the client and
``docs/scale-out.md`` for when to use it.

>>> from carousel.ray import route, shard_of  # the pure parts import without Ray
>>> route("class", 2, labels=[3, 4]).tolist(), shard_of([7, 10], 2).tolist()
([1, 0], [1, 0])

The names below that need Ray (``ShardedMemory``, ``ShardActor``, ...) are imported on first use,
so ``import carousel.ray`` works, and says what to install, where Ray is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from .allocation import Composition, allocate
from .config import ShardingConfig
from .layout import ShardLayoutError
from .routing import content_keys, global_ids, local_ids, route, shard_of

__all__ = ["Composition", "ShardActor", "ShardLayoutError", "ShardPlacementError", "ShardStartError",
           "ShardUnavailableError", "ShardedBatch", "ShardedMemory", "ShardingConfig", "allocate", "content_keys",
           "global_ids", "local_ids", "route", "shard_of"]

_NEEDS_RAY = {"ShardedMemory": "sharded", "ShardedBatch": "sharded", "ShardUnavailableError": "sharded",
              "ShardStartError": "sharded",
              "ShardActor": "actor", "ShardPlacementError": "placement"}


def __getattr__(name: str) -> Any:
    module = _NEEDS_RAY.get(name)
    if module is None:
        raise AttributeError(f"module 'carousel.ray' has no attribute {name!r}")
    try:
        importlib.import_module("ray")
    except ImportError as exc:
        raise ImportError(f"carousel.ray.{name} needs Ray: pip install 'carousel[ray]' ({exc})") from None
    return getattr(importlib.import_module(f".{module}", __name__), name)
