"""The swap engine: refills EM slots with stored samples, off the trainer's path.

The trainer only hands over ``(slot, victim id, class)`` requests (from ``observe``). One
background thread runs an asyncio loop with two jobs:

- **prefetch**: keep, per class, a queue of already-decoded candidates -- uniformly random stored
  samples of that class that are neither in the EM nor already queued -- read from the tiers in a
  small thread pool and decoded by the memory's codec (a saliency sample is completed here);
- **swap**: for each request take a candidate of the asked class from its queue (a *hit*) or read
  one on demand (a *miss*), then copy it into the slot under the EM lock -- a memcpy -- if the slot
  still holds the victim.

So ``sample()`` never waits on storage: it only ever takes the EM lock, which nobody holds during
I/O. A candidate enters the EM only through this engine and is marked ``prefetched`` in the
catalog while queued, so no sample is ever in two slots. Requests beyond ``max_pending`` are
dropped and counted (``carousel_swap_skipped_total{reason="backlog"}``); in adaptive mode the
memory lowers its swap ratio instead when the lag grows.

The asynchronous memory also hands the engine's thread the work of ``observe`` beyond its input
checks (:meth:`post`: statistics, victims, the swap-in choice), so the trainer's ``observe`` is a
check and a queue append; :meth:`settle` waits for what was posted (``stats()``, ``flush()``, ...).

``workers = 0`` is the synchronous ablation: :meth:`swap_now` does the same work on the caller's
thread, storage reads included, as CarM's "sync" baseline.

A deterministic memory (:mod:`carousel.step_swaps`) uses the engine for reads alone:
:meth:`read_exact` reads the candidates the memory chose, no more and no others, and the memory
copies them into the EM itself at a step boundary (no prefetcher runs then).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from storage_backends import CorruptRecordError, MissingIdsError, StoreError

from .catalog import EVICTED, Catalog
from .config import WEIGHT_FIELD
from .em_pool import EMPool
from .kinds import Codec
from .metrics import MemoryMetrics
from .tiers import Tier

log = logging.getLogger("carousel.swap_engine")


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
        self._ready: dict[int, deque[tuple[int, dict[str, np.ndarray]]]] = {}
        self._ready_lock = threading.Lock()
        self.pending = 0  # swap requests not yet carried out; changed under _pending_lock
        self._pending_lock = threading.Lock()
        self.last_error: BaseException | None = None
        self.workers = workers
        self._loop: asyncio.AbstractEventLoop | None = None
        if workers > 0:
            self._exec = ThreadPoolExecutor(workers, thread_name_prefix="carousel-swap-io")
            self._loop = asyncio.new_event_loop()
            self._started = threading.Event()
            self._thread = threading.Thread(target=self._run_loop, name="carousel-swap", daemon=True)
            self._thread.start()
            self._started.wait()

    # ---- the trainer's side ------------------------------------------------------------------
    def request(self, slots: np.ndarray, victims: np.ndarray, classes: np.ndarray) -> None:
        """Queue swaps; returns at once. Asynchronous mode only."""
        assert self._loop is not None
        with self._pending_lock:
            if self.pending + slots.size > self._max_pending:
                self._metrics.swap_skipped.labels(reason="backlog").inc(slots.size)
                return
            self.pending += slots.size
            self._metrics.swap_lag.set(self.pending)
        if threading.current_thread() is self._thread:  # from posted work: no wake-up needed
            self._enqueue(slots, victims, classes)
        else:
            self._loop.call_soon_threadsafe(self._enqueue, slots, victims, classes)

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the engine's thread, after everything posted before; returns at
        once (~6 us: a wake-up of the engine's loop). An exception is counted and logged as an
        ``observe`` error. Asynchronous mode only."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._run_posted, fn, args)

    def settle(self, timeout_s: float | None = 60.0) -> bool:
        """Wait until everything :meth:`post`-ed before this call has run; False on timeout."""
        loop = self._loop  # None once closed (by another thread, maybe, while we look)
        if loop is None or threading.current_thread() is self._thread:
            return True  # nothing posted, or called by posted work itself: it runs in order anyway
        done = threading.Event()
        try:
            loop.call_soon_threadsafe(done.set)  # callbacks run in order: after every post before
        except RuntimeError:  # the loop is closed: nothing posted can still be waiting
            return True
        return done.wait(timeout_s)

    def _run_posted(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - counted, logged, and the engine goes on
            self._record_error("observe", exc)

    def swap_now(self, slots: np.ndarray, victims: np.ndarray, classes: np.ndarray) -> None:
        """Carry the swaps out on this thread, storage reads included (the synchronous ablation)."""
        self._swap(slots, victims, classes, lambda cls, n: self._read_candidates(cls, n))

    def read_exact(self, ids: np.ndarray) -> Future:
        """Read and decode exactly ``ids`` (candidates a deterministic memory reserved), on the I/O
        pool (at once on this thread with ``workers = 0``). The future's result has, per id in
        order, its decoded fields, or None where a fault kept it from being read."""
        if self.workers == 0:
            done: Future = Future()
            done.set_result(self._read_exact(ids))
            return done
        return self._exec.submit(self._read_exact, ids)

    def _read_exact(self, ids: np.ndarray) -> list[dict[str, np.ndarray] | None]:
        # A deterministic memory homes a demoted sample in its new tier when it decides the move,
        # and the writer carries the move out later: write to the lower tier, then delete from
        # this one. So a sample is in its catalog home or in a tier above it, and looking from the
        # top tier down finds it even while it moves (missing above means already written below).
        with self._catalog.lock:
            homes = self._catalog.home[ids].copy()
        found: dict[int, dict[str, np.ndarray]] = {}
        for tier in self._tiers:
            want = ids[homes >= tier.index]
            want = want[~np.isin(want, np.fromiter(found, np.int64, len(found)))]
            if want.size:
                found.update(self._read_present(tier, want))
        return [found.get(int(i)) for i in ids]

    def _read_present(self, tier: Tier, ids: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
        """Those of ``ids`` that ``tier`` holds, decoded (faults counted and left out)."""
        try:
            data = tier.store.get_many(ids)
        except MissingIdsError as exc:
            present = ids[~np.isin(ids, exc.ids)]
            return self._read_present(tier, present) if present.size else {}
        except CorruptRecordError as exc:
            self._evict_corrupt(exc)
            good = ids[~np.isin(ids, exc.ids)]
            return self._read_present(tier, good) if good.size else {}
        except StoreError as exc:
            self._record_error("read", exc)
            return {}
        self._metrics.storage_reads.labels(tier=tier.name).inc(ids.size)
        return dict(self._rows(ids, data))

    def prefetched(self) -> int:
        with self._ready_lock:
            return sum(len(q) for q in self._ready.values())

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until no swap request is pending (tests, checkpoints)."""
        if self._loop is None:
            return True
        done = threading.Event()

        async def probe() -> None:
            while self.pending:
                await asyncio.sleep(0.001)
            done.set()

        asyncio.run_coroutine_threadsafe(probe(), self._loop)
        return done.wait(timeout_s)

    def close(self) -> None:
        if self._loop is not None:
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
                ids = np.array([i for i, _ in q], dtype=np.int64)
                with self._catalog.lock:
                    self._catalog.prefetched[ids] = False
            self._ready.clear()

    # ---- the engine thread ---------------------------------------------------------------------
    def _run_loop(self) -> None:
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
        loop = asyncio.get_running_loop()
        while True:
            slots, victims, classes = await self._queue.get()
            try:
                await loop.run_in_executor(self._exec, self._swap, slots, victims, classes,
                                           lambda cls, n: self._read_candidates(cls, n))
            except Exception as exc:  # noqa: BLE001 - counted, logged, and the engine goes on
                self._record_error("swap", exc)
            finally:
                with self._pending_lock:
                    self.pending -= slots.size
                    self._metrics.swap_lag.set(self.pending)
                self._wake.set()

    async def _prefetcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                wanted = self._refill_plan()
                for cls, n in wanted:
                    got = await loop.run_in_executor(self._exec, self._read_candidates, cls, n)
                    with self._ready_lock:
                        self._ready.setdefault(cls, deque()).extend(got)
                    self._metrics.prefetch_depth.set(self.prefetched())
            except Exception as exc:  # noqa: BLE001 - counted, logged, and the engine goes on
                self._record_error("prefetch", exc)
                await asyncio.sleep(0.1)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=0.05)
            except asyncio.TimeoutError:
                pass

    def _refill_plan(self) -> list[tuple[int, int]]:
        """``(class, how many)`` to read so every class with stored candidates has its share of
        ``prefetch_depth`` decoded and ready -- never more than ``prefetch_depth`` in all, also
        when there are more classes than that (an open-world stream): then the classes that get
        a candidate this round are drawn at random."""
        available = self._catalog.available_by_class()
        if not available:
            return []
        per_class = max(1, self._depth // len(available))
        with self._ready_lock:
            have = {c: len(self._ready.get(c, ())) for c in available}
            budget = self._depth - sum(len(q) for q in self._ready.values())
        classes = list(available)
        if len(classes) > self._depth:
            classes = [classes[i] for i in self._rng.permutation(len(classes))]
        plan = []
        for c in classes:
            if budget <= 0:
                break
            k = min(per_class - have[c], available[c], budget)
            if k > 0:
                plan.append((c, k))
                budget -= k
        return plan

    # ---- shared by both modes ------------------------------------------------------------------
    def _read_candidates(self, cls: int, n: int) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Read up to ``n`` random stored samples of ``cls`` that are not in the EM, decoded."""
        with self._catalog.lock:
            pool = self._catalog.swap_in_pool(cls)
            if not pool.size or n <= 0:
                return []
            ids = self._rng.choice(pool, min(n, pool.size), replace=False)
            self._catalog.prefetched[ids] = True  # reserved: no one else will draw them
            homes = self._catalog.home[ids].copy()
        out: list[tuple[int, dict[str, np.ndarray]]] = []
        for tier in self._tiers:
            sel = ids[homes == tier.index]
            if not sel.size or len(out) >= ids.size:
                continue
            if tier.store.prefers_chunks:
                out.extend(self._read_chunks(tier, sel, cls, ids.size - len(out)))
            else:
                out.extend(self._read_from(tier, sel))
        got = {i for i, _ in out}
        lost = np.array([i for i in ids if int(i) not in got], dtype=np.int64)
        if lost.size:
            with self._catalog.lock:
                self._catalog.prefetched[lost] = False
        return out

    def _read_chunks(self, tier: Tier, chosen: np.ndarray, cls: int, want: int) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Read the chunks holding ``chosen`` ids, one at a time, and keep every eligible sample
        of ``cls`` in them (up to ``want``): one disk read, many candidates (the write path
        groups a chunked tier by class)."""
        try:
            chunks = tier.store.chunk_of(chosen)
        except MissingIdsError:
            return self._read_from(tier, chosen)  # some moved meanwhile: read them one by one
        except StoreError as exc:
            self._record_error("read", exc)
            return []
        out: list[tuple[int, dict[str, np.ndarray]]] = []
        cat = self._catalog
        for c in dict.fromkeys(chunks.tolist()):  # in the random order the ids were drawn
            if len(out) >= want:
                break
            try:
                chunk = tier.store.get_chunk(int(c))
            except CorruptRecordError as exc:
                self._evict_corrupt(exc)
                continue
            except (StoreError, IndexError) as exc:
                self._record_error("read", exc)
                continue
            self._metrics.storage_reads.labels(tier=tier.name).inc(chunk.ids.size)
            ids = chunk.ids
            with cat.lock:
                ok = (ids < cat.n)
                ok[ok] = ((cat.label[ids[ok]] == cls) & (cat.home[ids[ok]] == tier.index) & (cat.slot[ids[ok]] < 0)
                          & (~cat.prefetched[ids[ok]] | np.isin(ids[ok], chosen)))
                pos = np.flatnonzero(ok)[: want - len(out)]
                cat.prefetched[ids[pos]] = True
            out.extend(self._rows(ids[pos], {k: v[pos] for k, v in chunk.fields.items()}))
        return out

    def _read_from(self, tier: Tier, ids: np.ndarray) -> list[tuple[int, dict[str, np.ndarray]]]:
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
                        out.extend(self._rows(sel, other.store.get_many(sel)))
                    except StoreError as exc:
                        self._record_error("read", exc)
            return out
        except CorruptRecordError as exc:
            self._evict_corrupt(exc)
            good = ids[~np.isin(ids, exc.ids)]
            return self._read_from(tier, good) if good.size else []
        except StoreError as exc:
            self._record_error("read", exc)
            return []
        self._metrics.storage_reads.labels(tier=tier.name).inc(ids.size)
        return self._rows(ids, data)

    def _rows(self, ids: np.ndarray, data: dict[str, np.ndarray]) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Stored records -> decoded candidates, one per id."""
        if not ids.size:
            return []
        try:
            data = self._metrics.timed_codec("decode", self._codec.decode, data)
        except Exception as exc:  # noqa: BLE001 - a record that passed its CRC but does not decode
            self._record_error("decode", exc)
            return []
        return [(int(i), {k: v[j] for k, v in data.items()}) for j, i in enumerate(ids)]

    def _take_ready(self, cls: int, n: int) -> list[tuple[int, dict[str, np.ndarray]]]:
        out = []
        with self._ready_lock:
            q = self._ready.get(cls)
            while q and len(out) < n:
                out.append(q.popleft())
        return out

    def _swap(self, slots: np.ndarray, victims: np.ndarray, classes: np.ndarray, read) -> None:
        for cls in np.unique(classes):
            sel = np.flatnonzero(classes == cls)
            cands = self._drop_stale(self._take_ready(int(cls), sel.size))
            hits = len(cands)
            if len(cands) < sel.size:
                cands += read(int(cls), sel.size - len(cands))
            self._metrics.prefetch.labels(result="hit").inc(hits)
            self._metrics.prefetch.labels(result="miss").inc(max(0, len(cands) - hits))
            if not cands:
                self._metrics.swap_skipped.labels(reason="no_candidate").inc(sel.size)
                continue
            m = len(cands)
            ids = np.array([c[0] for c in cands], dtype=np.int64)
            fields = {k: np.stack([c[1][k] for c in cands]) for k in cands[0][1]}
            tgt_slots, tgt_victims = slots[sel[:m]], victims[sel[:m]]
            with self._catalog.lock:
                # retain() may have brought a candidate into the EM since it was read: a sample
                # must never sit in two slots, so such a candidate is skipped.
                fresh = self._catalog.slot[ids] < 0
                if not fresh.all():
                    self._catalog.prefetched[ids[~fresh]] = False
                    tgt_slots, tgt_victims, ids = tgt_slots[fresh], tgt_victims[fresh], ids[fresh]
                    fields = {k: v[fresh] for k, v in fields.items()}
                    cands = [c for c, f in zip(cands, fresh) if f]
                    self._metrics.swap_skipped.labels(reason="no_candidate").inc(int((~fresh).sum()))
                if WEIGHT_FIELD in fields:  # a coreset weight set by retain() since the sample was stored
                    fields[WEIGHT_FIELD] = self._catalog.weight[ids]
                written = self._pool.write(tgt_slots, ids, fields, expect=tgt_victims)
                self._catalog.slot[tgt_victims[written]] = -1
                self._catalog.slot[ids[written]] = tgt_slots[written]
                self._catalog.prefetched[ids[written]] = False
            if not written.all():  # the victim's slot was taken by admission meanwhile
                self._metrics.swap_skipped.labels(reason="slot_reused").inc(int((~written).sum()))
                with self._ready_lock:
                    self._ready.setdefault(int(cls), deque()).extendleft(
                        c for c, w in zip(cands, written) if not w)
            if sel.size > m:
                self._metrics.swap_skipped.labels(reason="no_candidate").inc(sel.size - m)
            n = int(written.sum())
            self._metrics.swaps.labels(direction="out").inc(n)
            self._metrics.swaps.labels(direction="in").inc(n)

    def _drop_stale(self, cands: list[tuple[int, dict[str, np.ndarray]]]) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Queued candidates still eligible: not evicted meanwhile, not brought into the EM by retain()."""
        if not cands:
            return cands
        with self._catalog.lock:
            ids = np.array([c[0] for c in cands], dtype=np.int64)
            ok = (self._catalog.home[ids] != EVICTED) & (self._catalog.slot[ids] < 0)
            self._catalog.prefetched[ids[~ok]] = False
        return [c for c, keep in zip(cands, ok) if keep]

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
