"""CPU and I/O hogs: child processes that starve whatever runs beside them, and that never outlive
the process that started them.

    with Hogs(cpu=os.cpu_count(), io=True, scratch_dir="/tmp"):
        ...  # runs here compete with one busy process per core and a writer that fsyncs in a loop

- A **CPU hog** spins a Python loop (one core each).
- The **I/O hog** writes ``io_block_bytes`` of incompressible bytes to a scratch file and fsyncs,
  again and again, wrapping around at ``io_file_bytes`` (so the disk stays busy, not full). Put its
  scratch folder on the file system the runs' storage tiers use (the default: the temp folder,
  where ``trainers run`` puts them).

The hogs go away when the ``with`` block ends, by an exception too (SIGTERM, then SIGKILL after
``stop_timeout_s``). If the starting process itself dies without cleaning up (SIGKILL), each hog
notices within a fraction of a second: on Linux the kernel sends it SIGKILL (``PR_SET_PDEATHSIG``),
elsewhere it polls its parent pid. Stdlib only: the children run this file as a script, without
importing the package (or torch).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["Hogs", "alive"]

_POLL_EVERY = 200_000  # loop turns between parent checks in a CPU hog (~10 ms)


class Hogs:
    """``cpu`` spinning processes and, with ``io``, one writer fsyncing a scratch file in a loop.

    Args:
        cpu: CPU hogs to start (0: none).
        io: start the I/O hog.
        scratch_dir: where the I/O hog's scratch folder goes (default: the temp folder).
        io_block_bytes: bytes per write (each followed by an fsync).
        io_file_bytes: the scratch file's size; writes wrap around to its start.
        stop_timeout_s: how long :meth:`stop` waits after SIGTERM before SIGKILL.

    Examples:
        >>> with Hogs(cpu=1, io=False) as hogs:
        ...     pids = hogs.pids
        ...     len(pids), all(alive(p) for p in pids)
        (1, True)
        >>> any(alive(p) for p in pids)
        False
    """

    def __init__(self, cpu: int = 0, io: bool = False, scratch_dir: str | Path | None = None,
                 io_block_bytes: int = 4 << 20, io_file_bytes: int = 256 << 20, stop_timeout_s: float = 5.0) -> None:
        if cpu < 0 or io_block_bytes < 1 or io_file_bytes < io_block_bytes:
            raise ValueError(f"hogs: cpu ({cpu}) must be >= 0 and 1 <= io_block_bytes ({io_block_bytes}) "
                             f"<= io_file_bytes ({io_file_bytes})")
        self.cpu, self.io = int(cpu), bool(io)
        self.scratch_dir = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
        self.io_block_bytes, self.io_file_bytes = int(io_block_bytes), int(io_file_bytes)
        self.stop_timeout_s = float(stop_timeout_s)
        self._procs: list[subprocess.Popen] = []
        self._scratch: Path | None = None

    @property
    def pids(self) -> list[int]:
        """The hogs' process ids (empty before :meth:`start` and after :meth:`stop`)."""
        return [p.pid for p in self._procs]

    def start(self) -> Hogs:
        """Start the hogs; on any failure the ones already started are stopped."""
        if self._procs:
            raise RuntimeError("hogs already started")
        try:
            for _ in range(self.cpu):
                self._spawn("cpu")
            if self.io:
                self._scratch = Path(tempfile.mkdtemp(prefix="carousel-iohog-", dir=self.scratch_dir))
                self._spawn("io", str(self._scratch / "scratch.bin"), str(self.io_block_bytes),
                            str(self.io_file_bytes))
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, *args: str) -> None:
        self._procs.append(subprocess.Popen([sys.executable, __file__, str(os.getpid()), *args],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))

    def stop(self) -> None:
        """Stop every hog (SIGTERM, then SIGKILL) and wait for it; remove the scratch folder. Idempotent."""
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + self.stop_timeout_s
        for p in self._procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs = []
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __enter__(self) -> Hogs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a dead child nobody has reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: kill(0) said it exists
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# ---- the children ----------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # the parent-pid poll below still ends the hog


def _spin(parent: int) -> None:
    while True:
        for _ in range(_POLL_EVERY):
            pass
        if os.getppid() != parent:
            return


def _write(parent: int, path: str, block_bytes: int, file_bytes: int) -> None:
    block = os.urandom(block_bytes)  # incompressible, made once: the hog's CPU goes to I/O, not to randomness
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        offset = 0
        while os.getppid() == parent:
            os.pwrite(fd, block, offset)
            os.fsync(fd)
            offset = (offset + block_bytes) % (file_bytes - file_bytes % block_bytes)
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass


def _child(argv: list[str]) -> None:
    parent, kind = int(argv[0]), argv[1]
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before PR_SET_PDEATHSIG was set
        return
    # SIGTERM ends the loops through SystemExit, so the I/O hog's ``finally`` removes its file.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the starting process's to handle
    if kind == "cpu":
        _spin(parent)
    elif kind == "io":
        _write(parent, argv[2], int(argv[3]), int(argv[4]))
    else:
        raise SystemExit(f"hogs: unknown kind {kind!r}")


if __name__ == "__main__":
    _child(sys.argv[1:])
