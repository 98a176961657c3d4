"""carousel.grouping: each position's group and place in it, as a loop over the groups finds them."""

from __future__ import annotations

import numpy as np
import pytest

from carousel.grouping import group_ranks


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("low, high, dtype", [(-3, 7, np.int64),      # sorted (a negative key)
                                              (0, 9, np.int64),       # counted (small non-negative)
                                              (0, 10**6, np.int64),   # sorted (a range far larger than the keys)
                                              (0, 200, np.uint8), (0, 50, np.uint64)])
def test_group_ranks_matches_a_loop_over_groups(seed, low, high, dtype):
    rng = np.random.default_rng(seed)
    keys = rng.integers(low, high, size=int(rng.integers(1, 60))).astype(dtype)
    g = group_ranks(keys)
    assert g.keys.tolist() == sorted(set(keys.tolist()))
    assert (g.keys[g.index] == keys).all()
    for j, key in enumerate(g.keys.tolist()):
        where = np.flatnonzero(keys == key)  # the group's positions, in order
        assert g.counts[j] == where.size
        assert g.rank[where].tolist() == list(range(where.size))
    assert g.ordered_rank.tolist() == g.rank[g.order].tolist()
    assert g.starts.tolist() == [int(np.sum(g.counts[:j])) for j in range(g.keys.size)]
    # order: groups in key order, each group's positions in their own order
    assert g.order.tolist() == [int(p) for key in g.keys.tolist() for p in np.flatnonzero(keys == key)]


def test_group_ranks_of_nothing():
    g = group_ranks(np.zeros(0, np.int64))
    assert g.keys.size == g.index.size == g.counts.size == g.order.size == g.rank.size == 0
