"""Labels: bounded at the door by ``memory.max_label``, and never a size anywhere else
(RELIABILITY.md item 22, the label part: ``test_a_label_above_max_label_is_rejected_and_changes_nothing``,
``test_sparse_labels_up_to_2_31_sample_and_swap_normally`` and
``test_a_memory_already_holding_a_label_of_2_40_opens_and_works``)."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch

from carousel import CarouselMemory, MemoryInputError
from carousel.config import DEFAULT_MAX_LABEL, CarouselConfig, ConfigError
from storage_backends import open_store

HUGE = 2**40  # what a bincount over labels once turned into an 8 TiB allocation on every step
SPARSE = [3, 2**20 + 7, 2**31 - 1, 2**31]  # open-world class ids: few classes, large values
PEAK_BYTES = 64 << 20  # far above what these small memories need, far below a label-sized array


def config(tmp_path, em=32, tiers=(("lmdb", 100_000),), **memory) -> dict:
    return {"memory": {"em_size": em, "sample_shape": [4], "seed": 1, **memory},
            "swap": {"ratio": 1.0, "workers": 1, "prefetch_depth": 64},
            "write_behind": {"queue_samples": 2048, "batch": 64},
            "tiers": [{"kind": kind, "path": str(tmp_path / f"t{i}"), "capacity": cap, **extra}
                      for i, (kind, cap, *rest) in enumerate(tiers) for extra in [rest[0] if rest else {}]]}


def samples(labels) -> tuple[np.ndarray, np.ndarray]:
    """``x`` encodes the label (its low 4 bytes), so a batch can be checked against its labels."""
    y = np.asarray(labels, np.int64)
    return (y & 0xFFFFFFFF).astype(np.uint32).view(np.uint8).reshape(-1, 4).copy(), y


def check_batch(batch) -> None:
    assert len(batch) > 0
    want = (batch.y.numpy() & 0xFFFFFFFF).astype(np.uint32).view(np.uint8).reshape(-1, 4)
    assert np.array_equal(batch.x.numpy(), want), "a slot holds another sample's pixels"


def replay(mem: CarouselMemory, steps: int, n_classes_logits: int = 8) -> None:
    for _ in range(steps):
        b = mem.sample(16)
        check_batch(b)
        mem.observe(b.ids, logits=torch.randn(len(b), n_classes_logits), loss=torch.rand(len(b)))


# ---- the bound at the door -----------------------------------------------------------------------
def test_max_label_config_default_range_and_round_trip():
    base = {"em_size": 8, "sample_shape": [4]}
    assert CarouselConfig.from_dict({"memory": base}).memory.max_label == DEFAULT_MAX_LABEL == 2**32 - 1
    cfg = CarouselConfig.from_dict({"memory": {**base, "max_label": 2**40}})
    assert CarouselConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["memory"]["max_label"] == 2**40
    for bad, reason in [(-1, "must be in"), (2**47, "must be in"), (True, "expected an integer"),
                        (1.5, "expected an integer"), ("9", "expected an integer")]:
        with pytest.raises(ConfigError, match=reason) as err:
            CarouselConfig.from_dict({"memory": {**base, "max_label": bad}})
        assert err.value.key == "memory.max_label"


@pytest.mark.parametrize("tiered", [False, True])
def test_a_label_above_max_label_is_rejected_and_changes_nothing(tmp_path, tiered):
    """RELIABILITY.md item 22 (labels): a label of 2**40 is a clear error at the door."""
    cfg = config(tmp_path, em=8, tiers=(("lmdb", 1000),) if tiered else ())
    with CarouselMemory.from_dict(cfg) as mem:
        mem.add(*samples([0, 1]), task=0)
        x, y = samples([5, HUGE, 7])
        with pytest.raises(MemoryInputError, match=rf"^label {HUGE} exceeds memory.max_label = {2**32 - 1}$"):
            mem.add(x, y, task=0)
        with pytest.raises(MemoryInputError, match="exceeds memory.max_label"):
            mem.add(torch.from_numpy(x), torch.from_numpy(y), task=0)  # tensors the same
        mem.flush()
        st = mem.stats()
        assert st["added"] == 2 and mem.pool.filled() == 2 and st["pending_writes"] == 0
        if tiered:
            assert st["tiers"]["0-lmdb"]["samples"] == 2
        assert mem.add(*samples([2**32 - 1]), task=0).tolist() == [2]  # the bound itself is a label


def test_a_lower_max_label_is_the_bound(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path, tiers=(), max_label=9)) as mem:
        assert mem.config.memory.max_label == 9
        mem.add(*samples(range(10)), task=0)
        with pytest.raises(MemoryInputError, match="^label 10 exceeds memory.max_label = 9$"):
            mem.add(*samples([10]), task=0)


# ---- sparse labels cost nothing --------------------------------------------------------------------
@pytest.mark.parametrize("admission, swap_in, eviction", [
    ("reservoir", "same_class_random", "class_balanced"),
    ("class_balanced", "class_balanced", "random"),
    ("reservoir", "random", "fifo"),
])
def test_sparse_labels_up_to_2_31_sample_and_swap_normally(tmp_path, admission, swap_in, eviction):
    """RELIABILITY.md item 22 (labels): every per-class path -- admission, swap-out and swap-in,
    prefetch queues, a tier's class quota and migration, balanced and filtered draws -- with labels
    up to 2**31, and no allocation sized by a label."""
    cfg = config(tmp_path, admission=admission,
                 tiers=(("lmdb", 300, {"class_quota": 90, "eviction": eviction}),
                        ("zarr", 100_000, {"chunk": 16})))
    cfg["swap"]["swap_in"] = swap_in
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        with CarouselMemory.from_dict(cfg) as mem:
            for task in range(2):
                for _ in range(10):
                    mem.add(*samples(rng.choice(SPARSE, 64)), task=task)
            mem.flush()
            replay(mem, 150)
            mem._engine.wait_idle()
            st = mem.stats()
            assert st["swapped_in"] > 0 and st["errors"] == {"write_behind": None, "swap": None}, st
            assert st["tiers"]["0-lmdb"]["samples"] <= 300 and st["tiers"]["1-zarr"]["samples"] > 0  # migrated
            on_flash = mem.catalog.tier_ids(0)
            assert np.unique(mem.catalog.label[on_flash], return_counts=True)[1].max() <= 90  # the class quota
            em = mem.pool.slot_labels[mem.pool.slot_ids >= 0]
            assert set(em.tolist()) <= set(SPARSE) and em.size == 32
            assert set(mem.sample(32, classes=[2**31]).y.tolist()) == {2**31}
            assert set(mem.sample(32, balanced=True, seed=0).y.tolist()) <= set(SPARSE)
            check_batch(mem.sample(32, seed=3))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"peak {peak / 2**20:.0f} MiB"
    with CarouselMemory.from_dict(cfg) as again:  # recovered from the tiers and the checkpoint
        assert set(again.catalog.available_by_class()) <= set(SPARSE)
        replay(again, 20)


def test_same_class_swaps_keep_a_sparse_em_histogram(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path)) as mem:
        rng = np.random.default_rng(1)
        for task in range(2):
            mem.add(*samples(rng.choice(SPARSE, 256)), task=task)
        mem.flush()
        before = np.unique(mem.pool.slot_labels, return_counts=True)
        replay(mem, 40)
        mem._engine.wait_idle()
        after = np.unique(mem.pool.slot_labels, return_counts=True)
        assert mem.stats()["swapped_in"] > 0
        assert [a.tolist() for a in before] == [a.tolist() for a in after]


# ---- a memory that already holds a huge label ------------------------------------------------------
@pytest.mark.parametrize("how", ["written into the tier", "added under a raised max_label"])
def test_a_memory_already_holding_a_label_of_2_40_opens_and_works(tmp_path, how):
    """RELIABILITY.md item 22 (labels). Labels in the tiers are what they are: a memory holding a
    label of 2**40 (written before the bound existed, or under a raised bound) opens, samples,
    observes and swaps, and a restart from its checkpoint does too. New samples meet the bound of
    the config they are added under."""
    cfg = config(tmp_path)
    cfg["swap"]["swap_in"] = "class_balanced"  # brings the new class into the EM
    rng = np.random.default_rng(2)
    raised = {**cfg, "memory": {**cfg["memory"], "max_label": 2**41}}
    with CarouselMemory.from_dict(raised if how.startswith("added") else cfg) as mem:
        mem.add(*samples(rng.choice(SPARSE[:2], 200)), task=1)  # task 1: swaps are on
        if how.startswith("added"):
            mem.add(*samples([HUGE] * 40), task=1)
        next_id = mem.stats()["added"]
    if how.startswith("written"):
        fields = {"x": ((4,), "uint8"), "y": ((), "int64"), "task": ((), "int16")}
        with open_store(f"lmdb://{tmp_path / 't0'}", fields) as store:  # as a memory with no bound left it
            x, y = samples([HUGE] * 40)
            store.put_many(np.arange(next_id, next_id + 40), {"x": x, "y": y, "task": np.ones(40, np.int16)})
            store.flush()
        next_id += 40
    tracemalloc.start()
    try:
        for _ in range(2):  # the first open recovers from the tier, the second from the checkpoint too
            with CarouselMemory.from_dict(cfg) as mem:
                classes = mem.catalog.available_by_class().keys() | mem.catalog.class_counts(mem.pool.slot_ids).keys()
                assert {SPARSE[0], SPARSE[1], HUGE} <= classes <= set(SPARSE) | {HUGE}
                assert mem.stats()["tiers"]["0-lmdb"]["samples"] >= 240
                replay(mem, 60)
                mem._engine.wait_idle()
                st = mem.stats()
                assert st["swapped_in"] > 0 and st["errors"]["swap"] is None, st
                assert set(mem.sample(8, classes=[HUGE]).y.tolist()) == {HUGE}
                with pytest.raises(MemoryInputError, match="exceeds memory.max_label"):
                    mem.add(*samples([HUGE]), task=1)
                assert mem.add(*samples([SPARSE[2]] * 4), task=1).min() >= next_id
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"peak {peak / 2**20:.0f} MiB"


def test_prefetch_depth_holds_with_more_classes_than_it(tmp_path):
    """An open-world stream: 300 classes, a prefetch depth of 16. The prefetcher keeps at most 16
    candidates decoded in all (it once kept one per class: 300), drawn from many classes."""
    cfg = config(tmp_path)
    cfg["swap"]["prefetch_depth"] = 16
    classes = np.random.default_rng(3).choice(2**31, 300, replace=False)
    with CarouselMemory.from_dict(cfg) as mem:
        mem.add(*samples(np.repeat(classes, 3)), task=1)
        mem.flush()
        held, seen = [], set()
        for _ in range(40):  # the prefetcher wakes every 50 ms
            time.sleep(0.02)
            held.append(mem.stats()["prefetched"])
            with mem._engine._ready_lock:
                seen |= {c for c, q in mem._engine._ready.items() if q}
            replay(mem, 1)
        assert 0 < max(held) <= 16, held
        assert len(seen) > 16, "the same few classes every round"
