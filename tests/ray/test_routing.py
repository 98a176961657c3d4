"""The pure parts of carousel.ray: routing, ids, draw allocation, layout and config (no Ray needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from carousel import ConfigError
from carousel.ray.allocation import Composition, allocate
from carousel.ray.config import ShardingConfig
from carousel.ray.layout import ShardLayoutError, claim_folder, shard_config
from carousel.ray.routing import content_keys, global_ids, local_ids, mix64, route, shard_of

ROOT = Path(__file__).resolve().parents[2]


def _splitmix64_reference(key: int) -> int:
    """SplitMix64's output function in plain Python integers (Steele, Lea, Flood 2014)."""
    mask = (1 << 64) - 1
    z = (key + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_key_routing_is_splitmix64_mod_n_and_independent_of_the_process_hash_seed():
    keys = np.arange(-5, 20)
    here = route("key", 3, keys=keys).tolist()
    # Against a plain-Python reference: a change of the hash would move stored keys to other shards.
    assert here == [_splitmix64_reference(int(k) & ((1 << 64) - 1)) % 3 for k in keys]
    big = np.array([2**62, -(2**63), 2**63 - 1, 123456789012345])
    assert route("key", 7, keys=big).tolist() == [_splitmix64_reference(int(k) & ((1 << 64) - 1)) % 7 for k in big]
    code = ("import numpy as np; from carousel.ray.routing import route, content_keys; "
            "print(route('key', 3, keys=np.arange(-5, 20)).tolist()); "
            "print(content_keys(np.arange(48, dtype=np.uint8).reshape(4, 12)).tolist())")
    for seed in ("0", "12345"):  # Python's hash() of the same value differs between these processes
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.splitlines()
        assert json.loads(out[0]) == here
        assert json.loads(out[1]) == content_keys(np.arange(48, dtype=np.uint8).reshape(4, 12)).tolist()


def test_key_routing_spreads_evenly_and_class_routing_is_label_mod_n():
    shards = route("key", 4, keys=np.arange(40_000))
    counts = np.bincount(shards, minlength=4)
    assert counts.min() > 9_500 and counts.max() < 10_500
    assert route("class", 4, labels=np.arange(10)).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_content_keys_follow_the_bytes_not_the_object():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (500, 3, 5, 5), dtype=np.uint8)  # 75 bytes a row: not a multiple of 8
    k = content_keys(x)
    assert (k == content_keys(x.copy())).all()
    assert np.unique(k).size == 500
    y = x.copy()
    y[7, 2, 4, 4] ^= 1  # one bit of one sample
    assert (content_keys(y) != k).sum() == 1
    # without keys, "key" routing hashes the samples themselves: same sample, same shard
    assert (route("key", 2, x=x) == route("key", 2, x=x[::-1].copy())[::-1]).all()


def test_global_ids_round_trip_and_name_their_shard():
    local = np.array([0, 1, 7, 2**40])
    for n in (1, 2, 5):
        for k in range(n):
            ids = global_ids(local, k, n)
            assert (shard_of(ids, n) == k).all() and (local_ids(ids, n) == local).all()
    assert global_ids(np.array([3]), 1, 2).tolist() == [7]


def test_mix64_is_splitmix64():
    # SplitMix64 seeded with 0: its first output is mix64(0) (the published reference value)
    assert int(mix64(np.array([0], np.uint64))[0]) == 0xE220A8397B1DCDAF


def test_route_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_shards"):
        route("key", 0, keys=np.arange(3))
    with pytest.raises(ValueError, match="unknown routing"):
        route("round_robin", 2, keys=np.arange(3))
    with pytest.raises(ValueError, match="labels"):
        route("class", 2)


def comp(labels, tasks=None):
    labels = np.asarray(labels)
    return Composition.of(labels, np.zeros_like(labels) if tasks is None else np.asarray(tasks))


def test_allocation_is_uniform_over_the_union_of_the_shards():
    comps = [comp([0] * 300), comp([1] * 100)]
    plans = np.array([allocate(40, comps, rng=np.random.default_rng(s)) for s in range(2000)])
    assert (plans.sum(axis=1) == 40).all()
    assert abs(plans[:, 0].mean() - 30) < 0.3  # 3/4 of the union lives on shard 0


def test_allocation_caps_skips_unavailable_and_filters():
    comps = [comp([0, 0, 1]), comp([2, 2]), None]
    rng = np.random.default_rng(0)
    assert allocate(100, comps, rng=rng).tolist() == [3, 2, 0]  # never more than a shard holds
    assert allocate(4, comps, available=np.array([False, True, True]), rng=rng).tolist() == [0, 2, 0]
    assert allocate(5, comps, classes=[1, 2], rng=rng).tolist() == [1, 2, 0]
    with_tasks = [comp([0, 0, 1], [0, 1, 1]), comp([2, 2], [1, 1])]
    assert allocate(9, with_tasks, tasks=[0], rng=rng).tolist() == [1, 0]
    assert allocate(0, comps, rng=rng).tolist() == [0, 0, 0]


def test_balanced_allocation_gives_classes_equal_shares():
    comps = [comp([0] * 300), comp([1] * 30)]  # class routing: one class per shard
    plans = np.array([allocate(20, comps, balanced=True, rng=np.random.default_rng(s)) for s in range(1000)])
    assert (plans.sum(axis=1) == 20).all()
    assert abs(plans[:, 1].mean() - 10) < 0.3
    small = [comp([0] * 300), comp([1] * 3)]  # shard 1 cannot give half: shard 0 makes up the rest
    assert allocate(20, small, balanced=True, rng=np.random.default_rng(0)).tolist() == [17, 3]


def test_local_share_takes_from_local_shards_first():
    comps = [comp([0] * 100), comp([0] * 100), comp([0] * 100)]
    local = np.array([True, False, False])
    plan = allocate(30, comps, local=local, local_share=0.5, rng=np.random.default_rng(0))
    assert plan[0] == 15 and plan.sum() == 30
    tiny = [comp([0] * 4), comp([0] * 100)]  # the local shard holds only 4
    assert allocate(30, tiny, local=np.array([True, False]), local_share=1.0, rng=np.random.default_rng(0)).tolist() \
        == [4, 26]
    few_remote = [comp([0] * 100), comp([0] * 2)]
    assert allocate(30, few_remote, local=np.array([True, False]), local_share=0.0,
                    rng=np.random.default_rng(0)).tolist() == [28, 2]


def test_sharding_config_rejects_bad_values():
    for kwargs, key in [({"n_shards": 0}, "n_shards"), ({"routing": "round_robin"}, "routing"),
                        ({"ack": "never"}, "ack"), ({"placement": "anywhere"}, "placement"),
                        ({"timeout_s": 0}, "timeout_s"), ({"local_share": 1.5}, "local_share"),
                        ({"nodes": "10.0.0.1"}, "nodes"), ({"name": "a b"}, "name"),
                        ({"metrics_port": 65535, "n_shards": 2}, "metrics_port"), ({"n_shards": True}, "n_shards")]:
        with pytest.raises(ConfigError) as err:
            ShardingConfig(**kwargs)
        assert err.value.key == f"sharding.{key}", kwargs


def test_shard_config_places_tiers_per_shard(tmp_path):
    memory = {"memory": {"em_size": 4, "sample_shape": [2]},
              "tiers": [{"kind": "lmdb", "capacity": 10, "path": "flash"},
                        {"kind": "zarr", "capacity": 20, "path": str(tmp_path / "disk-{shard}")}]}
    c0, c1 = (shard_config(memory, tmp_path, k, 2) for k in range(2))
    assert c0.tiers[0].path == str(tmp_path / "shard-0" / "flash")
    assert c1.tiers[1].path == str(tmp_path / "disk-1")
    assert c1.memory.state_dir == str(tmp_path / "shard-1" / "state")
    shared = {**memory, "tiers": [{"kind": "lmdb", "capacity": 10, "path": str(tmp_path / "one")}]}
    with pytest.raises(ConfigError, match="every shard would share it"):
        shard_config(shared, tmp_path, 0, 2)
    with pytest.raises(ConfigError, match="at least one storage tier"):
        shard_config({"memory": {"em_size": 4, "sample_shape": [2]}}, tmp_path, 0, 2)
    toml = tmp_path / "memory.toml"
    toml.write_text('[memory]\nem_size = 4\nsample_shape = [2]\n[[tiers]]\nkind = "lmdb"\ncapacity = 9\n')
    assert shard_config(toml, tmp_path / "r", 1, 2).tiers[0].path == str(tmp_path / "r" / "shard-1" / "tier0-lmdb")


def test_a_shard_folder_refuses_another_layout(tmp_path):
    folder = tmp_path / "shard-0"
    assert claim_folder(folder, 0, 2, "key") is False
    assert claim_folder(folder, 0, 2, "key") is True
    with pytest.raises(ShardLayoutError, match="holds shard 0 of 2"):
        claim_folder(folder, 0, 3, "key")
    with pytest.raises(ShardLayoutError, match="routed by 'key'"):
        claim_folder(folder, 0, 2, "class")
