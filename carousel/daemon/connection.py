"""One client's connection: frames read, checked and decoded, one request at a time, and answered.

:class:`Connection` reads a frame (:mod:`carousel.daemon.wire`: header first, nothing more before
its limits are checked), runs the request through :func:`carousel.daemon.handlers.dispatch` and
writes the reply, an ``ERROR`` frame with the request's ``kind`` when it failed. Before its
``HELLO`` a connection is not a client: it takes no ``max_clients`` place, may send only small
frames and is closed at ``hello_timeout_s``. It owns the client's rings and upload segment, and
gives them back when the client goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import time
from typing import TYPE_CHECKING

from . import wire
from .errors import ERROR_KINDS, RequestError
from .handlers import dispatch
from .leases import Leases
from .security import token_ok
from .shm import Segment

if TYPE_CHECKING:
    from .served import Served
    from .service import Daemon

log = logging.getLogger("carousel.daemon")

# Before HELLO a connection may only say HELLO, PING or STATUS, none of which carries tensors:
# a peer that has not said who it is (no token yet, on TCP) never makes the daemon buffer more.
PENDING_FRAME_BYTES = 1 << 16
# A stopping daemon serves what a client had sent before the stop for at most this long.
DRAIN_S = 2.0


class Connection:
    """One client: reads frames, runs them in order, owns the client's rings and upload segment."""

    def __init__(self, daemon: Daemon, reader, writer, kind: str, peer: str) -> None:
        self.d, self.reader, self.writer, self.kind, self.peer = daemon, reader, writer, kind, peer
        self.served: Served | None = None
        self.authed = kind == "unix"
        # Before HELLO: not a client yet (no max_clients slot), frames of at most PENDING_FRAME_BYTES,
        # and closed at this deadline (the token, on TCP, travels in HELLO).
        self.pending = True
        self.hello_deadline = asyncio.get_running_loop().time() + daemon.profile.daemon.hello_timeout_s
        self.rings: list[int] = []
        self.ring_keys: dict[tuple, int] = {}
        self.upload: Segment | None = None
        self.leases = Leases()  # ids this client's adds will use (LEASE)
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
            await send_error(self.writer, "internal", f"the daemon failed on this connection ({type(exc).__name__})"
                                                      "; reconnect")
        finally:
            self.busy = False  # a shutdown waits for busy connections: this one is done

    async def _serve(self) -> None:
        dc = self.d.profile.daemon
        drain_until = None
        while True:
            if self.closing:
                # The daemon stops: the frames this client sent before it did are still served
                # (posted adds among them; busy, so the shutdown waits for them) -- for a moment
                # only, or a client that keeps sending would keep the daemon from stopping.
                now = asyncio.get_running_loop().time()
                drain_until = now + DRAIN_S if drain_until is None else drain_until
                if self.pending or now > drain_until or not self.has_input():
                    return
                self.busy = True
            hello_due = asyncio.timeout_at(self.hello_deadline) if self.pending else contextlib.nullcontext()
            try:
                async with hello_due:
                    frame = await self._read_frame(dc.max_frame_bytes, dc.read_timeout_s)
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the client went away
            except TimeoutError:
                if self.pending and hello_due.expired():
                    self.d.metrics.refused.labels(reason="hello_timeout").inc()
                    self.d.log_hello_timeout.warning("connection closed: no HELLO within daemon.hello_timeout_s",
                                                     extra={"peer": self.peer, "hello_timeout_s": dc.hello_timeout_s})
                    await send_error(self.writer, "timeout", f"no HELLO within hello_timeout_s={dc.hello_timeout_s}")
                    return
                log.warning("half-sent frame timed out; closing", extra={"peer": self.peer})
                self.d.metrics.protocol_errors.inc()
                return
            except wire.ProtocolError as exc:
                self._protocol_error(exc)
                await send_error(self.writer, "protocol", str(exc))
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

    def has_input(self) -> bool:
        """Whether bytes from the client are here, unread: in the stream's buffer or the socket's."""
        if getattr(self.reader, "_buffer", None):
            return True
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return False
        try:
            return bool(select.select([sock.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def _protocol_error(self, exc: wire.ProtocolError, op: str | None = None) -> None:
        """Count and log (one line) a frame that broke the protocol; the connection then closes."""
        self.d.metrics.protocol_errors.inc()
        log.warning("protocol error; closing", extra={"peer": self.peer, "op": op, "error": str(exc)[:300]})

    async def _read_frame(self, max_bytes: int, timeout: float):
        # A client may wait as long as it likes between frames (before HELLO, serve() bounds the wait).
        first = await self.reader.read(1)
        if not first:
            return None
        # Busy from its first byte: a stopping daemon waits for busy connections, and between a
        # frame's last bytes leaving the buffer and its request starting (a wait_for's task
        # finishing takes loop turns) the connection would look idle, with nothing to read: the
        # stop once aborted it there, and a posted add sent before the SIGTERM went unanswered.
        self.busy = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout  # the whole frame, once begun, within read_timeout_s
        rest = await self._exactly(wire.HEADER.size - 1, timeout)
        head = first + rest
        op, meta_len, payload_len, crc = wire.parse_header(head, max_bytes)  # before any body is read
        if self.pending and meta_len + payload_len > PENDING_FRAME_BYTES:
            raise wire.ProtocolError(f"a frame before HELLO carries at most {PENDING_FRAME_BYTES} bytes, this one "
                                     f"{meta_len + payload_len}; send HELLO first")
        body = await self._exactly(meta_len + payload_len, max(deadline - loop.time(), 0.0)) \
            if meta_len + payload_len else b""
        meta_raw, payload = body[:meta_len], memoryview(body)[meta_len:]
        if wire.crc_of(head, meta_raw, payload) != crc:
            raise wire.ProtocolError("checksum mismatch: the frame was damaged or is not a carousel frame")
        meta = wire.decode_meta(meta_raw)
        # Upload-segment tensors live in shared memory, not the payload: bounded in handlers.add_tensors.
        specs = wire.tensor_specs(meta, None if meta.get("upload") is True and not len(payload) else len(payload))
        return op, meta, (specs, payload)

    async def _exactly(self, n: int, timeout: float) -> bytes:
        """``n`` bytes, within ``timeout`` s. Bytes already buffered are taken without a timer:
        ``wait_for`` makes a task and a timer per call, a tenth of the daemon's event-loop CPU when
        a trainer posts its adds and observes (their frames arrive whole)."""
        if len(getattr(self.reader, "_buffer", b"")) >= n:
            return await self.reader.readexactly(n)  # returns at once: nothing to wait for
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def _handle(self, op: int, meta: dict, payload) -> bool:
        """Run one request and reply; False closes the connection."""
        name = wire.Op(op).name.lower()
        t0 = time.perf_counter()
        if not self.authed:
            if op != wire.Op.HELLO or not token_ok(meta.get("token"), self.d.token):
                self.d.metrics.refused.labels(reason="token").inc()
                log.warning("tcp client without a valid token; closing", extra={"peer": self.peer})
                await send_error(self.writer, "auth", "a valid token must be sent in HELLO first")
                return False
        try:
            async with self.d.inflight:
                reply_meta, tensors = await dispatch(self, op, meta, payload)
            if op == wire.Op.HELLO and self.pending:
                self.admit()  # no await since the check: two HELLOs cannot both take the last slot
            frame = wire.encode(wire.Op.OK, reply_meta, tensors)
            result = "ok"
        except wire.ProtocolError as exc:
            self._protocol_error(exc, name)
            await send_error(self.writer, "protocol", str(exc))
            self.d.metrics.requests.labels(op=name, result="protocol").inc()
            return False
        except RequestError as exc:
            frame, result = wire.encode(wire.Op.ERROR, {"error": exc.kind, "message": str(exc)}), exc.kind
        except Exception as exc:  # noqa: BLE001 - one request's failure must not take the daemon down
            kind = next((k for t, k in ERROR_KINDS if isinstance(exc, t)), "internal")
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

    def admit(self) -> None:
        """HELLO completed: the connection becomes a client, if ``max_clients`` leaves room."""
        d = self.d
        limit = d.profile.daemon.max_clients
        if self.closing:  # closed meanwhile to make room for a newer connection (Daemon.evict)
            raise RequestError("busy", "this connection was closed before its HELLO was served; reconnect")
        if len(d.clients) >= limit:
            d.metrics.refused.labels(reason="busy").inc()
            raise RequestError("busy", f"too many clients (max_clients={limit})")
        self.pending = False
        d.pending.pop(self, None)
        d.clients.add(self)
        d.count_connections()

    def drop_ring(self, ring_id: int) -> None:
        """Stop filling ring ``ring_id`` and unlink its segment."""
        entry = self.d.filler.rings.get(ring_id)
        if entry is not None:
            self.d.track_segment(None, drop=entry[1].segment)
        self.d.filler.remove(ring_id)
        self.rings.remove(ring_id)
        self.ring_keys = {k: v for k, v in self.ring_keys.items() if v != ring_id}

    def abort(self) -> None:
        self.closing = True
        self.writer.close()

    def release(self) -> None:
        """The client is gone: reclaim its rings, upload segment (unlinked from /dev/shm) and leased ids."""
        self.leases.release()
        for ring_id in list(self.rings):
            self.drop_ring(ring_id)
        if self.upload is not None:
            self.d.track_segment(None, drop=self.upload)
            self.upload.close()
            self.upload = None
        close_writer(self.writer)


async def send_error(writer: asyncio.StreamWriter, kind: str, message: str) -> None:
    """An ERROR frame, waiting (at most a second) for the peer to take it."""
    if writer.is_closing():
        return
    try:
        writer.writelines(wire.encode(wire.Op.ERROR, {"error": kind, "message": message}))
        await asyncio.wait_for(writer.drain(), 1.0)
    except (ConnectionError, asyncio.TimeoutError, OSError):
        pass


def send_error_nowait(writer: asyncio.StreamWriter, kind: str, message: str) -> None:
    """An ERROR frame handed to the transport without waiting for the peer to take it."""
    if not writer.is_closing():
        try:
            writer.writelines(wire.encode(wire.Op.ERROR, {"error": kind, "message": message}))
        except (ConnectionError, OSError):
            pass


def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a connection, and abort it a second later if it still holds unsent bytes: a transport
    waits for its buffer to drain before it closes, so a peer that never reads would otherwise
    keep it (and its file descriptor) forever. Aborting a closed transport does nothing."""
    if not writer.is_closing():
        writer.close()
    asyncio.get_running_loop().call_later(1.0, writer.transport.abort)
