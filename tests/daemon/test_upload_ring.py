"""``UploadRing``: the regions of the upload segment that posted adds take (carousel.daemon.upload_ring).

Checked against the segment's bytes themselves: every region handed out lies in the segment and
overlaps no region still taken (an add's samples overwritten before the daemon copied them would be
stored wrong), regions free in the order they were taken, and a full ring says so instead of
handing out a region twice.
"""

from __future__ import annotations

import numpy as np
import pytest

from carousel.daemon.upload_ring import UploadRing


def test_regions_follow_each_other_and_wrap_to_the_start():
    ring = UploadRing(100)
    assert [ring.place(30), ring.place(30), ring.place(30)] == [0, 30, 60]
    assert ring.place(30) is None, "10 bytes left at the end, none at the start"
    ring.release()  # [0, 30) is free again
    assert ring.place(30) == 0
    assert ring.place(1) is None, "[60, 90) and [90, 100) ... wrapped: only [30, 30) is free"
    ring.release()
    assert ring.place(25) == 30 and ring.place(6) is None and ring.place(5) == 55
    assert len(ring) == 4


def test_an_empty_ring_starts_over_and_a_region_may_fill_it():
    ring = UploadRing(64)
    assert ring.place(40) == 0
    ring.release()
    assert ring.place(64) == 0, "nothing taken: the whole segment is free"
    assert ring.place(1) is None
    ring.reset()
    assert len(ring) == 0 and ring.place(10) == 0


def test_unplace_gives_back_the_last_region():
    ring = UploadRing(100)
    assert ring.place(60) == 0 and ring.place(30) == 60
    ring.unplace()
    assert ring.place(41) is None and ring.place(30) == 60, "the region placed again where it was"
    ring.release()
    assert ring.place(50) == 0, "wrapped to the start"
    ring.unplace()  # a wrapped region given back: the end's free bytes wait, never handed out twice
    assert ring.place(50) == 0 and len(ring) == 2


@pytest.mark.parametrize("nbytes", [0, -1, 101])
def test_a_region_that_can_never_fit_is_refused(nbytes):
    with pytest.raises(ValueError, match="does not fit"):
        UploadRing(100).place(nbytes)
    with pytest.raises(ValueError):
        UploadRing(0)


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_never_overlaps_a_taken_region(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(50, 400))
    ring = UploadRing(size)
    owner = np.full(size, -1)  # which add's bytes each segment byte holds, -1: free
    taken: list[tuple[int, int, int]] = []
    for k in range(2000):
        op = rng.random()
        if op < 0.55:
            n = int(rng.integers(1, size // 3 + 2))
            at = ring.place(n)
            if at is None:
                assert taken, "an empty ring refused a region that fits"
                continue
            assert 0 <= at and at + n <= size
            assert (owner[at:at + n] == -1).all(), f"add {k} got bytes still taken by {set(owner[at:at + n]) - {-1}}"
            owner[at:at + n] = k
            taken.append((at, at + n, k))
        elif op < 0.95 and taken:
            lo, hi, _ = taken.pop(0)  # the oldest is answered first
            ring.release()
            owner[lo:hi] = -1
        elif taken:
            lo, hi, k_last = taken[-1]
            if (owner[lo:hi] == k_last).all():
                taken.pop()
                ring.unplace()
                owner[lo:hi] = -1
        assert len(ring) == len(taken)
