"""Overflow choice: which samples leave a tier that is over capacity or over a class quota."""

import numpy as np
import pytest

from carousel.tiers import choose_overflow


def test_class_balanced_levels_the_largest_classes():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 2)
    ids = np.arange(labels.size) + 100
    out = choose_overflow(ids, labels, 7, "class_balanced", np.random.default_rng(0))
    left = np.bincount(labels[~np.isin(ids, out)], minlength=3)
    assert out.size == 7 and left.tolist() == [3, 4, 2]


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
