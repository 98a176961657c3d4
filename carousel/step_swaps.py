"""Deterministic swapping: what timing decides in the background, decided at step boundaries instead.

In the default (asynchronous) mode what reaches the EM depends on how fast the swap engine and the
write-behind run: which samples are stored yet, which candidates the prefetcher read, when a swap
lands between two ``sample()`` calls. A seed then does not give the same run twice. With
``[swap] deterministic = true`` a memory's behaviour depends only on the calls made to it and its
seed:

- ``observe()`` picks the victims *and* their replacements at once, on the caller's thread, from
  the memory's seeded generator. Replacements are stored samples that were added before the
  previous step boundary (stored by now, whatever the writer's pace), not in the EM and not
  already chosen. The swap engine reads exactly those, in the background (:meth:`SwapEngine.read_exact`).
- ``end_step()`` is the boundary. It waits until the write-behind has stored what was added before
  the previous boundary, copies into the EM the replacements chosen before the previous boundary
  (their reads had a whole step to finish), and decides the tiers' capacity moves on the catalog,
  handing the storage work to the write-behind thread.

So a swap reaches the EM one step after it was asked for, storage I/O still overlaps training, and
the trainer waits only when storage cannot keep up with a step (the boundaries' time is
``carousel_step_boundary_seconds_total``). Without any ``end_step()`` call each ``add()`` counts as a
boundary (a loop that adds once per step); a trainer that calls ``end_step()`` once takes over.
Faults (a record that cannot be read) still skip a swap when they happen.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from .catalog import Catalog
from .config import WEIGHT_FIELD
from .em_pool import EMPool
from .metrics import MemoryMetrics
from .policies import SwapInPolicy
from .swap_engine import SwapEngine
from .tiers import Tier, may_overflow, plan_capacity
from .write_behind import WriteBehind

__all__ = ["StepSwaps"]


@dataclass
class _Request:
    """Swaps asked for in one ``observe``: ``slots`` hold ``victims``; ``chosen`` replace them."""

    slots: np.ndarray
    victims: np.ndarray
    chosen: np.ndarray
    reads: Future


class StepSwaps:
    """The deterministic mode's state between boundaries (see the module docstring)."""

    def __init__(self, pool: EMPool, catalog: Catalog, tiers: list[Tier], metrics: MemoryMetrics,
                 engine: SwapEngine, writer: WriteBehind, swap_in: SwapInPolicy,
                 rng: np.random.Generator, capacity_rng: np.random.Generator, next_id) -> None:
        self._pool, self._catalog, self._tiers, self._metrics = pool, catalog, tiers, metrics
        self._engine, self._writer = engine, writer
        self._swap_in = swap_in
        self._rng, self._capacity_rng = rng, capacity_rng
        self._next_id = next_id  # the memory's next id, read at a boundary
        self._lock = threading.Lock()
        self._current: list[_Request] = []   # asked for since the last boundary
        self._previous: list[_Request] = []  # asked for before it: applied at the next boundary
        self.busy_slots = np.zeros(pool.size, dtype=bool)  # slots with a swap on its way: not victims again
        # What the writer had been given at the last boundary (a submission mark, the next id),
        # and what the one before had: the latter is stored for sure once we wait for its mark.
        start = next_id()
        self._last = (writer.mark(), start)
        self._stored_below = start  # ids below this were stored before this step began
        self.explicit = False  # end_step() was called: add() no longer marks steps
        self.boundaries = 0

    # ---- the trainer's calls -----------------------------------------------------------------
    def request(self, slots: np.ndarray, victims: np.ndarray, labels: np.ndarray) -> None:
        """``observe``'s swaps: the swap-out policy chose ``victims`` (in ``slots``, of ``labels``)
        among the replayed samples; their replacements are chosen now and their reads start at
        once; the copies wait for the next boundary but one. Caller holds the catalog lock."""
        cat = self._catalog
        eligible = cat.swap_in_eligible(self._stored_below)  # one pass over the ids for the counts and every pool
        classes = self._swap_in.choose(labels, cat.available_by_class(eligible=eligible),
                                       cat.class_counts(self._pool.slot_ids), self._rng)
        go = classes >= 0
        slots, victims, classes = slots[go], victims[go], classes[go]
        chosen = np.full(classes.size, -1, dtype=np.int64)
        for cls in np.unique(classes).tolist():
            at = np.flatnonzero(classes == cls)
            pool = cat.swap_in_pool(cls, eligible=eligible)
            pick = self._rng.choice(pool, min(at.size, pool.size), replace=False)
            chosen[at[:pick.size]] = pick
        keep = chosen >= 0
        slots, victims, chosen = slots[keep], victims[keep], chosen[keep]
        if not chosen.size:
            return
        cat.prefetched[chosen] = True  # reserved: no other request, no capacity move, takes them
        self.busy_slots[slots] = True
        self._current.append(_Request(slots, victims, chosen, self._engine.read_exact(chosen)))

    def end_step(self) -> None:
        """The boundary: wait for what must be stored, apply last step's swaps, plan capacity."""
        with self._lock:
            t0 = time.perf_counter()
            mark, stored_below = self._last
            self._writer.wait_for_mark(mark)
            for req in self._previous:
                self._apply(req)
            self._previous, self._current = self._current, []
            cat = self._catalog
            # The usual tier is sized to the stream: nothing can move, and nothing is planned.
            if may_overflow(self._tiers, cat, stored_below):
                with cat.lock:
                    n = cat.n
                    protected = (cat.slot[:n] >= 0) | cat.prefetched[:n]
                self._writer.submit_calls(plan_capacity(self._tiers, cat, self._metrics, self._capacity_rng,
                                                        below=stored_below, protected=protected))
            self._stored_below = stored_below
            self._last = (self._writer.mark(), self._next_id())
            self.boundaries += 1
            self._metrics.step_boundary.inc(time.perf_counter() - t0)

    def enforce_capacity(self, timeout_s: float | None) -> bool:
        """Capacity over everything stored now (``flush``: the writer has drained), carried out
        before returning; False if the writer did not finish within ``timeout_s``."""
        with self._lock:
            cat = self._catalog
            with cat.lock:
                n = cat.n
                protected = (cat.slot[:n] >= 0) | cat.prefetched[:n]
            self._writer.submit_calls(plan_capacity(self._tiers, cat, self._metrics, self._capacity_rng,
                                                    below=self._next_id(), protected=protected))
            return self._writer.drain(timeout_s)

    def settle(self) -> None:
        """Apply every swap asked for so far and wait for the writer (before ``retain`` reads
        storage, or a checkpoint): the same state however fast the background was."""
        with self._lock:
            for req in self._previous + self._current:
                self._apply(req)
            self._previous, self._current = [], []
            self._writer.drain()

    # ---- the boundary's work -----------------------------------------------------------------
    def _apply(self, req: _Request) -> None:
        """Copy ``req``'s replacements into its slots, where the victim is still there (admission
        may have replaced it since: that slot is skipped). Reads that failed skip their slot."""
        got, rows = req.reads.result()
        cat = self._catalog
        with cat.lock:
            self.busy_slots[req.slots] = False
            cat.prefetched[req.chosen] = False
            # retain() may have brought a replacement into the EM meanwhile: never two slots.
            fresh = got & (cat.slot[req.chosen] < 0)
            n = int(fresh.sum())
            if n:
                ids, slots, victims = req.chosen[fresh], req.slots[fresh], req.victims[fresh]
                fields = {k: v[fresh] for k, v in rows.items()}
                if WEIGHT_FIELD in fields:  # a coreset weight set by retain() since the sample was stored
                    fields[WEIGHT_FIELD] = cat.weight[ids]
                written = self._pool.write(slots, ids, fields, expect=victims)
                cat.slot[victims[written]] = -1
                cat.slot[ids[written]] = slots[written]
                n = int(written.sum())
                self._metrics.swap_skipped.labels(reason="slot_reused").inc(int((~written).sum()))
        self._metrics.swap_skipped.labels(reason="no_candidate").inc(int((~fresh).sum()))
        self._metrics.swaps.labels(direction="out").inc(n)
        self._metrics.swaps.labels(direction="in").inc(n)
