"""Where a request reaches the memory: one function per operation, and the table that routes them.

:func:`dispatch` runs one decoded request for a :class:`~carousel.daemon.connection.Connection`:
it refuses replies sent as requests, finds the operation's :class:`Route`, and, for an operation on
a memory, checks that HELLO chose one, applies the step ends (``ticks``) the client counted since
its last request, and checks the session of a request that acknowledges earlier adds. The handler
then checks the request's arguments as the memory would and runs the memory's method on the
daemon's thread pool (``add``, ``observe``, ``retain`` and ``checkpoint`` under the memory's
write lock). A new operation is one function here and one entry in :data:`ROUTES`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..inputs import MemoryInputError, check_count
from ..memory import CarouselMemory
from . import wire
from .errors import RequestError
from .served import Served
from .shm import Segment
from .shm_ring import BatchRing, RingLayout

if TYPE_CHECKING:
    from .connection import Connection

MAX_RINGS_PER_CLIENT = 8
MAX_RING_ROWS = 1 << 16
MAX_LEASE_IDS = 1 << 16

Reply = tuple[dict, list]


@dataclass(frozen=True, slots=True)
class Request:
    """One decoded request: the connection it came on, the memory HELLO chose (None for the
    operations that need none), its metadata and its tensors (``specs`` over ``raw``)."""

    conn: Connection
    served: Served | None
    meta: dict
    specs: Any
    raw: Any


@dataclass(frozen=True)
class Route:
    """How :func:`dispatch` runs an operation: its handler; whether it works on the memory chosen in
    HELLO (and so first applies the client's ``ticks``); whether it acknowledges earlier adds (and so
    must reach the session they went to)."""

    handler: Callable[[Request], Awaitable[Reply]]
    memory: bool = True
    acknowledges: bool = False


async def dispatch(conn: Connection, op: int, meta: dict, payload) -> Reply:
    """Run one request; returns the reply's metadata and tensors, or raises what its ERROR frame says."""
    specs, raw = payload
    if op >= wire.Op.OK:
        raise wire.ProtocolError(f"{wire.Op(op).name} is a reply, not a request")
    route = ROUTES.get(op)
    if route is None:
        raise wire.ProtocolError(f"op {wire.Op(op).name} is not a request")
    if not route.memory:
        return await route.handler(Request(conn, None, meta, specs, raw))
    served = _chosen(conn)
    if meta.get("ticks") is not None:
        await _end_steps(conn, served, meta["ticks"])
    if route.acknowledges:
        _check_session(conn, meta)
    return await route.handler(Request(conn, served, meta, specs, raw))


# ---- the operations ------------------------------------------------------------------------------------
async def hello(req: Request) -> Reply:
    conn, meta = req.conn, req.meta
    name = meta.get("memory", "default")
    if not isinstance(name, str) or name not in conn.d.served:  # (a list is not even hashable)
        raise RequestError("unknown_memory", f"no memory named {str(name)[:64]!r}; "
                                             f"this daemon serves {sorted(conn.d.served)}")
    conn.served = conn.d.served[name]
    conn.authed = True
    mem = conn.served.memory
    mc = mem.config.memory
    prev = conn.d.previous_session
    return {"memory": name, "schema": conn.served.schema(), "em_size": mc.em_size, "kind": mc.kind,
            "max_label": mc.max_label, "session": conn.d.session,
            # The integrity mode: batches carry their references and the client checks them.
            "verify": None if mem.verifier is None else mem.verifier.to_json(),
            "deterministic": mem.config.swap.deterministic,
            "previous_session": prev.get("session"), "previous_clean": prev.get("clean") is True,
            "daemon_pid": os.getpid(), "version": __version__, "shm": conn.kind == "unix",
            "posting": True,  # LEASE and ADD {first}: adds and observes need no reply
            # A posted ADD may name its samples' offset in the upload segment (several in flight).
            "posted_upload": True, "max_upload": conn.d.profile.daemon.max_frame_bytes}, []


async def ping(req: Request) -> Reply:
    return {}, []


async def status(req: Request) -> Reply:
    return wire.json_safe(await _run(req.conn, req.conn.d.status)), []


async def sample(req: Request) -> Reply:
    mem = req.served.memory
    n, filters = sample_args(req.meta, mem)
    seed = req.meta.get("seed")
    seed = None if seed is None else check_count(seed, "seed")
    # Unchecked here: in the integrity mode the references travel with the batch and the
    # client checks it, after the transport.
    batch, refs = await _run(req.conn, mem.sample_with_references, n, seed=seed, **filters)
    tensors = [("id", batch.ids.numpy()), ("x", batch.x.numpy()), ("y", batch.y.numpy()),
               ("task", batch.task.numpy())] + [(k, v.numpy()) for k, v in batch.extras.items()]
    return {}, tensors + list((refs or {}).items())


async def add(req: Request) -> Reply:
    """An add. With ``first``, its ids come from this connection's leases (LEASE), in order, and the
    reply carries none: the client knew them when it sent the add without waiting for this reply."""
    conn, served = req.conn, req.served
    x, y, task, extras = add_arguments(add_tensors(conn, req.specs, req.raw, req.meta.get("upload", False),
                                                   req.meta.get("offset")))
    first = req.meta.get("first")
    leased = None if first is None else conn.leases.take(first, _rows(req.specs, "y"))

    def body():  # the memory checks every field, as in-process
        if leased is None:
            ids = served.memory.add(x, y, task, **extras)
        else:
            ids = served.memory.add_leased(leased, x, y, task, **extras)
        served.epoch = (served.epoch + 1) & 0xFFFFFFFF
        conn.d.filler.added(served)
        return ids
    if leased is not None:
        await _run_queued(conn, served, leased.size, body)
        return {}, []
    ids = await _run(conn, _locked(served, body))
    return {}, [("ids", ids.numpy())]


async def lease(req: Request) -> Reply:
    """Ids for this connection's later adds: the client hands them out itself, so an add needs no reply."""
    conn, served = req.conn, req.served
    n = req.meta.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_LEASE_IDS:
        raise RequestError("input", f"n must be an int in [1, {MAX_LEASE_IDS}], got {str(n)[:32]}")
    if conn.leases.held() + n > 2 * MAX_LEASE_IDS:
        raise RequestError("busy", f"this connection holds {conn.leases.held()} leased ids unused already")
    first, n = await _run(conn, served.memory.lease_ids, n)
    conn.leases.grant(first, n, served.memory)
    return {"first": first, "n": n}, []


async def observe(req: Request) -> Reply:
    served = req.served
    arrays = wire.split_tensors(req.specs, req.raw)
    if "ids" not in arrays or set(arrays) - {"ids", "logits", "loss"}:
        raise MemoryInputError(f"observe takes the tensors ids, logits?, loss?; got {sorted(arrays)}")

    def body():
        served.memory.observe(arrays["ids"], logits=arrays.get("logits"), loss=arrays.get("loss"))
    await _run_queued(req.conn, served, 0, body)
    return {}, []


async def retain(req: Request) -> Reply:
    conn, served = req.conn, req.served
    arrays = wire.split_tensors(req.specs, req.raw)
    if set(arrays) != {"ids", "weights"}:
        raise MemoryInputError(f"retain takes the tensors ids and weights; got {sorted(arrays)}")
    classes = int_list(req.meta, "classes")

    def locked():
        with served.write_lock:
            out = served.memory.retain(arrays["ids"], arrays["weights"], classes=classes)
            # Ring batches drawn before hold the old selection: stale from now on.
            served.epoch = (served.epoch + 1) & 0xFFFFFFFF
            conn.d.filler.added(served)
        return out
    return await _run(conn, locked), []


async def stats(req: Request) -> Reply:
    return wire.json_safe(await _run(req.conn, req.served.memory.stats)), []


async def checkpoint(req: Request) -> Reply:
    served = req.served

    def locked():
        with served.write_lock:
            served.memory.checkpoint()
    await _run(req.conn, locked)
    return {}, []


async def flush(req: Request) -> Reply:
    timeout = req.meta.get("timeout_s", 60.0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 3600:
        raise RequestError("input", f"timeout_s must be in (0, 3600], got {timeout!r}")
    await _run(req.conn, req.served.memory.flush, float(timeout))
    return {}, []


async def subscribe(req: Request) -> Reply:
    conn, served = req.conn, req.served
    mem = served.memory
    d = conn.d
    if conn.kind != "unix":
        raise RequestError("input", "shared-memory rings need the Unix socket (same host)")
    if mem.config.swap.deterministic:
        # A ring is filled ahead, at the filler's pace: what it holds would depend on timing.
        raise RequestError("input", "a deterministic memory draws each batch when asked (SAMPLE): no rings")
    n, filters = sample_args(req.meta, mem)
    key = (n, json.dumps(filters, sort_keys=True, default=list))
    if key in conn.ring_keys:
        ring_id = conn.ring_keys[key]
        ring = d.filler.rings[ring_id][1]
    else:
        if len(conn.rings) >= MAX_RINGS_PER_CLIENT:
            raise RequestError("busy", f"at most {MAX_RINGS_PER_CLIENT} standing sample requests "
                                       "per client")
        if not 1 <= n <= MAX_RING_ROWS:
            raise RequestError("input", f"n must be in [1, {MAX_RING_ROWS}] for a ring, got {n}")
        # In the integrity mode every slot also has the reference columns, which the
        # filler's sample_into fills and the client checks.
        columns = {} if mem.verifier is None else mem.verifier.columns
        layout = RingLayout.plan(n, d.profile.daemon.ring_slots, {**mem.fields, **columns})
        if layout.size > max(d.profile.daemon.max_frame_bytes * 4, 1 << 26):
            raise RequestError("input", f"a ring of {layout.size} bytes is too large; sample fewer rows")
        ring = BatchRing(layout, key)
        ring.set_epoch(served.epoch)
        ring_id = next(d.ring_ids)
        conn.rings.append(ring_id)
        conn.ring_keys[key] = ring_id
        d.track_segment(ring.segment)
        d.filler.add(ring_id, served, ring, filters)
    return {"ring": ring_id, "segment": ring.segment.name, "layout": ring.layout.to_json(),
            "doorbell": d.filler.doorbell.segment.name}, []


async def unsubscribe(req: Request) -> Reply:
    ring_id = req.meta.get("ring")
    if ring_id not in req.conn.rings:
        raise RequestError("input", f"no ring {str(ring_id)[:32]} on this connection")
    req.conn.drop_ring(ring_id)
    return {}, []


async def upload(req: Request) -> Reply:
    conn = req.conn
    max_frame_bytes = conn.d.profile.daemon.max_frame_bytes
    if conn.kind != "unix":
        raise RequestError("input", "upload segments need the Unix socket (same host)")
    nbytes = req.meta.get("nbytes")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or not 0 < nbytes <= max_frame_bytes:
        raise RequestError("input", f"nbytes must be in [1, max_frame_bytes={max_frame_bytes}], "
                                    f"got {str(nbytes)[:32]}")
    if conn.upload is None or conn.upload.size < nbytes:
        old = conn.upload
        conn.upload = Segment.create(nbytes)
        conn.d.track_segment(conn.upload, drop=old)
        if old is not None:
            old.close()
    return {"segment": conn.upload.name, "size": conn.upload.size}, []


ROUTES: dict[int, Route] = {
    wire.Op.HELLO: Route(hello, memory=False),
    wire.Op.PING: Route(ping, memory=False),
    wire.Op.STATUS: Route(status, memory=False),
    wire.Op.SAMPLE: Route(sample),
    wire.Op.ADD: Route(add),
    wire.Op.OBSERVE: Route(observe),
    wire.Op.RETAIN: Route(retain, acknowledges=True),
    wire.Op.STATS: Route(stats),
    wire.Op.CHECKPOINT: Route(checkpoint, acknowledges=True),
    wire.Op.FLUSH: Route(flush, acknowledges=True),
    wire.Op.SUBSCRIBE: Route(subscribe),
    wire.Op.UNSUBSCRIBE: Route(unsubscribe),
    wire.Op.UPLOAD: Route(upload),
    wire.Op.LEASE: Route(lease),
}


# ---- what every operation on a memory shares ----------------------------------------------------------
def _chosen(conn: Connection) -> Served:
    """The memory HELLO chose on this connection."""
    if conn.served is None:
        raise wire.ProtocolError("send HELLO (choosing a memory) first")
    if conn.served.memory._closed:
        raise RequestError("closed", f"memory {conn.served.name!r} is closed")
    return conn.served


async def _run(conn: Connection, fn, *args, **kwargs):
    """``fn`` on the daemon's thread pool: a blocked ``add`` never stalls another client's request."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(conn.d.executor, lambda: fn(*args, **kwargs))


def _locked(served: Served, fn):
    """``fn`` under the memory's write lock (adds, observes, checkpoints: one at a time)."""
    def locked():
        with served.write_lock:
            return fn()
    return locked


async def _run_queued(conn: Connection, served: Served, n: int, fn):
    """An add of ``n`` leased samples or an observe: on the event loop's thread when the memory
    will only check it and queue its work (the asynchronous memory with room in its write-behind
    queue, and its write lock free, so nothing here can block the loop); else on the thread pool
    as any request. A trainer posts one of each per step: the pool's two thread hand-offs cost
    more CPU than the call itself (~0.3 ms of the daemon's per step)."""
    lock = served.write_lock
    if served.memory.only_queues(n) and lock.acquire(blocking=False):
        try:
            if served.memory.only_queues(n):  # still, now that no other add can take the room
                return fn()
        finally:
            lock.release()
    return await _run(conn, _locked(served, fn))


async def _end_steps(conn: Connection, served: Served, ticks: Any) -> None:
    """Step ends the client counted since its last request (``end_step()`` costs the client no
    round trip: it travels with the next request), applied before that request."""
    if not isinstance(ticks, int) or isinstance(ticks, bool) or not 1 <= ticks <= 1 << 20:
        raise MemoryInputError(f"ticks must be an int in [1, {1 << 20}], got {str(ticks)[:32]}")

    def end_steps() -> None:
        with served.write_lock:
            for _ in range(ticks):
                served.memory.end_step()
    await _run(conn, end_steps)


def _check_session(conn: Connection, meta: Mapping[str, Any]) -> None:
    """A request that acknowledges earlier writes (flush, checkpoint, retain) names the session
    its client's adds went to; another session (a restarted daemon) never saw them."""
    want = meta.get("session")
    if want is not None and want != conn.d.session:
        raise RequestError("session", f"this daemon is session {conn.d.session}, not {str(want)[:32]}: it "
                                      "restarted since your adds, so it cannot acknowledge them")


# ---- arguments, checked at the door --------------------------------------------------------------------
def add_tensors(conn: Connection, specs, raw, upload: Any, offset: Any = None) -> dict[str, np.ndarray]:
    """An ADD's tensors: inline in the frame, or (``upload`` true) in the connection's upload
    segment, from byte ``offset`` on (0 when None; a posted add's region: docs/protocol.md, "Posting")."""
    if upload is True:
        offset = 0 if offset is None else offset
        if conn.upload is None:
            raise RequestError("input", "ADD from the upload segment before UPLOAD")
        if len(raw):
            raise RequestError("input", "ADD from the upload segment carries no payload")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise RequestError("input", f"offset must be a non-negative int, got {str(offset)[:32]}")
        total = sum(s[3] for s in specs)
        if offset + total > conn.upload.size:
            raise RequestError("input", f"tensors of {total} bytes from offset {offset} overrun the "
                                        f"{conn.upload.size}-byte upload segment")
        # A copy, made now (before the reply, and before the frames after this one are read): the
        # client reuses the region once it has read this reply.
        region = conn.upload.map[offset:offset + total]
        return {k: v.copy() for k, v in wire.split_tensors(specs, region).items()}
    if upload is not False:
        raise RequestError("input", "'upload' must be true or false")
    if offset is not None:
        raise RequestError("input", "offset is for an ADD from the upload segment")
    return wire.split_tensors(specs, raw)


def _rows(specs, name: str) -> int:
    """The first dimension of tensor ``name`` of a request (0 when it has none; the memory then refuses it)."""
    for spec in specs:
        if spec[0] == name:
            shape = spec[2]
            return int(shape[0]) if len(shape) else 0
    return 0


def sample_args(meta: Mapping[str, Any], mem: CarouselMemory) -> tuple[int, dict]:
    """``n`` and the filters of a SAMPLE or SUBSCRIBE. As in-process, ``n`` may exceed what the EM
    holds (the batch is then all there is); it is clamped to ``em_size``, so a ring is never
    larger than the EM."""
    n = check_count(meta.get("n"))
    n = min(n, mem.config.memory.em_size)
    filters: dict[str, Any] = {}
    for key in ("classes", "tasks"):
        value = int_list(meta, key)
        if value is not None:
            filters[key] = value
    balanced = meta.get("balanced", False)
    if not isinstance(balanced, bool):
        raise RequestError("input", "balanced must be true or false")
    if balanced:
        filters["balanced"] = True
    return n, filters


def add_arguments(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """An ADD's tensors as ``add(x, y, task, **extras)``'s arguments; the memory checks them."""
    missing = [k for k in ("x", "y", "task") if k not in arrays]
    if missing:
        raise MemoryInputError(f"add needs the tensors x, y and task; missing {missing}")
    return arrays["x"], arrays["y"], arrays["task"], {k: v for k, v in arrays.items() if k not in ("x", "y", "task")}


def int_list(meta: Mapping[str, Any], key: str) -> list[int] | None:
    """A metadata list of ints (``classes``, ``tasks``), or None when absent."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > 1 << 16 or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise MemoryInputError(f"{key} must be integers, got {type(value).__name__}")
    return value
