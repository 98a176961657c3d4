"""A memory with a files tier, end to end: add -> files on disk -> swaps read back on the engine's loop."""

from __future__ import annotations

import numpy as np
import torch

from carousel import CarouselMemory
from tests.carousel.test_memory import check_slots_whole, config, conservation, em_unique, run_tasks


def test_a_files_tier_stores_swaps_and_reopens(tmp_path):
    cfg = config(tmp_path, tiers=(("files", 150), ("flat", 300)))
    cfg["tiers"][0]["inflight"] = 8
    with CarouselMemory.from_dict(cfg) as mem:
        store = mem.tiers[0].store
        assert store.url.startswith("files://") and store._runner.bound is mem._engine._loop  # bound at start
        run_tasks(mem)
        mem.flush()
        mem._engine.wait_idle()
        s = mem.stats()
        assert s["swapped_in"] > 0 and s["swapped_in"] == s["swapped_out"]
        assert s["evicted"] == s["added"] - 450
        assert len(store) == 150 and len(list((tmp_path / "t0-files" / "data").rglob("*.rec"))) == 150
        assert store.inflight_high_water > 1  # the engine's reads had several files in flight
        conservation(mem)
        em_unique(mem)
        engine = mem._engine
    assert store._runner.bound is None and engine._loop is None  # taken back before the loop stopped
    with CarouselMemory.from_dict(cfg) as mem:
        assert len(mem.tiers[0].store) == 150  # the samples survive the restart
        for _ in range(5):
            b = mem.sample(32)
            check_slots_whole(b)
            mem.observe(b.ids, logits=torch.randn(len(b), 6))
        got = mem.tiers[0].store.get_many(mem.tiers[0].store.ids())
        assert (got["x"].reshape(150, -1) == (got["y"] * 10).astype(np.uint8)[:, None]).all()
