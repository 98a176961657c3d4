"""The asynchronous memory's writer lingers for more adds before it admits and stores them
(carousel.write_behind: one pass per few training steps, not per add), and whoever waits for it
ends the linger: flush, stats, a draw from an EM still filling, close."""

from __future__ import annotations

import time

import pytest
import torch

import carousel.memory
from carousel import CarouselMemory

SHAPE = (3, 8, 8)
LONG = 5.0  # far longer than any call below may take: a call that waits out the linger fails


def config(tmp_path) -> dict:
    return {"memory": {"em_size": 64, "sample_shape": list(SHAPE), "seed": 0},
            "swap": {"ratio": 0.5, "workers": 1, "start_task": 0},
            "write_behind": {"queue_samples": 4096, "batch": 256},
            "tiers": [{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": 10_000}]}


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g), torch.randint(0, 4, (n,), generator=g)


def stored(st: dict) -> int:
    return sum(t["samples"] for name, t in st["tiers"].items() if name != "ram")


@pytest.fixture
def long_linger(monkeypatch):
    monkeypatch.setattr(carousel.memory, "WRITE_LINGER_S", LONG)


def spy_puts(mem: CarouselMemory) -> list[int]:
    """The sizes of the first tier's writes, recorded as the real store does them."""
    store = mem.tiers[0].store
    sizes: list[int] = []
    put = store.put_many

    def counted(ids, fields):
        sizes.append(len(ids))
        return put(ids, fields)
    store.put_many = counted
    return sizes


def test_adds_within_the_linger_are_admitted_and_stored_together(tmp_path, long_linger):
    mem = CarouselMemory.from_dict(config(tmp_path))
    try:
        sizes = spy_puts(mem)
        for k in range(3):  # three training steps' adds, all within the linger
            mem.add(*data(32, k), task=0)
        t0 = time.perf_counter()
        mem.flush()  # waits for the writer: ends its linger rather than sitting it out
        assert time.perf_counter() - t0 < LONG / 2
        assert sizes == [96], f"one write for the three adds expected, got {sizes}"
        st = mem.stats()
        assert st["added"] == 96 and st["tiers"]["ram"]["samples"] == 64  # reservoir: the first 64 fill the EM
        assert stored(st) == 96 and st["pending_writes"] == 0
    finally:
        mem.close()


@pytest.mark.parametrize("call", ["stats", "sample", "wait_admitted", "close"])
def test_whoever_waits_for_the_writer_ends_its_linger(tmp_path, long_linger, call):
    mem = CarouselMemory.from_dict(config(tmp_path))
    closed = False
    try:
        mem.add(*data(8, 0), task=0)
        t0 = time.perf_counter()
        if call == "stats":
            assert mem.stats()["tiers"]["ram"]["samples"] == 8
        elif call == "sample":  # an EM still filling: the draw waits for the queued admissions
            assert len(mem.sample(8)) == 8
        elif call == "wait_admitted":
            assert mem.wait_admitted(LONG)
        else:
            mem.close()
            closed = True
        assert time.perf_counter() - t0 < LONG / 2, f"{call}() sat out the writer's linger"
    finally:
        if not closed:
            mem.close()
    if closed:  # what was added before close() was stored: it is there on reopening
        again = CarouselMemory.from_dict(config(tmp_path))
        try:
            assert stored(again.stats()) == 8
        finally:
            again.close()


def test_an_add_the_full_queue_blocks_ends_the_linger(tmp_path, long_linger):
    cfg = config(tmp_path)
    cfg["write_behind"] = {"queue_samples": 64, "batch": 64}
    mem = CarouselMemory.from_dict(cfg)
    try:
        t0 = time.perf_counter()
        for k in range(4):  # 128 samples through a queue of 64: the writer must store meanwhile
            mem.add(*data(32, k), task=0)
        assert time.perf_counter() - t0 < LONG / 2
        mem.flush()
        assert mem.stats()["added"] == 128
    finally:
        mem.close()
