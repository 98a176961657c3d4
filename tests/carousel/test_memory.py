"""CarouselMemory end to end, in-process: add -> tiers -> sample, observe -> swaps."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from carousel import CarouselMemory, MemoryInputError, WriteBehindError
from carousel.catalog import EVICTED, PENDING
from tests.faulty_store import FaultyStore

SHAPE = (3, 8, 8)


def config(tmp_path, em=64, tiers=((("lmdb", 400),)), workers=1, ratio=0.5, **swap):
    tier_list = [{"kind": kind, "path": str(tmp_path / f"t{i}-{kind}"), "capacity": cap}
                 for i, (kind, cap) in enumerate(tiers)]
    return {"memory": {"em_size": em, "sample_shape": list(SHAPE), "seed": 0},
            "swap": {"ratio": ratio, "workers": workers, "prefetch_depth": 128, **swap},
            "write_behind": {"queue_samples": 2048, "batch": 64},
            "tiers": tier_list}


def stream(n, task, classes, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    # Every sample's pixels encode its label, so a batch can be checked for torn or mixed slots.
    x = (y.view(-1, 1, 1, 1) * 10 + torch.zeros((n, *SHAPE), dtype=torch.int64)).to(torch.uint8)
    return x, y, task


def check_slots_whole(batch):
    assert (batch.x.view(len(batch), -1) == (batch.y * 10).view(-1, 1).to(torch.uint8)).all()


def conservation(mem):
    """Every added id has exactly one home: a tier, the write-behind queue, or evicted."""
    n = mem.stats()["added"]
    home = mem.catalog.home[:n]
    on_tiers = sum(len(t.store) for t in mem.tiers)
    assert (home >= 0).sum() == on_tiers
    assert ((home >= 0) | (home == PENDING) | (home == EVICTED)).all()
    ids = np.concatenate([t.store.ids() for t in mem.tiers])
    assert np.unique(ids).size == ids.size  # no id in two tiers
    assert on_tiers + (home == PENDING).sum() + (home == EVICTED).sum() == n


def em_unique(mem):
    ids = mem.pool.slot_ids[mem.pool.slot_ids >= 0]
    assert np.unique(ids).size == ids.size, "a sample sits in two EM slots"
    assert (mem.catalog.slot[ids] == np.flatnonzero(mem.pool.slot_ids >= 0)).all()


def run_tasks(mem, tasks=3, steps=15, batch=32):
    for task in range(tasks):
        for step in range(steps):
            mem.add(*stream(batch, task, [2 * task, 2 * task + 1], seed=task * 1000 + step))
            b = mem.sample(batch)
            check_slots_whole(b)
            mem.observe(b.ids, logits=torch.randn(len(b), 2 * tasks))
        if mem.tiers:
            # These steps take microseconds, so write-behind would still be storing the task when
            # the next one starts; a trainer's steps take milliseconds. Wait, as at a task boundary.
            mem.flush()


def test_ram_only_memory_is_a_replay_buffer(tmp_path):
    mem = CarouselMemory.from_dict(config(tmp_path, em=32, tiers=()))
    run_tasks(mem, tasks=2, steps=5)
    s = mem.stats()
    assert s["tiers"]["ram"]["samples"] == 32 and s["added"] == 320
    assert s["evicted"] == 320 - 32 and s["swapped_in"] == 0
    mem.close()


@pytest.mark.parametrize("tiers", [(("lmdb", 400),), (("lmdb", 150), ("zarr", 300)), (("flat", 150), ("zarr", 300)),
                                   (("lmdb", 150), ("flat", 300))])
def test_swaps_conservation_and_no_duplicates(tmp_path, tiers):
    with CarouselMemory.from_dict(config(tmp_path, tiers=tiers)) as mem:
        run_tasks(mem)
        mem.flush()
        mem._engine.wait_idle()
        s = mem.stats()
        assert s["swapped_in"] > 0 and s["swapped_in"] == s["swapped_out"]
        assert s["added"] == 3 * 15 * 32
        assert s["evicted"] == s["added"] - sum(c for _, c in tiers)
        conservation(mem)
        em_unique(mem)
        for t in mem.tiers:
            assert len(t.store) == t.capacity


def test_no_swaps_during_the_first_task(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path)) as mem:
        run_tasks(mem, tasks=1)
        mem._engine.wait_idle()
        assert mem.stats()["swapped_in"] == 0


def test_same_class_swaps_keep_the_em_histogram(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path, ratio=1.0)) as mem:
        run_tasks(mem, tasks=2, steps=10)
        mem._engine.wait_idle()
        before = np.bincount(mem.pool.slot_labels[mem.pool.slot_labels >= 0], minlength=6)
        for _ in range(30):  # replay only: no admission, so only swaps change the EM
            b = mem.sample(32)
            mem.observe(b.ids, logits=torch.randn(len(b), 6))
        mem._engine.wait_idle()
        after = np.bincount(mem.pool.slot_labels[mem.pool.slot_labels >= 0], minlength=6)
        assert mem.stats()["swapped_in"] > 0
        assert before.tolist() == after.tolist()


def test_a_swap_serves_each_slot_from_its_class_queue_first(tmp_path):
    """One swap request whose classes interleave: each slot gets a candidate of the class asked for
    it, queued candidates first and in queue order; the positions no queue could serve come back
    (grouped by class) for a read, and the read serves them from the same classes."""
    with CarouselMemory.from_dict(config(tmp_path, em=64, workers=0, ratio=1.0, prefetch_depth=0)) as mem:
        run_tasks(mem, tasks=3, steps=6)
        mem.flush()
        eng = mem._engine
        occupied = np.flatnonzero(mem.pool.slot_ids >= 0)[:5]
        slots, victims = occupied.copy(), mem.pool.slot_ids[occupied].copy()
        classes = np.array([2, 0, 2, 1, 0], np.int64)
        queued = {0: eng._read_candidates(0, 2), 2: eng._read_candidates(2, 1)}
        assert queued[0][0].size == 2 and queued[2][0].size == 1
        with eng._ready_lock:
            for cls, cands in queued.items():
                eng._queue_ready(cls, cands)
        left = eng._swap(slots, victims, classes, None)
        assert left.tolist() == [3, 2]  # class 1 had nothing queued, class 2 one of two
        assert mem.pool.slot_ids[slots[[1, 4]]].tolist() == queued[0][0].tolist()
        assert mem.pool.slot_ids[slots[0]] == queued[2][0][0]
        assert eng.prefetched() == 0
        assert (mem.catalog.slot[victims[[0, 1, 4]]] == -1).all()
        eng._swap(slots[left], victims[left], classes[left], eng._read_candidates)
        now = mem.pool.slot_ids[slots]
        assert (mem.catalog.label[now] == classes).all()
        assert not np.isin(now, victims).any()
        em_unique(mem)


def test_sample_never_waits_on_slow_storage(tmp_path):
    """While every storage read takes 0.5 s and swaps go on, no sample() waits for one: the slowest
    takes less than half a read. (A behaviour, not a speed: benchmarks.stall measures the speed.)"""
    with CarouselMemory.from_dict(config(tmp_path, em=500, tiers=(("lmdb", 3000),))) as mem:
        for task in range(2):
            for step in range(20):
                mem.add(*stream(64, task, [2 * task, 2 * task + 1], seed=task * 100 + step))
        mem.flush()
        slow = FaultyStore(mem.tiers[0].store, read_delay_s=0.5)
        mem.tiers[0].store = slow
        latencies = []
        # At least 3 s of steps, and on until swaps have landed: the first ones are misses, read
        # class by class at 0.5 s a read on the one I/O thread, maybe behind a prefetch plan's reads.
        start = time.monotonic()
        swapped = 0
        while time.monotonic() - start < 3.0 or (not swapped and time.monotonic() - start < 30.0):
            t0 = time.perf_counter()
            b = mem.sample(256)
            latencies.append(time.perf_counter() - t0)
            mem.observe(b.ids, logits=torch.randn(len(b), 4))
            time.sleep(0.002)  # a training step's worth of other work
            if time.monotonic() - start >= 3.0 and len(latencies) % 50 == 0:
                swapped = mem.stats()["swapped_in"]
        assert max(latencies) < 0.25, f"a sample(256) took {max(latencies) * 1e3:.0f} ms: it waited on a read"
        assert slow.reads > 0
        assert mem.stats()["swapped_in"] > 0


def test_synchronous_mode_swaps_on_the_callers_thread(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path, workers=0)) as mem:
        run_tasks(mem, tasks=2, steps=10)
        s = mem.stats()
        assert s["swapped_in"] > 0 and s["swap_lag"] == 0
        em_unique(mem)


def test_concurrent_add_sample_observe_keep_the_em_consistent(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path, em=64, tiers=(("lmdb", 500),), ratio=1.0)) as mem:
        run_tasks(mem, tasks=2, steps=3)
        errors = []
        stop = threading.Event()

        def replay(seed):
            try:
                while not stop.is_set():
                    b = mem.sample(32, seed=None)
                    check_slots_whole(b)
                    assert np.unique(b.ids.numpy()).size == len(b)
                    mem.observe(b.ids, logits=torch.randn(len(b), 6))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=replay, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for step in range(40):
            mem.add(*stream(16, 2, [4, 5], seed=5000 + step))
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        mem.flush()
        mem._engine.wait_idle()
        em_unique(mem)
        conservation(mem)


def test_checkpoint_and_reopen_restore_the_em(tmp_path):
    cfg = config(tmp_path)
    with CarouselMemory.from_dict(cfg) as mem:
        run_tasks(mem, tasks=2, steps=5)
        mem.checkpoint()
        em_before = sorted(mem.pool.slot_ids.tolist())
        added = mem.stats()["added"]
    again = CarouselMemory.from_dict(cfg)
    try:
        assert again.stats()["added"] == added
        assert sorted(again.pool.slot_ids.tolist()) == em_before
        check_slots_whole(again.sample(64))
        ids = again.add(*stream(4, 2, [4, 5], seed=9))
        assert ids.min().item() == added  # ids continue, never reused
    finally:
        again.close()


def test_write_behind_failure_reaches_add_and_loses_nothing(tmp_path):
    """RELIABILITY items 5 and 8 at the memory: a tier that fails every write (full, read-only) -> a typed
    error in add, stats() reports it until it clears, the RAM tier keeps serving, nothing is lost."""
    cfg = config(tmp_path)
    cfg["write_behind"] = {"queue_samples": 64, "batch": 32, "block_timeout_s": 0.5}
    with CarouselMemory.from_dict(cfg) as mem:
        faulty = FaultyStore(mem.tiers[0].store)
        faulty.fail_puts = 10**6
        mem.tiers[0].store = faulty
        returned = 0
        with pytest.raises(WriteBehindError, match="StoreFullError"):
            for step in range(20):
                mem.add(*stream(32, 0, [0, 1], seed=step))
                returned += 1
        assert mem.stats()["added"] == 32 * returned  # the rejected add left no trace
        assert "StoreFullError" in mem.stats()["errors"]["write_behind"]  # health says degraded, and why
        b = mem.sample(16)  # the RAM tier keeps serving
        assert len(b) == 16
        faulty.fail_puts = 0  # space comes back: every queued sample lands
        mem.flush(timeout_s=10)
        conservation(mem)
        assert mem.stats()["evicted"] == 0
        assert (mem.catalog.home[:32 * returned] == 0).all()  # every accepted sample is stored
        assert mem.stats()["errors"]["write_behind"] is None


@pytest.mark.parametrize("bad, match", [
    (lambda x, y: (x[:, :2], y, 0), "shape"),
    (lambda x, y: (x.float(), y, 0), "uint8"),
    (lambda x, y: (x, y[:3], 0), "labels"),
    (lambda x, y: (x, -y - 1, 0), "non-negative"),
    (lambda x, y: (x, y, 70000), "task"),
    (lambda x, y: (x, y, torch.full((len(y),), -1)), "task .* got values from -1 to -1"),  # names the values
])
def test_bad_input_is_rejected_and_changes_nothing(tmp_path, bad, match):
    with CarouselMemory.from_dict(config(tmp_path, tiers=())) as mem:
        x, y, _ = stream(8, 0, [0, 1], 0)
        with pytest.raises(MemoryInputError, match=match):
            mem.add(*bad(x, y))
        assert mem.stats()["added"] == 0
        mem.add(x, y, 0)
        with pytest.raises(MemoryInputError):
            mem.observe(torch.tensor([999]))
        with pytest.raises(MemoryInputError):
            mem.observe(torch.tensor([0, 1]), logits=torch.randn(3, 2))
        assert mem.stats()["added"] == 8


def test_sample_filters_seed_and_balance(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path, em=200, tiers=())) as mem:
        x, y, _ = stream(150, 0, [0, 1, 2], seed=1)
        mem.add(x, y, 0)
        mem.add(*stream(50, 1, [7], seed=2))
        assert set(mem.sample(40, classes=[1, 2]).y.tolist()) <= {1, 2}
        assert set(mem.sample(40, tasks=[1]).y.tolist()) == {7}
        a, b = mem.sample(30, seed=5), mem.sample(30, seed=5)
        assert a.ids.tolist() == b.ids.tolist()
        assert len(mem.sample(1000)) == 200  # never more than the EM holds, never repeats
        counts = np.bincount(mem.sample(100, balanced=True, seed=0).y.numpy(), minlength=8)
        assert counts[[0, 1, 2, 7]].min() >= 15  # equal shares (25 each) up to noise
        assert "carousel_sample_latency_seconds_count" in \
            __import__("prometheus_client").generate_latest(mem.registry).decode()


def test_unfiltered_draws_are_distinct_and_uniform(tmp_path):
    with CarouselMemory.from_dict(config(tmp_path, em=50, tiers=())) as mem:
        mem.add(*stream(50, 0, [0, 1, 2, 3, 4], seed=3))
        counts = np.zeros(50)
        for _ in range(2000):
            b = mem.sample(16)
            assert len(b) == 16 and np.unique(b.ids.numpy()).size == 16
            counts[b.ids.numpy()] += 1
        expect = 2000 * 16 / 50
        assert np.abs(counts - expect).max() < 0.15 * expect  # every sample equally often
        check_slots_whole(mem.sample(50))


def test_a_pass_of_batches_replays_every_sample(tmp_path):
    # 50 samples in batches of 16: a shuffled pass deals 16, 16, 16 and then the pass's last 16
    # (overlapping the third by 14), so no sample sits a pass out until the next shuffle.
    with CarouselMemory.from_dict(config(tmp_path, em=50, tiers=())) as mem:
        mem.add(*stream(50, 0, [0, 1, 2, 3, 4], seed=3))
        for _ in range(20):
            seen = [mem.sample(16).ids.numpy() for _ in range(4)]
            assert all(np.unique(b).size == 16 for b in seen)
            assert np.unique(np.concatenate(seen)).size == 50
        assert len(mem.sample(64)) == 50  # a batch larger than the EM: all of it, once


def test_sample_latency_histogram_is_cumulative_and_counts_every_call(tmp_path):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    with CarouselMemory.from_dict(config(tmp_path, em=50, tiers=())) as mem:
        mem.add(*stream(50, 0, [0, 1], seed=3))
        for _ in range(37):
            mem.sample(8)
        mem.metrics.sample_latency.observe(0.3)  # lands in (0.25, 1.0]
        mem.metrics.sample_latency.observe(5.0)  # above every bound: +Inf only
        fam = {f.name: f for f in text_string_to_metric_families(generate_latest(mem.registry).decode())}
        samples = fam["carousel_sample_latency_seconds"].samples
        buckets = [(float(s.labels["le"]), s.value) for s in samples if s.name.endswith("_bucket")]
        value = {s.name: s.value for s in samples if not s.name.endswith("_bucket")}
        counts = [c for _, c in buckets]
        assert counts == sorted(counts) and buckets[-1] == (float("inf"), 39)
        assert value["carousel_sample_latency_seconds_count"] == 39
        assert dict(buckets)[1.0] - dict(buckets)[0.25] == 1 and dict(buckets)[1.0] == 38
        assert 5.3 < value["carousel_sample_latency_seconds_sum"] < 5.3 + 37 * 0.05


def test_disk_tier_is_class_grouped_and_read_a_chunk_at_a_time(tmp_path):
    cfg = config(tmp_path, em=40, tiers=(("lmdb", 64), ("zarr", 5000)))
    cfg["tiers"][1]["chunk"] = 16
    with CarouselMemory.from_dict(cfg) as mem:
        for task in range(3):
            for step in range(10):
                mem.add(*stream(64, task, [2 * task, 2 * task + 1], seed=100 * task + step))
        mem.flush()
        disk = mem.tiers[1]
        # demotion wrote each batch by class: chunks hold (nearly) one class each
        purity = [np.bincount(c.fields["y"]).max() / c.ids.size for c in disk.store.iter_chunks()]
        assert np.mean(purity) > 0.85, np.mean(purity)
        # drain the prefetch queues and the flash tier's share, then count chunk reads per candidate
        mem._engine.close()
        counting = FaultyStore(disk.store)
        disk.store = counting
        ids, fields = mem._engine._read_candidates(0, 12)  # one block: ids and a row of each field per id
        assert ids.size == 12 and (mem.catalog.label[ids] == 0).all()
        assert counting.reads <= 3, f"{counting.reads} chunk reads for 12 candidates"
        assert (fields["x"].reshape(12, -1)[:, 0] == 0).all() and mem.catalog.prefetched[ids].all()


def test_adaptive_mode_lowers_the_ratio_when_storage_lags(tmp_path):
    cfg = config(tmp_path, em=200, tiers=(("lmdb", 2000),), ratio=1.0, adaptive=True, max_lag_steps=2)
    cfg["swap"]["prefetch_depth"] = 0  # every swap-in reads on demand: the engine feels the latency
    with CarouselMemory.from_dict(cfg) as mem:
        run_tasks(mem, tasks=2, steps=6)
        mem.flush()
        mem._engine.wait_idle()
        mem.tiers[0].store = FaultyStore(mem.tiers[0].store, read_delay_s=0.05)
        for _ in range(40):
            b = mem.sample(64)
            mem.observe(b.ids, logits=torch.randn(len(b), 4))
        s = mem.stats()
        assert s["swap_ratio"] < 1.0 / 4, s["swap_ratio"]  # halved several times while it lagged
        assert mem.registry.get_sample_value("carousel_swap_effective_ratio") == s["swap_ratio"]
        mem.tiers[0].store = mem.tiers[0].store.inner  # storage is fast again: the ratio recovers
        mem._engine.wait_idle(30)
        for _ in range(60):
            b = mem.sample(64)
            mem.observe(b.ids, logits=torch.randn(len(b), 4))
            mem._engine.wait_idle()
        assert mem.stats()["swap_ratio"] == 1.0


def test_metrics_are_exposed_with_prometheus_names(tmp_path):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    with CarouselMemory.from_dict(config(tmp_path, tiers=(("lmdb", 100), ("zarr", 200)))) as mem:
        run_tasks(mem, tasks=2, steps=8)
        mem.flush()
        mem._engine.wait_idle()
        s = mem.stats()
        text = generate_latest(mem.registry).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name in ("carousel_samples", "carousel_bytes", "carousel_added", "carousel_admissions",
                     "carousel_evictions", "carousel_migrated_samples", "carousel_swaps", "carousel_swap_lag_requests",
                     "carousel_prefetch_depth", "carousel_prefetch_requests", "carousel_sample_latency_seconds",
                     "carousel_write_behind_queue_samples", "carousel_errors"):
            assert name in families, name
        value = mem.registry.get_sample_value
        assert value("carousel_added_total") == s["added"]
        assert value("carousel_swaps_total", {"direction": "in"}) == s["swapped_in"] > 0
        assert value("carousel_samples", {"tier": "0-lmdb"}) == 100
        assert value("carousel_evictions_total", {"reason": "capacity"}) == s["evicted"]
        assert value("carousel_migrated_samples_total", {"tier": "0-lmdb"}) >= 200
        assert value("carousel_sample_latency_seconds_count") == 2 * 8
        # Per-tier storage time (what `carousel tune --check` reads to name a lagging tier): every
        # added sample was written to tier 0, the demoted ones to tier 1, and reads took time.
        assert value("carousel_storage_written_samples_total", {"tier": "0-lmdb"}) == s["added"]
        assert value("carousel_storage_written_samples_total", {"tier": "1-zarr"}) == \
            value("carousel_migrated_samples_total", {"tier": "0-lmdb"})
        assert value("carousel_storage_write_seconds_total", {"tier": "0-lmdb"}) > 0
        read = sum(value("carousel_storage_read_samples_total", {"tier": t}) or 0 for t in ("0-lmdb", "1-zarr"))
        read_s = sum(value("carousel_storage_read_seconds_total", {"tier": t}) or 0 for t in ("0-lmdb", "1-zarr"))
        assert read > 0 and read_s > 0
        registry = mem.registry
    # after close a scrape still works: tier gauges read NaN instead of touching closed stores
    assert np.isnan(registry.get_sample_value("carousel_samples", {"tier": "1-zarr"}))


def test_a_second_memory_on_the_same_tiers_is_refused_cleanly(tmp_path):
    from storage_backends import StoreLockedError

    cfg = config(tmp_path, tiers=(("lmdb", 100), ("zarr", 100)))
    with CarouselMemory.from_dict(cfg) as first:
        threads = threading.active_count()
        with pytest.raises(StoreLockedError):
            CarouselMemory.from_dict(cfg)
        assert threading.active_count() == threads  # no thread left behind by the failed open
        first.add(*stream(8, 0, [0, 1], seed=1))
        first.flush()
    with CarouselMemory.from_dict(cfg) as again:  # the refused open held nothing
        assert again.stats()["added"] == 8


def test_per_class_storage_quota(tmp_path):
    cfg = config(tmp_path, em=16, tiers=(("lmdb", 1000),))
    cfg["tiers"][0]["class_quota"] = 20
    with CarouselMemory.from_dict(cfg) as mem:
        for step in range(6):
            mem.add(*stream(32, 0, [0, 1, 2], seed=step))
        mem.flush()
        stored = mem.tiers[0].store.ids()
        counts = np.bincount(mem.catalog.label[stored], minlength=3)
        pinned = np.bincount(mem.catalog.label[stored[mem.catalog.slot[stored] >= 0]], minlength=3)
        # every class capped (samples an EM slot holds are never evicted from the last tier), none starved
        assert ((counts - pinned) <= 20).all() and (counts >= 20).all(), (counts, pinned)
        assert mem.stats()["evicted"] == 6 * 32 - counts.sum()
        conservation(mem)


@pytest.mark.parametrize("section, key, value", [("memory", "admission", "fifo"), ("swap", "policy", "lru"),
                                                 ("swap", "swap_in", "nearest")])
def test_unknown_policy_names_are_config_errors(tmp_path, section, key, value):
    from carousel import ConfigError

    cfg = config(tmp_path, tiers=())
    cfg.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError) as err:
        CarouselMemory.from_dict(cfg)
    assert err.value.key == f"{section}.{key}" and value in str(err.value)


def test_reopen_after_a_checkpoint_reads_only_newer_samples(tmp_path):
    cfg = config(tmp_path, tiers=(("lmdb", 300), ("zarr", 1000)))
    with CarouselMemory.from_dict(cfg) as mem:
        run_tasks(mem, tasks=2, steps=5)  # close() checkpoints
        added = mem.stats()["added"]
    again = CarouselMemory.from_dict(cfg)
    assert again.recovered == {"samples": added, "labels_read": 0}
    again.add(*stream(10, 2, [4, 5], seed=77))
    again.flush()
    # a crash: the tiers hold the 10 new samples, the checkpoint does not know them
    again._engine.close()
    again._writer.close()
    for t in again.tiers:
        t.store.close()
    with CarouselMemory.from_dict(cfg) as third:
        assert third.recovered == {"samples": added + 10, "labels_read": 10}
        assert (third.catalog.label[added:added + 10] >= 4).all()
        assert (third.catalog.label[:added] == again.catalog.label[:added]).all()
        check_slots_whole(third.sample(64))
