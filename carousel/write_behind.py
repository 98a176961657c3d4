"""Write-behind: every stream sample goes to the first storage tier, off the trainer's thread.

The queue is bounded (in samples). ``add()`` first reserves room (:meth:`WriteBehind.reserve`);
when the queue is full that blocks -- back-pressure, timed in
``carousel_write_behind_blocked_seconds_total`` -- and never drops a sample. If the tier keeps
failing (disk full, I/O errors), the writer keeps the batch and retries with backoff, the queue
fills, and ``reserve`` raises :class:`WriteBehindError` carrying the store's error once it has
waited ``block_timeout_s``, before ``add()`` changed anything: a fault reaches the caller
instead of being swallowed, and the rejected batch leaves no trace.

The asynchronous memory also hands the writer its admission (``admit``): before it stores a batch,
the writer thread registers every sample submitted so far in the catalog and runs the admission
policy on them, in submission order, so ``add()`` on the trainer's thread takes no lock that a
background thread holds for long. Admission keeps going while the tier fails (between retries);
:meth:`WriteBehind.wait_admitted` waits for it.

After each batch the writer keeps the tiers within capacity (:func:`~carousel.tiers.enforce_capacity`).
A deterministic memory decides capacity itself, at step boundaries, and hands the storage work
here as calls (:meth:`WriteBehind.submit_calls`), run in order with the writes; it then waits for
the writer by submission count (:meth:`WriteBehind.mark`, :meth:`WriteBehind.wait_for_mark`),
never by time.

Only writable tiers are written: with an adopted read-only tier (last, see ``tiers.check_order``)
stream samples go to the writable tiers above it, and when the read-only tier is the only one
there is no target: the writer still admits (the asynchronous memory) and runs planned calls,
but stores nothing -- the memory keeps such stream samples in the EM only (``RAM_ONLY`` homes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .catalog import Catalog
from .kinds import Codec
from .metrics import MemoryMetrics
from .sched import Yielding
from .tiers import Tier, class_grouped, enforce_capacity, writable_count

log = logging.getLogger("carousel.write_behind")


class WriteBehindError(RuntimeError):
    """The write-behind queue stayed full because the first tier keeps failing."""


class WriteBehind:
    """A thread that moves queued samples into ``tiers[0]`` and keeps tiers within capacity."""

    def __init__(self, tiers: list[Tier], catalog: Catalog, metrics: MemoryMetrics, queue_samples: int,
                 batch: int, block_timeout_s: float, rng: np.random.Generator, codec: Codec,
                 on_error: Callable[[BaseException], None] | None = None, enforce: bool = True,
                 admit: Callable[[np.ndarray, dict[str, np.ndarray], Any], None] | None = None,
                 linger_s: float = 0.0) -> None:
        self._tiers = tiers
        # Where stream samples go: the first tier, unless it is read-only (an adopted folder, the
        # only tier then): None, nothing is stored (see the module docstring).
        self._target: Tier | None = tiers[0] if writable_count(tiers) else None
        self._codec = codec
        self._catalog = catalog
        self._metrics = metrics
        self._limit = queue_samples
        self._batch = batch
        self._timeout = block_timeout_s
        self._rng = rng
        self._enforce = enforce  # False: the memory plans capacity itself (deterministic mode)
        # Items in submission order: (ids, fields) to write, or (None, call) to run.
        self._queue: deque[tuple[np.ndarray | None, dict[str, np.ndarray] | Callable[[], None]]] = deque()
        self._submitted = 0  # items submitted, and items done: a mark is a submission count
        self._done = 0
        # Admission on this thread (the asynchronous memory): writes submitted and not yet through
        # it, with what add() passed along; the first ``_admitted`` items submitted have been.
        self._admit = admit
        self._fresh: deque[tuple[np.ndarray, dict[str, np.ndarray], Any]] = deque()
        self._admitted = 0
        self._queued = 0
        self._reserved = 0  # room promised to add() calls that have not submitted yet
        self._busy = 0  # samples taken by the writer and not yet stored
        self._cond = threading.Condition()
        # Woken for fresh work, the writer waits up to ``linger_s`` for more before it starts, so a
        # trainer's adds of one step after another are admitted and written together: one wake-up,
        # one admission pass and one transaction per few steps instead of per add (an add of 32
        # samples cost the writer ~0.7 ms of CPU, mostly per call). Whoever waits for the writer
        # (flush, stats, a draw waiting for admissions, a blocked add) cuts the wait short (_hurry).
        self._linger = linger_s
        self._hurry = 0
        self._writer_idle = False  # waiting for work: the next submit wakes it, later ones need not
        self._stop = False
        self.last_error: BaseException | None = None
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="carousel-write-behind", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queued + self._busy

    def reserve(self, n: int) -> None:
        """Make room for ``n`` samples, blocking while the queue is full (back-pressure).

        Raises :class:`WriteBehindError` after ``block_timeout_s`` (naming the first tier's
        error if it keeps failing). A queue holding nothing always admits a batch, however large.
        """
        with self._cond:
            room = lambda: self._stop or not self._held() or self._held() + n <= self._limit  # noqa: E731
            if not room():
                t0 = time.monotonic()
                ok = self._wait_for(room, self._timeout)
                self._metrics.write_blocked.inc(time.monotonic() - t0)
                if not ok:
                    raise WriteBehindError(
                        f"write-behind queue full for {self._timeout:.0f} s ({self._queued} samples); "
                        f"the first tier is {'failing: ' + repr(self.last_error) if self.last_error else 'too slow'}")
            if self._stop:
                raise WriteBehindError("the memory is closing")
            self._reserved += n

    def cancel(self, n: int) -> None:
        """Give back room reserved for a batch that will not come."""
        with self._cond:
            self._reserved -= n
            self._cond.notify_all()

    def submit(self, ids: np.ndarray, fields: dict[str, np.ndarray], extra: Any = None) -> None:
        """Queue samples for the first tier, into room taken with :meth:`reserve` (and, with
        ``admit``, for admission, which gets ``extra`` too). Never blocks, never releases the GIL
        (a condition's notify is a lock release)."""
        with self._cond:
            self._reserved -= ids.size
            self._queue.append((ids, fields))
            if self._admit is not None:
                self._fresh.append((ids, fields, extra))
            self._submitted += 1
            self._queued += ids.size
            self._metrics.write_queue.set(self.queued)
            if self._writer_idle or not self._linger or self._queued >= self._batch:
                self._cond.notify_all()

    def submit_calls(self, calls: list[Callable[[], None]]) -> None:
        """Storage work to run on the writer thread (each store keeps one writing thread), after
        everything submitted before; a call that raises is retried like a failed write."""
        if not calls:
            return
        with self._cond:
            for call in calls:
                self._queue.append((None, call))
            self._submitted += len(calls)
            self._cond.notify_all()

    def mark(self) -> int:
        """A point in the submission order: :meth:`wait_for_mark` returns once all before it is done."""
        with self._cond:
            return self._submitted

    def wait_for_mark(self, mark: int) -> None:
        """Wait until every item submitted before ``mark`` is stored or run. Raises
        :class:`WriteBehindError` after ``block_timeout_s`` of no progress while the first tier fails."""
        with self._cond:
            while self._done < mark:
                before = self._done
                self._wait_for(lambda: self._done >= mark or self._done != before, self._timeout)
                if self._done == before and self._done < mark:
                    raise WriteBehindError(
                        f"write-behind made no progress for {self._timeout:.0f} s; the first tier is "
                        f"{'failing: ' + repr(self.last_error) if self.last_error else 'too slow'}")

    def has_room(self, n: int) -> bool:
        """Whether :meth:`reserve` of ``n`` samples would return at once (room may only grow
        meanwhile, unless another thread reserves)."""
        with self._cond:
            return not self._stop and (not self._held() or self._held() + n <= self._limit)

    def admitting(self) -> bool:
        """Whether samples submitted so far still wait for admission."""
        return self._admit is not None and self._admitted < self._submitted

    def wait_admitted(self, timeout_s: float | None = None) -> bool:
        """Wait until every sample submitted before this call has been through admission (at
        once without ``admit``); False on timeout."""
        if self._admit is None:
            return True
        with self._cond:
            target = self._submitted
            return self._wait_for(lambda: self._admitted >= target or self._stop, timeout_s)

    def _wait_for(self, predicate: Callable[[], bool], timeout_s: float | None) -> bool:
        """``Condition.wait_for`` (the caller holds the lock) that first ends the writer's linger:
        someone waits for it now."""
        if predicate():
            return True
        self._hurry += 1
        self._cond.notify_all()
        try:
            return self._cond.wait_for(predicate, timeout=timeout_s)
        finally:
            self._hurry -= 1

    def _admit_fresh(self) -> None:
        """Admission for every write submitted and not yet admitted, in order (writer thread)."""
        if self._admit is None:
            return
        with self._cond:
            fresh = list(self._fresh)
            self._fresh.clear()
            target = self._submitted
        for ids, fields, extra in _joined(fresh):
            try:
                self._admit(ids, fields, extra)
            except Exception as exc:  # noqa: BLE001 - a bug: counted and logged, and the writer goes on
                self._metrics.count_error("admission", exc)
                log.exception("admission of %d samples failed", ids.size)
        with self._cond:
            self._admitted = max(self._admitted, target)
            self._cond.notify_all()

    def _may_overflow(self) -> bool:
        """Whether a tier may be over its capacity. enforce_capacity() looks at every id a tier
        holds in the catalog, under its lock (~0.1 ms at 20 k ids, growing with them), after
        every batch; a tier bounded by a count alone is within it whenever its store, which
        counts in O(1), holds no more (the catalog homes an id in a tier only once it is there)."""
        return any(t.capacity_bytes is not None or t.class_quota > 0 or len(t.store) > t.capacity
                   for t in self._tiers if not t.readonly)  # a read-only tier is never over: not enforced

    def _held(self) -> int:
        return self._queued + self._reserved

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued sample is stored (and every submitted call has run); False on timeout."""
        with self._cond:
            return self._wait_for(lambda: self._done >= self._submitted, timeout_s)

    def close(self, timeout_s: float = 60.0) -> None:
        self.drain(timeout_s)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _take(self) -> tuple[int, np.ndarray | None, dict[str, np.ndarray] | Callable[[], None]] | None:
        """The next work: ``(items, ids, fields)`` -- consecutive writes joined up to ``batch``
        samples -- or ``(1, None, call)``. Everything submitted goes through admission first."""
        while True:
            self._admit_fresh()
            with self._cond:
                self._writer_idle = True
                if not (self._stop or self._fresh or self._queue):
                    # Idle is never behind (whoever hurried it has its answer): woken by an add,
                    # the writer must not take the trainer's core.
                    self._policy.keep_up()
                self._cond.wait_for(lambda: self._stop or self._fresh or self._queue)
                self._writer_idle = False
                if self._linger and self._fresh and not self._stop:
                    self._cond.wait_for(lambda: self._stop or self._hurry > 0 or self._queued >= self._batch,
                                        timeout=self._linger)
                if self._fresh:
                    continue  # admitted before it is written (and before anything after it)
                if not self._queue:
                    return None
                if self._queue[0][0] is None:
                    return 1, None, self._queue.popleft()[1]
                parts = []
                n = 0
                while self._queue and self._queue[0][0] is not None and n < self._batch:
                    parts.append(self._queue.popleft())
                    n += parts[-1][0].size
                self._queued -= n
                self._busy = n
                break
        if len(parts) == 1:  # one add's samples: no copy
            return 1, parts[0][0], parts[0][1]
        ids = np.concatenate([p[0] for p in parts])
        fields = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
        return len(parts), ids, fields

    def _behind(self) -> bool:
        """More queued than one pass takes, or someone (flush, stats, a draw waiting for
        admissions, a blocked add) waiting for the writer: it then competes for the cores as any
        thread does, and yields to the trainer otherwise (carousel.sched.Yielding)."""
        return self._queued >= self._batch or self._hurry > 0

    def _run(self) -> None:
        backoff = 0.05
        self._policy = Yielding()
        while True:
            item = self._take()
            if item is None:
                return
            self._policy.keep_up(self._behind())
            items, ids, fields = item
            records = None
            while True:
                try:
                    if ids is None:
                        fields()  # a planned capacity move or eviction (deterministic mode)
                    elif self._target is None:  # no writable tier: the samples live in the EM only
                        ids = None
                    elif records is None:  # encoded here, off add()'s path (a saliency code costs ~10 us)
                        records = self._metrics.timed_codec("encode", self._codec.encode, fields)
                        sizes = self._codec.nbytes(records)
                        if self._target.store.prefers_chunks:
                            ids, records = class_grouped(ids, {**records, "": sizes}, records["y"], self._rng)
                            sizes = records.pop("")
                    if ids is not None:
                        t0 = time.perf_counter()
                        self._target.store.put_many(ids, records)
                        self._metrics.count_write(self._target.name, ids.size, time.perf_counter() - t0)
                        with self._catalog.lock:
                            self._catalog.nbytes[ids] = sizes
                            self._catalog.home[ids] = 0
                            self._catalog.note_stored(ids)  # a class's first stored samples: swap-ins see it now
                        if self._enforce and self._may_overflow():
                            enforce_capacity(self._tiers, self._catalog, self._metrics, self._rng)
                    self.last_error = None
                    backoff = 0.05
                    break
                except Exception as exc:  # noqa: BLE001 - a store error or a bug: never die silently
                    # Keep the batch and retry: the samples stay queued (their home says so),
                    # and the error reaches add() callers once the queue fills.
                    self.last_error = exc
                    self._metrics.count_error("write_behind", exc)
                    log.warning("write-behind to %s failed, retrying in %.2f s: %s",
                                self._tiers[0].name if self._target is None else self._target.name, backoff, exc)
                    if self._on_error:
                        self._on_error(exc)
                    with self._cond:
                        if self._stop:
                            return
                        self._cond.wait(backoff)
                    self._admit_fresh()  # samples added meanwhile still reach the EM
                    backoff = min(backoff * 2, 2.0)
            with self._cond:
                self._busy = 0
                self._done += items
                self._metrics.write_queue.set(self.queued)
                self._cond.notify_all()


def _joined(fresh: list[tuple[np.ndarray, dict[str, np.ndarray], Any]]):
    """Consecutive submissions as one admission each where they join (same fields, and their
    ``extra`` all None or all arrays): admission runs per sample in order, so joining changes
    nothing but the number of calls."""
    i = 0
    while i < len(fresh):
        j = i + 1
        ids, fields, extra = fresh[i]
        while (j < len(fresh) and fresh[j][1].keys() == fields.keys()
               and (fresh[j][2] is None) == (extra is None)
               and (extra is None or isinstance(extra, np.ndarray) and isinstance(fresh[j][2], np.ndarray))):
            j += 1
        if j == i + 1:
            yield ids, fields, extra
        else:
            part = fresh[i:j]
            yield (np.concatenate([p[0] for p in part]),
                   {k: np.concatenate([p[1][k] for p in part]) for k in fields},
                   None if extra is None else np.concatenate([p[2] for p in part]))
        i = j
