"""The asynchronous memory's worker takes several observations in one call (swap_engine.Merging):
in order, never past other posted work, at most ``most`` at a time, and with the statistics each
call alone would have recorded."""

from __future__ import annotations

import threading

import numpy as np
import torch

from carousel import CarouselMemory
from carousel.swap_engine import Merging
from tests.carousel.test_memory import config, run_tasks


def _blocked(engine):
    """Hold the worker inside a posted call until the returned event is set."""
    entered, go = threading.Event(), threading.Event()

    def hold():
        entered.set()
        assert go.wait(10)

    engine.post(hold)
    assert entered.wait(10)
    return go


def test_the_worker_merges_consecutive_posts_in_order_and_never_past_others(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path)) as mem:
        engine, calls = mem._engine, []
        work = Merging(lambda batch: calls.append(("merged", [a[0] for a in batch])), linger_s=0.0, most=4)
        go = _blocked(engine)
        for k in range(6):
            engine.post_merging(work, k)
        engine.post(lambda: calls.append(("plain", None)))
        for k in range(6, 8):
            engine.post_merging(work, k)
        go.set()
        assert engine.settle(10)
        assert calls == [("merged", [0, 1, 2, 3]), ("merged", [4, 5]), ("plain", None), ("merged", [6, 7])]


def test_the_worker_lingers_for_the_next_observation(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path)) as mem:
        engine, calls = mem._engine, []
        work = Merging(lambda batch: calls.append([a[0] for a in batch]), linger_s=5.0, most=3)
        engine.post_merging(work, 0)  # the worker is idle: it takes this and waits for more
        engine.post_merging(work, 1)
        engine.post_merging(work, 2)
        assert engine.settle(10)
        assert calls == [[0, 1, 2]]
        engine.post_merging(work, 3)
        assert engine.settle(10)  # a settle ends the linger: it does not wait the 5 s out
        assert calls == [[0, 1, 2], [3]]


def test_merged_observations_record_what_each_alone_would(tmp_path):
    """Three observations held back and taken as one: the replay counts add up over all of them
    and a sample seen twice keeps its last statistics, as in a memory that observes one by one."""
    results = []
    for merged in (False, True):
        with CarouselMemory.from_dict(config(tmp_path / str(merged), ratio=0.0)) as mem:
            run_tasks(mem, tasks=2, steps=4)
            mem.flush()
            ids = torch.from_numpy(mem.pool.slot_ids[mem.pool.slot_ids >= 0][:24].copy())
            batches = [ids[:16], ids[8:24], ids[4:12]]
            logits = [torch.from_numpy(np.random.default_rng(k).normal(size=(len(b), 6)).astype(np.float32))
                      for k, b in enumerate(batches)]
            assert mem._engine.settle(10)
            before = mem.catalog.replays[ids.numpy()].copy()
            go = _blocked(mem._engine) if merged else None
            for b, lg in zip(batches, logits):
                mem.observe(b, logits=lg, loss=lg[:, 0].abs())
                if not merged:
                    assert mem._engine.settle(10)
            if go is not None:
                go.set()
            assert mem._engine.settle(10)
            cat, at = mem.catalog, ids.numpy()
            results.append((cat.replays[at] - before, cat.correct[at].copy(), cat.entropy[at].copy(), cat.loss[at].copy()))
    for one, many in zip(*results):
        np.testing.assert_array_equal(one, many)
    assert results[1][0].tolist() == [1] * 4 + [2] * 4 + [3] * 4 + [2] * 4 + [1] * 8
