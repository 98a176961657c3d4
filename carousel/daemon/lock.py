"""One daemon per data directory and per socket: lock files held with ``flock`` while the daemon lives.

``data_dir/daemon.lock`` stops a second daemon on the same data; ``carousel.sock.lock`` beside the
socket stops a second daemon from taking over a live socket (RELIABILITY.md, item 17).
"""

from __future__ import annotations

import fcntl
import os

from .errors import DaemonError


class FileLock:
    """An exclusive ``flock`` on ``path`` holding our pid; refused (:class:`DaemonError`, naming the
    holder) while another process holds it. The kernel releases it when the process dies."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise DaemonError(f"{path}: another carousel daemon (pid {holder or '?'}) already uses this {what}; "
                              "stop it first or point this one elsewhere") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

