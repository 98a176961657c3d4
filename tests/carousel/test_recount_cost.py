"""The swap engine's count of stored candidates by class is a pass over every id in the catalog
(~2.5 ms at 1 M ids): it is taken again no sooner than ``swap_engine.RECOUNT_EVERY`` times its
last duration, so its cost stays a small share of a core however many samples are stored, except
for a class that just became available, which is counted at once."""

from __future__ import annotations

import threading
import time

import torch

from carousel import CarouselMemory, swap_engine

SHAPE = (4,)
SLOW_S = 0.05  # a count made this slow: the next may come no sooner than RECOUNT_EVERY x 50 ms


def config(tmp_path) -> dict:
    return {"memory": {"em_size": 16, "sample_shape": list(SHAPE), "dtype": "float32", "seed": 0},
            "swap": {"ratio": 0.5, "workers": 1, "start_task": 0},
            "tiers": [{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": 10_000}]}


def add(mem: CarouselMemory, n: int, label: int) -> None:
    mem.add(torch.rand(n, *SHAPE), torch.full((n,), label), task=0)


def counted(mem: CarouselMemory, delay_s: list[float]) -> list[float]:
    """Every count the catalog makes from now on, timed, each made ``delay_s[0]`` slower."""
    counts: list[float] = []
    real = mem.catalog.available_by_class
    lock = threading.Lock()

    def slow(*args, **kwargs):
        time.sleep(delay_s[0])
        with lock:
            counts.append(time.monotonic())
        return real(*args, **kwargs)
    mem.catalog.available_by_class = slow
    return counts


def test_a_costly_count_is_not_taken_again_soon(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path)) as mem:
        add(mem, 64, 0)
        mem.flush()
        engine = mem._engine
        delay = [SLOW_S]
        counts = counted(mem, delay)
        engine.refresh_available()  # a 50 ms count: the next waits RECOUNT_EVERY x 50 ms
        assert swap_engine.RECOUNT_EVERY * SLOW_S >= 2.0
        time.sleep(2 * SLOW_S)  # a count the engine's threads began meanwhile (a fast one's floor) ends
        n = len(counts)
        t_end = time.monotonic() + 0.3
        while time.monotonic() < t_end:
            assert engine.available_by_class(max_age_s=0.0) == {0: 48}  # EM 16 of the 64 stored
            assert engine.available_by_class(want={7}) == {0: 48}  # a class it lacks, none new: no recount
            time.sleep(0.005)
        assert len(counts) == n, "counted again within its cost floor"

        add(mem, 8, 1)  # class 1's first stored samples: the catalog's classes_version moves
        assert mem.wait_admitted()
        mem._writer.drain()
        in_em = mem.catalog.class_counts(mem.pool.slot_ids).get(1, 0)  # admitted to the EM: not a candidate
        assert engine.available_by_class(want={1})[1] == 8 - in_em  # counted at once, floor or not
        assert len(counts) > n


def test_a_cheap_count_is_taken_again_as_before(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path)) as mem:
        add(mem, 64, 0)
        mem.flush()
        engine = mem._engine
        counts = counted(mem, [0.0])
        engine.refresh_available()
        n = len(counts)
        time.sleep(0.05)  # far longer than RECOUNT_EVERY x a count of 64 ids (microseconds)
        engine.available_by_class(max_age_s=0.0)
        assert len(counts) > n
