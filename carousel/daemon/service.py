"""``carousel serve``: the daemon that owns memories and serves them to trainer processes.

One asyncio loop accepts connections on a Unix socket in a private directory (and, optionally,
TCP on loopback with a token), reads framed requests (:mod:`carousel.daemon.wire`) and runs each memory
operation on a small thread pool, so a slow ``add`` under back-pressure never stalls another
client's ``sample``. A filler thread keeps every client's standing sample requests topped up in
shared-memory rings (:mod:`carousel.daemon.shm`): a steady-state ``sample`` on the client is a look at
a ring, with no socket round trip. Metrics of every memory, labelled ``memory``, are served on
``/metrics`` over HTTP on loopback.

Lifecycle: SIGTERM/SIGINT stop accepting, let running requests finish, close the rings, flush
and checkpoint every memory, and exit 0. A lock file in the data directory (and one beside the
socket) stops a second daemon on the same data.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import hmac
import json
import logging
import math
import os
import pwd
import resource
import secrets
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import Metric

from storage_backends import StoreError

from .. import __version__
from ..config import ConfigError
from ..inputs import MemoryInputError, check_count
from ..memory import CarouselMemory
from ..write_behind import WriteBehindError
from . import sd_notify
from . import shm as shm_mod
from . import wire
from .profile import DaemonProfile
from .shm_ring import BatchRing, RingLayout

log = logging.getLogger("carousel.daemon")

SOCKET_NAME = "carousel.sock"
LOCK_NAME = "daemon.lock"
SESSION_NAME = "daemon.session"  # the last start's session id, and whether it shut down cleanly
_PEERCRED = struct.Struct("3i")
_MAX_RINGS_PER_CLIENT = 8
_MAX_RING_ROWS = 1 << 16
_REQUEST_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0, 5.0)
# Before HELLO a connection may only say HELLO, PING or STATUS, none of which carries tensors:
# a peer that has not said who it is (no token yet, on TCP) never makes the daemon buffer more.
_PENDING_FRAME_BYTES = 1 << 16
# File descriptors: a client holds its socket plus one per mapped segment (mmap keeps a dup of
# the descriptor): up to 8 rings and an upload segment. The reserve covers the stores (LMDB,
# Zarr and flat files), the metrics server, logs and the listening sockets.
_FDS_PER_CLIENT = 2 + _MAX_RINGS_PER_CLIENT
_FD_RESERVE = 256
_FD_WANTED = 1 << 16  # the soft RLIMIT_NOFILE the daemon raises itself to (bounded by the hard limit)
_LISTEN_BACKLOG = 1024  # a burst of connections waits in the kernel's queue, not in connect()'s retry


EARLY_STOP = threading.Event()  # set by a SIGTERM/SIGINT that came while the daemon was starting


class DaemonError(RuntimeError):
    """The daemon cannot start: a second daemon, an unsafe socket directory, no shared memory..."""


# ---- logging ----------------------------------------------------------------------------------------
class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg`` and any ``extra=`` fields."""

    _skip = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).strip()
        return json.dumps(out, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger("carousel")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


# ---- locks and the socket directory -------------------------------------------------------------------
class _FileLock:
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


def _allowed_gid(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise DaemonError(f"daemon.allow_group: no group named {name!r}") from None


def prepare_socket_dir(path: str, group_gid: int | None) -> None:
    """Create the socket directory 0700 (0710 with an allowed group), or refuse one that others
    could write to, that another uid owns, or that is a symlink."""
    if not os.path.lexists(path):
        old = os.umask(0o077)
        try:
            os.makedirs(path, mode=0o700)
        finally:
            os.umask(old)
        if group_gid is not None:
            os.chown(path, -1, group_gid)
            os.chmod(path, 0o710)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise DaemonError(f"socket directory {path} is not a directory (or is a symlink); refusing to start")
    if st.st_uid != os.getuid():
        raise DaemonError(f"socket directory {path} is owned by uid {st.st_uid}, not {os.getuid()}; "
                          "refusing to start")
    bad = st.st_mode & (0o077 if group_gid is None or st.st_gid != group_gid else 0o067)
    if bad:
        raise DaemonError(f"socket directory {path} has mode {stat.S_IMODE(st.st_mode):o}: others could reach "
                          f"or replace the socket; make it 0700 (chmod 700 {path}) or remove it")


# ---- metrics --------------------------------------------------------------------------------------------
class _MemoryCollector:
    """Every memory's registry, each sample labelled ``memory=NAME``, as one set of families."""

    def __init__(self, memories: Mapping[str, CarouselMemory]) -> None:
        self._memories = memories

    def collect(self):
        families: dict[str, Metric] = {}
        for name, mem in list(self._memories.items()):
            for fam in mem.registry.collect():
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "memory": name}, s.value, s.timestamp, s.exemplar)
        return list(families.values())


class DaemonMetrics:
    def __init__(self, memories: Mapping[str, CarouselMemory]) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        Info("carousel_build", "carousel version and runtime.", registry=r).info(
            {"version": __version__, "python": ".".join(map(str, sys.version_info[:3]))})
        self.clients = Gauge("carousel_clients", "Connected clients that completed HELLO.", registry=r)
        self.pending = Gauge("carousel_pending_connections",
                             "Connections that have not completed HELLO yet (closed after hello_timeout_s).",
                             registry=r)
        self.requests = Counter("carousel_requests_total", "Requests by op and result.", ["op", "result"],
                                registry=r)
        # reason: uid, token, busy, stopping, hello_timeout (no HELLO in time), pending_full (the
        # oldest connection before HELLO, closed to make room for a new one)
        self.refused = Counter("carousel_connections_refused_total", "Connections refused.", ["reason"],
                               registry=r)
        self.protocol_errors = Counter("carousel_protocol_errors_total", "Frames that broke the protocol.",
                                       registry=r)
        self.latency = Histogram("carousel_request_latency_seconds", "Request latency in the daemon.", ["op"],
                                 buckets=_REQUEST_BUCKETS, registry=r)
        self.shm_segments = Gauge("carousel_shm_segments", "Shared-memory segments owned by the daemon.",
                                  registry=r)
        self.shm_bytes = Gauge("carousel_shm_bytes", "Bytes of shared memory owned by the daemon.", registry=r)
        self.ring_batches = Counter("carousel_ring_batches_total", "Batches placed in shared-memory rings.",
                                    registry=r)
        r.register(_MemoryCollector(memories))


# ---- served memories, rings and the filler ---------------------------------------------------------------
class Served:
    """One named memory and what the daemon keeps beside it."""

    def __init__(self, name: str, memory: CarouselMemory) -> None:
        self.name, self.memory = name, memory
        self.write_lock = threading.Lock()  # add / observe / checkpoint: one at a time per memory
        self.epoch = 0                      # bumped by every add: rings drop short batches made before it

    def schema(self) -> dict[str, Any]:
        """The fields ``add`` takes (a saliency memory's map included)."""
        return {name: [list(shape), dtype] for name, (shape, dtype) in self.memory.input_fields.items()}


class Filler(threading.Thread):
    """Keeps every ring's FREE slots filled with fresh batches, so clients never wait on a socket."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        super().__init__(name="carousel-ring-filler", daemon=True)
        self.lock = threading.Lock()  # guards ``rings`` and every ring's segment while it is written
        self.rings: dict[int, tuple[Served, BatchRing, dict]] = {}
        self._halt = threading.Event()
        self.doorbell = shm_mod.Doorbell.create()  # rung by clients handing slots back, and by us
        self._metrics = metrics
        self._logged = 0.0
        self.torch_threads = 1
        self.last_error: BaseException | None = None

    def add(self, ring_id: int, served: Served, ring: BatchRing, filters: dict) -> None:
        with self.lock:
            self.rings[ring_id] = (served, ring, filters)
        self.doorbell.ring()

    def remove(self, ring_id: int) -> None:
        with self.lock:
            entry = self.rings.pop(ring_id, None)
            if entry is not None:
                entry[1].close()

    def wake(self) -> None:
        self.doorbell.ring()

    def added(self, served: Served) -> None:
        """``served`` got new samples: its rings' short batches are stale from now on."""
        with self.lock:
            for owner, ring, _ in self.rings.values():
                if owner is served:
                    ring.set_epoch(served.epoch)
        self.doorbell.ring()

    def _failed(self, served: Served, exc: Exception) -> None:
        # Logged when the error changes or every 10 s, not on every pass.
        now = time.monotonic()
        if repr(exc) != repr(self.last_error) or now - self._logged > 10:
            log.warning("ring fill failed", extra={"memory": served.name, "error": repr(exc)})
            self._logged = now
        self.last_error = exc

    def run(self) -> None:
        _set_torch_threads(self.torch_threads)
        idle = 5e-5
        while not self._halt.is_set():
            seen = self.doorbell.value()
            work = 0
            with self.lock:
                for served, ring, filters in list(self.rings.values()):
                    if served.memory._closed:
                        continue
                    for slot in ring.free_slots():
                        epoch = served.epoch  # read first: a batch is never newer than its label
                        try:
                            rows = served.memory.sample_into(ring.layout.n, ring.outs[slot], **filters)
                        except Exception as exc:  # noqa: BLE001 - a broken memory must not stop the others
                            self._failed(served, exc)
                            break
                        # Empty or short batches are published too (labelled with the epoch they
                        # saw): a client takes them at once, and hands them back after an add.
                        ring.publish(int(slot), rows, epoch)
                        self._metrics.ring_batches.inc()
                        work += 1
            if work:
                idle = 5e-5  # torch's copies release the GIL: the loop and the engine get their turns
            else:
                # Asleep until a client hands a slot back (it rings the doorbell) or a ring or a
                # sample arrives; the timeout only bounds what a client without futexes costs.
                self.doorbell.wait(seen, idle)
                idle = min(idle * 2, 0.05)

    def stop(self) -> None:
        self._halt.set()
        self.doorbell.ring()
        if self.is_alive():
            self.join(timeout=10)
        with self.lock:
            for _, ring, _ in self.rings.values():
                ring.close()
            self.rings.clear()
        self.doorbell.close()


# ---- the daemon -----------------------------------------------------------------------------------------
class Daemon:
    """Everything ``carousel serve`` runs. Construct (checks and opens), then :meth:`run`."""

    def __init__(self, profile: DaemonProfile) -> None:
        self.profile = profile
        # This start's identity: an acknowledgement of durability (flush, checkpoint) means
        # something only to a client whose adds went to this same session (docs/protocol.md).
        self.session = secrets.token_hex(16)
        dc = profile.daemon
        self.socket_dir = dc.resolved_socket_dir()
        self.socket_path = os.path.join(self.socket_dir, SOCKET_NAME)
        self._group = _allowed_gid(dc.allow_group)
        self._token: bytes | None = None
        self._locks: list[_FileLock] = []
        self.served: dict[str, Served] = {}
        self.memories: dict[str, CarouselMemory] = {}
        self._http = None
        self._nofile = _raise_fd_limit()
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
                self._token = _read_token(dc.token_file)
            prepare_socket_dir(self.socket_dir, self._group)  # an unsafe directory refuses before anything is made
            self._locks.append(_FileLock(os.path.join(profile.data_dir(), LOCK_NAME), "data directory"))
            self._locks.append(_FileLock(os.path.join(self.socket_dir, SOCKET_NAME + ".lock"), "socket"))
            # Under the lock: the previous start's session, then ours (not clean until we stop cleanly).
            self._session_file = os.path.join(profile.data_dir(), SESSION_NAME)
            self.previous_session = _read_session(self._session_file)
            _write_session(self._session_file, self.session, clean=False)
            swept = shm_mod.sweep()
            if swept:
                log.info("swept shared memory of dead daemons", extra={"segments": len(swept)})
            free = shm_mod.shm_free_bytes()
            if free < dc.min_free_shm_bytes:
                raise DaemonError(f"{shm_mod.SHM_DIR} has {free} bytes free, less than daemon.min_free_shm_bytes="
                                  f"{dc.min_free_shm_bytes}; give the container more (docker run --shm-size=...)")
            self.metrics = DaemonMetrics(self.memories)
            log.info("opening memories", extra={"memories": list(profile.memories)})
            for name, cfg in profile.memories.items():
                try:
                    mem = _off_main_thread(CarouselMemory, cfg)
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
        self._executor = ThreadPoolExecutor(max_workers=max(4, min(16, dc.max_inflight)),
                                            thread_name_prefix="carousel-op", initializer=_set_torch_threads,
                                            initargs=(dc.torch_threads,))
        self._connections: set[_Connection] = set()  # every open connection
        self._pending: dict[_Connection, None] = {}   # those before HELLO, oldest first
        self._clients: set[_Connection] = set()       # those after HELLO: what max_clients limits
        self._log_evicted, self._log_hello_timeout = _Throttled(5.0), _Throttled(5.0)
        self._ring_ids = iter(range(1, 1 << 62))
        self._segments: dict[str, int] = {}  # name -> bytes, every segment the daemon owns
        self._track_segment(self.filler.doorbell.segment)
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
        if EARLY_STOP.is_set():
            log.info("stop requested while starting")
            self._stop.set()
        self._inflight = asyncio.Semaphore(dc.max_inflight)
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
        for conn in list(self._connections):
            conn.closing = True
        deadline = loop.time() + 30
        while any(c.busy for c in self._connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.abort()
        self.filler.stop()
        for name in list(self._segments):
            self._segments.pop(name, None)
        clean = await loop.run_in_executor(self._executor, self._close_memories)
        self._executor.shutdown(wait=True)
        if clean:  # every memory flushed and checkpointed: our clients' adds are all durable
            try:
                _write_session(self._session_file, self.session, clean=True)
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
                sock = writer.get_extra_info("socket")
                pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 _PEERCRED.size))
                peer = f"pid {pid} uid {uid}"
                if not self._peer_allowed(uid, gid):
                    # Refused before a single byte of theirs is read.
                    self.metrics.refused.labels(reason="uid").inc()
                    log.warning("connection refused: foreign uid", extra={"peer_pid": pid, "peer_uid": uid})
                    await _send_error(writer, "auth", f"uid {uid} may not use this daemon")
                    return
            if self._stop.is_set():
                self.metrics.refused.labels(reason="stopping").inc()
                await _send_error(writer, "busy", "the daemon is stopping")
                return
            # Not yet a client: max_clients is checked when HELLO completes (_Connection._admit), so
            # connections that never say HELLO cannot take the slots of those that do.
            conn = _Connection(self, reader, writer, kind, peer)
            self._connections.add(conn)
            self._pending[conn] = None
            if len(self._pending) > self._max_pending:
                self._evict(next(iter(self._pending)))
            self._count_connections()
            await conn.serve()
        except Exception as exc:  # noqa: BLE001 - never "Unhandled exception in client_connected_cb"
            log.error("connection failed", exc_info=True, extra={"kind": kind, "error": repr(exc)[:200]})
        finally:
            if conn is not None:
                self._connections.discard(conn)
                self._pending.pop(conn, None)
                self._clients.discard(conn)
                self._count_connections()
                try:
                    conn.release()
                except Exception as exc:  # noqa: BLE001 - one client's cleanup must not stop the others'
                    log.error("releasing a connection failed", extra={"peer": conn.peer, "error": repr(exc)})
            _close(writer)

    def _evict(self, conn: _Connection) -> None:
        """Close the oldest connection before HELLO to make room for a new one."""
        self._pending.pop(conn, None)
        self.metrics.refused.labels(reason="pending_full").inc()
        self._log_evicted.warning("connection closed before HELLO to make room for a new one",
                                  extra={"peer": conn.peer, "max_pending": self._max_pending})
        conn.closing = True
        _send_error_nowait(conn.writer, "busy", f"{self._max_pending} connections wait for HELLO (daemon.max_pending);"
                                                " send HELLO as soon as you connect")
        _close(conn.writer)

    def _count_connections(self) -> None:
        self.metrics.clients.set(len(self._clients))
        self.metrics.pending.set(len(self._pending))

    def _peer_allowed(self, uid: int, gid: int) -> bool:
        if uid == os.getuid():
            return True
        if self._group is None:
            return False
        if gid == self._group:
            return True
        try:
            return pwd.getpwuid(uid).pw_name in grp.getgrgid(self._group).gr_mem
        except KeyError:
            return False

    def _track_segment(self, seg: shm_mod.Segment | None, drop: shm_mod.Segment | None = None) -> None:
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
                               "clients": len(self._clients), "shm_segments": len(self._segments),
                               "shm_bytes": sum(self._segments.values()), "memories": {}}
        for name, served in self.served.items():
            mem = served.memory
            if mem._closed:
                continue
            st = mem.stats()
            st["sample_latency_seconds"] = _histogram_quantiles(mem.registry, "carousel_sample_latency_seconds",
                                                                (0.5, 0.9, 0.99))
            out["memories"][name] = st
        return out


def _read_session(path: str) -> dict[str, Any]:
    """The previous start's ``{"session", "clean"}`` (empty if none, or unreadable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_session(path: str, session: str, clean: bool) -> None:
    """Replace the session file atomically and durably: a crash leaves the old one or the new one."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps({"session": session, "clean": clean}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _set_torch_threads(n: int) -> None:
    """Intra-op threads for torch ops run by the calling thread (OpenMP keeps this per thread)."""
    import torch
    torch.set_num_threads(n)


def _off_main_thread(fn, *args):
    """Run ``fn`` in a short-lived thread. With GNU OpenMP (torch's CPU build), once the main
    thread has run a parallel op, parallel ops from any other thread run at half speed here (the
    ring filler's batch copy: 24 us instead of 15). So the daemon keeps torch off its main thread."""
    box: list = []

    def run() -> None:
        try:
            box.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box.append((False, exc))
    t = threading.Thread(target=run, name="carousel-open")
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _histogram_quantiles(registry: CollectorRegistry, name: str, qs) -> dict[str, float]:
    """Quantiles of a histogram, interpolated within buckets as PromQL's ``histogram_quantile``."""
    buckets = []
    for fam in registry.collect():
        if fam.name == name:
            buckets = sorted((float(s.labels["le"]), s.value) for s in fam.samples if s.name == name + "_bucket")
    out = {}
    total = buckets[-1][1] if buckets else 0
    for q in qs:
        key = f"p{round(q * 100)}"
        if not total:
            out[key] = math.nan
            continue
        rank, prev_le, prev_c = q * total, 0.0, 0.0
        for le, c in buckets:
            if c >= rank:
                out[key] = le if math.isinf(le) else prev_le + (le - prev_le) * ((rank - prev_c) / max(c - prev_c, 1e-12))
                if math.isinf(le):
                    out[key] = prev_le
                break
            prev_le, prev_c = le, c
    return out


def _read_token(path: str | None) -> bytes:
    if path is None:
        raise DaemonError("daemon.tcp needs daemon.token_file")
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise DaemonError(f"daemon.token_file {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise DaemonError(f"daemon.token_file {path} has mode {stat.S_IMODE(st.st_mode):o}; make it 0600")
    if len(token) < 16:
        raise DaemonError(f"daemon.token_file {path}: the token must be at least 16 bytes")
    return token


async def _send_error(writer: asyncio.StreamWriter, kind: str, message: str) -> None:
    if writer.is_closing():
        return
    try:
        writer.writelines(wire.encode(wire.Op.ERROR, {"error": kind, "message": message}))
        await asyncio.wait_for(writer.drain(), 1.0)
    except (ConnectionError, asyncio.TimeoutError, OSError):
        pass


def _send_error_nowait(writer: asyncio.StreamWriter, kind: str, message: str) -> None:
    """An ERROR frame handed to the transport without waiting for the peer to take it."""
    if not writer.is_closing():
        try:
            writer.writelines(wire.encode(wire.Op.ERROR, {"error": kind, "message": message}))
        except (ConnectionError, OSError):
            pass


def _close(writer: asyncio.StreamWriter) -> None:
    """Close a connection, and abort it a second later if it still holds unsent bytes: a transport
    waits for its buffer to drain before it closes, so a peer that never reads would otherwise
    keep it (and its file descriptor) forever. Aborting a closed transport does nothing."""
    if not writer.is_closing():
        writer.close()
    asyncio.get_running_loop().call_later(1.0, writer.transport.abort)


def _raise_fd_limit() -> int:
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


class _Throttled:
    """A warning for events that come in floods (a thousand idle connections timing out at once):
    at most one line per ``every_s``, saying how many were left out since the last; the metrics
    count every one."""

    def __init__(self, every_s: float) -> None:
        self._every, self._last, self._left_out = every_s, -math.inf, 0

    def warning(self, msg: str, extra: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last < self._every:
            self._left_out += 1
            return
        log.warning(msg, extra={**extra, "not_logged_since_last": self._left_out})
        self._last, self._left_out = now, 0


_ERROR_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (MemoryInputError, "input"), (ConfigError, "input"), (KeyError, "input"), (ValueError, "input"),
    (TypeError, "input"), (StoreError, "store"), (WriteBehindError, "store"), (shm_mod.ShmError, "shm"),
    (TimeoutError, "timeout"), (OSError, "io"))


class _RequestError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Connection:
    """One client: reads frames, runs them in order, owns the client's rings and upload segment."""

    def __init__(self, daemon: Daemon, reader, writer, kind: str, peer: str) -> None:
        self.d, self.reader, self.writer, self.kind, self.peer = daemon, reader, writer, kind, peer
        self.served: Served | None = None
        self.authed = kind == "unix"
        # Before HELLO: not a client yet (no max_clients slot), frames of at most _PENDING_FRAME_BYTES,
        # and closed at this deadline (the token, on TCP, travels in HELLO).
        self.pending = True
        self.hello_deadline = asyncio.get_running_loop().time() + daemon.profile.daemon.hello_timeout_s
        self.rings: list[int] = []
        self.ring_keys: dict[tuple, int] = {}
        self.upload: shm_mod.Segment | None = None
        self.busy = False
        self.closing = False

    async def serve(self) -> None:
        """Read and answer frames until the client leaves or breaks the protocol. Whatever goes
        wrong ends in an ERROR frame (or a documented close), a counter and one log line."""
        try:
            await self._serve()
        except Exception as exc:  # noqa: BLE001 - a bug here must cost this connection only, visibly once
            self.d.metrics.protocol_errors.inc()
            log.error("connection failed; closing", exc_info=True, extra={"peer": self.peer, "error": repr(exc)[:200]})
            await _send_error(self.writer, "internal", f"the daemon failed on this connection ({type(exc).__name__})"
                                                       "; reconnect")

    async def _serve(self) -> None:
        dc = self.d.profile.daemon
        while not self.closing:
            hello_due = asyncio.timeout_at(self.hello_deadline) if self.pending else contextlib.nullcontext()
            try:
                async with hello_due:
                    frame = await self._read_frame(dc.max_frame_bytes, dc.read_timeout_s)
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the client went away
            except TimeoutError:
                if self.pending and hello_due.expired():
                    self.d.metrics.refused.labels(reason="hello_timeout").inc()
                    self.d._log_hello_timeout.warning("connection closed: no HELLO within daemon.hello_timeout_s",
                                                      extra={"peer": self.peer, "hello_timeout_s": dc.hello_timeout_s})
                    await _send_error(self.writer, "timeout", f"no HELLO within hello_timeout_s={dc.hello_timeout_s}")
                    return
                log.warning("half-sent frame timed out; closing", extra={"peer": self.peer})
                self.d.metrics.protocol_errors.inc()
                return
            except wire.ProtocolError as exc:
                self._protocol_error(exc)
                await _send_error(self.writer, "protocol", str(exc))
                return
            if frame is None:
                return
            op, meta, payload = frame
            self.busy = True
            try:
                if not await self._handle(op, meta, payload):
                    return
            finally:
                self.busy = False

    def _protocol_error(self, exc: wire.ProtocolError, op: str | None = None) -> None:
        """Count and log (one line) a frame that broke the protocol; the connection then closes."""
        self.d.metrics.protocol_errors.inc()
        log.warning("protocol error; closing", extra={"peer": self.peer, "op": op, "error": str(exc)[:300]})

    async def _read_frame(self, max_bytes: int, timeout: float):
        # A client may wait as long as it likes between frames (before HELLO, serve() bounds the wait).
        first = await self.reader.read(1)
        if not first:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout  # the whole frame, once begun, within read_timeout_s
        rest = await asyncio.wait_for(self.reader.readexactly(wire.HEADER.size - 1), timeout)
        head = first + rest
        op, meta_len, payload_len, crc = wire.parse_header(head, max_bytes)  # before any body is read
        if self.pending and meta_len + payload_len > _PENDING_FRAME_BYTES:
            raise wire.ProtocolError(f"a frame before HELLO carries at most {_PENDING_FRAME_BYTES} bytes, this one "
                                     f"{meta_len + payload_len}; send HELLO first")
        body = await asyncio.wait_for(self.reader.readexactly(meta_len + payload_len),
                                      max(deadline - loop.time(), 0.0)) if meta_len + payload_len else b""
        meta_raw, payload = body[:meta_len], memoryview(body)[meta_len:]
        if wire.crc_of(head, meta_raw, payload) != crc:
            raise wire.ProtocolError("checksum mismatch: the frame was damaged or is not a carousel frame")
        meta = wire.decode_meta(meta_raw)
        # Upload-segment tensors live in shared memory, not the payload: bounded in _tensors.
        specs = wire.tensor_specs(meta, None if meta.get("upload") is True and not len(payload) else len(payload))
        return op, meta, (specs, payload)

    async def _handle(self, op: int, meta: dict, payload) -> bool:
        """Run one request and reply; False closes the connection."""
        name = wire.Op(op).name.lower()
        t0 = time.perf_counter()
        if not self.authed:
            if op != wire.Op.HELLO or not self._token_ok(meta.get("token")):
                self.d.metrics.refused.labels(reason="token").inc()
                log.warning("tcp client without a valid token; closing", extra={"peer": self.peer})
                await _send_error(self.writer, "auth", "a valid token must be sent in HELLO first")
                return False
        try:
            async with self.d._inflight:
                reply_meta, tensors = await self._dispatch(op, meta, payload)
            if op == wire.Op.HELLO and self.pending:
                self._admit()  # no await since the check: two HELLOs cannot both take the last slot
            frame = wire.encode(wire.Op.OK, reply_meta, tensors)
            result = "ok"
        except wire.ProtocolError as exc:
            self._protocol_error(exc, name)
            await _send_error(self.writer, "protocol", str(exc))
            self.d.metrics.requests.labels(op=name, result="protocol").inc()
            return False
        except _RequestError as exc:
            frame, result = wire.encode(wire.Op.ERROR, {"error": exc.kind, "message": str(exc)}), exc.kind
        except Exception as exc:  # noqa: BLE001 - one request's failure must not take the daemon down
            kind = next((k for t, k in _ERROR_KINDS if isinstance(exc, t)), "internal")
            if kind == "internal":
                log.error("request failed", exc_info=True, extra={"op": name, "peer": self.peer})
            # The class travels by name: the client raises the same class with the same text as
            # the in-process memory would (MemoryInputError, TimeoutError, a StoreError...).
            frame = wire.encode(wire.Op.ERROR, {"error": kind, "type": type(exc).__name__,
                                                "message": str(exc) or repr(exc)})
            result = kind
        self.d.metrics.requests.labels(op=name, result=result).inc()
        self.d.metrics.latency.labels(op=name).observe(time.perf_counter() - t0)
        try:
            self.writer.writelines(frame)
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        # A HELLO refused for want of a client slot closes the connection (docs/protocol.md).
        return not (op == wire.Op.HELLO and self.pending and result == "busy")

    def _admit(self) -> None:
        """HELLO completed: the connection becomes a client, if ``max_clients`` leaves room."""
        d = self.d
        limit = d.profile.daemon.max_clients
        if self.closing:  # closed meanwhile to make room for a newer connection (Daemon._evict)
            raise _RequestError("busy", "this connection was closed before its HELLO was served; reconnect")
        if len(d._clients) >= limit:
            d.metrics.refused.labels(reason="busy").inc()
            raise _RequestError("busy", f"too many clients (max_clients={limit})")
        self.pending = False
        d._pending.pop(self, None)
        d._clients.add(self)
        d._count_connections()

    def _token_ok(self, token: Any) -> bool:
        # surrogatepass: JSON may carry a lone surrogate ("\ud800"), which strict UTF-8 cannot encode.
        return isinstance(token, str) and self.d._token is not None and \
            hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self.d._token)

    def _memory(self) -> Served:
        if self.served is None:
            raise wire.ProtocolError("send HELLO (choosing a memory) first")
        if self.served.memory._closed:
            raise _RequestError("closed", f"memory {self.served.name!r} is closed")
        return self.served

    async def _run(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.d._executor, lambda: fn(*args, **kwargs))

    async def _dispatch(self, op: int, meta: dict, payload) -> tuple[dict, list]:
        specs, raw = payload
        if op >= wire.Op.OK:
            raise wire.ProtocolError(f"{wire.Op(op).name} is a reply, not a request")
        if op == wire.Op.HELLO:
            name = meta.get("memory", "default")
            if not isinstance(name, str) or name not in self.d.served:  # (a list is not even hashable)
                raise _RequestError("unknown_memory", f"no memory named {str(name)[:64]!r}; "
                                                      f"this daemon serves {sorted(self.d.served)}")
            self.served = self.d.served[name]
            self.authed = True
            mem = self.served.memory
            mc = mem.config.memory
            prev = self.d.previous_session
            return {"memory": name, "schema": self.served.schema(), "em_size": mc.em_size, "kind": mc.kind,
                    "max_label": mc.max_label, "session": self.d.session,
                    # The integrity mode: batches carry their references and the client checks them.
                    "verify": None if mem.verifier is None else mem.verifier.to_json(),
                    "deterministic": mem.config.swap.deterministic,
                    "previous_session": prev.get("session"), "previous_clean": prev.get("clean") is True,
                    "daemon_pid": os.getpid(), "version": __version__, "shm": self.kind == "unix"}, []
        if op == wire.Op.PING:
            return {}, []
        if op == wire.Op.STATUS:
            return wire.json_safe(await self._run(self.d.status)), []
        served = self._memory()
        mem = served.memory
        if meta.get("ticks") is not None:
            await self._end_steps(served, meta["ticks"])
        if op in (wire.Op.FLUSH, wire.Op.CHECKPOINT, wire.Op.RETAIN):
            self._check_session(meta)
        if op == wire.Op.SAMPLE:
            n, filters = _sample_args(meta, mem)
            seed = meta.get("seed")
            seed = None if seed is None else check_count(seed, "seed")
            # Unchecked here: in the integrity mode the references travel with the batch and the
            # client checks it, after the transport.
            batch, refs = await self._run(mem.sample_with_references, n, seed=seed, **filters)
            tensors = [("id", batch.ids.numpy()), ("x", batch.x.numpy()), ("y", batch.y.numpy()),
                       ("task", batch.task.numpy())] + [(k, v.numpy()) for k, v in batch.extras.items()]
            return {}, tensors + list((refs or {}).items())
        if op == wire.Op.ADD:
            x, y, task, extras = _add_arguments(self._tensors(specs, raw, meta.get("upload", False)))

            def add():
                with served.write_lock:  # the memory checks every field, as in-process
                    ids = mem.add(x, y, task, **extras)
                    served.epoch = (served.epoch + 1) & 0xFFFFFFFF
                    self.d.filler.added(served)
                return ids
            ids = await self._run(add)
            return {}, [("ids", ids.numpy())]
        if op == wire.Op.OBSERVE:
            arrays = wire.split_tensors(specs, raw)
            if "ids" not in arrays or set(arrays) - {"ids", "logits", "loss"}:
                raise MemoryInputError(f"observe takes the tensors ids, logits?, loss?; got {sorted(arrays)}")

            def observe():
                with served.write_lock:
                    mem.observe(arrays["ids"], logits=arrays.get("logits"), loss=arrays.get("loss"))
            await self._run(observe)
            return {}, []
        if op == wire.Op.RETAIN:
            arrays = wire.split_tensors(specs, raw)
            if set(arrays) != {"ids", "weights"}:
                raise MemoryInputError(f"retain takes the tensors ids and weights; got {sorted(arrays)}")
            classes = _int_list(meta, "classes")

            def retain():
                with served.write_lock:
                    out = mem.retain(arrays["ids"], arrays["weights"], classes=classes)
                    # Ring batches drawn before hold the old selection: stale from now on.
                    served.epoch = (served.epoch + 1) & 0xFFFFFFFF
                    self.d.filler.added(served)
                return out
            return await self._run(retain), []
        if op == wire.Op.STATS:
            return wire.json_safe(await self._run(mem.stats)), []
        if op == wire.Op.CHECKPOINT:
            def checkpoint():
                with served.write_lock:
                    mem.checkpoint()
            await self._run(checkpoint)
            return {}, []
        if op == wire.Op.FLUSH:
            timeout = meta.get("timeout_s", 60.0)
            if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 3600:
                raise _RequestError("input", f"timeout_s must be in (0, 3600], got {timeout!r}")
            await self._run(mem.flush, float(timeout))
            return {}, []
        if op == wire.Op.SUBSCRIBE:
            if self.kind != "unix":
                raise _RequestError("input", "shared-memory rings need the Unix socket (same host)")
            if mem.config.swap.deterministic:
                # A ring is filled ahead, at the filler's pace: what it holds would depend on timing.
                raise _RequestError("input", "a deterministic memory draws each batch when asked (SAMPLE): no rings")
            n, filters = _sample_args(meta, mem)
            key = (n, json.dumps(filters, sort_keys=True, default=list))
            if key in self.ring_keys:
                ring_id = self.ring_keys[key]
                ring = self.d.filler.rings[ring_id][1]
            else:
                if len(self.rings) >= _MAX_RINGS_PER_CLIENT:
                    raise _RequestError("busy", f"at most {_MAX_RINGS_PER_CLIENT} standing sample requests "
                                                "per client")
                if not 1 <= n <= _MAX_RING_ROWS:
                    raise _RequestError("input", f"n must be in [1, {_MAX_RING_ROWS}] for a ring, got {n}")
                # In the integrity mode every slot also has the reference columns, which the
                # filler's sample_into fills and the client checks.
                columns = {} if mem.verifier is None else mem.verifier.columns
                layout = RingLayout.plan(n, self.d.profile.daemon.ring_slots, {**mem.fields, **columns})
                if layout.size > max(self.d.profile.daemon.max_frame_bytes * 4, 1 << 26):
                    raise _RequestError("input", f"a ring of {layout.size} bytes is too large; sample fewer rows")
                ring = BatchRing(layout, key)
                ring.set_epoch(served.epoch)
                ring_id = next(self.d._ring_ids)
                self.rings.append(ring_id)
                self.ring_keys[key] = ring_id
                self.d._track_segment(ring.segment)
                self.d.filler.add(ring_id, served, ring, filters)
            return {"ring": ring_id, "segment": ring.segment.name, "layout": ring.layout.to_json(),
                    "doorbell": self.d.filler.doorbell.segment.name}, []
        if op == wire.Op.UNSUBSCRIBE:
            ring_id = meta.get("ring")
            if ring_id not in self.rings:
                raise _RequestError("input", f"no ring {str(ring_id)[:32]} on this connection")
            self._drop_ring(ring_id)
            return {}, []
        if op == wire.Op.UPLOAD:
            if self.kind != "unix":
                raise _RequestError("input", "upload segments need the Unix socket (same host)")
            nbytes = meta.get("nbytes")
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or \
                    not 0 < nbytes <= self.d.profile.daemon.max_frame_bytes:
                raise _RequestError("input", f"nbytes must be in [1, max_frame_bytes="
                                             f"{self.d.profile.daemon.max_frame_bytes}], got {str(nbytes)[:32]}")
            if self.upload is None or self.upload.size < nbytes:
                old = self.upload
                self.upload = shm_mod.Segment.create(nbytes)
                self.d._track_segment(self.upload, drop=old)
                if old is not None:
                    old.close()
            return {"segment": self.upload.name, "size": self.upload.size}, []
        raise wire.ProtocolError(f"op {wire.Op(op).name} is not a request")

    async def _end_steps(self, served: Served, ticks: Any) -> None:
        """Step ends the client counted since its last request (``end_step()`` costs the client no
        round trip: it travels with the next request), applied before that request."""
        if not isinstance(ticks, int) or isinstance(ticks, bool) or not 1 <= ticks <= 1 << 20:
            raise MemoryInputError(f"ticks must be an int in [1, {1 << 20}], got {str(ticks)[:32]}")

        def end_steps() -> None:
            with served.write_lock:
                for _ in range(ticks):
                    served.memory.end_step()
        await self._run(end_steps)

    def _check_session(self, meta: Mapping[str, Any]) -> None:
        """A request that acknowledges earlier writes (flush, checkpoint, retain) names the session
        its client's adds went to; another session (a restarted daemon) never saw them."""
        want = meta.get("session")
        if want is not None and want != self.d.session:
            raise _RequestError("session", f"this daemon is session {self.d.session}, not {str(want)[:32]}: it "
                                           "restarted since your adds, so it cannot acknowledge them")

    def _tensors(self, specs, raw, upload: Any) -> dict[str, np.ndarray]:
        if upload is True:
            if self.upload is None:
                raise _RequestError("input", "ADD from the upload segment before UPLOAD")
            if len(raw):
                raise _RequestError("input", "ADD from the upload segment carries no payload")
            total = sum(s[3] for s in specs)
            if total > self.upload.size:
                raise _RequestError("input", f"tensors of {total} bytes overrun the {self.upload.size}-byte "
                                             "upload segment")
            # A copy: the client may overwrite its segment with the next batch as soon as we reply.
            return {k: v.copy() for k, v in wire.split_tensors(specs, self.upload.map[:total]).items()}
        if upload is not False:
            raise _RequestError("input", "'upload' must be true or false")
        return wire.split_tensors(specs, raw)

    def _drop_ring(self, ring_id: int) -> None:
        entry = self.d.filler.rings.get(ring_id)
        if entry is not None:
            self.d._track_segment(None, drop=entry[1].segment)
        self.d.filler.remove(ring_id)
        self.rings.remove(ring_id)
        self.ring_keys = {k: v for k, v in self.ring_keys.items() if v != ring_id}

    def abort(self) -> None:
        self.closing = True
        self.writer.close()

    def release(self) -> None:
        """The client is gone: reclaim its rings and upload segment (unlinked from /dev/shm)."""
        for ring_id in list(self.rings):
            self._drop_ring(ring_id)
        if self.upload is not None:
            self.d._track_segment(None, drop=self.upload)
            self.upload.close()
            self.upload = None
        _close(self.writer)


def _sample_args(meta: Mapping[str, Any], mem: CarouselMemory) -> tuple[int, dict]:
    """``n`` and the filters of a SAMPLE or SUBSCRIBE. As in-process, ``n`` may exceed what the EM
    holds (the batch is then all there is); it is clamped to ``em_size``, so a ring is never
    larger than the EM."""
    n = check_count(meta.get("n"))
    n = min(n, mem.config.memory.em_size)
    filters: dict[str, Any] = {}
    for key in ("classes", "tasks"):
        value = _int_list(meta, key)
        if value is not None:
            filters[key] = value
    balanced = meta.get("balanced", False)
    if not isinstance(balanced, bool):
        raise _RequestError("input", "balanced must be true or false")
    if balanced:
        filters["balanced"] = True
    return n, filters


def _add_arguments(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """An ADD's tensors as ``add(x, y, task, **extras)``'s arguments; the memory checks them."""
    missing = [k for k in ("x", "y", "task") if k not in arrays]
    if missing:
        raise MemoryInputError(f"add needs the tensors x, y and task; missing {missing}")
    return arrays["x"], arrays["y"], arrays["task"], {k: v for k, v in arrays.items() if k not in ("x", "y", "task")}


def _int_list(meta: Mapping[str, Any], key: str) -> list[int] | None:
    """A metadata list of ints (``classes``, ``tasks``), or None when absent."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > 1 << 16 or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise MemoryInputError(f"{key} must be integers, got {type(value).__name__}")
    return value
