"""Benchmark: ``sample(256)`` through the daemon against the same memory in-process.

``python -m benchmarks.daemon [--quick] [--seconds S] [--rounds R] [--out DIR]``

One memory (EM of 500 CIFAR-sized uint8 samples, an LMDB tier behind it), filled the same way in
both places. In-process: ``CarouselMemory.sample(256)`` back to back. Through the daemon: a real
``carousel serve`` subprocess and ``carousel.connect`` in this process, ``sample(256)`` back to back
(the shared-memory ring path), and seeded ``sample(256, seed=i)`` (the socket path: one round trip,
tensors in the frame). Variants run interleaved in rounds; reported per variant: batches/s,
samples/s, p50/p99 latency per call, and the daemon/in-process throughput ratio (target >= 0.8),
against the in-process draw with this process's torch threads and with one thread (the daemon's
``torch_threads``).
Then the paced case: the caller spins 1 ms between calls (a training step keeping its core busy)
and only the ``sample`` calls are timed -- what sampling costs the trainer when it has other work.

It writes ``results.json`` and ``results.md`` to ``--out`` (default ``bench-out/daemon``) and
asserts nothing about speed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from carousel import CarouselMemory

from . import report
from .served import ServedDaemon

SHAPE = (3, 32, 32)
EM = 500
N = 256


def _memory_toml(tier: Path) -> str:
    return (f"[memory]\nem_size = {EM}\nsample_shape = {list(SHAPE)}\nseed = 0\n"
            f"[[tiers]]\nkind = \"lmdb\"\npath = \"{tier}\"\ncapacity = 100000\nsync = false\n")


def _fill(mem, n: int = 2000) -> None:
    g = torch.Generator().manual_seed(0)
    for start in range(0, n, 250):
        mem.add(torch.randint(0, 256, (250, *SHAPE), dtype=torch.uint8, generator=g),
                torch.randint(0, 10, (250,), generator=g), task=0)


def _time(fn, seconds: float, work_s: float = 0.0) -> list[float]:
    """Latencies of back-to-back calls; with ``work_s``, the caller spins that long between calls
    (a trainer's step keeping its core busy) and only the calls are timed."""
    lat = []
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        batch = fn()
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        assert len(batch) == N
        del batch
        if work_s:
            while time.perf_counter() - t1 < work_s:
                pass
        if t1 > end:
            return lat


def _summary(lat: list[float], seconds: float) -> dict:
    arr = np.array(lat)
    return {"batches_per_s": len(lat) / arr.sum(), "samples_per_s": N * len(lat) / arr.sum(),
            "p50_us": float(np.percentile(arr, 50) * 1e6), "p99_us": float(np.percentile(arr, 99) * 1e6),
            "calls": len(lat)}


def _paced_summary(lat: list[float], per_batch_key: str) -> dict:
    """p50/p99 of calls timed between 1 ms spins of trainer work, and what a batch costs the trainer."""
    arr = np.array(lat)
    return {"p50_us": float(np.percentile(arr, 50) * 1e6), "p99_us": float(np.percentile(arr, 99) * 1e6),
            "calls": len(lat), per_batch_key: float(np.mean(arr) * 1e6)}


def run(seconds: float, rounds: int, workdir: Path) -> dict:
    mem = CarouselMemory.from_dict({"memory": {"em_size": EM, "sample_shape": list(SHAPE), "seed": 0},
                                    "tiers": [{"kind": "lmdb", "path": str(workdir / "inproc"),
                                               "capacity": 100000, "sync": False}]})
    _fill(mem)
    try:
        with ServedDaemon(workdir, _memory_toml(workdir / "daemon-tier")) as daemon:
            client = daemon.client
            _fill(client)
            client.sample(N)  # subscribe: the ring exists before timing starts
            seeds = iter(range(1 << 62))
            # (call, torch threads of this process while timed). The daemon gathers with its profile's
            # torch_threads (1), so the in-process draw is also timed with one thread: on a 2-core
            # machine the daemon cannot take a second core without taking it from the trainer.
            threads = torch.get_num_threads()
            variants = {"in-process": (lambda: mem.sample(N), threads),
                        "in-process, 1 torch thread (the daemon's)": (lambda: mem.sample(N), 1),
                        "daemon, shared-memory ring": (lambda: client.sample(N), threads),
                        "daemon, socket (seeded draw)": (lambda: client.sample(N, seed=next(seeds)), threads)}
            lat: dict[str, list[float]] = {k: [] for k in variants}
            paced: dict[str, list[float]] = {k: [] for k in ("in-process", "daemon, shared-memory ring")}
            try:
                for _ in range(rounds):
                    for name, (fn, n_threads) in variants.items():
                        torch.set_num_threads(n_threads)
                        lat[name] += _time(fn, seconds)
                    torch.set_num_threads(threads)
                    for name in paced:
                        paced[name] += _time(variants[name][0], seconds / 2, work_s=1e-3)
            finally:
                torch.set_num_threads(threads)
    finally:
        mem.close()
    out = {name: _summary(v, seconds) for name, v in lat.items()}
    base = out["in-process"]["batches_per_s"]
    base_1t = out["in-process, 1 torch thread (the daemon's)"]["batches_per_s"]
    for v in out.values():
        v["ratio_to_in_process"] = v["batches_per_s"] / base
        v["ratio_to_in_process_1_thread"] = v["batches_per_s"] / base_1t
    for name, v in paced.items():
        out[f"{name}, 1 ms of trainer work between calls"] = _paced_summary(v, "trainer_cpu_us_per_batch")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = report.timed_args("benchmarks.daemon", __doc__, 3.0, 5, argv)
    out = Path(args.out)
    with report.scratch(out) as workdir:
        variants = run(args.seconds, args.rounds, workdir)
    results = {"machine": report.machine(),
               "em_size": EM, "batch": N, "sample_shape": list(SHAPE), "variants": variants}
    lines = ["| `sample(256)`, EM 500, CIFAR-sized uint8 | batches/s | samples/s | p50 | p99 "
             "| ratio to in-process | ratio to in-process, 1 thread |",
             "|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        if "batches_per_s" in v:
            lines.append(f"| {name} | {v['batches_per_s']:,.0f} | {v['samples_per_s']:,.0f} | {v['p50_us']:.0f} us | "
                         f"{v['p99_us']:.0f} us | {v['ratio_to_in_process']:.2f} | {v['ratio_to_in_process_1_thread']:.2f} |")
        else:
            lines.append(f"| {name} | | | {v['p50_us']:.0f} us | {v['p99_us']:.0f} us | | |")
    return report.write(out, results, lines)


if __name__ == "__main__":
    main()
