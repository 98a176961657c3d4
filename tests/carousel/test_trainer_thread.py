"""What ``add``, ``sample`` and ``observe`` do on the trainer's thread (issue 22).

- No torch op that touches data runs in them -- so nothing wakes torch's intra-op pool, whatever
  ``torch.set_num_threads`` says -- and the batches are still right.
- The asynchronous memory queues ``observe``'s work for the swap engine's thread: its input is
  checked at the call, and ``stats()``, ``checkpoint()``, ``close()`` see every queued call.
- ``sample(..., pin_memory=True)``: pinned where CUDA is, the ordinary batch where it is not.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from carousel import CarouselMemory, MemoryInputError
from carousel.batch import can_pin
from carousel.em_pool import put_rows, take_rows
from carousel.inputs import as_array
from tests.faulty_store import FaultyStore

SHAPE = (3, 8, 8)
CLASSES = 4
# Ops that tensor.numpy() and torch.from_numpy() record: views and no-op conversions, no data
# touched (so none can enter a parallel region).
NO_DATA_OPS = {"aten::detach", "detach", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::to",
               "aten::alias"}


def config(tmp_path, *, tiers: bool = True, em: int = 32, workers: int = 1, deterministic: bool = False) -> dict:
    cfg = {"memory": {"em_size": em, "sample_shape": list(SHAPE), "seed": 0},
           "swap": {"ratio": 1.0, "workers": workers, "start_task": 0, "prefetch_depth": 64,
                    "deterministic": deterministic},
           "write_behind": {"queue_samples": 4096, "batch": 64}}
    if tiers:
        cfg["tiers"] = [{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": 10_000}]
    return cfg


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples whose pixels encode their label, so a torn or mixed batch row shows."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = (y.view(-1, 1, 1, 1) * 50 + torch.randint(0, 50, (n, *SHAPE), generator=g)).to(torch.uint8)
    return x, y


def logits_for(ids: np.ndarray) -> np.ndarray:
    g = np.random.default_rng(ids.sum())
    return g.normal(size=(ids.size, CLASSES)).astype(np.float32)


def expected_stats(mem: CarouselMemory, ids: np.ndarray, lg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What observe() records for ``ids``: correctness and softmax entropy, computed here in float64."""
    z = lg.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (lg.argmax(1) == mem.catalog.label[ids]).astype(np.int8), -(p * np.log(p)).sum(1)


class Blocked:
    """Holds the swap engine's thread (a posted call that waits) until released: what is posted
    meanwhile stays queued."""

    def __init__(self, mem: CarouselMemory) -> None:
        self.entered, self.go = threading.Event(), threading.Event()
        mem._engine.post(self._hold)
        assert self.entered.wait(10)

    def _hold(self) -> None:
        self.entered.set()
        self.go.wait(30)

    def release(self) -> None:
        self.go.set()


def check_batch(mem: CarouselMemory, b, added: dict[int, torch.Tensor] | None = None) -> None:
    """Every row is the sample its id names: its label, pixels that encode it, and (given what
    ``add`` was handed, by id) exactly the bytes added."""
    assert np.array_equal(b.y.numpy(), mem.catalog.label[b.ids.numpy()])
    assert (b.x.reshape(len(b), -1).max(1).values // 50 == b.y.to(torch.uint8)).all()
    if added is not None:
        assert torch.equal(b.x, torch.stack([added[i] for i in b.ids.tolist()]))


def remember(added: dict[int, torch.Tensor], ids: torch.Tensor, x: torch.Tensor) -> None:
    added.update(zip(ids.tolist(), x))


@pytest.mark.parametrize("tiers, verify", [(False, False), (True, False), (True, True)],
                         ids=["ram-only", "tiered", "tiered-integrity-mode"])
def test_the_trainers_calls_run_no_torch_op_on_data(tmp_path, tiers, verify):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # an intra-op pool there to be woken: nothing below may use it
    cfg = config(tmp_path, tiers=tiers)
    cfg["memory"]["verify"] = verify  # the integrity mode: CRCs in add, every batch checked in sample
    try:
        with CarouselMemory.from_dict(cfg) as mem:
            stream = [data(32, seed) for seed in range(4)]
            added: dict[int, torch.Tensor] = {}
            remember(added, mem.add(*stream[0], task=0), stream[0][0])
            if tiers:
                mem.flush()
            lg = torch.from_numpy(logits_for(np.arange(32)))
            got = []
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for x, y in stream[1:]:
                    got.append((mem.add(x, y, task=0), x))
                    b = mem.sample(32)
                    pinned = mem.sample(16, pin_memory=True)
                    seeded = mem.sample(8, seed=1, classes=[0, 1])
                    mem.observe(b.ids, logits=lg)
                    got += [b, pinned, seeded]
            ops = {e.name for e in prof.events()}
            assert ops <= NO_DATA_OPS, f"torch ops on data in add/sample/observe: {sorted(ops - NO_DATA_OPS)}"
            for item in got:
                if isinstance(item, tuple):
                    remember(added, *item)
                else:
                    check_batch(mem, item, added)
            assert len(b) == 32 and len(pinned) == 16 and set(seeded.y.tolist()) <= {0, 1}
    finally:
        torch.set_num_threads(threads)


def test_pin_memory_without_cuda_is_the_ordinary_batch(tmp_path):
    if can_pin():
        pytest.skip("CUDA is here: test_pin_memory_with_cuda checks the pinned batch")
    with CarouselMemory.from_dict(config(tmp_path, tiers=False)) as mem:
        mem.add(*data(40, 0), task=0)
        plain, pinned = mem.sample(16, seed=5), mem.sample(16, seed=5, pin_memory=True)
        assert not pinned.x.is_pinned()
        for f in ("ids", "x", "y", "task"):
            assert torch.equal(getattr(plain, f), getattr(pinned, f))
        assert pinned.pin_memory() is pinned  # Batch.pin_memory(): nothing to pin here, no error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (page-locked memory)")
def test_pin_memory_with_cuda(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path, tiers=False, em=64)) as mem:
        mem.add(*data(64, 0), task=0)
        kept = [mem.sample(16, pin_memory=True) for _ in range(8)]  # held: each keeps its own rows
        for b in kept:
            assert all(t.is_pinned() for t in (b.ids, b.x, b.y, b.task))
            check_batch(mem, b)
        on_gpu = kept[0].to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_gpu.x.cpu(), kept[0].x)


def test_gather_into_given_rows(tmp_path):
    """The pinned path's gather (into rows allocated before the lock), with ordinary tensors."""
    with CarouselMemory.from_dict(config(tmp_path, tiers=False)) as mem:
        mem.add(*data(32, 0), task=0)
        pool = mem.pool
        out = {"id": torch.empty(20, dtype=torch.int64), **{k: torch.empty((20, *t.shape[1:]), dtype=t.dtype)
                                                           for k, t in pool.tensors.items()}}
        slots = np.array([5, 0, 31, 7, 7], dtype=np.int64)
        with pool.lock:
            got = pool.gather_locked(slots, (), out)
            ref = pool.gather_locked(slots, ())
        assert len(got) == 5 and got.x.data_ptr() == out["x"].data_ptr()
        for f in ("ids", "x", "y", "task"):
            assert torch.equal(getattr(got, f), getattr(ref, f))


@pytest.mark.parametrize("dtype,shape", [(np.uint8, (3, 8, 8)), (np.float32, (10,)), (np.int64, ()),
                                         (np.float16, (2, 3)), (np.bool_, (5,)), (np.uint8, (0,))])
def test_row_copies_equal_numpys(dtype, shape):
    rng = np.random.default_rng(0)
    em = (rng.random((40, *shape)) * 100).astype(dtype)
    idx = np.array([3, 0, 39, 7, 7, 12], dtype=np.int64)
    assert np.array_equal(take_rows(em, idx), em[idx]) and take_rows(em, idx).dtype == em.dtype
    out = np.zeros((9, *shape), dtype)
    assert take_rows(em, idx, out) is out and np.array_equal(out[:6], em[idx]) and not out[6:].any()
    assert take_rows(em, idx[:0]).shape == (0, *shape)
    src = (rng.random((6, *shape)) * 100).astype(np.float64)  # cast as numpy's assignment casts
    want, got = em.copy(), em.copy()
    slots, rows = np.array([1, 30, 4], dtype=np.int64), np.array([5, 0, 2], dtype=np.int64)
    want[slots] = src[rows]
    put_rows(got, slots, src, rows)
    assert np.array_equal(got, want)
    want[slots] = src[:3]
    put_rows(got, slots, src[:3])
    assert np.array_equal(got, want)


def test_put_rows_refuses_rows_of_another_shape():
    with pytest.raises(ValueError, match="shape"):
        put_rows(np.zeros((4, 2, 3), np.uint8), np.array([0, 1]), np.zeros((2, 3, 2), np.uint8))


def test_row_copies_hold_the_gil():
    """A copy that releases the GIL inside the EM's lock or a trainer's call hands it to a waiting
    background thread for that one's whole stretch (numpy releases it for rows of more than one
    dimension). With a huge switch interval a spinning thread runs only when the GIL is given up."""
    em = np.zeros((500, 3, 32, 32), np.uint8)
    src = np.ones((32, 3, 32, 32), np.uint8)
    idx = np.random.default_rng(1).permutation(500)[:32]
    out = np.empty((32, 3, 32, 32), np.uint8)
    spins, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            spins[0] += 1
            time.sleep(0)  # gives the GIL back at once: the main thread never waits long for it
    old = sys.getswitchinterval()
    sys.setswitchinterval(5.0)  # no forced switch in the ~10 ms the copies take
    t = threading.Thread(target=spin, daemon=True)
    try:
        t.start()
        time.sleep(0.05)
        before = spins[0]
        for _ in range(300):
            take_rows(em, idx, out)
            put_rows(em, idx, src)
        held = spins[0] - before
        time.sleep(0.05)
        assert spins[0] > before  # the spinner runs whenever the GIL is free
        before = spins[0]
        for _ in range(300):  # numpy's own copies of the same rows do give it up
            np.take(em, idx, axis=0, out=out)
            em[idx] = src
        released = spins[0] - before
    finally:
        stop.set()
        sys.setswitchinterval(old)
        t.join()
    assert held == 0 and released > 0, (held, released)


def test_as_array_views_cpu_tensors_and_detaches_the_others():
    t = torch.arange(6, dtype=torch.float32)
    assert np.shares_memory(as_array(t), t.numpy())  # no copy
    g = torch.ones(3, requires_grad=True) * 2  # .numpy() refuses a tensor that requires grad
    assert as_array(g).tolist() == [2.0, 2.0, 2.0]


def test_observe_is_queued_and_what_reads_statistics_waits_for_it(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path)) as mem:
        for seed in range(4):
            mem.add(*data(32, seed), task=0)
        mem.flush()
        b = mem.sample(32)
        ids, lg = b.ids.numpy().copy(), logits_for(b.ids.numpy())
        hold = Blocked(mem)
        logits = torch.from_numpy(lg.copy())
        mem.observe(b.ids, logits=logits, loss=torch.arange(32, dtype=torch.float32))
        logits.zero_()  # the caller reuses its tensor at once: the queued call kept its own copy
        assert (mem.catalog.replays[ids] == 0).all(), "observe() did its work on the caller's thread"
        hold.release()
        s = mem.stats()  # waits for the queued observe: its swap requests are made
        assert s["swap_lag"] + s["swapped_in"] > 0
        correct, entropy = expected_stats(mem, ids, lg)
        assert (mem.catalog.replays[ids] == 1).all()
        assert np.array_equal(mem.catalog.correct[ids], correct)
        assert np.allclose(mem.catalog.entropy[ids], entropy, atol=1e-5)
        assert np.array_equal(mem.catalog.loss[ids], np.arange(32, dtype=np.float32))


def test_bad_observe_input_raises_at_the_call(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path)) as mem:
        ids = mem.add(*data(16, 0), task=0)
        hold = Blocked(mem)  # nothing queued may run: the errors come from the call itself
        try:
            with pytest.raises(MemoryInputError, match="unknown ids"):
                mem.observe(torch.tensor([3, 10_000]))
            with pytest.raises(MemoryInputError, match="logits must be"):
                mem.observe(ids, logits=torch.zeros(3, CLASSES))
            with pytest.raises(MemoryInputError, match="loss must be"):
                mem.observe(ids, loss=torch.zeros(2))
            with pytest.raises(MemoryInputError, match="1-D array of integers"):
                mem.observe(torch.zeros(4))
        finally:
            hold.release()
        mem.stats()
        assert (mem.catalog.replays[:16] == 0).all()  # a rejected call queued nothing


def test_a_queued_observe_of_samples_that_left_the_em_meanwhile(tmp_path):
    """Queued observations name samples that admission and earlier swaps have since moved out
    of their slots: their statistics are kept, and no swap touches a slot they no longer hold."""
    with CarouselMemory.from_dict(config(tmp_path, em=16)) as mem:
        for seed in range(3):
            mem.add(*data(32, seed), task=0)
        mem.flush()
        hold = Blocked(mem)
        batches = []
        for seed in range(3, 30):  # observe, then add: admission replaces slots under the queued calls
            b = mem.sample(16)
            batches.append(b.ids.numpy().copy())
            mem.observe(b.ids, logits=torch.from_numpy(logits_for(b.ids.numpy())))
            mem.add(*data(32, seed), task=0)
        # Admission runs on the write-behind thread a moment after each add: this loop can run
        # within one GIL slice, before that thread admits anything, and would see no slot change.
        # wait_admitted() does not wait on the engine thread, which the hold keeps busy.
        assert mem.wait_admitted(10)
        moved = np.setdiff1d(np.concatenate(batches), mem.pool.slot_ids)
        assert moved.size, "nothing observed had left the EM: the test proves nothing"
        hold.release()
        mem.flush()
        mem._engine.wait_idle()
        replays = np.zeros(mem.catalog.n, np.int64)
        np.add.at(replays, np.concatenate(batches), 1)
        assert np.array_equal(mem.catalog.replays[:mem.catalog.n], replays)
        slot_ids = mem.pool.slot_ids[mem.pool.slot_ids >= 0]
        assert np.unique(slot_ids).size == slot_ids.size, "a sample sits in two EM slots"
        assert (mem.catalog.slot[slot_ids] == np.flatnonzero(mem.pool.slot_ids >= 0)).all()
        check_batch(mem, mem.sample(16))
        assert mem.stats()["swapped_in"] > 0


def test_close_with_queued_observes_loses_nothing_and_leaves_no_thread(tmp_path):
    cfg = config(tmp_path)
    before = set(threading.enumerate())
    mem = CarouselMemory.from_dict(cfg)
    for seed in range(4):
        mem.add(*data(32, seed), task=0)
    mem.flush()
    hold = Blocked(mem)
    observed = []
    for _ in range(20):
        b = mem.sample(32)
        ids = b.ids.numpy().copy()
        lg = logits_for(ids)
        observed.append((ids, lg, expected_stats(mem, ids, lg)))
        mem.observe(b.ids, logits=torch.from_numpy(lg))
    timer = threading.Timer(0.2, hold.release)  # close() finds the 20 calls still queued
    timer.start()
    mem.close()
    timer.join()
    assert not set(threading.enumerate()) - before, "close() left threads behind"
    again = CarouselMemory.from_dict(cfg)  # statistics come back from the checkpoint close() wrote
    try:
        replays = np.zeros(again.catalog.n, np.int64)
        for ids, lg, (correct, entropy) in observed:
            np.add.at(replays, ids, 1)
        last = {}
        for ids, lg, stats in observed:  # the last observation of each id is what the catalog keeps
            for j, i in enumerate(ids.tolist()):
                last[i] = (stats[0][j], stats[1][j])
        assert np.array_equal(again.catalog.replays[:again.catalog.n], replays)
        ids = np.array(sorted(last))
        assert np.array_equal(again.catalog.correct[ids], np.array([last[i][0] for i in ids.tolist()]))
        assert np.allclose(again.catalog.entropy[ids], [last[i][1] for i in ids.tolist()], atol=1e-5)
    finally:
        again.close()


@pytest.mark.parametrize("mode", ["workers=0", "deterministic", "ram-only"])
def test_the_other_memories_observe_on_the_callers_thread(tmp_path, mode):
    cfg = config(tmp_path, tiers=mode != "ram-only", workers=0 if mode == "workers=0" else 1,
                 deterministic=mode == "deterministic")
    with CarouselMemory.from_dict(cfg) as mem:
        mem.add(*data(32, 0), task=0)
        mem.flush()
        b = mem.sample(8)
        if mem._engine is not None and mem._engine.workers:
            hold = Blocked(mem)  # the engine's thread held: only the caller's thread can do the work
        else:
            hold = None
        try:
            mem.observe(b.ids, logits=torch.from_numpy(logits_for(b.ids.numpy())))
            assert (mem.catalog.replays[b.ids.numpy()] == 1).all()
        finally:
            if hold is not None:
                hold.release()


class WriterHeld:
    """Holds the write-behind thread (a queued storage call that waits) until released: adds
    submitted meanwhile wait for admission."""

    def __init__(self, mem: CarouselMemory) -> None:
        self.entered, self.go = threading.Event(), threading.Event()
        mem._writer.submit_calls([self._hold])
        assert self.entered.wait(10)

    def _hold(self) -> None:
        self.entered.set()
        self.go.wait(30)

    def release(self) -> None:
        self.go.set()


def test_add_returns_before_admission_and_what_reads_the_em_waits_for_it(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path, em=32)) as mem:
        hold = WriterHeld(mem)
        x, y = data(40, 0)
        ids = mem.add(x, y, task=0)
        assert ids.tolist() == list(range(40))
        assert mem.pool.filled() == 0 and mem.catalog.n == 0, "add() admitted on the caller's thread"
        lg = torch.from_numpy(logits_for(ids.numpy()))
        mem.observe(ids, logits=lg)  # its ids are not registered yet: the worker waits for them
        hold.release()
        b = mem.sample(16)  # an EM still filling: the draw waits for the queued admissions
        assert len(b) == 16
        s = mem.stats()
        assert s["tiers"]["ram"]["samples"] == 32 and s["added"] == 40
        correct, entropy = expected_stats(mem, ids.numpy(), lg.numpy())
        assert (mem.catalog.replays[:40] == 1).all()
        assert np.array_equal(mem.catalog.correct[:40], correct)
        added = {}
        remember(added, ids, x)
        check_batch(mem, b, added)
        mem.flush()
        assert (mem.catalog.home[:40] == 0).all()  # registered, then stored


def test_admission_goes_on_while_the_tier_fails(tmp_path):
    """A first tier that fails every write: add() still returns, the samples still reach the EM
    (admission runs between the writer's retries), and all are stored once the tier recovers."""
    with CarouselMemory.from_dict(config(tmp_path, em=32)) as mem:
        faulty = FaultyStore(mem.tiers[0].store)
        faulty.fail_puts = 10**6
        mem.tiers[0].store = faulty
        for seed in range(3):
            mem.add(*data(16, seed), task=0)
        assert len(mem.sample(32)) == 32
        assert mem.stats()["tiers"]["ram"]["samples"] == 32 and faulty.fail_puts > 0
        faulty.fail_puts = 0
        mem.flush(timeout_s=30)
        assert (mem.catalog.home[:48] == 0).all()


def test_a_seeded_draw_sees_every_add_before_it_even_with_a_full_em(tmp_path):
    """A seeded draw is how a user reads the EM as it is now: queued admissions land first, also
    when the EM is full (a class-filtered draw then finds the class added last)."""
    cfg = {"memory": {"em_size": 16, "sample_shape": [2], "seed": 0, "admission": "class_balanced"},
           "tiers": [{"kind": "lmdb", "path": str(tmp_path / "t"), "capacity": 1000}]}
    with CarouselMemory.from_dict(cfg) as mem:
        slow = FaultyStore(mem.tiers[0].store)
        put = slow.put_many

        def slow_put(ids, fields):  # the writer stores the first add slowly: the next ones wait to be admitted
            time.sleep(0.4)
            return put(ids, fields)
        slow.put_many = slow_put
        mem.tiers[0].store = slow
        for c in range(4):
            mem.add(torch.full((8, 2), c, dtype=torch.uint8), torch.full((8,), c), task=0)
            time.sleep(0.01)
        got = mem.sample(16, classes=[3], seed=0)
        assert len(got) > 0 and (got.y == 3).all()
