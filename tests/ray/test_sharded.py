"""ShardedMemory on a real local Ray cluster, with real LMDB tiers: routing, durability across a
SIGKILLed shard, sampling while it restarts, metrics over HTTP, placement and bad input."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'carousel[ray]')")

from carousel import ConfigError, MemoryInputError  # noqa: E402
from carousel.ray import (ShardedMemory, ShardingConfig, ShardPlacementError, ShardStartError,  # noqa: E402
                          ShardUnavailableError, route)

SHAPE = (3, 32, 32)  # a one-shard draw of 64 (196 KiB) goes through Ray's shared-memory object store
MEMORY = {"memory": {"em_size": 64, "sample_shape": list(SHAPE), "seed": 1,
                     "extras": {"logits": {"shape": [4], "dtype": "float32"}}},
          "swap": {"start_task": 0},
          "write_behind": {"queue_samples": 1024, "batch": 128},
          "tiers": [{"kind": "lmdb", "capacity": 100_000}]}


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g),
            torch.randn(n, 4, generator=g))


def actor(name: str, shard: int):
    return ray.get_actor(ShardingConfig(name=name).actor_name(shard), namespace="carousel")


@pytest.fixture(scope="module")
def mem2(ray_cluster, tmp_path_factory):
    """Two shards placed through a SPREAD placement group (both land on this one node)."""
    mem = ShardedMemory.create(MEMORY, tmp_path_factory.mktemp("two"),
                               ShardingConfig(n_shards=2, name="two", placement="spread", num_cpus=0.5))
    try:
        yield mem
    finally:
        mem.shutdown()


def test_samples_added_through_two_shards_are_all_retrievable(mem2):
    before = [s["added"] for s in mem2.stats()["shards"]]
    x, y, logits = data(400, seed=0)
    keys = torch.arange(10_000, 10_400)
    ids = torch.cat([mem2.add(x[i:i + 100], y[i:i + 100], task=i // 200, keys=keys[i:i + 100], logits=logits[i:i + 100])
                     for i in range(0, 400, 100)])
    assert ids.unique().numel() == 400
    owner = (ids % 2).numpy()
    np.testing.assert_array_equal(owner, route("key", 2, keys=keys.numpy()))  # the shard its key names
    assert 150 < (owner == 0).sum() < 250
    got = mem2.read(ids)  # from the tiers, exact bytes
    assert torch.equal(got["id"], ids) and torch.equal(got["x"], x) and torch.equal(got["y"], y)
    assert torch.equal(got["task"], torch.arange(400, dtype=torch.int16) // 200)
    assert torch.equal(got["logits"], logits)
    # Draws come from both shards' EMs, and every drawn row is the sample its id names.
    rows = {int(i): r for r, i in enumerate(ids)}
    seen = set()
    for _ in range(6):
        b = mem2.sample(48)
        assert len(b) == 48 and b.unavailable == () and b.per_shard[0] > 0 and b.per_shard[1] > 0
        assert sum(b.per_shard) == 48 and b.ids.unique().numel() == 48
        mine = [r for r in (rows.get(int(i)) for i in b.ids) if r is not None]
        sel = torch.tensor([int(i) in rows for i in b.ids])
        assert torch.equal(b.x[sel], x[mine]) and torch.equal(b.extras["logits"][sel], logits[mine])
        seen.update(int(i) for i in b.ids)
    assert {i % 2 for i in seen} == {0, 1}
    everything = mem2.sample(10_000, seed=3)  # the whole union of the two EMs (2 x 64 slots)
    assert len(everything) == 128 and everything.ids.unique().numel() == 128
    assert torch.equal(mem2.sample(32, seed=5).ids, mem2.sample(32, seed=5).ids)
    b = mem2.sample(32, classes=[1, 2])
    assert len(b) == min(32, int(torch.isin(everything.y, torch.tensor([1, 2])).sum()))
    assert set(b.y.tolist()) <= {1, 2} and b.ids.unique().numel() == len(b)
    # observe reaches the shard that owns each id (a shard refuses ids it does not own)
    mem2.observe(b.ids, logits=torch.randn(len(b), 10))
    with pytest.raises(MemoryInputError, match="unknown ids"):
        mem2.observe(torch.tensor([int(ids.max()) + 2 * 10_000]), logits=torch.randn(1, 10))
    st = mem2.stats()
    assert [s["added"] - b for s, b in zip(st["shards"], before)] == [int((owner == 0).sum()), int((owner == 1).sum())]
    assert st["unavailable"] == [] and st["em_samples"] == 128 and st["stored"] >= 400


def _mapping(address: int) -> str:
    """The /proc/self/maps line of the mapping holding ``address``."""
    for line in open("/proc/self/maps"):
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if lo <= address < hi:
            return line
    return ""


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc to see where a tensor lives")
def test_a_one_shard_batch_is_a_zero_copy_view_of_the_object_store(mem2):
    x, y, logits = data(128, seed=1)
    mem2.add(x, y, task=0, logits=logits)
    solo = ShardedMemory.connect("two", local_shards=[0], local_share=1.0)  # every row from shard 0
    try:
        one = solo.sample(64)
        assert one.per_shard == (64, 0) and (one.ids % 2 == 0).all()
        # The tensor's bytes are the shard's reply in Ray's plasma store (/dev/shm), mapped, not copied.
        assert "plasma" in _mapping(one.x.data_ptr()), _mapping(one.x.data_ptr())
        assert torch.equal(one.x, solo.read(one.ids)["x"])
        copied = solo.sample(64, copy=True)
        assert "plasma" not in _mapping(copied.x.data_ptr())
        copied.x.add_(1)  # a private, writable copy
    finally:
        solo.close()
    both = mem2.sample(48)  # parts of two shards: concatenated once, into fresh tensors
    assert min(both.per_shard) > 0 and "plasma" not in _mapping(both.x.data_ptr())


def test_metrics_of_every_shard_over_http(mem2, tmp_path):
    endpoints = mem2.metrics_endpoints()
    assert sorted(endpoints) == [0, 1] and all(endpoints.values())
    st = mem2.stats()
    for k, address in endpoints.items():
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
        line = next(line for line in text.splitlines() if line.startswith("carousel_added_total{"))
        assert f'shard="{k}"' in line and 'memory="two"' in line
        assert float(line.rsplit(" ", 1)[1]) == st["shards"][k]["added"]
        assert f'carousel_shard_info{{memory="two",n_shards="2",routing="key",shard="{k}"}} 1.0' in text
    path = mem2.write_file_sd(tmp_path / "shards.json")
    groups = json.loads(open(path).read())
    assert [g["targets"] for g in groups] == [[endpoints[0]], [endpoints[1]]]
    assert [g["labels"]["carousel_shard"] for g in groups] == ["0", "1"]


def test_prometheus_scrapes_every_shard_through_file_sd(mem2, tmp_path):
    from tests.prometheus_harness import PROMETHEUS, run_prometheus
    if PROMETHEUS is None:
        pytest.skip("prometheus binary not on PATH (apt-get install prometheus); the HTTP scrape test still ran")
    groups = json.loads(open(mem2.write_file_sd(tmp_path / "shards.json")).read())
    scrape = ('global:\n  scrape_interval: "1s"\n  scrape_timeout: "1s"\nscrape_configs:\n'
              '  - job_name: "carousel-shards"\n    file_sd_configs:\n      - files: ["shards.json"]\n')
    with run_prometheus([], tmp_path, config=scrape, files={"shards.json": json.dumps(groups)}) as prom:
        for k in (0, 1):
            [sample] = prom.wait_for(f'carousel_added_total{{job="carousel-shards",shard="{k}",memory="two"}}',
                                     timeout=40)
            assert sample["metric"]["carousel_shard"] == str(k)


def test_bad_input_is_refused_and_does_not_kill_a_shard(mem2):
    x, y, logits = data(4, seed=2)
    with pytest.raises(MemoryInputError, match="x must have shape"):
        mem2.add(x[:, :2], y, task=0, logits=logits)
    with pytest.raises(MemoryInputError, match="x must be uint8"):
        mem2.add(x.float(), y, task=0, logits=logits)
    with pytest.raises(MemoryInputError, match="labels must be non-negative"):
        mem2.add(x, -y - 1, task=0, logits=logits)
    with pytest.raises(MemoryInputError, match="keys must be 4 integers"):
        mem2.add(x, y, task=0, keys=torch.arange(3), logits=logits)
    with pytest.raises(MemoryInputError, match="missing \\['logits'\\]"):
        mem2.add(x, y, task=0)
    with pytest.raises(MemoryInputError, match="task must be"):
        mem2.add(x, y, task=-1, logits=logits)
    with pytest.raises(MemoryInputError, match="n must be"):
        mem2.sample(-1)
    with pytest.raises(MemoryInputError, match="ids must be a 1-D"):
        mem2.observe(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(MemoryInputError, match="logits must be"):
        mem2.observe(torch.tensor([0, 1]), logits=torch.randn(3, 10))
    # Straight to a shard actor, past the client's checks: the shard's memory refuses, the actor lives on.
    shard = actor("two", 0)
    pid = ray.get(shard.pid.remote())
    with pytest.raises(MemoryInputError, match="x must have shape"):
        ray.get(shard.add.remote({"x": np.zeros((2, 5), np.uint8), "y": np.zeros(2, np.int64),
                                  "task": np.zeros(2, np.int16), "logits": np.zeros((2, 4), np.float32)}, True, 5.0))
    with pytest.raises(MemoryInputError, match="does not own"):
        ray.get(shard.observe.remote(np.array([1, 3]), None, None))
    with pytest.raises(ValueError):
        ray.get(shard.sample.remote("many", None, None, None, False))
    with pytest.raises(MemoryInputError, match="sizes must be"):
        ray.get(shard.sample.remote([-1], None, None, None, False))
    mem2.add(x, y, task=0, logits=logits)  # the shards still take good requests
    assert ray.get(shard.pid.remote()) == pid and len(mem2.sample(4, seed=1)) == 4


def test_a_bad_layout_or_configuration_is_refused(mem2, ray_cluster, tmp_path):
    with pytest.raises(ConfigError, match="n_shards"):
        ShardingConfig(n_shards=0)
    with pytest.raises(ConfigError, match="routing"):
        ShardingConfig(routing="round_robin")
    with pytest.raises(ConfigError, match="every shard would share it"):
        ShardedMemory.create({**MEMORY, "tiers": [{"kind": "lmdb", "capacity": 10, "path": str(tmp_path / "x")}]},
                             tmp_path, ShardingConfig(n_shards=2, name="shared"))
    with pytest.raises(ConfigError, match="routing key"):
        ShardedMemory.create({**MEMORY, "memory": {**MEMORY["memory"], "extras": {"keys": {"shape": [],
                                                                                        "dtype": "int64"}}}},
                             tmp_path, ShardingConfig(name="keyed"))
    # The same actor names for another root: refused (connect() attaches to running shards instead).
    with pytest.raises(ConfigError, match="already serve"):
        ShardedMemory.create(MEMORY, tmp_path / "elsewhere", ShardingConfig(n_shards=2, name="two",
                                                                            placement="spread", num_cpus=0.5))
    # A root laid out for 2 shards opened as 3: routing would send known keys elsewhere.
    with pytest.raises(ValueError, match="no sharded memory 'nobody'"):
        ShardedMemory.connect("nobody")
    with pytest.raises(ConfigError, match="client settings"):
        ShardedMemory.connect("two", n_shards=3)
    layout = r"ShardLayoutError: .* holds shard \d of 2 routed by .key.; this memory asks for shard \d of 3"
    with pytest.raises(ShardStartError, match=layout):
        ShardedMemory.create(MEMORY, mem2.root, ShardingConfig(n_shards=3, name="three", num_cpus=0))


def test_placement_errors_come_before_any_shard_starts(ray_cluster, tmp_path):
    with pytest.raises(ShardPlacementError, match="no alive node is '10.255.255.1'"):
        ShardedMemory.create(MEMORY, tmp_path, ShardingConfig(n_shards=2, name="nowhere", nodes=("10.255.255.1",)))
    with pytest.raises(ShardPlacementError, match="strict_spread needs one node per shard"):
        ShardedMemory.create(MEMORY, tmp_path, ShardingConfig(n_shards=2, name="strict", placement="strict_spread",
                                                              placement_timeout_s=1.0))
    assert not list(tmp_path.iterdir())  # nothing was opened


def test_killed_shard_loses_no_acknowledged_sample_and_sampling_goes_on(ray_cluster, tmp_path):
    node_ip = ray.util.get_node_ip_address()
    sharding = ShardingConfig(n_shards=2, name="kill", nodes=(node_ip,), num_cpus=0.5, timeout_s=0.5,
                              probe_interval_s=0.1)
    mem = ShardedMemory.create(MEMORY, tmp_path, sharding)
    try:
        assert {i["node_ip"] for i in mem.identities()} == {node_ip}  # node affinity, by address
        x, y, logits = data(600, seed=3)
        keys = torch.arange(600) * 7
        ids = torch.cat([mem.add(x[i:i + 100], y[i:i + 100], task=0, keys=keys[i:i + 100], logits=logits[i:i + 100])
                         for i in range(0, 600, 100)])  # ack = "durable": acknowledged on return
        on0 = int((ids % 2 == 0).sum())
        assert 0 < on0 < 600
        known = {int(i): r for i, r in zip(ids, x)}  # id -> its sample's bytes
        old = [i["pid"] for i in mem.identities()]
        os.kill(old[0], signal.SIGKILL)

        degraded = 0
        refused: ShardUnavailableError | None = None
        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline, "shard 0 did not come back within 90 s"
            b = mem.sample(64)  # never raises because a shard is down
            assert len(b) > 0
            assert torch.equal(b.x, torch.stack([known[int(i)] for i in b.ids]))
            if b.unavailable:
                assert b.unavailable == (0,) and (b.ids % 2 == 1).all() and b.per_shard[0] == 0
                degraded += 1
                if refused is None:  # an add while shard 0 is down: shard 1's rows are acknowledged
                    x2, y2, l2 = data(50, seed=4)
                    k2 = torch.arange(50) * 7 + 1
                    try:
                        mem.add(x2, y2, task=0, keys=k2, logits=l2)
                    except ShardUnavailableError as exc:
                        refused = exc
                        want = route("key", 2, keys=k2.numpy())
                        assert exc.shards == (0,)
                        assert ((exc.ids >= 0).numpy() == (want == 1)).all()
                        got = mem.read(exc.ids[exc.ids >= 0])
                        assert torch.equal(got["x"], x2[exc.ids >= 0])
                        known.update({int(i): r for i, r in zip(exc.ids, x2) if i >= 0})
            elif degraded and b.per_shard[0] > 0:
                break  # shard 0 serves again
        assert degraded > 0 and refused is not None

        mem.wait_ready(60)
        now = mem.identities()
        assert now[0]["pid"] != old[0] and now[0]["restarted"] and not now[1]["restarted"]
        assert now[1]["pid"] == old[1]
        assert now[0]["recovered"]["samples"] == on0
        got = mem.read(ids)  # every acknowledged sample, byte for byte, from the restarted shard too
        assert torch.equal(got["x"], x) and torch.equal(got["y"], y) and torch.equal(got["logits"], logits)
        assert mem.stats()["restarts_seen"][0] >= 1

        # Routing is stable across the restart and in a fresh client: the same keys, the same shards.
        again = mem.add(x[:100], y[:100], task=1, keys=keys[:100], logits=logits[:100])
        assert torch.equal(again % 2, ids[:100] % 2)
        fresh = ShardedMemory.connect("kill", timeout_s=0.5)
        try:
            assert fresh.n_shards == 2 and fresh.sharding.routing == "key"
            third = fresh.add(x[:100], y[:100], task=1, keys=keys[:100], logits=logits[:100])
            assert torch.equal(third % 2, ids[:100] % 2)
            assert torch.equal(fresh.read(ids[:100])["x"], x[:100])
        finally:
            fresh.close()
        assert len(set(ids.tolist()) | set(again.tolist()) | set(third.tolist())) == 800  # ids never reused
    finally:
        mem.shutdown()



def test_class_routing_with_queued_acks_is_acknowledged_by_flush(ray_cluster, tmp_path):
    sharding = ShardingConfig(n_shards=2, name="classes", routing="class", ack="queued", num_cpus=0.5,
                              timeout_s=0.5, probe_interval_s=0.1)
    mem = ShardedMemory.create(MEMORY, tmp_path, sharding)
    try:
        x, y, logits = data(300, seed=5)
        with pytest.raises(MemoryInputError, match='routing = "key"'):
            mem.add(x, y, task=0, keys=torch.arange(300), logits=logits)
        ids = mem.add(x, y, task=0, logits=logits)  # queued on the shards, not yet acknowledged
        assert torch.equal(ids % 2, y % 2)  # every sample of a class on one shard
        b = mem.sample(40, classes=[3], seed=0)
        assert len(b) and (b.y == 3).all() and b.per_shard[0] == 0  # class 3 lives on shard 1 only
        mem.flush()  # now every one is acknowledged
        pid = mem.identities()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        mem.wait_ready(60)
        assert mem.identities()[1]["pid"] != pid
        got = mem.read(ids)
        assert torch.equal(got["x"], x) and torch.equal(got["y"], y) and torch.equal(got["logits"], logits)
    finally:
        mem.shutdown()
