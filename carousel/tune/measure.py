"""Measure a candidate tier path the way carousel uses it, and the RAM beside it.

For each path, :func:`measure_tier` creates a store of the tier's kind in a scratch folder there
(removed afterwards) with the profile's record schema, then measures:

- **writes**: ``put_many`` at write-behind batch sizes 16, 64 and 256, with the tier's ``sync``
  setting (an fsync per call when on): seconds per sample at each batch size;
- **fsync latency**: a 4 KiB write plus ``fdatasync``, 30 times (p50, p99) -- what a synced
  commit waits on at the least;
- **random reads with a cold cache**: ``get_many`` of ``read_batch`` random ids (what a swap-in
  read asks for), from 1, 2 and 4 threads at once (the swap engine's I/O pool), each run on a
  fresh permutation of the ids -- no record read twice -- after the store's pages were dropped
  from the page cache (the store is closed, each file fsynced and ``posix_fadvise(DONTNEED)``-ed:
  no privilege needed, and only our scratch files lose their cache, not the user's). On tmpfs
  there is no cache to drop: the figures are RAM's, and the report says so;
- **reads in flight** (a ``files`` tier): cold reads from one reader with 1, 8 and 32 file reads
  in flight; the rest of the reads, and the tier's ``inflight``, use the fastest;
- **free space** and the file system type (``/proc/self/mountinfo``).

:func:`measure_host` reads free RAM (``MemAvailable``), free ``/dev/shm`` and the usable cores.
Everything here is I/O; the choices are :mod:`carousel.tune.plan`'s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from storage_backends import open_store

from ..config import TierConfig

WRITE_BATCHES = (16, 64, 256)
READ_THREADS = (1, 2, 4)
INFLIGHT = (1, 8, 32)  # a files tier's reads in flight, tried


@dataclass
class TierMeasurement:
    """What :func:`measure_tier` found on one path (times in seconds)."""

    path: str
    kind: str
    fs: str                                   # file system type, e.g. "ext4", "tmpfs"
    free_bytes: int                           # free space before the probe wrote anything
    sync: bool
    cache: str                                # how the page cache was dropped before reads
    records: int                              # records the probe wrote
    disk_bytes_per_record: float              # bytes on disk per record (LMDB pages, zarr chunks, ...)
    write_s_per_sample: dict[int, float]      # write-behind batch size -> seconds per sample (median call)
    fsync_p50_s: float
    fsync_p99_s: float
    read_batch: int                           # ids per get_many call
    read_p50_s: dict[int, float]              # threads -> seconds per call, median
    read_p99_s: dict[int, float]              # threads -> seconds per call, 99th percentile
    read_samples_per_s: dict[int, float]      # threads -> samples read per second, all threads together
    # A files tier: cold reads from one reader at each ``inflight`` (file reads in flight per call)
    # -> samples/s; the reads above ran at the best of them. Empty for other kinds.
    inflight_samples_per_s: dict[int, float] = field(default_factory=dict)

    @property
    def best_inflight(self) -> int | None:
        """The ``inflight`` that read fastest (a files tier), else None."""
        if not self.inflight_samples_per_s:
            return None
        return max(self.inflight_samples_per_s, key=lambda k: self.inflight_samples_per_s[k])

    def read_s_per_sample(self, threads: int = 1) -> float:
        """Seconds per sample read by one reader among ``threads`` (the mean: a run's wall time
        per sample, times the readers sharing it)."""
        return threads / self.read_samples_per_s[threads]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> TierMeasurement:
        d = dict(d)
        for key in ("write_s_per_sample", "read_p50_s", "read_p99_s", "read_samples_per_s", "inflight_samples_per_s"):
            d[key] = {int(k): float(v) for k, v in d[key].items()}  # JSON keys are strings
        return cls(**d)


@dataclass
class HostMeasurement:
    """RAM and cores of this machine, as carousel's daemon would share them."""

    mem_available_bytes: int
    shm_free_bytes: int
    cores: int
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def measure_host() -> HostMeasurement:
    """Free RAM (``MemAvailable``), free ``/dev/shm`` and the cores this process may run on."""
    available = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    try:
        st = os.statvfs("/dev/shm")
        shm = st.f_bavail * st.f_frsize
    except OSError:  # no /dev/shm: the daemon then samples over its socket only
        shm = 0
    return HostMeasurement(available, shm, len(os.sched_getaffinity(0)))


def fs_type(path: str | os.PathLike[str]) -> str:
    """The type of the file system holding ``path`` (longest mount point that contains it)."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                mount = parts[4].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[sep + 1]
    except (OSError, ValueError, IndexError):
        pass
    return kind


def _records(schema: Mapping[str, tuple[tuple[int, ...], str]], ids: np.ndarray,
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random records: incompressible bytes, as real pixels mostly are for a raw store."""
    out = {}
    for name, (shape, dtype) in schema.items():
        dt = np.dtype(dtype)
        n = ids.size * int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        out[name] = np.frombuffer(rng.bytes(n), dtype=np.uint8).view(dt).reshape(ids.size, *shape).copy()
        if dt.kind == "f":  # NaNs and infinities are bytes like any others, but keep values sane
            out[name] = np.nan_to_num(out[name], nan=0.0, posinf=0.0, neginf=0.0)
    if "y" in out:
        out["y"] = rng.integers(0, 10, ids.size).astype(out["y"].dtype)
    return out


def _drop_cache(folder: Path) -> None:
    """Evict ``folder``'s files from the page cache: fsync each (dirty pages cannot be dropped),
    then ``posix_fadvise(DONTNEED)``. The store is closed: pages a live mapping holds stay."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                try:
                    os.fsync(fd)
                except OSError:
                    pass
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _fsync_latency(folder: Path, n: int = 30) -> tuple[float, float]:
    path = folder / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    block = os.urandom(4096)
    times = []
    try:
        for i in range(n):
            os.pwrite(fd, block, (i % 8) * 4096)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return float(np.median(times)), float(np.quantile(times, 0.99))


def _read_run(store, items: np.ndarray, per_call: int, threads: int, chunks: bool) -> tuple[list[float], float, int]:
    """``threads`` readers, each reading its own slice of ``items``: ids, ``per_call`` at a time
    through ``get_many``, or (``chunks``) chunk indexes, one ``get_chunk`` each -- as the swap
    engine reads a store that prefers chunks."""
    slices = np.array_split(items, threads)
    times: list[list[float]] = [[] for _ in range(threads)]
    counts = [0] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)

    def reader(k: int) -> None:
        mine = slices[k]
        try:
            start.wait()
            step = 1 if chunks else per_call
            for i in range(0, mine.size - step + 1, step):
                t0 = time.perf_counter()
                if chunks:
                    got = store.get_chunk(int(mine[i])).ids.size
                else:
                    store.get_many(mine[i:i + step])
                    got = step
                if got:  # a chunk holding no record is no read
                    times[k].append(time.perf_counter() - t0)
                    counts[k] += got
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            errors.append(exc)

    workers = [threading.Thread(target=reader, args=(k,), name=f"carousel-tune-read-{k}") for k in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return [t for ts in times for t in ts], wall, sum(counts)


def measure_tier(path: str | os.PathLike[str], kind: str, schema: Mapping[str, tuple[tuple[int, ...], str]], *,
                 sync: bool = True, records: int = 3072, read_batch: int = 16,
                 threads: tuple[int, ...] = READ_THREADS, seed: int = 0) -> TierMeasurement:
    """Measure ``path`` as a ``kind`` tier of records of ``schema``; see the module docstring.

    ``records`` are written (their bytes must fit the free space: raises ``OSError`` if not); the
    scratch folder ``path/.carousel-tune-*`` is removed afterwards, also on error."""
    root = Path(path).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    fs = fs_type(root)
    rng = np.random.default_rng(seed)
    scratch = Path(tempfile.mkdtemp(prefix=".carousel-tune-", dir=root))
    try:
        url = TierConfig(kind, str(scratch / "store"), capacity_samples=1, sync=sync).url()
        all_ids = np.arange(records, dtype=np.int64)
        writes: dict[int, list[float]] = {b: [] for b in WRITE_BATCHES}
        with open_store(url, dict(schema)) as store:
            # The batch sizes take turns, so a file system that slows as it fills slows them alike.
            pos, turn = 0, 0
            while pos < records:
                b = WRITE_BATCHES[turn % len(WRITE_BATCHES)]
                ids = all_ids[pos:pos + b]
                data = _records(schema, ids, rng)
                t0 = time.perf_counter()
                store.put_many(ids, data)
                if ids.size == b:  # a short last batch is no measure of its size
                    writes[b].append((time.perf_counter() - t0) / b)
                pos += ids.size
                turn += 1
            store.flush()
            on_disk = store.nbytes
        fsync_p50, fsync_p99 = _fsync_latency(scratch)
        inflight: dict[int, float] = {}
        if kind == "files":
            # Many reads in flight win where a read waits on a device with a deep queue or a network;
            # on a local disk, or warm, they can cost more than they save: measured, not assumed.
            for depth in INFLIGHT:
                _drop_cache(scratch)
                probe = TierConfig(kind, str(scratch / "store"), capacity_samples=1, sync=sync, inflight=depth).url()
                with open_store(probe) as store:
                    _, wall, n = _read_run(store, rng.permutation(all_ids)[: max(read_batch, records // 3)],
                                           read_batch, 1, False)
                inflight[depth] = n / wall if wall > 0 else float("inf")
            best = max(inflight, key=lambda k: inflight[k])
            url = TierConfig(kind, str(scratch / "store"), capacity_samples=1, sync=sync, inflight=best).url()
        cache = "tmpfs: RAM, no cache to drop" if fs in ("tmpfs", "ramfs") else "dropped (fsync + fadvise DONTNEED)"
        p50, p99, rate = {}, {}, {}
        per_call = read_batch
        for t in threads:
            _drop_cache(scratch)
            with open_store(url) as store:
                chunks = store.prefers_chunks
                if chunks:  # one chunk read yields many candidates of a class: that is the call
                    per_call = store.chunk_rows
                    items = rng.permutation(store.num_chunks()).astype(np.int64)
                else:
                    items = rng.permutation(all_ids)
                times, wall, n = _read_run(store, items, per_call, t, chunks)
            if not times:
                raise ValueError(f"{root}: {records} records are too few to measure reads from {t} threads")
            p50[t] = float(np.median(times))
            p99[t] = float(np.quantile(times, 0.99))
            rate[t] = n / wall if wall > 0 else float("inf")
        return TierMeasurement(
            path=str(root), kind=kind, fs=fs, free_bytes=int(free), sync=sync, cache=cache, records=records,
            disk_bytes_per_record=on_disk / records,
            write_s_per_sample={b: float(np.median(v)) for b, v in writes.items() if v},
            fsync_p50_s=fsync_p50, fsync_p99_s=fsync_p99, read_batch=per_call,
            read_p50_s=p50, read_p99_s=p99, read_samples_per_s=rate, inflight_samples_per_s=inflight)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
