"""Benchmark of the integrations: each framework's own buffer against carousel's, on the same loop.

``python -m benchmarks.integrations [--quick] [--steps N] [--rounds N] [--out DIR]``

(a) Mammoth's ER step (an MLP on 28x28 inputs; 32 stream + 32 replayed samples; ``get_data`` with a
    per-example transform, ``add_data`` of the stream batch) with a reservoir buffer as Mammoth's
    ``utils/buffer.py`` implements it (Mammoth is not a package; the same algorithm re-written here:
    per-sample reservoir insertion, ``np.random.choice`` draw, per-example transform), against
    ``CarouselBuffer`` RAM-only, with an LMDB tier holding every sample (swapping), and the same on a
    real ``carousel serve`` beside the loop (the way a user runs the daemon; its process's CPU per
    step is reported too).
(b) A TorchRL off-policy loop: ``extend`` 32 transitions (obs 64 float32, action, reward, next obs),
    ``sample(256)``, one MLP step; ``ReplayBuffer`` on ``LazyTensorStorage`` (RAM), on
    ``LazyMemmapStorage`` (disk) and on ``CarouselStorage`` (an LMDB tier, and a flat tier: one
    memory-mapped file), and each storage's ``get`` of 256 random positions and ``set`` of 32 timed
    alone. Needs torchrl.

(c) Avalanche's ``Naive`` strategy (the same MLP, 28x28 inputs, mini-batches of 32) with its own
    ``ReplayPlugin(mem_size=500)`` against ``CarouselReplayPlugin(mem_size=500)``, RAM-only and with
    an LMDB tier. Needs avalanche-lib (run the script with the interpreter of a venv that has it).

Every buffer of a loop runs once per round (``--rounds``, 3), in turns. Reported: the median steps/s
of each and the median (and range) over rounds of its ratio to the framework's own buffer in the
same round. It asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carousel.integrations.mammoth import CarouselBuffer

from . import report
from .served import ServedDaemon
from .stall import _process_cpu


class ReservoirBuffer:
    """Mammoth's reservoir ``Buffer`` (examples, labels), re-written for the comparison."""

    def __init__(self, size: int) -> None:
        self.size, self.seen = size, 0
        self.examples: torch.Tensor | None = None

    def is_empty(self) -> bool:
        return self.seen == 0

    def add_data(self, examples: torch.Tensor, labels: torch.Tensor) -> None:
        if self.examples is None:
            self.examples = torch.zeros((self.size, *examples.shape[1:]), dtype=examples.dtype)
            self.labels = torch.zeros(self.size, dtype=torch.int64)
        for i in range(examples.shape[0]):
            j = self.seen if self.seen < self.size else np.random.randint(0, self.seen + 1)
            self.seen += 1
            if j < self.size:
                self.examples[j] = examples[i]
                self.labels[j] = labels[i]

    def get_data(self, size: int, transform=None, device=None):
        n = min(self.seen, self.size)
        choice = np.random.choice(n, size=min(size, n), replace=False)
        x = self.examples[choice]
        if transform is not None:
            x = torch.stack([transform(e) for e in x])
        return x, self.labels[choice]


def _flip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[-1])


def mammoth_loop(buffer, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x_all = torch.rand(steps + warmup, 32, 1, 28, 28)
    y_all = torch.randint(0, 10, (steps + warmup, 32))
    t0 = 0.0
    for s in range(steps + warmup):
        if s == warmup:
            t0 = time.perf_counter()
        inputs, labels = x_all[s], y_all[s]
        opt.zero_grad()
        if not buffer.is_empty():
            bx, by = buffer.get_data(32, transform=_flip)
            inputs, labels = torch.cat([inputs, bx]), torch.cat([labels, by])
        F.cross_entropy(net(inputs), labels).backward()
        opt.step()
        buffer.add_data(examples=x_all[s], labels=y_all[s])
    return steps / (time.perf_counter() - t0)


def torchrl_loop(make_storage, steps: int, warmup: int) -> float:
    from tensordict import TensorDict
    from torchrl.data import RandomSampler, ReplayBuffer, RoundRobinWriter
    torch.manual_seed(0)
    rb = ReplayBuffer(storage=make_storage(), sampler=RandomSampler(), writer=RoundRobinWriter(), batch_size=256)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def transitions(n: int) -> TensorDict:
        return TensorDict({"obs": torch.randn(n, 64), "action": torch.randint(0, 4, (n,)),
                           "next": {"obs": torch.randn(n, 64), "reward": torch.randn(n)}}, batch_size=[n])

    rb.extend(transitions(1024))
    t0 = 0.0
    for s in range(steps + warmup):
        if s == warmup:
            t0 = time.perf_counter()
        rb.extend(transitions(32))
        batch = rb.sample()
        q = net(batch["obs"]).gather(1, batch["action"][:, None])[:, 0]
        target = batch["next", "reward"] + 0.99 * net(batch["next", "obs"]).max(1).values.detach()
        opt.zero_grad()
        F.mse_loss(q, target).backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def torchrl_calls(make_storage, calls: int) -> dict[str, float]:
    """Median microseconds of the storage calls behind the loop's ``sample`` and ``extend``, alone:
    ``get`` of 256 random positions (repeats and all, as ``RandomSampler`` draws them) and ``set``
    of 32 at the next positions, on a storage holding 30,000 transitions."""
    from tensordict import TensorDict
    gen = torch.Generator().manual_seed(0)

    def transitions(n: int) -> TensorDict:
        return TensorDict({"obs": torch.randn(n, 64, generator=gen), "action": torch.randint(0, 4, (n,), generator=gen),
                           "next": {"obs": torch.randn(n, 64, generator=gen), "reward": torch.randn(n, generator=gen)}},
                          batch_size=[n])

    storage = make_storage()
    for lo in range(0, 30_000, 1000):
        storage.set(torch.arange(lo, lo + 1000), transitions(1000))
    index = [torch.randint(0, 30_000, (256,), generator=gen) for _ in range(calls)]
    batches = [transitions(32) for _ in range(calls)]
    got, put = [], []
    for k in range(calls):
        t0 = time.perf_counter()
        storage.get(index[k])
        t1 = time.perf_counter()
        storage.set(torch.arange(30_000 + 32 * k, 30_000 + 32 * (k + 1)), batches[k])
        got.append(t1 - t0)
        put.append(time.perf_counter() - t1)
    if hasattr(storage, "close"):
        storage.close()
    return {"get_256_us": 1e6 * statistics.median(got), "set_32_us": 1e6 * statistics.median(put)}


def avalanche_loop(plugin, steps: int) -> float:
    import warnings

    from avalanche.benchmarks import nc_benchmark
    from avalanche.training import Naive
    from torch.utils.data import TensorDataset

    class Split(TensorDataset):
        def __init__(self, x, y):
            super().__init__(x, y)
            self.targets = y

    torch.manual_seed(0)
    n = steps * 32 // 2  # two experiences of steps / 2 mini-batches each
    x, y = torch.rand(n * 2, 1, 28, 28), torch.arange(n * 2) % 4
    bm = nc_benchmark(Split(x, y), Split(x[:64], y[:64]), n_experiences=2, task_labels=False, seed=0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 4))
    strategy = Naive(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, plugins=[plugin],
                     evaluator=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy.train(bm.train_stream[0], num_workers=0)  # the first experience: warm-up, no replay yet
        t0 = time.perf_counter()
        strategy.train(bm.train_stream[1], num_workers=0)
    return (len(bm.train_stream[1].dataset) / 32) / (time.perf_counter() - t0)


#: Samples swapped in during each carousel run, by row name: a "swapping" row that swapped nothing
#: would measure the RAM-only path, so the table reports the count beside the rate.
SWAPPED: dict[str, int] = {}


#: CPU seconds per named thread of this process during each carousel run, by row name: where the
#: background work goes (carousel's threads are named ``carousel-*``; torch's own are not).
THREAD_CPU: dict[str, dict[str, float]] = {}


def _thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each thread of this process, summed by thread name (Linux; else empty)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        fields = raw.rsplit(")", 1)[1].split()
        name = names.get(int(tid), raw.split("(", 1)[1].rsplit(")", 1)[0])
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def on_daemon(root: Path) -> CarouselBuffer:
    """``CarouselBuffer`` on a real ``carousel serve`` (:mod:`.served`) in ``root``: EM 500, an LMDB tier
    holding every sample, swapping from the first task, as the in-process row (whose tier, the buffer's
    own, is not synced: ``sync = false`` here too, else this row alone would pay an fsync per write
    batch). :func:`_closed_after` stops the daemon and reads its process's CPU."""
    toml = ('[memory]\nem_size = 500\nsample_shape = [1, 28, 28]\ndtype = "float32"\nseed = 0\n'
            f'[swap]\nstart_task = 0\n[[tiers]]\nkind = "lmdb"\npath = "{root / "tier"}"\ncapacity = 1000000\n'
            'sync = false\n')
    served = ServedDaemon(root, toml)
    buf = CarouselBuffer(500, memory=served.client)
    buf._bench_daemon = served
    return buf


def _closed_after(name: str, buf: Any, measure: Callable[[Any], float], loop_steps: int) -> float:
    """``measure(buf)``, the buffer closed afterwards when it can be (its swaps noted in
    :data:`SWAPPED`, its threads' CPU per loop step, warm-up included, in :data:`THREAD_CPU`, with a
    daemon's whole process as ``daemon process``)."""
    served = getattr(buf, "_bench_daemon", None)
    before, daemon_before = _thread_cpu(), _process_cpu(served.proc.pid) if served else 0.0
    rate = measure(buf)
    after, daemon_after = _thread_cpu(), _process_cpu(served.proc.pid) if served else 0.0
    if not isinstance(buf, ReservoirBuffer):
        THREAD_CPU[name] = {k: (v - before.get(k, 0.0)) / loop_steps for k, v in after.items()
                            if k.startswith("carousel-")}
        if served is not None:
            THREAD_CPU[name]["daemon process"] = (daemon_after - daemon_before) / loop_steps
    memory = getattr(buf, "memory", None)
    try:
        if callable(getattr(memory, "stats", None)):
            SWAPPED[name] = int(memory.stats().get("swapped_in", 0))
        if hasattr(buf, "close"):
            buf.close()
    finally:
        if served is not None:
            served.close()
    return rate


def _interleaved(loop: str, runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, dict]:
    """Each of ``runs`` (name -> one measured run, steps/s) once per round, in turns, so a drift in
    the machine's load hits them alike. One row per buffer: its median steps/s, and the median
    and range over rounds of its ratio to the first run's (the framework's own buffer) in the
    same round."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            rates[name].append(run())
    base = next(iter(rates.values()))
    rows = {}
    for name, got in rates.items():
        ratios = [r / b for r, b in zip(got, base)]
        rows[name] = {"loop": loop, "steps_per_s": statistics.median(got), "ratio": statistics.median(ratios),
                      "ratio_range": [min(ratios), max(ratios)], "rounds": len(got)}
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.integrations", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps (a smoke run)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3, help="turns of every buffer of a loop (medians reported)")
    p.add_argument("--out", default="bench-out/integrations")
    args = p.parse_args(argv)
    steps = 50 if args.quick else args.steps
    warmup = 10 if args.quick else 100
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rounds = 1 if args.quick else max(1, args.rounds)
    tmp = Path(tempfile.mkdtemp(prefix="carousel-bench-int-"))

    def fresh() -> Path:  # a new folder per run: a storage given an old one would reopen its data
        return Path(tempfile.mkdtemp(dir=tmp))

    rows: dict[str, dict[str, float]] = {}
    try:
        mam = {"Mammoth reservoir Buffer (re-written)": lambda: ReservoirBuffer(500),
               "CarouselBuffer, RAM only": lambda: CarouselBuffer(500),
               # One task: swapping from it on (the buffer's default waits for the second task, as CarM does).
               "CarouselBuffer + LMDB tier (swapping)": lambda: CarouselBuffer(
                   500, tiers=[{"kind": "lmdb", "capacity": 10**6}], swap={"start_task": 0}, root=fresh()),
               "CarouselBuffer on a daemon + LMDB tier (swapping)": lambda: on_daemon(fresh())}
        rows.update(_interleaved("mammoth-er", {
            name: lambda name=name, make=make: _closed_after(name, make(), lambda buf: mammoth_loop(buf, steps, warmup),
                                                             steps + warmup)
            for name, make in mam.items()}, rounds))
        if importlib.util.find_spec("torchrl") is None:
            print("torchrl not installed: TorchRL rows skipped (pip install 'carousel[torchrl]')")
        else:
            from torchrl.data import LazyMemmapStorage, LazyTensorStorage

            from carousel.integrations.torchrl import CarouselStorage
            trl = {"TorchRL LazyTensorStorage (RAM)": lambda: LazyTensorStorage(200_000),
                   "TorchRL LazyMemmapStorage (disk)": lambda: LazyMemmapStorage(200_000, scratch_dir=fresh()),
                   "CarouselStorage (LMDB tier)": lambda: CarouselStorage(200_000, fresh()),
                   "CarouselStorage (flat tier)": lambda: CarouselStorage(200_000, fresh(), kind="flat")}
            rows.update(_interleaved("torchrl-dqn", {name: lambda make=make: torchrl_loop(make, steps, warmup)
                                                     for name, make in trl.items()}, rounds))
            for name, make in trl.items():
                rows[name]["storage_calls"] = torchrl_calls(make, 50 if args.quick else 1000)
        if importlib.util.find_spec("avalanche") is None:
            print("avalanche-lib not installed: Avalanche rows skipped")
        else:
            from avalanche.training.plugins import ReplayPlugin

            from carousel.integrations.avalanche import CarouselReplayPlugin
            ava = {"Avalanche ReplayPlugin (ReservoirSamplingBuffer)": lambda: ReplayPlugin(mem_size=500),
                   "CarouselReplayPlugin, RAM only": lambda: CarouselReplayPlugin(500, root=fresh()),
                   "CarouselReplayPlugin + LMDB tier (swapping)": lambda: CarouselReplayPlugin(
                       500, tiers=[{"kind": "lmdb", "capacity": 10**6}], root=fresh())}
            rows.update(_interleaved("avalanche-naive", {
                name: lambda name=name, make=make: _closed_after(name, make(), lambda p: avalanche_loop(p, steps), steps)
                for name, make in ava.items()}, rounds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [f"Integrations, {steps} steps each, {rounds} round(s) in turns, medians "
             f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)", "",
             "| loop | buffer | steps/s | vs the framework's own (range over rounds) | swapped in |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        r["swapped_in"] = SWAPPED.get(name)
        swapped = "" if r["swapped_in"] is None else str(r["swapped_in"])
        lo, hi = r["ratio_range"]
        lines.append(f"| {r['loop']} | {name} | {r['steps_per_s']:.1f} | {r['ratio']:.2f} ({lo:.2f}-{hi:.2f}) | {swapped} |")
    calls = {name: r["storage_calls"] for name, r in rows.items() if "storage_calls" in r}
    if calls:
        lines += ["", "TorchRL's storage calls alone, median (30,000 transitions stored):", "",
                  "| storage | get of 256 random positions (us) | set of 32 (us) |", "|---|---|---|"]
        lines += [f"| {name} | {c['get_256_us']:.0f} | {c['set_32_us']:.0f} |" for name, c in calls.items()]
    busy = {name: cpu for name, cpu in THREAD_CPU.items() if cpu}
    if busy:
        lines += ["", "CPU per loop step of carousel's own threads (ms, warm-up included; not the trainer's thread):", ""]
        for name, cpu in busy.items():
            rows[name]["thread_cpu_ms_per_step"] = {k: v * 1e3 for k, v in cpu.items()}
            parts = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
            lines.append(f"- {name}: {parts}")
    return report.write(out, {"steps": steps, "rows": rows}, lines)


if __name__ == "__main__":
    main()
