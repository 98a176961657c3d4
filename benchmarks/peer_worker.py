"""The peers' side of ``python -m benchmarks``: runs inside the peers' own virtual environment
(TorchRL with tensordict, Avalanche), never in the project's, and prints one JSON object.

    PEER_PYTHON -m benchmarks.peer_worker ram --em 500 --seconds 1 --rounds 3
    PEER_PYTHON -m benchmarks.peer_worker storage --records 200000 --dir DIR --batches 50 --cold-batches 10
    PEER_PYTHON -m benchmarks.peer_worker train --stored 50000 --steps 20 --rounds 3

It imports no carousel module (only ``trainers.models`` for the training loop's network), so a
peers' venv needs torch, numpy, the peers and this source tree on ``sys.path``. Each command also
measures its own reference in this process (``index_select`` from RAM, a RAM-only training loop),
so the ratios it reports do not mix two venvs' torch builds.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SHAPE = (3, 32, 32)
BATCH = 256


def _records(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CIFAR-sized uint8 samples with int64 labels and int16 task ids, as the project's side uses."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g), torch.zeros(n, dtype=torch.int16))


def rates_interleaved(variants: dict[str, Callable[[], int]], seconds: float, rounds: int) -> dict[str, dict]:
    """Samples/s of each variant: they take turns, ``seconds`` each per round, so drift in machine
    load hits all alike; the figure is the median over rounds."""
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up: allocators, lazy storages, worker threads
        for _ in range(20):
            fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            n = 0
            t0 = time.perf_counter()
            end = t0 + seconds
            while True:
                n += fn()
                t1 = time.perf_counter()
                if t1 >= end:
                    break
            per_round[name].append(n / (t1 - t0))
    return {k: {"samples_per_s": statistics.median(v), "per_round": v} for k, v in per_round.items()}


def _avalanche_buffer(x: torch.Tensor, y: torch.Tensor, size: int):
    """Avalanche's ``ReservoirSamplingBuffer`` filled from one experience of ``(x, y)``."""
    warnings.filterwarnings("ignore")
    from avalanche.benchmarks import nc_benchmark
    from avalanche.training.storage_policy import ReservoirSamplingBuffer
    from torch.utils.data import TensorDataset

    class Data(TensorDataset):
        def __init__(self, x, y):
            super().__init__(x, y)
            self.targets = y.tolist()

    data = Data(x, y)
    bench = nc_benchmark(data, data, n_experiences=1, task_labels=False, seed=0)
    buffer = ReservoirSamplingBuffer(size)
    buffer.update_from_dataset(bench.train_stream[0].dataset)
    return buffer


def cmd_ram(args: argparse.Namespace) -> dict:
    """``sample(256)`` from an in-RAM buffer of ``--em`` samples, per peer, beside ``index_select``."""
    x, y, t = _records(args.em, 0)
    variants: dict[str, Callable[[], int]] = {}
    errors: dict[str, str] = {}
    g = torch.Generator().manual_seed(0)

    def bare() -> int:
        idx = torch.randint(0, args.em, (BATCH,), generator=g)
        x.index_select(0, idx), y.index_select(0, idx), t.index_select(0, idx)
        return BATCH

    variants["torch index_select (peers' venv)"] = bare
    tmp = tempfile.TemporaryDirectory(prefix="peer-ram-")
    try:
        from tensordict import TensorDict
        from torchrl.data import LazyMemmapStorage, LazyTensorStorage, ReplayBuffer

        data = TensorDict({"x": x, "y": y, "task": t}, batch_size=[args.em])

        def rb_of(storage, **kw):
            rb = ReplayBuffer(storage=storage, batch_size=BATCH, **kw)
            rb.extend(data)
            return lambda: rb.sample().batch_size[0]

        variants["TorchRL ReplayBuffer, LazyTensorStorage"] = rb_of(LazyTensorStorage(args.em))
        variants["TorchRL ReplayBuffer, LazyMemmapStorage"] = rb_of(
            LazyMemmapStorage(args.em, scratch_dir=os.path.join(tmp.name, "a")))
        variants["TorchRL ReplayBuffer, LazyMemmapStorage, prefetch=4"] = rb_of(
            LazyMemmapStorage(args.em, scratch_dir=os.path.join(tmp.name, "b")), prefetch=4)
    except Exception as exc:  # noqa: BLE001 -- a peer that cannot run is reported, the others still run
        errors["torchrl"] = f"{type(exc).__name__}: {exc}"
    try:
        buffer = _avalanche_buffer(x, y, args.em)
        # How Avalanche's replay reads its buffer: a shuffled DataLoader over the buffer dataset
        # (ReplayDataLoader does the same per mini-batch), each item through its transforms.
        loader = torch.utils.data.DataLoader(buffer.buffer, batch_size=BATCH, shuffle=True, num_workers=0)
        state = {"it": iter(loader)}

        def avalanche_draw() -> int:
            try:
                batch = next(state["it"])
            except StopIteration:
                state["it"] = iter(loader)
                batch = next(state["it"])
            return int(batch[0].shape[0])

        variants["Avalanche ReservoirSamplingBuffer, DataLoader access"] = avalanche_draw
    except Exception as exc:  # noqa: BLE001 -- as above
        errors["avalanche"] = f"{type(exc).__name__}: {exc}"
    try:
        out = rates_interleaved(variants, args.seconds, args.rounds)
    finally:
        tmp.cleanup()
    return {"em": args.em, "batch": BATCH, "variants": out, "errors": errors}


# ---- storage: TorchRL's memory-mapped storage, random batches, warm and cold -------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _drop_mapped(tensors: list[torch.Tensor], files: list[str]) -> None:
    """Evict a memory-mapped storage from the page cache: unmap its pages from this process
    (``madvise(DONTNEED)``: a shared file mapping keeps its data in the file) and then drop the
    files' cached pages (``posix_fadvise(DONTNEED)``, which skips pages a process still maps)."""
    for tensor in tensors:
        start = tensor.data_ptr() & ~(_PAGE - 1)
        length = tensor.data_ptr() + tensor.numel() * tensor.element_size() - start
        if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cmd_storage(args: argparse.Namespace) -> dict:
    """Random batches of 256 from ``LazyMemmapStorage`` holding ``--records`` samples on disk."""
    from tensordict import TensorDict
    from torchrl.data import LazyMemmapStorage

    storage = LazyMemmapStorage(args.records, scratch_dir=args.dir)
    t0 = time.perf_counter()
    for lo in range(0, args.records, 10_000):
        x, y, t = _records(min(10_000, args.records - lo), lo)
        storage.set(torch.arange(lo, lo + x.shape[0]), TensorDict({"x": x, "y": y, "task": t}, batch_size=[x.shape[0]]))
    ingest_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    mapped = [storage._storage.get(k) for k in ("x", "y", "task")]  # the MemoryMappedTensors
    files = [str(p) for p in Path(args.dir).rglob("*") if p.is_file()]

    def read() -> float:
        idx = torch.from_numpy(rng.integers(0, args.records, BATCH))
        t0 = time.perf_counter()
        td = storage.get(idx)
        # Materialize each field as a plain tensor: what a training step consumes.
        _ = (td["x"].contiguous(), td["y"].contiguous(), td["task"].contiguous())
        return time.perf_counter() - t0

    for _ in range(args.records // BATCH + 1):  # one full pass: warm cache
        read()
    warm = [BATCH / statistics.median([read() for _ in range(args.batches)]) for _ in range(args.repeat)]
    cold_times = []
    for _ in range(args.cold_batches):
        _drop_mapped(mapped, files)
        cold_times.append(read())
    return {"records": args.records, "ingest_samples_per_s": args.records / ingest_s,
            "bytes_on_disk": sum(os.path.getsize(f) for f in files),
            "warm_samples_per_s": statistics.median(warm), "warm_per_repeat": warm,
            "cold_samples_per_s": BATCH / statistics.median(cold_times)}


def cmd_train(args: argparse.Namespace) -> dict:
    """The ER loop of ``benchmarks.memory`` with TorchRL's memmap replay of ``--stored`` samples,
    beside the same loop replaying from a 500-sample buffer in RAM; step-time ratio between them."""
    import torch.nn.functional as F
    from tensordict import TensorDict
    from torchrl.data import LazyMemmapStorage, ReplayBuffer

    from trainers.models import reduced_resnet18

    tmp = tempfile.TemporaryDirectory(prefix="peer-train-")
    rb = ReplayBuffer(storage=LazyMemmapStorage(args.stored + 10**5, scratch_dir=tmp.name), batch_size=32)
    for lo in range(0, args.stored, 10_000):
        x, y, t = _records(min(10_000, args.stored - lo), lo)
        rb.extend(TensorDict({"x": x, "y": y, "task": t}, batch_size=[x.shape[0]]))
    ram_x, ram_y, _ = _records(500, 77)
    g = torch.Generator().manual_seed(0)

    def ram_replay(x, y):
        idx = torch.randperm(500, generator=g)[:32]
        return ram_x.index_select(0, idx), ram_y.index_select(0, idx)

    def memmap_replay(x, y):
        rb.extend(TensorDict({"x": x, "y": y, "task": torch.ones(32, dtype=torch.int16)}, batch_size=[32]))
        td = rb.sample()
        return td["x"], td["y"]

    runs = {"RAM-only (500 samples, index_select)": ram_replay, "TorchRL LazyMemmapStorage replay": memmap_replay}
    models = {}
    for name in runs:
        torch.manual_seed(0)
        model = reduced_resnet18(10)
        models[name] = (model, torch.optim.SGD(model.parameters(), lr=0.03))
    times: dict[str, list[float]] = {k: [] for k in runs}
    step = 0
    for r in range(args.rounds + 1):
        for name, replay in runs.items():
            model, opt = models[name]
            for _ in range(args.steps):
                x, y, _ = _records(32, 10**7 + step)
                step += 1
                t0 = time.perf_counter()
                rx, ry = replay(x, y)
                logits = model(torch.cat([x, rx]).float().div_(255))
                loss = F.cross_entropy(logits, torch.cat([y, ry]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
    tmp.cleanup()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"stored": args.stored, "step_s": med,
            "ratio": med["TorchRL LazyMemmapStorage replay"] / med["RAM-only (500 samples, index_select)"]}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchrl", "tensordict", "avalanche"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 -- a peer that fails to import is reported, not fatal
            out[name] = f"unavailable: {type(exc).__name__}: {exc}"
    return out


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_worker")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ram")
    r.add_argument("--em", type=int, default=500)
    r.add_argument("--seconds", type=float, default=1.0)
    r.add_argument("--rounds", type=int, default=3)
    s = sub.add_parser("storage")
    s.add_argument("--records", type=int, default=200_000)
    s.add_argument("--dir", required=True)
    s.add_argument("--batches", type=int, default=50)
    s.add_argument("--repeat", type=int, default=5)
    s.add_argument("--cold-batches", type=int, default=10)
    t = sub.add_parser("train")
    t.add_argument("--stored", type=int, default=50_000)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--rounds", type=int, default=3)
    sub.add_parser("versions")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("PEER_TORCH_THREADS", torch.get_num_threads())))
    result = {"ram": cmd_ram, "storage": cmd_storage, "train": cmd_train, "versions": lambda a: {}}[args.cmd](args)
    result["versions"] = versions()
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
