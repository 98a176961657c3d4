"""The catalog's swap-in draws: only eligible ids, distinct, uniform, and cheap however many are stored."""

from __future__ import annotations

import numpy as np

from carousel.catalog import EVICTED, PENDING, Catalog


def _catalog(n: int, classes: int = 4) -> Catalog:
    cat = Catalog()
    for lo in range(0, n, 100):  # registered in many small adds, as a stream arrives
        ids = np.arange(lo, min(lo + 100, n))
        cat.register(ids, ids % classes, np.zeros(ids.size, np.int64), 0)
    return cat


def test_draws_only_eligible_distinct_ids_of_the_class():
    cat = _catalog(20_000)
    ids = cat.class_ids(1)
    assert ids.tolist() == list(range(1, 20_000, 4)), "every id of the class, in order, none lost in growth"
    cat.slot[ids[:1000]] = 7              # in the EM
    cat.prefetched[ids[1000:2000]] = True  # being read
    cat.home[ids[2000:2500]] = EVICTED
    rng = np.random.default_rng(0)
    seen = np.zeros(20_000, np.int64)
    for _ in range(300):
        got = cat.draw_swap_in(1, 16, rng)
        assert got.size == 16 and np.unique(got).size == 16
        assert (got % 4 == 1).all()
        assert (cat.slot[got] < 0).all() and not cat.prefetched[got].any() and (cat.home[got] >= 0).all()
        seen[got] += 1
    eligible = ids[2500:]
    # Uniform over the eligible ids: 4800 draws over 2500 ids, each id ~1.9 times; none favoured.
    assert seen[eligible].sum() == 4800 and seen[eligible].max() <= 10
    assert (seen[eligible] > 0).mean() > 0.8


def test_falls_back_to_the_whole_pool_when_few_are_eligible():
    cat = _catalog(4_000)
    ids = cat.class_ids(2)
    cat.slot[ids[:-5]] = 1  # all but five are in the EM: draws by rejection would mostly miss
    got = cat.draw_swap_in(2, 16, np.random.default_rng(1))
    assert sorted(got.tolist()) == sorted(ids[-5:].tolist())
    assert cat.draw_swap_in(3, 0, np.random.default_rng(1)).size == 0
    assert cat.draw_swap_in(99, 4, np.random.default_rng(1)).size == 0  # a class never seen


def test_mostly_evicted_classes_are_compacted():
    cat = _catalog(8_000)
    ids = cat.class_ids(0)
    cat.home[ids[:1500]] = EVICTED
    assert cat.class_ids(0).tolist() == ids[1500:].tolist()
    cat.register(np.array([8_000]), np.array([0]), np.zeros(1, np.int64), 0)  # grows after compaction
    assert cat.class_ids(0)[-1] == 8_000


def test_draws_look_only_at_the_ids_they_draw_until_they_come_up_short():
    """A draw filters the ids it drew, evicted ones out, without a pass over the class's ids (an
    O(ids) cost per draw, growing with the stored set); a draw the rejection cannot fill looks at
    the whole class, and compacts it when it is mostly evicted."""
    cat = _catalog(8_000)
    ids = cat.class_ids(0)
    cat.home[ids[:1200]] = EVICTED  # 60 % evicted: compacting would be due
    rng = np.random.default_rng(2)
    for _ in range(50):
        got = cat.draw_swap_in(0, 8, rng)
        assert got.size == 8 and (cat.home[got] >= 0).all()
    assert cat._class_len[0] == 2_000, "an ordinary draw made a pass over the class (and compacted it)"
    assert cat.draw_swap_in(0, 700, rng).size == 700  # more than the rejection draws: the whole pool
    assert cat._class_len[0] == 800, "the whole-pool draw compacts a mostly evicted class"


def test_classes_version_moves_when_a_class_becomes_available_and_only_then():
    """What lets a cached per-class count (the swap engine's) recount at once for a class it lacks:
    the version moves on a class's first stored samples and when an adopted class wakes, never on
    more stored samples of a class already counted, nor on samples still queued."""
    cat = Catalog()
    v = cat.classes_version
    cat.register(np.arange(4), np.array([0, 0, 1, 1]), np.zeros(4, np.int64), home=-1)  # queued
    assert cat.classes_version == v and cat.available_by_class() == {}
    cat.home[:2] = 0
    cat.note_stored(np.arange(2))  # class 0's first stored samples
    assert cat.classes_version == v + 1
    cat.home[2:4] = 0
    cat.note_stored(np.arange(2, 4))  # class 1's
    assert cat.classes_version == v + 2
    cat.register(np.arange(4, 8), np.array([0, 1, 0, 1]), np.zeros(4, np.int64), home=0)
    cat.note_stored(np.arange(4, 8))
    assert cat.classes_version == v + 2, "classes stored before: nothing new to count"
    # An adopted tier's class 5 sleeps (stored, but not available) until the stream brings it.
    cat.register(np.arange(8, 12), np.full(4, 5), np.zeros(4, np.int64), home=1, dormant=True)
    assert 5 not in cat.available_by_class()
    before = cat.classes_version
    cat.register(np.array([12]), np.array([5]), np.zeros(1, np.int64), home=-1)  # the stream's first 5
    assert cat.classes_version > before and cat.available_by_class()[5] == 4


def test_one_eligible_mask_gives_the_same_pools_and_counts_as_testing_each_class():
    # A deterministic swap-in request computes the mask once (swap_in_eligible) and reads every
    # class's pool and the counts through it: the same ids, in the same order (its seeded draw
    # from the pool depends on both), as the per-class tests -- in every state an id can be in.
    rng = np.random.default_rng(3)
    cat = _catalog(6_000, classes=5)
    cat.register(np.array([7_000, 6_500]), np.array([2, 9]), np.zeros(2, np.int64), 0)  # sparse, out of order
    ids = np.arange(cat.n)
    cat.slot[rng.choice(ids, 300, replace=False)] = 1
    cat.prefetched[rng.choice(ids, 200, replace=False)] = True
    cat.home[rng.choice(ids, 400, replace=False)] = EVICTED
    cat.home[rng.choice(ids, 100, replace=False)] = PENDING  # not stored yet
    def pool(cls: int, below: int) -> list[int]:  # the per-class test, written out
        ids = cat.class_ids(cls)
        ids = ids[ids < below]
        return ids[(cat.home[ids] >= 0) & (cat.slot[ids] < 0) & ~cat.prefetched[ids]].tolist()

    for below in (0, 1, 2_500, 6_000, 6_600, 10**9):
        eligible = cat.swap_in_eligible(below)
        assert eligible.size == min(cat.n, below)
        counts = {c: k for c in (0, 1, 2, 3, 4, 9) if (k := len(pool(c, below)))}
        assert cat.available_by_class(eligible=eligible) == cat.available_by_class(below=below) == counts
        for cls in (0, 1, 2, 4, 9, 11):
            assert cat.swap_in_pool(cls, eligible=eligible).tolist() == cat.swap_in_pool(cls, below=below).tolist() \
                == pool(cls, below)
