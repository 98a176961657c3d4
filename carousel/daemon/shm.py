"""Shared memory between the daemon and its clients: segments the daemon owns, and batch rings.

Segments are files in ``/dev/shm`` (POSIX shared memory) named ``carousel-{uid}-{pid}-{n}`` after
the owning user and daemon process, created ``O_EXCL`` with mode 0600 and fully allocated up front
(``posix_fallocate``: a full ``/dev/shm`` is an error at creation, never a SIGBUS on a later write).
Only the daemon creates and unlinks them; a client maps a segment by the name the daemon sent,
after checking that it belongs to its own uid. A daemon that died leaves its segments behind: the
next daemon :func:`sweep` s every ``carousel-{uid}-{pid}-*`` whose pid is gone.

A :class:`BatchRing` is one client's standing sample request: ``slots`` batches of ``n`` rows in
one segment, each slot in one of three states, written by one side each::

    FREE --daemon fills it--> READY --client takes it--> TAKEN --client's tensors die--> FREE

so neither side needs a lock across processes: the daemon only writes FREE slots and flips
them to READY; the client only flips READY to TAKEN and TAKEN back to FREE. The client's batch
tensors view the slot directly (no copy); the slot is handed back when the last of them is freed.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..em_pool import torch_dtype

SHM_DIR = "/dev/shm"
_PREFIX = "carousel-"
_NAME = re.compile(r"^carousel-(\d+)-(\d+)-(\d+)$")
_ALIGN = 64
_STATE_STRIDE = 64  # one cache line per slot state: the two processes never share a line
FREE, READY, TAKEN = 0, 1, 2
_counter = itertools.count()
# A pthread mutex acquire/release is a full memory barrier: after seeing READY, the client's reads
# of the slot cannot be reordered before that load, even on weakly ordered CPUs (ARM boards).
_fence_lock = threading.Lock()


def _load_futex():
    """``(wait, wake)`` on a uint32 in shared memory via Linux futexes, or None elsewhere.

    A client whose ring is empty sleeps until the filler publishes a batch -- one wake-up per
    batch -- instead of polling, which on a small board takes the very core the filler needs.
    Not FUTEX_PRIVATE: the word lives in a mapping shared by two processes.
    """
    import ctypes
    import platform
    nr = {"x86_64": 202, "aarch64": 98, "arm64": 98, "riscv64": 98}.get(platform.machine())
    if nr is None or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    def wait(addr: int, expected: int, timeout_s: float) -> None:
        ts = Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))
        syscall(nr, ctypes.c_void_p(addr), 0, ctypes.c_uint32(expected), ctypes.byref(ts), None, 0)  # FUTEX_WAIT

    def wake(addr: int) -> None:
        syscall(nr, ctypes.c_void_p(addr), 1, 0x7FFFFFFF, None, None, 0)  # FUTEX_WAKE, everyone

    return wait, wake


_FUTEX = _load_futex()


def _address(seg: Segment, offset: int) -> int:
    import ctypes
    return ctypes.addressof(ctypes.c_uint32.from_buffer(seg.map, offset))


class ShmError(OSError):
    """A shared-memory segment that cannot be created or mapped (full /dev/shm, wrong owner...)."""


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def segment_names(uid: int | None = None) -> list[str]:
    """Carousel segments in ``/dev/shm`` (of ``uid`` when given)."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = _NAME.match(name)
        if m and (uid is None or int(m.group(1)) == uid):
            out.append(name)
    return sorted(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(uid: int | None = None) -> list[str]:
    """Unlink the segments of dead daemons of ``uid`` (default: ours); returns their names."""
    uid = os.getuid() if uid is None else uid
    gone = []
    for name in segment_names(uid):
        pid = int(_NAME.match(name).group(2))
        if pid != os.getpid() and not _alive(pid):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                gone.append(name)
            except FileNotFoundError:
                pass
    return gone


class Segment:
    """One mapped shared-memory file; the creating side owns it and unlinks it on :meth:`close`."""

    def __init__(self, name: str, size: int, fd: int, owner: bool) -> None:
        self.name, self.size, self.owner = name, size, owner
        try:
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._closed = False

    @classmethod
    def create(cls, size: int) -> Segment:
        """A new zero-filled segment of ``size`` bytes, mode 0600, owned by this process."""
        size = max(_align(size, mmap.PAGESIZE), mmap.PAGESIZE)
        name = f"{_PREFIX}{os.getuid()}-{os.getpid()}-{next(_counter)}"
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise ShmError(exc.errno, f"cannot create shared memory {path}: {exc.strerror}") from None
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            why = "/dev/shm is full (containers: raise --shm-size)" if exc.errno == errno.ENOSPC else exc.strerror
            raise ShmError(exc.errno, f"cannot allocate {size} bytes of shared memory {path}: {why}") from None
        return cls(name, size, fd, owner=True)

    @classmethod
    def attach(cls, name: str, size: int) -> Segment:
        """Map a segment the daemon created; it must be a regular file of our uid, mode 0600."""
        if not _NAME.match(name):
            raise ShmError(errno.EINVAL, f"not a carousel segment name: {name!r}")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise ShmError(exc.errno, f"cannot open shared memory {path}: {exc.strerror}") from None
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o077 or st.st_size < size:
            os.close(fd)
            raise ShmError(errno.EPERM, f"{path}: owner uid {st.st_uid}, mode {st.st_mode & 0o777:o}, "
                                        f"size {st.st_size}; expected ours, 0600, >= {size} bytes")
        return cls(name, size, fd, owner=False)

    def close(self) -> None:
        """Drop our reference to the mapping (and, for the owner, the name).

        The map is never closed explicitly: tensors made with ``torch.frombuffer`` hold a reference
        to it but no buffer export, so ``mmap.close()`` would succeed and unmap the memory under a
        batch the user still holds. Dropped instead, it is unmapped when its last tensor dies; the
        name goes now, so /dev/shm gets the memory back at that moment.
        """
        if self._closed:
            return
        self._closed = True
        self.map = None
        if self.owner:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass


@dataclass(frozen=True)
class RingLayout:
    """Where everything lives in a ring segment; sent to the client as JSON (:meth:`to_json`)."""

    n: int
    slots: int
    slot_bytes: int
    data_offset: int
    fields: tuple[tuple[str, str, tuple[int, ...], int], ...]  # (name, dtype, row shape, offset in slot)

    @classmethod
    def plan(cls, n: int, slots: int, fields: Mapping[str, tuple[tuple[int, ...], str]]) -> RingLayout:
        """``"id"`` (int64) first, then every field, each aligned; slots page-aligned."""
        entries = []
        offset = 0
        for name, (shape, dtype) in {"id": ((), "int64"), **fields}.items():
            entries.append((name, dtype, tuple(shape), offset))
            offset = _align(offset + n * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        slot_bytes = _align(max(offset, 1), mmap.PAGESIZE)
        data_offset = _align((slots + 1) * _STATE_STRIDE, mmap.PAGESIZE)
        return cls(n, slots, slot_bytes, data_offset, tuple(entries))

    @property
    def size(self) -> int:
        return self.data_offset + self.slots * self.slot_bytes

    def to_json(self) -> dict:
        return {"n": self.n, "slots": self.slots, "slot_bytes": self.slot_bytes, "data_offset": self.data_offset,
                "fields": [[name, dtype, list(shape), off] for name, dtype, shape, off in self.fields]}

    @classmethod
    def from_json(cls, d: Mapping) -> RingLayout:
        return cls(int(d["n"]), int(d["slots"]), int(d["slot_bytes"]), int(d["data_offset"]),
                   tuple((str(f[0]), str(f[1]), tuple(int(x) for x in f[2]), int(f[3])) for f in d["fields"]))


def _states(seg: Segment, slots: int) -> np.ndarray:
    # Per slot, one cache line apart: (state, rows, epoch it was filled in, 0); then one line for
    # the ring itself: (current epoch of the memory, batches published, a client is waiting, 0).
    return np.ndarray((slots + 1, 4), dtype=np.uint32, buffer=seg.map, offset=0, strides=(_STATE_STRIDE, 4))


class Doorbell:
    """Clients ring it when they hand ring slots back; the daemon's filler sleeps on it when idle.

    Two uint32 words in a one-page segment: a counter (the futex word) and a flag the filler sets
    while asleep, so a client pays for the wake-up syscall only when someone is sleeping.
    """

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.words = np.ndarray((2,), dtype=np.uint32, buffer=segment.map, offset=0)
        self._addr = _address(segment, 0)

    @classmethod
    def create(cls) -> Doorbell:
        return cls(Segment.create(mmap.PAGESIZE))

    @classmethod
    def attach(cls, name: str) -> Doorbell:
        return cls(Segment.attach(name, mmap.PAGESIZE))

    def value(self) -> int:
        return int(self.words[0])

    def ring(self) -> None:
        words = self.words
        if words is None:  # closed
            return
        words[0] += 1
        with _fence_lock:  # the count is stored before the sleeper flag is read
            pass
        if words[1] and _FUTEX is not None:
            words[1] = 0
            _FUTEX[1](self._addr)

    def wait(self, seen: int, timeout_s: float) -> None:
        """Sleep until rung after ``seen`` was read, or for ``timeout_s``."""
        if _FUTEX is None:
            time.sleep(timeout_s)
            return
        self.words[1] = 1
        with _fence_lock:
            pass
        if int(self.words[0]) == seen:
            _FUTEX[0](self._addr, seen, timeout_s)

    def close(self) -> None:
        self.words = None
        self.segment.close()


class BatchRing:
    """The daemon's side of a ring: tensors over each slot, filled by :meth:`fill`."""

    def __init__(self, layout: RingLayout, key: tuple) -> None:
        self.layout, self.key = layout, key
        self.segment = Segment.create(layout.size)
        self.states = _states(self.segment, layout.slots)
        self._published_addr = _address(self.segment, layout.slots * _STATE_STRIDE + 4)
        raw = torch.frombuffer(self.segment.map, dtype=torch.uint8)
        self.outs: list[dict[str, torch.Tensor]] = []
        for i in range(layout.slots):
            base = layout.data_offset + i * layout.slot_bytes
            out = {}
            for name, dtype, shape, off in layout.fields:
                dt = torch_dtype(dtype)
                count = layout.n * int(np.prod(shape, dtype=np.int64))
                nbytes = count * torch.empty(0, dtype=dt).element_size()
                out[name] = raw[base + off: base + off + nbytes].view(dt).view(layout.n, *shape)
            self.outs.append(out)
        self.filled = 0

    def free_slots(self) -> np.ndarray:
        return np.flatnonzero(self.states[:-1, 0] == FREE)

    def set_epoch(self, epoch: int) -> None:
        """The memory changed (samples were added): a batch filled before with fewer than ``n``
        rows is stale, and the client asks for a fresh one instead of taking it."""
        self.states[-1, 0] = epoch

    def publish(self, slot: int, rows: int, epoch: int = 0) -> None:
        self.states[slot, 1] = rows
        self.states[slot, 2] = epoch
        with _fence_lock:  # every write of the slot is visible before READY is
            pass
        self.states[slot, 0] = READY
        head = self.states[-1]
        head[1] += 1  # the futex word: a waiting client sleeps on its old value
        with _fence_lock:  # READY and the count are stored before the waiter flag is read
            pass
        if head[2] and _FUTEX is not None:
            head[2] = 0
            _FUTEX[1](self._published_addr)
        self.filled += 1

    def close(self) -> None:
        self.outs.clear()
        self.states = None
        self.segment.close()


def _use_count_api():
    """torch's count of tensors sharing a storage, if this torch has it (private API, so checked)."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return None
    try:
        probe = torch.zeros(1)
        before = fn(probe.untyped_storage()._cdata)
        view = probe.detach()
        ok = fn(probe.untyped_storage()._cdata) == before + 1
        del view
        return fn if ok and fn(probe.untyped_storage()._cdata) == before else None
    except Exception:  # noqa: BLE001 - any surprise: fall back to finalizers
        return None


_USE_COUNT = _use_count_api()


class RingReader:
    """The client's side of a ring: :meth:`take` returns a ready batch's tensors, without a copy.

    Every slot has its own torch storage over the shared memory, and tensors that stay with the
    reader. A batch handed out is a set of fresh views of them; when torch's count of tensors
    sharing the slot's storage is back to what the reader itself holds, every tensor of that
    batch (and every view the user made of one) is gone, and the slot goes back to the daemon.
    That check runs at each :meth:`take` -- a few hundred nanoseconds per slot held.
    """

    def __init__(self, name: str, layout: RingLayout, doorbell: Doorbell | None = None) -> None:
        self.layout = layout
        self.doorbell = doorbell
        self.segment = Segment.attach(name, layout.size)
        self.states = _states(self.segment, layout.slots)
        self._slots: list[dict[str, torch.Tensor]] = []
        self._storage: list[int] = []
        self._baseline: list[int] = []
        for i in range(layout.slots):
            raw = torch.frombuffer(self.segment.map, dtype=torch.uint8, count=layout.slot_bytes,
                                   offset=layout.data_offset + i * layout.slot_bytes)
            views = {"": raw}
            for fname, dtype, shape, off in layout.fields:
                dt = torch_dtype(dtype)
                nbytes = layout.n * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                views[fname] = raw[off:off + nbytes].view(dt).view(layout.n, *shape)
            self._slots.append(views)
            cdata = raw.untyped_storage()._cdata
            self._storage.append(cdata)
            self._baseline.append(_USE_COUNT(cdata) if _USE_COUNT else 0)
        self._taken: set[int] = set()
        self._published_addr = _address(self.segment, layout.slots * _STATE_STRIDE + 4)
        self._cursor = 0
        self._lock = threading.Lock()
        self._alive = True

    def take(self) -> dict[str, torch.Tensor] | None:
        """The next READY batch as tensors viewing the slot, or None if none is ready."""
        lay = self.layout
        with self._lock:
            if not self._alive:
                return None
            states = self.states
            self._reclaim_locked()
            for i in range(lay.slots):
                slot = (self._cursor + i) % lay.slots
                if states[slot, 0] == READY:
                    break
            else:
                return None
            self._cursor = slot + 1
            rows = int(states[slot, 1])
            if rows < lay.n and states[slot, 2] != states[-1, 0]:
                states[slot, 0] = FREE  # short and stale: the memory has grown since
                return None
            states[slot, 0] = TAKEN
            with _fence_lock:  # reads of the slot happen after READY was seen
                pass
            if _USE_COUNT is None:
                return self._take_with_finalizer(slot, rows)
            # The views are made under the lock: until they exist, another thread's reclaim
            # would see the slot unused and hand it back while we read it.
            self._taken.add(slot)
            views = self._slots[slot]
            if rows == lay.n:
                return {name: views[name].detach() for name, _, _, _ in lay.fields}
            return {name: views[name][:rows] for name, _, _, _ in lay.fields}

    def _reclaim_locked(self) -> None:
        """Slots whose batch the user has dropped go back to the daemon (which is told)."""
        if _USE_COUNT is None or not self._taken:
            return
        freed = [s for s in self._taken if _USE_COUNT(self._storage[s]) == self._baseline[s]]
        for slot in freed:
            self._taken.discard(slot)
            self.states[slot, 0] = FREE
        if freed and self.doorbell is not None:
            self.doorbell.ring()

    def wait(self, timeout_s: float) -> None:
        """Sleep until the daemon publishes a batch, or ``timeout_s`` passes (a short poll where
        futexes are unavailable)."""
        if _FUTEX is None:
            time.sleep(min(timeout_s, 5e-5))
            return
        with self._lock:
            if not self._alive:
                return
            self._reclaim_locked()  # what we drop is what the filler needs to make the next batch
            head = self.states[-1]
            seen = int(head[1])
            head[2] = 1
            with _fence_lock:  # the flag is stored before READY is looked at again
                pass
            if (self.states[:-1, 0] == READY).any():
                return
        _FUTEX[0](self._published_addr, seen, timeout_s)

    def _take_with_finalizer(self, slot: int, rows: int) -> dict[str, torch.Tensor]:
        # Fallback: an anchor array referenced only by the new tensors' storage; when it dies,
        # every tensor of the batch is gone.
        lay = self.layout
        self._taken.discard(slot)
        anchor = np.frombuffer(self.segment.map, dtype=np.uint8, count=lay.slot_bytes,
                               offset=lay.data_offset + slot * lay.slot_bytes)
        weakref.finalize(anchor, self._give_back, slot)
        raw = torch.from_numpy(anchor)
        del anchor
        out = {}
        for name, dtype, shape, off in lay.fields:
            row = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            out[name] = raw[off:off + rows * row].view(torch_dtype(dtype)).view(rows, *shape)
        return out

    def _give_back(self, slot: int) -> None:
        if self._alive:
            try:
                self.states[slot, 0] = FREE
            except (ValueError, TypeError):  # the map was closed meanwhile
                pass

    def close(self) -> None:
        with self._lock:
            self._alive = False
            self.states = None
            self._slots.clear()
        self.segment.close()
