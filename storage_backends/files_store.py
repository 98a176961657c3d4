"""The files tier: one file per record in a sharded folder tree, many reads in flight at once.

URL: ``files:///path/to/dir?inflight=32&sync=1&codec=none&level=3&chunk=256&mode=rw``

- ``inflight``: how many file reads one ``get_many`` keeps in flight (1..1024); ``1`` reads one
  file at a time (the comparison case of ``benchmarks.storage``).
- ``sync``: ``1`` fsyncs each file, its directory and the manifest journal before ``put_many``
  returns (power-loss safe); ``0`` leaves that to ``flush()`` (SIGKILL-safe only).
- ``codec``: ``none`` or ``zstd`` (``level``): each file holds its record compressed on its own
  (files have no fixed size, so compression costs nothing in layout). Fixed when the store is made.
- ``chunk``: files per leaf directory, the unit of :meth:`get_chunk` (fixed when the store is made).
- ``mode=ro``: read-only, sharing the lock with other readers (a writer is refused meanwhile).
- ``layout=imagefolder`` is dispatched by :func:`storage_backends.open_store` to
  :class:`storage_backends.image_folder.ImageFolderStore` (``class_name/*.png`` folders, read-only);
  this store accepts only ``layout=records``.

Why a store of files: a folder of files is what a network or parallel file system (NFS, Lustre,
an object-store mount) serves well when many requests are outstanding and badly one at a time, and
what any tool can list, copy or back up. Its reads are latency-bound, so they are issued
concurrently: ``get_many`` reads its files with :mod:`aiofiles` on an asyncio loop, at most
``inflight`` at a time: ``inflight`` workers on the loop, each handing a few files at a time to a
thread of the store's own pool (``inflight`` threads) that reads them one after another (open,
read, close: one aiofiles-wrapped call per hop), so each worker has one file read in flight. The
loop is the swap engine's when the engine has offered it (:meth:`bind_loop`; the calling I/O thread
waits on ``asyncio.run_coroutine_threadsafe``), else one the store starts on a thread of its own
(the writer thread, recovery, tests, the CLI). :meth:`aget_many` runs on the caller's loop.
:attr:`FilesStore.inflight_high_water` records the most reads ever in flight at once.

Layout::

    files.json                       format, schema, chunk, codec (written last when created)
    writer.lock                      one writer (locking.py)
    manifest/                        the row manifest: snapshot + checksummed journal (row_manifest.py)
    data/0000/00/<row>-<id>.rec      the record of ``id``, in row ``row``: payload + its CRC-32C
    quarantine/<row>-<id>.rec        files that failed their checksum, kept for a look

A *row* here is a file slot: the manifest (shared with the Zarr and flat stores) maps each id to
its row and the CRC-32C of its file's payload, and rows ``[k * chunk, (k + 1) * chunk)`` live in
one leaf directory ``data/{k >> 8:04x}/{k & 255:02x}/`` (a chunk is a leaf directory: 256 of
them per top directory, so no directory grows past ``max(256, chunk)`` entries).

Crash rules, as the other row stores: a file is written to a temp name, (with ``sync``) fsynced,
renamed into place and its directory fsynced, all before the journal entry that names it; a live
file is never overwritten (replacing an id writes a new row, whose file name differs, then unlinks
the old file). So a crash never leaves an id pointing at a missing or torn file; what it can leave
is garbage -- temp files, and files no live entry names -- swept when the store is next opened for
writing after a session that did not close cleanly (``session.dirty`` marks an open session, so a
clean reopen of a large store does not list every directory). A file that fails its checksum, is
missing or has the wrong length is a damaged record: :class:`CorruptRecordError`, quarantined when
writable (the file moved to ``quarantine/``). Other read errors (EIO, EACCES) raise their typed
error and change nothing.

Files that a read has looked up are never unlinked under it: readers hold a shared lock while
their files are read, and unlinking (of replaced, deleted and quarantined files) takes it
exclusively, so a write never blocks on a read except for that short step.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiofiles.os
import google_crc32c
import numpy as np
from numcodecs import Zstd

from .errors import (
    CorruptRecordError,
    CorruptStoreError,
    InvalidURLError,
    SchemaError,
    StoreError,
    StoreNotFoundError,
    format_ids,
    from_os_error,
)
from .locking import lock_store_dir
from .loop_runner import LoopRunner
from .records import CRC_BYTES, pack_records, unpack_records
from .row_manifest import Manifest, _fsync_dir, _write_atomic
from .row_store import RowStore
from .rwlock import RWLock
from .schema import Schema, validate_ids
from .url import StoreURL, parse_bool, parse_int

FORMAT = "carousel-files/1"
_META = "files.json"
_DATA = "data"
_QUARANTINE = "quarantine"
_MANIFEST_DIR = "manifest"
_DIRTY = "session.dirty"
_MIN_ROWS = 1024  # the manifest's first allocation of file slots
MAX_INFLIGHT = 1024
_WAIT_S = 0.5  # how often a caller waiting on a bound loop checks that the loop still runs


class FilesStore(RowStore):
    """:class:`SampleStore` keeping one file per record. Open it with :func:`storage_backends.open_store`.

    >>> import tempfile, numpy as np
    >>> from storage_backends import open_store
    >>> root = tempfile.mkdtemp()
    >>> with open_store(f"files://{root}/t?inflight=8&sync=0", {"y": ((), "int64")}) as store:
    ...     store.put_many(np.arange(20), {"y": np.arange(20) * 10})
    ...     store.get_many([19, 3])["y"].tolist(), store.inflight_high_water
    ([190, 30], 2)
    """

    scheme = "files"
    _damage = "failed their checksum, are missing or have the wrong length"
    prefers_chunks = False  # a chunk read costs one file read per record: readers draw ids

    def __init__(self, url: StoreURL, schema: Schema | None) -> None:
        opts = url.take({"chunk": "256", "sync": "1", "mode": "rw", "inflight": "32", "codec": "",
                         "level": "3", "layout": "records"})
        if opts["layout"] != "records":
            raise InvalidURLError(f"{url.text}: layout must be records or imagefolder, got {opts['layout']!r}")
        if opts["mode"] not in ("rw", "ro"):
            raise InvalidURLError(f"{url.text}: mode must be rw or ro, got {opts['mode']!r}")
        if opts["codec"] not in ("", "none", "zstd"):
            raise InvalidURLError(f"{url.text}: codec must be zstd or none, got {opts['codec']!r}")
        readonly = opts["mode"] == "ro"
        self._sync = parse_bool(opts["sync"], "sync")
        #: Most file reads one ``get_many`` keeps in flight.
        self.inflight = parse_int(opts["inflight"], "inflight", 1, MAX_INFLIGHT)
        chunk = parse_int(opts["chunk"], "chunk", 1, 1 << 16)  # validated before anything is created
        level = parse_int(opts["level"], "level", -7, 22)
        path = url.path.expanduser().absolute()
        meta_path = path / _META
        exists = meta_path.exists()
        if not exists and (schema is None or readonly):
            raise StoreNotFoundError(f"{url.text}: no files store at {path} (give a schema to create one)")
        self._lock = lock_store_dir(path, create=not exists, readonly=readonly, what=url.text)
        try:
            if exists:
                stored, self._chunk, codec = _read_meta(meta_path, url.text)
                if schema is not None and Schema(schema) != stored:
                    raise SchemaError(f"{url.text}: store has schema {stored!r}, asked for {Schema(schema)!r}")
                if opts["codec"] and opts["codec"] != codec:
                    raise InvalidURLError(f"{url.text}: the store was created with codec={codec}; "
                                          f"it cannot be reopened with codec={opts['codec']}")
            else:
                stored, self._chunk, codec = Schema(schema), chunk, opts["codec"] or "none"
            self._manifest = Manifest(path / _MANIFEST_DIR, 0, writable=not readonly, sync=self._sync)
            if not exists and self._manifest.ids.size:
                # files.json is written last when a store is made: a manifest naming records
                # without it is damage, not a creation cut short.
                raise CorruptStoreError(f"{url.text}: {meta_path} is missing but the manifest names "
                                        f"{self._manifest.ids.size} record(s)")
            self._root, self._data = path, path / _DATA
            if not readonly:
                dirty = path / _DIRTY
                if dirty.exists() or not exists:
                    self._sweep()  # a session that did not close cleanly (or a creation cut short)
                fd = os.open(dirty, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                os.close(fd)
                if not exists:
                    self._data.mkdir(mode=0o700, exist_ok=True)
                    _write_meta(meta_path, stored, self._chunk, codec)  # the store exists from here on
        except BaseException as exc:
            if hasattr(self, "_manifest"):
                self._manifest.close()
            self._lock.release()
            if isinstance(exc, OSError):
                raise from_os_error(exc, f"{url.text}: cannot open") from exc
            raise
        super().__init__(path, stored, url.text, readonly)
        self.codec = codec
        self._zstd = Zstd(level=level) if codec == "zstd" else None
        self._rec = stored.record_nbytes
        # The longest payload a file may hold: a record, or zstd's bound for one.
        self._max_payload = self._rec if self._zstd is None else self._rec + self._rec // 128 + 1024
        self._mutex = threading.RLock()  # one writer at a time; reads look up a consistent manifest
        self._files_lock = RWLock()  # readers of files (shared) vs their unlinking (exclusive)
        self._unsynced_rows: list[tuple[np.ndarray, np.ndarray]] = []  # written, not yet fsynced (sync=0)
        self._unsynced_dirs: set[str] = set()
        self._garbage_left = False  # an unlink failed: sweep at the next open
        self._row_bytes: np.ndarray | None = None  # disk bytes of each row's file (nbytes), once measured
        self._block = max(512, os.statvfs(path).f_frsize)
        # The reads' loop (the swap engine's once bound, else our own) and their threads, inflight
        # of them; sync=1 writes use the same pool.
        self._runner = LoopRunner("carousel-files", self.inflight, _WAIT_S)
        self._count_lock = threading.Lock()
        self._in_flight = 0
        #: The most file reads that were ever in flight at once (reads issued, not yet returned).
        self.inflight_high_water = 0

    # ---- size on disk ------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes the store occupies on disk. The record files are measured once (a ``stat`` each,
        at the first call) and then kept up to date by the writes (file lengths rounded up to the
        file system's block), so a metrics scrape does not list a million files."""
        self._check_open()
        with self._mutex:
            if self._row_bytes is None:
                sizes = np.zeros(self._manifest.capacity, np.int64)
                for r, i in zip(self._manifest.rows.tolist(), self._manifest.ids.tolist()):
                    try:
                        sizes[r] = os.stat(self._file(r, i)).st_blocks * 512
                    except FileNotFoundError:
                        pass  # a damaged record, found when read
                self._row_bytes = sizes
            files = int(self._row_bytes.sum())
        other = 0
        for root, dirs, names in os.walk(self._root):
            if root == str(self._root) and _DATA in dirs:
                dirs.remove(_DATA)
            for name in names:
                try:
                    other += os.lstat(os.path.join(root, name)).st_blocks * 512
                except FileNotFoundError:  # a manifest file replaced while we walk
                    continue
        return files + other

    def _set_row_bytes(self, rows: np.ndarray, nbytes: np.ndarray | int) -> None:
        """Record the disk bytes of ``rows``' files (caller holds ``_mutex``), once nbytes measured."""
        if self._row_bytes is None or not rows.size:
            return
        if int(rows.max()) >= self._row_bytes.size:
            more = max(self._manifest.capacity, int(rows.max()) + 1) - self._row_bytes.size
            self._row_bytes = np.concatenate([self._row_bytes, np.zeros(more, np.int64)])
        self._row_bytes[rows] = nbytes

    # ---- where files live ------------------------------------------------------------------------
    def _leaf(self, row: int) -> str:
        k = row // self._chunk
        return f"{self._data}/{k >> 8:04x}/{k & 255:02x}"

    def _file(self, row: int, id_: int) -> str:
        return f"{self._leaf(row)}/{row}-{id_}.rec"

    def _sweep(self) -> None:
        """Remove temp files and files no live manifest entry names (left by a crash)."""
        data = self._data
        if not data.is_dir():
            return
        live = self._manifest.row_id
        for top in os.scandir(data):
            if not top.is_dir(follow_symlinks=False):
                continue
            for leaf in os.scandir(top.path):
                if not leaf.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(leaf.path):
                    name = entry.name
                    if name.endswith(".rec"):
                        row, _, id_ = name[:-4].partition("-")
                        if row.isdigit() and id_.isdigit() and int(row) < live.size and live[int(row)] == int(id_):
                            continue
                    elif not name.endswith(".tmp"):
                        continue  # not ours: leave it
                    os.unlink(entry.path)

    # ---- the loop the reads run on -----------------------------------------------------------------
    def bind_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        # docstring inherited
        self._runner.bind(loop)

    def _io_pool(self) -> ThreadPoolExecutor:
        """The threads the reads (and ``sync=1`` writes) run on: ``inflight`` of them, so the loop's
        default executor (sized for the machine's cores) never caps the reads in flight."""
        return self._runner.pool()

    # ---- reads ----------------------------------------------------------------------------------------
    async def _read_group(self, paths: list[str], pool: ThreadPoolExecutor) -> list[bytes | OSError]:
        """Read ``paths`` one after another on one pool thread: one file in flight at a time."""
        with self._count_lock:
            self._in_flight += 1
            self.inflight_high_water = max(self.inflight_high_water, self._in_flight)
        try:
            return await _aread_files(paths, self._max_payload + CRC_BYTES + 1, executor=pool)
        finally:
            with self._count_lock:
                self._in_flight -= 1

    async def _read_paths(self, paths: list[str]) -> list[bytes | OSError]:
        """Every file of ``paths``, at most ``inflight`` in flight: that many workers, each reading
        one file at a time on a pool thread, take the next files as each of their reads returns.

        A worker takes ``ceil(left / (2 * inflight))`` files per hop to its thread (guided
        self-scheduling): a hop costs ~50 us of loop and thread handoffs, more than a cached file's
        read, so warm batches pay for few hops, while the groups shrink to one file towards the
        end and slow (cold) reads still spread over every worker."""
        n = len(paths)
        out: list[bytes | OSError] = [b""] * n
        pool = self._io_pool()
        workers = min(self.inflight, n)
        taken = 0

        async def worker() -> None:
            nonlocal taken
            while taken < n:
                lo = taken
                taken = hi = min(n, lo + -(-(n - lo) // (2 * workers)))
                out[lo:hi] = await self._read_group(paths[lo:hi], pool)

        await asyncio.gather(*(worker() for _ in range(workers)))
        return out

    def _plan(self, ids: np.ndarray, stack: ExitStack
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """Look ``ids`` up and take the shared files lock into ``stack``: ``(ids, rows, crcs,
        inverse, paths)`` with one entry per distinct row (a repeated id is read once) and the
        request as ``inverse`` into them."""
        with self._mutex:
            found, rows, crcs = self._manifest.lookup(ids)
            if not found.all():
                raise self._missing(ids, found)
            # Under the mutex: no writer can unlink these files between the lookup and the lock.
            stack.enter_context(self._files_lock.shared())
        urows, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        uids = ids[first]
        paths = [self._file(r, i) for r, i in zip(urows.tolist(), uids.tolist())]
        return uids, urows, crcs[first], inverse, paths

    def _get(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        with ExitStack() as stack:
            uids, urows, crcs, inverse, paths = self._plan(ids, stack)
            got = self._runner.run(lambda: self._read_paths(paths))
        return self._finish(uids, urows, crcs, got, inverse)

    async def aget_many(self, ids: Any) -> dict[str, np.ndarray]:
        """:meth:`get_many` for a caller on an event loop: the reads run on the caller's loop.

        Same arguments, result and errors as :meth:`get_many`. The manifest lookup takes the
        store's lock for a few microseconds; quarantining a damaged record writes the journal.

        >>> import asyncio, tempfile, numpy as np
        >>> from storage_backends import open_store
        >>> store = open_store(f"files://{tempfile.mkdtemp()}/t?sync=0", {"y": ((), "int64")})
        >>> store.put_many([4, 5], {"y": [40, 50]})
        >>> asyncio.run(store.aget_many([5, 4, 5]))["y"].tolist()
        [50, 40, 50]
        >>> store.close()
        """
        self._check_open()
        ids = validate_ids(ids)
        if not ids.size:
            return {k: np.zeros((0, *v.shape), v.dtype) for k, v in self.schema.items()}
        with ExitStack() as stack:
            uids, urows, crcs, inverse, paths = self._plan(ids, stack)
            got = await self._read_paths(paths)
        return self._finish(uids, urows, crcs, got, inverse)

    def _finish(self, uids: np.ndarray, urows: np.ndarray, crcs: np.ndarray, got: list[bytes | OSError],
                inverse: np.ndarray | None) -> dict[str, np.ndarray]:
        """Check and decode the files read for ``uids`` (one per row) and spread them over the
        request (``inverse``); damaged records are quarantined and raise."""
        n = len(got)
        buf = np.empty((n, self._rec), dtype=np.uint8)
        bad = np.zeros(n, dtype=bool)
        for i, data in enumerate(got):
            if isinstance(data, OSError):
                if data.errno != errno.ENOENT:  # an I/O or permission error: nothing known about the record
                    raise from_os_error(data, f"{self.url}: reading id {int(uids[i])} failed") from data
                bad[i] = True
                continue
            record = self._decode(data, int(crcs[i]))
            if record is None:
                bad[i] = True
            else:
                buf[i] = np.frombuffer(record, dtype=np.uint8)
        if bad.any():
            self._fail_rows(uids[bad], urows[bad])
        out = unpack_records(self.schema, buf)
        if inverse is None or (inverse.size == n and (inverse == np.arange(n)).all()):
            return out
        return {k: v[inverse] for k, v in out.items()}

    def _decode(self, data: bytes, crc: int) -> bytes | None:
        """The record a file holds, or ``None`` if the file is damaged (or another record's)."""
        if len(data) < CRC_BYTES or len(data) > self._max_payload + CRC_BYTES:
            return None
        payload = data[:-CRC_BYTES]
        value = google_crc32c.value(payload)
        if value != crc or int.from_bytes(data[-CRC_BYTES:], "little") != value:
            return None
        if self._zstd is not None:
            try:
                payload = self._zstd.decode(payload)
            except Exception:  # noqa: BLE001 - numcodecs raises RuntimeError/ValueError for a bad frame
                return None
        return payload if len(payload) == self._rec else None

    def _read_checked(self, ids: np.ndarray, rows: np.ndarray, crcs: np.ndarray) -> dict[str, np.ndarray]:
        # A chunk (RowStore.get_chunk, which holds the mutex: no file is unlinked meanwhile).
        paths = [self._file(int(r), int(i)) for r, i in zip(rows.tolist(), ids.tolist())]
        got = self._runner.run(lambda: self._read_paths(paths))
        return self._finish(ids, rows, crcs, got, None)

    def _fail_rows(self, bad_ids: np.ndarray, bad_rows: np.ndarray) -> None:
        """Quarantine the damaged records that still hold their rows (a record replaced since the
        read is not this one) and raise :class:`CorruptRecordError` naming them all."""
        order = np.argsort(bad_ids)
        bad_ids, bad_rows = bad_ids[order], bad_rows[order]
        where = "quarantined" if not self.readonly else "left in place (read-only)"
        if not self.readonly:
            with self._mutex:
                found, rows, _ = self._manifest.lookup(bad_ids)
                same = found & (rows == bad_rows)
                try:
                    if same.any():
                        self._manifest.quarantine(bad_ids[same])
                except OSError as exc:
                    where = f"not quarantined ({exc})"
                else:
                    self._move_to_quarantine(bad_rows[same], bad_ids[same])
        raise CorruptRecordError(f"{self.url}: {bad_ids.size} record(s) {self._damage}: "
                                 f"{format_ids(bad_ids)}; {where}", bad_ids)

    def _move_to_quarantine(self, rows: np.ndarray, ids: np.ndarray) -> None:
        qdir = self._root / _QUARANTINE
        self._set_row_bytes(rows, 0)  # counted again among the other files, under quarantine/
        with self._files_lock.exclusive():
            for r, i in zip(rows.tolist(), ids.tolist()):
                try:
                    qdir.mkdir(mode=0o700, exist_ok=True)
                    os.replace(self._file(r, i), qdir / f"{r}-{i}.rec")
                except FileNotFoundError:
                    pass  # a missing file: nothing to keep
                except OSError:
                    self._garbage_left = True  # left where it is: swept at the next open

    # ---- writes ----------------------------------------------------------------------------------
    def _payloads(self, ids: np.ndarray, fields: dict[str, np.ndarray]) -> tuple[list[bytes], np.ndarray]:
        """Each record's file content (payload + its CRC-32C) and the payloads' CRC-32Cs."""
        n = ids.size
        packed = pack_records(self.schema, fields, n)
        crc = google_crc32c.value
        contents, crcs = [], np.empty(n, dtype=np.uint32)
        for i in range(n):
            payload = packed[i].tobytes()
            if self._zstd is not None:
                payload = bytes(self._zstd.encode(payload))
            crcs[i] = crc(payload)
            contents.append(payload + int(crcs[i]).to_bytes(CRC_BYTES, "little"))
        return contents, crcs

    def _put(self, ids: np.ndarray, fields: dict[str, np.ndarray]) -> None:
        contents, crcs = self._payloads(ids, fields)
        n = ids.size
        with self._mutex:
            found, old_rows, _ = self._manifest.lookup(ids)
            rows = self._manifest.allocate(n)
            if rows is None:
                old = self._manifest.capacity
                self._manifest.grow(max(old * 2, old + n, _MIN_ROWS))
                rows = self._manifest.allocate(n)
            paths = [self._file(r, i) for r, i in zip(rows.tolist(), ids.tolist())]
            try:
                new_dirs = self._make_dirs(paths)
                self._write_files(paths, contents)
                if self._sync:
                    self._sync_dirs({os.path.dirname(p) for p in paths} | new_dirs)
                else:
                    self._unsynced_rows.append((rows, ids.copy()))
                    self._unsynced_dirs.update(os.path.dirname(p) for p in paths)
                    self._unsynced_dirs.update(new_dirs)
                self._manifest.put(ids, rows, crcs)  # the batch exists from here on
                block = self._block
                self._set_row_bytes(rows, np.array([-(-len(c) // block) * block for c in contents], np.int64))
            except OSError as exc:
                # Nothing names these files yet: take them (and their temp files) back, so a full
                # disk gets its space back and nothing of the batch is visible.
                for p in paths:
                    for q in (p, p[:-4] + ".tmp"):
                        try:
                            os.unlink(q)
                        except FileNotFoundError:
                            pass
                        except OSError:
                            self._garbage_left = True
                raise from_os_error(exc, f"{self.url}: write failed") from exc
            if found.any():  # the replaced records' files are garbage now
                self._unlink(old_rows[found], ids[found])

    def _make_dirs(self, paths: list[str]) -> set[str]:
        """Create the leaf directories ``paths`` need; return the directories whose entries changed
        by it (to fsync)."""
        changed: set[str] = set()
        for leaf in sorted({os.path.dirname(p) for p in paths}):
            if os.path.isdir(leaf):
                continue
            top = os.path.dirname(leaf)
            if not os.path.isdir(top):
                os.mkdir(top, 0o700)
                changed.add(os.path.dirname(top))
            os.mkdir(leaf, 0o700)
            changed.add(top)
        return changed

    def _write_files(self, paths: list[str], contents: list[bytes]) -> None:
        """Each file to its temp name, (fsync,) then renamed into place. With ``sync`` the files are
        written on the I/O pool: their fsyncs overlap (they release the GIL)."""
        sync = self._sync

        def write(k: int) -> None:
            tmp = paths[k][:-4] + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(contents[k])
                while view:
                    view = view[os.write(fd, view):]
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, paths[k])

        if sync and len(paths) > 1 and self.inflight > 1:
            errors = [f.exception() for f in [self._io_pool().submit(write, k) for k in range(len(paths))]]
            first = next((e for e in errors if e is not None), None)
            if first is not None:
                raise first
        else:
            for k in range(len(paths)):
                write(k)

    def _sync_dirs(self, dirs: set[str]) -> None:
        for d in sorted(dirs, key=len, reverse=True):  # leaves before their parents
            _fsync_dir(Path(d))

    def _unlink(self, rows: np.ndarray, ids: np.ndarray) -> None:
        """Remove files no entry names any more (after their journal entry): best effort, a file
        left over is swept at the next open."""
        self._set_row_bytes(rows, 0)
        with self._files_lock.exclusive():
            for r, i in zip(rows.tolist(), ids.tolist()):
                try:
                    os.unlink(self._file(r, i))
                except FileNotFoundError:
                    pass
                except OSError:
                    self._garbage_left = True

    def _delete(self, ids: np.ndarray) -> np.ndarray:
        with self._mutex:  # reentrant: the rows' files go under the same hold as their entries
            rows = super()._delete(ids)
            self._unlink(rows, ids)
            return rows

    # ---- durability and lifecycle: RowStore's flush and close ------------------------------------
    def _sync_rows(self) -> None:
        paths = [self._file(r, i) for rows, ids in self._unsynced_rows for r, i in zip(rows.tolist(), ids.tolist())]
        if len(paths) > 1 and self.inflight > 1:
            # fsyncs that overlap share the file system's journal commits: 5,000 files flushed one
            # at a time took 26 s here (191 files/s), several at once a fraction of that.
            for fut in [self._io_pool().submit(_fsync_file, p) for p in paths]:
                fut.result()
        else:
            for p in paths:
                _fsync_file(p)
        self._sync_dirs(self._unsynced_dirs)
        self._unsynced_rows, self._unsynced_dirs = [], set()

    def _release_rows(self) -> None:
        self._runner.close()
        if not self.readonly and not self._garbage_left:
            try:  # a clean close: the next open need not sweep
                os.unlink(self._root / _DIRTY)
            except OSError:
                pass


def _fsync_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # replaced or deleted since it was written: nothing of it to keep
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_files(paths: list[str], limit: int) -> list[bytes | OSError]:
    """:func:`_read_file` of each path, an ``OSError`` in place of a file that cannot be read."""
    out: list[bytes | OSError] = []
    for path in paths:
        try:
            out.append(_read_file(path, limit))
        except OSError as exc:
            out.append(exc)
    return out


def _read_file(path: str, limit: int) -> bytes:
    """A file's first ``limit`` bytes (one past the longest file there should be: a long one shows)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts, left = [], limit
        while left > 0:
            part = os.read(fd, left)
            if not part:
                break
            parts.append(part)
            left -= len(part)
        return b"".join(parts) if len(parts) != 1 else parts[0]
    finally:
        os.close(fd)


# One executor hop for a group of files: aiofiles.open costs three hops per file (open, read, close);
# 2,000 warm files of 3 KiB read at 5,500-7,700 files/s that way, 20,000-28,000 with one hop per
# file (32 in flight, here), and groups (_read_paths) took random get_many of 256 ids from 19,000-
# 29,000 to 34,000-35,000 samples/s warm and from 11,000 to 13,300 cold (benchmarks.storage --quick).
_aread_files = aiofiles.os.wrap(_read_files)


def _write_meta(path: Path, schema: Schema, chunk: int, codec: str) -> None:
    """``files.json``, written whole or not at all (temp file, fsync, rename, fsync the directory)."""
    _write_atomic(path, json.dumps({"format": FORMAT, "schema": json.loads(schema.to_json()),
                                    "chunk": chunk, "codec": codec}).encode())
    _fsync_dir(path.parent)


def _read_meta(path: Path, text: str) -> tuple[Schema, int, str]:
    try:
        meta = json.loads(path.read_bytes())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
        chunk, codec = meta["chunk"], meta["codec"]
        if not isinstance(chunk, int) or not 1 <= chunk <= 1 << 16:
            raise ValueError(f"chunk {chunk!r}")
        if codec not in ("none", "zstd"):
            raise ValueError(f"codec {codec!r}")
        return Schema.from_json(json.dumps(meta["schema"])), chunk, codec
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStoreError(f"{text}: {path} is damaged ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        raise StoreError(f"{text}: cannot read {path}: {exc}") from exc
