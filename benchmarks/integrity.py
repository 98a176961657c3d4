"""Benchmark: what the integrity mode (``memory.verify``) costs ``sample()`` and ``add()``.

``python -m benchmarks.integrity [--quick] [--seconds S] [--rounds R] [--out DIR]``

Two RAM-only memories, EM of 500 CIFAR-sized uint8 samples (3 x 32 x 32), filled the same way,
one with ``verify = false`` (the default) and one with ``verify = true``. Timed back to back:
``sample(32)``, ``sample(256)`` (each batch checked against its add-time CRC-32Cs) and
``add(32)`` (which computes those CRCs). The variants take turns within each round, so a change
in machine load hits both alike; reported per operation: the median over rounds of the mean time
per call, off and on, and the median of the per-round ratios. Times are the calling thread's CPU
time (``time.thread_time``) with torch on one thread, which other processes on a
busy machine inflate far less than wall time; wall times are in ``results.json`` too. Through the
daemon the client runs the same check on each batch (``carousel.integrity.Verifier.check``).

It writes ``results.json`` and ``results.md`` to ``--out`` (default ``bench-out/integrity``) and
asserts nothing about speed.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from carousel import CarouselMemory

from . import report

SHAPE = (3, 32, 32)
EM = 500


def _memory(verify: bool) -> CarouselMemory:
    mem = CarouselMemory.from_dict({"memory": {"em_size": EM, "sample_shape": list(SHAPE), "seed": 0,
                                               "verify": verify}})
    if (mem.verifier is not None) != verify:
        raise SystemExit("CAROUSEL_VERIFY is set in this environment: unset it to measure the mode off")
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        mem.add(torch.randint(0, 256, (250, *SHAPE), dtype=torch.uint8, generator=g),
                torch.randint(0, 10, (250,), generator=g), task=0)
    return mem


def _per_call(fn, seconds: float) -> tuple[float, float]:
    """Mean ``(CPU seconds of this thread, wall seconds)`` per call of ``fn``, called back to back
    for about ``seconds``."""
    calls, c0, t0 = 0, time.thread_time(), time.perf_counter()
    end = t0 + seconds
    while True:
        for _ in range(20):
            fn()
        calls += 20
        t1 = time.perf_counter()
        if t1 > end:
            return (time.thread_time() - c0) / calls, (t1 - t0) / calls


def run(seconds: float, rounds: int) -> dict:
    mems = {False: _memory(False), True: _memory(True)}
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (32, *SHAPE), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    ops = {"sample(32)": lambda m: m.sample(32), "sample(256)": lambda m: m.sample(256),
           "add(32)": lambda m: m.add(x, y, task=0)}
    times: dict[str, dict[bool, list[float]]] = {op: {False: [], True: []} for op in ops}
    walls: dict[str, dict[bool, list[float]]] = {op: {False: [], True: []} for op in ops}
    try:
        for op, fn in ops.items():  # warm-up: caches, torch's first calls, the CRC residue tables
            for verify, mem in mems.items():
                for _ in range(200):
                    fn(mem)
        for _ in range(rounds):
            for op, fn in ops.items():
                for verify, mem in mems.items():
                    cpu, wall = _per_call(lambda: fn(mem), seconds)
                    times[op][verify].append(cpu)
                    walls[op][verify].append(wall)
        checked = mems[True].registry.get_sample_value("carousel_integrity_checked_samples_total", {"result": "ok"})
    finally:
        for mem in mems.values():
            mem.close()
    out = {}
    for op, t in times.items():
        off, on = np.array(t[False]), np.array(t[True])
        out[op] = {"off_us": float(np.median(off) * 1e6), "on_us": float(np.median(on) * 1e6),
                   "ratio": float(np.median(on / off)), "extra_us": float(statistics.median((on - off) * 1e6)),
                   "off_us_by_round": (off * 1e6).round(2).tolist(), "on_us_by_round": (on * 1e6).round(2).tolist(),
                   "wall_off_us": float(np.median(walls[op][False]) * 1e6),
                   "wall_on_us": float(np.median(walls[op][True]) * 1e6)}
    out["rows_checked"] = int(checked or 0)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = report.timed_args("benchmarks.integrity", __doc__, 1.0, 7, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # all the work on the timed thread: its CPU time is the cost
    try:
        ops = run(args.seconds, args.rounds)
    finally:
        torch.set_num_threads(threads)
    results = {"machine": report.machine(), "em_size": EM, "sample_shape": list(SHAPE),
               "seconds": args.seconds, "rounds": args.rounds, "operations": ops}
    lines = ["| EM 500, CIFAR-sized uint8, RAM only (CPU time per call) | verify off | verify on | extra per call "
             "| on / off |",
             "|---|---|---|---|---|"]
    for op, v in ops.items():
        if isinstance(v, dict):
            lines.append(f"| `{op}` | {v['off_us']:.1f} us | {v['on_us']:.1f} us | {v['extra_us']:+.1f} us "
                         f"| {v['ratio']:.2f}x |")
    return report.write(out, results, lines)


if __name__ == "__main__":
    main()
