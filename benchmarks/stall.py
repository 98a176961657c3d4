"""What carousel costs a trainer's thread per step at accelerator speed: in-process and through the daemon.

``python -m benchmarks.stall [--quick] [--steps N] [--rounds N] [--step-ms 1,2,5,20] [--ratios 0.5,1.0]
[--busy | --quiet] [--deterministic] [--model] [--device cpu|cuda] [--out DIR]``

One step is what a replay trainer does with its memory around an accelerator step::

    ids = mem.add(x, y, task)        # 32 CIFAR-shaped uint8 stream samples
    batch = mem.sample(32)           # the replay batch
    <the step>                       # emulated: the thread sleeps, GIL released, as in a CUDA sync
    mem.observe(batch.ids, logits)   # (32, 10) logits of the replayed samples

for the RAM-only memory (EM 500, no tier) and carousel swapping from one LMDB tier (CarM's gate:
the second task on, ratio ``--ratios``, ``workers = 1``), in-process (its writer and swap engine
threads of this interpreter), in a daemon that is a child process (``carousel.spawn``), and through a
real daemon (``carousel serve`` in a subprocess, its client on this thread). Variants take turns in rounds so a
drift in machine load hits them alike; each reports the median and p99 of its step wall time and
of each call, and the ratio of its median step to RAM-only's. Torch keeps its default intra-op
thread count (the trainer's, not ours to change); ``--busy`` (the default) runs one CPU-bound
process per core beside it, as ``DataLoader`` workers would.

``--daemon-session own`` starts the served daemon in a session of its own, as one started from another
terminal is: where the kernel's scheduler autogroups are on, that makes it a scheduling group of its
own, which takes the trainer's core as a group (its threads' ``SCHED_BATCH`` notwithstanding).

``--deterministic`` runs every memory in the deterministic mode (``[swap] deterministic = true``,
the reference trainers' default): no swap worker or prefetcher, every swap decided at a step boundary
(``end_step()``) on the trainer's thread and its reads done by the I/O pool meanwhile; what that
boundary costs the trainer's thread grows with the ids stored (``--stored``).

``--model`` adds the real-model variant: a reduced ResNet-18 ER step (32 stream + 32 replay,
synthetic CIFAR-shaped data) on ``--device`` (``cuda`` where there is one), RAM-only against the
carousel daemon and ``carousel.spawn``, with the replay batch moved to the device (``non_blocking``,
from pinned memory when ``--device cuda``).

Writes ``results.json`` and ``results.md`` to ``--out`` (default ``bench-out/stall``). It asserts
nothing about speed: a benchmark measures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import carousel
from carousel import CarouselMemory

from . import report
from .hogs import Hogs
from .served import ServedDaemon

SHAPE = (3, 32, 32)
CLASSES = 10
BATCH = 32
EM = 500


def _memory(tier: Path | None, ratio: float, deterministic: bool = False) -> dict:
    cfg: dict = {"memory": {"em_size": EM, "sample_shape": list(SHAPE), "seed": 0},
                 "swap": {"ratio": ratio, "workers": 1, "prefetch_depth": 512, "deterministic": deterministic},
                 "write_behind": {"queue_samples": 8192, "batch": 256}}
    if tier is not None:
        cfg["tiers"] = [{"kind": "lmdb", "path": str(tier), "capacity": 10**6, "sync": False}]
    return cfg


def _toml(cfg: dict) -> str:
    """The same memory as a daemon profile's ``[memory]`` tables."""
    m, s, w = cfg["memory"], cfg["swap"], cfg["write_behind"]
    lines = ["[memory]", f"em_size = {m['em_size']}", f"sample_shape = {list(m['sample_shape'])}", f"seed = {m['seed']}",
             "[swap]", f"ratio = {s['ratio']}", f"workers = {s['workers']}", f"prefetch_depth = {s['prefetch_depth']}",
             f"deterministic = {'true' if s['deterministic'] else 'false'}",
             "[write_behind]", f"queue_samples = {w['queue_samples']}", f"batch = {w['batch']}"]
    for t in cfg.get("tiers", []):
        lines += ["[[tiers]]", f'kind = "{t["kind"]}"', f'path = "{t["path"]}"', f"capacity = {t['capacity']}",
                  f"sync = {'true' if t['sync'] else 'false'}"]
    return "\n".join(lines) + "\n"


def _stream(n: int, task: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = (torch.randint(0, 2, (n,), generator=g) + 2 * task) % CLASSES
    return torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g), y


def _prefill(mem, stored: int) -> None:
    """Tasks 0 and 1 through the memory's own ``add`` (so swapping is on: task 1 >= start_task)."""
    for task in range(2):
        for lo in range(0, stored // 2, 500):
            x, y = _stream(500, task, 1000 * task + lo)
            mem.add(x, y, task=task)
    mem.flush(timeout_s=600)


class Variant:
    """One memory taking emulated steps; records per-step wall time and each call's time."""

    def __init__(self, name: str, mem, *, close=None, pid: int | None = None) -> None:
        self.name, self.mem, self._close = name, mem, close or mem.close
        self.pid = pid  # the process doing carousel's work (the daemon's); None: this one
        # A pool of stream batches (generated once: the trainer's data loader, not ours to time).
        self.stream = [_stream(BATCH, 1, 10**6 + i) for i in range(16)]
        self.logits = torch.randn(BATCH, CLASSES)
        self.k = 0
        self.reset()

    def reset(self) -> None:
        # wake: how late the thread runs again after the step's sleep (the OS's wake-up, plus, for
        # a memory with background threads, the wait for the GIL one of them holds); offcpu: the
        # step's wall time beyond the sleep's nominal length minus the thread's CPU time (the wake,
        # and every wait for the GIL, a lock or a core in the calls).
        self.rec: dict[str, list[float]] = {"step": [], "add": [], "sample": [], "observe": [], "carousel": [],
                                            "wake": [], "offcpu": []}

    def step(self, step_s: float, record: bool) -> None:
        x, y = self.stream[self.k % len(self.stream)]
        self.k += 1
        mem = self.mem
        c0 = time.thread_time()
        t0 = time.perf_counter()
        mem.add(x, y, task=1)
        t1 = time.perf_counter()
        batch = mem.sample(BATCH)
        t2 = time.perf_counter()
        time.sleep(step_s)  # the accelerator step: the thread waits with the GIL released
        t3 = time.perf_counter()
        mem.observe(batch.ids, logits=self.logits[:len(batch.ids)])
        mem.end_step()
        t4 = time.perf_counter()
        c4 = time.thread_time()
        del batch
        if record:
            r = self.rec
            r["wake"].append(t3 - t2 - step_s)
            r["offcpu"].append((t4 - t0 - step_s) - (c4 - c0))
            r["step"].append(t4 - t0)
            r["add"].append(t1 - t0)
            r["sample"].append(t2 - t1)
            r["observe"].append(t4 - t3)
            r["carousel"].append((t2 - t0) + (t4 - t3))

    def close(self) -> None:
        self._close()


def _q(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q)) if values else float("nan")


def _schedstat() -> np.ndarray:
    """The calling thread's CPU time and run-queue wait so far, in seconds (Linux'
    ``/proc/thread-self/schedstat``; NaN elsewhere)."""
    try:
        with open("/proc/thread-self/schedstat") as fh:
            cpu, queued, _ = fh.read().split()
    except OSError:
        return np.full(2, np.nan)
    return np.array([int(cpu), int(queued)]) / 1e9


def _process_cpu(pid: int | None) -> float:
    """CPU seconds of process ``pid`` (all its threads; None: this process) so far."""
    if pid is None:
        return time.process_time()
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _summary(rec: dict[str, list[float]]) -> dict:
    return {k: {"median_ms": statistics.median(v) * 1e3, "p99_ms": _q(v, 0.99) * 1e3} for k, v in rec.items() if v}


def run_emulated(step_ms: list[float], ratios: list[float], stored: int, steps: int, rounds: int,
                 workdir: Path, deterministic: bool = False, own_session: bool = False) -> dict:
    """RAM-only, carousel in-process, carousel.spawn and carousel daemon, for each ratio, at each emulated step
    (every memory in the deterministic mode with ``deterministic``)."""
    out: dict = {}
    for ratio in ratios:
        variants: list[Variant] = []
        try:
            ram = CarouselMemory.from_dict(_memory(None, ratio, deterministic))
            _prefill(ram, 2 * EM)
            variants.append(Variant("RAM-only", ram))
            local = CarouselMemory.from_dict(_memory(workdir / f"inproc-{ratio}", ratio, deterministic))
            _prefill(local, stored)
            variants.append(Variant("carousel in-process", local))
            # The in-process API's other engine: the same memory in a daemon that is a child of ours.
            spawned = carousel.spawn(_memory(workdir / f"spawn-{ratio}" / "flash", ratio, deterministic))
            _prefill(spawned, stored)
            variants.append(Variant("carousel.spawn", spawned, pid=spawned.process.pid))
            folder = workdir / f"daemon-{ratio}"
            folder.mkdir()
            served = ServedDaemon(folder, _toml(_memory(folder / "flash", ratio, deterministic)),
                                  socket_dir=Path(workdir / f"s{ratio}"), own_session=own_session)
            _prefill(served.client, stored)
            variants.append(Variant("carousel daemon", served.client, close=served.close, pid=served.proc.pid))
            for ms in step_ms:
                for v in variants:
                    v.reset()
                    for _ in range(20):  # warm: rings subscribed, prefetch queues full
                        v.step(ms / 1e3, record=False)
                waits = {v.name: np.zeros(3) for v in variants}
                background = {v.name: 0.0 for v in variants}
                for _ in range(rounds):
                    for v in variants:
                        t0, s0, p0 = time.perf_counter(), _schedstat(), _process_cpu(v.pid)
                        for _ in range(steps):
                            v.step(ms / 1e3, record=True)
                        s1, p1 = _schedstat(), _process_cpu(v.pid)
                        waits[v.name] += (time.perf_counter() - t0 - steps * ms / 1e3, *(s1 - s0))
                        # Carousel's CPU off the trainer's thread: the daemon process's, or this
                        # process's other threads' (the memory's writer and swap engine).
                        background[v.name] += (p1 - p0) - (0.0 if v.pid is not None else s1[0] - s0[0])
                cell = {v.name: _summary(v.rec) for v in variants}
                for name, (beyond, cpu, queued) in waits.items():
                    # Per step, the thread's time beyond the sleeps: on a core, waiting for one
                    # (run queue), or blocked (the sleep's wake-up, a GIL or lock wait); the
                    # blocked time in-process minus RAM-only's is what the GIL and locks cost.
                    n = rounds * steps
                    cell[name]["threads"] = {"cpu_ms": cpu / n * 1e3, "run_queue_ms": queued / n * 1e3,
                                             "blocked_ms": (beyond - cpu - queued) / n * 1e3,
                                             "background_cpu_ms": background[name] / n * 1e3}
                base = cell["RAM-only"]["step"]["median_ms"]
                for v in variants:
                    cell[v.name]["ratio"] = cell[v.name]["step"]["median_ms"] / base
                cell["swapped_in"] = {v.name: v.mem.stats()["swapped_in"] for v in variants}
                out[f"ratio={ratio} step={ms}ms"] = cell
                print(f"ratio {ratio}, step {ms} ms: " + ", ".join(
                    f"{v.name} {cell[v.name]['step']['median_ms']:.2f} ms ({cell[v.name]['ratio']:.3f}x, "
                    f"in carousel {cell[v.name]['carousel']['median_ms']:.3f} ms)" for v in variants), flush=True)
        finally:
            for v in variants:
                v.close()
    return out


def run_model(device: str, stored: int, steps: int, rounds: int, workdir: Path) -> dict:
    """A reduced ResNet-18 ER step (32 + 32) on ``device``: RAM-only against the carousel daemon and
    ``carousel.spawn``."""
    import torch.nn.functional as F

    from trainers.models import reduced_resnet18

    dev = torch.device(device)
    pin = dev.type == "cuda"
    folder = workdir / "model-daemon"
    folder.mkdir()
    ram = CarouselMemory.from_dict(_memory(None, 0.5))
    _prefill(ram, 2 * EM)
    served = ServedDaemon(folder, _toml(_memory(folder / "flash", 0.5)), socket_dir=workdir / "sm")
    _prefill(served.client, stored)
    spawned = carousel.spawn(_memory(workdir / "model-spawn" / "flash", 0.5))
    _prefill(spawned, stored)
    runs = {"RAM-only": ram, "carousel.spawn": spawned, "carousel daemon": served.client}
    torch.manual_seed(0)
    model = reduced_resnet18(CLASSES).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    stream = [_stream(BATCH, 1, 10**6 + i) for i in range(16)]
    if pin:
        stream = [(x.pin_memory(), y.pin_memory()) for x, y in stream]
    rec: dict[str, dict[str, list[float]]] = {k: {"step": [], "carousel": []} for k in runs}

    def step(mem, k: int, record: dict | None) -> None:
        x, y = stream[k % len(stream)]
        t0 = time.perf_counter()
        mem.add(x, y, task=1)
        b = mem.sample(BATCH, pin_memory=True) if pin else mem.sample(BATCH)
        t1 = time.perf_counter()
        inputs = torch.cat([x.to(dev, non_blocking=True), b.x.to(dev, non_blocking=True)]).float().div_(255)
        targets = torch.cat([y.to(dev, non_blocking=True), b.y.to(dev, non_blocking=True)])
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        replay_logits = logits[BATCH:].detach().to("cpu")  # the sync a real loop has
        t2 = time.perf_counter()
        mem.observe(b.ids, logits=replay_logits)
        mem.end_step()
        t3 = time.perf_counter()
        if record is not None:
            record["step"].append(t3 - t0)
            record["carousel"].append((t1 - t0) + (t3 - t2))

    try:
        k = 0
        for name, mem in runs.items():
            for _ in range(10):
                step(mem, k, None)
                k += 1
        for _ in range(rounds):
            for name, mem in runs.items():
                for _ in range(steps):
                    step(mem, k, rec[name])
                    k += 1
        out = {name: _summary(r) for name, r in rec.items()}
        for name in ("carousel.spawn", "carousel daemon"):
            out[name]["ratio"] = out[name]["step"]["median_ms"] / out["RAM-only"]["step"]["median_ms"]
        out["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        return out
    finally:
        ram.close()
        spawned.close()
        served.close()


def _lines(results: dict) -> list[str]:
    lines = ["Every memory in the deterministic mode.", ""] if results.get("deterministic") else []
    if results.get("daemon_session") == "own":
        lines += ["The served daemon in a session of its own (`--daemon-session own`).", ""]
    lines += ["| ratio, emulated step | variant | step median (ms) | x RAM-only | step p99 | in carousel median | "
              "add p50/p99 | sample p50/p99 | observe p50/p99 | trainer thread CPU a step (ms) | swapped in |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell, by in results["emulated"].items():
        for name, s in by.items():
            if name == "swapped_in":
                continue
            lines.append(f"| {cell} | {name} | {s['step']['median_ms']:.2f} | {s['ratio']:.3f} | {s['step']['p99_ms']:.2f} "
                         f"| {s['carousel']['median_ms']:.3f} | {s['add']['median_ms']:.3f} / {s['add']['p99_ms']:.3f} "
                         f"| {s['sample']['median_ms']:.3f} / {s['sample']['p99_ms']:.3f} "
                         f"| {s['observe']['median_ms']:.3f} / {s['observe']['p99_ms']:.3f} "
                         f"| {s['threads']['cpu_ms']:.3f} | {by['swapped_in'][name]} |")
    if "model" in results:
        m = results["model"]
        lines += ["", f"Real model (reduced ResNet-18, ER 32+32) on {m['device']}:", "",
                  "| variant | step median (ms) | x RAM-only | in carousel median (ms) |", "|---|---|---|---|"]
        for name in ("RAM-only", "carousel.spawn", "carousel daemon"):
            s = m[name]
            lines.append(f"| {name} | {s['step']['median_ms']:.2f} | {s.get('ratio', 1.0):.3f} | "
                         f"{s['carousel']['median_ms']:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stall", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds (CI-sized)")
    parser.add_argument("--steps", type=int, default=150, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--step-ms", default="1,2,5,20", help="emulated step times, comma-separated")
    parser.add_argument("--ratios", default="0.5,1.0", help="swap ratios, comma-separated")
    parser.add_argument("--stored", type=int, default=5000, help="samples in the carousel tiers")
    busy = parser.add_mutually_exclusive_group()
    busy.add_argument("--busy", dest="busy", action="store_true", default=True,
                      help="one CPU-bound process per core beside the run (the default)")
    busy.add_argument("--quiet", dest="busy", action="store_false", help="nothing beside the run")
    parser.add_argument("--deterministic", action="store_true",
                        help="every memory in the deterministic mode (the reference trainers' default)")
    parser.add_argument("--daemon-session", choices=("trainer", "own"), default="trainer",
                        help="the served daemon in the trainer's session (as a launcher script starts it), or in "
                        "one of its own (as from another terminal: a scheduling autogroup of its own)")
    parser.add_argument("--model", action="store_true", help="also the real-model variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench-out/stall")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.step_ms, args.ratios, args.stored = 20, 1, "2", "0.5", 1000
    step_ms = [float(s) for s in args.step_ms.split(",")]
    ratios = [float(s) for s in args.ratios.split(",")]
    out = Path(args.out)
    results: dict = {"machine": report.machine(busy=str(args.busy)), "steps": args.steps, "rounds": args.rounds,
                     "stored": args.stored, "deterministic": args.deterministic,
                     "daemon_session": args.daemon_session}
    with report.scratch(out) as work:
        hogs = Hogs(cpu=os.cpu_count() or 1, io=False) if args.busy else None
        try:
            if hogs is not None:
                hogs.__enter__()
            results["emulated"] = run_emulated(step_ms, ratios, args.stored, args.steps, args.rounds, work,
                                               args.deterministic, args.daemon_session == "own")
            if args.model:
                n = 10 if args.device == "cpu" else args.steps
                results["model"] = run_model(args.device, args.stored, n, args.rounds, work)
        finally:
            if hogs is not None:
                hogs.__exit__(None, None, None)
    return report.write(out, results, _lines(results))


if __name__ == "__main__":
    main()
