"""The swap engine: refills EM slots with stored samples, off the trainer's path.

The trainer only hands over ``(slot, victim id, class)`` requests (from ``observe``). Two jobs, on
a worker thread, a thread running an asyncio loop and a small I/O thread pool:

- **prefetch**: keep, per class, a queue of already-decoded candidates -- uniformly random stored
  samples of that class that are neither in the EM nor already queued -- read from the tiers in a
  small thread pool and decoded by the memory's codec (a saliency sample is completed here);
- **swap**: for each request take a candidate of the asked class from its queue (a *hit*) or read
  one on demand (a *miss*), then copy it into the slot under the EM lock -- a memcpy -- if the slot
  still holds the victim. Hits are copied in on the engine's worker thread (below); only misses
  go through the loop to the I/O pool.

Everything here runs in the trainer's interpreter, so every stretch of Python it runs holds the
GIL the trainer needs when its step ends. Candidates therefore travel in blocks (ids and field
arrays of many samples: one numpy copy per field, never a Python loop over samples), a class's
queue is refilled only once it is half empty (a few large reads instead of one small read per
step), and a swap served from the queues takes no hop through the I/O pool.

So ``sample()`` never waits on storage: it only ever takes the EM lock, which nobody holds during
I/O. A candidate enters the EM only through this engine and is marked ``prefetched`` in the
catalog while queued, so no sample is ever in two slots. Requests beyond ``max_pending`` are
dropped and counted (``carousel_swap_skipped_total{reason="backlog"}``); in adaptive mode the
memory lowers its swap ratio instead when the lag grows.

Swap requests, and the work of the asynchronous memory's ``observe`` beyond its input checks
(:meth:`post`: statistics, victims, the swap-in choice), run on a worker thread fed by a
``queue.SimpleQueue``: the trainer's ``observe`` is a check and a queue append that makes no
system call (so it keeps the GIL), and :meth:`settle` waits for what was posted (``stats()``,
``flush()``, ...).

``workers = 0`` is the synchronous ablation: :meth:`swap_now` does the same work on the caller's
thread, storage reads included, as CarM's "sync" baseline.

A deterministic memory (:mod:`carousel.step_swaps`) uses the engine for reads alone:
:meth:`read_exact` reads the candidates the memory chose, no more and no others, and the memory
copies them into the EM itself at a step boundary (no prefetcher runs then).

Why one module of ~620 lines: it is one class, :class:`SwapEngine`, whose threads share one
state -- the prefetch queues, the pending count, the ``prefetched`` marks in the catalog -- under
one lock order (catalog, then EM; the queues' lock alone); its reads, queues and copies are the
steps of one swap and are not used apart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from storage_backends import CorruptRecordError, MissingIdsError, StoreError

from .catalog import EVICTED, Catalog
from .config import WEIGHT_FIELD
from .em_pool import EMPool
from .grouping import group_ranks
from .kinds import Codec
from .metrics import MemoryMetrics
from .sched import Yielding
from .tiers import Tier

log = logging.getLogger("carousel.swap_engine")

#: Decoded swap-in candidates: their ids and a dict of EM field arrays, one row per id.
Candidates = tuple[np.ndarray, dict[str, np.ndarray]]


def _no_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """``bind_loop`` of a store wrapper that has none (the tests' fault wrappers)."""


#: A recount of the stored candidates by class waits at least this many times the last one's
#: duration (see :meth:`SwapEngine.available_by_class`).
RECOUNT_EVERY = 50


def _join(parts: list[Candidates]) -> Candidates:
    """Blocks of candidates as one block."""
    parts = [p for p in parts if p[0].size] or parts[:1]
    if len(parts) == 1:
        return parts[0]
    return (np.concatenate([p[0] for p in parts]),
            {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]})


class Merging:
    """Work for :meth:`SwapEngine.post_merging`: ``fn``, which takes a list of argument tuples, so
    that calls posted one after another can run as one, ``fn([args, ...])``.

    Why: at accelerator speed a step is a few milliseconds, and each call of the asynchronous
    memory's observe work costs the worker ~0.3-0.4 ms whatever its size (statistics, victims, the
    swap-in choice, one swap: numpy and Python calls on a few dozen ids), on the trainer's GIL
    and cores. Several steps' observations in one call cost little more than one."""

    def __init__(self, fn: Callable[[list[tuple]], None], linger_s: float, most: int) -> None:
        self.fn, self.linger_s, self.most = fn, linger_s, most


# The worker is behind when more than this many items wait in its inbox (a merged observe call
# takes up to 8): it then competes for the cores as any thread does (carousel.sched.Yielding).
BEHIND_POSTS = 16


_io_policy = threading.local()  # each I/O thread's Yielding


def _io_thread_started() -> None:
    _io_policy.p = Yielding()


def _yielding(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run on an I/O thread after that thread set its policy for the work (Yielding)."""
    def run(*args: Any) -> Any:
        _io_policy.p.keep_up()
        return fn(*args)
    return run


class SwapEngine:
    def __init__(self, pool: EMPool, catalog: Catalog, tiers: list[Tier], metrics: MemoryMetrics,
                 workers: int, prefetch_depth: int, seed: int, codec: Codec, max_pending: int = 4096) -> None:
        self._pool = pool
        self._codec = codec
        self._catalog = catalog
        self._tiers = tiers
        self._metrics = metrics
        self._depth = prefetch_depth
        self._rng = np.random.default_rng([seed, 0x5A9])
        self._max_pending = max_pending
        # Per class, decoded candidates in blocks (ids, fields), oldest first; counts beside them.
        self._ready: dict[int, deque[Candidates]] = {}
        self._ready_count: dict[int, int] = {}
        self._ready_lock = threading.Lock()
        self._available: dict[int, int] = {}  # the prefetcher's last look at the catalog
        self._available_t = -math.inf
        self._available_version = -1  # the catalog's classes_version when last counted
        self._recount_s = 0.0  # how long that count took
        # Labelled children resolved once: a labels() lookup costs ~1.5 us, a dozen a swap.
        m = metrics
        self._hits, self._misses = m.prefetch.labels(result="hit"), m.prefetch.labels(result="miss")
        self._no_candidate = m.swap_skipped.labels(reason="no_candidate")
        self._slot_reused = m.swap_skipped.labels(reason="slot_reused")
        self._swapped_in, self._swapped_out = m.swaps.labels(direction="in"), m.swaps.labels(direction="out")
        self.pending = 0  # swap requests not yet carried out; changed under _pending_lock
        self._pending_lock = threading.Lock()
        self.last_error: BaseException | None = None
        self.workers = workers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: threading.Thread | None = None
        if workers > 0:
            self._exec = ThreadPoolExecutor(workers, thread_name_prefix="carousel-swap-io",
                                            initializer=_io_thread_started)
            self._loop = asyncio.new_event_loop()
            self._started = threading.Event()
            self._thread = threading.Thread(target=self._run_loop, name="carousel-swap", daemon=True)
            self._thread.start()
            self._started.wait()
            for tier in tiers:  # a store that reads asynchronously inside runs its reads on this loop
                getattr(tier.store, "bind_loop", _no_loop)(self._loop)
            # Posted work (observe's) and swap requests: a plain thread on a SimpleQueue, whose
            # put() wakes it without a system call. Waking the loop above takes a write to its
            # self-pipe, and a socket send releases the GIL on the trainer's thread, handing it
            # to whichever background thread waits for it, for the rest of that one's stretch.
            self._inbox: queue.SimpleQueue = queue.SimpleQueue()
            self._worker = threading.Thread(target=self._work, name="carousel-swap-worker", daemon=True)
            self._worker.start()

    # ---- the trainer's side ------------------------------------------------------------------
    def request(self, slots: np.ndarray, victims: np.ndarray, classes: np.ndarray) -> None:
        """Queue swaps; returns at once. Asynchronous mode only."""
        assert self._worker is not None
        with self._pending_lock:
            if self.pending + slots.size > self._max_pending:
                self._metrics.swap_skipped.labels(reason="backlog").inc(slots.size)
                return
            self.pending += slots.size
            self._metrics.swap_lag.set(self.pending)
        if threading.current_thread() is self._worker:  # from posted work: served right away
            self._serve(slots, victims, classes)
        else:
            self._inbox.put((self._serve, (slots, victims, classes)))

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the engine's worker thread, after everything posted before;
        returns at once (a queue append, ~1 us: no system call, the GIL kept). An exception is
        counted and logged as an ``observe`` error. Asynchronous mode only."""
        assert self._worker is not None
        self._inbox.put((fn, args))

    def post_merging(self, work: Merging, *args: Any) -> None:
        """:meth:`post` ``work.fn([args])``, which the worker may run as one call with the same work
        posted right after it, ``work.fn([args, ...])``: it lingers up to ``work.linger_s`` for more,
        up to ``work.most`` of them, and never past anything else posted (which runs after)."""
        assert self._worker is not None
        self._inbox.put((work, args))

    def settle(self, timeout_s: float | None = 60.0) -> bool:
        """Wait until everything :meth:`post`-ed before this call has run; False on timeout."""
        worker = self._worker  # None once closed (by another thread, maybe, while we look)
        if worker is None or threading.current_thread() is worker:
            return True  # nothing posted, or called by posted work itself: it runs in order anyway
        done = threading.Event()
        self._inbox.put((done.set, ()))  # the inbox runs in order: after every post before
        return done.wait(timeout_s)

    def _work(self) -> None:
        """The worker thread: run what was posted, in order, until the ``None`` at close."""
        taken: tuple[Any, tuple] | None = None  # the next item, already taken from the inbox
        policy = Yielding()
        while True:
            # Before it waits for work and before each piece of it: under SCHED_BATCH while the
            # trainer takes short steps (woken by its observe, the worker must not take its core)
            # and the worker is not behind (more posted than a merged call takes).
            policy.keep_up(behind=self._inbox.qsize() > BEHIND_POSTS)
            fn, args = taken if taken is not None else self._inbox.get()
            taken = None
            if fn is None:
                return
            if isinstance(fn, Merging):
                (fn, args), taken = self._merged(fn, args)
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - counted, logged, and the engine goes on
                self._record_error("observe" if fn is not self._serve else "swap", exc)

    def _merged(self, work: Merging, args: tuple) -> tuple[tuple[Callable[..., None], tuple], tuple[Any, tuple] | None]:
        """``work`` and the same work posted after it, as one call; and the first item of something
        else, taken from the inbox meanwhile (to run next), if any."""
        batch = [args]
        deadline = time.monotonic() + work.linger_s
        while len(batch) < work.most:
            try:
                left = deadline - time.monotonic()
                item = self._inbox.get(timeout=left) if left > 0 else self._inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] is not work:
                return (work.fn, (batch,)), item
            batch.append(item[1])
        return (work.fn, (batch,)), None

    def _serve(self, slots: np.ndarray, victims: np.ndarray, classes: np.ndarray) -> None:
        """A swap request, on the worker thread: prefetched candidates are copied in here (a
        memcpy); what the queues cannot serve goes to the loop, to be read on the I/O pool."""
        left = np.zeros(0, np.int64)
        try:
            left = self._swap(slots, victims, classes, None)
        finally:
            if left.size:
                self._loop.call_soon_threadsafe(self._enqueue, slots[left], victims[left], classes[left])
            self._done(slots.size - left.size)
        if self._depth and self._below_half(self._available, self._ready_counts()):
            self._loop.call_soon_threadsafe(self._wake.set)  # the prefetcher refills the class

    def _done(self, n: int) -> None:
        """``n`` swap requests carried out (or given up)."""
        with self._pending_lock:
            self.pending -= n
            self._metrics.swap_lag.set(self.pending)

    def swap_now(self, slots: np.ndarray, victims: np.ndarray, classes: np.ndarray) -> None:
        """Carry the swaps out on this thread, storage reads included (the synchronous ablation)."""
        self._swap(slots, victims, classes, lambda cls, n: self._read_candidates(cls, n))

    def read_exact(self, ids: np.ndarray) -> Future:
        """Read and decode exactly ``ids`` (candidates a deterministic memory reserved; distinct), on
        the I/O pool (at once on this thread with ``workers = 0``). The future's result is ``(got,
        fields)``: per id, in order, whether it was read (False where a fault kept it from being
        read), and its decoded fields as one block (zeros where not read)."""
        if self.workers == 0:
            done: Future = Future()
            done.set_result(self._read_exact(ids))
            return done
        return self._exec.submit(_yielding(self._read_exact), ids)

    def _read_exact(self, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        # A deterministic memory homes a demoted sample in its new tier when it decides the move,
        # and the writer carries the move out later: write to the lower tier, then delete from
        # this one. So a sample is in its catalog home or in a tier above it, and looking from the
        # top tier down finds it even while it moves (missing above means already written below).
        # The homes are looked up when the read starts, and a move may be decided after that (a
        # boundary plans demotions while this read waits, and the writer may carry one out before
        # the read reaches the top tier): ids missed whose home moved down since are looked up
        # again under their new home -- else whether a swap happens would depend on timing.
        got = np.zeros(ids.size, dtype=bool)
        block: dict[str, np.ndarray] | None = None
        looked = np.full(ids.size, -1, dtype=np.int64)  # the home each id was last looked for under
        while True:
            with self._catalog.lock:
                homes = self._catalog.home[ids].astype(np.int64)
            again = (homes > looked) & ~got
            if not again.any():
                break
            for tier in self._tiers:
                # not missed here already, and not found in a tier above during this pass
                want = np.flatnonzero(again & (homes >= tier.index) & (looked < tier.index) & ~got)
                if not want.size:
                    continue
                read, fields = self._read_present(tier, ids[want])
                if not read.size:
                    continue
                at = want[np.isin(ids[want], read)]  # the read ids keep their order: aligned with ``fields``
                if block is None:
                    block = {k: np.zeros((ids.size, *v.shape[1:]), v.dtype) for k, v in fields.items()}
                for k, v in fields.items():
                    block[k][at] = v
                got[at] = True
            looked = np.where(again, homes, looked)
        if block is None:
            block = {k: np.zeros((ids.size, *shape), dtype) for k, (shape, dtype) in self._codec.fields.items()}
        return got, block

    def _read_present(self, tier: Tier, ids: np.ndarray) -> Candidates:
        """Those of ``ids`` that ``tier`` holds, decoded, in the order given (faults counted and left out)."""
        t0 = time.perf_counter()
        try:
            data = tier.store.get_many(ids)
        except MissingIdsError as exc:
            present = ids[~np.isin(ids, exc.ids)]
            return self._read_present(tier, present) if present.size else self._none()
        except CorruptRecordError as exc:
            self._evict_corrupt(exc)
            good = ids[~np.isin(ids, exc.ids)]
            return self._read_present(tier, good) if good.size else self._none()
        except StoreError as exc:
            self._record_error("read", exc)
            return self._none()
        self._metrics.storage_reads.labels(tier=tier.name).inc(ids.size)
        self._metrics.storage_read_seconds.labels(tier=tier.name).inc(time.perf_counter() - t0)
        return self._rows(ids, data)

    def prefetched(self) -> int:
        """Decoded candidates queued, all classes."""
        with self._ready_lock:
            return sum(self._ready_count.values())

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until no swap request is pending (tests, checkpoints)."""
        if self._loop is None:
            return True
        t0 = time.monotonic()
        if not self.settle(timeout_s):  # requests still in the worker's inbox are pending too
            return False
        timeout_s = max(0.0, timeout_s - (time.monotonic() - t0))
        done = threading.Event()

        async def probe() -> None:
            while self.pending:
                await asyncio.sleep(0.001)
            done.set()

        asyncio.run_coroutine_threadsafe(probe(), self._loop)
        return done.wait(timeout_s)

    def close(self) -> None:
        if self._worker is not None:
            self._inbox.put((None, ()))  # after everything posted before: none of it is lost
            self._worker.join(30)
            self._worker = None
        if self._loop is not None:
            for tier in self._tiers:  # before the loop stops: a read from now on runs on the store's own
                getattr(tier.store, "bind_loop", _no_loop)(None)

            async def shutdown() -> None:
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(30)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._exec.shutdown(wait=True)
            self._loop.close()
            self._loop = None
        with self._ready_lock:  # queued candidates go back to the pool
            for q in self._ready.values():
                for ids, _ in q:
                    with self._catalog.lock:
                        self._catalog.prefetched[ids] = False
            self._ready.clear()
            self._ready_count.clear()

    # ---- the engine thread ---------------------------------------------------------------------
    def _run_loop(self) -> None:
        self._loop_policy = Yielding()
        asyncio.set_event_loop(self._loop)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._wake = asyncio.Event()
        self._tasks = [self._loop.create_task(self._swapper())]
        if self._depth > 0:
            self._tasks.append(self._loop.create_task(self._prefetcher()))
        self._loop.call_soon(self._started.set)
        self._loop.run_forever()

    def _enqueue(self, slots: np.ndarray, victims: np.ndarray, classes: np.ndarray) -> None:
        self._queue.put_nowait((slots, victims, classes))

    async def _swapper(self) -> None:
        """The swaps the prefetch queues could not serve (misses): read on the I/O pool."""
        loop = asyncio.get_running_loop()
        while True:
            slots, victims, classes = await self._queue.get()
            self._loop_policy.keep_up()
            try:
                await loop.run_in_executor(self._exec, _yielding(self._swap), slots, victims, classes,
                                           self._read_candidates)
            except Exception as exc:  # noqa: BLE001 - counted, logged, and the engine goes on
                self._record_error("swap", exc)
            finally:
                self._done(slots.size)
                self._wake.set()

    async def _prefetcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._loop_policy.keep_up()  # woken at least every 50 ms: follows the trainer's steps
                wanted = self._refill_plan()
                if wanted:  # every class of the plan in one trip to the I/O pool
                    got = await loop.run_in_executor(self._exec, _yielding(self._read_plan), wanted)
                    with self._ready_lock:
                        for cls, cands in got:
                            self._queue_ready(cls, cands)
                    self._metrics.prefetch_depth.set(self.prefetched())
            except Exception as exc:  # noqa: BLE001 - counted, logged, and the engine goes on
                self._record_error("prefetch", exc)
                await asyncio.sleep(0.1)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=0.05)
            except asyncio.TimeoutError:
                pass

    def _read_plan(self, wanted: list[tuple[int, int]]) -> list[tuple[int, Candidates]]:
        return [(cls, self._read_candidates(cls, n)) for cls, n in wanted]

    def _refill_plan(self) -> list[tuple[int, int]]:
        """``(class, how many)`` to read so every class with stored candidates has its share of
        ``prefetch_depth`` decoded and ready -- never more than ``prefetch_depth`` in all, also
        when there are more classes than that (an open-world stream): then the classes that get
        a candidate this round are drawn at random.

        A class is refilled once its queue is down to half its share (or empty), to its share:
        a read of many samples every few steps rather than a read of a few every step. The
        catalog's counts of stored samples (a pass over every id) are looked at again only when
        a class needs refilling, and every quarter second for classes that appear."""
        have = self._ready_counts()
        available = self._available
        if self._below_half(available, have):
            available = self.available_by_class(max_age_s=0.0)
        else:
            available = self.available_by_class()
        if not available:
            return []
        per_class = max(1, self._depth // len(available))
        budget = self._depth - sum(have.values())
        classes = list(available)
        if len(classes) > self._depth:
            classes = [classes[i] for i in self._rng.permutation(len(classes))]
        plan = []
        for c in classes:
            if budget <= 0:
                break
            target = min(per_class, available[c])  # ``available`` counts the queued ones too
            h = have.get(c, 0)
            if 2 * h >= target and h:
                continue
            k = min(target - h, budget)
            if k > 0:
                plan.append((c, k))
                budget -= k
        return plan

    def available_by_class(self, max_age_s: float = 0.25, want: set[int] | frozenset[int] = frozenset()
                           ) -> dict[int, int]:
        """:meth:`Catalog.available_by_class` as looked at at most ``max_age_s`` ago. When it lacks
        a class in ``want``: counted again at once if a class became available since (its first
        samples stored, or an adopted folder's class brought by the stream: the catalog's
        ``classes_version``), else if the count is over 10 ms old (a sample of a class that had
        none left outside the EM went back to storage). What it steers -- how much to prefetch,
        which classes a swap may refill -- can take a count that old: a class that ran out
        meanwhile skips a swap (``no_candidate``).

        The count is a pass over every id in the catalog (~0.15 ms at 60 k ids, ~2.5 ms at 1 M), so
        apart from a new class, it is taken again no sooner than :data:`RECOUNT_EVERY` times its
        last duration: at most ~2 % of a core, however many samples are stored (at 1 M stored ids
        it had cost the engine's loop ~0.5 ms of CPU a training step, holding the trainer's GIL)."""
        age = time.monotonic() - self._available_t
        floor = RECOUNT_EVERY * self._recount_s
        if age > max(max_age_s, floor) or (
                not want <= self._available.keys()
                and (self._catalog.classes_version != self._available_version or age > max(0.01, floor))):
            self.refresh_available()
        return self._available

    def refresh_available(self) -> None:
        """Count again now (the memory calls this after a flush: what is stored changed)."""
        version = self._catalog.classes_version  # read first: a bump during the count recounts later
        t0 = time.monotonic()
        self._available = self._catalog.available_by_class()
        self._available_t = time.monotonic()
        self._recount_s = self._available_t - t0
        self._available_version = version

    def _ready_counts(self) -> dict[int, int]:
        with self._ready_lock:
            return dict(self._ready_count)

    def _below_half(self, available: dict[int, int], have: dict[int, int]) -> bool:
        """Whether a class is down to half its share of the queues (by the last look at the catalog)."""
        if not available:
            return False
        per_class = max(1, self._depth // len(available))
        return any(2 * have.get(c, 0) < min(per_class, k) for c, k in available.items())

    # ---- shared by both modes ------------------------------------------------------------------
    def _read_candidates(self, cls: int, n: int) -> Candidates:
        """Read up to ``n`` random stored samples of ``cls`` that are not in the EM, decoded."""
        with self._catalog.lock:
            ids = self._catalog.draw_swap_in(cls, n, self._rng)
            if not ids.size:
                return self._none()
            self._catalog.prefetched[ids] = True  # reserved: no one else will draw them
            homes = self._catalog.home[ids].copy()
        out: list[Candidates] = []
        got = 0
        for tier in self._tiers:
            sel = ids[homes == tier.index]
            if not sel.size or got >= ids.size:
                continue
            part = (self._read_chunks(tier, sel, cls, ids.size - got) if tier.store.prefers_chunks
                    else self._read_from(tier, sel))
            out.append(part)
            got += part[0].size
        cands = _join(out) if out else self._none()
        lost = ids[~np.isin(ids, cands[0])]
        if lost.size:
            with self._catalog.lock:
                self._catalog.prefetched[lost] = False
        return cands

    def _read_chunks(self, tier: Tier, chosen: np.ndarray, cls: int, want: int) -> Candidates:
        """Read the chunks holding ``chosen`` ids, one at a time, and keep every eligible sample
        of ``cls`` in them (up to ``want``): one disk read, many candidates (the write path
        groups a chunked tier by class)."""
        try:
            chunks = tier.store.chunk_of(chosen)
        except MissingIdsError:
            return self._read_from(tier, chosen)  # some moved meanwhile: read them one by one
        except StoreError as exc:
            self._record_error("read", exc)
            return self._none()
        out: list[Candidates] = []
        got = 0
        cat = self._catalog
        for c in dict.fromkeys(chunks.tolist()):  # in the random order the ids were drawn
            if got >= want:
                break
            t0 = time.perf_counter()
            try:
                chunk = tier.store.get_chunk(int(c))
            except CorruptRecordError as exc:
                self._evict_corrupt(exc)
                continue
            except (StoreError, IndexError) as exc:
                self._record_error("read", exc)
                continue
            self._metrics.storage_reads.labels(tier=tier.name).inc(chunk.ids.size)
            self._metrics.storage_read_seconds.labels(tier=tier.name).inc(time.perf_counter() - t0)
            ids = chunk.ids
            with cat.lock:
                ok = (ids < cat.n)
                ok[ok] = ((cat.label[ids[ok]] == cls) & (cat.home[ids[ok]] == tier.index) & (cat.slot[ids[ok]] < 0)
                          & (~cat.prefetched[ids[ok]] | np.isin(ids[ok], chosen)))
                pos = np.flatnonzero(ok)[: want - got]
                cat.prefetched[ids[pos]] = True
            part = self._rows(ids[pos], {k: v[pos] for k, v in chunk.fields.items()})
            out.append(part)
            got += part[0].size
        return _join(out) if out else self._none()

    def _read_from(self, tier: Tier, ids: np.ndarray) -> Candidates:
        t0 = time.perf_counter()
        try:
            data = tier.store.get_many(ids)
        except MissingIdsError:
            # Demoted a moment ago: read each where the catalog says it is now.
            with self._catalog.lock:
                moved = self._catalog.home[ids].copy()
            out = []
            for other in self._tiers:
                sel = ids[(moved == other.index)]
                if sel.size and other is not tier:
                    try:
                        out.append(self._rows(sel, other.store.get_many(sel)))
                    except StoreError as exc:
                        self._record_error("read", exc)
            return _join(out) if out else self._none()
        except CorruptRecordError as exc:
            self._evict_corrupt(exc)
            good = ids[~np.isin(ids, exc.ids)]
            return self._read_from(tier, good) if good.size else self._none()
        except StoreError as exc:
            self._record_error("read", exc)
            return self._none()
        self._metrics.storage_reads.labels(tier=tier.name).inc(ids.size)
        self._metrics.storage_read_seconds.labels(tier=tier.name).inc(time.perf_counter() - t0)
        return self._rows(ids, data)

    def _rows(self, ids: np.ndarray, data: dict[str, np.ndarray]) -> Candidates:
        """Stored records -> decoded candidates (one block)."""
        if not ids.size:
            return self._none()
        try:
            data = self._metrics.timed_codec("decode", self._codec.decode, data)
        except Exception as exc:  # noqa: BLE001 - a record that passed its CRC but does not decode
            self._record_error("decode", exc)
            return self._none()
        return ids, data

    def _none(self) -> Candidates:
        """No candidates: an empty block with every EM field."""
        return np.zeros(0, np.int64), {k: np.zeros((0, *shape), dtype) for k, (shape, dtype) in self._codec.fields.items()}

    def _queue_ready(self, cls: int, cands: Candidates, front: bool = False) -> None:
        """Queue a block of ``cls``'s candidates (caller holds ``_ready_lock``)."""
        k = cands[0].size
        if not k:
            return
        q = self._ready.setdefault(cls, deque())
        if front:
            q.appendleft(cands)
        else:
            q.append(cands)
        self._ready_count[cls] = self._ready_count.get(cls, 0) + k

    def _take_ready(self, classes: list[int], wanted: list[int]) -> list[Candidates]:
        """Up to ``wanted[j]`` queued candidates of each ``classes[j]``, oldest first, one block per
        class (empty where none is queued); the queues' lock taken once for all of them."""
        out: list[Candidates] = []
        with self._ready_lock:
            for cls, n in zip(classes, wanted):
                parts: list[Candidates] = []
                got = 0
                q = self._ready.get(cls)
                while q and got < n:
                    ids, fields = q[0]
                    k = min(n - got, ids.size)
                    if k == ids.size:
                        parts.append(q.popleft())
                    else:  # split the block: its head goes, its tail stays queued
                        parts.append((ids[:k], {name: v[:k] for name, v in fields.items()}))
                        q[0] = (ids[k:], {name: v[k:] for name, v in fields.items()})
                    got += k
                if got:
                    self._ready_count[cls] -= got
                out.append(_join(parts) if parts else self._none())
        return out

    def _swap(self, slots: np.ndarray, victims: np.ndarray, classes: np.ndarray, read) -> np.ndarray:
        """Refill ``slots`` (holding ``victims``) with candidates of ``classes``: queued ones first,
        then ``read(cls, n)`` for the rest. With ``read=None`` only queued ones are used; returns
        the positions (into ``slots``) left for a read then, else an empty array. All copies go
        into the EM in one write.

        Every class of the request at once (a swap spans most of the EM's classes, and a pass of
        Python and numpy calls per class cost ~25 us each on the worker, a thread that shares the
        trainer's GIL): the request's positions grouped by class, each class's candidates taken
        in the same order, and one check of all of them."""
        if not slots.size:
            return np.zeros(0, np.int64)
        groups = group_ranks(classes)  # positions grouped by class, in request order within it
        uniq, inv, wanted, order = groups.keys, groups.index, groups.counts, groups.order
        taken = self._take_ready(uniq.tolist(), wanted.tolist())
        of_class = np.repeat(np.arange(uniq.size), [t[0].size for t in taken])
        cands = _join(taken)
        ok = self._eligible(cands[0])
        if not ok.all():
            of_class = of_class[ok]
            cands = (cands[0][ok], {k: v[ok] for k, v in cands[1].items()})
        hits = np.bincount(of_class, minlength=uniq.size)
        got = hits
        if read is not None and (hits < wanted).any():
            # The misses, read class by class (the I/O pool's path), each after its class's hits.
            bounds = np.concatenate([[0], np.cumsum(hits)])
            parts: list[Candidates] = []
            got = hits.copy()
            for j, cls in enumerate(uniq.tolist()):
                parts.append((cands[0][bounds[j]:bounds[j + 1]],
                              {k: v[bounds[j]:bounds[j + 1]] for k, v in cands[1].items()}))
                if hits[j] < wanted[j]:
                    more = read(cls, int(wanted[j] - hits[j]))
                    parts.append(more)
                    got[j] += more[0].size
            cands = _join(parts)
            if (got < wanted).any():
                self._no_candidate.inc(int((wanted - got).sum()))
        self._hits.inc(int(hits.sum()))
        self._misses.inc(int(got.sum() - hits.sum()))
        served = groups.ordered_rank < got[inv[order]]  # in class order: the first got[c] of class c
        if got.any():
            targets = order[served]
            self._copy_in(cands, np.repeat(uniq, got), slots[targets], victims[targets])
        return order[~served] if read is None else np.zeros(0, np.int64)

    def _copy_in(self, cands: Candidates, classes: np.ndarray, slots: np.ndarray, victims: np.ndarray) -> None:
        """Copy candidates into their slots where the victim is still there; put the others back."""
        ids, fields = cands
        with self._catalog.lock:
            # retain() may have brought a candidate into the EM since it was read: a sample
            # must never sit in two slots, so such a candidate is skipped.
            fresh = self._catalog.slot[ids] < 0
            if not fresh.all():
                self._catalog.prefetched[ids[~fresh]] = False
                self._no_candidate.inc(int((~fresh).sum()))
                ids, classes, slots, victims = ids[fresh], classes[fresh], slots[fresh], victims[fresh]
                fields = {k: v[fresh] for k, v in fields.items()}
            if WEIGHT_FIELD in fields:  # a coreset weight set by retain() since the sample was stored
                fields = {**fields, WEIGHT_FIELD: self._catalog.weight[ids]}
            written = self._pool.write(slots, ids, fields, expect=victims)
            self._catalog.slot[victims[written]] = -1
            self._catalog.slot[ids[written]] = slots[written]
            self._catalog.prefetched[ids[written]] = False
        if not written.all():  # the victim's slot was taken by admission meanwhile
            self._slot_reused.inc(int((~written).sum()))
            back = ~written
            with self._ready_lock:
                for cls in np.unique(classes[back]).tolist():
                    sel = back & (classes == cls)
                    self._queue_ready(cls, (ids[sel], {k: v[sel] for k, v in fields.items()}), front=True)
        n = int(written.sum())
        self._swapped_out.inc(n)
        self._swapped_in.inc(n)

    def _eligible(self, ids: np.ndarray) -> np.ndarray:
        """Which queued candidates are still eligible: not evicted meanwhile, not brought into the
        EM by retain(). The others' reservations end."""
        if not ids.size:
            return np.ones(0, np.bool_)
        with self._catalog.lock:
            ok = (self._catalog.home[ids] != EVICTED) & (self._catalog.slot[ids] < 0)
            if not ok.all():
                self._catalog.prefetched[ids[~ok]] = False
        return ok

    def _evict_corrupt(self, exc: CorruptRecordError) -> None:
        """The store quarantined ``exc.ids``: they are gone for good, and counted."""
        with self._catalog.lock:
            self._catalog.home[exc.ids] = EVICTED
        self._metrics.evictions.labels(reason="corrupt").inc(exc.ids.size)
        self._record_error("read", exc)

    def _record_error(self, op: str, exc: BaseException) -> None:
        self.last_error = exc
        self._metrics.count_error(op, exc)
        log.warning("swap engine %s error: %r", op, exc)
