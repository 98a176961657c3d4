"""The flash tier: records in an LMDB environment, one key per id.

URL: ``lmdb:///path/to/dir?map_size=64MiB&max_size=0&sync=1&flush_s=1&codec=none&level=3&mode=rw``

- ``map_size``: initial map size. The map grows (doubling) when a write meets ``MDB_MAP_FULL``
  instead of failing, up to ``max_size`` bytes (``0``: no cap; then a full disk is the limit).
- ``sync``: ``1`` (default) fsyncs every commit: a returned ``put_many`` survives SIGKILL and power
  loss. ``0`` skips the fsync (``MDB_NOSYNC``): a returned ``put_many`` survives SIGKILL of the
  process (the data is in the page cache), but power loss may lose writes since the last
  ``flush()`` -- which a background thread also calls every ``flush_s`` seconds. ``writemap`` is
  never used. LMDB promises that an ``MDB_NOSYNC`` store is only rolled back, never corrupted, on
  power loss only where the file system keeps writes in order; elsewhere it may be corrupted.
- ``codec``: ``none`` or ``zstd`` (``level``): every value is compressed on its own, so a record
  whose tail is padding (a saliency memory's variable-length code in a fixed-size field) takes
  only the room of its content. Fixed when the store is created and kept in its ``meta``; a URL
  that names another codec for an existing store is refused.
- ``mode=ro`` opens read-only, without the writer lock; readers never block the writer (MVCC).

Layout: named databases ``meta`` (schema, format), ``data`` (8-byte big-endian id -> record bytes
followed by their CRC-32C, little-endian) and ``quarantine`` (records that failed their checksum).
Each ``put_many`` is one write transaction (``Cursor.putmulti``) and each ``get_many`` one read
transaction. With py-lmdb 3.0 a ``Transaction.get`` loop over the keys measured ~10% faster than
``Cursor.getmulti`` here (272 vs 303 us for 256 CIFAR-sized records), so reads use the loop.

Chunks (``get_chunk``, ``chunk_of``) are id ranges: chunk ``i`` holds the stored ids in
``[i * chunk_rows, (i + 1) * chunk_rows)``, found with one cursor seek -- no id index to keep.
"""

from __future__ import annotations

import errno
import os
import resource
import threading
from pathlib import Path

import google_crc32c
import lmdb
import numpy as np
from numcodecs import Zstd

from .base import Chunk, SampleStore
from .errors import (
    CorruptRecordError,
    CorruptStoreError,
    InvalidURLError,
    SchemaError,
    StoreError,
    StoreFullError,
    StoreNotFoundError,
    StorePermissionError,
    format_ids,
)
from .locking import WriterLock
from .records import RESIDUE, failed_values, pack_records, record_checksums, unpack_records
from .rwlock import RWLock
from .schema import Schema, validate_ids
from .url import StoreURL, parse_bool, parse_int, parse_size

FORMAT = b"carousel-lmdb/1"
_CRC = 4  # bytes of the checksum trailer of every value
_CHUNK_IDS = 256  # ids per chunk (an id range): one short read transaction's worth


def _keys(ids: np.ndarray) -> list[bytes]:
    # Big-endian keys sort like the ids, so a cursor walks the store in id order.
    raw = ids.astype(">i8").tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


def _ids_of(keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), dtype=">i8").astype(np.int64)


class LMDBStore(SampleStore):
    """:class:`SampleStore` on LMDB (the flash tier). Open it with :func:`storage_backends.open_store`."""

    scheme = "lmdb"

    def __init__(self, url: StoreURL, schema: Schema | None) -> None:
        opts = url.take({"map_size": "64MiB", "max_size": "0", "sync": "1", "flush_s": "1", "mode": "rw",
                         "codec": "", "level": "3"})
        # A bad value is an InvalidURLError (a ValueError), like an unknown key.
        if opts["mode"] not in ("rw", "ro"):
            raise InvalidURLError(f"{url.text}: mode must be rw or ro, got {opts['mode']!r}")
        readonly = opts["mode"] == "ro"
        if opts["codec"] not in ("", "zstd", "none"):
            raise InvalidURLError(f"{url.text}: codec must be zstd or none, got {opts['codec']!r}")
        level = parse_int(opts["level"], "level", -7, 22)
        self._map_size = parse_size(opts["map_size"], "map_size")
        self._max_size = parse_size(opts["max_size"], "max_size")
        self._sync = parse_bool(opts["sync"], "sync")
        try:
            flush_s = float(opts["flush_s"])
        except ValueError:
            raise InvalidURLError(f"{url.text}: flush_s must be a number of seconds") from None
        path = url.path.expanduser().absolute()
        exists = (path / "data.mdb").exists()
        if not exists and (schema is None or readonly):
            raise StoreNotFoundError(f"{url.text}: no LMDB store at {path} (give a schema to create one)")
        if path.exists() and not path.is_dir():
            raise StoreError(f"{url.text}: {path} is not a directory")
        if not exists:
            try:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise _wrap(exc, f"{url.text}: cannot create {path}") from exc
        self._lock = None if readonly else WriterLock(path)
        try:
            self._env = self._open_env(path, readonly, url.text)
            _check_file_size(self._env, path, url.text)
            self._data = self._env.open_db(b"data", create=not readonly)
            self._quarantine_db = self._env.open_db(b"quarantine", create=not readonly)
            meta = self._env.open_db(b"meta", create=not readonly)
            stored = self._read_meta(meta, url.text)
            if stored is None:
                if schema is None:
                    raise StoreNotFoundError(f"{url.text}: the store holds no schema (give one to create it)")
                with self._env.begin(write=True, db=meta) as txn:
                    txn.put(b"format", FORMAT)
                    txn.put(b"schema", schema.to_json().encode())
                    txn.put(b"codec", (opts["codec"] or "none").encode())
                stored = schema
            elif schema is not None and Schema(schema) != stored:
                raise SchemaError(f"{url.text}: store has schema {stored!r}, asked for {Schema(schema)!r}")
            with self._env.begin(db=meta) as txn:
                codec = (txn.get(b"codec") or b"none").decode()  # stores from before codecs: none
            if codec not in ("zstd", "none"):
                raise CorruptStoreError(f"{url.text}: unknown value codec {codec!r} in the store's meta")
            if opts["codec"] and opts["codec"] != codec:
                raise InvalidURLError(f"{url.text}: the store was created with codec={codec}; "
                                      f"it cannot be reopened with codec={opts['codec']}")
            if not readonly:
                self._env.reader_check()  # slots of killed readers would pin old pages forever
        except lmdb.Error as exc:
            self._abandon()
            raise _wrap(exc, f"{url.text}: cannot open") from exc
        except BaseException:
            self._abandon()
            raise
        super().__init__(path, stored, url.text, readonly)
        self._rw = RWLock()  # shared: any transaction; exclusive: set_mapsize
        self._write_mutex = threading.Lock()  # LMDB write transactions stay on one thread at a time
        self._rec = stored.record_nbytes
        self.codec = codec
        self._zstd = Zstd(level=level) if codec == "zstd" else None
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if not readonly and not self._sync and flush_s > 0:
            self._flusher = threading.Thread(target=self._flush_loop, args=(flush_s,),
                                             name=f"lmdb-flush:{path.name}", daemon=True)
            self._flusher.start()

    def _open_env(self, path: Path, readonly: bool, text: str) -> lmdb.Environment:
        kwargs = dict(subdir=True, max_dbs=4, mode=0o600, readahead=False, writemap=False,
                      meminit=False, max_readers=126)
        if readonly:
            try:
                return lmdb.open(str(path), readonly=True, lock=True, **kwargs)
            except lmdb.Error as exc:
                if _errno(exc) not in (errno.EACCES, errno.EROFS):
                    raise
                # A read-only file system cannot hold reader slots; reading without them is safe
                # only while nobody writes, which a read-only medium guarantees.
                return lmdb.open(str(path), readonly=True, lock=False, **kwargs)
        return lmdb.open(str(path), map_size=self._map_size, sync=self._sync, metasync=self._sync,
                         map_async=False, **kwargs)

    def _read_meta(self, meta, text: str) -> Schema | None:
        with self._env.begin(db=meta) as txn:
            fmt = txn.get(b"format")
            raw = txn.get(b"schema")
        if fmt is None and raw is None:
            return None
        if fmt != FORMAT or raw is None:
            raise CorruptStoreError(f"{text}: not a carousel LMDB store (format {fmt!r}, expected {FORMAT!r})")
        return Schema.from_json(raw)

    def _abandon(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
        if self._lock is not None:
            self._lock.release()

    # ---- writes -----------------------------------------------------------------------------
    def _put(self, ids: np.ndarray, fields: dict[str, np.ndarray]) -> None:
        n = ids.size
        values = np.empty((n, self._rec + _CRC), dtype=np.uint8)
        values[:, :self._rec] = pack_records(self.schema, fields, n)
        values[:, self._rec:] = record_checksums(values[:, :self._rec]).astype("<u4").view(np.uint8).reshape(n, _CRC)
        flat = values.tobytes()
        step = self._rec + _CRC
        items = [flat[i * step:(i + 1) * step] for i in range(n)]
        if self._zstd is not None:
            # The CRC is inside the compressed value: it checks the decompressed record, and a
            # damaged frame fails to decompress or fails the check.
            encode = self._zstd.encode
            items = [encode(v) for v in items]
        pairs = list(zip(_keys(ids), items))
        self._write(lambda txn: txn.cursor(db=self._data).putmulti(pairs, dupdata=False, overwrite=True),
                    needed=sum(map(len, items)) * 2)

    def _delete(self, ids: np.ndarray) -> None:
        keys = _keys(ids)

        def delete(txn: lmdb.Transaction) -> None:
            # One transaction: an unknown id aborts it (raising leaves the block), so nothing is
            # deleted -- no read transaction first to look for them (~0.8 ms per 170 ids here).
            db = self._data
            found = np.fromiter((txn.delete(key, db=db) for key in keys), dtype=bool, count=len(keys))
            if not found.all():
                raise self._missing(ids, found)

        self._write(delete, needed=0)

    def _write(self, body, needed: int) -> None:
        """Run ``body`` in one write transaction; grow the map and retry when it is full."""
        with self._write_mutex:
            while True:
                try:
                    with self._rw.shared(), self._env.begin(write=True) as txn:
                        body(txn)
                    return
                except lmdb.MapFullError:
                    # Slots of readers killed since open pin old pages, so their space never comes
                    # back (a sync=1 store has no flush loop to clear them): clear them, then grow.
                    if not self._env.reader_check():
                        self._grow(needed)
                except lmdb.Error as exc:
                    # LMDB turns a short pwrite at commit (the file system or RLIMIT_FSIZE filling
                    # up mid-write) into EIO; name it for what it is when space is what ran out.
                    if _errno(exc) == errno.EIO and _short_of_space(self.path, needed):
                        raise StoreFullError(f"{self.url}: write failed: no space left ({exc}); "
                                             "nothing was written") from exc
                    raise _wrap(exc, f"{self.url}: write failed") from exc
                except OSError as exc:
                    raise _wrap(exc, f"{self.url}: write failed") from exc

    def _grow(self, needed: int) -> None:
        current = self._env.info()["map_size"]
        new = max(current * 2, current + needed)
        if self._max_size and new > self._max_size:
            if current >= self._max_size:
                raise StoreFullError(
                    f"{self.url}: the store reached max_size={self._max_size} bytes; nothing was written "
                    "(raise max_size, delete records, or demote them to another tier)")
            new = self._max_size
        with self._rw.exclusive():  # set_mapsize needs every transaction of this process closed
            self._env.set_mapsize(new)

    # ---- reads ------------------------------------------------------------------------------
    def _get(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        keys = _keys(ids)
        step = self._rec + _CRC
        # Values as bytes (py-lmdb copies each out of the map): joining bytes is 4x cheaper than
        # joining memoryviews into the map here, and the checksum needs bytes anyway.
        with self._read(buffers=False) as txn:
            get = txn.get
            db = self._data
            values = [get(k, db=db) for k in keys]
        if self._zstd is not None:
            values = [None if v is None else self._decompress(v, step) for v in values]
        try:
            joined = b"".join(values)
        except TypeError:  # a None: unknown ids
            raise self._missing(ids, np.fromiter((v is not None for v in values), dtype=bool,
                                                 count=len(values))) from None
        # Every value is a record followed by its CRC-32C: one CRC pass checks the whole batch.
        if failed_values(joined, step, len(keys)) is not None:
            bad = np.array([len(v) != step or google_crc32c.value(v) != RESIDUE for v in values])
            bad_ids = np.unique(ids[bad])
            self._quarantine(bad_ids)
            raise CorruptRecordError(f"{self.url}: checksum mismatch or wrong length in {bad_ids.size} "
                                     f"record(s) {format_ids(bad_ids)} of {self.path / 'data.mdb'}; "
                                     f"{'quarantined' if not self.readonly else 'left in place (read-only)'}",
                                     bad_ids)
        return unpack_records(self.schema, np.frombuffer(joined, dtype=np.uint8).reshape(len(keys), step)[:, :self._rec])

    def _decompress(self, value: bytes, step: int) -> bytes:
        """A compressed value's record + CRC; a damaged frame gives ``b""`` (a wrong length,
        so the batch check below names it corrupt)."""
        try:
            out = self._zstd.decode(value)
        except Exception:  # noqa: BLE001 - numcodecs raises RuntimeError/ValueError for a bad frame
            return b""
        return bytes(out) if len(out) == step else b""

    def _read(self, buffers: bool = True):
        return _ReadTxn(self, buffers)

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        keys = _keys(ids)
        with self._read(buffers=False) as txn:  # keys only: values are never touched
            found = set(txn.cursor(db=self._data).getmulti(keys, values=False))
        return np.fromiter((k in found for k in keys), dtype=bool, count=ids.size)

    def _ids(self) -> np.ndarray:
        with self._read() as txn:
            keys = [bytes(k) for k in txn.cursor(db=self._data).iternext(keys=True, values=False)]
        return _ids_of(keys) if keys else np.zeros(0, dtype=np.int64)

    def _len(self) -> int:
        with self._read() as txn:
            return txn.stat(self._data)["entries"]

    @property
    def chunk_rows(self) -> int:
        return _CHUNK_IDS

    def num_chunks(self) -> int:
        self._check_open()
        with self._read() as txn:
            cur = txn.cursor(db=self._data)
            return int.from_bytes(cur.key(), "big") // self.chunk_rows + 1 if cur.last() else 0

    def chunk_of(self, ids) -> np.ndarray:
        self._check_open()
        ids = validate_ids(ids)
        found = self._contains(ids) if ids.size else np.zeros(0, bool)
        if not found.all():
            raise self._missing(ids, found)
        return ids // self.chunk_rows

    def get_chunk(self, index: int) -> Chunk:
        """The stored ids in ``[index * chunk_rows, (index + 1) * chunk_rows)`` (possibly none)."""
        self._check_open()
        n_chunks = self.num_chunks()
        if not 0 <= index < n_chunks:
            raise IndexError(f"{self.url}: chunk {index} out of range [0, {n_chunks})")
        lo = index * self.chunk_rows
        ids = self._ids_from(lo, lo + self.chunk_rows)
        return Chunk(ids, self.get_many(ids))

    def iter_chunks(self):
        """Every record in id order, a chunk (id range) per short read transaction; empty ranges
        are skipped with one seek."""
        self._check_open()
        start = 0
        while True:
            self._check_open()  # a walk resumed after close() gets the closed-store error
            with self._read() as txn:
                cur = txn.cursor(db=self._data)
                if not cur.set_range(start.to_bytes(8, "big")):
                    return
                first = int.from_bytes(cur.key(), "big")
            lo = first - first % self.chunk_rows
            ids = self._ids_from(lo, lo + self.chunk_rows)
            if ids.size:
                yield Chunk(ids, self.get_many(ids))
            start = lo + self.chunk_rows

    def _ids_from(self, lo: int, hi: int) -> np.ndarray:
        """Stored ids in ``[lo, hi)``, ascending."""
        keys: list[bytes] = []
        with self._read() as txn:
            cur = txn.cursor(db=self._data)
            if cur.set_range(lo.to_bytes(8, "big")):
                end = hi.to_bytes(8, "big")
                for key in cur.iternext(keys=True, values=False):
                    key = bytes(key)
                    if key >= end:
                        break
                    keys.append(key)
        return _ids_of(keys) if keys else np.zeros(0, dtype=np.int64)

    # ---- quarantine ---------------------------------------------------------------------------
    def _quarantine(self, ids: np.ndarray) -> None:
        if self.readonly:
            return
        keys = _keys(ids)

        def move(txn: lmdb.Transaction) -> None:
            for key in keys:
                value = txn.get(key, db=self._data)
                if value is not None:
                    txn.put(key, value, db=self._quarantine_db)
                    txn.delete(key, db=self._data)

        self._write(move, needed=len(keys) * (self._rec + _CRC) * 2)

    def _quarantined(self) -> np.ndarray:
        with self._read() as txn:
            keys = [bytes(k) for k in txn.cursor(db=self._quarantine_db).iternext(keys=True, values=False)]
        return _ids_of(keys) if keys else np.zeros(0, dtype=np.int64)

    # ---- durability and lifecycle -------------------------------------------------------------
    def _flush(self) -> None:
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            raise _wrap(exc, f"{self.url}: flush failed") from exc

    def _flush_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self._env.sync(True)
                self._env.reader_check()
            except lmdb.Error:
                pass  # the next flush() call raises it to a caller who can act

    def _close(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        try:
            if not self.readonly:
                self._env.sync(True)
        finally:
            with self._rw.exclusive():
                self._env.close()
            if self._lock is not None:
                self._lock.release()


class _ReadTxn:
    """A short read transaction under the shared side of the resize lock; retried once after
    another process grew the map (``MDB_MAP_RESIZED``)."""

    def __init__(self, store: LMDBStore, buffers: bool = True) -> None:
        self._store = store
        self._buffers = buffers

    def __enter__(self) -> lmdb.Transaction:
        self._guard = self._store._rw.shared()
        self._guard.__enter__()
        try:
            try:
                self._txn = self._store._env.begin(buffers=self._buffers)
            except lmdb.MapResizedError:
                self._store._env.set_mapsize(0)  # adopt the size the writer chose
                self._txn = self._store._env.begin(buffers=self._buffers)
        except lmdb.Error as exc:
            self._guard.__exit__(None, None, None)
            raise _wrap(exc, f"{self._store.url}: read failed") from exc
        return self._txn

    def __exit__(self, *exc: object) -> None:
        try:
            self._txn.abort()
        finally:
            self._guard.__exit__(None, None, None)


def _check_file_size(env: lmdb.Environment, path: Path, text: str) -> None:
    """Refuse a ``data.mdb`` shorter than its own meta page says it is.

    LMDB maps the file and trusts it: touching a page past the end of a truncated file raises
    SIGBUS and kills the process (found by tests/storage_backends/test_faults.py). The meta page
    names the last page in use; every page up to it was written (pwrite, no writemap) before the
    meta that names it, so a shorter file is damaged. ``info()``/``stat()`` read the meta only.
    """
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    have = os.path.getsize(path / "data.mdb")
    if have < need:
        raise CorruptStoreError(f"{text}: {path / 'data.mdb'} is truncated ({have} bytes, its meta page "
                                f"needs {need}); restore it from a copy")


def _short_of_space(path: Path, needed: int) -> bool:
    """Whether writing ``needed`` more bytes (at least 1 MiB) would overrun the free space of
    the file system or this process's RLIMIT_FSIZE."""
    want = max(needed, 1 << 20)
    try:
        st = os.statvfs(path)
        if st.f_bavail * st.f_frsize < want:
            return True
        soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        return soft != resource.RLIM_INFINITY and os.path.getsize(path / "data.mdb") + want > soft
    except OSError:
        return False


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    text = str(exc)
    for code, marker in ((errno.ENOSPC, "No space left"), (errno.EACCES, "Permission denied"),
                         (errno.EROFS, "Read-only file system"), (errno.EDQUOT, "quota"),
                         (errno.ENOENT, "No such file"), (errno.EFBIG, "File too large"),
                         (errno.EIO, "Input/output error")):
        if marker in text:
            return code
    return None


def _wrap(exc: BaseException, what: str) -> StoreError:
    """Translate an LMDB or OS error into our hierarchy, keeping its text."""
    code = _errno(exc)
    if isinstance(exc, lmdb.MapFullError) or code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) \
            or isinstance(exc, lmdb.DiskError):
        return StoreFullError(f"{what}: no space left ({exc}); nothing was written")
    if isinstance(exc, lmdb.ReadonlyError) or code in (errno.EACCES, errno.EROFS, errno.EPERM):
        return StorePermissionError(f"{what}: not writable ({exc}); open with ?mode=ro to read")
    if isinstance(exc, (lmdb.CorruptedError, lmdb.InvalidError, lmdb.PageNotFoundError,
                        lmdb.VersionMismatchError, lmdb.BadChecksumError)):
        return CorruptStoreError(f"{what}: the LMDB files are damaged ({exc})")
    if code == errno.ENOENT:
        return StoreNotFoundError(f"{what}: {exc}")
    return StoreError(f"{what}: {exc}")
