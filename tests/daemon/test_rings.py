"""Shared-memory segments and batch rings: the slot protocol, zero-copy lifetimes, reclaim, sweep."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from carousel.daemon import shm
from carousel.daemon.shm import Doorbell, Segment
from carousel.daemon.shm_ring import FREE, TAKEN, BatchRing, RingLayout, RingReader

FIELDS = {"x": ((2, 3), "uint8"), "y": ((), "int64"), "task": ((), "int16")}


def _fill(ring: BatchRing, slot: int, value: int, rows: int | None = None, epoch: int = 0) -> None:
    out = ring.outs[slot]
    out["id"][:] = torch.arange(ring.layout.n) + 100 * value
    out["x"][:] = value
    out["y"][:] = value
    out["task"][:] = value
    ring.publish(slot, ring.layout.n if rows is None else rows, epoch)


@pytest.fixture
def ring():
    r = BatchRing(RingLayout.plan(4, 3, FIELDS), key=())
    reader = RingReader(r.segment.name, r.layout, None)
    yield r, reader
    reader.close()
    r.close()


def test_layout_aligns_fields_and_pages():
    lay = RingLayout.plan(5, 4, FIELDS)
    offsets = {name: off for name, _, _, off in lay.fields}
    assert list(offsets) == ["id", "x", "y", "task"]
    assert all(off % 64 == 0 for off in offsets.values())
    assert lay.slot_bytes % 4096 == 0 and lay.data_offset % 4096 == 0
    assert RingLayout.from_json(lay.to_json()) == lay


def test_a_taken_batch_views_the_slot_and_comes_back_when_dropped(ring):
    r, reader = ring
    _fill(r, 0, 7)
    batch = reader.take()
    assert batch["x"].shape == (4, 2, 3) and batch["y"].dtype == torch.int64
    assert (batch["x"] == 7).all() and batch["id"].tolist() == [700, 701, 702, 703]
    assert r.states[0, 0] == TAKEN
    assert reader.take() is None  # nothing else is ready
    keep = batch["x"][1:3]        # a view the user made keeps the slot
    del batch
    assert reader.take() is None and r.states[0, 0] == TAKEN
    del keep
    gc.collect()
    assert reader.take() is None  # the look reclaims it
    assert r.states[0, 0] == FREE


def test_held_batches_never_change_while_the_ring_turns(ring):
    r, reader = ring
    _fill(r, 0, 1)
    held = reader.take()
    copy = {k: v.clone() for k, v in held.items()}
    for i in range(30):  # the daemon only ever writes FREE slots
        for slot in r.free_slots():
            _fill(r, int(slot), 2 + i)
        b = reader.take()
        assert b is not None and (b["x"] != 1).all()
        del b
    for k in copy:
        assert torch.equal(held[k], copy[k])


def test_the_freshest_ready_batch_is_taken_first(ring):
    # A batch waiting in its slot grows stale (its samples may leave the EM); the others are a reserve.
    r, reader = ring
    for slot, value in ((2, 1), (0, 2), (1, 3)):  # published in this order, not in slot order
        _fill(r, slot, value)
    held = [reader.take() for _ in range(3)]
    assert [int(b["x"].flatten()[0]) for b in held] == [3, 2, 1], "the last published first, the oldest last"
    del held
    gc.collect()
    assert reader.take() is None  # (every slot reclaimed)
    r.states[-1, 1] = 0xFFFFFFFE  # the published counter is about to wrap: ages count mod 2**32
    _fill(r, 0, 4)
    _fill(r, 1, 5)
    assert (r.states[0, 3], r.states[1, 3], r.states[-1, 1]) == (0xFFFFFFFF, 0, 0)
    assert (reader.take()["x"] == 5).all(), "number 0 (after the wrap) is fresher than 0xFFFFFFFF"


def test_short_stale_batches_are_handed_back(ring):
    r, reader = ring
    _fill(r, 0, 3, rows=2, epoch=5)
    r.set_epoch(5)
    b = reader.take()
    assert b["x"].shape[0] == 2  # short but current: fine
    del b
    _fill(r, 1, 4, rows=2, epoch=5)
    r.set_epoch(6)               # samples were added since it was filled
    assert reader.take() is None
    assert r.states[1, 0] == FREE


def test_wait_sleeps_until_a_batch_is_published(ring):
    r, reader = ring
    t = threading.Timer(0.2, lambda: _fill(r, 2, 9))
    t.start()
    t0 = time.monotonic()
    reader.wait(5.0)
    waited = time.monotonic() - t0
    assert 0.15 < waited < 2.0
    assert (reader.take()["x"] == 9).all()
    t0 = time.monotonic()
    reader.wait(0.05)  # nothing comes: the timeout bounds it
    assert time.monotonic() - t0 < 1.0


def test_doorbell_wakes_a_sleeper():
    bell = Doorbell.create()
    other = Doorbell.attach(bell.segment.name)
    try:
        seen = bell.value()
        threading.Timer(0.2, other.ring).start()
        t0 = time.monotonic()
        bell.wait(seen, 5.0)
        assert 0.15 < time.monotonic() - t0 < 2.0
        assert bell.value() == seen + 1
    finally:
        other.close()
        bell.close()


def test_segments_are_private_and_checked_on_attach():
    seg = Segment.create(10_000)
    try:
        st = os.stat(os.path.join(shm.SHM_DIR, seg.name))
        assert st.st_mode & 0o777 == 0o600 and st.st_size >= 10_000
        os.chmod(os.path.join(shm.SHM_DIR, seg.name), 0o644)
        with pytest.raises(shm.ShmError, match="0600"):
            Segment.attach(seg.name, 10_000)
        with pytest.raises(shm.ShmError, match="not a carousel segment"):
            Segment.attach("../etc/passwd", 10)
    finally:
        seg.close()
    assert seg.name not in shm.segment_names()


def test_sweep_removes_segments_of_dead_daemons_only():
    code = ("from carousel.daemon.shm import Segment; s = Segment.create(4096); print(s.name, flush=True); "
            "import os; os._exit(0)")  # dies without unlinking
    name = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    mine = Segment.create(4096)
    try:
        assert name in shm.segment_names()
        swept = shm.sweep()
        assert name in swept and name not in shm.segment_names()
        assert mine.name in shm.segment_names()  # ours: this process is alive
    finally:
        mine.close()


def test_a_full_dev_shm_is_an_error_not_a_sigbus():
    def ours():
        return [n for n in shm.segment_names() if n.split("-")[2] == str(os.getpid())]
    before = ours()
    with pytest.raises(shm.ShmError, match="full"):
        Segment.create(shm.shm_free_bytes() + (1 << 30))
    assert ours() == before  # nothing half-made is left behind
