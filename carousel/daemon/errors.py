"""The daemon's errors, and how an exception in a request becomes an ``ERROR`` frame's ``kind``.

A ``kind`` (``input``, ``store``, ``shm``, ``timeout``, ``io``, ``internal``; ``busy``, ``auth``,
``session``... for what only the daemon says) is what :class:`~carousel.RemoteError` carries; the
exception's class travels by name beside it, so the client raises the class the in-process memory
would (docs/protocol.md).
"""

from __future__ import annotations

from storage_backends import StoreError

from ..config import ConfigError
from ..inputs import MemoryInputError
from ..write_behind import WriteBehindError
from .shm import ShmError


class DaemonError(RuntimeError):
    """The daemon cannot start: a second daemon, an unsafe socket directory, no shared memory..."""


class RequestError(Exception):
    """A request the daemon refuses, with the ``kind`` its ``ERROR`` frame names (the connection stays)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# An exception raised by a memory operation -> the kind its ERROR frame names; the first match wins.
ERROR_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (MemoryInputError, "input"), (ConfigError, "input"), (KeyError, "input"), (ValueError, "input"),
    (TypeError, "input"), (StoreError, "store"), (WriteBehindError, "store"), (ShmError, "shm"),
    (TimeoutError, "timeout"), (OSError, "io"))
