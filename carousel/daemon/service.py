"""``carousel serve``: the daemon's lifecycle -- start, serve, stop -- and where connections enter.

:class:`Daemon` starts in its constructor: the socket directory checked (:mod:`.security`), the
data directory and socket locked (:mod:`.lock`), a new session recorded (:mod:`.session`), dead
daemons' shared memory swept, every memory opened off the main thread (:mod:`.torch_threads`).
:meth:`Daemon.run` then listens on a Unix socket in a private directory (and, optionally, TCP on
loopback with a token), checks each peer before reading a byte of it, and hands every accepted
connection to a :class:`~carousel.daemon.connection.Connection`, which reads its frames
(:mod:`carousel.daemon.wire`) and runs each request through :mod:`carousel.daemon.handlers` on a
small thread pool, so a slow ``add`` under back-pressure never stalls another client's ``sample``.
A :class:`~carousel.daemon.filler.Filler` thread keeps every client's standing sample requests
topped up in shared-memory rings (:mod:`carousel.daemon.shm_ring`): a steady-state ``sample`` on the
client is a look at a ring, with no socket round trip. Metrics of every memory, labelled
``memory``, are served on ``/metrics`` over HTTP on loopback (:mod:`.metrics`).

Lifecycle: SIGTERM/SIGINT stop accepting, let running requests finish, close the rings, flush
and checkpoint every memory, and exit 0. So does the end of the parent's pipe (``parent_fd``: a
daemon that :func:`carousel.spawn` started as a child outlives no trainer, whatever killed it). A
lock file in the data directory (and one beside the socket) stops a second daemon on the same data.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import secrets
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import __version__
from ..memory import CarouselMemory
from . import sd_notify
from .connection import Connection, close_writer, send_error, send_error_nowait
from .errors import DaemonError
from .filler import Filler
from .handlers import MAX_RINGS_PER_CLIENT
from .lock import FileLock
from .log import Throttled
from .metrics import DaemonMetrics, histogram_quantiles
from .profile import DaemonProfile
from .security import allowed_gid, peer_allowed, peer_credentials, prepare_socket_dir, read_token
from .served import Served
from .session import SESSION_NAME, read_session, write_session
from .shm import SHM_DIR, Segment, shm_free_bytes, sweep
from .torch_threads import off_main_thread, set_torch_threads

log = logging.getLogger("carousel.daemon")

SOCKET_NAME = "carousel.sock"
LOCK_NAME = "daemon.lock"
# File descriptors: a client holds its socket plus one per mapped segment (mmap keeps a dup of
# the descriptor): up to 8 rings and an upload segment. The reserve covers the stores (LMDB,
# Zarr and flat files), the metrics server, logs and the listening sockets.
_FDS_PER_CLIENT = 2 + MAX_RINGS_PER_CLIENT
_FD_RESERVE = 256
_FD_WANTED = 1 << 16  # the soft RLIMIT_NOFILE the daemon raises itself to (bounded by the hard limit)
_LISTEN_BACKLOG = 1024  # a burst of connections waits in the kernel's queue, not in connect()'s retry


EARLY_STOP = threading.Event()  # set by a SIGTERM/SIGINT that came while the daemon was starting


class Daemon:
    """Everything ``carousel serve`` runs. Construct (checks and opens), then :meth:`run`."""

    def __init__(self, profile: DaemonProfile, parent_fd: int | None = None) -> None:
        self.profile = profile
        self.parent_fd = parent_fd  # a pipe whose other end the parent holds: its EOF stops us
        # This start's identity: an acknowledgement of durability (flush, checkpoint) means
        # something only to a client whose adds went to this same session (docs/protocol.md).
        self.session = secrets.token_hex(16)
        dc = profile.daemon
        self.socket_dir = dc.resolved_socket_dir()
        self.socket_path = os.path.join(self.socket_dir, SOCKET_NAME)
        self._group = allowed_gid(dc.allow_group)
        self.token: bytes | None = None
        self._locks: list[FileLock] = []
        self.served: dict[str, Served] = {}
        self.memories: dict[str, CarouselMemory] = {}
        self._http = None
        self._nofile = raise_fd_limit()
        # Connections before HELLO are capped within the descriptors left once every client has
        # its share, so a flood of them can neither starve clients nor run the daemon out of fds.
        self._max_pending = max(1, min(dc.max_pending, self._nofile - _FD_RESERVE - dc.max_clients * _FDS_PER_CLIENT))
        log.info("file descriptors", extra={"nofile": self._nofile, "max_clients": dc.max_clients,
                                            "max_pending": self._max_pending})
        if self._max_pending < dc.max_pending:
            log.warning("fewer connections before HELLO than daemon.max_pending: RLIMIT_NOFILE is too low",
                        extra={"nofile": self._nofile, "max_pending": self._max_pending})
        try:
            if dc.tcp_address is not None:
                self.token = read_token(dc.token_file)
            prepare_socket_dir(self.socket_dir, self._group)  # an unsafe directory refuses before anything is made
            self._locks.append(FileLock(os.path.join(profile.data_dir(), LOCK_NAME), "data directory"))
            self._locks.append(FileLock(os.path.join(self.socket_dir, SOCKET_NAME + ".lock"), "socket"))
            # Under the lock: the previous start's session, then ours (not clean until we stop cleanly).
            self._session_file = os.path.join(profile.data_dir(), SESSION_NAME)
            self.previous_session = read_session(self._session_file)
            write_session(self._session_file, self.session, clean=False)
            swept = sweep()
            if swept:
                log.info("swept shared memory of dead daemons", extra={"segments": len(swept)})
            free = shm_free_bytes()
            if free < dc.min_free_shm_bytes:
                raise DaemonError(f"{SHM_DIR} has {free} bytes free, less than daemon.min_free_shm_bytes="
                                  f"{dc.min_free_shm_bytes}; give the container more (docker run --shm-size=...)")
            self.metrics = DaemonMetrics(self.memories)
            log.info("opening memories", extra={"memories": list(profile.memories)})
            for name, cfg in profile.memories.items():
                try:
                    mem = off_main_thread(CarouselMemory, cfg)
                except (MemoryError, RuntimeError) as exc:  # torch's allocator: "DefaultCPUAllocator: ..."
                    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
                    raise DaemonError(f"memory {name!r} cannot open: {first}") from exc
                self.memories[name] = mem
                self.served[name] = Served(name, mem)
                log.info("memory open", extra={"memory": name, "em_size": cfg.memory.em_size,
                                               "tiers": [t.kind for t in cfg.tiers],
                                               "recovered": getattr(mem, "recovered", None)})
            self.filler = Filler(self.metrics)  # its doorbell is the daemon's first segment
        except BaseException:
            self._close_memories()
            self._release_locks()
            raise
        self.filler.torch_threads = dc.torch_threads
        self.executor = ThreadPoolExecutor(max_workers=max(4, min(16, dc.max_inflight)),
                                           thread_name_prefix="carousel-op", initializer=set_torch_threads,
                                           initargs=(dc.torch_threads,))
        self.connections: set[Connection] = set()  # every open connection
        self.pending: dict[Connection, None] = {}   # those before HELLO, oldest first
        self.clients: set[Connection] = set()       # those after HELLO: what max_clients limits
        self._log_evicted, self.log_hello_timeout = Throttled(5.0), Throttled(5.0)
        self.ring_ids = iter(range(1, 1 << 62))
        self._segments: dict[str, int] = {}  # name -> bytes, every segment the daemon owns
        self.track_segment(self.filler.doorbell.segment)
        self._stop: asyncio.Event | None = None
        self.ready = threading.Event()

    # -- running --------------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code (0 after a clean shutdown)."""
        # The filler holds the GIL between copies; a shorter switch interval (default 5 ms) keeps
        # socket requests (observe, add) from waiting behind it under load.
        sys.setswitchinterval(5e-4)
        try:
            return asyncio.run(self._main())
        finally:  # also after a failed start (a port in use): no thread, segment or lock left behind
            self.filler.stop()
            self._close_memories()
            self._release_locks()

    async def _main(self) -> int:
        dc = self.profile.daemon
        loop = self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        if self.parent_fd is not None:
            loop.add_reader(self.parent_fd, self._parent_readable)
        if EARLY_STOP.is_set():
            log.info("stop requested while starting")
            self._stop.set()
        self.inflight = asyncio.Semaphore(dc.max_inflight)
        if dc.metrics_address is not None:
            from prometheus_client import start_http_server
            host, port = dc.metrics_address
            try:
                result = start_http_server(port, addr=host, registry=self.metrics.registry)
            except OSError as exc:
                raise DaemonError(f"daemon.metrics {host}:{port}: cannot listen: {exc.strerror or exc}") from None
            self._http = result[0] if isinstance(result, tuple) else None
            log.info("metrics listening", extra={"address": f"{host}:{port}"})
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)  # ours: we hold the socket lock; a dead daemon left it
        old = os.umask(0o177)  # the socket is born 0600: no window in which others may connect
        try:
            unix = await asyncio.start_unix_server(lambda r, w: self._accept(r, w, "unix"), path=self.socket_path,
                                                   limit=1 << 16, backlog=_LISTEN_BACKLOG)
        except OSError as exc:
            raise DaemonError(f"cannot listen on {self.socket_path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old)
        if self._group is not None:
            os.chown(self.socket_path, -1, self._group)
            os.chmod(self.socket_path, 0o660)
        servers = [unix]
        if dc.tcp_address is not None:
            host, port = dc.tcp_address
            try:
                servers.append(await asyncio.start_server(lambda r, w: self._accept(r, w, "tcp"), host, port,
                                                          backlog=_LISTEN_BACKLOG))
            except OSError as exc:
                raise DaemonError(f"daemon.tcp {host}:{port}: cannot listen: {exc.strerror or exc}") from None
            log.info("tcp listening", extra={"address": f"{host}:{port}"})
        self.filler.start()
        log.info("serving", extra={"socket": self.socket_path, "memories": list(self.served), "pid": os.getpid()})
        self.ready.set()
        sd_notify.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {', '.join(self.served)}")
        watchdog = sd_notify.watchdog_period()
        pinger = asyncio.ensure_future(self._watchdog(watchdog)) if watchdog else None
        await self._stop.wait()

        sd_notify.notify("STOPPING=1\nSTATUS=draining")
        if pinger is not None:
            pinger.cancel()
        log.info("shutting down: no new connections, draining requests")
        for s in servers:
            s.close()
        for conn in list(self.connections):
            conn.closing = True
        deadline = loop.time() + 30
        # Busy: a request running, or frames the client sent before the stop still unread (posted
        # adds, whose client is not waiting for a reply): each is served before its connection closes.
        while any(c.busy or (c.authed and not c.pending and c.has_input()) for c in self.connections) \
                and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()
        self.filler.stop()
        for name in list(self._segments):
            self._segments.pop(name, None)
        clean = await loop.run_in_executor(self.executor, self._close_memories)
        self.executor.shutdown(wait=True)
        if clean:  # every memory flushed and checkpointed: our clients' adds are all durable
            try:
                write_session(self._session_file, self.session, clean=True)
            except OSError as exc:  # clients then assume the worst about their unacknowledged adds
                log.warning("cannot record the clean shutdown", extra={"error": repr(exc)})
        if self._http is not None:
            self._http.shutdown()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        log.info("stopped cleanly")
        return 0

    async def _watchdog(self, period: float) -> None:
        """``WATCHDOG=1`` every ``period`` s while the event loop runs and the filler thread lives:
        a wedged loop or a dead filler stops the pings and systemd restarts the daemon."""
        while True:
            if self.filler.is_alive():
                sd_notify.notify("WATCHDOG=1")
            else:
                log.error("filler thread died; withholding the watchdog ping")
            await asyncio.sleep(period)

    def _parent_readable(self) -> None:
        """The parent's end of the pipe: nothing is ever written to it, so readable means it closed
        (the parent exited, cleanly or not): stop as on SIGTERM."""
        try:
            data = os.read(self.parent_fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self.parent_fd)
            log.info("the parent process is gone: shutting down", extra={"ppid": os.getppid()})
            self._stop.set()

    def request_stop(self) -> None:
        """Thread-safe: stop as on SIGTERM (for embedding the daemon in tests or tools)."""
        loop = self._loop
        loop.call_soon_threadsafe(self._stop.set)

    def _close_memories(self) -> bool:
        """Close (drain, flush, checkpoint) every memory; True if all closed cleanly."""
        clean = True
        for name, mem in list(self.memories.items()):
            try:
                mem.close()
                log.info("memory closed", extra={"memory": name, "added": mem._next_id})
            except Exception as exc:  # noqa: BLE001 - close the others anyway
                clean = False
                log.error("memory close failed", extra={"memory": name, "error": repr(exc)})
        self.memories.clear()
        return clean

    def _release_locks(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks.clear()

    # -- connections ------------------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: str) -> None:
        conn = None
        try:
            peer = "tcp"
            if kind == "unix":
                pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
                peer = f"pid {pid} uid {uid}"
                if not peer_allowed(uid, gid, self._group):
                    # Refused before a single byte of theirs is read.
                    self.metrics.refused.labels(reason="uid").inc()
                    log.warning("connection refused: foreign uid", extra={"peer_pid": pid, "peer_uid": uid})
                    await send_error(writer, "auth", f"uid {uid} may not use this daemon")
                    return
            if self._stop.is_set():
                self.metrics.refused.labels(reason="stopping").inc()
                await send_error(writer, "busy", "the daemon is stopping")
                return
            # Not yet a client: max_clients is checked when HELLO completes (Connection.admit), so
            # connections that never say HELLO cannot take the slots of those that do.
            conn = Connection(self, reader, writer, kind, peer)
            self.connections.add(conn)
            self.pending[conn] = None
            if len(self.pending) > self._max_pending:
                self.evict(next(iter(self.pending)))
            self.count_connections()
            await conn.serve()
        except Exception as exc:  # noqa: BLE001 - never "Unhandled exception in client_connected_cb"
            log.error("connection failed", exc_info=True, extra={"kind": kind, "error": repr(exc)[:200]})
        finally:
            if conn is not None:
                self.connections.discard(conn)
                self.pending.pop(conn, None)
                self.clients.discard(conn)
                self.count_connections()
                try:
                    conn.release()
                except Exception as exc:  # noqa: BLE001 - one client's cleanup must not stop the others'
                    log.error("releasing a connection failed", extra={"peer": conn.peer, "error": repr(exc)})
            close_writer(writer)

    def evict(self, conn: Connection) -> None:
        """Close the oldest connection before HELLO to make room for a new one."""
        self.pending.pop(conn, None)
        self.metrics.refused.labels(reason="pending_full").inc()
        self._log_evicted.warning("connection closed before HELLO to make room for a new one",
                                  extra={"peer": conn.peer, "max_pending": self._max_pending})
        conn.closing = True
        send_error_nowait(conn.writer, "busy", f"{self._max_pending} connections wait for HELLO (daemon.max_pending);"
                                               " send HELLO as soon as you connect")
        close_writer(conn.writer)

    def count_connections(self) -> None:
        """The clients and pending connections gauges, after a connection came, went or said HELLO."""
        self.metrics.clients.set(len(self.clients))
        self.metrics.pending.set(len(self.pending))

    def track_segment(self, seg: Segment | None, drop: Segment | None = None) -> None:
        """Count ``seg`` among the segments the daemon owns (and ``drop`` no more): the shm gauges."""
        if drop is not None:
            self._segments.pop(drop.name, None)
        if seg is not None:
            self._segments[seg.name] = seg.size
        self.metrics.shm_segments.set(len(self._segments))
        self.metrics.shm_bytes.set(sum(self._segments.values()))

    # -- status --------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": os.getpid(), "version": __version__, "session": self.session,
                               "socket": self.socket_path,
                               "clients": len(self.clients), "shm_segments": len(self._segments),
                               "shm_bytes": sum(self._segments.values()), "memories": {}}
        for name, served in self.served.items():
            mem = served.memory
            if mem._closed:
                continue
            st = mem.stats()
            st["sample_latency_seconds"] = histogram_quantiles(mem.registry, "carousel_sample_latency_seconds",
                                                                (0.5, 0.9, 0.99))
            out["memories"][name] = st
        return out


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit (at most ``_FD_WANTED``); returns the
    soft limit in force. Every connection, even one that never says HELLO, holds a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _FD_WANTED if hard == resource.RLIM_INFINITY else min(hard, _FD_WANTED)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("cannot raise RLIMIT_NOFILE", extra={"soft": soft, "hard": hard, "error": str(exc)})
    return _FD_WANTED if soft == resource.RLIM_INFINITY else soft

