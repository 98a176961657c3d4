"""The manifest of a store that keeps records in rows of its own files (Zarr, flat): which id
lives in which row, with which checksum.

Neither Zarr v3 nor a flat file has transactions, so such a store keeps its own truth beside the
data: a snapshot plus an append-only journal, both checksummed. A row enters the manifest only
after its data is in place (the journal entry is appended after the data write returned), and a
live row is never overwritten (replacing an id writes a new row, then frees the old one), so a
crash never leaves an id pointing at a row that was not written. A torn journal tail -- the entry
being appended when the process died -- is dropped on open: the batch it described was never
acknowledged.

In memory the manifest is two sorted numpy columns (``ids``, ``rows``) and two arrays by row
(``row_id``, ``row_crc``): no per-sample Python objects. While the ids are dense (the largest
below ``max(DENSE_MIN, DENSE_SLACK * live ids)``, as a memory's sequential ids are), lookups read
an int32 row by id instead of bisecting: 256 random ids among 200,000 cost ~60 us through
``searchsorted`` (a cache miss per bisection step) and ~5 us that way. Keeping the CRCs by row
pays for that map: bookkeeping stays within the 64 B a row at peak that the device profiles
budget (``tests/deploy/test_profiles.py`` measures it).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import google_crc32c
import numpy as np

from .errors import CorruptStoreError

_SNAP_MAGIC = b"CZSNAP01"
_SNAP_HEAD = struct.Struct("<8sQQQQ")  # magic, generation, n live, capacity, n quarantined
_ENTRY_HEAD = struct.Struct("<2sBxII")  # magic, op, pad, n, crc32c(header[:8] + payload)
_ENTRY_MAGIC = b"CJ"
OP_PUT, OP_DELETE, OP_QUARANTINE = 1, 2, 3
#: The journal is folded into a new snapshot once it exceeds this and the snapshot's own size.
COMPACT_MIN_BYTES = 1 << 20
#: Ids below this many, or this many times the live ids, are looked up by id (see above).
DENSE_MIN, DENSE_SLACK = 1 << 16, 4


class Manifest:
    """Id -> (row, crc) map of a row store (Zarr, flat), persisted in ``directory``."""

    def __init__(self, directory: Path, capacity: int, writable: bool, sync: bool) -> None:
        self.dir = Path(directory)
        self.sync = sync
        self.writable = writable
        # The sorted columns live at the front of buffers with room to append (see ``_append_columns``).
        self._ids_buf = np.zeros(0, np.int64)
        self._rows_buf = np.zeros(0, np.int64)
        self._n = 0
        self._free_from = 0  # every row below this one is live (where allocate() starts looking)
        self.quarantined = np.zeros(0, np.int64)
        self.row_id = np.full(capacity, -1, dtype=np.int64)  # id stored in each row, -1: free
        self.row_crc = np.zeros(capacity, dtype=np.uint32)  # CRC-32C of the record in each live row
        self._dense: np.ndarray | None = None  # int32 row by id, -1: absent (see the module docstring)
        self.generation = 0
        self._journal_fd = -1
        self._journal_bytes = 0
        self._dirty = False
        if writable:
            self.dir.mkdir(mode=0o700, exist_ok=True)
        self._load(capacity)

    # ---- queries --------------------------------------------------------------------------
    @property
    def ids(self) -> np.ndarray:
        """Live ids, ascending (a view: copy it to keep it past the next update)."""
        return self._ids_buf[:self._n]

    @property
    def rows(self) -> np.ndarray:
        """The row of each of :attr:`ids` (a view, as ``ids``)."""
        return self._rows_buf[:self._n]

    def _set_columns(self, ids: np.ndarray, rows: np.ndarray) -> None:
        self._ids_buf, self._rows_buf, self._n = ids, rows, ids.size

    def _append_columns(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Ids above every live one, ascending, added at the end of the columns: amortized
        O(len(ids)) where an insertion copies both columns (~90 us a put at 30 k ids). The
        buffers grow by a quarter, so the bookkeeping's peak stays within its budget (above)."""
        end = self._n + ids.size
        if end > self._ids_buf.size:
            room = max(end, self._n + self._n // 4, 1024)
            for name in ("_ids_buf", "_rows_buf"):
                grown = np.empty(room, np.int64)
                grown[:self._n] = getattr(self, name)[:self._n]
                setattr(self, name, grown)
        self._ids_buf[self._n:end] = ids
        self._rows_buf[self._n:end] = rows
        self._n = end

    @property
    def capacity(self) -> int:
        return self.row_id.size

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(found, rows, crcs)`` for ``ids``; rows/crcs are meaningful where ``found``."""
        if self._dense is not None and (not ids.size or int(ids.max()) < self._dense.size):
            rows = self._dense[ids].astype(np.int64)
            found = rows >= 0
        elif self.ids.size:
            pos = np.minimum(np.searchsorted(self.ids, ids), self.ids.size - 1)
            found, rows = self.ids[pos] == ids, self.rows[pos]
        else:
            return np.zeros(ids.size, bool), np.zeros(ids.size, np.int64), np.zeros(ids.size, np.uint32)
        if not self.row_crc.size:  # no rows at all: nothing is found
            return found, rows, np.zeros(ids.size, np.uint32)
        return found, rows, self.row_crc[np.where(found, rows, 0)]

    def _index_dense(self) -> None:
        """(Re)build the by-id rows, or drop them if the ids are too sparse (or rows too many)."""
        self._dense = None  # the old map goes first: the peak holds one map, not two
        top = int(self.ids[-1]) + 1 if self.ids.size else 0
        if top > max(DENSE_MIN, DENSE_SLACK * self.ids.size) or self.row_id.size >= 2**31:
            return
        dense = np.full(top + top // 8 + 1024, -1, dtype=np.int32)
        dense[self.ids] = self.rows
        self._dense = dense

    def ids_in_rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Live ``(ids, rows, crcs)`` with ``lo <= row < hi``, ordered by row."""
        rid = self.row_id[lo:hi]
        live = np.flatnonzero(rid >= 0)
        return rid[live], live + lo, self.row_crc[live + lo]

    def allocate(self, n: int) -> np.ndarray | None:
        """The ``n`` lowest free rows, or ``None`` if fewer than ``n`` are free (grow first).

        The search starts at the lowest row that may be free and stops once it has ``n``: a
        look at every row was O(capacity) per put."""
        if n <= 0:
            return np.zeros(0, np.int64)
        rid = self.row_id
        window = max(4096, 4 * n)
        parts: list[np.ndarray] = []
        got = 0
        lo = self._free_from
        while got < n and lo < rid.size:
            hi = min(rid.size, lo + window)
            free = np.flatnonzero(rid[lo:hi] < 0)
            if not parts:  # rows up to the first free one are live
                self._free_from = lo + int(free[0]) if free.size else hi
            if free.size:
                parts.append(free[:n - got] + lo)
                got += parts[-1].size
            lo = hi
        if got < n:
            return None
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _freed(self, rows: np.ndarray) -> None:
        """``rows`` were given back (their ids replaced or deleted)."""
        if rows.size:
            self.row_id[rows] = -1
            self._free_from = min(self._free_from, int(rows.min()))

    def grow(self, capacity: int) -> None:
        if capacity > self.row_id.size:
            more = capacity - self.row_id.size
            self.row_id = np.concatenate([self.row_id, np.full(more, -1, np.int64)])
            self.row_crc = np.concatenate([self.row_crc, np.zeros(more, np.uint32)])

    # ---- updates: journal first (after the data is in place), then memory ---------------------
    def put(self, ids: np.ndarray, rows: np.ndarray, crcs: np.ndarray) -> None:
        self._append(OP_PUT, ids.tobytes() + rows.astype(np.int64).tobytes() + crcs.astype("<u4").tobytes(), ids.size)
        self._apply_put(ids, rows, crcs)
        self._maybe_compact()

    def delete(self, ids: np.ndarray) -> None:
        self._append(OP_DELETE, ids.tobytes(), ids.size)
        self._apply_delete(ids)
        self._maybe_compact()

    def quarantine(self, ids: np.ndarray) -> None:
        self._append(OP_QUARANTINE, ids.tobytes(), ids.size)
        self._apply_delete(ids)
        self.quarantined = np.union1d(self.quarantined, ids)
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        # Bounded journal: replay on open stays proportional to the live set, not to history.
        if self._journal_bytes > max(COMPACT_MIN_BYTES, 24 * self.ids.size):
            try:
                self.compact()
            except OSError:
                # The call's journal entry is durable already, so the call has succeeded; a
                # compaction that meets a full disk only leaves the journal longer (retried on
                # the next call). compact() leaves the old snapshot and journal in charge.
                pass

    def _apply_put(self, ids: np.ndarray, rows: np.ndarray, crcs: np.ndarray) -> None:
        found, old_rows, _ = self.lookup(ids)
        if ids.size and found.all():
            # Every id replaced (a ring buffer going round): the columns keep their ids, and
            # only those ids' rows change, in place.
            self._freed(old_rows)
            self.rows[np.searchsorted(self.ids, ids)] = rows
        elif found.any():  # replaced ids give their old rows back and leave the columns first
            self._freed(old_rows[found])
            keep = ~np.isin(self.ids, ids[found])
            self._set_columns(self.ids[keep], self.rows[keep])
            self._insert(ids, rows)
        elif ids.size and (not self._n or int(ids.min()) > int(self._ids_buf[self._n - 1])):
            order = np.argsort(ids, kind="stable")  # new ids above every live one: appended
            self._append_columns(ids[order], rows[order])
        else:
            self._insert(ids, rows)
        if rows.size and rows.max() >= self.row_id.size:
            self.grow(int(rows.max()) + 1)
        self.row_id[rows] = ids
        self.row_crc[rows] = crcs
        if not ids.size:
            return
        if self._dense is not None and int(ids.max()) < self._dense.size:
            self._dense[ids] = rows
        else:  # past the map's end, or sparse so far: regrow it, or stay (go) sparse
            self._index_dense()

    def _insert(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Merge new ids into the sorted columns: one insertion each, so a put holds one extra
        copy of one column at a time (the bookkeeping peak the device profiles budget)."""
        order = np.argsort(ids, kind="stable")
        at = np.searchsorted(self.ids, ids[order])
        n = self._n
        self._ids_buf = np.insert(self._ids_buf[:n], at, ids[order])  # the old column goes before the next
        self._rows_buf = np.insert(self._rows_buf[:n], at, rows[order])
        self._n = n + ids.size

    def _apply_delete(self, ids: np.ndarray) -> None:
        found, rows, _ = self.lookup(ids)
        self._freed(rows[found])
        keep = ~np.isin(self.ids, ids)
        self._set_columns(self.ids[keep], self.rows[keep])
        if self._dense is not None:
            self._dense[ids[found]] = -1

    # ---- persistence ----------------------------------------------------------------------------
    def _journal_path(self, gen: int) -> Path:
        return self.dir / f"journal-{gen:020d}.log"

    def _snapshot_path(self, gen: int) -> Path:
        return self.dir / f"snapshot-{gen:020d}.bin"

    def _append(self, op: int, payload: bytes, n: int) -> None:
        head = struct.pack("<2sBxI", _ENTRY_MAGIC, op, n)
        crc = google_crc32c.extend(google_crc32c.value(head), payload)
        entry = _ENTRY_HEAD.pack(_ENTRY_MAGIC, op, n, crc) + payload
        written = os.write(self._journal_fd, entry)
        if written != len(entry):  # a short write (disk full): cut it off so replay stays clean
            os.ftruncate(self._journal_fd, self._journal_bytes)
            raise OSError(28, "short write to the manifest journal (disk full?)")
        self._journal_bytes += len(entry)
        if self.sync:
            os.fsync(self._journal_fd)
        else:
            self._dirty = True

    def flush(self) -> None:
        if self._journal_fd >= 0 and self._dirty:
            os.fsync(self._journal_fd)
            self._dirty = False

    def compact(self) -> None:
        """Write the whole state as snapshot ``generation + 1`` and start its empty journal."""
        gen = self.generation + 1
        body = (_SNAP_HEAD.pack(_SNAP_MAGIC, gen, self.ids.size, self.capacity, self.quarantined.size)
                + self.ids.tobytes() + self.rows.tobytes() + self.row_crc[self.rows].astype("<u4").tobytes()
                + self.quarantined.tobytes())
        body += struct.pack("<I", google_crc32c.value(body))
        snap, journal = self._snapshot_path(gen), self._journal_path(gen)
        try:
            _write_atomic(snap, body)
            new_fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                _fsync_dir(self.dir)
            except BaseException:
                os.close(new_fd)
                raise
        except BaseException:
            # Leave nothing of generation ``gen`` behind: the next open would prefer its snapshot
            # and never replay the entries this store goes on appending to the current journal.
            for path in (snap, snap.with_suffix(".tmp"), journal):
                path.unlink(missing_ok=True)
            raise
        old = self.generation
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
        self._journal_fd, self._journal_bytes, self._dirty, self.generation = new_fd, 0, False, gen
        for stale in (self._journal_path(old), self._snapshot_path(old)):
            stale.unlink(missing_ok=True)

    def _load(self, capacity: int) -> None:
        snaps = sorted(self.dir.glob("snapshot-*.bin")) if self.dir.exists() else []
        loaded = False
        for snap in reversed(snaps):  # the newest snapshot that checks out
            state = _read_snapshot(snap)
            if state is not None:
                self.generation, ids, rows, crcs, self.quarantined, cap = state
                self._set_columns(ids, rows)
                self.grow(max(cap, capacity))
                self.row_id[self.rows] = self.ids
                self.row_crc[self.rows] = crcs
                loaded = True
                break
        if snaps and not loaded:
            raise CorruptStoreError(f"{self.dir}: no manifest snapshot passes its checksum")
        jpath = self._journal_path(self.generation)
        valid_end = self._replay(jpath) if jpath.exists() else 0
        self._index_dense()
        if not self.writable:
            return
        if not loaded:
            self.compact()  # a new store: snapshot 1 and its journal
            return
        # Cut a torn tail, then keep appending to this generation's journal.
        self._journal_fd = os.open(jpath, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._journal_fd, valid_end)
        self._journal_bytes = valid_end
        for other in list(self.dir.glob("journal-*.log")) + list(self.dir.glob("snapshot-*.bin")) \
                + list(self.dir.glob("*.tmp")):
            if other not in (jpath, self._snapshot_path(self.generation)):
                other.unlink(missing_ok=True)  # left by a crash during compaction

    def _replay(self, path: Path) -> int:
        """Apply every intact journal entry; return the byte offset where they end."""
        data = path.read_bytes()
        off = 0
        while off + _ENTRY_HEAD.size <= len(data):
            magic, op, n, crc = _ENTRY_HEAD.unpack_from(data, off)
            width = {OP_PUT: 20, OP_DELETE: 8, OP_QUARANTINE: 8}.get(op)
            end = off + _ENTRY_HEAD.size + (width or 0) * n
            if magic != _ENTRY_MAGIC or width is None or end > len(data):
                # A torn tail is a prefix of the last entry. A damaged header followed by an intact
                # entry is damage in the middle: stopping here would silently drop (and, on a
                # writable open, truncate away) acknowledged batches.
                if _intact_entry_after(data, off):
                    raise CorruptStoreError(f"{path}: journal entry at byte {off} has a damaged header "
                                            "and intact entries follow it: the manifest is damaged")
                break
            payload = data[off + _ENTRY_HEAD.size:end]
            if google_crc32c.extend(google_crc32c.value(data[off:off + 8]), payload) != crc:
                if end < len(data):
                    raise CorruptStoreError(f"{path}: journal entry at byte {off} fails its checksum "
                                            "and is not the last one: the manifest is damaged")
                break
            ids = np.frombuffer(payload, np.int64, n, 0).copy()
            if op == OP_PUT:
                rows = np.frombuffer(payload, np.int64, n, 8 * n).copy()
                crcs = np.frombuffer(payload, "<u4", n, 16 * n).astype(np.uint32)
                self._apply_put(ids, rows, crcs)
            elif op == OP_DELETE:
                self._apply_delete(ids)
            else:
                self._apply_delete(ids)
                self.quarantined = np.union1d(self.quarantined, ids)
            off = end
        return off

    def close(self) -> None:
        if self._journal_fd >= 0:
            try:
                os.fsync(self._journal_fd)
            finally:
                os.close(self._journal_fd)
                self._journal_fd = -1


def _intact_entry_after(data: bytes, start: int) -> bool:
    """Whether a journal entry that passes its checksum begins anywhere after byte ``start``."""
    pos = data.find(_ENTRY_MAGIC, start + 1)
    while 0 <= pos <= len(data) - _ENTRY_HEAD.size:
        _magic, op, n, crc = _ENTRY_HEAD.unpack_from(data, pos)
        width = {OP_PUT: 20, OP_DELETE: 8, OP_QUARANTINE: 8}.get(op)
        end = pos + _ENTRY_HEAD.size + (width or 0) * n
        if width is not None and end <= len(data) and google_crc32c.extend(
                google_crc32c.value(data[pos:pos + 8]), data[pos + _ENTRY_HEAD.size:end]) == crc:
            return True
        pos = data.find(_ENTRY_MAGIC, pos + 1)
    return False


def _read_snapshot(path: Path):
    data = path.read_bytes()
    if len(data) < _SNAP_HEAD.size + 4:
        return None
    if google_crc32c.value(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        return None
    magic, gen, n, cap, nq = _SNAP_HEAD.unpack_from(data, 0)
    if magic != _SNAP_MAGIC or len(data) != _SNAP_HEAD.size + 20 * n + 8 * nq + 4:
        return None
    off = _SNAP_HEAD.size
    ids = np.frombuffer(data, np.int64, n, off).copy()
    rows = np.frombuffer(data, np.int64, n, off + 8 * n).copy()
    crcs = np.frombuffer(data, "<u4", n, off + 16 * n).astype(np.uint32)
    quarantined = np.frombuffer(data, np.int64, nq, off + 20 * n).copy()
    return gen, ids, rows, crcs, quarantined, cap


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
