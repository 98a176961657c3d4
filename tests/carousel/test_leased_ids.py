"""Ids leased ahead of their adds (what the daemon's posted adds use): never given to two samples,
counted as added only once used, and given back unused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carousel import CarouselMemory, MemoryInputError


def _mem(tmp_path) -> CarouselMemory:
    return CarouselMemory.from_dict({"memory": {"em_size": 16, "sample_shape": [2]},
                                     "tiers": [{"kind": "lmdb", "path": str(tmp_path / "t"), "capacity": 1000}]})


def _xy(n: int):
    return torch.ones(n, 2, dtype=torch.uint8), torch.arange(n) % 3


def test_leases_add_release_and_lease_again(tmp_path):
    with _mem(tmp_path) as mem:
        a, na = mem.lease_ids(10)
        b, nb = mem.lease_ids(10)
        assert (a, na, b, nb) == (0, 10, 10, 10)
        assert mem.stats()["added"] == 0
        assert mem.add(*_xy(2), task=0).tolist() == [20, 21]  # an add of its own: after the leases
        mem.add_leased(np.arange(10, 13), *_xy(3), task=0)
        mem.add_leased(np.arange(0, 4), *_xy(4), task=0)
        assert mem.stats()["added"] == 9
        with pytest.raises(MemoryInputError, match="not leased, or are used"):
            mem.add_leased(np.arange(0, 2), *_xy(2), task=0)   # used already
        with pytest.raises(MemoryInputError, match="not leased, or are used"):
            mem.add_leased(np.array([500]), *_xy(1), task=0)   # never handed out
        mem.release_ids(4, 10)
        mem.release_ids(13, 20)
        assert mem.stats()["added"] == 9
        again, k = mem.lease_ids(100)  # a range given back comes first, as much of it as there is
        assert (again, k) == (13, 7)
        mem.add_leased(np.arange(13, 20), *_xy(7), task=0)
        mem.flush()
        stored = mem.tiers[0].store.ids()
        assert sorted(stored.tolist()) == [0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
        assert mem.stats()["added"] == 16
        mem.observe(torch.tensor([13, 20]), loss=torch.ones(2))
        with pytest.raises(MemoryInputError, match=r"no sample was added with ids \[500\]"):
            mem.observe(torch.tensor([13, 500]), loss=torch.ones(2))  # never handed out


def test_ids_given_back_at_the_top_go_back_to_the_counter(tmp_path):
    with _mem(tmp_path) as mem:
        first, n = mem.lease_ids(8)
        mem.add_leased(np.arange(first, first + 3), *_xy(3), task=0)
        mem.release_ids(first + 3, first + n)
        assert mem.add(*_xy(1), task=0).tolist() == [3]  # nothing skipped
        assert mem.stats()["added"] == 4
