"""``CarouselMemory``: the tiered replay memory, in-process.

One sample's path: ``add`` gives it an id, admission may copy it into an EM slot, write-behind
puts it on the first storage tier (migration later demotes or evicts it). ``sample`` gathers a
batch from EM slots only. ``observe`` records what the trainer saw (correctness, entropy, loss)
and, from the ``start_task``-th task on, picks victims among the EM samples just replayed and
asks the swap engine to refill their slots with other stored samples -- in the background. With
tiers and asynchronous swapping, admission and ``observe``'s work run on the memory's threads:
on the trainer's, ``add`` and ``observe`` only check their input and queue it (issue 22).

Why one module of ~800 lines: it is one class, :class:`CarouselMemory`, whose methods are the
public API (``add``, ``sample``, ``observe``, ``retain``, ``stats``, ``flush``, ``checkpoint``,
``close``) and which composes the parts that do the work (EM pool, catalog, policies, write-behind,
swap engine, tiers). Each method is one path through those parts under one lock order (catalog,
then EM); splitting the class would spread that order over files. What is not the data path lives
elsewhere: input checks (``inputs.py``), recovery (``recovery.py``), the integrity mode
(``integrity.py``), the deterministic mode's steps (``step_swaps.py``).

An adopted read-only tier (``files:///ROOT?layout=imagefolder&mode=ro``: a data set's image folder,
the last tier, at most one) is the store of past samples it already holds: they are learnt into
the catalog at open (ids ``0 .. N-1``, labels from the listing; new ids start above), swap-ins
draw them -- only for classes the stream has brought (the catalog keeps the others dormant) --
and nothing is ever written to it, demoted into it or evicted from it. Stream samples go to the
writable tiers above it; with no writable tier they live in the EM only, as in a RAM-only memory
(a sample replaced in its slot, by admission or a swap, is counted as evicted). What the class
gate means when the folder is the stream's future as well as its past (a whole training set):
classes of later tasks never come in before their first ``add``, but once a class has arrived
every folder image of it is a candidate, so during a task swap-ins may bring images of the
current classes that the stream has not shown yet (and will add again later under new ids: the
same image may then sit in the EM twice). The leak stays within the current task's classes.

>>> import torch
>>> from carousel import CarouselMemory
>>> mem = CarouselMemory.from_dict({"memory": {"em_size": 8, "sample_shape": [2]}})  # RAM only
>>> ids = mem.add(torch.ones(5, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1, 2]), task=0)
>>> batch = mem.sample(4, seed=0)
>>> batch.x.shape, batch.y.dtype
(torch.Size([4, 2]), torch.int64)
>>> mem.observe(batch.ids, logits=torch.randn(4, 3))
>>> mem.stats()["added"]
5
>>> mem.close()
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from storage_backends import Schema, open_store

from .batch import Batch, can_pin
from .catalog import EVICTED, PENDING, RAM_ONLY, UNUSED, Catalog
from .config import WEIGHT_FIELD, CarouselConfig, ConfigError, load_config
from .em_pool import EMPool, balanced_weights
from .ids import IdAllocator
from .integrity import SLOT, IntegrityError, Verifier, verify_requested
from .inputs import MemoryInputError, check_add, check_count, check_observe, check_retain, check_values
from .kinds import RawCodec, make_codec
from .metrics import MemoryMetrics
from .policies import AdmissionPolicy, make_admission, make_swap_in, make_swap_out
from .recovery import AdoptionError, check_adoption, load_state, rebuild_catalog, refill_em, save_state
from .sched import trainer_sampled
from .step_swaps import StepSwaps
from .swap_engine import Merging, SwapEngine
from .tiers import Tier, check_order, writable_count
from .write_behind import WriteBehind

log = logging.getLogger("carousel.memory")

_UNBOUNDED = 2**62  # the sample capacity of a tier bounded by bytes only
# How long the asynchronous memory's writer waits for more adds before it admits and stores
# what it has (write_behind.WriteBehind's linger): a few steps' adds in one pass at accelerator
# step times; whoever waits for the writer ends it early.
WRITE_LINGER_S = 0.006  # 2 ms caught one add of a ~2.5 ms Mammoth step: writer CPU 0.39-0.52 -> 0.27-0.33 ms a step
# Likewise for observe()'s work on the swap engine's worker: it waits up to this long after an
# observation for the next steps' ones (at most OBSERVE_MERGE_MOST) and handles them in one call
# (swap_engine.Merging); whoever waits for the worker (stats, flush, ...) ends it early.
OBSERVE_LINGER_S = 0.008  # 3 ms: worker CPU 0.21-0.34 ms a Mammoth step; 8 ms: 0.14-0.22 (4 interleaved pairs)
OBSERVE_MERGE_MOST = 8


# Memories with threads, still open: closed at interpreter exit (see _close_open_memories).
_OPEN: weakref.WeakSet[CarouselMemory] = weakref.WeakSet()
_OPEN_LOCK = threading.Lock()
_exit_hook = False


def _close_open_memories() -> None:
    """Close every memory still open as the interpreter exits, before thread pools stop.

    Runs as a ``threading`` exit hook: those run (newest first) before ``concurrent.futures``
    shuts every executor down -- its own hook, registered when it was imported, is older -- and
    before ``atexit``. Left to ``atexit`` (or to nobody), an open memory's swap engine went on
    asking its pool for reads after that and logged "swap engine swap error: RuntimeError('cannot
    schedule new futures after shutdown')"; closed here, it stops cleanly and checkpoints its EM.
    """
    for memory in list(_OPEN):
        try:
            memory.close()
        except Exception:  # one memory's failure must not keep the others open
            log.exception("closing a memory left open at exit failed")


def _close_at_exit(memory: CarouselMemory) -> None:
    global _exit_hook
    with _OPEN_LOCK:
        _OPEN.add(memory)
        if not _exit_hook:
            # threading's private hook list (CPython >= 3.9, what concurrent.futures uses): no
            # public hook runs before the executors stop. Elsewhere, atexit is the next best.
            register = getattr(threading, "_register_atexit", atexit.register)
            try:
                register(_close_open_memories)
                _exit_hook = True
            except RuntimeError:  # the interpreter is already shutting down
                pass


def _positions(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Where each of ``needles`` sits in ``haystack`` (distinct values, every needle present)."""
    order = np.argsort(haystack)
    return order[np.searchsorted(haystack, needles, sorter=order)]


class CarouselMemory:
    """A RAM episodic memory backed by zero or more storage tiers (see the module docstring)."""

    def __init__(self, config: CarouselConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        mc, sc = config.memory, config.swap
        self.metrics = MemoryMetrics(registry)
        self.fields: dict[str, tuple[tuple[int, ...], str]] = {
            "x": (tuple(mc.sample_shape), mc.dtype), "y": ((), "int64"), "task": ((), "int16"),
            **{name: (tuple(shape), dtype) for name, (shape, dtype) in mc.extras.items()}}
        self._extras = tuple(mc.extras)
        self._rng = np.random.default_rng([mc.seed, 1])
        self._sample_rng = np.random.default_rng([mc.seed, 2])
        try:  # policy names are checked against the registries here, where plug-ins are known
            self._admission = make_admission(mc.admission)
        except ValueError as exc:
            raise ConfigError(config.source, "memory.admission", str(exc)) from None
        try:
            self._swap_out = make_swap_out(sc.policy)
        except ValueError as exc:
            raise ConfigError(config.source, "swap.policy", str(exc)) from None
        try:
            self._swap_in = make_swap_in(sc.swap_in)
        except ValueError as exc:
            raise ConfigError(config.source, "swap.swap_in", str(exc)) from None
        try:
            self.codec = make_codec(mc, self.fields)
        except ValueError as exc:
            raise ConfigError(config.source, "memory.saliency" if mc.kind == "saliency" else "memory.kind",
                              str(exc)) from None
        # What add() takes: the EM's fields plus what the codec alone consumes (a saliency map).
        self.input_fields = {**self.fields, **self.codec.inputs}
        self.pool = EMPool(mc.em_size, self.fields)
        # The integrity mode (carousel.integrity): a reference CRC-32C per checked field of every
        # id, in the catalog, and every batch sample() returns checked against them. Off: nothing
        # allocated, nothing checked.
        self.verifier = Verifier.for_memory(self.fields, mc.kind) if verify_requested(mc.verify) else None
        self.catalog = Catalog(crc_columns=len(self.verifier.checked) if self.verifier is not None else 0)
        self._checked_ok = self.metrics.integrity_checks.labels(result="ok")
        self._admitted = self.metrics.admissions.labels(result="admitted")
        self._rejected = self.metrics.admissions.labels(result="rejected")
        self._seen = 0
        self._ids = IdAllocator(None, 0)  # replaced by recovery: from the tiers and the reserved bound
        self._current_task = -1
        self._leased = 0  # ids leased to daemon clients (lease_ids) and not used yet
        self._free_ids: list[tuple[int, int]] = []  # leased ranges given back unused, below the counter
        self._ratio = sc.ratio
        self._closed = False
        self.tiers: list[Tier] = []
        raw_nbytes = Schema(self.fields).record_nbytes
        variable = not isinstance(self.codec, RawCodec)  # records of varying size: budgets count bytes
        self._state_dir: Path | None = None  # set once the tiers are open (below)
        self._writable = 0  # how many tiers are writable (the first ones; an adopted read-only tier is last)
        self._writer: WriteBehind | None = None
        self._engine: SwapEngine | None = None
        self._posted = False
        self._steps: StepSwaps | None = None  # deterministic mode (carousel.step_swaps)
        try:
            for i, tc in enumerate(config.tiers):
                store = open_store(tc.url(), self.codec.stored)
                by_bytes = variable and tc.capacity_bytes is not None
                # An adopted (read-only) tier holds what it holds: its capacity is its size, never enforced.
                capacity = len(store) if store.readonly else _UNBOUNDED if by_bytes else tc.capacity_for(raw_nbytes)
                by_bytes = by_bytes and not store.readonly
                self.tiers.append(Tier(i, f"{i}-{tc.kind}", store, capacity,
                                       tc.eviction, tc.class_quota, tc.capacity_bytes if by_bytes else None))
            try:
                check_order(self.tiers)
            except ValueError as exc:
                raise ConfigError(config.source, "tiers", str(exc)) from None
            self._writable = writable_count(self.tiers)
            self._state_dir = self._state_folder()
            state = load_state(self._state_dir)
            try:  # an adopted tier: its listing pinned, or checked against the pin
                check_adoption(self._state_dir, self.tiers, state)
                found = rebuild_catalog(self.catalog, self.tiers, self.codec, self.verifier, state, self._state_dir)
            except AdoptionError as exc:
                raise ConfigError(config.source, f"tiers[{len(self.tiers) - 1}].path", str(exc)) from None
            self._ids, self._seen, self.recovered = found.ids, found.seen, found.report
            # The asynchronous memory hands admission to the write-behind thread and observe()'s
            # work to the swap engine's (see add, observe); the other modes keep both on the
            # caller's thread: deterministic runs decide swaps in observe, workers = 0 is the
            # synchronous ablation.
            self._posted = bool(self.tiers) and sc.workers > 0 and not sc.deterministic
            if self.tiers:
                self._writer = WriteBehind(self.tiers, self.catalog, self.metrics, config.write_behind.queue_samples,
                                           config.write_behind.batch, config.write_behind.block_timeout_s,
                                           np.random.default_rng([mc.seed, 3]), self.codec,
                                           enforce=not sc.deterministic,
                                           admit=self._admit_added if self._posted else None,
                                           linger_s=WRITE_LINGER_S if self._posted else 0.0)
                # A deterministic memory chooses its candidates itself: no prefetcher reads ahead.
                self._engine = SwapEngine(self.pool, self.catalog, self.tiers, self.metrics, sc.workers,
                                          0 if sc.deterministic else sc.prefetch_depth, mc.seed, self.codec)
                self._observe_work = Merging(self._observed_batches, OBSERVE_LINGER_S, OBSERVE_MERGE_MOST)
            self._current_task = refill_em(self.pool, self.catalog, self.tiers, self.codec, state, self._rng,
                                           mc.kind == "coreset", self._current_task)
            if self.tiers and sc.deterministic:
                self._steps = StepSwaps(self.pool, self.catalog, self.tiers, self.metrics, self._engine, self._writer,
                                        self._swap_in, self._rng, np.random.default_rng([mc.seed, 4]),
                                        lambda: self._ids.next_id)
            if self.tiers and not self._writable:
                # Stream samples live in the EM only (the adopted tier takes no writes): one pushed
                # out of its slot is gone, and counted as evicted (see _left_em_only).
                self.pool.on_leave = self._left_em_only
        except BaseException:  # a memory that failed to open leaves no thread or open store behind
            self._release()
            raise
        if self.tiers:  # a memory with threads: closed at exit if nobody closes it
            _close_at_exit(self)
        self.metrics.swap_ratio.set(self._ratio)
        for t in self.tiers:
            if t.capacity_bytes is None:
                self.metrics.capacity.labels(tier=t.name).set(t.capacity)
            else:
                self.metrics.capacity_bytes.labels(tier=t.name).set(t.capacity_bytes)
            self.metrics.record_bytes.labels(tier=t.name).set_function(self._gauge(lambda t=t: self._tier_bytes(t)))
            # Read at scrape time, so a scrape is current without anyone calling stats().
            self.metrics.samples.labels(tier=t.name).set_function(self._gauge(lambda t=t: len(t.store)))
            self.metrics.bytes.labels(tier=t.name).set_function(self._gauge(lambda t=t: t.store.nbytes))
        self.metrics.capacity.labels(tier="ram").set(mc.em_size)
        self.metrics.samples.labels(tier="ram").set_function(self._gauge(self.pool.filled))
        self.metrics.bytes.labels(tier="ram").set(sum(t.numel() * t.element_size() for t in self.pool.tensors.values()))

    def _state_folder(self) -> Path | None:
        """``memory.state_dir``, else beside the first writable tier (``<path>-state``). Never beside
        an adopted folder: a memory whose only tier is one must name its ``state_dir``."""
        mc = self.config.memory
        if mc.state_dir:
            return Path(mc.state_dir)
        if not self.tiers:
            return None
        if not self._writable:
            raise ConfigError(self.config.source, "memory.state_dir",
                              "the only tier is an adopted read-only folder, and nothing is written beside it: "
                              "give memory.state_dir (where the checkpoint and the id reservations go)")
        first = Path(self.config.tiers[0].path)
        return first.with_name(first.name + "-state")

    def _left_em_only(self, ids: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """``EMPool.on_leave`` of a memory whose only tier is adopted: stream samples pushed out of
        their slots (by a swap-in) had no other place, so they are evicted; adopted samples stay
        on their tier. (Admission counts the ones it replaces itself, before this sees them.)"""
        with self.catalog.lock:
            gone = ids[self.catalog.home[ids] == RAM_ONLY]
            if gone.size:
                self.catalog.home[gone] = EVICTED
        if gone.size:
            self.metrics.evictions.labels(reason="replaced").inc(gone.size)

    # ---- entry points ---------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], registry: CollectorRegistry | None = None) -> CarouselMemory:
        """A memory configured by a TOML file; samples already in its tiers are recovered."""
        return cls(load_config(path), registry)

    @classmethod
    def open(cls, path: str | os.PathLike[str], registry: CollectorRegistry | None = None) -> CarouselMemory:
        """Reopen an existing memory from its TOML config: every stored sample is recovered and the
        EM is refilled from storage (as it was at the last checkpoint, when there was one)."""
        config = load_config(path)
        if not config.tiers:
            raise FileNotFoundError(f"{path}: a RAM-only memory has nothing to reopen")
        missing = [t.path for t in config.tiers if not Path(t.path).exists()]
        if missing:
            raise FileNotFoundError(f"{path}: no memory to open, tiers missing: {missing}")
        return cls(config, registry)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], registry: CollectorRegistry | None = None) -> CarouselMemory:
        return cls(CarouselConfig.from_dict(data), registry)

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry holding this memory's metrics."""
        return self.metrics.registry

    # ---- add --------------------------------------------------------------------------------------
    def add(self, x: Any, y: Any, task: Any, **extras: Any) -> torch.Tensor:
        """Add stream samples; returns their ids (int64 tensor).

        ``x``: ``(n, *sample_shape)`` of the memory's dtype; ``y``: ``(n,)`` integer labels;
        ``task``: an int or ``(n,)``; ``extras``: every extra field of the config, ``(n, *shape)``.
        Every sample is queued for the first storage tier (blocking only under back-pressure);
        the admission policy decides which enter the EM. The memory reads the arrays given
        until write-behind has stored them: do not change them in place after ``add`` returns.

        The asynchronous memory (tiers, ``workers >= 1``, not deterministic) checks the input and
        hands out the ids here; the write-behind thread registers the samples in the catalog and
        runs the admission policy, in call order, before it stores them (within a few
        milliseconds: it waits up to ``WRITE_LINGER_S`` for more adds to take together, unless
        someone waits for it). So a sample may enter the EM a step after its ``add`` returned; ``sample()``
        on an EM that is not full yet waits for the admissions queued before it (up to 0.1 s),
        and ``stats()``, ``flush()``, ``checkpoint()``, ``retain()`` wait for them all.
        """
        self._check_open()
        return self._add(self._validate(x, y, task, extras), None)

    def add_leased(self, ids: Any, x: Any, y: Any, task: Any, **extras: Any) -> torch.Tensor:
        """:meth:`add` with ids leased beforehand (:meth:`lease_ids`), one per sample, in order.

        The daemon adds a client's samples this way: the client takes ids from its lease, so its
        ``add`` returns without waiting for a reply. Ids not leased, or leased and used already,
        raise :class:`MemoryInputError`; the leased ids of a failed add are skipped (never reused).
        """
        self._check_open()
        ids = np.ascontiguousarray(np.asarray(ids), dtype=np.int64).reshape(-1)
        if ids.size:
            with self.catalog.lock:  # used up from here on, whether the add then succeeds or not
                self._take_leased_locked(ids)
        fields = self._validate(x, y, task, extras)
        if ids.size != fields["y"].shape[0]:
            raise MemoryInputError(f"{ids.size} leased ids for {fields['y'].shape[0]} samples")
        return self._add(fields, ids)

    def lease_ids(self, n: int) -> tuple[int, int]:
        """Hand out up to ``n`` consecutive ids now, for :meth:`add_leased` to use later; returns
        ``(first, count)`` (fewer than ``n`` when a range given back earlier is handed out again).

        They are reserved like any add's (a crash never reuses them). Until used they do not count
        in ``stats()["added"]``; :meth:`release_ids` gives back what a lease did not use.
        """
        self._check_open()
        n = check_count(n)
        with self.catalog.lock:
            if self._free_ids:  # ids a client left unused, never given to a sample: handed out again
                lo, hi = self._free_ids.pop()
                k = min(n, hi - lo)
                if lo + k < hi:
                    self._free_ids.append((lo + k, hi))
                self._leased += k
                return lo, k
        self._ids.reserve(n)
        with self.catalog.lock:
            first = self._ids.take(n)
            self._leased += n
        return first, n

    def release_ids(self, lo: int, hi: int) -> None:
        """Leased ids ``[lo, hi)`` that will not be used (their client left). They were never given
        to a sample: the next leases hand them out again (a crash before then skips them)."""
        if hi <= lo:
            return
        with self.catalog.lock:
            self._leased -= hi - lo
            self._free_ids.append((lo, hi))
            # Ranges at the top of the ids go back to the counter (consecutive ones one after another).
            self._free_ids.sort()
            while self._free_ids and self._ids.give_back(*self._free_ids[-1]):
                self._free_ids.pop()

    def _add(self, fields: dict[str, np.ndarray], leased: np.ndarray | None) -> torch.Tensor:
        """The path of every add once its input is checked; ``leased``: the ids, when leased."""
        n = fields["y"].shape[0]
        if n == 0:
            return torch.zeros(0, dtype=torch.int64)
        # The integrity mode's references, from exactly what add() was given (after its checks),
        # computed outside every lock.
        crcs = self.verifier.crcs(fields) if self.verifier is not None else None
        if self._writer is not None:
            # Room in the write-behind queue first: under back-pressure this blocks, and if the
            # first tier keeps failing it raises -- before anything has changed.
            self._writer.reserve(n)
        take = None
        try:
            # Ids durably reserved before any is handed out (see carousel.ids): an fsync once per
            # block of ids, done here -- outside the catalog's lock -- or ahead, in the background.
            if leased is None:
                self._ids.reserve(n)
            if self._posted:
                # Registered and admitted on the write-behind thread (_admit_locked, through
                # _admit_added): add() takes no lock a background thread holds for long.
                ids = self._take_ids(n) if leased is None else leased
            else:
                with self.catalog.lock:
                    ids = self._take_ids(n) if leased is None else leased
                    take = self._admit_locked(ids, fields, crcs)
            self._current_task = max(self._current_task, int(fields["task"].max()))
        except BaseException:
            if self._writer is not None:
                self._writer.cancel(n)
            raise
        if self._writer is not None:
            self._writer.submit(ids, fields, crcs)  # into the room reserved above: never blocks
        self.metrics.added.inc(n)
        if take is not None:
            self._count_admissions(take)
        if self._steps is not None and not self._steps.explicit:
            self._steps.end_step()  # no end_step() calls: each add() ends a step
        return torch.from_numpy(ids)

    def _take_ids(self, n: int) -> np.ndarray:
        first = self._ids.take(n)
        return np.arange(first, first + n, dtype=np.int64)

    def _take_leased_locked(self, ids: np.ndarray) -> None:
        """Check that ``ids`` are leased and unused, and count them used (caller holds the catalog
        lock). A failed add after this skips them: the lease's client moved past them."""
        cat = self.catalog
        fresh = ids.size == np.unique(ids).size and ids.min() >= 0 and ids.max() < self._next_id
        if fresh:
            known = ids[ids < cat.n]
            fresh = not (cat.home[known] != UNUSED).any()
        if not fresh or self._leased < ids.size:
            raise MemoryInputError(f"ids {ids[:4].tolist()}... were not leased, or are used already")
        self._leased -= ids.size

    def _admit_locked(self, ids: np.ndarray, fields: dict[str, np.ndarray], crcs: np.ndarray | None) -> np.ndarray:
        """Register new samples in the catalog and run the admission policy on them; the mask of
        those admitted into EM slots. Caller holds the catalog lock: on the caller's thread in
        ``add()``, or on the write-behind thread (the asynchronous memory, in call order)."""
        n = ids.size
        labels = fields["y"]
        # No writable tier (RAM-only, or only an adopted folder): the EM slot is the sample's home.
        self.catalog.register(ids, labels, fields["task"].astype(np.int64), PENDING if self._writable else RAM_ONLY)
        if crcs is not None:  # before the ids can enter the EM (below) or be swapped in
            self.catalog.crc[ids] = crcs
        if WEIGHT_FIELD in fields and self.config.memory.kind == "coreset":
            self.catalog.weight[ids] = fields[WEIGHT_FIELD]
        slots = self._admission.admit(labels, self.pool.labels_snapshot(), self._seen, self._rng)
        take = slots >= 0
        if take.any():
            old = self.pool.slot_ids[slots[take]]
            old = old[old >= 0]
            self.catalog.slot[old] = -1
            if not self._writable:  # replaced samples with no stored copy are gone (adopted ones stay stored)
                old = old[self.catalog.home[old] == RAM_ONLY]
                self.catalog.home[old] = EVICTED
                self.metrics.evictions.labels(reason="replaced").inc(old.size)
            self.pool.write(slots[take], ids[take], {k: fields[k][take] for k in self.fields})
            self.catalog.slot[ids[take]] = slots[take]
        if not self._writable and (~take).any():
            self.catalog.home[ids[~take]] = EVICTED
            self.metrics.evictions.labels(reason="not_admitted").inc(int((~take).sum()))
        self._seen += n
        return take

    def _admit_added(self, ids: np.ndarray, fields: dict[str, np.ndarray], crcs: np.ndarray | None) -> None:
        """The asynchronous memory's admission, run by the write-behind thread before it stores."""
        with self.catalog.lock:
            take = self._admit_locked(ids, fields, crcs)
        self._count_admissions(take)

    def _count_admissions(self, take: np.ndarray) -> None:
        admitted = int(take.sum())
        self._admitted.inc(admitted)
        self._rejected.inc(take.size - admitted)

    def end_step(self) -> None:
        """Mark the end of a training step. A deterministic memory (``[swap] deterministic = true``)
        applies the swaps asked for a step ago and plans storage moves here (see
        :mod:`carousel.step_swaps`); once called, ``add()`` no longer marks steps by itself. For
        any other memory this does nothing, so a training loop may always call it."""
        self._check_open()
        if self._steps is not None:
            self._steps.explicit = True
            self._steps.end_step()

    def _validate(self, x: Any, y: Any, task: Any, extras: Mapping[str, Any]) -> dict[str, np.ndarray]:
        mc = self.config.memory
        return check_add(self.input_fields, mc.kind == "coreset", x, y, task, extras, mc.max_label)

    @property
    def _next_id(self) -> int:
        """The next sample id: every id below it was handed out (or skipped by a crash)."""
        return self._ids.next_id

    # ---- sample -----------------------------------------------------------------------------------
    def sample(self, n: int, *, classes: Any = None, tasks: Any = None, seed: int | None = None,
               balanced: bool = False, pin_memory: bool = False) -> Batch:
        """A replay batch of up to ``n`` distinct EM samples, from RAM only.

        ``classes`` / ``tasks`` restrict the draw; ``balanced`` draws classes equally often;
        ``seed`` makes the draw reproducible. Fewer than ``n`` come back only if the EM (or the
        filtered part of it) holds fewer. ``pin_memory``: the batch's tensors in page-locked
        memory, so ``batch.to("cuda", non_blocking=True)`` overlaps the accelerator's work
        (fresh pinned tensors each call, gathered straight into; without a CUDA device it is
        ignored and the batch is the ordinary one: :func:`carousel.batch.can_pin`).
        """
        trainer_sampled()  # the trainer's step length, which decides whether our threads yield to it
        self._check_open()
        n = check_count(n)
        t0 = time.perf_counter()
        pool = self.pool
        # Page-locked rows are allocated before the EM lock: the first ones cost a cudaHostAlloc.
        out = pool.pinned_rows(n, self._extras) if pin_memory and can_pin() else None
        if classes is None and tasks is None and seed is None and not balanced and self.verifier is None:
            with pool.lock:  # choose and gather under one short lock: no half-written slot
                batch = pool.gather_locked(pool.draw_locked(n, self._sample_rng), self._extras, out)
                if len(batch) == n:  # (a short batch may be drawn again below: one call, one observation)
                    self.metrics.sample_latency.observe(time.perf_counter() - t0)  # under the lock: see its class
            if len(batch) == n:
                return batch
            if not self._unadmitted_while_filling():
                with pool.lock:
                    self.metrics.sample_latency.observe(time.perf_counter() - t0)
                return batch
        batch, refs = self._draw(n, classes, tasks, seed, balanced, t0, out)
        if refs is not None:  # the integrity mode: checked after the lock, before anyone trains on it
            self._verify({"id": batch.ids, "x": batch.x, "y": batch.y, "task": batch.task, **batch.extras}, refs)
        return batch

    def _unadmitted_while_filling(self) -> bool:
        """For a draw that came up short: whether adds of the asynchronous memory wait for
        admission while the EM is not full yet (then wait up to 0.1 s for them, and draw again).
        A full EM never waits: the batch is short only because of the filters."""
        if not self._posted or not self._writer.admitting() or self.pool.filled() == self.pool.size:
            return False
        return self._writer.wait_admitted(0.1)

    def sample_with_references(self, n: int, *, classes: Any = None, tasks: Any = None, seed: int | None = None,
                               balanced: bool = False) -> tuple[Batch, dict[str, np.ndarray] | None]:
        """:meth:`sample` *without* its check, plus the references the check compares the batch
        with (:meth:`carousel.integrity.Verifier.references`; None unless the memory runs in the
        integrity mode). The daemon replies with both, so that its client checks the batch after
        the transport."""
        self._check_open()
        return self._draw(check_count(n), classes, tasks, seed, balanced, time.perf_counter())

    def _draw(self, n: int, classes: Any, tasks: Any, seed: int | None, balanced: bool,
              t0: float, out: Mapping[str, torch.Tensor] | None = None
              ) -> tuple[Batch, dict[str, np.ndarray] | None]:
        """Check the filters, then draw and gather a batch (and, verifying, its references) under
        one lock; into ``out`` (page-locked rows) when given."""
        classes = None if classes is None else check_values(classes, "classes")
        tasks = None if tasks is None else check_values(tasks, "tasks")
        seed = None if seed is None else check_count(seed, "seed")
        if seed is not None and self._posted and self._writer.admitting():
            # A seeded draw reads the EM as every add() before it left it (the way to read all of
            # it after adding, documented so): the admissions still queued come first, full EM or not.
            self._writer.wait_admitted(1.0)
        pool = self.pool
        retried = False
        while True:
            rng = np.random.default_rng(seed) if seed is not None else self._sample_rng
            with pool.lock:
                if classes is None and tasks is None and seed is None and not balanced:
                    slots = pool.draw_locked(n, rng)
                else:
                    slots = self._pick_locked(n, classes, tasks, balanced, rng)
                batch = pool.gather_locked(slots, self._extras, out)
                refs = None if self.verifier is None else self._references_locked(slots)
                self.metrics.sample_latency.observe(time.perf_counter() - t0)
            # Short while admissions are queued and the EM fills: once more after them.
            if retried or len(batch) == n or not self._unadmitted_while_filling():
                return batch, refs
            retried = True

    def _references_locked(self, slots: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """The integrity references of the samples in EM ``slots`` (caller holds ``pool.lock``).

        Read without the catalog's lock: an id's CRCs are written once, before it can enter a
        slot, and a coreset weight changes only under the EM lock too (``retain``); a catalog
        column grown meanwhile holds the same values for every id in the EM.
        """
        slots = slots.numpy() if isinstance(slots, torch.Tensor) else np.asarray(slots, np.int64)
        ids = self.pool.slot_ids[slots]
        cat = self.catalog
        return self.verifier.references(ids, slots, cat.crc[ids], cat.label[ids],
                                        cat.weight[ids] if self.verifier.weight else None)

    def _verify(self, batch: Mapping[str, Any], refs: Mapping[str, np.ndarray]) -> None:
        """Check a batch against its references; count the rows (``carousel_integrity_checked_samples_total``)."""
        try:
            rows = self.verifier.check(batch, refs)
        except IntegrityError as exc:
            self.metrics.integrity_checks.labels(result="mismatch").inc(len(exc.mismatches))
            raise
        self._checked_ok.inc(rows)

    def sample_into(self, n: int, out: Mapping[str, torch.Tensor], *, classes: Any = None, tasks: Any = None,
                    balanced: bool = False) -> int:
        """:meth:`sample` written into preallocated tensors (``out["id"]`` and one per field, each
        with room for ``n`` rows); returns how many rows were filled. The daemon fills its
        shared-memory batch rings with this, so a batch is copied once, straight into the ring.

        In the integrity mode, an ``out`` with the reference columns
        (:attr:`carousel.integrity.Verifier.columns`, as the daemon's rings have) gets them filled
        and the reader checks the rows (the daemon's client, after the transport); without them
        the rows are checked here, as :meth:`sample` checks.
        """
        self._check_open()
        n = check_count(n)
        classes = None if classes is None else check_values(classes, "classes")
        tasks = None if tasks is None else check_values(tasks, "tasks")
        t0 = time.perf_counter()
        retried = False
        while True:  # short while admissions are queued and the EM fills: once more after them
            refs = None
            with self.pool.lock:
                if classes is None and tasks is None and not balanced:
                    slots = self.pool.draw_locked(n, self._sample_rng)
                else:
                    slots = self._pick_locked(n, classes, tasks, balanced, self._sample_rng)
                self.pool.gather_into_locked(slots, out)
                if self.verifier is not None:
                    refs = self._references_locked(slots)
                self.metrics.sample_latency.observe(time.perf_counter() - t0)
            if retried or len(slots) == n or not self._unadmitted_while_filling():
                break
            retried = True
        k = len(slots)
        if refs is not None:
            if SLOT in out:
                for name, value in refs.items():
                    out[name][:k].numpy()[...] = value
            else:
                self._verify({name: out[name][:k] for name in ("id", *self.fields)}, refs)
        return k

    def _pick_locked(self, n: int, classes: Any, tasks: Any, balanced: bool, rng: np.random.Generator) -> np.ndarray:
        """Slots for a filtered, balanced or seeded draw (caller holds ``pool.lock``)."""
        ok = self.pool.slot_ids >= 0
        if classes is not None:
            ok &= np.isin(self.pool.slot_labels, classes)
        if tasks is not None:
            ok &= np.isin(self.pool.slot_tasks, tasks)
        slots = np.flatnonzero(ok)
        if not slots.size:
            return slots
        p = balanced_weights(self.pool.slot_labels[slots]) if balanced else None
        return rng.choice(slots, min(n, slots.size), replace=False, p=p)

    # ---- observe and swap ------------------------------------------------------------------------------
    def observe(self, ids: Any, logits: Any = None, loss: Any = None) -> None:
        """Record what training saw of replayed samples and trigger a swap (from ``start_task`` on).

        ``logits``: ``(n, C)`` -> correctness (argmax == label) and softmax entropy per sample;
        ``loss``: ``(n,)`` per-sample losses. Unknown ids raise :class:`MemoryInputError`.

        The asynchronous memory (tiers, ``workers >= 1``, not deterministic) checks the input
        here, at the call, and leaves the rest -- the statistics, the victims, the swap-in
        choice -- to the swap engine's thread, in call order: ``observe`` returns at once.
        ``stats()``, ``flush()``, ``checkpoint()``, ``retain()`` and ``close()`` first wait for
        the observations queued before them. A RAM-only, deterministic or ``workers = 0``
        memory does all of it here, before returning.
        """
        self._check_open()
        ids, lg, per_loss = check_observe(ids, logits, loss)
        self._check_known(ids)
        # The swap gate as of this call (a task boundary added after it must not change it).
        swap = self._engine is not None and self._current_task >= self.config.swap.start_task and self._ratio > 0
        if self._posted:
            # Copies: once observe() returns, the caller may reuse its logits and loss tensors
            # (check_ids already copied the ids).
            self._engine.post_merging(self._observe_work, ids, None if lg is None else lg.copy(),
                                      None if per_loss is None else per_loss.copy(), swap)
            return
        self._observed_batches([(ids, lg, per_loss, swap)])

    def _observed_batches(self, batches: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, bool]]) -> None:
        """``observe``'s work after its checks, for one call or several in a row (the asynchronous
        memory's worker takes a few steps' at once): each one's statistics into the catalog, in
        call order, then one swap trigger over the replayed ids of those past the swap gate (a
        sample replayed in two of them is one candidate: it holds one slot). On the caller's
        thread, or on the swap engine's (the asynchronous memory)."""
        swapping = []
        for ids, lg, per_loss, swap in batches:
            ids = self._observed(ids, lg, per_loss)
            if swap:
                swapping.append(ids)
        if swapping:
            self._trigger_swap(swapping[0] if len(swapping) == 1 else np.concatenate(swapping))

    def _observed(self, ids: np.ndarray, lg: np.ndarray | None, per_loss: np.ndarray | None) -> np.ndarray:
        """One observation's statistics into the catalog; the ids they were recorded for."""
        if self._posted and ids.size and ids.max() >= self.catalog.n:
            # Ids of an add() whose admission (which registers them) is still queued: wait for it.
            self._writer.wait_admitted(60.0)
            known = ids < self.catalog.n
            if not known.all():  # the writer is stuck: those statistics are dropped, not misfiled
                ids, lg = ids[known], None if lg is None else lg[known]
                per_loss = None if per_loss is None else per_loss[known]
        correct = entropy = None
        if lg is not None:
            # numpy, not torch: nothing on these paths may wake torch's intra-op pool (see em_pool).
            z = lg - lg.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            entropy = -(np.exp(logp) * logp).sum(axis=1).astype(np.float32)
            correct = (lg.argmax(axis=1) == self.catalog.label[ids]).astype(np.int8)
        self.catalog.observe(ids, correct, entropy, per_loss)
        return ids

    def only_queues(self, n: int) -> bool:
        """Whether :meth:`add_leased` of ``n`` samples and :meth:`observe` would only check their
        input and queue the work, now: the asynchronous memory, with room in its write-behind
        queue. (Another thread's add may take the room meanwhile: the daemon checks and adds
        under one lock.)"""
        return self._posted and not self._closed and self._writer.has_room(n)

    def set_admission(self, policy: AdmissionPolicy) -> None:
        """Admit with ``policy`` (an object) from now on, instead of the one the config names: for
        a policy that needs more than a name, such as an integration's that reads per-slot state
        of its own (Mammoth's loss-aware selection). Adds made before this call are admitted by the
        old policy. Raises ``TypeError`` for anything but an :class:`AdmissionPolicy`."""
        self._check_open()
        if not isinstance(policy, AdmissionPolicy):
            raise TypeError(f"set_admission() takes an AdmissionPolicy, got {type(policy).__name__}")
        self._settle()
        self._admission = policy

    def keep_em_writes(self) -> None:
        """Let changes made in place to EM rows (``memory.pool.tensors``) follow their samples to storage.

        A framework whose models rewrite their buffer's rows (Mammoth's X-DER updates stored
        logits) sees the EM's tensors; without this, such a change is lost when its sample leaves
        the EM -- swapped out, or replaced by admission -- and comes back later as it was added.
        From this call on, each sample that leaves the EM has its row, as it is then, written over
        its stored record (on the write-behind thread, in order with the adds), and
        :meth:`checkpoint` writes the rows still in the EM too. A RAM-only memory has no stored
        copy to update (a sample that leaves its EM is gone): nothing to do. Raises
        :class:`MemoryInputError` in the integrity mode (a rewritten row no longer matches its
        add-time checksums) and in deterministic mode (its storage moves are planned ahead of the
        writes). Idempotent.
        """
        self._check_open()
        if self.verifier is not None:
            raise MemoryInputError("keep_em_writes(): the integrity mode checks every row against its add-time "
                                   "checksums, so rows changed in place would read as corrupt; turn verify off")
        if self._steps is not None:
            raise MemoryInputError("keep_em_writes() is not supported in deterministic mode: its storage moves are "
                                   "planned a step ahead of the writes that would follow them")
        if self._writable < len(self.tiers):
            raise MemoryInputError("keep_em_writes(): this memory adopts a read-only tier, whose samples' rows "
                                   "cannot be written back; rows changed in place would be lost when they leave")
        if self.tiers:
            self.pool.on_leave = self._leaving

    def _leaving(self, ids: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """``EMPool.on_leave``: samples pushed out of their slots, by admission or a swap (whose
        callers hold the catalog lock). Until their rows are stored they are reserved
        (``prefetched``), so no swap reads them back from storage as they were before."""
        self.catalog.prefetched[ids] = True
        self._write_back(ids, rows, release=True)

    def _write_back(self, ids: np.ndarray, rows: dict[str, np.ndarray], release: bool = False) -> None:
        """Queue EM rows of ``ids`` to be written over their stored records (write-behind thread:
        after the adds queued before, so a sample not stored yet is stored first); ``release``:
        end their reservation once stored."""
        self._writer.submit_calls([lambda: self._store_rows(ids, rows, release)])

    def _store_rows(self, ids: np.ndarray, rows: dict[str, np.ndarray], release: bool) -> None:
        """Write ``rows`` over the records of ``ids`` on their tiers (the writer thread, which alone
        moves samples between tiers: homes cannot change under this). Evicted ids are skipped."""
        records = self.codec.encode(rows)
        with self.catalog.lock:
            homes = self.catalog.home[ids].copy()
        for tier in self.tiers:
            sel = np.flatnonzero(homes == tier.index)
            if sel.size:
                tier.store.put_many(ids[sel], {k: v[sel] for k, v in records.items()})
        if release:
            with self.catalog.lock:
                self.catalog.prefetched[ids] = False

    def wait_admitted(self, timeout_s: float = 60.0) -> bool:
        """Wait until every sample added so far went through admission (the asynchronous memory
        admits on its write-behind thread, a moment after ``add`` returns): from then on the EM
        reflects every ``add`` before this call. False if that took longer than ``timeout_s``."""
        return not self._posted or self._writer.wait_admitted(timeout_s)

    def _settle(self) -> None:
        """Wait for the admissions and observations queued so far (the asynchronous memory; else
        nothing is queued)."""
        if not self._posted:
            return
        if not self._writer.wait_admitted(60.0):
            raise TimeoutError(f"queued admissions did not finish within 60 s: {self._writer.last_error!r}")
        if not self._engine.settle():
            raise TimeoutError("queued observe() calls did not finish within 60 s")

    def _trigger_swap(self, ids: np.ndarray) -> None:
        with self.catalog.lock:
            victims, victim_ids, victim_labels = self._victims(ids)
            if not victims.size:
                return
            if self._steps is not None:  # chosen now, copied in at the next boundary but one
                self._steps.request(victims, victim_ids, victim_labels)
                return
            # Both counts by the catalog's dense class index: sized by the number of classes, not
            # by the largest label (a label of 2**40 once made every step allocate 8 TiB here).
            # The asynchronous memory takes the engine's count (at most 0.25 s old: a pass over
            # every id, too slow for every step); the synchronous modes count now.
            available = (self._engine.available_by_class(want=set(victim_labels.tolist())) if self._posted
                         else self.catalog.available_by_class())
            classes = self._swap_in.choose(victim_labels, available,
                                           self.catalog.class_counts(self.pool.slot_ids), self._rng)
        go = classes >= 0
        if not go.any():
            return
        if self.config.swap.workers == 0:
            self._engine.swap_now(victims[go], victim_ids[go], classes[go])
        else:
            self._engine.request(victims[go], victim_ids[go], classes[go])
            self._adapt(int(go.sum()))

    def _victims(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Among the replayed ``ids`` in EM slots (a slot counted once, and, in deterministic mode,
        none with a swap already on its way), the swap-out policy's victims: their slots, ids and
        labels. Caller holds the catalog lock."""
        slots = self.catalog.slot[ids]
        live = slots >= 0
        if self._steps is not None:
            live[live] = ~self._steps.busy_slots[slots[live]]
        slots, first = np.unique(slots[live], return_index=True)
        ids = ids[live][first]
        none = np.zeros(0, np.int64)
        if not slots.size:
            return none, none, none
        labels = self.catalog.label[ids]
        victims = self._swap_out.select(slots, labels, self.catalog.correct[ids], self.catalog.entropy[ids],
                                        self.catalog.loss[ids], self._ratio, self._rng)
        order = np.searchsorted(slots, victims)
        return victims, ids[order], labels[order]

    def _check_known(self, ids: np.ndarray) -> None:
        """``MemoryInputError`` for ids no add has handed out (negative, or not yet reached). The
        message names the ids, not the bound: through the daemon the bound also counts ids leased
        to clients, and the same input must fail with the same text in-process and there."""
        if ids.size and (ids.min() < 0 or ids.max() >= self._next_id):
            bad = ids[(ids < 0) | (ids >= self._next_id)]
            raise MemoryInputError(f"unknown ids: no sample was added with ids {np.unique(bad)[:8].tolist()}")

    def _adapt(self, k: int) -> None:
        """Adaptive mode: halve the ratio while the engine lags, recover it when it keeps up."""
        sc = self.config.swap
        if not sc.adaptive:
            return
        if self._engine.pending > sc.max_lag_steps * max(k, 1):
            self._ratio = max(sc.ratio / 64, self._ratio / 2)
        elif self._engine.pending <= k:
            self._ratio = min(sc.ratio, self._ratio * 1.25)
        self.metrics.swap_ratio.set(self._ratio)

    # ---- state ----------------------------------------------------------------------------------
    # ---- coreset ----------------------------------------------------------------------------------
    def retain(self, ids: Any, weights: Any, *, classes: Any = None) -> dict[str, int]:
        """Make the EM's slice of ``classes`` hold exactly ``ids``, weighted ``weights`` (GCR's selection).

        For memories of ``kind = "coreset"``. ``classes`` defaults to the labels of ``ids``; every id
        must have one of them, be known and not evicted, and fit: the slice's slots plus the EM's
        free ones. EM samples of those classes not in ``ids`` leave the EM -- they stay on their
        storage tier, where swaps can bring them back (a RAM-only memory evicts them); ids not in
        the EM are read from storage into the freed slots. ``sample()`` sees the old slice or the
        new one, never a mix. The weights are the samples' weights from now on, also when swapped
        out and back in, and are checkpointed here when the memory has tiers (a crash before that
        leaves the last checkpoint's selection: every count stays consistent either way).
        Returns ``{"kept", "entered", "left"}``.
        """
        self._check_open()
        if self.config.memory.kind != "coreset":
            raise MemoryInputError('retain() needs a memory of kind = "coreset"')
        ids, w, classes = check_retain(ids, weights, classes)
        self._check_known(ids)
        # Queued admissions register the ids added so far; queued observations choose their
        # victims before the slice changes.
        self._settle()
        with self.catalog.lock:
            labels, homes = self.catalog.label[ids], self.catalog.home[ids].copy()
        if (homes == UNUSED).any():  # ids a crash skipped (or lost before they were stored)
            raise MemoryInputError(f"unknown ids: no sample has ids {ids[homes == UNUSED][:10].tolist()}")
        if (homes == EVICTED).any():
            raise MemoryInputError(f"evicted ids cannot be retained: {ids[homes == EVICTED][:10].tolist()}")
        slice_classes = np.unique(labels if classes is None else classes)
        if not np.isin(labels, slice_classes).all():
            raise MemoryInputError(f"ids of classes {sorted(set(labels.tolist()) - set(slice_classes.tolist()))} "
                                   f"are outside the slice of classes {slice_classes.tolist()}")
        if self._steps is not None:
            self._steps.settle()  # planned moves carried out: storage is where the catalog says
        if (homes == PENDING).any():
            self.flush()  # samples about to enter must be readable from storage
        for _ in range(8):  # a swap may move an id in or out of the EM between the read and the update
            with self.catalog.lock:
                entering = ids[self.catalog.slot[ids] < 0]
            records = self._read_stored(entering)  # storage I/O, outside every lock
            with self.catalog.lock:
                slot_ids, slot_labels = self.pool.snapshot()[:2]  # stable: the catalog lock stops swaps
                in_slice = np.flatnonzero((slot_ids >= 0) & np.isin(slot_labels, slice_classes))
                leave_slots = in_slice[~np.isin(slot_ids[in_slice], ids)]
                now_entering = ids[self.catalog.slot[ids] < 0]
                if not np.isin(now_entering, entering).all():
                    continue
                room = np.concatenate([leave_slots, np.flatnonzero(slot_ids < 0)])
                if now_entering.size > room.size:
                    raise MemoryInputError(
                        f"{ids.size} ids do not fit: classes {slice_classes.tolist()} hold {in_slice.size} EM slots "
                        f"and {room.size - leave_slots.size} are free")
                fields = {k: v[_positions(entering, now_entering)] for k, v in records.items()}
                fields[WEIGHT_FIELD] = w[_positions(ids, now_entering)]
                target = room[:now_entering.size]
                clear = np.setdiff1d(leave_slots, target)
                left = slot_ids[leave_slots]
                self.catalog.slot[left] = -1
                if not self.tiers:
                    self.catalog.home[left] = EVICTED
                    self.metrics.evictions.labels(reason="coreset").inc(left.size)
                self.catalog.slot[now_entering] = target
                with self.pool.lock:
                    # The catalog's weights and the EM's change in one step: sample() (which holds
                    # only the EM lock) never sees them disagree -- the integrity mode compares them.
                    self.catalog.weight[ids] = w
                    self.pool.replace_locked(clear, target, now_entering, fields,
                                             (WEIGHT_FIELD, self.catalog.slot[ids], w))
            break
        else:
            raise RuntimeError("retain() kept racing the swap engine; try again")
        if self.tiers:
            self.checkpoint()
        return {"kept": int(ids.size - now_entering.size), "entered": int(now_entering.size), "left": int(left.size)}

    def _read_stored(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Every field of stored samples ``ids`` (in that order), read from their tiers."""
        out = {name: np.zeros((ids.size, *shape), dtype=dtype) for name, (shape, dtype) in self.fields.items()}
        with self.catalog.lock:
            homes = self.catalog.home[ids].copy()
        for tier in self.tiers:
            sel = np.flatnonzero(homes == tier.index)
            if sel.size:
                data = self.codec.decode(tier.store.get_many(ids[sel]))
                for name in out:
                    out[name][sel] = data[name]
        missing = ~np.isin(homes, [t.index for t in self.tiers])
        if missing.any():
            raise MemoryInputError(f"ids not on any storage tier: {ids[missing][:10].tolist()}")
        return out

    def stats(self) -> dict[str, Any]:
        """Counts for people and tests: ``added``, ``evicted``, ``swapped_in``, ``swapped_out``,
        ``tiers: {name: {"samples", "bytes"}}``, ``em_classes: {str(label): samples in the EM}`` (string
        keys: the same in-process and through the daemon's JSON) and more. ``added`` counts the ids handed out: the
        samples ever added, plus the ids a crash skipped (reserved before it; ids are never reused); ids leased
        to a daemon client count once used; with an adopted read-only tier, its ``adopted`` samples (ids
        ``0 .. adopted-1``) count too."""
        self._settle()  # every add() and observe() before this call: admitted, statistics in
        m = self.metrics
        tiers: dict[str, dict[str, int]] = {"ram": {"samples": self.pool.filled(),
                                                    "bytes": sum(t.numel() * t.element_size()
                                                                 for t in self.pool.tensors.values()),
                                                    "capacity": self.pool.size}}
        for t in self.tiers:
            tiers[t.name] = {"samples": len(t.store), "bytes": t.store.nbytes, "record_bytes": self._tier_bytes(t),
                             "capacity": t.capacity if t.capacity_bytes is None else None,
                             "capacity_bytes": t.capacity_bytes}

        def value(name: str, **labels: str) -> float:
            return m.registry.get_sample_value(name, labels) or 0.0

        labels = self.pool.labels_snapshot()  # one short lock; np.unique over em_size labels: ~10 us
        held, counts = np.unique(labels[labels >= 0], return_counts=True)
        hits = value("carousel_prefetch_requests_total", result="hit")
        misses = value("carousel_prefetch_requests_total", result="miss")
        return {
            "added": self._next_id - self._leased - sum(hi - lo for lo, hi in self._free_ids),
            "evicted": self.catalog.count(EVICTED),
            "pending_writes": self._writer.queued if self._writer else 0,
            "swapped_in": int(value("carousel_swaps_total", direction="in")),
            "swapped_out": int(value("carousel_swaps_total", direction="out")),
            "swap_lag": self._engine.pending if self._engine else 0,
            "swap_ratio": self._ratio,
            "prefetched": self._engine.prefetched() if self._engine else 0,
            "prefetch_hit_rate": hits / (hits + misses) if hits + misses else math.nan,
            "current_task": self._current_task,
            "adopted": self.recovered.get("adopted", 0),
            "em_classes": {str(c): int(k) for c, k in zip(held.tolist(), counts.tolist())},
            "tiers": tiers,
            "errors": {"write_behind": repr(self._writer.last_error) if self._writer and self._writer.last_error
                       else None,
                       "swap": repr(self._engine.last_error) if self._engine and self._engine.last_error else None},
        }

    def _tier_bytes(self, tier: Tier) -> int:
        with self.catalog.lock:
            return int(self.catalog.nbytes[self.catalog.tier_ids(tier.index)].sum())

    def flush(self, timeout_s: float | None = 60.0) -> None:
        """Wait for write-behind to store every added sample, then make the tiers durable. (A
        deterministic memory also brings its tiers within capacity here: between boundaries they
        may hold a step or two of samples more.)"""
        self._check_open()
        self._settle()
        if self._writer is not None and not self._writer.drain(timeout_s):
            raise TimeoutError(f"write-behind did not drain within {timeout_s} s: {self._writer.last_error!r}")
        if self._steps is not None and not self._steps.enforce_capacity(timeout_s):
            raise TimeoutError(f"capacity moves did not finish within {timeout_s} s: {self._writer.last_error!r}")
        for t in self.tiers:
            t.store.flush()
        if self._posted:
            self._engine.refresh_available()  # the next swaps see every sample stored by now

    def checkpoint(self) -> None:
        """``flush`` plus the EM's contents and the statistics, so ``open`` restores them."""
        if self.pool.on_leave == self._leaving:  # keep_em_writes(): rows changed in place are stored too
            # (compared with the method: an adopted-only memory uses on_leave to count evictions)
            self._settle()
            with self.pool.lock:
                held = np.flatnonzero(self.pool.slot_ids >= 0)
                ids = self.pool.slot_ids[held].copy()
                rows = {name: arr[held].copy() for name, arr in self.pool.arrays.items()}
            if ids.size:
                self._write_back(ids, rows)
        self.flush()
        if self._engine is not None:
            self._engine.wait_idle()
        if self._state_dir is None:
            return
        self._state_dir.mkdir(parents=True, exist_ok=True)
        with self.catalog.lock:
            n = self.catalog.n
            state = {"slot_ids": self.pool.snapshot()[0], "seen": np.array([self._seen]),
                     "current_task": np.array([self._current_task]),
                     "label": self.catalog.label[:n], "task": self.catalog.task[:n],
                     "correct": self.catalog.correct[:n], "entropy": self.catalog.entropy[:n],
                     "loss": self.catalog.loss[:n], "replays": self.catalog.replays[:n],
                     "weight": self.catalog.weight[:n], "nbytes": self.catalog.nbytes[:n]}
            if self.verifier is not None:  # the add-time references survive a restart
                state["crc"] = self.catalog.crc[:n]
                state["crc_fields"] = np.array(self.verifier.checked)
        save_state(self._state_dir, state)
        # The checkpoint knows every id handed out: give back the reserved rest, so a crash
        # before the next add (or a clean close) skips no ids.
        self._ids.settle()

    def close(self) -> None:
        """Drain write-behind, checkpoint, stop the engine, close the tiers; idempotent."""
        if self._closed:
            return
        try:
            if self.tiers:
                self.checkpoint()
        finally:
            self._closed = True
            self._release()

    def _release(self) -> None:
        """Stop the engine, the writer and a background id reservation, close the tiers."""
        self._ids.close()
        if self._engine is not None:
            self._engine.close()
        if self._writer is not None:
            self._writer.close()
        for t in self.tiers:
            t.store.close()

    def __enter__(self) -> CarouselMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _gauge(self, read):
        """A scrape-time reading that is NaN once the memory is closed (its stores are gone)."""
        def value() -> float:
            if self._closed:
                return math.nan
            try:
                return float(read())
            except Exception:  # noqa: BLE001 - a scrape must not fail because a store is busy closing
                return math.nan
        return value

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the memory is closed")
