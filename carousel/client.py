"""The client of a carousel daemon: the same ``add / sample / observe / stats / close`` as
:class:`~carousel.CarouselMemory`, plus ``checkpoint`` and ``flush``.

Example (needs a running daemon, so not a doctest)::

    mem = carousel.connect()
    ids = mem.add(x_uint8, y, task=0)
    batch = mem.sample(256)
    mem.observe(batch.ids, logits=model(batch.x))

Over the Unix socket, ``sample(n)`` subscribes once to a shared-memory ring that the daemon keeps
filled with ready batches; afterwards a sample is a look into that ring, no socket round trip, and
the batch's tensors view the ring directly (no copy). The slot goes back to the daemon when the
last of those tensors is freed, so a batch stays valid for as long as you hold it. When no batch
is ready (or for a seeded draw, or over TCP) the request goes over the socket instead.
Large ``add`` batches travel through an upload segment the same way, the other direction.

The client is thread-safe, reconnects after a daemon restart, and is fork-aware: in a child
process (a ``DataLoader`` worker) it opens its own connection. ``add`` is not retried after a
connection dropped mid-request (it might have been applied); every other request is, once.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import wire
from .batch import Batch
from .daemon_config import default_socket_dir
from .shm import Doorbell, RingLayout, RingReader, Segment, ShmError

__all__ = ["MemoryClient", "connect", "default_socket_path"]

_INLINE_ADD_BYTES = 1 << 16  # smaller adds travel inline: one copy is cheaper than a segment round trip
_RING_WAIT_S = 0.005         # how long sample() waits for the filler before asking over the socket


def default_socket_path() -> str:
    return os.path.join(default_socket_dir(), "carousel.sock")


def connect(socket_path: str | None = None, memory: str = "default", *, token: str | None = None,
            timeout_s: float = 30.0, reconnect_s: float = 30.0, use_shm: bool = True) -> MemoryClient:
    """Connect to a daemon. ``socket_path`` is a Unix socket path (default
    ``$XDG_RUNTIME_DIR/carousel/carousel.sock``) or ``tcp://HOST:PORT`` (then ``token`` is required)."""
    return MemoryClient(socket_path or default_socket_path(), memory, token=token, timeout_s=timeout_s,
                        reconnect_s=reconnect_s, use_shm=use_shm)


class MemoryClient:
    """A connection to one memory of a daemon (see the module docstring)."""

    def __init__(self, address: str, memory: str = "default", *, token: str | None = None, timeout_s: float = 30.0,
                 reconnect_s: float = 30.0, use_shm: bool = True) -> None:
        self.address, self.memory, self._token = address, memory, token
        self.timeout_s, self.reconnect_s = timeout_s, reconnect_s
        self._tcp = address.startswith("tcp://")
        self._use_shm = use_shm and not self._tcp
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._pid = os.getpid()
        self._rings: dict[tuple, RingReader] = {}
        self._upload: Segment | None = None
        self._doorbell: Doorbell | None = None
        self._closed = False
        self.schema: dict[str, tuple[tuple[int, ...], str]] = {}
        self.daemon_pid: int | None = None
        with self._lock:
            self._connect()

    # ---- the public API ----------------------------------------------------------------------------------
    def add(self, x: Any, y: Any, task: Any, **extras: Any) -> torch.Tensor:
        """Add stream samples; returns their ids (int64 tensor). See :meth:`CarouselMemory.add`."""
        x, y = _np(x), _np(y)
        n = y.shape[0] if y.ndim >= 1 else 0  # a wrong shape is the daemon's to refuse, clearly
        t = _np(task)
        tensors = [("x", x), ("y", y.astype(np.int64) if y.dtype.kind in "iu" else y),
                   ("task", (np.full(n, int(t)) if t.ndim == 0 else t).astype(np.int16)
                    if t.dtype.kind in "iu" else t)]
        for name, value in extras.items():
            want = self.schema.get(name, (None, None))[1]
            v = _np(value)
            tensors.append((name, v.astype(want) if want and v.dtype != np.dtype(want)
                            and np.can_cast(v.dtype, want, "same_kind") else v))
        with self._lock:
            self._check()
            nbytes = sum(np.asarray(a).nbytes for _, a in tensors)
            if self._use_shm and nbytes > _INLINE_ADD_BYTES:
                if self._upload is None or self._upload.size < nbytes:  # else the segment we have fits
                    meta, _ = self._request(wire.Op.UPLOAD, {"nbytes": nbytes}, retry=True)
                    if self._upload is not None:
                        self._upload.close()
                    self._upload = Segment.attach(meta["segment"], int(meta["size"]))
                desc, offset = [], 0
                for name, a in tensors:
                    a = np.ascontiguousarray(a)
                    if a.dtype.name not in wire.WIRE_DTYPES:
                        raise TypeError(f"{name}: dtype {a.dtype} cannot be sent")
                    self._upload.map[offset:offset + a.nbytes] = memoryview(a).cast("B") if a.nbytes else b""
                    desc.append([name, a.dtype.name, list(a.shape)])
                    offset += a.nbytes
                _, out = self._request(wire.Op.ADD, {"upload": True, "tensors": desc}, retry=False)
            else:
                _, out = self._request(wire.Op.ADD, {}, tensors, retry=False)
        return torch.from_numpy(out["ids"].copy())

    def sample(self, n: int, *, classes: Any = None, tasks: Any = None, seed: int | None = None,
               balanced: bool = False) -> Batch:
        """A replay batch of up to ``n`` distinct EM samples (see :meth:`CarouselMemory.sample`).

        Unseeded, it comes from the shared-memory ring, filled ahead of time: a full batch may have
        been drawn before this client's latest ``add`` (for replay, a draw a few steps old is as good
        as a fresh one). To read the EM *as it is now* -- all of it, after adding exemplars, say --
        pass a ``seed``: that draw is made by the daemon when the request arrives.
        """
        meta: dict[str, Any] = {"n": int(n)}
        if classes is not None:
            meta["classes"] = [int(c) for c in np.asarray(classes).ravel()]
        if tasks is not None:
            meta["tasks"] = [int(t) for t in np.asarray(tasks).ravel()]
        if balanced:
            meta["balanced"] = True
        if seed is None and self._use_shm and n > 0:
            batch = self._from_ring(meta)
            if batch is not None:
                return batch
        if seed is not None:
            meta["seed"] = int(seed)
        with self._lock:
            self._check()
            _, out = self._request(wire.Op.SAMPLE, meta, retry=True)
        return _batch({k: torch.from_numpy(v) for k, v in out.items()})

    def observe(self, ids: Any, logits: Any = None, loss: Any = None) -> None:
        """Per-sample statistics of replayed samples (see :meth:`CarouselMemory.observe`)."""
        tensors = [("ids", _np(ids).astype(np.int64, copy=False))]
        if logits is not None:
            tensors.append(("logits", _np(logits).astype(np.float32, copy=False)))
        if loss is not None:
            tensors.append(("loss", _np(loss).astype(np.float32, copy=False)))
        with self._lock:
            self._check()
            self._request(wire.Op.OBSERVE, {}, tensors, retry=True)

    def retain(self, ids: Any, weights: Any, *, classes: Any = None) -> dict[str, int]:
        """Make a coreset memory's EM slice of ``classes`` hold exactly ``ids`` with ``weights``
        (see :meth:`CarouselMemory.retain`); idempotent, so retried after a reconnect."""
        meta: dict[str, Any] = {}
        if classes is not None:
            meta["classes"] = [int(c) for c in np.asarray(classes).ravel()]
        tensors = [("ids", _np(ids).astype(np.int64, copy=False)),
                   ("weights", _np(weights).astype(np.float32, copy=False))]
        with self._lock:
            self._check()
            return self._request(wire.Op.RETAIN, meta, tensors, retry=True)[0]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._check()
            return self._request(wire.Op.STATS, {}, retry=True)[0]

    def status(self) -> dict[str, Any]:
        """The whole daemon's status (every memory): what ``carousel status`` prints."""
        with self._lock:
            self._check()
            return self._request(wire.Op.STATUS, {}, retry=True)[0]

    def flush(self, timeout_s: float = 60.0) -> None:
        with self._lock:
            self._check()
            self._request(wire.Op.FLUSH, {"timeout_s": timeout_s}, retry=True)

    def checkpoint(self) -> None:
        with self._lock:
            self._check()
            self._request(wire.Op.CHECKPOINT, {}, retry=True)

    def close(self) -> None:
        """Close the connection; the daemon reclaims this client's shared memory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self):  # a client travels to DataLoader workers as its address; they connect anew
        return {"address": self.address, "memory": self.memory, "token": self._token, "timeout_s": self.timeout_s,
                "reconnect_s": self.reconnect_s, "use_shm": self._use_shm}

    def __setstate__(self, state) -> None:
        self.__init__(state.pop("address"), state.pop("memory"), **state)

    # ---- rings --------------------------------------------------------------------------------------------
    def _from_ring(self, meta: dict[str, Any]) -> Batch | None:
        key = (meta["n"], tuple(meta.get("classes", ())), tuple(meta.get("tasks", ())), meta.get("balanced", False))
        with self._lock:
            self._check()
            if self._rings and self._daemon_gone():
                # Batches left in a dead daemon's ring may name samples it never flushed: drop
                # them, reconnect (the restarted daemon recovered what was acknowledged) and resubscribe.
                self._drop()
                self._connect()
            ring = self._rings.get(key)
            if ring is None:
                try:
                    reply, _ = self._request(wire.Op.SUBSCRIBE, meta, retry=True)
                except wire.RemoteError as exc:
                    if exc.kind in ("busy", "shm"):
                        return None  # no ring: sample over the socket
                    raise
                if self._doorbell is None or self._doorbell.segment.name != reply.get("doorbell"):
                    self._doorbell = Doorbell.attach(reply["doorbell"])
                ring = self._rings[key] = RingReader(reply["segment"], RingLayout.from_json(reply["layout"]),
                                                     self._doorbell)
        deadline = time.perf_counter() + _RING_WAIT_S
        while True:
            out = ring.take()
            if out is not None:
                return _batch(out)
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            ring.wait(left)  # asleep until the filler publishes: spinning would take its core

    # ---- the connection -------------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")
        if os.getpid() != self._pid:
            # A forked child (DataLoader worker): the parent's socket and rings are not ours.
            self._pid = os.getpid()
            for ring in self._rings.values():
                ring._alive = False
            self._rings, self._upload, self._sock, self._doorbell = {}, None, None, None
        if self._sock is None:
            self._connect()

    def _daemon_gone(self) -> bool:
        """Whether the daemon closed our connection (it never sends unprompted: readable = EOF)."""
        try:
            return bool(self._poll.poll(0))
        except (OSError, ValueError):
            return True

    def _connect(self) -> None:
        deadline = time.monotonic() + self.reconnect_s
        delay = 0.05
        while True:
            try:
                self._open_socket()
                break
            except (ConnectionError, FileNotFoundError, socket.timeout, OSError) as exc:
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"cannot reach the carousel daemon at {self.address}: {exc}") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _open_socket(self) -> None:
        if self._tcp:
            host, _, port = self.address[len("tcp://"):].rpartition(":")
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        try:
            hello: dict[str, Any] = {"memory": self.memory, "pid": os.getpid(), "version": wire.VERSION}
            if self._token is not None:
                hello["token"] = self._token
            meta, _ = self._roundtrip(wire.Op.HELLO, hello, ())
        except BaseException:
            self._sock = None
            sock.close()
            raise
        self.schema = {k: (tuple(v[0]), v[1]) for k, v in meta["schema"].items()}
        self.daemon_pid = meta.get("daemon_pid")
        self._use_shm = self._use_shm and bool(meta.get("shm"))

    def _drop(self) -> None:
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()
        if self._doorbell is not None:
            self._doorbell.close()
            self._doorbell = None
        if self._upload is not None:
            self._upload.close()
            self._upload = None
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _request(self, op: int, meta: Mapping[str, Any], tensors=(), *, retry: bool):
        try:
            return self._roundtrip(op, meta, tensors)
        except (ConnectionError, socket.timeout, OSError) as exc:
            if isinstance(exc, ShmError):
                raise
            self._drop()
            if not retry:
                raise ConnectionError(f"the daemon connection dropped during {wire.Op(op).name.lower()}; "
                                      "the request may or may not have been applied") from exc
            self._connect()
            if op in (wire.Op.UPLOAD, wire.Op.SUBSCRIBE):
                raise ConnectionError("reconnected to the daemon; retry the call") from exc
            return self._roundtrip(op, meta, tensors)

    def _roundtrip(self, op: int, meta: Mapping[str, Any], tensors):
        sock = self._sock
        if sock is None:
            raise ConnectionError("not connected")
        sock.sendall(b"".join(wire.encode(op, meta, tensors)))
        head = _recv_exact(sock, wire.HEADER.size)
        rop, meta_len, payload_len, crc = wire.parse_header(head, 1 << 40)
        body = _recv_exact(sock, meta_len + payload_len)
        if wire.crc_of(head, body[:meta_len], memoryview(body)[meta_len:]) != crc:
            raise ConnectionError("reply failed its checksum")
        reply = wire.decode_meta(bytes(body[:meta_len]))
        if rop == wire.Op.ERROR:
            if reply.get("error") in ("protocol", "auth") or op == wire.Op.HELLO:
                self._drop()  # the daemon closes the connection after these
            raise wire.RemoteError(str(reply.get("error")), str(reply.get("message")))
        specs = wire.tensor_specs(reply, payload_len)
        return reply, wire.split_tensors(specs, memoryview(body)[meta_len:])


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError("the daemon closed the connection")
        got += k
    return buf


def _np(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _batch(t: Mapping[str, torch.Tensor]) -> Batch:
    return Batch(t["id"], t["x"], t["y"], t["task"], {k: v for k, v in t.items() if k not in ("id", "x", "y", "task")})
