"""The ``SampleStore`` contract: persist fixed-schema records by int64 id.

Every backend implements the underscore methods; the public methods here validate first, so a
rejected call changes nothing, and give every backend the same errors. Tests for the contract live
in ``tests/conformance/store_tests.py``: a new backend subclasses ``SampleStoreTests`` and gets
the whole suite.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .errors import MissingIdsError, StoreClosedError, StorePermissionError, format_ids
from .schema import Schema, validate_ids

if TYPE_CHECKING:
    import asyncio


class Chunk(NamedTuple):
    """Records read together from one physical chunk: ``ids`` (int64, ascending) and ``fields``."""

    ids: np.ndarray
    fields: dict[str, np.ndarray]


class SampleStore(ABC):
    """A persistent table ``id (int64 >= 0) -> record`` with a fixed :class:`Schema`.

    Batched operations on stacked arrays are the API; no per-sample Python objects cross it::

        with open_store("lmdb:///tmp/flash", schema) as store:
            store.put_many(ids, {"x": xs, "y": ys})
            batch = store.get_many(ids[:4])        # dict of arrays, in the order of the ids

    ``put_many`` of an existing id replaces its record. Each call is atomic: after a crash a batch
    is either wholly visible or not at all. A store is used by the process that opened it only
    (open stores after ``fork``); it may be shared between threads.
    """

    #: URL scheme handled by this backend, e.g. ``"lmdb"``.
    scheme: str = ""

    def __init__(self, path: Path, schema: Schema, url: str, readonly: bool) -> None:
        self.path = Path(path)
        self.schema = schema
        self.url = url
        self.readonly = readonly
        self._pid = os.getpid()
        self._closed = False
        self._close_lock = threading.Lock()

    # ---- the public contract --------------------------------------------------------------
    def put_many(self, ids: Any, fields: Mapping[str, Any]) -> None:
        """Store (or replace) one record per id, atomically.

        ``ids``: 1-D int64-compatible array of unique non-negative ids; ``fields``: every schema
        field as an array of shape ``(len(ids), *field_shape)``. Raises ``SchemaError`` (a
        ``ValueError``) on a bad batch, ``StoreFullError`` when space runs out; either way
        nothing is written.
        """
        self._check_writable()
        ids, fields = self.schema.validate_batch(ids, fields)
        if ids.size:
            self._put(ids, fields)

    def get_many(self, ids: Any) -> dict[str, np.ndarray]:
        """Return ``{field: array of shape (len(ids), *field_shape)}`` in the order of ``ids``.

        Repeated ids are returned repeatedly. Raises ``MissingIdsError`` (a ``KeyError``) naming
        unknown ids and ``CorruptRecordError`` when a record fails its checksum.
        """
        self._check_open()
        ids = validate_ids(ids)
        if not ids.size:
            return {k: np.zeros((0, *v.shape), v.dtype) for k, v in self.schema.items()}
        return self._get(ids)

    def delete_many(self, ids: Any) -> None:
        """Delete records, atomically. Unknown ids raise ``MissingIdsError`` and delete nothing."""
        self._check_writable()
        ids = validate_ids(ids, unique=True)
        if ids.size:
            self._delete(ids)

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean array: which of ``ids`` are stored."""
        self._check_open()
        ids = validate_ids(ids)
        if not ids.size:
            return np.zeros(0, dtype=bool)
        return self._contains(ids)

    def ids(self) -> np.ndarray:
        """Every stored id, ascending, as int64."""
        self._check_open()
        return self._ids()

    def __len__(self) -> int:
        self._check_open()
        return self._len()

    @property
    def nbytes(self) -> int:
        """Bytes the store occupies on disk (allocated blocks of its files, not apparent sizes)."""
        self._check_open()
        return _disk_usage(self.path)

    def flush(self) -> None:
        """Make every returned ``put_many``/``delete_many`` durable (fsync)."""
        self._check_open()
        if not self.readonly:
            self._flush()

    def close(self) -> None:
        """Flush and release the store; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if os.getpid() == self._pid:
            self._close()

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{'ro' if self.readonly else 'rw'}"
        return f"<{type(self).__name__} {self.url} {state}>"

    # ---- chunk-granular reads (what the swap engine uses to pull many candidates per read) -----
    #: Whether a chunk read costs about what one record read costs (True for stores with
    #: physical chunks): readers that want many records then read whole chunks.
    prefers_chunks: bool = False

    @property
    @abstractmethod
    def chunk_rows(self) -> int:
        """At most this many records per chunk."""

    @abstractmethod
    def num_chunks(self) -> int:
        """Chunk indexes :meth:`get_chunk` accepts are ``range(num_chunks())``; some may hold
        no record."""

    @abstractmethod
    def get_chunk(self, index: int) -> Chunk:
        """The records of chunk ``index``, read together (``IndexError`` outside the range)."""

    @abstractmethod
    def chunk_of(self, ids: Any) -> np.ndarray:
        """The chunk index holding each id; unknown ids raise ``MissingIdsError``."""

    @abstractmethod
    def iter_chunks(self) -> Iterator[Chunk]:
        """Every record exactly once, a chunk at a time (chunks holding no record are skipped)."""

    def bind_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Offer the running event loop of the caller's I/O (the swap engine's), or take it back
        with ``None``.

        A store whose reads are asynchronous inside (the files store) then runs them on that loop
        when ``get_many`` is called from another thread, instead of on a loop of its own. Nothing
        by default; a store must keep working if the loop stops. The caller unbinds before it
        stops the loop.
        """

    def quarantined_ids(self) -> np.ndarray:
        """Ids removed from the live set because their record failed its checksum."""
        self._check_open()
        return self._quarantined()

    # ---- what a backend implements --------------------------------------------------------
    @abstractmethod
    def _put(self, ids: np.ndarray, fields: dict[str, np.ndarray]) -> None: ...

    @abstractmethod
    def _get(self, ids: np.ndarray) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _delete(self, ids: np.ndarray) -> None: ...

    @abstractmethod
    def _contains(self, ids: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _ids(self) -> np.ndarray: ...

    @abstractmethod
    def _len(self) -> int: ...

    @abstractmethod
    def _flush(self) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def _quarantined(self) -> np.ndarray: ...

    # ---- shared checks ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self.url}: the store is closed")
        if os.getpid() != self._pid:
            raise StoreClosedError(
                f"{self.url}: opened in process {self._pid}, used in {os.getpid()}; open stores after fork")

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise StorePermissionError(f"{self.url}: opened read-only (mode=ro)")

    def _missing(self, ids: np.ndarray, found: np.ndarray) -> MissingIdsError:
        lost = np.unique(ids[~found])
        return MissingIdsError(f"{self.url}: {lost.size} id(s) not in the store: {format_ids(lost)}", lost)


def _disk_usage(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:  # a file replaced while we walk (zarr's rename)
                continue
    return total
