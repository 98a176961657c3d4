"""Overflow choice: which samples leave a tier that is over capacity or over a class quota."""

import numpy as np
import pytest

from carousel.tiers import _level_down, choose_overflow


def test_class_balanced_levels_the_largest_classes():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 2)
    ids = np.arange(labels.size) + 100
    out = choose_overflow(ids, labels, 7, "class_balanced", np.random.default_rng(0))
    left = np.bincount(labels[~np.isin(ids, out)], minlength=3)
    assert out.size == 7 and left.tolist() == [3, 4, 2]


def _one_at_a_time(counts: np.ndarray, n: int) -> np.ndarray:
    """The class-balanced rule as stated: ``n`` times, take one from the largest class (the first
    on a tie)."""
    left, take = counts.copy(), np.zeros_like(counts)
    for _ in range(min(n, int(counts.sum()))):
        c = int(np.argmax(left))
        take[c] += 1
        left[c] -= 1
    return take


def test_levelling_down_at_once_takes_what_one_at_a_time_takes():
    rng = np.random.default_rng(0)
    for case in range(3000):
        counts = rng.integers(0, int(rng.integers(1, 60)), size=int(rng.integers(1, 15)))
        if case % 4 == 0:
            counts[:] = counts[0]  # all tied
        n = int(rng.integers(0, counts.sum() + 3))
        assert _level_down(counts, n).tolist() == _one_at_a_time(counts, n).tolist(), (counts.tolist(), n)


def test_class_balanced_eviction_draws_what_the_one_at_a_time_rule_draws():
    """Same counts, and the same random draws from the same members in the same order, so a seeded
    (deterministic) memory evicts the very same samples as with the rule applied step by step."""
    rng = np.random.default_rng(1)
    ids = np.arange(20_000, dtype=np.int64)
    labels = rng.integers(0, 7, ids.size)
    protected = rng.random(ids.size) < 0.02
    got = choose_overflow(ids, labels, 333, "class_balanced", np.random.default_rng(5), protected=protected)
    pool = np.flatnonzero(~protected)
    classes = np.unique(labels[pool])
    take = _one_at_a_time(np.array([(labels[pool] == c).sum() for c in classes]), 333)
    draw = np.random.default_rng(5)
    want = np.concatenate([draw.choice(pool[labels[pool] == c], t, replace=False) for c, t in zip(classes, take) if t])
    assert got.tolist() == sorted(ids[want].tolist())


def test_fifo_and_random():
    ids = np.array([9, 3, 7, 1, 5])
    labels = np.zeros(5, dtype=np.int64)
    assert sorted(choose_overflow(ids, labels, 2, "fifo", np.random.default_rng(0)).tolist()) == [1, 3]
    out = choose_overflow(ids, labels, 3, "random", np.random.default_rng(0))
    assert out.size == 3 and np.unique(out).size == 3 and set(out) <= set(ids)


def test_quota_and_protected_samples():
    labels = np.array([0] * 8 + [1] * 3)
    ids = np.arange(11)
    protected = np.zeros(11, dtype=bool)
    protected[:3] = True  # three of class 0 sit in EM slots
    out = choose_overflow(ids, labels, 0, "class_balanced", np.random.default_rng(1), quota=5, protected=protected)
    assert out.size == 3 and not np.isin(out, ids[:3]).any() and (labels[out] == 0).all()
    # over capacity with everything protected: nothing can leave
    assert choose_overflow(ids[:3], labels[:3], 2, "random", np.random.default_rng(0),
                           protected=np.ones(3, bool)).size == 0


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown eviction policy"):
        choose_overflow(np.arange(3), np.zeros(3, np.int64), 1, "lru", np.random.default_rng(0))


class _Store:
    readonly = False


def _tier(capacity: int, **kwargs):
    from carousel.tiers import Tier
    return Tier(0, "t", _Store(), capacity, **kwargs)


def test_a_tier_that_cannot_overflow_is_not_planned_and_planning_it_would_draw_nothing():
    # A deterministic memory's boundary skips plan_capacity when may_overflow() says no tier can
    # be over (the trainers' tier is sized to the stream). That is exact only if planning such a
    # tier moves nothing and draws no random number: checked here on the same catalog.
    from carousel.catalog import EVICTED, Catalog
    from carousel.metrics import MemoryMetrics
    from carousel.tiers import may_overflow, plan_capacity
    from prometheus_client import CollectorRegistry

    cat = Catalog()
    ids = np.arange(1_000)
    cat.register(ids, ids % 4, np.zeros(ids.size, np.int64), 0)
    cat.nbytes[ids] = 100
    metrics = MemoryMetrics(CollectorRegistry())
    protected = np.zeros(cat.n, bool)
    for tier, below, expect in ((_tier(1_000), 10**9, False),       # sized to the stream
                                (_tier(999), 10**9, True),          # one sample too many
                                (_tier(999), 999, False),           # ... but not below the stored bound
                                (_tier(10**6, class_quota=300), 10**9, True),
                                (_tier(10**6, capacity_bytes=10**8), 10**9, True)):
        assert may_overflow([tier], cat, below) is expect, tier
        rng = np.random.default_rng(5)
        state = rng.bit_generator.state
        calls = plan_capacity([tier], cat, metrics, rng, below=below, protected=protected)
        if not expect:
            assert calls == [] and rng.bit_generator.state == state  # nothing planned, nothing drawn
        elif tier.capacity == 999:
            assert len(calls) == 1 and (cat.home == EVICTED).sum() == 1  # the one sample over goes
