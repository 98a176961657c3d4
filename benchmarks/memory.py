"""Benchmark of the memory core: replay sampling cost and the CarM training-speed claim.

``python -m benchmarks.memory [--quick] [--steps N] [--stored N] [--read-delay-ms MS] [--out DIR]``

(a) ``sample(256)`` from a 500-slot EM of CIFAR-sized uint8 samples, against the bare limit: a
    ``torch.index_select`` of the same pool tensors (x, y, task) with a random index. Reported as
    samples/s and the ratio (target >= 0.9).
(b) A training loop of a reduced ResNet-18 (nf 20) on CIFAR-sized input, ER (32 stream + 32
    replay, one cross-entropy, SGD), EM 500, in its second task: RAM-only, against carousel with
    an LMDB tier of ``--stored`` samples (default 50,000) swapping at ratio 0.5 asynchronously
    (``workers = 1``), synchronously (``workers = 0``, CarM's ablation) and deterministically
    (``deterministic = true``: swaps land at step boundaries, a step after they were asked for).
    Reported: median step time of each, the median time the trainer's thread spends inside
    carousel's calls in a step (``add``, ``sample``, ``observe``, ``end_step``), and the ratios to
    RAM-only (CarM's claim: async 1.01-1.07x; target <= 1.03).
    The variants run interleaved, in rounds, so drift in machine load hits all alike.
    ``--read-delay-ms`` adds latency to every storage read: on a machine whose page cache holds the
    whole tier, that is what a real flash or disk read costs and what synchronous swapping waits on.

It prints a table and writes ``results.json`` and ``results.md`` to ``--out`` (default
``bench-out/memory``). It asserts nothing about speed: a benchmark measures.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from carousel import CarouselMemory
from trainers.models import reduced_resnet18

from . import report

SHAPE = (3, 32, 32)
CLASSES = 10


def _config(em: int, tier_path: Path | None, workers: int, ratio: float = 0.5, capacity: int = 10**6,
            deterministic: bool = False) -> dict:
    cfg = {"memory": {"em_size": em, "sample_shape": list(SHAPE), "seed": 0},
           "swap": {"ratio": ratio, "workers": workers, "prefetch_depth": 512, "deterministic": deterministic},
           "write_behind": {"queue_samples": 8192, "batch": 256}}
    if tier_path is not None:
        cfg["tiers"] = [{"kind": "lmdb", "path": str(tier_path), "capacity": capacity, "sync": False}]
    return cfg


def _stream(n: int, task: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(2 * task, 2 * task + 2, (n,), generator=g) % CLASSES
    x = torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g)
    return x, y


def bench_sample(repeat: int) -> dict:
    """(a): sample(256) against index_select of the same pool."""
    mem = CarouselMemory.from_dict(_config(500, None, 1))
    for step in range(4):
        x, y = _stream(250, 0, step)
        mem.add(x, y, task=0)
    pool = mem.pool.tensors
    g = torch.Generator().manual_seed(0)

    def ours() -> None:
        mem.sample(256)

    def bare() -> None:
        idx = torch.randint(0, 500, (256,), generator=g)
        pool["x"].index_select(0, idx), pool["y"].index_select(0, idx), pool["task"].index_select(0, idx)

    def bare_distinct() -> None:  # the same limit with distinct samples, as sample() returns
        idx = torch.randperm(500, generator=g)[:256]
        pool["x"].index_select(0, idx), pool["y"].index_select(0, idx), pool["task"].index_select(0, idx)

    variants = (("carousel sample(256)", ours), ("index_select limit", bare),
                ("index_select, distinct draw", bare_distinct))
    for _, fn in variants:
        for _ in range(200):
            fn()
    # Variants take turns within each repeat, so a change in machine load hits them alike; the
    # ratios are medians of per-repeat ratios.
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(repeat):
        for name, fn in variants:
            t0 = time.perf_counter()
            for _ in range(100):
                fn()
            times[name].append((time.perf_counter() - t0) / 100)
    out = {name: 256 / statistics.median(t) for name, t in times.items()}
    ours_t = np.array(times["carousel sample(256)"])
    out["ratio_by_repeat"] = float(np.median(np.array(times["index_select limit"]) / ours_t))
    out["ratio_distinct_by_repeat"] = float(np.median(np.array(times["index_select, distinct draw"]) / ours_t))
    mem.close()
    out["ratio"] = out.pop("ratio_by_repeat")
    out["ratio_distinct"] = out.pop("ratio_distinct_by_repeat")
    return out


def _prefill(path: Path, stored: int) -> None:
    """Put ``stored`` samples of 5 tasks into an LMDB tier, through the memory's own add()."""
    with CarouselMemory.from_dict(_config(500, path, 1)) as mem:
        per_task = stored // 5
        for task in range(5):
            for lo in range(0, per_task, 1000):
                x, y = _stream(min(1000, per_task - lo), task, task * 10**6 + lo)
                mem.add(x, y, task=task)
        mem.flush(timeout_s=600)


class _DelayedReads:
    """A store whose reads take ``delay_s`` longer: flash or disk latency on a machine whose
    page cache holds the whole tier (what CarM's synchronous swapping pays for)."""

    def __init__(self, inner, delay_s: float) -> None:
        self._inner, self._delay = inner, delay_s

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def get_many(self, ids):
        time.sleep(self._delay)
        return self._inner.get_many(ids)

    def get_chunk(self, index):
        time.sleep(self._delay)
        return self._inner.get_chunk(index)


class _Run:
    """One variant: a memory, a model and an optimizer, ready to take ER steps in task 1."""

    def __init__(self, name: str, cfg: dict, read_delay_s: float = 0.0) -> None:
        self.name = name
        self.mem = CarouselMemory.from_dict(cfg)
        for tier in self.mem.tiers:
            if read_delay_s:
                tier.store = _DelayedReads(tier.store, read_delay_s)
        if not cfg.get("tiers"):  # RAM-only: fill the EM from the same kind of stream
            for task in range(2):
                x, y = _stream(1000, task, 77 + task)
                self.mem.add(x, y, task=task)
        torch.manual_seed(0)
        self.model = reduced_resnet18(CLASSES)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.03)
        self.step_no = 0
        self.times: list[float] = []
        self.calls: list[float] = []

    def step(self, record: bool) -> None:
        x, y = _stream(32, 1, 10**7 + self.step_no)
        self.step_no += 1
        t0 = time.perf_counter()
        self.mem.add(x, y, task=1)
        replay = self.mem.sample(32)
        t1 = time.perf_counter()
        inputs = torch.cat([x, replay.x]).float().div_(255)
        targets = torch.cat([y, replay.y])
        logits = self.model(inputs)
        loss = F.cross_entropy(logits, targets)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        t2 = time.perf_counter()
        self.mem.observe(replay.ids, logits=logits[32:].detach())
        self.mem.end_step()  # a deterministic memory's boundary; nothing for the others
        t3 = time.perf_counter()
        if record:
            self.times.append(t3 - t0)
            # What the trainer's thread spends inside carousel: add + sample + observe + end_step.
            self.calls.append((t1 - t0) + (t3 - t2))


def _take_turns(runs: list[_Run], steps: int, rounds: int) -> None:
    """Warm up (allocator, prefetch queues), then take turns in rounds of ``steps`` timed steps each."""
    for run in runs:
        for _ in range(3):
            run.step(record=False)
    for _ in range(rounds):
        for run in runs:
            for _ in range(steps):
                run.step(record=True)


def _interleaved(runs: list[_Run], steps: int, rounds: int) -> int:
    """Warm up, then take turns in rounds; close; the first run's swaps."""
    _take_turns(runs, steps, rounds)
    swaps = runs[0].mem.stats()["swapped_in"]
    bound = runs[0].mem.registry.get_sample_value("carousel_step_boundary_seconds_total") or 0.0
    runs[0].boundary_s = bound / max(1, runs[0].step_no)
    for run in runs:
        run.mem.close()
    return swaps


def bench_training(stored: int, steps: int, rounds: int, workdir: Path, read_delay_s: float = 0.0) -> dict:
    """(b): ER step time, RAM-only vs carousel async vs sync."""
    tier = workdir / "flash"
    t0 = time.perf_counter()
    _prefill(tier, stored)
    prefill_s = time.perf_counter() - t0
    runs = [_Run("RAM-only", _config(500, None, 1)),
            _Run("carousel async", _config(500, tier, 1), read_delay_s)]
    _take_turns(runs, steps, rounds)
    swaps_async = runs[1].mem.stats()["swapped_in"]
    hit = runs[1].mem.stats()["prefetch_hit_rate"]
    for run in runs:
        run.mem.close()
    # The synchronous and deterministic variants open the same tier after the async one closed
    # (one writer per store), each with its own RAM-only reference beside it.
    sync = _Run("carousel sync", _config(500, tier, 0), read_delay_s)
    base = _Run("RAM-only (2)", _config(500, None, 1))
    swaps_sync = _interleaved([sync, base], steps, rounds)
    det = _Run("carousel deterministic", _config(500, tier, 1, deterministic=True), read_delay_s)
    base3 = _Run("RAM-only (3)", _config(500, None, 1))
    swaps_det = _interleaved([det, base3], steps, rounds)
    boundary_s = det.boundary_s
    med = {r.name: statistics.median(r.times) for r in runs + [sync, base, det, base3]}
    return {
        "stored": stored, "read_delay_ms": read_delay_s * 1e3, "prefill_s": prefill_s, "steps_per_variant": steps * rounds,
        "step_s": med,
        "carousel_calls_ms_per_step": {r.name: statistics.median(r.calls) * 1e3
                                       for r in runs + [sync, base, det, base3]},
        "async_ratio": med["carousel async"] / med["RAM-only"],
        "sync_ratio": med["carousel sync"] / med["RAM-only (2)"],
        "deterministic_ratio": med["carousel deterministic"] / med["RAM-only (3)"],
        "deterministic_boundary_ms_per_step": boundary_s * 1e3,
        "swapped_in_async": swaps_async, "swapped_in_sync": swaps_sync, "swapped_in_deterministic": swaps_det,
        "prefetch_hit_rate_async": hit,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (CI-sized)")
    parser.add_argument("--stored", type=int, default=50_000)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--read-delay-ms", type=float, default=0.0,
                        help="add this latency to every storage read (emulates flash beyond the page cache)")
    parser.add_argument("--out", default="bench-out/memory")
    args = parser.parse_args(argv)
    if args.quick:
        args.stored, args.steps, args.rounds = 2_000, 3, 1
    out = Path(args.out)
    with report.scratch(out) as workdir:
        results = {"machine": report.machine(),
                   "sample": bench_sample(repeat=3 if args.quick else 15),
                   "training": bench_training(args.stored, args.steps, args.rounds, workdir,
                                              args.read_delay_ms / 1e3)}
    s, t = results["sample"], results["training"]
    lines = [
        "| measurement | value |", "|---|---|",
        f"| carousel `sample(256)`, EM 500, CIFAR-sized | {s['carousel sample(256)']:,.0f} samples/s |",
        f"| bare `index_select` of the same pool | {s['index_select limit']:,.0f} samples/s |",
        f"| ratio (target >= 0.9) | {s['ratio']:.2f} |",
        f"| bare `index_select` with a distinct draw (`randperm`) | {s['index_select, distinct draw']:,.0f} samples/s |",
        f"| ratio to that | {s['ratio_distinct']:.2f} |",
    ]
    for name, sec in t["step_s"].items():
        lines.append(f"| ER step, reduced ResNet-18, {name} | {sec * 1e3:.1f} ms, of which in carousel calls "
                     f"(add, sample, observe, end_step) {t['carousel_calls_ms_per_step'][name]:.3f} ms |")
    lines += [
        f"| storage read latency added | {t['read_delay_ms']:g} ms per read call |",
        f"| async step-time ratio, LMDB tier of {t['stored']:,} at ratio 0.5 (target <= 1.03) | {t['async_ratio']:.3f} |",
        f"| sync step-time ratio (workers = 0) | {t['sync_ratio']:.3f} |",
        f"| deterministic step-time ratio (swaps at step boundaries) | {t['deterministic_ratio']:.3f} |",
        f"| deterministic: trainer time in end_step() | {t['deterministic_boundary_ms_per_step']:.3f} ms per step |",
        f"| swaps during the timed steps: async / sync / deterministic | {t['swapped_in_async']} / "
        f"{t['swapped_in_sync']} / {t['swapped_in_deterministic']} |",
        f"| prefetch hit rate (async) | {t['prefetch_hit_rate_async']:.2f} |",
    ]
    return report.write(out, results, lines)


if __name__ == "__main__":
    main()
