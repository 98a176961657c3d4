"""The open handles behind :class:`~carousel.integrations.torchrl.CarouselStorage`: one per folder per process.

A carousel store has one writer process (its ``flock``), and TorchRL copies storages freely:
``torch.save(rb)`` / ``torch.load``, ``copy.deepcopy``, ``pickle`` to a worker. So a storage pickles
as its folder and every copy *in the same process* shares one :class:`TierHandle` (refcounted,
closed when the last copy closes or is collected). A copy in another process -- a spawned
worker, or any process after ``fork`` -- opens its own handle: the writer's, if no other process
holds the store, else a read-only one (LMDB's readers never block its writer; a Zarr store is
refused while a writer holds it). After ``fork`` the child never touches the parent's handles:
LMDB forbids using an environment across ``fork``, so the child drops them unclosed and reopens.

Non-tensor leaves (strings, numbers, lists and dicts of those) have no fixed-size record field;
they live in the handle's object table, an LMDB environment beside the store (8-byte big-endian
position -> JSON of ``{leaf key: value}``). JSON, not pickle: nothing read back from a store is ever
unpickled (a damaged or planted table must not run code), so other objects are refused at the
write, before anything is stored (:func:`check_objects`), and a tuple comes back as a list.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from storage_backends import SampleStore, StoreLockedError, open_store

__all__ = ["TierHandle", "acquire", "check_objects", "release"]


def _encode(row: dict[Any, Any]) -> bytes:
    """``{leaf key: value}`` as JSON (a nested key, a tuple, as a list of its parts)."""
    items = [[list(k) if isinstance(k, tuple) else k, v] for k, v in row.items()]
    try:
        return json.dumps(items, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"CarouselStorage keeps non-tensor leaves as JSON (str, int, float, bool, None, and lists "
                        f"and dicts of those), never pickled: {exc}") from None


def _decode(raw: bytes) -> dict[Any, Any]:
    return {tuple(k) if isinstance(k, list) else k: v for k, v in json.loads(raw)}


def check_objects(objects: dict[Any, list[Any]]) -> None:
    """Raise ``TypeError`` if a non-tensor leaf's values cannot be kept (see the module docstring)."""
    for key, values in objects.items():
        _encode({key: list(values)})

_OBJECTS_MAP_BYTES = 1 << 30  # a sparse file: address space, not disk, until used


class TierHandle:
    """One process's open store (plus object table) in one folder; ``writable`` is False for a
    read-only handle opened beside another process's writer."""

    def __init__(self, key: str, store: SampleStore, objects_dir: Path, writable: bool) -> None:
        self.key, self.store, self.writable, self.users = key, store, writable, 0
        self._objects_dir = objects_dir
        self._objects: lmdb.Environment | None = None
        self._mutex = threading.Lock()

    def _env(self, create: bool) -> lmdb.Environment | None:
        with self._mutex:
            if self._objects is None and (create or self._objects_dir.exists()):
                if create:
                    self._objects_dir.mkdir(parents=True, exist_ok=True)
                self._objects = lmdb.open(str(self._objects_dir), map_size=_OBJECTS_MAP_BYTES,
                                          readonly=not self.writable, sync=False, lock=True)
            return self._objects

    def put_objects(self, ids: np.ndarray, rows: list[dict[Any, Any]]) -> None:
        """Keep each position's non-tensor values (one write transaction)."""
        env = self._env(create=True)
        with env.begin(write=True) as txn:
            for i, row in zip(ids.tolist(), rows):
                txn.put(int(i).to_bytes(8, "big"), _encode(row))

    def get_objects(self, ids: np.ndarray) -> list[dict[Any, Any] | None]:
        """Each position's non-tensor values (None where none were written)."""
        env = self._env(create=False)
        if env is None:
            return [None] * len(ids)
        with env.begin() as txn:
            raw = [txn.get(int(i).to_bytes(8, "big")) for i in ids.tolist()]
        return [None if r is None else _decode(r) for r in raw]

    def forget_after_fork(self) -> None:
        """In a forked child: close this process's copies of the parent's LMDB environments, and
        nothing else. py-lmdb refuses to open an environment twice in a process, and the child's
        own read-only handle needs to; closing the copies writes nothing (checked: the parent
        goes on writing), while the store's own ``close`` would flush and release locks."""
        env = getattr(self.store, "_env", None)  # an LMDB store's environment; a Zarr store has none
        if env is not None:
            env.close()
        if self._objects is not None:
            self._objects.close()
            self._objects = None

    def flush(self) -> None:
        self.store.flush()
        if self._objects is not None:
            self._objects.sync(True)

    def close(self) -> None:
        self.store.close()
        if self._objects is not None:
            self._objects.close()
            self._objects = None


# folder (resolved) -> this process's handle. Guarded by _LOCK; cleared in a forked child.
_OPEN: dict[str, TierHandle] = {}
_LOCK = threading.Lock()
# Releases waiting for _LOCK (see release); list.append and pop are atomic.
_PENDING: list[TierHandle] = []
# Handles inherited through fork: kept referenced, never closed (closing an LMDB environment
# opened by the parent is as forbidden as using it), so no finalizer closes them in the child.
_INHERITED: list[TierHandle] = []


def acquire(folder: Path, url_rw: str, url_ro: str | None, schema: dict | None) -> TierHandle:
    """This process's handle on the store kept in ``folder`` (``folder/store``, opened with
    ``url_rw``, created with ``schema`` when given; the object table is ``folder/objects``);
    ``url_ro`` is tried when another process holds the writer lock."""
    key = str(folder.resolve())
    with _LOCK:
        try:
            handle = _OPEN.get(key)
            if handle is None:
                try:
                    store, writable = open_store(url_rw, schema), True
                except StoreLockedError:
                    if url_ro is None or schema is not None:
                        raise
                    store, writable = open_store(url_ro), False
                handle = _OPEN[key] = TierHandle(key, store, folder / "objects", writable)
            handle.users += 1
            return handle
        finally:
            _drain()


def release(handle: TierHandle) -> None:
    """One user fewer; the last one closes the handle (a no-op for a handle inherited by fork).

    Storages call this from their finalizers, which the garbage collector may run inside
    ``acquire`` on this very thread: then it only leaves a note, and the lock's holder closes
    the handle before letting go (waiting for the lock there would deadlock)."""
    if not _LOCK.acquire(blocking=False):
        _PENDING.append(handle)
        return
    try:
        _PENDING.append(handle)
        _drain()
    finally:
        _LOCK.release()


def _drain() -> None:
    """Release the handles noted in ``_PENDING`` (the caller holds ``_LOCK``)."""
    while _PENDING:
        handle = _PENDING.pop()
        if any(h is handle for h in _INHERITED):
            continue
        handle.users -= 1
        if handle.users > 0:
            continue
        if _OPEN.get(handle.key) is handle:
            del _OPEN[handle.key]
        handle.close()


def _after_fork_in_child() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # the parent's may have been held by another thread at fork
    for handle in _OPEN.values():
        handle.forget_after_fork()
    _INHERITED.extend(_OPEN.values())
    _OPEN.clear()
    _PENDING.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
