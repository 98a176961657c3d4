"""Shared memory between the daemon and its clients: the segments the daemon owns, and a doorbell.

Segments are files in ``/dev/shm`` (POSIX shared memory) named ``carousel-{uid}-{pid}-{n}`` after
the owning user and daemon process, created ``O_EXCL`` with mode 0600 and fully allocated up front
(``posix_fallocate``: a full ``/dev/shm`` is an error at creation, never a SIGBUS on a later write).
Only the daemon creates and unlinks them; a client maps a segment by the name the daemon sent,
after checking that it belongs to its own uid. A daemon that died leaves its segments behind: the
next daemon :func:`sweep` s every ``carousel-{uid}-{pid}-*`` whose pid is gone.

The batch rings built on these segments are :mod:`carousel.daemon.shm_ring`; the
:class:`Doorbell` here is how their two sides wake each other (a futex in a one-page segment).
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

import numpy as np

SHM_DIR = "/dev/shm"
_PREFIX = "carousel-"
_NAME = re.compile(r"^carousel-(\d+)-(\d+)-(\d+)$")
_ALIGN = 64
_counter = itertools.count()
# A pthread mutex acquire/release is a full memory barrier: after seeing READY, the client's reads
# of the slot cannot be reordered before that load, even on weakly ordered CPUs (ARM boards).
fence_lock = threading.Lock()


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


FUTEX = _load_futex()


def address_of(seg: Segment, offset: int) -> int:
    """The address of the uint32 at ``offset`` in ``seg``'s map (a futex word)."""
    import ctypes
    return ctypes.addressof(ctypes.c_uint32.from_buffer(seg.map, offset))


class ShmError(OSError):
    """A shared-memory segment that cannot be created or mapped (full /dev/shm, wrong owner...)."""


def align(n: int, a: int = _ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a``."""
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
        size = max(align(size, mmap.PAGESIZE), mmap.PAGESIZE)
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


class Doorbell:
    """Clients ring it when they hand ring slots back; the daemon's filler sleeps on it when idle.

    Two uint32 words in a one-page segment: a counter (the futex word) and a flag the filler sets
    while asleep, so a client pays for the wake-up syscall only when someone is sleeping.
    """

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.words = np.ndarray((2,), dtype=np.uint32, buffer=segment.map, offset=0)
        self._addr = address_of(segment, 0)

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
        with fence_lock:  # the count is stored before the sleeper flag is read
            pass
        if words[1] and FUTEX is not None:
            words[1] = 0
            FUTEX[1](self._addr)

    def wait(self, seen: int, timeout_s: float) -> None:
        """Sleep until rung after ``seen`` was read, or for ``timeout_s``."""
        if FUTEX is None:
            time.sleep(timeout_s)
            return
        self.words[1] = 1
        with fence_lock:
            pass
        if int(self.words[0]) == seen:
            FUTEX[0](self._addr, seen, timeout_s)

    def close(self) -> None:
        self.words = None
        self.segment.close()
