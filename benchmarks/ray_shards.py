"""Benchmark: a sharded memory on Ray (1 and 2 shards) against the single daemon and in-process.

``python -m benchmarks.ray_shards [--quick] [--seconds S] [--rounds R] [--out DIR]``

Every memory is the one of ``benchmarks.daemon`` (EM of 500 CIFAR-sized uint8 samples per memory
or shard, an LMDB tier behind it, ``sync = false``), filled with 2,000 samples. A local Ray cluster
is started in this process (``ray.init``, 4 logical CPUs); the daemon runs as a ``carousel serve``
subprocess. Variants run interleaved in rounds.

- ``sample(256)`` back to back: in-process; the daemon's shared-memory ring and its socket (a
  seeded draw: one round trip); the sharded memory with 1 and 2 shards, pipelined (``prefetch = 4``,
  the default) and one round trip per call (``prefetch = 0``). Then paced: 1 ms of trainer work
  between calls, only the calls timed.
- ``add`` of 256 samples per call, acknowledged: in-process ``add`` + ``flush``, the daemon's
  ``add`` + ``flush``, the sharded memory with ``ack = "durable"`` (each call returns flushed) and
  ``ack = "queued"`` (a ``flush()`` after every 8 calls, counted in the time).

Reported: batches/s and samples/s, p50/p99 per call, and the ratio to the daemon (ring and socket
for ``sample``; ``add`` + ``flush`` for ``add``, by the median block of 8 calls). It writes
``results.json`` and ``results.md`` to ``--out`` (default ``bench-out/ray_shards``) and asserts
nothing about speed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from carousel import CarouselMemory

from . import report
from .daemon import EM, N, SHAPE, _fill, _memory_toml, _paced_summary, _summary, _time
from .served import ServedDaemon

ADD_BATCH = 256
ADD_CALLS = 8  # per timed add block (ack = "queued" flushes once per block)


def _memory_dict() -> dict:
    return {"memory": {"em_size": EM, "sample_shape": list(SHAPE), "seed": 0},
            "tiers": [{"kind": "lmdb", "path": "flash", "capacity": 1_000_000, "sync": False}]}


def _add_block(add, flush, g: torch.Generator, keys: list[int]) -> float:
    """Seconds for ADD_CALLS acknowledged adds of ADD_BATCH samples (``flush``: after the block)."""
    xs = [torch.randint(0, 256, (ADD_BATCH, *SHAPE), dtype=torch.uint8, generator=g) for _ in range(ADD_CALLS)]
    ys = [torch.randint(0, 10, (ADD_BATCH,), generator=g) for _ in range(ADD_CALLS)]
    t0 = time.perf_counter()
    for x, y in zip(xs, ys):
        add(x, y, keys)
    if flush is not None:
        flush()
    return time.perf_counter() - t0


def run(seconds: float, rounds: int, workdir: Path) -> dict:
    import ray

    from carousel.ray import ShardedMemory, ShardingConfig

    logging.getLogger("carousel.ray").setLevel(logging.ERROR)
    inproc = CarouselMemory.from_dict({**_memory_dict(), "tiers": [{**_memory_dict()["tiers"][0],
                                                                      "path": str(workdir / "inproc")}]})
    _fill(inproc)
    daemon = None
    sharded: dict[str, ShardedMemory] = {}
    try:
        daemon = ServedDaemon(workdir, _memory_toml(workdir / "daemon-tier"))
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 2**20)
        client = daemon.client
        _fill(client)
        client.sample(N)  # subscribe: the ring exists before timing starts
        for n_shards in (1, 2):
            for ack in ("durable", "queued"):
                name = f"bench-{n_shards}-{ack}"
                mem = sharded[name] = ShardedMemory.create(
                    _memory_dict(), workdir / name, ShardingConfig(n_shards=n_shards, name=name, ack=ack,
                                                                   num_cpus=0.5, metrics_port=None))
                _fill(mem)
                mem.flush()
        one, two = sharded["bench-1-durable"], sharded["bench-2-durable"]
        one0 = ShardedMemory.connect("bench-1-durable", prefetch=0)
        two0 = ShardedMemory.connect("bench-2-durable", prefetch=0)
        for m in (one, two, one0, two0):
            m.sample(N)
        seeds = iter(range(1 << 62))
        samplers = {
            "in-process `CarouselMemory`": lambda: inproc.sample(N),
            "daemon, shared-memory ring": lambda: client.sample(N),
            "daemon, socket (seeded draw)": lambda: client.sample(N, seed=next(seeds)),
            "Ray, 1 shard, pipelined (prefetch 4)": lambda: one.sample(N),
            "Ray, 2 shards, pipelined (prefetch 4)": lambda: two.sample(N),
            "Ray, 1 shard, one round trip per call": lambda: one0.sample(N),
            "Ray, 2 shards, one round trip per call": lambda: two0.sample(N),
        }
        paced_names = ["daemon, shared-memory ring", "Ray, 1 shard, pipelined (prefetch 4)",
                       "Ray, 2 shards, pipelined (prefetch 4)", "Ray, 1 shard, one round trip per call"]
        key = iter(range(10**6, 1 << 62))

        def ray_add(mem):
            return lambda x, y, _: mem.add(x, y, task=0, keys=torch.tensor([next(key) for _ in range(len(y))]))

        adders = {
            "in-process `add` + `flush`": (lambda x, y, _: (inproc.add(x, y, task=0), inproc.flush()), None),
            "daemon `add` + `flush`": (lambda x, y, _: (client.add(x, y, task=0), client.flush()), None),
            "Ray, 1 shard, ack durable": (ray_add(one), None),
            "Ray, 2 shards, ack durable": (ray_add(two), None),
            "Ray, 1 shard, ack queued (flush per 8 calls)": (ray_add(sharded["bench-1-queued"]),
                                                            sharded["bench-1-queued"].flush),
            "Ray, 2 shards, ack queued (flush per 8 calls)": (ray_add(sharded["bench-2-queued"]),
                                                             sharded["bench-2-queued"].flush),
        }
        lat: dict[str, list[float]] = {k: [] for k in samplers}
        paced: dict[str, list[float]] = {k: [] for k in paced_names}
        add_s: dict[str, list[float]] = {k: [] for k in adders}
        g = torch.Generator().manual_seed(1)
        for _ in range(rounds):
            for name, fn in samplers.items():
                lat[name] += _time(fn, seconds)
            for name in paced_names:
                paced[name] += _time(samplers[name], seconds / 2, work_s=1e-3)
            for name, (fn, flush) in adders.items():
                end = time.perf_counter() + seconds
                while time.perf_counter() < end:
                    add_s[name].append(_add_block(fn, flush, g, []))
        degraded = {name: m.stats()["degraded_batches"] for name, m in sharded.items()}
    finally:
        for m in sharded.values():
            m.shutdown()
        ray.shutdown()
        if daemon is not None:
            daemon.close()
        inproc.close()
    out = {"sample": {name: _summary(v, seconds) for name, v in lat.items()}}
    ring = out["sample"]["daemon, shared-memory ring"]["batches_per_s"]
    sock = out["sample"]["daemon, socket (seeded draw)"]["batches_per_s"]
    for v in out["sample"].values():
        v["ratio_to_daemon_ring"] = v["batches_per_s"] / ring
        v["ratio_to_daemon_socket"] = v["batches_per_s"] / sock
    out["sample_paced"] = {f"{name}, 1 ms of trainer work between calls": _paced_summary(v, "trainer_us_per_batch")
                           for name, v in paced.items()}
    out["add"] = {}
    for name, blocks in add_s.items():
        arr = np.array(blocks)
        # The median block is the typical rate; the mean also counts the rare slow block (an LMDB
        # map growth, a page-cache flush by the machine), which on this shared 2-core machine moves it a lot.
        out["add"][name] = {"samples_per_s": ADD_BATCH * ADD_CALLS / float(np.median(arr)),
                            "samples_per_s_mean": ADD_BATCH * ADD_CALLS * arr.size / arr.sum(),
                            "ms_per_call": float(np.median(arr) / ADD_CALLS * 1e3), "blocks": int(arr.size)}
    base = out["add"]["daemon `add` + `flush`"]["samples_per_s"]
    for v in out["add"].values():
        v["ratio_to_daemon"] = v["samples_per_s"] / base
    out["degraded_batches"] = degraded
    return out


def main(argv: list[str] | None = None) -> dict:
    args = report.timed_args("benchmarks.ray_shards", __doc__, 2.0, 3, argv)
    out = Path(args.out)
    with report.scratch(out) as workdir:
        variants = run(args.seconds, args.rounds, workdir)
    import ray
    results = {"machine": report.machine(ray=ray.__version__),
               "em_size_per_shard": EM, "batch": N, "add_batch": ADD_BATCH, "sample_shape": list(SHAPE), **variants}
    lines = ["| `sample(256)`, EM 500 per shard, CIFAR-sized uint8 | batches/s | samples/s | p50 | p99 "
             "| vs daemon ring | vs daemon socket |", "|---|---|---|---|---|---|---|"]
    for name, v in variants["sample"].items():
        lines.append(f"| {name} | {v['batches_per_s']:,.0f} | {v['samples_per_s']:,.0f} | {v['p50_us']:.0f} us | "
                     f"{v['p99_us']:.0f} us | {v['ratio_to_daemon_ring']:.2f} | {v['ratio_to_daemon_socket']:.2f} |")
    for name, v in variants["sample_paced"].items():
        lines.append(f"| {name} | | | {v['p50_us']:.0f} us | {v['p99_us']:.0f} us | | |")
    lines += ["", "| `add` of 256 CIFAR-sized samples, acknowledged | samples/s (median block) | samples/s (mean) "
              "| ms per call (median) | vs daemon (median) |", "|---|---|---|---|---|"]
    for name, v in variants["add"].items():
        lines.append(f"| {name} | {v['samples_per_s']:,.0f} | {v['samples_per_s_mean']:,.0f} | {v['ms_per_call']:.2f} "
                     f"| {v['ratio_to_daemon']:.2f} |")
    return report.write(out, results, lines)


if __name__ == "__main__":
    main()
