"""Positions grouped by a key, each with its place in its group: one stable sort, no pass per group.

A swap spans most of the EM's classes, and a pass of Python and numpy calls per class cost ~25 us
each on threads that share the trainer's GIL; the swap engine (serving a request's slots from each
class's queue, in order) and the same-class swap-in policy (giving the first ``available[c]``
victims of class ``c`` a replacement) both need, for every position, its class and its place
among that class's positions.

>>> import numpy as np
>>> g = group_ranks(np.array([5, 2, 5, 5, 2]))
>>> g.keys.tolist(), g.index.tolist(), g.counts.tolist()
([2, 5], [1, 0, 1, 1, 0], [2, 3])
>>> g.order.tolist(), g.rank.tolist()
([1, 4, 0, 2, 3], [0, 0, 1, 2, 1])
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Groups(NamedTuple):
    keys: np.ndarray    # the distinct keys, sorted
    index: np.ndarray   # per position: its key's index in ``keys``
    counts: np.ndarray  # per key: how many positions have it
    order: np.ndarray   # the positions grouped by key (in ``keys`` order), in their order within a group
    rank: np.ndarray    # per position: its place among its group's positions (0, 1, ...)


def group_ranks(keys: np.ndarray) -> Groups:
    """Group the positions of the 1-D ``keys`` (see the module docstring)."""
    uniq, index = np.unique(keys, return_inverse=True)
    index = index.reshape(-1)  # numpy 2.0-2.1 shaped it like the input; 1-D here either way
    order = np.argsort(index, kind="stable")
    counts = np.bincount(index, minlength=uniq.size)
    rank = np.empty(index.size, np.int64)
    rank[order] = np.arange(index.size) - (np.cumsum(counts) - counts)[index[order]]
    return Groups(uniq, index, counts, order, rank)
