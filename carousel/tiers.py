"""Storage tiers as the memory sees them: an open store plus its capacity and eviction rule,
and the migration that keeps every tier within its capacity (demote down, evict from the last).

A tier whose store is read-only (an adopted image folder, ``storage_backends.image_folder``) holds
samples that were there before the memory, and only those: nothing is ever written to it, demoted
into it or evicted from it, and its capacity is not enforced. Such a tier comes after every
writable one (:func:`check_order`), so "the next tier" and "the last tier" of the migration are
those of the writable tiers (:func:`writable_count`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from storage_backends import SampleStore

from .catalog import EVICTED, Catalog
from .grouping import group_ranks
from .metrics import MemoryMetrics

EVICTION_POLICIES = ("class_balanced", "random", "fifo")


@dataclass
class Tier:
    """One storage tier: ``store`` holds at most ``capacity`` samples (``class_quota`` per class)
    and, when ``capacity_bytes`` is set, records of at most that many bytes in all (as the
    catalog's ``nbytes`` counts them: a compressed sample counts its compressed size)."""

    index: int
    name: str
    store: SampleStore
    capacity: int
    eviction: str = "class_balanced"
    class_quota: int = 0
    capacity_bytes: int | None = None

    @property
    def readonly(self) -> bool:
        """Whether the store is read-only (adopted): never written, demoted into or evicted from."""
        return self.store.readonly


def writable_count(tiers: list[Tier]) -> int:
    """How many tiers are writable: they come first (:func:`check_order`), so the migration's chain
    is ``tiers[:writable_count(tiers)]`` and its last tier is the last writable one."""
    return sum(not t.readonly for t in tiers)


def check_order(tiers: list[Tier]) -> None:
    """Refuse (``ValueError`` naming the tier) a read-only tier before a writable one, and more than
    one read-only tier: each adopted store numbers its samples from id 0, so two would clash, and a
    writable tier below a read-only one could be reached by no demotion."""
    readonly = [t.index for t in tiers if t.readonly]
    if len(readonly) > 1:
        raise ValueError(f"tiers {readonly} are read-only (adopted): a memory adopts at most one read-only store "
                         "(each numbers its samples from id 0)")
    if readonly and readonly[0] != len(tiers) - 1:
        raise ValueError(f"tier {readonly[0]} is read-only (adopted) but writable tiers follow it: put it last "
                         "(stream samples go to the writable tiers above it; nothing moves into it)")


def choose_overflow(ids: np.ndarray, labels: np.ndarray, over: int, policy: str,
                    rng: np.random.Generator, quota: int = 0,
                    protected: np.ndarray | None = None) -> np.ndarray:
    """Which of ``ids`` leave a tier that holds ``over`` too many, plus any class over ``quota``.

    ``class_balanced`` takes from the largest class each time (a class-balanced reservoir: the
    classes end up level), ``random`` uniformly, ``fifo`` the oldest (smallest) ids. ``protected``
    samples count towards their class but are never chosen.
    """
    movable = np.ones(ids.size, dtype=bool) if protected is None else ~protected
    leave = np.zeros(ids.size, dtype=bool)
    if quota > 0:
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            excess = members.size - quota
            if excess > 0:
                candidates = members[movable[members]]
                leave[rng.choice(candidates, min(excess, candidates.size), replace=False)] = True
    over -= int(leave.sum())
    pool = np.flatnonzero(movable & ~leave)
    if over > 0 and pool.size:
        if policy == "fifo":
            pick = pool[np.argsort(ids[pool], kind="stable")[:over]]
        elif policy == "random":
            pick = rng.choice(pool, min(over, pool.size), replace=False)
        elif policy == "class_balanced":
            groups = group_ranks(labels[pool])  # by class, each class's members in pool order
            take = _level_down(groups.counts, min(over, pool.size))
            members = pool[groups.order]
            pick = np.concatenate([rng.choice(members[lo:lo + k], t, replace=False)
                                   for lo, k, t in zip(groups.starts.tolist(), groups.counts.tolist(), take.tolist()) if t]
                                  or [np.zeros(0, np.int64)])
        else:
            raise ValueError(f"unknown eviction policy {policy!r}; known: {EVICTION_POLICIES}")
        leave[pick] = True
    return ids[leave]


def _level_down(counts: np.ndarray, n: int) -> np.ndarray:
    """How many to take from each class so that taking ``n``, one at a time from the largest class
    (the first such class on a tie), levels the largest down; at once, not a step per sample.

    Every class ends at most at a level ``h``: the lowest with ``sum(max(counts - h, 0)) <= n``;
    the ``r`` still to take then come one each from the first ``r`` classes at ``h``.

    >>> _level_down(np.array([10, 5, 7]), 6).tolist()   # 10 -> 6 and 7 -> 6 (5 taken), then the first at 6
    [5, 0, 1]
    >>> _level_down(np.array([4, 4, 4]), 4).tolist()
    [2, 1, 1]
    """
    if n <= 0:
        return np.zeros_like(counts)
    if n >= counts.sum():
        return counts.copy()
    levels = np.unique(np.concatenate([counts, [0]]))  # sorted
    ordered = np.sort(counts)
    suffix = np.concatenate([np.cumsum(ordered[::-1])[::-1], [0]])  # suffix[i] = ordered[i:].sum()
    first_above = np.searchsorted(ordered, levels, side="right")
    taken_at = suffix[first_above] - levels * (ordered.size - first_above)  # falls as the level rises
    j = int(np.argmax(taken_at <= n))  # the lowest distinct count that takes no more than n (> 0: n < total)
    # Below it, down to the next distinct count, every step down takes one more from each of the
    # ``k`` classes at or above it: the exact level is that many steps down.
    k = int((counts >= levels[j]).sum())
    h = int(levels[j]) - (n - int(taken_at[j])) // k
    above = counts >= h
    take = np.maximum(counts - h, 0)
    rest = n - int(take.sum())
    take[np.flatnonzero(above)[:rest]] += 1
    return take


def class_grouped(ids: np.ndarray, fields: dict[str, np.ndarray], labels: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Reorder a batch bound for a chunked tier: by class, shuffled within each class.

    A chunked store fills rows in the order given, so each chunk then holds one class (or few),
    in random order: the swap engine's one chunk read yields many candidates of the class it
    wants, not samples that merely arrived together.
    """
    order = np.lexsort((rng.random(ids.size), labels))
    return ids[order], {k: v[order] for k, v in fields.items()}


def enforce_capacity(tiers: list[Tier], catalog: Catalog, metrics: MemoryMetrics,
                     rng: np.random.Generator) -> None:
    """Demote each tier's overflow to the next tier; evict the last tier's overflow.

    Runs in the write-behind thread, so each store has one writing thread. A demoted sample is
    written to the next tier and re-homed in the catalog before it is deleted from its old tier:
    a reader that looked it up a moment ago finds it in one tier or the other, and a crash in
    between leaves it in both (recovery keeps one), never in neither. A read-only tier (last, if
    any) is left out: nothing demotes into it, and the last writable tier evicts.
    """
    writable = writable_count(tiers)
    for tier in tiers[:writable]:
        with catalog.lock:
            ids = catalog.tier_ids(tier.index)
            leaving = _leaving(tier, writable, ids, catalog, catalog.slot[ids] >= 0, rng)
        if not leaving.size:
            continue
        if tier.index == writable - 1:
            tier.store.delete_many(leaving)
            with catalog.lock:
                catalog.home[leaving] = EVICTED
            metrics.evictions.labels(reason="capacity").inc(leaving.size)
        else:
            _demote(tiers, tier, leaving, catalog, metrics, rng, rehome=True)


def may_overflow(tiers: list[Tier], catalog: Catalog, below: int) -> bool:
    """Whether :func:`plan_capacity` over the ids below ``below`` could move anything: some writable
    tier has a byte budget or a class quota, or room for fewer samples than there are such ids. When
    not, it would look at every id and leave (drawing no random number), so a caller may skip it --
    and the two O(ids) passes of each boundary with it -- without changing any decision."""
    bound = min(catalog.n, below)
    return any(t.capacity_bytes is not None or t.class_quota > 0 or bound > t.capacity
               for t in tiers[:writable_count(tiers)])


def plan_capacity(tiers: list[Tier], catalog: Catalog, metrics: MemoryMetrics, rng: np.random.Generator,
                  below: int, protected: np.ndarray) -> list[Callable[[], None]]:
    """:func:`enforce_capacity` for a deterministic memory, in two halves: the decisions, made now
    on the catalog alone, and the storage work, returned as calls for the write-behind thread.

    Only ids below ``below`` count (those the writer has stored by now: the set does not depend
    on how far it got since), and ``protected`` ids (in the EM, or chosen as swap-in candidates)
    never move. The catalog is updated at once -- evicted ids are gone, demoted ids are homed in
    their new tier -- so every later decision sees the plan, whatever the writer's progress; a
    reader of a demoted id that finds it not yet moved looks in the other tiers (the swap engine's
    deterministic read does).
    """
    calls: list[Callable[[], None]] = []
    writable = writable_count(tiers)  # a read-only tier is never planned for (see enforce_capacity)
    for tier in tiers[:writable]:
        with catalog.lock:
            ids = catalog.tier_ids(tier.index)
            ids = ids[ids < below]
            leaving = _leaving(tier, writable, ids, catalog, protected[ids], rng)
            if not leaving.size:
                continue
            last = tier.index == writable - 1
            catalog.home[leaving] = EVICTED if last else tier.index + 1
        if last:
            metrics.evictions.labels(reason="capacity").inc(leaving.size)
            calls.append(lambda tier=tier, leaving=leaving: tier.store.delete_many(leaving))
        else:
            calls.append(lambda tier=tier, leaving=leaving: _demote(tiers, tier, leaving, catalog, metrics, rng,
                                                                   rehome=False))
    return calls


def _leaving(tier: Tier, n_tiers: int, ids: np.ndarray, catalog: Catalog, keep: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
    """Which of ``ids`` (the tier's samples) leave it: its overflow by count and bytes, and every
    class over its quota. Caller holds the catalog lock. On the last tier the ``keep`` samples
    (those an EM slot holds) never leave: their only copy would be in RAM, gone at the next swap,
    so the last tier may run over by at most the EM's size until they are swapped out."""
    labels = catalog.label[ids]
    sizes = catalog.nbytes[ids].astype(np.int64)
    # Counted by dense class index: as many bins as classes, whatever the labels' values.
    largest_class = int(np.bincount(catalog.cls[ids]).max()) if tier.class_quota > 0 and ids.size else 0
    over = max(ids.size - tier.capacity, _over_budget(sizes, tier.capacity_bytes))
    if over <= 0 and not largest_class > tier.class_quota > 0:
        return np.zeros(0, np.int64)
    protected = keep if tier.index == n_tiers - 1 else None
    victims = choose_overflow(ids, labels, max(over, 0), tier.eviction, rng, tier.class_quota, protected=protected)
    for _ in range(8):  # a byte budget: the average was an estimate; take more until it fits
        stay = ~np.isin(ids, victims)
        more = _over_budget(sizes[stay], tier.capacity_bytes)
        if not more:
            break
        extra = choose_overflow(ids[stay], labels[stay], more, tier.eviction, rng,
                                protected=None if protected is None else protected[stay])
        if not extra.size:
            break
        victims = np.concatenate([victims, extra])
    return victims


def _demote(tiers: list[Tier], tier: Tier, ids: np.ndarray, catalog: Catalog, metrics: MemoryMetrics,
            rng: np.random.Generator, rehome: bool) -> None:
    """Move ``ids`` from ``tier`` to the next one: written there first, then deleted here (a crash
    in between leaves them in both, and recovery keeps one). ``rehome``: set their catalog home
    between the two steps (a planned move was re-homed when it was decided)."""
    nxt = tiers[tier.index + 1]
    data = tier.store.get_many(ids)
    if nxt.store.prefers_chunks:
        ids, data = class_grouped(ids, data, data["y"], rng)
    t0 = time.perf_counter()
    nxt.store.put_many(ids, data)
    metrics.count_write(nxt.name, ids.size, time.perf_counter() - t0)
    if rehome:
        with catalog.lock:
            catalog.home[ids] = nxt.index
    tier.store.delete_many(ids)
    metrics.migrated.labels(tier=tier.name).inc(ids.size)
    with catalog.lock:
        moved = int(catalog.nbytes[ids].sum())
    metrics.migrated_bytes.labels(tier=tier.name).inc(moved)


def _over_budget(sizes: np.ndarray, budget: int | None) -> int:
    """How many samples of average size must leave for records of ``sizes`` to fit ``budget``
    bytes (0 without a budget). An estimate from the average: the next write corrects it."""
    if budget is None or not sizes.size:
        return 0
    excess = int(sizes.sum()) - budget
    if excess <= 0:
        return 0
    return min(sizes.size, -(-excess * sizes.size // max(int(sizes.sum()), 1)))
