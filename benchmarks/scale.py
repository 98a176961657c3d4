"""Carousel's background CPU per training step against how many samples are stored.

``python -m benchmarks.scale [--quick] [--stored 50000,1000000] [--steps N] [--rounds R] [--bounded] [--out DIR]``

CarM keeps every past sample on storage, so the stored set only grows; what carousel's threads
spend per training step must not grow with it. For each ``--stored`` size a memory is opened (EM
500, one LMDB tier, CarM swapping at ratio 0.5 from the first task on, ``workers = 1``) and
prefilled through ``add`` with that many tiny samples (8 float32: the catalog's per-id work is what
could scale, not the bytes). Then each memory in turn takes ``--steps`` emulated training steps --
``sample(32)``, a 1.5 ms sleep with the GIL released (the accelerator's step), ``add(32)``,
``observe(ids, logits)`` -- in rounds, so a drift in the machine's load hits every size alike.
Reported per size, medians over rounds: the CPU per step of each of the memory's own threads
(read from the kernel per thread), their sum, the trainer thread's CPU in the calls, and samples
swapped in per step. ``--bounded`` gives the tier room for exactly the prefill, so every write
then evicts (a tier at its capacity, the steady state of a bounded flash tier).

It prints a table and writes ``results.json`` and ``results.md`` to ``--out`` (default
``bench-out/scale``). It asserts nothing about speed: a benchmark measures.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch

from carousel import CarouselMemory

from . import report

EM = 500
WIDTH = 8  # floats a sample
CLASSES = 10
STEP_S = 0.0015
PREFILL_BATCH = 4096


def _config(tier: Path, capacity: int) -> dict:
    return {"memory": {"em_size": EM, "sample_shape": [WIDTH], "dtype": "float32", "seed": 0},
            "swap": {"ratio": 0.5, "workers": 1, "start_task": 0},
            "write_behind": {"queue_samples": 2 * PREFILL_BATCH, "batch": PREFILL_BATCH},
            "tiers": [{"kind": "lmdb", "path": str(tier), "capacity": capacity, "sync": False}]}


class Sized:
    """One memory holding ``stored`` samples, its own threads known by identity (every memory's
    threads have the same names)."""

    def __init__(self, folder: Path, stored: int, bounded: bool, warmup: int) -> None:
        before = {t.ident for t in threading.enumerate()}
        self.stored = stored
        self.mem = CarouselMemory.from_dict(_config(folder, stored if bounded else 10 * stored + 10**6))
        g = torch.Generator().manual_seed(stored)
        for lo in range(0, stored, PREFILL_BATCH):
            n = min(PREFILL_BATCH, stored - lo)
            self.mem.add(torch.rand(n, WIDTH, generator=g), torch.randint(0, CLASSES, (n,), generator=g), task=0)
        self.mem.flush()
        self._g = g
        self.threads: list[threading.Thread] = []  # known once warm (below)
        self.steps(warmup)  # the first swaps, the prefetch queues filled: the I/O pool's thread started
        self.threads = [t for t in threading.enumerate() if t.ident not in before]

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each of the memory's threads, by name (the I/O pool's summed)."""
        out: dict[str, float] = {}
        for t in self.threads:
            try:
                s = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except (OSError, ProcessLookupError):  # the thread ended
                continue
            # The I/O pool's threads summed; a store's flush thread is named after its folder.
            name = t.name.rsplit("_", 1)[0] if t.name.startswith("carousel-swap-io") else t.name.split(":")[0]
            out[name] = out.get(name, 0.0) + s
        return out

    def steps(self, n: int) -> dict[str, float]:
        """``n`` emulated steps; per step: each thread's CPU, the trainer's CPU in calls, swaps."""
        x = torch.rand(n, 32, WIDTH, generator=self._g)
        y = torch.randint(0, CLASSES, (n, 32), generator=self._g)
        logits = torch.randn(n, 32, CLASSES, generator=self._g)
        swapped = self.mem.stats()["swapped_in"]
        before, trainer = self.cpu(), 0.0
        for s in range(n):
            c0 = time.thread_time()
            batch = self.mem.sample(32)
            c1 = time.thread_time()
            time.sleep(STEP_S)
            c2 = time.thread_time()
            self.mem.add(x[s], y[s], task=0)
            self.mem.observe(batch.ids, logits=logits[s, :len(batch.ids)])
            trainer += (c1 - c0) + (time.thread_time() - c2)
        after = self.cpu()
        row = {k.removeprefix("carousel-"): (after[k] - before.get(k, 0.0)) / n for k in after}
        row["background"] = sum(after[k] - before.get(k, 0.0) for k in after) / n
        row["trainer"] = trainer / n
        row["swapped"] = (self.mem.stats()["swapped_in"] - swapped) / n
        return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few steps (a smoke run)")
    p.add_argument("--stored", default="50000,1000000", help="comma-separated stored sizes")
    p.add_argument("--steps", type=int, default=600, help="steps per size per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bounded", action="store_true", help="a tier of exactly the prefill's size: every write evicts")
    p.add_argument("--out", default="bench-out/scale")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.stored.split(",")]
    if args.quick:
        sizes, args.steps, args.rounds = [2000, 8000], 60, 1
    out = Path(args.out)
    rows: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    with report.scratch(out) as work:
        mems: list[Sized] = []
        try:
            for n in sizes:
                mems.append(Sized(work / f"s{n}", n, args.bounded, warmup=max(20, args.steps // 5)))
            for r in range(args.rounds):
                for m in (mems if r % 2 == 0 else mems[::-1]):
                    rows[m.stored].append(m.steps(args.steps))
        finally:
            for m in mems:
                m.mem.close()
    names = sorted({k for rs in rows.values() for r in rs for k in r} - {"background", "trainer", "swapped"})
    med = {n: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in [*names, "background", "trainer", "swapped"]}
           for n, rs in rows.items()}
    lines = [f"Carousel's CPU per emulated step ({STEP_S * 1e3:.1f} ms, sample + add + observe of 32), EM {EM}, "
             f"LMDB tier{' at its capacity (every write evicts)' if args.bounded else ''}; medians of "
             f"{args.rounds} round(s) of {args.steps} steps", "",
             "| stored samples | " + " | ".join(f"{k} (ms)" for k in names) + " | all background (ms) | "
             "trainer thread in calls (ms) | swapped in a step |",
             "|---|" + "---|" * (len(names) + 3)]
    for n in sizes:
        m = med[n]
        lines.append(f"| {n:,} | " + " | ".join(f"{m[k] * 1e3:.3f}" for k in names)
                     + f" | {m['background'] * 1e3:.3f} | {m['trainer'] * 1e3:.3f} | {m['swapped']:.1f} |")
    results = {"machine": report.machine(), "args": vars(args), "rows": {str(n): rs for n, rs in rows.items()},
               "median": {str(n): m for n, m in med.items()}}
    return report.write(out, results, lines)


if __name__ == "__main__":
    main()
