"""The one exception hierarchy of ``storage_backends``.

Every error a store raises is a :class:`StoreError`. Subclasses also derive from the stdlib
exception a caller would naturally catch (``KeyError`` for unknown ids, ``ValueError`` for bad
shapes or dtypes, ...), so code that does not know our names still works.

A rejected call changes nothing: stores validate before they act.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

import numpy as np


class StoreError(Exception):
    """Base class of every error raised by a :class:`~storage_backends.SampleStore`."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


class InvalidURLError(StoreError, ValueError):
    """A store URL that cannot be parsed: unknown scheme, unknown or malformed parameter."""


class SchemaError(StoreError, ValueError):
    """A schema, a field, a shape or a dtype that does not fit the store's schema."""


class MissingIdsError(StoreError, KeyError):
    """Some requested ids are not in the store. ``.ids`` holds them (int64 array)."""

    def __init__(self, message: str, ids: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.ids = np.asarray(list(ids), dtype=np.int64)


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The store does not exist and no schema was given to create it."""


class StoreLockedError(StoreError):
    """Another process (or another handle in this process) holds the store's writer lock."""


class StoreFullError(StoreError, OSError):
    """The disk, the file system quota or the configured maximum size is exhausted."""


class StorePermissionError(StoreError, PermissionError):
    """The store's files cannot be written (read-only file system, permissions)."""


class StoreClosedError(StoreError):
    """The store was closed, or is used in a process other than the one that opened it."""


class CorruptStoreError(StoreError):
    """The store's files are damaged beyond a single record (truncated file, bad metadata)."""


class CorruptRecordError(StoreError):
    """Stored records failed their checksum. ``.ids`` holds them; they were quarantined when the
    store was writable (removed from the live set, listed by ``quarantined_ids()``)."""

    def __init__(self, message: str, ids: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.ids = np.asarray(list(ids), dtype=np.int64)


def format_ids(ids: np.ndarray, limit: int = 8) -> str:
    """Render a few ids for an error message: ``[3, 7, 9, ... (+12 more)]``."""
    ids = np.asarray(ids).ravel()
    head = ", ".join(str(int(i)) for i in ids[:limit])
    more = f", ... (+{ids.size - limit} more)" if ids.size > limit else ""
    return f"[{head}{more}]"


def from_os_error(exc: OSError, what: str) -> StoreError:
    """The typed store error for an ``OSError`` of a file-based store (a ``StoreError`` passes)."""
    if isinstance(exc, StoreError):
        return exc
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StoreFullError(f"{what}: no space left ({exc}); nothing was written")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return StorePermissionError(f"{what}: not writable ({exc}); open with ?mode=ro to read")
    if exc.errno == errno.ENOENT:
        return StoreNotFoundError(f"{what}: {exc}")
    return StoreError(f"{what}: {exc}")
