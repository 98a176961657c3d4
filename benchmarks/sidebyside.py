"""``python -m benchmarks``: carousel side by side with what users would pick instead (TorchRL,
Avalanche) and with this machine's limits, in one run.

    python -m benchmarks --quick      # every code path, small sizes, ~1-2 min; CI runs it (asserts no timing)
    python -m benchmarks              # the full run (~15-25 min on 2 cores), figures for the README

1. **Replay sampling from RAM**: ``sample(256)`` of CIFAR-sized uint8 samples from EMs of 500
   and 5,000: carousel in-process, carousel through the daemon (shared-memory ring), TorchRL's
   ``ReplayBuffer`` with ``LazyTensorStorage`` and with ``LazyMemmapStorage`` (also with
   ``prefetch``), Avalanche's ``ReservoirSamplingBuffer`` read as its replay reads it (a shuffled
   ``DataLoader``), and the bare ``index_select`` limit (random index; and a distinct draw, as
   ``sample()`` returns), in samples/s and as ratios.
2. **Storage tiers**: random batches of 256 from 200,000 samples on disk: carousel's LMDB, Zarr
   and flat tiers (``get_many`` of random ids; ``get_chunk``, what the swap engine reads from a
   tier that prefers chunks) against TorchRL's
   ``LazyMemmapStorage`` and one ``os.pread`` per fixed-size record, warm and cold page cache.
3. **Training without stalls**: ER on a reduced ResNet-18 (``benchmarks.memory``'s loop) with
   RAM-only replay, carousel async, carousel sync, and TorchRL memmap replay: step-time ratios.
4. **Scaling**: ``sample(256)`` and ``add(32)`` cost against EM size (500 to 50,000), random tier
   reads and write-behind throughput against storage size (10^4 to 10^6 samples), and daemon
   ``sample(256)`` throughput against client processes (1, 2, 4).

Peers run in their own virtual environment, never the project's: ``--peers-python PATH`` (or
``CAROUSEL_PEERS_PYTHON``, or ``CAROUSEL_AVALANCHE_PYTHON`` where CI built one with both) names its
interpreter; otherwise ``--build-peers`` builds ``bench-out/peers-venv`` (torch 2.13 from the index,
torchvision, TorchRL 0.14 with tensordict, Avalanche 0.6). Without one, the peer rows say why they
are missing. Peer processes measure their own ``index_select`` reference, so no ratio mixes two
venvs' torch builds.

Writes ``results.json``, ``results.md`` and ``results.png`` into ``--out`` (default
``bench-out/sidebyside``). It asserts nothing about speed: a benchmark measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from carousel import CarouselMemory
from storage_backends import open_store

from . import memory as memory_bench
from . import report
from .peer_worker import BATCH, SHAPE, rates_interleaved
from .served import ServedDaemon
from .storage import FlatFile, drop_page_cache, list_files, make_dataset

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"x": (SHAPE, "uint8"), "y": ((), "int64"), "task": ((), "int16")}


@dataclass
class Sizes:
    """What one run measures: the full run's sizes, or the quick run's."""

    ems: tuple[int, ...] = (500, 5000)
    seconds: float = 1.0
    rounds: int = 5
    records: int = 200_000
    batches: int = 50
    repeat: int = 5
    cold_batches: int = 10
    train_stored: int = 50_000
    train_steps: int = 10
    train_rounds: int = 3
    scale_ems: tuple[int, ...] = (500, 5000, 50_000)
    scale_stored: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    clients: tuple[int, ...] = (1, 2, 4)
    client_seconds: float = 3.0
    persist_adds: int = 512  # add(32) calls timed until flushed: the write-behind's sustained rate

    @classmethod
    def quick(cls) -> Sizes:
        return cls(ems=(500,), seconds=0.2, rounds=1, records=5000, batches=5, repeat=1, cold_batches=2,
                   train_stored=2000, train_steps=2, train_rounds=1, scale_ems=(500, 2000),
                   scale_stored=(1000, 5000), clients=(1, 2), client_seconds=0.5, persist_adds=16)


def log(message: str) -> None:
    print(f"[benchmarks] {message}", file=sys.stderr, flush=True)


# ---- peers -------------------------------------------------------------------------------------------
def peers_python(explicit: str | None, build: bool, out: Path) -> tuple[str | None, str]:
    """The peers' interpreter and how it was found (or why there is none)."""
    for source, path in (("--peers-python", explicit), ("CAROUSEL_PEERS_PYTHON", os.environ.get("CAROUSEL_PEERS_PYTHON")),
                         ("CAROUSEL_AVALANCHE_PYTHON", os.environ.get("CAROUSEL_AVALANCHE_PYTHON"))):
        if path:
            if not Path(path).is_file():
                return None, f"{source} names {path}, which does not exist"
            return path, source
    venv = out.parent / "peers-venv"
    python = venv / "bin" / "python"
    if python.is_file():
        return str(python), f"{venv} (built earlier)"
    if not build:
        return None, "no peers' venv: pass --peers-python PATH or --build-peers"
    log(f"building the peers' venv in {venv} (torch 2.13 from the index, TorchRL, Avalanche: minutes)")
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
    env["PIP_CONFIG_FILE"] = os.devnull  # the index's torch, which the index's torchvision loads beside
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "torchvision==0.28.*",
                        "torchrl==0.14.*", "tensordict==0.14.*", "avalanche-lib==0.6.*", "-e", str(ROOT)],
                       check=True, env=env)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(venv, ignore_errors=True)
        return None, f"building the peers' venv failed: {exc}"
    return str(python), f"{venv} (built now)"


def run_peer(python: str | None, why: str, *args: str, timeout: float = 3600) -> dict:
    """One ``benchmarks.peer_worker`` command in the peers' venv; its JSON, or the reason it has none."""
    if python is None:
        return {"error": why}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PEER_TORCH_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([python, "-m", "benchmarks.peer_worker", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": f"peer worker {args[0]} failed (rc {proc.returncode}): {proc.stderr.strip()[-600:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- 1. replay sampling from RAM ---------------------------------------------------------------------
def _filled_memory(em: int) -> CarouselMemory:
    mem = CarouselMemory.from_dict({"memory": {"em_size": em, "sample_shape": list(SHAPE), "seed": 0}})
    g = torch.Generator().manual_seed(0)
    for lo in range(0, em, 1000):
        n = min(1000, em - lo)
        mem.add(torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g),
                torch.randint(0, 10, (n,), generator=g), task=0)
    return mem


class Daemon:
    """A real ``carousel serve`` subprocess with one RAM-only memory of ``em`` samples, and a client."""

    def __init__(self, em: int, workdir: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"daemon-{em}-", dir=workdir))
        self.sock_dir = Path(tempfile.mkdtemp(prefix="cb-"))  # short: AF_UNIX paths end at 108 bytes
        self.served = ServedDaemon(self.dir, f"[memory]\nem_size = {em}\nsample_shape = {list(SHAPE)}\nseed = 0\n",
                                   socket_dir=self.sock_dir)
        self.socket, self.client = self.served.socket, self.served.client
        g = torch.Generator().manual_seed(0)
        for lo in range(0, em, 500):
            n = min(500, em - lo)
            self.client.add(torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g),
                            torch.randint(0, 10, (n,), generator=g), task=0)

    def close(self) -> None:
        self.served.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def bench_ram(sizes: Sizes, python: str | None, why: str, workdir: Path) -> dict:
    out = {}
    for em in sizes.ems:
        log(f"1. RAM sampling, EM {em}")
        mem = _filled_memory(em)
        daemon = Daemon(em, workdir)
        pool = mem.pool.tensors
        g = torch.Generator().manual_seed(0)

        def bare() -> int:
            idx = torch.randint(0, em, (BATCH,), generator=g)
            pool["x"].index_select(0, idx), pool["y"].index_select(0, idx), pool["task"].index_select(0, idx)
            return BATCH

        def bare_distinct() -> int:
            idx = torch.randperm(em, generator=g)[:BATCH]
            pool["x"].index_select(0, idx), pool["y"].index_select(0, idx), pool["task"].index_select(0, idx)
            return BATCH

        variants: dict[str, Callable[[], int]] = {
            "index_select limit (random index)": bare,
            "index_select limit, distinct draw": bare_distinct,
            "carousel in-process": lambda: len(mem.sample(BATCH)),
            "carousel daemon (shared-memory ring)": lambda: len(daemon.client.sample(BATCH)),
        }
        try:
            ours = rates_interleaved(variants, sizes.seconds, sizes.rounds)
        finally:
            daemon.close()
            mem.close()
        peers = run_peer(python, why, "ram", "--em", str(em), "--seconds", str(sizes.seconds),
                         "--rounds", str(sizes.rounds))
        limit = ours["index_select limit (random index)"]["samples_per_s"]
        for v in ours.values():
            v["vs_limit"] = v["samples_per_s"] / limit
        if "variants" in peers:  # peers against their own venv's index_select
            peer_limit = peers["variants"]["torch index_select (peers' venv)"]["samples_per_s"]
            for v in peers["variants"].values():
                v["vs_limit"] = v["samples_per_s"] / peer_limit
        out[str(em)] = {"carousel": ours, "peers": peers}
    return out


# ---- 2. storage tiers --------------------------------------------------------------------------------
def _timed_reads(read: Callable[[], None], batches: int, repeat: int, cold: Callable[[], None] | None = None) -> float:
    """Samples/s of ``read`` (one batch of 256): the median over ``repeat`` medians of ``batches``
    timed calls; with ``cold``, called before each timed batch (the page cache dropped)."""
    meds = []
    for _ in range(repeat):
        times = []
        for _ in range(batches):
            if cold is not None:
                cold()
            t0 = time.perf_counter()
            read()
            times.append(time.perf_counter() - t0)
        meds.append(statistics.median(times))
    return BATCH / statistics.median(meds)


def bench_storage(sizes: Sizes, python: str | None, why: str, workdir: Path) -> dict:
    n = sizes.records
    log(f"2. storage tiers, {n:,} records")
    data = make_dataset(n, 0)
    rng = np.random.default_rng(1)
    results: dict[str, dict] = {}
    flat = FlatFile(workdir / "flat.bin", data)
    specs = {"carousel LMDB tier": f"lmdb://{workdir}/lmdb?sync=0",
             "carousel Zarr tier (chunk 64)": f"zarr://{workdir}/zarr?chunk=64&codec=none&sync=0",
             "carousel flat tier": f"flat://{workdir}/flat-tier?sync=0"}
    try:
        for name, url in specs.items():
            store = open_store(url, SCHEMA)
            for lo in range(0, n, 8192):
                hi = min(n, lo + 8192)
                store.put_many(np.arange(lo, hi), data.fields(lo, hi))
            store.flush()
            files = list_files(Path(url.split("://", 1)[1].split("?")[0]))
            chunk_rows = store.chunk_rows
            chunks = max(1, -(-BATCH // chunk_rows))
            for lo in range(0, n, 4096):  # one full pass: warm
                store.get_many(np.arange(lo, min(n, lo + 4096)))

            def random_ids(store) -> None:
                store.get_many(rng.integers(0, n, BATCH))

            def random_chunks(store, chunks=chunks) -> None:
                for index in rng.integers(0, store.num_chunks(), chunks):
                    store.get_chunk(int(index))

            entry = {"warm_samples_per_s": _timed_reads(lambda: random_ids(store), sizes.batches, sizes.repeat),
                     "warm_chunk_samples_per_s": _timed_reads(lambda: random_chunks(store), sizes.batches, sizes.repeat)}
            store.close()
            # Cold: closed (LMDB reads through mmap, and fadvise keeps pages a process maps),
            # dropped, reopened, then one timed batch.
            cold_times, cold_chunk_times = [], []
            for _ in range(sizes.cold_batches):
                for sink, read in ((cold_times, random_ids), (cold_chunk_times, random_chunks)):
                    drop_page_cache(files)
                    store = open_store(url)
                    t0 = time.perf_counter()
                    read(store)
                    sink.append(time.perf_counter() - t0)
                    store.close()
            entry["cold_samples_per_s"] = BATCH / statistics.median(cold_times)
            entry["cold_chunk_samples_per_s"] = BATCH / statistics.median(cold_chunk_times)
            entry["chunk_rows"] = chunk_rows
            results[name] = entry
        flat.read_all()
        results["os.pread per record (flat file)"] = {
            "warm_samples_per_s": _timed_reads(lambda: flat.read_records(rng.integers(0, n, BATCH)),
                                               sizes.batches, sizes.repeat),
            "cold_samples_per_s": _timed_reads(lambda: flat.read_records(rng.integers(0, n, BATCH)),
                                               sizes.cold_batches, 1, cold=flat.drop_cache)}
    finally:
        flat.close()
        for path in ("lmdb", "zarr", "flat-tier", "flat.bin"):
            p = workdir / path
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    peer_dir = workdir / "memmap"
    results["TorchRL LazyMemmapStorage"] = run_peer(
        python, why, "storage", "--records", str(n), "--dir", str(peer_dir), "--batches", str(sizes.batches),
        "--repeat", str(sizes.repeat), "--cold-batches", str(sizes.cold_batches))
    shutil.rmtree(peer_dir, ignore_errors=True)
    memmap = results["TorchRL LazyMemmapStorage"]
    for entry in results.values():
        if "warm_samples_per_s" in entry and "warm_samples_per_s" in memmap:
            entry["warm_vs_memmap"] = entry["warm_samples_per_s"] / memmap["warm_samples_per_s"]
            entry["cold_vs_memmap"] = entry["cold_samples_per_s"] / memmap["cold_samples_per_s"]
    return {"records": n, "stores": results}


# ---- 3. training without stalls ----------------------------------------------------------------------
def bench_training(sizes: Sizes, python: str | None, why: str, workdir: Path) -> dict:
    log(f"3. training, {sizes.train_stored:,} stored samples")
    ours = memory_bench.bench_training(sizes.train_stored, sizes.train_steps, sizes.train_rounds, workdir / "train")
    shutil.rmtree(workdir / "train", ignore_errors=True)
    peer = run_peer(python, why, "train", "--stored", str(sizes.train_stored), "--steps", str(sizes.train_steps),
                    "--rounds", str(sizes.train_rounds))
    return {"carousel": ours, "torchrl_memmap": peer}


# ---- 4. scaling --------------------------------------------------------------------------------------
def _per_call(fn: Callable[[], object], seconds: float) -> float:
    """Median seconds per call of ``fn`` over ``seconds`` of back-to-back calls."""
    times = []
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 > end:
            return statistics.median(times)


_CLIENT = """
import sys, time, carousel
client = carousel.connect(sys.argv[1], reconnect_s=30)
client.sample(256)
end = time.perf_counter() + float(sys.argv[2]); n = 0; t0 = time.perf_counter()
while time.perf_counter() < end:
    n += len(client.sample(256))
print(n / (time.perf_counter() - t0)); client.close()
"""


def bench_scaling(sizes: Sizes, workdir: Path) -> dict:
    out: dict[str, dict] = {"em": {}, "stored": {}, "clients": {}}
    g = torch.Generator().manual_seed(3)
    x32 = torch.randint(0, 256, (32, *SHAPE), dtype=torch.uint8, generator=g)
    y32 = torch.randint(0, 10, (32,), generator=g)
    for em in sizes.scale_ems:
        log(f"4. scaling: EM {em:,}")
        mem = _filled_memory(em)
        out["em"][str(em)] = {"sample_256_us": _per_call(lambda: mem.sample(BATCH), sizes.seconds) * 1e6,
                              "add_32_us": _per_call(lambda: mem.add(x32, y32, task=1), sizes.seconds) * 1e6}
        mem.close()
    data = make_dataset(10_000, 5)
    for stored in sizes.scale_stored:
        log(f"4. scaling: {stored:,} samples on the LMDB tier")
        path = workdir / f"scale-{stored}"
        store = open_store(f"lmdb://{path}?sync=0", SCHEMA)
        t0 = time.perf_counter()
        for lo in range(0, stored, 8192):
            hi = min(stored, lo + 8192)
            rows = np.arange(lo, hi) % len(data)
            store.put_many(np.arange(lo, hi), {k: v[rows] for k, v in data.fields(0, len(data)).items()})
        store.flush()
        put_rate = stored / (time.perf_counter() - t0)
        rng = np.random.default_rng(0)
        read = _per_call(lambda: store.get_many(rng.integers(0, stored, BATCH)), sizes.seconds)
        store.close()
        # add() into a memory whose tier already holds `stored`: the call (admission + queueing)
        # and the write-behind drain (flush) per sample.
        mem = CarouselMemory.from_dict({"memory": {"em_size": 500, "sample_shape": list(SHAPE), "seed": 0},
                                        "tiers": [{"kind": "lmdb", "path": str(path), "capacity": 10**7, "sync": False}]})
        add = _per_call(lambda: mem.add(x32, y32, task=1), sizes.seconds)
        mem.flush()
        t0 = time.perf_counter()
        for _ in range(sizes.persist_adds):
            mem.add(x32, y32, task=1)
        mem.flush()
        drain = sizes.persist_adds * 32 / (time.perf_counter() - t0)
        mem.close()
        shutil.rmtree(path, ignore_errors=True)
        out["stored"][str(stored)] = {"put_many_samples_per_s": put_rate, "random_get_256_us": read * 1e6,
                                      "add_32_us": add * 1e6, "add_and_persist_samples_per_s": drain}
    daemon = Daemon(max(sizes.ems), workdir)
    try:
        for k in sizes.clients:
            log(f"4. scaling: {k} client process(es) sampling through one daemon")
            procs = [subprocess.Popen([sys.executable, "-c", _CLIENT, daemon.socket, str(sizes.client_seconds)],
                                      stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(k)]
            rates = [float(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
            out["clients"][str(k)] = {"samples_per_s_total": sum(rates), "per_client": rates}
    finally:
        daemon.close()
    return out


# ---- report ------------------------------------------------------------------------------------------
def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:,.0f}"


def markdown(results: dict) -> list[str]:
    lines = ["## 1. Replay sampling from RAM: `sample(256)`, CIFAR-sized uint8", "",
             "| EM | replay memory | samples/s | vs index_select limit |", "|---|---|---|---|"]
    for em, r in results["ram"].items():
        for name, v in r["carousel"].items():
            lines.append(f"| {int(em):,} | {name} | {_fmt(v['samples_per_s'])} | {v['vs_limit']:.2f} |")
        if "variants" in r["peers"]:
            for name, v in r["peers"]["variants"].items():
                lines.append(f"| {int(em):,} | {name} | {_fmt(v['samples_per_s'])} | {v['vs_limit']:.2f} (own venv) |")
        for peer, err in {**r["peers"].get("errors", {}), **({"peers": r["peers"]["error"]} if "error" in r["peers"] else {})}.items():
            lines.append(f"| {int(em):,} | {peer}: not measured ({err[:120]}) | | |")
    st = results["storage"]
    lines += ["", f"## 2. Storage tiers: random batches of 256 from {st['records']:,} samples on disk", "",
              "| store | read | warm samples/s | cold samples/s | warm vs memmap | cold vs memmap |", "|---|---|---|---|---|---|"]
    for name, v in st["stores"].items():
        if "error" in v:
            lines.append(f"| {name} | not measured: {v['error'][:160]} | | | | |")
            continue
        lines.append(f"| {name} | random ids | {_fmt(v['warm_samples_per_s'])} | {_fmt(v['cold_samples_per_s'])} | "
                     f"{v.get('warm_vs_memmap', float('nan')):.2f} | {v.get('cold_vs_memmap', float('nan')):.2f} |")
        if "warm_chunk_samples_per_s" in v:
            lines.append(f"| {name} | random chunks of {v['chunk_rows']} (the swap engine's read) | "
                         f"{_fmt(v['warm_chunk_samples_per_s'])} | {_fmt(v['cold_chunk_samples_per_s'])} | | |")
    tr = results["training"]
    c = tr["carousel"]
    lines += ["", f"## 3. Training without stalls: ER step, reduced ResNet-18, {c['stored']:,} samples stored", "",
              "| replay | median step | vs RAM-only |", "|---|---|---|",
              f"| RAM-only (carousel EM 500) | {c['step_s']['RAM-only'] * 1e3:.1f} ms | 1 |",
              f"| carousel async (LMDB tier) | {c['step_s']['carousel async'] * 1e3:.1f} ms | {c['async_ratio']:.3f} |",
              f"| carousel sync (LMDB tier) | {c['step_s']['carousel sync'] * 1e3:.1f} ms | {c['sync_ratio']:.3f} |"]
    p = tr["torchrl_memmap"]
    if "error" in p:
        lines.append(f"| TorchRL memmap replay: not measured ({p['error'][:160]}) | | |")
    else:
        lines.append(f"| TorchRL LazyMemmapStorage replay (own venv; its RAM-only loop "
                     f"{p['step_s']['RAM-only (500 samples, index_select)'] * 1e3:.1f} ms) | "
                     f"{p['step_s']['TorchRL LazyMemmapStorage replay'] * 1e3:.1f} ms | {p['ratio']:.3f} |")
    sc = results["scaling"]
    lines += ["", "## 4. Scaling", "", "| EM size | `sample(256)` | `add(32)` |", "|---|---|---|"]
    lines += [f"| {int(k):,} | {v['sample_256_us']:.0f} us | {v['add_32_us']:.0f} us |" for k, v in sc["em"].items()]
    lines += ["", "| samples on the LMDB tier | ingest (`put_many`) samples/s | random `get_many(256)` | `add(32)` call | "
              "add + persist samples/s |", "|---|---|---|---|---|"]
    lines += [f"| {int(k):,} | {_fmt(v['put_many_samples_per_s'])} | {v['random_get_256_us']:.0f} us | "
              f"{v['add_32_us']:.0f} us | {_fmt(v['add_and_persist_samples_per_s'])} |" for k, v in sc["stored"].items()]
    lines += ["", "| client processes on one daemon | `sample(256)` samples/s, all clients | per client |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(v['samples_per_s_total'])} | {', '.join(_fmt(r) for r in v['per_client'])} |"
              for k, v in sc["clients"].items()]
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Panel 1 carries long labels: give it the room, and say each row's memory in few words.
    fig, axes = plt.subplots(1, 3, figsize=(19, 6), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    ax = axes[0]
    labels, values = [], []
    short = (("TorchRL ReplayBuffer, ", "TorchRL "), ("ReservoirSamplingBuffer, DataLoader access", "reservoir"),
             ("(shared-memory ring)", "(ring)"), ("index_select limit", "limit"))
    for em, r in results["ram"].items():
        rows = list(r["carousel"].items()) + list(r["peers"].get("variants", {}).items())
        for name, v in rows:
            for long, brief in short:
                name = name.replace(long, brief)
            labels.append(f"EM {int(em):,}: {name}")
            values.append(v["samples_per_s"])
    ax.barh(labels, values)
    ax.set_xscale("log")
    ax.set_xlabel("samples/s (log)")
    ax.set_title("1. sample(256) from RAM")
    ax.tick_params(axis="y", labelsize=7)
    ax = axes[1]
    names, warm, cold = [], [], []
    for name, v in results["storage"]["stores"].items():
        if "warm_samples_per_s" in v:
            names.append(name)
            warm.append(v["warm_samples_per_s"])
            cold.append(v["cold_samples_per_s"])
    pos = np.arange(len(names))
    ax.barh(pos - 0.2, warm, 0.4, label="warm")
    ax.barh(pos + 0.2, cold, 0.4, label="cold")
    ax.set_yticks(pos, names, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("samples/s (log), random ids")
    ax.set_title(f"2. random reads, {results['storage']['records']:,} on disk")
    ax.legend()
    ax = axes[2]
    em = results["scaling"]["em"]
    ax.plot([int(k) for k in em], [v["sample_256_us"] for v in em.values()], "o-", label="sample(256) vs EM size")
    ax.plot([int(k) for k in em], [v["add_32_us"] for v in em.values()], "s-", label="add(32) vs EM size")
    st = results["scaling"]["stored"]
    ax.plot([int(k) for k in st], [v["random_get_256_us"] for v in st.values()], "^-", label="tier get_many(256) vs stored")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("EM size / samples stored")
    ax.set_ylabel("us per call")
    ax.set_title("4. scaling")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, every code path (CI)")
    p.add_argument("--out", default="bench-out/sidebyside")
    p.add_argument("--peers-python", help="the peers' venv interpreter (TorchRL, tensordict, Avalanche)")
    p.add_argument("--build-peers", action="store_true", help="build bench-out/peers-venv if no peers' venv is given")
    p.add_argument("--only", default="ram,storage,training,scaling",
                   help="comma-separated parts to run (results.md and the figure need all four)")
    args = p.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    python, why = peers_python(args.peers_python, args.build_peers, out)
    log(f"peers: {python or 'none'} ({why})")
    parts = set(args.only.split(","))
    results: dict = {"quick": args.quick, "peers_python": python, "peers_found_by": why,
                     "machine": report.machine(), "peer_versions": run_peer(python, why, "versions")}
    with report.scratch(out, prefix="work-") as workdir:
        if "ram" in parts:
            results["ram"] = bench_ram(sizes, python, why, workdir)
        if "storage" in parts:
            results["storage"] = bench_storage(sizes, python, why, workdir)
        if "training" in parts:
            results["training"] = bench_training(sizes, python, why, workdir)
        if "scaling" in parts:
            results["scaling"] = bench_scaling(sizes, workdir)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if parts >= {"ram", "storage", "training", "scaling"}:
        lines = markdown(results)
        (out / "results.md").write_text("\n".join(lines) + "\n")
        plot(results, out / "results.png")
        print("\n".join(lines))
        log(f"wrote {out}/results.json, results.md and results.png")
    else:  # the tables and the figure need every part
        log(f"wrote {out}/results.json (parts: {', '.join(sorted(parts))})")
    return results


if __name__ == "__main__":
    main()
