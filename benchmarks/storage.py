"""Benchmark of ``storage_backends``: how fast the LMDB, Zarr, flat and files stores ingest and read,
each read set beside the plainest fast way to do the same read.

Records are CIFAR-sized (``x`` uint8 (3, 32, 32), ``y`` int64, ``task`` int16; random content;
ids 0..N-1, ingested in order). Measured:

- ingest: ``put_many`` of ``--batch`` records at a time into LMDB (sync=1, sync=0) and Zarr
  (codec=none sync=1 and sync=0, codec=zstd, and each ``--zarr-chunks`` size) and flat (sync=1,
  sync=0) and files (sync=1, sync=0), in samples/s, and the bytes on disk per record (``store.nbytes``);
- random reads: ``get_many`` of random batches of ids out of all stored;
- chunk-granular reads: ``get_chunk`` at random chunk indexes and an ``iter_chunks`` scan from the
  first chunk, ``ceil(batch / chunk_rows)`` chunks per timed batch;
- the files store's random ``get_many`` with 32 reads in flight against one at a time
  (``inflight=32`` vs ``inflight=1``: two read-only handles on the same files, taking turns repeat
  by repeat), warm and cold (below), with the most reads each had in flight;
- references: a numpy gather from RAM; one ``os.pread`` per record of a flat file of fixed-size
  packed records (3072 + 8 + 2 bytes), joined and split into arrays; one ``os.pread`` per chunk of
  the same file, at random chunk indexes and in order (the references of the chunk reads).
  The warm per-record pread is measured again right before each store's warm reads and at the
  end: a store's warm ratio uses the one next to it, and their spread shows how steady the
  machine was (other processes running move these figures by tens of percent on 2 cores).

Each read is measured warm (after one full pass over the store) and cold. Cold: before each cold
batch (before each cold repeat for the scans) the store is flushed and the page cache of every
file under it is dropped with ``os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)``; an LMDB or
flat store is also closed before and reopened after the drop, because fadvise keeps pages that a
process maps, and both read through mmap. ``mincore`` then checks how much of each store is still cached.
``/proc/sys/vm/drop_caches`` is not used, except for the files store's cold reads with
``--files-cold drop_caches`` (root only): ``sync`` then ``3`` into it before each batch, which also
drops the directory entries and inodes, as for files the machine has not seen for a while; the
default, ``fadvise``, drops the data pages of every file the cold batches read (metadata stays
cached, as on a local disk in use).

A figure is the median over ``--repeat`` repeats, each ``--batches`` (cold: ``--cold-batches``)
batches timed one by one with ``time.perf_counter`` after untimed warm-up calls (2; 1 with
``--quick``); a slow figure starts no repeat after ``--figure-budget-s``. The issue's
targets are printed as PASS/FAIL lines: a benchmark measures, it does not fail on speed.

Run from the project root::

    .venv/bin/python -m benchmarks.storage --quick     # 5,000 records, every code path, < 30 s
    .venv/bin/python -m benchmarks.storage             # 200,000 records, 3-5 min on 2 cores
    .venv/bin/python -m benchmarks.storage --records 50000 --repeat 7 --zarr-chunks 8,32 --keep
    .venv/bin/python -m benchmarks.storage --quick --only files --files-cold drop_caches

Output: machine facts, progress (stderr) and the table on stdout; ``results.json`` (every figure,
with per-repeat rates) and ``results.md`` in ``--out`` (default ``bench-out/`` in the project).
The stores live in a temporary work dir under ``--out``, deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import math
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lmdb
import numcodecs
import numpy as np
import zarr

from storage_backends import open_store
from storage_backends.base import SampleStore

SCHEMA = {"x": ((3, 32, 32), "uint8"), "y": ((), "int64"), "task": ((), "int16")}
X_NBYTES = 3 * 32 * 32
RECORD_NBYTES = X_NBYTES + 8 + 2  # one packed record of the flat reference file: x, y, task
PROJECT_ROOT = Path(__file__).resolve().parents[1]

RAM = "RAM (numpy)"
PREAD = "flat file (os.pread)"
PREAD_RECORDS = "pread per record, random"
PREAD_RECORDS_AT_END = "pread per record, random (end)"  # did the machine's speed drift?
DROP_METHOD = ("os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) on every file of the store after flush(); "
               "LMDB and flat stores closed before the drop and reopened after it (fadvise keeps mapped pages); "
               "residency checked with mincore; /proc/sys/vm/drop_caches not used")


# ---- settings ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    records: int
    batch: int
    repeat: int
    batches: int  # timed batches per warm repeat
    cold_batches: int  # timed batches per cold repeat (each after a cache drop)
    warmup: int  # untimed calls before a figure
    figure_budget_s: float  # no further repeat of a figure starts after this long (slow cold paths)
    zarr_chunks: tuple[int, ...]  # Zarr chunk sizes (rows) read besides the store's default
    out: Path
    keep: bool
    seed: int
    quick: bool
    only: tuple[str, ...] = ()  # store kinds (URL schemes) measured; () = all
    files_cold: str = "fadvise"  # how the files store's cold batches are made cold: fadvise or drop_caches


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m benchmarks.storage", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=None, help="records per store (default 200000; --quick: 5000)")
    p.add_argument("--batch", type=int, default=256, help="records per put_many/get_many call (default 256)")
    p.add_argument("--repeat", type=int, default=None, help="repeats per figure; the figure is their median (5)")
    p.add_argument("--batches", type=int, default=None, help="timed batches per warm repeat (default 20)")
    p.add_argument("--cold-batches", type=int, default=None, help="timed batches per cold repeat (default 4)")
    p.add_argument("--figure-budget-s", type=float, default=30.0,
                   help="start no further repeat of a figure after this many seconds (default 30)")
    p.add_argument("--zarr-chunks", default="8,16,64",
                   help="Zarr chunk sizes in rows to read besides ZarrStore's default chunk, comma-separated "
                        "(default 8,16,64; the default chunk itself is always measured)")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench-out",
                   help="where results.json/results.md and the work dir go (default: bench-out/ in the project)")
    p.add_argument("--keep", action="store_true", help="keep the work dir with the stores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes: every code path in < 30 s")
    p.add_argument("--only", default="", help="measure only these store kinds, comma-separated (lmdb,zarr,flat,files; "
                                              "the LMDB and Zarr targets then read as FAIL: not measured)")
    p.add_argument("--files-cold", choices=("fadvise", "drop_caches"), default="fadvise",
                   help="files store, cold reads: posix_fadvise(DONTNEED) on the files read (default), or "
                        "sync + 3 > /proc/sys/vm/drop_caches before each batch (root only: drops metadata too)")
    a = p.parse_args(argv)
    quick = a.quick

    def pick(value: int | None, full: int, small: int) -> int:
        return value if value is not None else (small if quick else full)

    try:
        chunks = tuple(sorted({int(c) for c in a.zarr_chunks.split(",") if c.strip()}))
    except ValueError:
        p.error(f"--zarr-chunks {a.zarr_chunks!r}: expected integers separated by commas, e.g. 8,64")
    settings = Settings(
        records=pick(a.records, 200_000, 5_000),
        batch=a.batch,
        repeat=pick(a.repeat, 5, 3),
        batches=pick(a.batches, 20, 3),
        cold_batches=pick(a.cold_batches, 4, 2),
        warmup=1 if quick else 2,
        figure_budget_s=a.figure_budget_s,
        zarr_chunks=chunks,
        out=a.out.expanduser().absolute(),
        keep=a.keep,
        seed=a.seed,
        quick=quick,
        only=tuple(k.strip() for k in a.only.split(",") if k.strip()),
        files_cold=a.files_cold,
    )
    if settings.files_cold == "drop_caches" and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        p.error("--files-cold drop_caches needs root (a writable /proc/sys/vm/drop_caches)")
    if settings.batch < 1 or settings.records < settings.batch:
        p.error(f"need 1 <= --batch <= --records, got batch={settings.batch} records={settings.records}")
    if min(settings.repeat, settings.batches, settings.cold_batches) < 1 or min(chunks, default=1) < 1:
        p.error("--repeat, --batches, --cold-batches and chunk sizes must be positive")
    return settings


_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f} s] {message}", file=sys.stderr, flush=True)


# ---- data and the flat reference file -------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    """The records, in RAM: ``x`` (N, 3, 32, 32) uint8, ``y`` (N,) int64, ``task`` (N,) int16; id i is row i."""

    x: np.ndarray
    y: np.ndarray
    task: np.ndarray

    def __len__(self) -> int:
        return self.x.shape[0]

    def fields(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        return {"x": self.x[lo:hi], "y": self.y[lo:hi], "task": self.task[lo:hi]}

    def packed(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` as a (n, RECORD_NBYTES) uint8 matrix: the flat file's layout."""
        n = hi - lo
        return np.concatenate([self.x[lo:hi].reshape(n, -1), self.y[lo:hi].astype("<i8").view(np.uint8).reshape(n, 8),
                               self.task[lo:hi].astype("<i2").view(np.uint8).reshape(n, 2)], axis=1)


def make_dataset(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(x=rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                   y=rng.integers(0, 10, n, dtype=np.int64),
                   task=rng.integers(0, 5, n, dtype=np.int16))


def unpack_flat(buf: bytes, n: int) -> dict[str, np.ndarray]:
    """Split ``n`` packed records into fresh field arrays (copies, as the stores return)."""
    rec = np.frombuffer(buf, dtype=np.uint8).reshape(n, RECORD_NBYTES)
    return {"x": rec[:, :X_NBYTES].reshape(n, 3, 32, 32).copy(),
            "y": rec[:, X_NBYTES:X_NBYTES + 8].copy().view("<i8").reshape(n),
            "task": rec[:, X_NBYTES + 8:].copy().view("<i2").reshape(n)}


class FlatFile:
    """The pread reference: record ``i`` at byte ``i * RECORD_NBYTES`` of one file."""

    def __init__(self, path: Path, data: Dataset) -> None:
        self.path = path
        self.records = len(data)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for lo in range(0, len(data), 8192):
                view = memoryview(data.packed(lo, min(lo + 8192, len(data))).tobytes())
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)  # DONTNEED drops clean pages only
        finally:
            os.close(fd)
        self.fd = os.open(path, os.O_RDONLY)

    def read_records(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        fd, pread, size = self.fd, os.pread, RECORD_NBYTES
        return unpack_flat(b"".join([pread(fd, size, i * size) for i in ids.tolist()]), ids.size)

    def read_chunk(self, index: int, rows: int) -> dict[str, np.ndarray]:
        n = max(0, min(rows, self.records - index * rows))
        return unpack_flat(os.pread(self.fd, n * RECORD_NBYTES, index * rows * RECORD_NBYTES), n)

    def iter_chunks(self, rows: int) -> Iterator[int]:
        """Read the file a chunk at a time, in order; yield the records of each chunk."""
        for index in range(-(-self.records // rows)):
            yield self.read_chunk(index, rows)["x"].shape[0]

    def read_all(self) -> None:
        with open(self.path, "rb", buffering=0) as fh:
            while fh.read(8 << 20):
                pass

    def files(self) -> list[str]:
        return [str(self.path)]

    def drop_cache(self) -> None:
        drop_page_cache(self.files())

    def close(self) -> None:
        os.close(self.fd)


# ---- the page cache ---------------------------------------------------------------------------------
def list_files(root: Path) -> list[str]:
    return [os.path.join(d, name) for d, _dirs, names in os.walk(root) for name in names]


def drop_page_cache(paths: list[str]) -> None:
    """Ask the kernel to drop the cached pages of ``paths`` (clean, unmapped pages only)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(path: str) -> tuple[int, int]:
    """``(pages in the page cache, pages)`` of one file, by ``mincore`` on a mapping never touched."""
    size = os.path.getsize(path)
    if not size:
        return 0, 0
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _LIBC.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()), pages
        finally:
            _LIBC.munmap(addr, size)
    finally:
        os.close(fd)


def resident_fraction(paths: list[str]) -> float:
    counts = [resident_pages(p) for p in paths if os.path.exists(p)]
    total = sum(n for _, n in counts)
    return sum(r for r, _ in counts) / total if total else 0.0


# ---- stores under test ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreSpec:
    label: str
    scheme: str
    query: str
    read: bool  # also measured for reads (the others are ingested, weighed, and deleted)

    def url(self, root: Path) -> str:
        name = self.label.replace(" ", "-").replace("=", "")
        return f"{self.scheme}://{root / name}?{self.query}"


def zarr_default_chunk(root: Path) -> int:
    """ZarrStore's default ``chunk`` (rows), read off a throwaway store so that it is never stale here."""
    store = open_store(f"zarr://{root}", SCHEMA)
    try:
        return store.chunk_rows
    finally:
        store.close()
        shutil.rmtree(root)


def store_specs(settings: Settings, default_chunk: int) -> list[StoreSpec]:
    c = default_chunk
    specs = [
        StoreSpec("lmdb sync=1", "lmdb", "sync=1", read=True),
        StoreSpec("lmdb sync=0", "lmdb", "sync=0", read=False),
        StoreSpec(f"zarr none c{c} sync=1", "zarr", f"codec=none&chunk={c}&sync=1", read=True),
        StoreSpec(f"zarr none c{c} sync=0", "zarr", f"codec=none&chunk={c}&sync=0", read=False),
        StoreSpec(f"zarr zstd c{c} sync=1", "zarr", f"codec=zstd&chunk={c}&sync=1", read=True),
        StoreSpec("flat sync=1", "flat", "sync=1", read=True),
        StoreSpec("flat sync=0", "flat", "sync=0", read=False),
        StoreSpec("files sync=1", "files", "sync=1", read=False),
        # Read by files_read_figures: inflight=32 against inflight=1, not by the generic reads.
        StoreSpec("files sync=0", "files", "sync=0", read=True),
    ]
    specs += [StoreSpec(f"zarr none c{k} sync=1", "zarr", f"codec=none&chunk={k}&sync=1", read=True)
              for k in settings.zarr_chunks if k != c]
    return [s for s in specs if not settings.only or s.scheme in settings.only]


class StoreUnderTest:
    """An open store plus what it takes to make it cold; ``.store`` changes when it is reopened."""

    def __init__(self, spec: StoreSpec, root: Path) -> None:
        self.spec = spec
        self.url = spec.url(root)
        self.store: SampleStore = open_store(self.url, SCHEMA)
        # LMDB and the flat store read through a shared mapping; posix_fadvise(DONTNEED) skips
        # mapped pages (measured here: 100% of data.mdb still resident), so they are closed for the drop.
        self.mapped = spec.scheme in ("lmdb", "flat")
        self._files: list[str] | None = None

    def files(self) -> list[str]:
        if self._files is None:  # reads do not add files; listing 25,000 chunk files takes a while
            self._files = list_files(self.store.path)
        return self._files

    def drop_cache(self) -> None:
        self.store.flush()
        if self.mapped:
            self.store.close()
        drop_page_cache(self.files())
        if self.mapped:
            self.store = open_store(self.url)

    def close(self) -> None:
        self.store.close()


# ---- timing -------------------------------------------------------------------------------------------
@dataclass
class Timing:
    samples_per_s: float  # median over repeats
    repeat_samples_per_s: list[float]
    batch_seconds_median: float
    batches: int
    repeats_planned: int


def measure(reads: Sequence[Callable[[int], int]], repeat: int, batches: int, warmup: int,
            before_batch: Callable[[], None] | None = None,
            before_repeat: Callable[[], None] | None = None, budget_s: float = math.inf) -> list[Timing]:
    """Time each of ``reads`` (``read(k)`` reads batch ``k``, returns the records read) on ``repeat x
    batches`` batches, after ``warmup`` untimed calls each. Several reads take turns repeat by repeat
    over the same batches, so that they meet the same machine (load from other processes comes and
    goes within seconds). Turns are whole repeats, not single batches: batch by batch, the pread
    reference ran ~17% slower next to Zarr's get_many than alone (measured here), a bias that a
    block of batches confines to its first batch. ``before_batch``/``before_repeat`` run untimed
    (the cache drops). No repeat after the first starts once ``budget_s`` have passed."""
    start = time.perf_counter()
    for read in reads:
        for k in range(warmup):
            read(k)
    rates: list[list[float]] = [[] for _ in reads]
    seconds: list[list[float]] = [[] for _ in reads]
    for r in range(repeat):
        if r and time.perf_counter() - start > budget_s:
            break
        first = warmup + r * batches
        for i, read in enumerate(reads):
            if before_repeat is not None:
                before_repeat()
            elapsed, samples = 0.0, 0
            for k in range(first, first + batches):
                if before_batch is not None:
                    before_batch()
                t0 = time.perf_counter()
                samples += read(k)
                dt = time.perf_counter() - t0
                elapsed += dt
                seconds[i].append(dt)
            rates[i].append(samples / elapsed)
    return [Timing(statistics.median(r), r, statistics.median(t), len(t), repeat) for r, t in zip(rates, seconds)]


class ChunkScan:
    """A scan as timed batches: pulls chunks from ``open_iter()`` (yielding records per chunk)
    until a batch's worth of records is read; ``restart`` begins again at the first chunk."""

    def __init__(self, open_iter: Callable[[], Iterator[int]], batch: int) -> None:
        self._open_iter = open_iter
        self._batch = batch
        self._it: Iterator[int] | None = None

    def restart(self) -> None:
        self._it = None

    def __call__(self, _k: int) -> int:
        n = 0
        fresh = False
        while n < self._batch:
            if self._it is None:
                self._it, fresh = self._open_iter(), True
            try:
                n += next(self._it)
                fresh = False
            except StopIteration:
                if fresh:
                    raise RuntimeError("the scan yields no chunk at all") from None
                self._it = None  # wrapped around: the rest of the batch comes from the first chunks
        return n


@dataclass(frozen=True)
class Plans:
    """Random ids and chunk indexes, the same for every store and reference."""

    id_batches: np.ndarray  # (n, batch)
    chunk_batches: dict[int, np.ndarray]  # chunk rows -> (n, chunks per batch)


def make_plans(settings: Settings, chunk_sizes: set[int]) -> Plans:
    rng = np.random.default_rng(settings.seed + 1)
    n = settings.warmup + settings.repeat * max(settings.batches, settings.cold_batches)
    ids = np.stack([rng.choice(settings.records, settings.batch, replace=False) for _ in range(n)])
    chunks = {}
    for rows in sorted(chunk_sizes):
        # Rows are handed out lowest first and nothing is deleted, so chunks 0..ceil(N/rows)-1
        # are the ones that hold records (Zarr's num_chunks() also counts its spare capacity).
        n_chunks = -(-settings.records // rows)
        per_batch = -(-settings.batch // rows)
        chunks[rows] = np.stack([rng.choice(n_chunks, per_batch, replace=per_batch > n_chunks) for _ in range(n)])
    return Plans(ids, chunks)


# ---- figures ------------------------------------------------------------------------------------------
@dataclass
class Figure:
    store: str
    operation: str
    cache: str  # "warm", "cold", or "-" (ingest, RAM)
    samples_per_s: float
    timing: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    chunk_ref: str | None = None  # the pread chunk reference operation of a chunk read
    vs_pread: float | None = None
    vs_ram: float | None = None
    vs_chunk_ref: float | None = None


def timed_figure(store: str, operation: str, cache: str, timing: Timing, **extra) -> Figure:
    fig = Figure(store, operation, cache, timing.samples_per_s, asdict(timing), **extra)
    log(f"{store:22} {operation:30} {cache:5} {fig.samples_per_s:12,.0f} samples/s")
    return fig


def chunk_ref_name(rows: int, order: str) -> str:
    return f"pread chunk x{rows}, {order}"


# ---- ingest -------------------------------------------------------------------------------------------
def ingest(spec: StoreSpec, root: Path, data: Dataset, settings: Settings) -> tuple[StoreUnderTest, Figure]:
    """Fill a new store with every record, ``batch`` at a time; time each put_many and the final flush."""
    warm_up_writes(spec, root / "warmup", data, settings.batch)
    subject = StoreUnderTest(spec, root)
    store, batch = subject.store, settings.batch
    seconds, sizes = [], []
    for lo in range(0, len(data), batch):
        hi = min(lo + batch, len(data))
        ids, fields = np.arange(lo, hi, dtype=np.int64), data.fields(lo, hi)
        t0 = time.perf_counter()
        store.put_many(ids, fields)
        seconds.append(time.perf_counter() - t0)
        sizes.append(hi - lo)
    t0 = time.perf_counter()
    store.flush()
    flush_s = time.perf_counter() - t0
    # Repeats of an ingest are consecutive segments of the one fill; first vs last shows a slowdown
    # as the store grows.
    segments = [(sum(s), sum(n)) for s, n in zip(np.array_split(seconds, settings.repeat),
                                                 np.array_split(sizes, settings.repeat)) if len(s)]
    rates = [n / s for s, n in segments]
    timing = Timing(statistics.median(rates), rates, statistics.median(seconds), len(seconds), len(rates))
    nbytes = store.nbytes
    notes = {"url": subject.url, "bytes_per_record": nbytes / len(data), "store_bytes": nbytes,
             "whole_fill_with_flush_samples_per_s": len(data) / (sum(seconds) + flush_s),
             "final_flush_s": flush_s, "first_segment_samples_per_s": rates[0],
             "last_segment_samples_per_s": rates[-1]}
    return subject, timed_figure(spec.label, "put_many", "-", timing, notes=notes)


def warm_up_writes(spec: StoreSpec, root: Path, data: Dataset, batch: int) -> None:
    """Two batches into a throwaway store of the same kind: first-call costs stay out of the figure."""
    store = open_store(spec.url(root), SCHEMA)
    try:
        for lo in (0, batch):
            hi = min(lo + batch, len(data))
            store.put_many(np.arange(lo, hi), data.fields(lo, hi))
        store.flush()
    finally:
        store.close()
    shutil.rmtree(root)


# ---- reads --------------------------------------------------------------------------------------------
@dataclass
class ReadOp:
    """One kind of timed read: ``read_batch(k)`` reads batch ``k`` of the plans, returns the records read."""

    name: str
    read_batch: Callable[[int], int]
    scan: ChunkScan | None = None  # reads in order: cold once per repeat, from the first chunk each repeat
    chunk_ref: str | None = None  # the pread reference of a chunk read


def measure_reads(label: str, ops: list[ReadOp], target: StoreUnderTest | FlatFile, cache: str,
                  settings: Settings, alongside: ReadOp | None = None) -> list[Figure]:
    """Figures of ``ops`` with a warm cache, or cold: ``target``'s cache dropped before each batch
    (before each repeat for a scan). Warm, ``alongside`` (the pread reference) takes turns with each
    op, repeat by repeat; the figure's ``vs_pread`` is then the median of the per-repeat ratios."""
    s = settings
    figures = []
    for op in ops:
        if op.scan is not None:
            op.scan.restart()  # an iterator of a closed (reopened) store cannot go on
        if cache == "warm":
            reads = [op.read_batch] if alongside is None else [op.read_batch, alongside.read_batch]
            timings = measure(reads, s.repeat, s.batches, s.warmup,
                              before_repeat=op.scan.restart if op.scan else None, budget_s=s.figure_budget_s)
        elif op.scan is None:
            timings = measure([op.read_batch], s.repeat, s.cold_batches, s.warmup, before_batch=target.drop_cache,
                              budget_s=s.figure_budget_s)
        else:
            timings = measure([op.read_batch], s.repeat, s.cold_batches, s.warmup,
                              before_repeat=lambda scan=op.scan: (target.drop_cache(), scan.restart()),
                              budget_s=s.figure_budget_s)
        fig = timed_figure(label, op.name, cache, timings[0], chunk_ref=op.chunk_ref)
        if len(timings) > 1:
            ref = timings[1]
            ratios = [a / b for a, b in zip(timings[0].repeat_samples_per_s, ref.repeat_samples_per_s)]
            fig.notes["pread_alongside"] = asdict(ref)
            fig.notes["vs_pread_alongside"] = statistics.median(ratios)
        figures.append(fig)
    return figures


def ram_figure(data: Dataset, plans: Plans, settings: Settings) -> Figure:
    def gather(k: int) -> int:
        idx = plans.id_batches[k]
        batch = {"x": data.x[idx], "y": data.y[idx], "task": data.task[idx]}
        return batch["x"].shape[0]

    timing = measure([gather], settings.repeat, settings.batches, settings.warmup)[0]
    return timed_figure(RAM, "gather arr[idx]", "-", timing)


def pread_records_op(flat: FlatFile, plans: Plans, name: str) -> ReadOp:
    return ReadOp(name, lambda k: flat.read_records(plans.id_batches[k])["x"].shape[0])


def pread_ops(flat: FlatFile, plans: Plans, batch: int) -> list[ReadOp]:
    """Per-record pread at random ids; per-chunk pread at random chunks and in order, per chunk size."""
    ops = [pread_records_op(flat, plans, PREAD_RECORDS)]
    for rows, chunk_batches in plans.chunk_batches.items():
        def read_chunks(k: int, rows: int = rows, chunk_batches: np.ndarray = chunk_batches) -> int:
            return sum(flat.read_chunk(int(c), rows)["x"].shape[0] for c in chunk_batches[k])

        scan = ChunkScan(lambda rows=rows: flat.iter_chunks(rows), batch)
        ops += [ReadOp(chunk_ref_name(rows, "random"), read_chunks),
                ReadOp(chunk_ref_name(rows, "in order"), scan, scan=scan)]
    return ops


def store_ops(subject: StoreUnderTest, plans: Plans, batch: int) -> list[ReadOp]:
    """get_many at random ids, get_chunk at random chunks, iter_chunks in order; ``subject.store`` is
    looked up at each call because a cold LMDB store is reopened between batches."""
    rows = subject.store.chunk_rows
    chunk_batches = plans.chunk_batches[rows]

    def get_many(k: int) -> int:
        return subject.store.get_many(plans.id_batches[k])["x"].shape[0]

    def get_chunks(k: int) -> int:
        store = subject.store
        return sum(store.get_chunk(int(c)).ids.size for c in chunk_batches[k])

    scan = ChunkScan(lambda: (chunk.ids.size for chunk in subject.store.iter_chunks()), batch)
    return [ReadOp("get_many, random ids", get_many),
            ReadOp(f"get_chunk x{rows}, random", get_chunks, chunk_ref=chunk_ref_name(rows, "random")),
            ReadOp(f"iter_chunks x{rows}, in order", scan, scan=scan, chunk_ref=chunk_ref_name(rows, "in order"))]


def reference_figures(data: Dataset, flat: FlatFile, plans: Plans, settings: Settings) -> tuple[list[Figure], dict]:
    """RAM gather; pread per record and per chunk, warm (after reading the whole file) and cold."""
    ops = pread_ops(flat, plans, settings.batch)
    figures = [ram_figure(data, plans, settings)]
    flat.read_all()
    figures += measure_reads(PREAD, ops, flat, "warm", settings)
    flat.drop_cache()
    residency = {PREAD: resident_fraction(flat.files())}
    figures += measure_reads(PREAD, ops, flat, "cold", settings)
    return figures, residency


def store_read_figures(subject: StoreUnderTest, plans: Plans, settings: Settings,
                       flat: FlatFile) -> tuple[list[Figure], dict]:
    """The store's reads, warm (after one full ``iter_chunks`` pass; taking turns with the per-record
    pread reference) then cold."""
    ops = store_ops(subject, plans, settings.batch)
    t0 = time.perf_counter()
    records = sum(chunk.ids.size for chunk in subject.store.iter_chunks())
    pass_s = time.perf_counter() - t0
    alongside = pread_records_op(flat, plans, PREAD_RECORDS)
    figures = measure_reads(subject.spec.label, ops, subject, "warm", settings, alongside=alongside)
    figures[0].notes["warm_up_pass"] = {"records": int(records), "seconds": pass_s}
    residency = {}
    if subject.mapped:  # the evidence for closing it: what fadvise alone leaves after warm reads
        residency[f"{subject.spec.label}, fadvise while open (not used)"] = fadvise_while_open(subject)
    subject.drop_cache()
    residency[subject.spec.label] = resident_fraction(subject.files())
    figures += measure_reads(subject.spec.label, ops, subject, "cold", settings)
    return figures, residency


FILES_INFLIGHT = (32, 1)  # reads in flight: many against one at a time


def files_read_figures(subject: StoreUnderTest, plans: Plans, settings: Settings,
                       flat: FlatFile) -> tuple[list[Figure], dict]:
    """The files store's random ``get_many`` with 32 reads in flight and with one, on the same files
    (two read-only handles), taking turns repeat by repeat (warm: with the pread reference too)."""
    s, label = settings, subject.spec.label
    subject.close()
    base = subject.url.split("?")[0]
    stores = [open_store(f"{base}?mode=ro&inflight={n}") for n in FILES_INFLIGHT]
    try:
        def reader(store: SampleStore) -> Callable[[int], int]:
            return lambda k: store.get_many(plans.id_batches[k])["x"].shape[0]

        reads = [reader(st) for st in stores]
        # The files the planned batches read (every id of every batch): what a cold batch finds
        # dropped. Looked up through the store's manifest (a benchmark may reach inside).
        ids = np.unique(plans.id_batches)
        found, rows, _ = stores[0]._manifest.lookup(ids)
        assert found.all()
        paths = [stores[0]._file(r, i) for r, i in zip(rows.tolist(), ids.tolist())]

        def drop() -> None:
            if s.files_cold == "drop_caches":
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            else:
                drop_page_cache(paths)

        t0 = time.perf_counter()
        records = sum(chunk.ids.size for chunk in stores[0].iter_chunks())  # warm: one full pass
        pass_s = time.perf_counter() - t0
        alongside = pread_records_op(flat, plans, PREAD_RECORDS)
        figures: list[Figure] = []
        warm = measure([*reads, alongside.read_batch], s.repeat, s.batches, s.warmup, budget_s=s.figure_budget_s)
        drop()
        residency = {f"{label} (files read cold, {s.files_cold})": resident_fraction(paths)}
        cold = measure(reads, s.repeat, s.cold_batches, s.warmup, before_batch=drop, budget_s=s.figure_budget_s)
        for cache, timings in (("warm", warm), ("cold", cold)):
            many, one = timings[0], timings[1]
            gain = statistics.median(a / b for a, b in zip(many.repeat_samples_per_s, one.repeat_samples_per_s))
            for n, timing, store in zip(FILES_INFLIGHT, timings, stores):
                fig = timed_figure(label, f"get_many, random ids, inflight={n}", cache, timing)
                fig.notes["inflight_high_water"] = store.inflight_high_water
                if n == FILES_INFLIGHT[0]:
                    fig.notes["vs_inflight_1"] = gain
                if cache == "warm":
                    ref = timings[2]
                    fig.notes["pread_alongside"] = asdict(ref)
                    fig.notes["vs_pread_alongside"] = statistics.median(
                        a / b for a, b in zip(timing.repeat_samples_per_s, ref.repeat_samples_per_s))
                else:
                    fig.notes["cold_method"] = s.files_cold
                figures.append(fig)
        figures[0].notes["warm_up_pass"] = {"records": int(records), "seconds": pass_s}
        log(f"{label}: inflight={FILES_INFLIGHT[0]} vs inflight={FILES_INFLIGHT[1]}: "
            f"{figures[0].notes['vs_inflight_1']:.2f}x warm, {figures[2].notes['vs_inflight_1']:.2f}x cold")
        return figures, residency
    finally:
        for st in stores:
            st.close()


def fadvise_while_open(subject: StoreUnderTest) -> float:
    """Share of an open store's pages still cached after flush + fadvise(DONTNEED) alone."""
    subject.store.flush()
    drop_page_cache(subject.files())
    return resident_fraction(subject.files())


# ---- results ------------------------------------------------------------------------------------------
def targets_of(zarr_chunk: int) -> list[tuple[str, str, str, float]]:
    """The issue's targets: (what, store, operation, threshold relative to warm per-record pread);
    the Zarr ones on the store with ZarrStore's default chunk."""
    zarr = f"zarr none c{zarr_chunk} sync=1"
    return [("LMDB get_many, warm, random batches", "lmdb sync=1", "get_many, random ids", 1.0),
            ("Zarr (codec=none) get_many, warm, random batches", zarr, "get_many, random ids", 0.05),
            ("Zarr chunk-granular read (get_chunk, random chunks), warm", zarr,
             f"get_chunk x{zarr_chunk}, random", 0.5),
            ("Zarr chunk-granular read (iter_chunks scan), warm", zarr, f"iter_chunks x{zarr_chunk}, in order", 0.5)]


def attach_ratios(figures: list[Figure]) -> None:
    index = {(f.store, f.operation, f.cache): f for f in figures}
    ram = index[(RAM, "gather arr[idx]", "-")].samples_per_s
    for f in figures:
        if f.operation == "put_many":
            continue
        f.vs_ram = f.samples_per_s / ram
        pread = index.get((PREAD, PREAD_RECORDS, f.cache))
        if "vs_pread_alongside" in f.notes:
            f.vs_pread = f.notes["vs_pread_alongside"]
        elif pread is not None:
            f.vs_pread = f.samples_per_s / pread.samples_per_s
        ref = index.get((PREAD, f.chunk_ref, f.cache)) if f.chunk_ref else None
        if ref is not None:
            f.vs_chunk_ref = f.samples_per_s / ref.samples_per_s


def evaluate_targets(figures: list[Figure], zarr_chunk: int) -> list[dict]:
    """Each target judged on ``vs_pread`` (against the pread read alongside), and checked against the
    fastest warm pread of the run: on a shared machine the two can disagree."""
    index = {(f.store, f.operation, f.cache): f for f in figures}
    fastest = max(warm_pread_rates(figures))
    results = []
    for what, store, operation, threshold in targets_of(zarr_chunk):
        f = index.get((store, operation, "warm"))
        if f is None:  # --only left the store out
            results.append({"target": f"{what} (not measured)", "passed": False, "samples_per_s": {}})
            continue
        results.append({"target": what, "threshold_vs_pread": threshold, "vs_pread": f.vs_pread,
                        "samples_per_s": f.samples_per_s, "passed": f.vs_pread >= threshold,
                        "fastest_warm_pread_samples_per_s": fastest,
                        "vs_fastest_pread": f.samples_per_s / fastest})
    for kind in ("lmdb", "zarr"):
        got = [f for f in figures if f.operation == "put_many" and f.store.startswith(kind)]
        results.append({"target": f"{kind.upper()} ingest reported", "passed": bool(got),
                        "samples_per_s": {f.store: round(f.samples_per_s) for f in got}})
    return results


def target_lines(targets: list[dict]) -> list[str]:
    lines = []
    for t in targets:
        mark = "PASS" if t["passed"] else "FAIL"
        if "vs_pread" in t:
            line = (f"[{mark}] {t['target']} >= {t['threshold_vs_pread']}x pread per record: "
                    f"{t['vs_pread']:.3g}x ({t['samples_per_s']:,.0f} samples/s)")
            if (t["vs_fastest_pread"] >= t["threshold_vs_pread"]) != t["passed"]:
                line += (f"; but {t['vs_fastest_pread']:.3g}x the run's fastest warm pread "
                         f"({t['fastest_warm_pread_samples_per_s']:,.0f}/s): the verdict depends on machine load")
            lines.append(line)
        else:
            rates = ", ".join(f"{k} {v:,}/s" for k, v in t["samples_per_s"].items())
            lines.append(f"[{mark}] {t['target']}: {rates}")
    return lines


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}x"


def _note(f: Figure) -> str:
    notes = []
    if f.operation == "put_many":
        n = f.notes
        notes.append(f"{n['bytes_per_record']:,.0f} B/record on disk; whole fill with flush "
                     f"{n['whole_fill_with_flush_samples_per_s']:,.0f}/s; first/last segment "
                     f"{n['first_segment_samples_per_s']:,.0f}/{n['last_segment_samples_per_s']:,.0f}/s")
    if "pread_alongside" in f.notes:
        notes.append(f"pread alongside {f.notes['pread_alongside']['samples_per_s']:,.0f}/s")
    if "inflight_high_water" in f.notes:
        notes.append(f"at most {f.notes['inflight_high_water']} reads in flight")
    if "vs_inflight_1" in f.notes:
        notes.append(f"{f.notes['vs_inflight_1']:.3g}x inflight=1 (median of per-repeat ratios)")
    if "cold_method" in f.notes:
        notes.append(f"cold by {f.notes['cold_method']}")
    if f.vs_chunk_ref is not None:
        notes.append(f"{f.vs_chunk_ref:.3g}x {f.chunk_ref}")
    done, planned = len(f.timing["repeat_samples_per_s"]), f.timing["repeats_planned"]
    if f.operation != "put_many" and done < planned:
        notes.append(f"cut short: {done}/{planned} repeats (--figure-budget-s)")
    return "; ".join(notes)


HEADER = ("store", "operation", "cache", "samples/s", "vs pread", "vs RAM", "notes")


def table_rows(figures: list[Figure]) -> list[tuple[str, ...]]:
    return [(f.store, f.operation, f.cache, f"{f.samples_per_s:,.0f}", _ratio(f.vs_pread), _ratio(f.vs_ram), _note(f))
            for f in figures]


def format_table(figures: list[Figure]) -> str:
    rows = [HEADER, *table_rows(figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    right = {3, 4, 5}
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_markdown(figures: list[Figure], targets: list[dict], facts: dict, residency: dict,
                    settings: Settings, command: str) -> str:
    out = [f"# storage_backends benchmark\n\n`{command}`\n",
           "## Machine\n", *[f"- {k}: {v}" for k, v in facts.items()],
           "", f"Records: {settings.records:,}; batch {settings.batch}; figure = median of {settings.repeat} repeats "
               f"x {settings.batches} warm / {settings.cold_batches} cold batches.\n",
           f"Cold cache: {DROP_METHOD}.\n",
           "## Targets (warm, random batches)\n", *[f"- {line}" for line in target_lines(targets)], "",
           "## Figures\n", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(r) + " |" for r in table_rows(figures)]
    out += ["", "## Context\n", *[f"- {line}" for line in context_lines(figures, residency, facts)], ""]
    return "\n".join(out)


def warm_pread_rates(figures: list[Figure]) -> list[float]:
    """Every warm per-record pread figure of the run, in order: start, alongside each store read, end."""
    rates = []
    for f in figures:
        if f.store == PREAD and f.cache == "warm" and f.operation in (PREAD_RECORDS, PREAD_RECORDS_AT_END):
            rates.append(f.samples_per_s)
        elif "pread_alongside" in f.notes:
            rates.append(f.notes["pread_alongside"]["samples_per_s"])
    return rates


def context_lines(figures: list[Figure], residency: dict, facts: dict) -> list[str]:
    """How cold the cold figures were, and whether the machine's speed drifted during the run."""
    warm_preads = warm_pread_rates(figures)
    return ["page cache left after a drop (mincore): " + "; ".join(f"{k} {v:.1%}" for k, v in residency.items()),
            "warm 'vs pread' of a store: the median over repeats of its rate over that of per-record preads "
            "taking turns with it, repeat by repeat, on the same ids ('pread alongside'); cold and reference "
            "rows: over the flat file's row of the same cache state",
            f"drift check, warm pread per record through the run (start, alongside each warm store read, end): "
            f"{min(warm_preads):,.0f} to {max(warm_preads):,.0f} samples/s "
            f"({' '.join(f'{v / 1000:.0f}k' for v in warm_preads)})",
            f"load average (1, 5, 15 min): {facts['load_average_at_start']} at the start, "
            f"{facts['load_average_at_end']} at the end (a busy machine skews the figures)"]


def code_version() -> str:
    """The commit measured, and whether ``storage_backends`` had uncommitted changes (read-only git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "storage_backends")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return f"{head} + uncommitted changes in storage_backends" if dirty else head


def machine_facts(where: Path) -> dict:
    def cpu_model() -> str:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "unknown"

    def mem_total() -> str:
        try:
            kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
            return f"{kib / 2**20:.1f} GiB"
        except (OSError, IndexError, ValueError):
            return "unknown"

    def file_system() -> str:
        best = ("", "unknown", "unknown")
        try:
            for line in Path("/proc/mounts").read_text().splitlines():
                dev, mnt, fstype = line.split()[:3]
                if str(where).startswith(mnt) and len(mnt) > len(best[0]):
                    best = (mnt, fstype, dev)
        except OSError:
            pass
        return f"{best[1]} on {best[2]} (mounted at {best[0]})"

    return {"code": code_version(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "memory": mem_total(), "kernel": platform.release(), "python": sys.version.split()[0],
            "numpy": np.__version__, "lmdb": lmdb.__version__, "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "work_dir_file_system": file_system()}


# ---- main ---------------------------------------------------------------------------------------------
def run(settings: Settings, work: Path, zarr_chunk: int) -> tuple[list[Figure], dict]:
    log(f"generating {settings.records:,} records")
    data = make_dataset(settings.records, settings.seed)
    flat = FlatFile(work / "flat.bin", data)
    figures: list[Figure] = []
    readers: list[StoreUnderTest] = []
    try:
        for spec in store_specs(settings, zarr_chunk):
            subject, fig = ingest(spec, work, data, settings)
            figures.append(fig)
            if spec.read:
                readers.append(subject)
            else:
                subject.close()
                shutil.rmtree(subject.store.path)  # ingest-only: free the disk
        plans = make_plans(settings, {r.store.chunk_rows for r in readers if r.spec.scheme != "files"})
        ref_figures, residency = reference_figures(data, flat, plans, settings)
        figures += ref_figures
        flat.read_all()  # warm again, for the references next to each store
        for subject in readers:
            figure_reads = files_read_figures if subject.spec.scheme == "files" else store_read_figures
            read_figures, subject_residency = figure_reads(subject, plans, settings, flat)
            figures += read_figures
            residency.update(subject_residency)
        figures += measure_reads(PREAD, [pread_records_op(flat, plans, PREAD_RECORDS_AT_END)], flat, "warm", settings)
    finally:
        for subject in readers:
            subject.close()
        flat.close()
    return figures, residency


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    settings.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.storage " + " ".join(sys.argv[1:] if argv is None else argv)
    facts = machine_facts(settings.out)
    facts["load_average_at_start"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print("machine: " + "; ".join(f"{k}={v}" for k, v in facts.items()))
    print(f"cold cache: {DROP_METHOD}")
    work = Path(tempfile.mkdtemp(prefix="storage-work-", dir=settings.out))
    log(f"work dir {work}")
    try:
        zarr_chunk = zarr_default_chunk(work / "default-chunk")
        facts["zarr_default_chunk"] = zarr_chunk
        figures, residency = run(settings, work, zarr_chunk)
    finally:
        if settings.keep:
            log(f"kept the work dir {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    facts["load_average_at_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    attach_ratios(figures)
    targets = evaluate_targets(figures, zarr_chunk)
    print()
    print(format_table(figures))
    print()
    print("\n".join(context_lines(figures, residency, facts)))
    print("\ntargets (warm, random batches of %d out of %d):" % (settings.batch, settings.records))
    print("\n".join("  " + line for line in target_lines(targets)))
    results = {"command": command, "machine": facts, "settings": {**asdict(settings), "out": str(settings.out)},
               "cold_cache_method": DROP_METHOD, "figures": [asdict(f) for f in figures],
               "targets": targets, "resident_after_drop": residency,
               "total_seconds": time.perf_counter() - _T0}
    (settings.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (settings.out / "results.md").write_text(
        format_markdown(figures, targets, facts, residency, settings, command))
    log(f"wrote {settings.out / 'results.json'} and {settings.out / 'results.md'}")


if __name__ == "__main__":
    main()
