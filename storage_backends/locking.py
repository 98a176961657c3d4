"""One writer process per store, enforced with an advisory ``flock`` on a lock file.

``flock`` locks belong to the open file description, so a second handle in the same process is
refused too, and the kernel drops the lock when a killed holder's descriptors close: no stale
lock files after SIGKILL.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .errors import StoreError, StoreLockedError, StorePermissionError, from_os_error

LOCK_NAME = "writer.lock"


class WriterLock:
    """Exclusive (writer) or shared (read-only opener) lock on ``directory/writer.lock``."""

    def __init__(self, directory: Path, exclusive: bool = True) -> None:
        self.path = Path(directory) / LOCK_NAME
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC if exclusive else os.O_RDONLY | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            # A read-only opener of a store whose lock file was never made: nothing to share.
            self._fd = -1
            return
        except PermissionError as exc:
            raise StorePermissionError(f"{self.path}: cannot open the lock file ({exc.strerror})") from exc
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise StorePermissionError(
                    f"{self.path}: read-only file system; open the store with ?mode=ro to read it") from exc
            raise StoreError(f"{self.path}: cannot open the lock file: {exc}") from exc
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder()
            os.close(self._fd)
            self._fd = -1
            raise StoreLockedError(
                f"{self.path.parent}: the store is open for writing by {holder}; "
                "one writer per store (open it with ?mode=ro to read, or close the other writer)"
            ) from None
        if exclusive:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def _read_holder(self) -> str:
        """Who holds the lock, from the pid its holder wrote: naming our own pid as "another
        process" would send the reader hunting for a process that does not exist."""
        try:
            pid = os.pread(self._fd, 32, 0).decode().strip()
        except OSError:
            pid = ""
        if not pid.isdigit():
            return "another process (or another handle in this process)"
        if int(pid) == os.getpid():
            return f"another handle in this process (pid {pid}; close it first)"
        return f"another process (pid {pid})"

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def lock_store_dir(path: Path, *, create: bool, readonly: bool, what: str) -> WriterLock:
    """The lock of a store kept in folder ``path`` (made first when ``create``): exclusive for a
    writer, shared for a read-only opener. A file in the way or an OS error is a ``StoreError``
    naming ``what`` (the store's URL)."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"{what}: {path} is not a directory")
    try:
        if create:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return WriterLock(path, exclusive=not readonly)
    except OSError as exc:
        raise from_os_error(exc, f"{what}: cannot open {path}") from exc
