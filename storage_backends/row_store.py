"""What the Zarr and flat stores share: records in numbered rows of the store's own files, and a
row manifest (``row_manifest.py``) saying which id lives in which row, with which CRC-32C.

Everything keyed by id lives here -- lookups, deletes, quarantine, chunks as row ranges, and the
order of a flush (rows durable before the journal entries that name them) and of a close -- so a
row store implements only how rows are written, how a batch of rows is read and checked
(``_read_checked``) and how its rows are made durable (``_sync_rows``) and let go of (``_release_rows``).
"""

from __future__ import annotations

import threading
from abc import abstractmethod

import numpy as np

from .base import Chunk, SampleStore
from .errors import CorruptRecordError, format_ids, from_os_error
from .locking import WriterLock
from .row_manifest import Manifest
from .schema import validate_ids


class RowStore(SampleStore):
    """A :class:`SampleStore` whose truth is a :class:`Manifest`; subclasses set ``_manifest``,
    ``_mutex`` (reads see a consistent manifest; one writer at a time), ``_chunk`` and ``_lock``
    (the store folder's, from :func:`~storage_backends.locking.lock_store_dir`)."""

    _manifest: Manifest
    _mutex: threading.RLock
    _chunk: int
    _lock: WriterLock
    #: How :meth:`_fail` says what was wrong with the records it names.
    _damage = "failed their checksum or could not be read"

    @abstractmethod
    def _read_checked(self, ids: np.ndarray, rows: np.ndarray, crcs: np.ndarray) -> dict[str, np.ndarray]:
        """Read ``rows`` (caller holds ``_mutex``), check them against ``crcs``, and return the
        fields; damaged records go to :meth:`_fail`."""

    @abstractmethod
    def _sync_rows(self) -> None:
        """Make every row written so far durable (caller holds ``_mutex``)."""

    def _release_rows(self) -> None:
        """At close, before the manifest closes: let go of what reads or writes the rows (nothing by default)."""

    def _prefetch_rows(self, rows: np.ndarray) -> None:
        """Called before a chunk's rows are read (ascending): a hint, nothing by default."""

    # ---- keyed by id ----------------------------------------------------------------------------
    def _get(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        with self._mutex:
            found, rows, crcs = self._manifest.lookup(ids)
            if not found.all():
                raise self._missing(ids, found)
            return self._read_checked(ids, rows, crcs)

    def _delete(self, ids: np.ndarray) -> np.ndarray:
        """Delete ``ids`` from the manifest; returns the rows they held (a subclass frees them)."""
        with self._mutex:
            found, rows, _ = self._manifest.lookup(ids)
            if not found.all():
                raise self._missing(ids, found)
            try:
                self._manifest.delete(ids)
            except OSError as exc:
                raise from_os_error(exc, f"{self.url}: delete failed") from exc
            return rows

    def _fail(self, bad_ids: np.ndarray) -> None:
        """Quarantine ``bad_ids`` (when writable) and raise :class:`CorruptRecordError`."""
        where = "quarantined" if not self.readonly else "left in place (read-only)"
        if not self.readonly:
            try:
                self._manifest.quarantine(bad_ids)
            except OSError as exc:
                where = f"not quarantined ({exc})"
        raise CorruptRecordError(f"{self.url}: {bad_ids.size} record(s) {self._damage}: "
                                 f"{format_ids(bad_ids)}; {where}", bad_ids)

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        with self._mutex:
            return self._manifest.lookup(ids)[0]

    def _ids(self) -> np.ndarray:
        with self._mutex:
            return self._manifest.ids.copy()

    def _len(self) -> int:
        return int(self._manifest.ids.size)

    def _quarantined(self) -> np.ndarray:
        with self._mutex:
            return self._manifest.quarantined.copy()

    # ---- chunks: row ranges ---------------------------------------------------------------------
    @property
    def chunk_rows(self) -> int:
        return self._chunk

    def chunk_of(self, ids) -> np.ndarray:
        self._check_open()
        ids = validate_ids(ids)
        with self._mutex:
            found, rows, _ = self._manifest.lookup(ids)
        if not found.all():
            raise self._missing(ids, found)
        return rows // self._chunk

    def num_chunks(self) -> int:
        self._check_open()
        return -(-self._manifest.capacity // self._chunk)

    def get_chunk(self, index: int) -> Chunk:
        """The live records stored in rows ``[index * chunk_rows, (index + 1) * chunk_rows)``."""
        self._check_open()
        n_chunks = self.num_chunks()
        if not 0 <= index < n_chunks:
            raise IndexError(f"{self.url}: chunk {index} out of range [0, {n_chunks})")
        with self._mutex:
            ids, rows, crcs = self._manifest.ids_in_rows(index * self._chunk, (index + 1) * self._chunk)
            if not ids.size:
                return Chunk(ids, {k: np.zeros((0, *v.shape), v.dtype) for k, v in self.schema.items()})
            self._prefetch_rows(rows)
            return Chunk(ids, self._read_checked(ids, rows, crcs))

    def iter_chunks(self):
        self._check_open()
        with self._mutex:
            live = np.unique(self._manifest.rows // self._chunk)
        for i in live:
            chunk = self.get_chunk(int(i))
            if chunk.ids.size:  # it may have emptied since
                yield chunk

    # ---- durability and lifecycle -------------------------------------------------------------
    def _flush(self) -> None:
        with self._mutex:
            try:
                self._sync_rows()  # rows before the journal entries that name them
                self._manifest.flush()
            except OSError as exc:
                raise from_os_error(exc, f"{self.url}: flush failed") from exc

    def _close(self) -> None:
        try:
            if not self.readonly:
                self._flush()
        finally:
            self._release_rows()
            self._manifest.close()
            self._lock.release()
