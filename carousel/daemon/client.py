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
``add`` batches over 64 KiB travel through an upload segment the other direction: written into a
region of it (:mod:`.upload_ring`), announced by a small frame.

``add`` and ``observe`` do not wait for the daemon either (*posting*, docs/protocol.md): an add takes
its ids from a block the daemon leased to this connection ahead of need, sends the samples and
returns; replies are read later, in order. A failure the daemon reports for one of them is raised by
the next call (with a note naming it), so ``flush()`` -- the call that waits, and says the samples
are stored and durable -- never acknowledges a failed add. At most 64 are unanswered at once; a
connection lost with adds unanswered raises :class:`InFlightLostError` at the next call.

Bad input is refused here, before anything is sent, by the same checks the in-process memory
runs (:mod:`carousel.inputs`); an error the daemon reports travels back by class name, so the same
input raises the same exception with the same text in both (``MemoryInputError``, ``TimeoutError``,
a ``StoreError``...; :class:`~carousel.RemoteError` for what only a daemon can say: ``busy``,
``auth``, ``protocol``...).

The client is thread-safe and fork-aware: in a child process (a ``DataLoader`` worker) it opens
its own connection. The first connection waits ``wait_s`` (1 s) for a daemon to answer, then fails
naming the socket; once connected, a dropped connection is re-established for up to
``reconnect_s``. Which calls retry after a reconnect:

- ``add`` never (it may have been applied: a retry could store the samples twice);
- ``flush``, ``checkpoint`` and ``retain`` acknowledge earlier adds, and an acknowledgement counts
  only from the daemon that received them: every daemon start is a new *session* (its id comes in
  HELLO's reply), and if the session changed while this client had adds not yet acknowledged,
  they raise :class:`DaemonRestartedError`, saying how many samples may be lost, instead of
  asking the new daemon (which never saw them). Otherwise they retry once;
- everything else (``sample``, ``observe``, ``stats``, ...) retries once.

Why one module of ~540 lines: one class, :class:`MemoryClient`, whose public half mirrors
:class:`~carousel.CarouselMemory` method for method (the trainers' methods run on either) and
whose private half is the connection those methods share under one lock: reconnect,
session, fork, rings and the upload segment. The frames are :mod:`carousel.daemon.wire`'s, the
rings :mod:`carousel.daemon.shm_ring`'s.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from storage_backends import errors as store_errors

from ..batch import Batch
from ..inputs import MemoryInputError, check_add, check_count, check_observe, check_retain, check_values
from ..integrity import Verifier
from ..write_behind import WriteBehindError
from . import wire
from .leases import consume
from .profile import resolve_socket_path, socket_hint
from .shm import Doorbell, Segment, ShmError
from .shm_ring import RingLayout, RingReader
from .upload_ring import UploadRing

__all__ = ["DaemonRestartedError", "InFlightLostError", "MemoryClient", "connect"]

log = logging.getLogger("carousel.client")

_INLINE_ADD_BYTES = 1 << 16  # smaller adds travel inline: one copy is cheaper than a segment round trip
_RING_WAIT_S = 0.005         # how long sample() waits for the filler before asking over the socket
_DAEMON_FLUSH_S = 60.0       # how long a checkpoint (or retain) may wait for write-behind in the daemon
# Posting: adds and observes sent without waiting for their replies (see the module docstring).
_POST_MAX_BYTES = 1 << 22    # a larger add goes through the upload segment and waits (it is rare and slow anyway)
# A posted add larger than _INLINE_ADD_BYTES goes through the upload segment, sized for this many
# such adds in flight (within [_MIN, _MAX] bytes): room for the daemon to fall a few steps behind.
# Without shared memory for it (/dev/shm full) a connection's posted adds go inline instead.
_UPLOAD_RING_ADDS = 16
_UPLOAD_RING_MIN = 1 << 20
_UPLOAD_RING_MAX = 1 << 24
_MAX_IN_FLIGHT = 64          # posted requests with unread replies before a call reads some of them
_LEASE_MIN, _LEASE_MAX = 1024, 1 << 16  # ids leased at a time: 64 adds' worth, within these bounds


# Exceptions the daemon's memory raises that the client raises again, by name, as the same class
# (an allow-list: a name from the wire never picks an arbitrary class).
_REMOTE_CLASSES: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (MemoryInputError, WriteBehindError, TimeoutError, ValueError, TypeError,
                                  OSError, PermissionError, FileNotFoundError,
                                  *(v for v in vars(store_errors).values()
                                    if isinstance(v, type) and issubclass(v, store_errors.StoreError)))}


class DaemonRestartedError(ConnectionError):
    """The daemon restarted (a new session) while this client had added samples that no
    ``flush``/``checkpoint`` had yet acknowledged: up to ``samples`` of them may be lost (the new
    daemon recovered what the old one had stored, which may be all, some or none of them)."""

    def __init__(self, samples: int, old_session: str, new_session: str) -> None:
        super().__init__(
            f"the carousel daemon restarted (session {old_session[:8]} -> {new_session[:8]}) before it "
            f"acknowledged {samples} sample(s) this client added since its last flush()/checkpoint(): they may "
            "be lost. The new daemon cannot vouch for writes it never received, so this is not retried; "
            "add them again if you need them (calls from now on go to the new daemon).")
        self.samples, self.old_session, self.new_session = samples, old_session, new_session


class InFlightLostError(ConnectionError):
    """The connection dropped while adds sent without waiting (see the module docstring) were
    unanswered: they may or may not have been added. Raised by the call after; never retried."""


def connect(socket_path: str | os.PathLike[str] | None = None, memory: str = "default", *,
            config: str | os.PathLike[str] | None = None, token: str | None = None, timeout_s: float = 30.0,
            wait_s: float = 1.0, reconnect_s: float = 30.0, use_shm: bool = True) -> MemoryClient:
    """Connect to one memory of a daemon.

    Where: ``socket_path`` (a Unix socket path, or ``tcp://HOST:PORT``, which needs ``token``), else
    the socket of the profile ``config`` (the file ``carousel serve --config`` ran), else
    ``$CAROUSEL_SOCKET``, else ``$XDG_RUNTIME_DIR/carousel/carousel.sock``
    (:func:`~carousel.daemon.profile.resolve_socket_path`).

    ``wait_s``: how long the first connection waits for a daemon to answer before it fails, naming
    the path (raise it right after starting a daemon); ``reconnect_s``: how long a dropped
    connection is retried once one existed."""
    return MemoryClient(resolve_socket_path(socket_path, config), memory, token=token, timeout_s=timeout_s,
                        wait_s=wait_s, reconnect_s=reconnect_s, use_shm=use_shm)


class MemoryClient:
    """A connection to one memory of a daemon (see the module docstring)."""

    def __init__(self, address: str, memory: str = "default", *, token: str | None = None, timeout_s: float = 30.0,
                 wait_s: float = 1.0, reconnect_s: float = 30.0, use_shm: bool = True) -> None:
        self.address, self.memory, self._token = address, memory, token
        self.timeout_s, self.wait_s, self.reconnect_s = timeout_s, wait_s, reconnect_s
        self._tcp = address.startswith("tcp://")
        self._use_shm = use_shm and not self._tcp
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._pid = os.getpid()
        self._rings: dict[tuple, RingReader] = {}
        self._upload: Segment | None = None
        self._upload_ring: UploadRing | None = None  # posted adds' regions of the upload segment
        self._doorbell: Doorbell | None = None
        self._closed = False
        self.schema: dict[str, tuple[tuple[int, ...], str]] = {}
        self.daemon_pid: int | None = None
        self.em_size = 0
        self.kind = "plain"
        self.max_label: int | None = None
        # The daemon's integrity mode (HELLO's "verify"): every batch is checked here, after the
        # transport; ``verified`` counts the rows checked.
        self.verifier: Verifier | None = None
        self.verified = 0
        self._verified_lock = threading.Lock()
        self.deterministic = False  # the memory swaps at step boundaries: no rings, end_step() counts
        self._ticks = 0  # end_step() calls not yet sent: they travel with the next request
        self.session: str | None = None  # the daemon start our adds go to (HELLO's reply)
        self._connected_once = False
        self._unacked = 0  # samples added in this session that no flush/checkpoint has acknowledged yet
        self._lost: DaemonRestartedError | None = None  # to raise at the next acknowledging call
        # Posting (HELLO's "posting"): requests sent without waiting, (op, first id, samples, whether
        # its samples are in the upload segment) each, whose replies are read later, in order; the
        # ids leased for adds, as [next, end) blocks.
        self._posting = False
        self._posted_upload = False  # HELLO's "posted_upload": a posted ADD may name an upload offset
        self._max_upload = 0
        self._in_flight: deque[tuple[int, int, int, bool]] = deque()
        self._leases: deque[list[int]] = deque()
        self._lease_asked = 0  # ids asked for in a LEASE whose reply is unread
        self._posted_error: BaseException | None = None  # a posted request's failure, raised by the next call
        self._id_bound = 0  # every id below it exists in the daemon's memory: observing them cannot fail
        with self._lock:
            self._connect()

    # ---- the public API ----------------------------------------------------------------------------------
    def add(self, x: Any, y: Any, task: Any, **extras: Any) -> torch.Tensor:
        """Add stream samples; returns their ids (int64 tensor). See :meth:`CarouselMemory.add`.
        Checked here as the memory checks them (same errors), then sent once: never retried."""
        fields = check_add(self.schema, self.kind == "coreset", x, y, task, extras, self.max_label)
        n = fields["y"].shape[0]
        tensors = list(fields.items())
        with self._lock:
            self._check()
            nbytes = sum(np.asarray(a).nbytes for _, a in tensors)
            # A deterministic memory's adds wait: its swaps read only ids stored before a step
            # boundary, counted by id, which a lease handed out ahead would blur.
            if self._posting and not self.deterministic and 0 < n <= _LEASE_MAX and nbytes <= _POST_MAX_BYTES:
                return self._post_add(n, tensors, nbytes)
            if self._use_shm and nbytes > _INLINE_ADD_BYTES:
                self._upload_segment(nbytes)
                if self._in_flight:  # posted adds may still be in the segment: wait for their replies
                    self._drain(block=True)
                    self._raise_posted()
                meta, payload = {"upload": True, "tensors": self._write_upload(tensors, 0)}, []
            else:
                meta, payload = {}, tensors
            try:
                _, out = self._request(wire.Op.ADD, meta, payload, retry=False)
            except ConnectionError:
                self._unacked += n  # it may have reached a daemon that then died
                raise
            self._unacked += n
        ids = out["ids"].copy()
        if ids.size:  # they exist now: observing them cannot fail
            self._id_bound = max(self._id_bound, int(ids.max()) + 1)
        return torch.from_numpy(ids)

    def sample(self, n: int, *, classes: Any = None, tasks: Any = None, seed: int | None = None,
               balanced: bool = False, pin_memory: bool = False) -> Batch:
        """A replay batch of up to ``n`` distinct EM samples (see :meth:`CarouselMemory.sample`).

        Unseeded, it comes from the shared-memory ring, filled ahead of time: a full batch may have
        been drawn before this client's latest ``add`` (for replay, a draw a few steps old is as good
        as a fresh one). To read the EM *as it is now* -- all of it, after adding exemplars, say --
        pass a ``seed``: that draw is made by the daemon when the request arrives. ``pin_memory``:
        the batch copied into page-locked memory (a ring batch's slot goes back at once), so
        ``batch.to("cuda", non_blocking=True)`` overlaps the step; ignored without a CUDA device.
        """
        # The memory's own checks; n may exceed what the EM holds (then the batch is all there is),
        # so the ring is sized min(n, em_size): the same batches, without a ring larger than the EM.
        meta: dict[str, Any] = {"n": min(check_count(n), max(self.em_size, 1))}
        if classes is not None:
            meta["classes"] = check_values(classes, "classes").tolist()
        if tasks is not None:
            meta["tasks"] = check_values(tasks, "tasks").tolist()
        if balanced:
            meta["balanced"] = True
        if seed is None and self._use_shm and meta["n"] > 0 and not self.deterministic:
            batch = self._from_ring(meta)
            if batch is not None:
                return batch.pin_memory() if pin_memory else batch
        if seed is not None:
            meta["seed"] = check_count(seed, "seed")
        with self._lock:
            self._check()
            _, out = self._request(wire.Op.SAMPLE, meta, retry=True)
        batch = self._checked({k: torch.from_numpy(v) for k, v in out.items()})
        return batch.pin_memory() if pin_memory else batch

    def observe(self, ids: Any, logits: Any = None, loss: Any = None) -> None:
        """Per-sample statistics of replayed samples (see :meth:`CarouselMemory.observe`)."""
        ids, logits, loss = check_observe(ids, logits, loss)
        tensors = [("ids", ids)]
        if logits is not None:
            tensors.append(("logits", logits))
        if loss is not None:
            tensors.append(("loss", loss))
        with self._lock:
            self._check()
            if self._posting and ids.size and ids.min() >= 0 and ids.max() < self._id_bound:
                # Ids the daemon knows: the only error left to report is the transport's.
                try:
                    self._post(wire.Op.OBSERVE, {}, tensors, 0, 0)
                    return
                except ConnectionError:
                    self._check()  # reconnect; sent again below, as any observe is retried once
            self._request(wire.Op.OBSERVE, {}, tensors, retry=True)
            if ids.size:  # they exist (else this raised): later observes of them need no reply
                self._id_bound = max(self._id_bound, int(ids.max()) + 1)

    def retain(self, ids: Any, weights: Any, *, classes: Any = None) -> dict[str, int]:
        """Make a coreset memory's EM slice of ``classes`` hold exactly ``ids`` with ``weights``
        (see :meth:`CarouselMemory.retain`). It checkpoints, so it acknowledges earlier adds: retried
        after a reconnect only as ``flush`` is (see the module docstring)."""
        if self.kind != "coreset":
            raise MemoryInputError('retain() needs a memory of kind = "coreset"')
        ids, w, classes = check_retain(ids, weights, classes)
        meta: dict[str, Any] = {} if classes is None else {"classes": classes.tolist()}
        return self._acknowledge(wire.Op.RETAIN, meta, [("ids", ids), ("weights", w)])

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._check()
            return self._request(wire.Op.STATS, {}, retry=True)[0]

    def status(self) -> dict[str, Any]:
        """The whole daemon's status (every memory): what ``carousel status`` prints."""
        with self._lock:
            self._check()
            return self._request(wire.Op.STATUS, {}, retry=True)[0]

    def end_step(self) -> None:
        """Mark the end of a training step (see :meth:`CarouselMemory.end_step`). Free: for a
        deterministic memory it is counted and sent with the next request; otherwise nothing."""
        if self.deterministic:
            with self._lock:
                self._ticks += 1

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every sample this client added is stored and durable on the daemon that
        received it; :class:`DaemonRestartedError` if that daemon is gone (see the module docstring)."""
        self._acknowledge(wire.Op.FLUSH, {"timeout_s": timeout_s}, waits_s=timeout_s)

    def checkpoint(self) -> None:
        """``flush`` plus the EM's contents and statistics (see :meth:`CarouselMemory.checkpoint`)."""
        self._acknowledge(wire.Op.CHECKPOINT, {})

    def _acknowledge(self, op: int, meta: Mapping[str, Any], tensors=(), waits_s: float = _DAEMON_FLUSH_S
                     ) -> dict[str, Any]:
        """A request whose success acknowledges this client's earlier adds as durable. It is sent
        only to the session the adds went to: across a daemon restart it raises instead. The
        daemon may legitimately work on it for ``waits_s`` (a flush under back-pressure): the reply
        is awaited that much longer than ``timeout_s``, rather than cut off and sent again."""
        with self._lock:
            try:
                self._check()
            except InFlightLostError:
                self._raise_if_lost()  # the adds in flight went to a daemon that restarted: say so
                raise
            self._raise_if_lost()
            try:
                reply, _ = self._roundtrip(op, {**meta, "session": self.session}, tensors, extra_s=waits_s)
            except (ConnectionError, socket.timeout, OSError) as exc:
                if isinstance(exc, ShmError):
                    raise
                self._drop()
                self._connect()  # notes a change of session with adds unacknowledged
                self._raise_if_lost()
                if isinstance(exc, InFlightLostError):  # the same daemon, but adds in flight were cut off
                    raise
                # The same daemon (only the connection broke), or nothing of ours is unacknowledged.
                reply, _ = self._roundtrip(op, {**meta, "session": self.session}, tensors, extra_s=waits_s)
            self._unacked = 0
            return reply

    def _raise_if_lost(self) -> None:
        lost, self._lost = self._lost, None
        if lost is not None:
            raise lost

    def close(self) -> None:
        """Close the connection; the daemon reclaims this client's shared memory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._sock is not None and self._in_flight:
                self._drain(block=True)  # posted adds reach the daemon and their failures are heard
            self._drop()
            failed, self._posted_error = self._posted_error, None
        if failed is not None:
            raise failed

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
            self._check()  # a dead daemon's rings go with its connection: they may name samples it never flushed
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
                return self._checked(out)
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            ring.wait(left)  # asleep until the filler publishes: spinning would take its core

    def _checked(self, tensors: dict[str, torch.Tensor]) -> Batch:
        """A batch from a ring or a SAMPLE reply; in the integrity mode its rows are checked against
        the references it carries first (:class:`~carousel.integrity.IntegrityError` on a difference)."""
        refs = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("@")]}
        if self.verifier is not None:
            rows = self.verifier.check(tensors, refs)
            with self._verified_lock:  # not the connection's lock: a flush may hold that for a minute
                self.verified += rows
        return _batch(tensors)

    # ---- the connection -------------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")
        if os.getpid() != self._pid:
            # A forked child (DataLoader worker): the parent's socket and rings are not ours.
            self._pid = os.getpid()
            for ring in self._rings.values():
                ring._alive = False
            self._rings, self._upload, self._upload_ring, self._sock, self._doorbell = {}, None, None, None, None
            self._in_flight, self._leases, self._lease_asked, self._posted_error = deque(), deque(), 0, None
        if self._sock is not None and self._in_flight:
            self._drain(block=False)  # replies that came meanwhile; a broken connection is dropped
        if self._sock is not None and not self._in_flight and self._daemon_gone():
            # The daemon closed our connection between calls (it sends nothing unasked for): it
            # stopped or died. Reconnect before sending, so even an add can go to the new daemon.
            self._drop()
        if self._sock is None:
            self._connect()
        self._raise_posted()

    def _daemon_gone(self) -> bool:
        """Whether the daemon closed our connection (with no reply owed, readable = EOF)."""
        try:
            return bool(self._poll.poll(0))
        except (OSError, ValueError):
            return True

    def _connect(self) -> None:
        # Never connected: a daemon that is not there within wait_s is not coming (a wrong path is
        # the usual cause: say which). Connected before: it is restarting; wait reconnect_s for it.
        patience = self.reconnect_s if self._connected_once else self.wait_s
        deadline = time.monotonic() + patience
        delay = 0.02
        while True:
            try:
                self._open_socket()
                break
            except (ConnectionError, FileNotFoundError, socket.timeout, OSError) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    if self._connected_once:
                        raise ConnectionError(f"lost the carousel daemon at {self.address} and it did not come back "
                                              f"within reconnect_s={self.reconnect_s:g}: {exc}") from None
                    if isinstance(exc, TimeoutError):  # (socket.timeout) it accepted, then said nothing
                        raise ConnectionError(f"the carousel daemon at {self.address} took the connection but did "
                                              f"not answer HELLO within timeout_s={self.timeout_s:g} s: it is "
                                              "stopped, wedged or overloaded (see its log)") from None
                    raise ConnectionError(f"no carousel daemon answered within wait_s={self.wait_s:g} s: "
                                          f"{socket_hint(self.address)}") from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.5)
        self._connected_once = True

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
        self.em_size = int(meta.get("em_size", 0))
        self.kind = str(meta.get("kind", "plain"))
        self.max_label = meta.get("max_label")
        verify = meta.get("verify")
        self.verifier = Verifier.from_json(verify) if isinstance(verify, dict) else None
        self.deterministic = bool(meta.get("deterministic"))
        self._posting = meta.get("posting") is True
        self._posted_upload = meta.get("posted_upload") is True
        self._max_upload = int(meta.get("max_upload") or 0)  # the largest upload segment it makes
        self._use_shm = self._use_shm and bool(meta.get("shm"))
        self._note_session(meta)

    def _note_session(self, hello: Mapping[str, Any]) -> None:
        """A new daemon session while adds are unacknowledged: they may be lost, unless the daemon
        says our old session ended with a clean shutdown (which flushed everything)."""
        new = str(hello.get("session"))
        old = self.session
        self.session = new
        if old is None or new == old or not self._unacked:
            return
        if hello.get("previous_session") == old and hello.get("previous_clean"):
            log.info("the carousel daemon restarted after a clean shutdown: nothing was lost")
            self._unacked = 0
            return
        samples = self._unacked + (self._lost.samples if self._lost is not None else 0)
        self._lost = DaemonRestartedError(samples, old if self._lost is None else self._lost.old_session, new)
        self._unacked = 0
        log.warning("%s", self._lost)

    def _drop(self) -> None:
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()
        if self._doorbell is not None:
            self._doorbell.close()
            self._doorbell = None
        if self._upload is not None:
            self._upload.close()
            self._upload, self._upload_ring = None, None
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
        # Posted requests whose replies will never come: an add among them may or may not have
        # been applied (as a synchronous add cut off mid-request); leased ids go with the connection.
        lost = sum(n for op, _, n, _ in self._in_flight if op == wire.Op.ADD)
        if lost and self._posted_error is None:
            self._posted_error = InFlightLostError(
                f"the daemon connection dropped with {lost} added sample(s) sent but not yet answered: they may or "
                "may not have been added (flush() after adding tells you they are stored)")
        self._in_flight.clear()
        self._leases.clear()
        self._lease_asked = 0

    # ---- posting: requests sent without waiting for their replies ---------------------------------------------
    def _post_add(self, n: int, tensors: list, nbytes: int) -> torch.Tensor:
        """An add sent without waiting: its ids come from this connection's leases; a failure the
        daemon reports is raised by the next call (see the module docstring). A large one writes its
        samples into the upload segment (a region of its own, :mod:`.upload_ring`) and sends only
        their description: the trainer's thread copies them once, into memory the daemon reads, and
        never blocks on a socket buffer the daemon has not drained yet."""
        meta: dict[str, Any] = {}
        ring_bytes = min(max(_UPLOAD_RING_ADDS * nbytes, _UPLOAD_RING_MIN), _UPLOAD_RING_MAX, self._max_upload)
        uploaded = self._use_shm and self._posted_upload and _INLINE_ADD_BYTES < nbytes <= ring_bytes
        if uploaded:
            try:
                self._upload_segment(ring_bytes)
            except (ShmError, wire.RemoteError) as exc:
                if isinstance(exc, wire.RemoteError) and exc.kind != "shm":
                    raise
                # /dev/shm full or too small (a container's 64 MB): this connection's adds go
                # inline, as they did before the segment; nothing was sent for this one yet.
                log.warning("no shared memory for posted adds (%s): they go through the socket", exc)
                self._posted_upload = uploaded = False
        if uploaded:
            offset = self._upload_place(nbytes)
            try:
                meta = {"upload": True, "offset": offset, "tensors": self._write_upload(tensors, offset)}
                tensors = []
                ids = self._take_ids(n)
            except BaseException:
                if self._upload_ring is not None:  # (None: the connection dropped, the segment with it)
                    self._upload_ring.unplace()
                raise
        else:
            ids = self._take_ids(n)
        try:
            self._post(wire.Op.ADD, {"first": int(ids[0]), **meta}, tensors, int(ids[0]), n, uploaded=uploaded)
        finally:
            self._unacked += n  # sent, or maybe half-sent before the connection broke
        held = sum(end - nxt for nxt, end in self._leases)
        if held < 8 * n and not self._lease_asked:  # the next block asked for ahead of need
            self._ask_lease(n)
        return torch.from_numpy(ids)

    def _take_ids(self, n: int) -> np.ndarray:
        """The next ``n`` leased ids (asking for a lease and waiting for it when too few are left)."""
        while sum(end - nxt for nxt, end in self._leases) < n:
            if not self._lease_asked:
                self._ask_lease(n)
            self._drain(block=True)
            if self._sock is None:
                raise ConnectionError("the daemon connection dropped while leasing ids; nothing was added")
            self._raise_posted()
        return consume(self._leases, n)

    def _ask_lease(self, n: int) -> None:
        size = min(max(64 * n, _LEASE_MIN), _LEASE_MAX)
        self._post(wire.Op.LEASE, {"n": size}, (), 0, size)
        self._lease_asked += size

    def _upload_segment(self, nbytes: int) -> None:
        """This connection's upload segment, at least ``nbytes`` large (asked of the daemon when it
        is smaller; the request waits for every posted reply first, so none still uses the old one)."""
        if self._upload is not None and self._upload.size >= nbytes:
            return
        meta, _ = self._request(wire.Op.UPLOAD, {"nbytes": nbytes}, retry=True)
        if self._upload is not None:
            self._upload.close()
        self._upload = Segment.attach(meta["segment"], int(meta["size"]))
        self._upload_ring = UploadRing(self._upload.size)

    def _upload_place(self, nbytes: int) -> int:
        """A free region of the upload segment for a posted add of ``nbytes``: its offset. When the
        adds before it still fill the segment, their replies are read (waiting) until one frees."""
        while True:
            offset = self._upload_ring.place(nbytes)
            if offset is not None:
                return offset
            if not any(uploaded for *_, uploaded in self._in_flight):
                raise AssertionError("upload segment regions taken with no add in flight")  # a bug
            self._drain(block=True, keep=len(self._in_flight) - 1)
            if self._sock is None:
                raise ConnectionError("the daemon connection dropped while an add waited for room in the upload "
                                      "segment; nothing was added")
            self._raise_posted()

    def _write_upload(self, tensors: list, offset: int) -> list:
        """``tensors`` copied into the upload segment from ``offset`` on: their description for ADD."""
        desc = []
        for name, a in tensors:
            a = np.ascontiguousarray(a)
            if a.dtype.name not in wire.WIRE_DTYPES:
                raise TypeError(f"{name}: dtype {a.dtype} cannot be sent")
            self._upload.map[offset:offset + a.nbytes] = memoryview(a).cast("B") if a.nbytes else b""
            desc.append([name, a.dtype.name, list(a.shape)])
            offset += a.nbytes
        return desc

    def _post(self, op: int, meta: Mapping[str, Any], tensors, first: int, n: int, uploaded: bool = False) -> None:
        """Send a request and return; its reply is read later, in order (:meth:`_drain`).
        ``uploaded``: an add whose samples are in the upload segment (its region is released with
        its reply)."""
        sock = self._sock
        ticks = self._ticks
        if ticks:
            meta = {**meta, "ticks": ticks}
        try:
            _send_parts(sock, wire.encode(op, meta, tensors))
        except (ConnectionError, socket.timeout, OSError) as exc:
            self._drop()  # (the upload segment and its regions go with the connection)
            raise ConnectionError(f"the daemon connection dropped during {wire.Op(op).name.lower()}; "
                                  "the request may or may not have been applied") from exc
        self._ticks -= ticks
        self._in_flight.append((op, first, n, uploaded))
        if len(self._in_flight) > _MAX_IN_FLIGHT:  # the daemon is behind: wait for it (back-pressure)
            self._drain(block=True, keep=_MAX_IN_FLIGHT // 2)
        else:
            self._drain(block=False)

    def _drain(self, block: bool, keep: int = 0, extra_s: float = 0.0) -> None:
        """Read the replies of posted requests, down to ``keep`` unread (``block``: waiting for them;
        else only those already here). A failure is kept for the next call to raise; a broken
        connection is dropped (see :meth:`_drop`); ``extra_s``: how much longer than ``timeout_s`` a
        reply may take."""
        if extra_s:
            self._sock.settimeout(self.timeout_s + extra_s)
        try:
            while len(self._in_flight) > keep:
                if not block and not self._poll.poll(0):
                    return
                rop, reply, *_ = _read_reply(self._sock, _recv_exact(self._sock, wire.HEADER.size))
                op, first, n, uploaded = self._in_flight.popleft()
                if uploaded:  # the daemon copied its samples out of the segment before answering
                    self._upload_ring.release()
                if op == wire.Op.LEASE:
                    self._lease_asked -= n
                if rop == wire.Op.ERROR:
                    if self._posted_error is None:
                        exc = _remote_exception(reply)
                        what = (f"an earlier add() of {n} sample(s) (ids {first}..{first + n - 1}), sent without "
                                "waiting for its reply: those samples were not added" if op == wire.Op.ADD else
                                f"an earlier {wire.Op(op).name.lower()}(), sent without waiting for its reply")
                        exc.add_note(f"raised by {what}")
                        self._posted_error = exc
                    if reply.get("error") in ("protocol", "auth"):
                        self._drop()  # the daemon closes the connection after these
                        return
                elif op == wire.Op.LEASE:
                    lo = int(reply["first"])
                    self._leases.append([lo, lo + int(reply["n"])])
                    self._id_bound = max(self._id_bound, lo + int(reply["n"]))
        except (ConnectionError, socket.timeout, OSError, wire.ProtocolError):
            self._drop()
        finally:
            if extra_s and self._sock is not None:
                self._sock.settimeout(self.timeout_s)

    def _raise_posted(self) -> None:
        failed, self._posted_error = self._posted_error, None
        if failed is not None:
            raise failed

    def _request(self, op: int, meta: Mapping[str, Any], tensors=(), *, retry: bool):
        try:
            return self._roundtrip(op, meta, tensors)
        except (ConnectionError, socket.timeout, OSError) as exc:
            if isinstance(exc, (ShmError, InFlightLostError)):
                raise
            self._drop()
            if not retry:
                raise ConnectionError(f"the daemon connection dropped during {wire.Op(op).name.lower()}; "
                                      "the request may or may not have been applied") from exc
            self._connect()
            if op in (wire.Op.UPLOAD, wire.Op.SUBSCRIBE):
                raise ConnectionError("reconnected to the daemon; retry the call") from exc
            return self._roundtrip(op, meta, tensors)

    def _roundtrip(self, op: int, meta: Mapping[str, Any], tensors, extra_s: float = 0.0):
        if self._in_flight:
            # Replies come in order: the posted requests' first. One that failed fails this call
            # (not sent): flush() after a failed add must not acknowledge it. The daemon may
            # take as long on them as on this request (a flush waits for the adds before it).
            self._drain(block=True, extra_s=extra_s)
            self._raise_posted()
        sock = self._sock
        if sock is None:
            raise ConnectionError("not connected")
        ticks = self._ticks if op not in (wire.Op.HELLO, wire.Op.PING, wire.Op.STATUS) else 0
        if ticks:
            meta = {**meta, "ticks": ticks}
        sock.sendall(b"".join(wire.encode(op, meta, tensors)))
        self._ticks -= ticks  # the daemon applies them before the request, whatever its answer
        if extra_s:
            sock.settimeout(self.timeout_s + extra_s)
            try:
                head = _recv_exact(sock, wire.HEADER.size)
            finally:
                sock.settimeout(self.timeout_s)
        else:
            head = _recv_exact(sock, wire.HEADER.size)
        rop, reply, body, meta_len, payload_len = _read_reply(sock, head)
        if rop == wire.Op.ERROR:
            if reply.get("error") in ("protocol", "auth") or op == wire.Op.HELLO:
                self._drop()  # the daemon closes the connection after these
            raise _remote_exception(reply)
        specs = wire.tensor_specs(reply, payload_len)
        return reply, wire.split_tensors(specs, memoryview(body)[meta_len:])


def _remote_exception(reply: Mapping[str, Any]) -> Exception:
    """The exception an ERROR frame stands for: the memory's own class where it is one we know
    (the same class and text as in-process, caused by the :class:`RemoteError`), else the
    ``RemoteError`` itself."""
    remote = wire.RemoteError(str(reply.get("error")), str(reply.get("message")))
    cls = _REMOTE_CLASSES.get(str(reply.get("type")))
    if cls is None:
        return remote
    exc = cls(remote.message)
    exc.__cause__ = remote
    return exc


def _send_parts(sock: socket.socket, parts: list) -> None:
    """``sendall`` of the buffers one after the other, without joining them first (an add's
    samples are then copied once, into the kernel)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def _read_reply(sock: socket.socket, head: bytes | bytearray):
    """The rest of a reply frame whose header is ``head``: ``(op, meta, body, meta_len, payload_len)``."""
    rop, meta_len, payload_len, crc = wire.parse_header(head, 1 << 40)
    body = _recv_exact(sock, meta_len + payload_len)
    if wire.crc_of(head, body[:meta_len], memoryview(body)[meta_len:]) != crc:
        raise ConnectionError("reply failed its checksum")
    return rop, wire.decode_meta(bytes(body[:meta_len])), body, meta_len, payload_len


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


def _batch(t: Mapping[str, torch.Tensor]) -> Batch:
    return Batch(t["id"], t["x"], t["y"], t["task"], {k: v for k, v in t.items() if k not in ("id", "x", "y", "task")})
