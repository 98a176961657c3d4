"""What ``add``, ``sample`` and ``observe`` do on the trainer's thread (issue 22).

- No torch op that touches data runs in them -- so nothing wakes torch's intra-op pool, whatever
  ``torch.set_num_threads`` says -- and the batches are still right.
- ``sample(..., pin_memory=True)``: pinned where CUDA is, the ordinary batch where it is not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from carousel import CarouselMemory
from carousel.batch import can_pin
from carousel.inputs import as_array

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


def check_batch(mem: CarouselMemory, b, added: dict[int, torch.Tensor] | None = None) -> None:
    """Every row is the sample its id names: its label, pixels that encode it, and (given what
    ``add`` was handed, by id) exactly the bytes added."""
    assert np.array_equal(b.y.numpy(), mem.catalog.label[b.ids.numpy()])
    assert (b.x.reshape(len(b), -1).max(1).values // 50 == b.y.to(torch.uint8)).all()
    if added is not None:
        assert torch.equal(b.x, torch.stack([added[i] for i in b.ids.tolist()]))


def remember(added: dict[int, torch.Tensor], ids: torch.Tensor, x: torch.Tensor) -> None:
    added.update(zip(ids.tolist(), x))


@pytest.mark.parametrize("tiers", [False, True], ids=["ram-only", "tiered"])
def test_the_trainers_calls_run_no_torch_op_on_data(tmp_path, tiers):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # an intra-op pool there to be woken: nothing below may use it
    try:
        with CarouselMemory.from_dict(config(tmp_path, tiers=tiers)) as mem:
            stream = [data(32, seed) for seed in range(4)]
            added: dict[int, torch.Tensor] = {}
            remember(added, mem.add(*stream[0], task=0), stream[0][0])
            if tiers:
                mem.flush()
            lg = torch.randn(32, CLASSES)
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


def test_as_array_views_cpu_tensors_and_detaches_the_others():
    t = torch.arange(6, dtype=torch.float32)
    assert np.shares_memory(as_array(t), t.numpy())  # no copy
    g = torch.ones(3, requires_grad=True) * 2  # .numpy() refuses a tensor that requires grad
    assert as_array(g).tolist() == [2.0, 2.0, 2.0]
