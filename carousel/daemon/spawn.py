"""``carousel.spawn``: a memory served by a private daemon that is a child process of the trainer.

Why a child process: in-process (:class:`~carousel.CarouselMemory`), the memory's writer and swap
engine are threads of the trainer's interpreter. When every core is busy (``DataLoader`` workers,
a second job) the OS preempts them now and then while one holds the GIL or the EM's lock, and the
trainer's next call waits until it runs again: ``python -m benchmarks.stall --busy`` measured
in-process call p99s of 3-5 ms, against under 1 ms through the daemon, whose threads share no GIL
with the trainer (docs/design.md, "Where the engine runs"). ``spawn`` gives the daemon's isolation
without running a service: it returns a :class:`~carousel.MemoryClient` (``add / sample / observe /
flush / checkpoint / retain / stats / close``, the same as the in-process memory) connected to
``carousel serve`` started just for it.

What it starts: ``carousel serve`` with the same Python and this same carousel, on a profile written
into a private folder (mode 0700: the socket, the profile, the daemon's log and lock): the memory's
config as given plus a ``[daemon]`` table (socket in that folder, no metrics endpoint unless
``daemon={"metrics": "127.0.0.1:9464"}`` asks for one; any other ``[daemon]`` key likewise).

Lifetime, tied to this process:

- ``close()`` closes the connection (posted adds are answered first), stops the daemon with SIGTERM
  (drain, flush, checkpoint: every add is durable) and waits for it (SIGKILL after 5 minutes); it
  raises if the daemon did not exit 0 (its folder, with the log, is then kept). Otherwise the folder
  is removed.
- The child holds the read end of a pipe whose write end only this process holds; however this
  process ends (returned from ``main``, an exception, SIGKILL), the pipe closes and the daemon shuts
  down cleanly by itself: no orphan daemon keeps the tiers locked (its folder, a few KB, stays in the
  temporary folder then: nobody is left to remove it; its log says how the daemon ended). A memory
  left unclosed is closed at interpreter exit.
- The child runs in a process group of its own: a Ctrl-C at the terminal reaches the trainer only,
  which closes the memory in order. Not in a session of its own: with the kernel's scheduler
  autogroups (``/proc/sys/kernel/sched_autogroup_enabled``) a new session is a new scheduling group,
  which takes the trainer's core as a group, whatever its threads' ``SCHED_BATCH`` (ad hoc,
  ``benchmarks.stall``'s busy loop at a 20 ms step: ``add`` and ``sample`` p99 4.3 and 5.3 ms that
  way, against 0.4 and 0.2 ms in the trainer's session).
- The daemon dying under it (OOM killer, a ``kill -9``) makes the next call raise
  :class:`SpawnedDaemonExited` naming the exit status and the log, at once (nothing would restart
  it: no reconnect wait). Its tiers recover like any daemon's: ``spawn`` the same config again.
- A forked child of the trainer (a ``DataLoader`` worker) that uses the memory opens its own
  connection to the same daemon and never stops it; pickled, the memory travels as a plain
  :class:`~carousel.MemoryClient` to the same socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import storage_backends

from ..config import CarouselConfig, load_config
from ..toml_write import dump_toml
from .client import MemoryClient
from .profile import DaemonProfile

__all__ = ["SpawnedDaemonExited", "SpawnedMemory", "spawn"]

_SOCKET_MAX = 107  # bytes of a Unix socket path (sun_path is 108, NUL included)
_LOG_TAIL = 20     # lines of the daemon's log an error quotes
# How long close() lets the daemon shut down (drain, flush the write-behind queue, checkpoint)
# before it kills it: minutes, since a full queue on a slow SD card takes a while to store.
_STOP_WAIT_S = 300.0


class SpawnedDaemonExited(RuntimeError):
    """The daemon that :func:`spawn` started exited: at start (its first error line says why) or
    while serving (its exit status and log say why). Adds not yet flushed may be lost."""


def spawn(config: str | os.PathLike[str] | Mapping[str, Any] | CarouselConfig, *,
          daemon: Mapping[str, Any] | None = None, workdir: str | os.PathLike[str] | None = None,
          start_timeout_s: float = 120.0, timeout_s: float = 30.0, use_shm: bool = True) -> SpawnedMemory:
    """Serve the memory ``config`` (a memory TOML path, a TOML-shaped dict, or a
    :class:`~carousel.CarouselConfig`) from a daemon started as a child process, and connect to it.

    ``daemon``: extra ``[daemon]`` keys (``metrics``, ``ring_slots``, ``log_level``...);
    ``workdir``: the daemon's private folder (default: a new one under the temporary folder, removed
    by a clean ``close()``; one you name is kept); ``start_timeout_s``: how long the daemon may take to
    open the memory (recovering a large tier takes a while); ``timeout_s`` and ``use_shm``: as for
    :func:`~carousel.connect`. Raises
    :class:`~carousel.ConfigError` for a config or ``daemon`` key that is wrong (before anything
    starts) and :class:`SpawnedDaemonExited` for a daemon that cannot start (its reason).

    Example (starts a process, so not a doctest)::

        mem = carousel.spawn("memory.toml")
        ids = mem.add(x_uint8, y, task=0)
        batch = mem.sample(32)
        mem.observe(batch.ids, logits=model(batch.x))
        mem.close()  # flushed and checkpointed; the daemon stopped
    """
    cfg = config if isinstance(config, CarouselConfig) else (
        CarouselConfig.from_dict(config) if isinstance(config, Mapping) else load_config(config))
    owned = workdir is None
    folder = Path(tempfile.mkdtemp(prefix="carousel-spawn-") if owned else os.path.abspath(workdir))
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        socket_dir = folder / "sock"
        if len(os.fsencode(socket_dir / "carousel.sock")) > _SOCKET_MAX:
            raise ValueError(f"workdir {str(folder)!r} is too deep for a Unix socket in it (at most "
                             f"{_SOCKET_MAX - len('/sock/carousel.sock')} bytes): pass a shorter one")
        # The daemon's lock and session file go in the private folder: a spawned daemon is never
        # restarted, and two of them on the same tiers are told apart by the stores' own writer locks.
        table = {"socket_dir": str(socket_dir), "data_dir": str(folder), "metrics": "", **dict(daemon or {})}
        profile = {"daemon": table, **cfg.to_dict()}
        # A wrong [daemon] key fails here, naming it, before a process starts.
        socket_path = DaemonProfile.from_dict(profile).socket_path()
        path = folder / "profile.toml"
        path.write_text(dump_toml(profile))
    except BaseException:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return SpawnedMemory(path, socket_path, owned=owned, start_timeout_s=start_timeout_s, timeout_s=timeout_s,
                         use_shm=use_shm)


class SpawnedMemory(MemoryClient):
    """A :class:`~carousel.MemoryClient` whose daemon is a child process of this one (see
    :func:`spawn`, which makes it). ``process`` is the daemon's :class:`subprocess.Popen`,
    ``workdir`` its private folder, ``log_path`` its log."""

    def __init__(self, profile: Path, socket_path: str, *, owned: bool, start_timeout_s: float, timeout_s: float,
                 use_shm: bool) -> None:
        self.workdir = profile.parent
        self.log_path = self.workdir / "daemon.log"
        read_end, self._pipe = os.pipe()  # neither end is inherited by other children (O_CLOEXEC)
        try:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "carousel", "serve", "--config", str(profile),
                     "--parent-fd", str(read_end)],
                    pass_fds=(read_end,), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    process_group=0, env=_child_env())
        except BaseException:
            os.close(self._pipe)
            raise
        finally:
            os.close(read_end)
        self._owner = os.getpid()
        self._stopper = weakref.finalize(self, _stop, self.process, self._pipe, self.workdir if owned else None,
                                         self._owner)
        try:
            self._await_start(socket_path, start_timeout_s)
            super().__init__(socket_path, "default", timeout_s=timeout_s, wait_s=timeout_s, use_shm=use_shm)
        except BaseException:
            self._stopper()  # a daemon still starting stops cleanly (its folder goes); a failed one's log stays
            raise

    def _await_start(self, socket_path: str, start_timeout_s: float) -> None:
        deadline = time.monotonic() + start_timeout_s
        delay = 0.01
        while not os.path.exists(socket_path):
            code = self.process.poll()
            if code is not None:
                raise SpawnedDaemonExited(f"the carousel daemon could not start (exit status {code}): "
                                          f"{_reason(self.log_path)} (its log: {self.log_path})")
            if time.monotonic() > deadline:
                raise SpawnedDaemonExited(f"the carousel daemon did not start within start_timeout_s="
                                          f"{start_timeout_s:g} s; the end of its log:\n{_tail(self.log_path)}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def close(self) -> None:
        """Close the connection, then stop the daemon cleanly (flush, checkpoint) and wait for it.
        Raises :class:`SpawnedDaemonExited` if it did not exit 0 (its folder and log are kept).
        Idempotent; in a forked child, closes that child's connection only."""
        try:
            super().close()
        finally:
            code = self._stopper() if os.getpid() == self._owner else None
        if code not in (None, 0):
            raise SpawnedDaemonExited(f"the carousel daemon exited with status {code} at close; its log: "
                                      f"{self.log_path}")

    def _open_socket(self) -> None:
        # A daemon of ours that exited is not coming back: say so now, not after reconnect_s.
        # (Only the process that started it can ask: in a forked child, Popen.poll() would see
        # ECHILD and report a clean exit.)
        if os.getpid() == self._owner:
            code = self.process.poll()
            if code is not None:
                raise SpawnedDaemonExited(
                    f"the carousel daemon this process spawned (pid {self.process.pid}) exited with status "
                    f"{code}{' (killed by ' + signal.Signals(-code).name + ')' if code < 0 else ''}; adds not yet "
                    f"flushed may be lost; its log: {self.log_path}")
        super()._open_socket()

    def __reduce__(self):
        # Another process gets a plain client of the same daemon: only this one owns the child.
        return _plain_client, (MemoryClient.__getstate__(self),)


def _plain_client(state: dict[str, Any]) -> MemoryClient:
    client = MemoryClient.__new__(MemoryClient)
    client.__setstate__(state)
    return client


def _stop(process: subprocess.Popen, pipe: int, owned_folder: Path | None, owner: int,
          wait_s: float = _STOP_WAIT_S) -> int | None:
    """Stop the daemon (SIGTERM, then SIGKILL after ``wait_s``); its exit status. The folder we made
    goes only after a clean exit (else its log is what tells why). Nothing in a forked child."""
    if os.getpid() != owner:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    try:
        os.close(pipe)
    except OSError:  # already closed (EBADF): the daemon has seen its EOF either way
        pass
    if owned_folder is not None and process.returncode == 0:
        shutil.rmtree(owned_folder, ignore_errors=True)
    return process.returncode


def _child_env() -> dict[str, str]:
    """This process's environment, with the folders this carousel and storage_backends come from
    first on ``PYTHONPATH`` (a checkout, a folder on this process's path): the child runs the same
    code, installed or not. An installed carousel's site-packages is left where the interpreter puts
    it: ahead of the standard library on ``PYTHONPATH`` it could shadow a module of it."""
    env = dict(os.environ)
    installed = {os.path.realpath(p) for p in (*site.getsitepackages(), site.getusersitepackages())}
    roots = []
    for module in (sys.modules["carousel"], storage_backends):
        root = str(Path(module.__file__).resolve().parent.parent)
        if root not in roots and root not in installed:
            roots.append(root)
    path = roots + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def _tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-_LOG_TAIL:])


def _reason(log: Path) -> str:
    """The daemon's one-line start error (``carousel: cannot start: ...``), else its log's last line."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"(no log at {log})"
    for line in reversed(lines):
        if line.startswith("carousel: "):
            return line[len("carousel: "):]
    return lines[-1] if lines else "(its log is empty)"
