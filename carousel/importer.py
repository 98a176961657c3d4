"""Bulk-load a data set into a memory's storage tiers: ``carousel import`` (resumable, checksummed).

Why: to pre-load the store of past samples before training starts, or to move a data set between
devices, without a training loop. Rows go through :class:`~carousel.memory.CarouselMemory` (``add``
in batches, ``flush``), so the catalog, the tiers, their capacities and crash recovery stay what
they are for any other ``add``. The source formats are :mod:`carousel.formats`' (IDX, CIFAR
pickles read by a restricted unpickler, ``.npz``, ``CLASS/*.png`` folders).

Each import keeps a *record*, ``<state_dir>/imports/<key>.json`` (replaced atomically, fsynced): the
source's identity (path, and per file size, mtime and sha256), the options that change what is
stored (split, keys, task mapping), which rows were stored under which ids (``done``: segments
``[row_lo, row_hi, first_id]``), and, once every row asked for is in, the manifest: rows imported
and ``records_sha256``, a SHA-256 over the records as read back from the tiers (see
:func:`records_digest`). The key derives from the source's content and those options, so rerunning
the same import resumes it (or reports it done), wherever the file now lies.

Exactly once across kills: before a run adds anything, the record names the run's first id and
the rows it will add, in order (ids of one run are consecutive: one process adds, under the
daemon's data-directory lock). Every ``checkpoint_rows`` rows the memory is flushed *and then* the
rows are recorded as done. After a kill, the rows added but not recorded are found by id on the
tiers, compared with the source row by row, and recorded; only the rest is added again (under new
ids: an id is never reused). Rows a kill lost before write-behind stored them are simply added again.

>>> import os, tempfile, numpy as np
>>> from carousel.config import CarouselConfig
>>> d = tempfile.mkdtemp()
>>> np.savez(os.path.join(d, "set.npz"), x=np.arange(60, dtype=np.uint8).reshape(15, 4), y=np.arange(15) % 3)
>>> cfg = CarouselConfig.from_dict({"memory": {"em_size": 4, "sample_shape": [4]},
...                                 "tiers": [{"kind": "lmdb", "path": os.path.join(d, "flash"), "capacity": 100}]})
>>> r = import_dataset(cfg, os.path.join(d, "set.npz"), ImportOptions(batch=4, classes_per_task=2))
>>> r.rows, r.added, len(r.records_sha256)
(15, 15, 64)
>>> import_dataset(cfg, os.path.join(d, "set.npz"), ImportOptions(classes_per_task=2)).added   # done: a no-op
0
>>> verify_import(cfg, os.path.join(d, "set.npz"), ImportOptions(classes_per_task=2)).ok
True
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage_backends import open_store

from .config import WEIGHT_FIELD, CarouselConfig
from .formats import FormatError, Source, open_source
from .progress import ProgressBar

__all__ = ["ImportOptions", "ImportResult", "ImportSourceError", "VerifyResult", "describe", "import_dataset",
           "records_digest", "state_dir_of", "verify_import"]

RECORD_VERSION = 1
IMPORTS_DIR = "imports"
_READ_ROWS = 4096  # rows read back from the tiers per get_many when checking


class ImportSourceError(ValueError):
    """An import that cannot start or go on: a source that does not fit the memory (shape, dtype,
    labels, capacity), a memory it cannot fill, or a source changed since its import began. Raised
    before anything is added; the message says what and how to fix it."""


@dataclass(frozen=True)
class ImportOptions:
    """What to import and how (``carousel import``'s options).

    ``split``: ``"train"`` / ``"test"`` (IDX and CIFAR). ``x_key`` / ``y_key``: an .npz's arrays.
    Task ids: ``task_of_class`` maps a class (its label as a string, or an image folder's class
    name) to a task; else ``classes_per_task`` K gives task = (position of the class among the
    sorted labels) // K; else an .npz's ``task`` array; else task 0. ``limit``: import at most the
    first N rows (a later run with a larger limit goes on from there). ``batch``: rows per
    ``add``. ``checkpoint_rows``: rows between flushes that record progress (what a kill may
    cost to redo).
    """

    split: str = "train"
    x_key: str = "x"
    y_key: str = "y"
    classes_per_task: int | None = None
    task_of_class: Mapping[str, int] | None = None
    limit: int | None = None
    batch: int = 1024
    checkpoint_rows: int = 16384

    def __post_init__(self) -> None:
        for name in ("batch", "checkpoint_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ImportSourceError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 0):
            raise ImportSourceError(f"limit must be a non-negative integer, got {self.limit!r}")
        if self.classes_per_task is not None and (not isinstance(self.classes_per_task, int)
                                                  or self.classes_per_task < 1):
            raise ImportSourceError(f"classes_per_task must be >= 1, got {self.classes_per_task!r}")
        if self.classes_per_task is not None and self.task_of_class is not None:
            raise ImportSourceError("give classes_per_task or task_of_class, not both")

    def identity(self) -> dict[str, Any]:
        """The options that change what is stored for a row (not limit, batch or checkpoints)."""
        tasks: Any = ({"classes_per_task": self.classes_per_task} if self.classes_per_task is not None else
                      {"task_of_class": dict(sorted(self.task_of_class.items()))} if self.task_of_class is not None
                      else "source")
        return {"split": self.split, "x_key": self.x_key, "y_key": self.y_key, "tasks": tasks}


@dataclass
class ImportResult:
    """What :func:`import_dataset` did: ``rows`` imported in all (this run and earlier ones),
    ``added`` by this run, ``recovered`` rows a killed run had stored that this run recorded,
    the checksums, the record's path and this run's ``seconds`` and rate."""

    rows: int
    added: int
    recovered: int
    source_sha256: str
    records_sha256: str
    record: Path
    seconds: float

    @property
    def rate(self) -> float:
        """Rows added per second in this run."""
        return self.added / self.seconds if self.seconds > 0 else 0.0


@dataclass
class VerifyResult:
    """What :func:`verify_import` found: ``ok`` when the source and the stored records both match
    the record; ``lines`` say what was checked and what differs."""

    ok: bool
    lines: list[str]


# ------------------------------------------------------------------------------------------- helpers

def state_dir_of(config: CarouselConfig) -> Path:
    """The memory's state folder: ``memory.state_dir``, else ``<first tier's folder>-state`` (the
    rule :class:`~carousel.memory.CarouselMemory` follows)."""
    if config.memory.state_dir:
        return Path(config.memory.state_dir)
    first = Path(config.tiers[0].path)
    return first.with_name(first.name + "-state")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _source_identity(src: Source) -> dict[str, Any]:
    """Path, format, and per file (path, size, mtime, sha256); ``sha256`` over the files' digests."""
    files = []
    for f in src.files:
        st = f.stat()
        files.append({"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256_file(f)})
    # By name relative to the source (not the absolute path): a moved copy has the same content digest.
    base = src.path if src.path.is_dir() else src.path.parent
    lines = "".join(f"{os.path.relpath(e['path'], base)}\0{e['size']}\0{e['sha256']}\n" for e in files)
    return {"path": str(src.path), "format": src.kind, "rows": len(src), "sample_shape": list(src.sample_shape),
            "dtype": str(src.dtype), "files": files, "sha256": hashlib.sha256(lines.encode()).hexdigest()}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` durably: temp file, fsync, rename, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _records(folder: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    if not folder.is_dir():
        return
    for p in sorted(folder.glob("*.json")):
        try:
            yield p, json.loads(p.read_text())
        except (OSError, ValueError):
            continue  # not ours, or unreadable: never fatal for another import


def _adapter(src_shape: tuple[int, ...], dst_shape: tuple[int, ...], where: str) -> Callable[[np.ndarray], np.ndarray]:
    """How a batch of the source's samples becomes the memory's ``sample_shape``: as is, with a
    leading channel of 1 added or dropped (28x28 <-> 1x28x28), or HWC -> CHW (decoded images)."""
    if src_shape == dst_shape:
        return lambda x: x
    if dst_shape == (1, *src_shape):
        return lambda x: x[:, None]
    if src_shape == (1, *dst_shape):
        return lambda x: x[:, 0]
    if len(src_shape) == 3 and len(dst_shape) == 3 and dst_shape == (src_shape[2], src_shape[0], src_shape[1]):
        return lambda x: x.transpose(0, 3, 1, 2)
    raise ImportSourceError(f"{where}: samples of shape {list(src_shape)} do not fit the memory's "
                            f"sample_shape {list(dst_shape)} (nor with a channel of 1 added or dropped); "
                            "import into a memory whose [memory] sample_shape matches the data set")


def _tasks(src: Source, opts: ImportOptions) -> np.ndarray:
    labels = src.labels()
    if opts.task_of_class is not None:
        classes = np.unique(labels)
        names = src.classes or []
        mapping: dict[int, int] = {}
        for key, task in opts.task_of_class.items():
            label = names.index(key) if key in names else int(key) if str(key).lstrip("-").isdigit() else None
            if label is None:
                raise ImportSourceError(f"task_of_class: {key!r} is neither a label nor a class name of the source"
                                        + (f" (classes: {names[:10]})" if names else ""))
            mapping[label] = int(task)
        missing = [int(c) for c in classes if int(c) not in mapping]
        if missing:
            raise ImportSourceError(f"task_of_class gives no task for classes {missing[:20]}; map every class "
                                    "(or use classes_per_task)")
        lut_keys = np.array(sorted(mapping), np.int64)
        lut = np.array([mapping[k] for k in lut_keys], np.int64)
        tasks = lut[np.searchsorted(lut_keys, labels)]
    elif opts.classes_per_task is not None:
        classes = np.unique(labels)
        tasks = np.searchsorted(classes, labels) // opts.classes_per_task
    elif src.task is not None:
        tasks = src.task
    else:
        tasks = np.zeros(len(src), np.int64)
    if tasks.size and (tasks.min() < 0 or tasks.max() > np.iinfo(np.int16).max):
        raise ImportSourceError(f"task ids must lie in [0, 32767], got {int(tasks.min())}..{int(tasks.max())}")
    return tasks.astype(np.int16)


def _check_memory(config: CarouselConfig) -> None:
    if not any(not _adopted(t) for t in config.tiers):
        raise ImportSourceError("the memory has no writable [[tiers]] (a RAM-only memory, or only an adopted image "
                                "folder): it keeps nothing an import could pre-load; import into a profile with "
                                "storage tiers")
    mc = config.memory
    if mc.kind == "saliency":
        raise ImportSourceError('a kind = "saliency" memory needs a saliency map per sample, which a data set '
                                'does not have; import into a "plain" memory')
    extra = sorted(set(mc.extras) - {WEIGHT_FIELD})
    if extra:
        raise ImportSourceError(f"the memory has extra fields {extra} that a data set cannot fill; import into a "
                                "memory without [memory.extras]")


def _segments(plan: list[list[int]], k0: int, k1: int, id0: int) -> list[list[int]]:
    """``[row_lo, row_hi, first_id]`` segments of a run's rows number ``k0..k1`` (in ``plan``'s row
    order; the run's k-th row got id ``id0 + k``)."""
    out = []
    k = 0
    for lo, hi in plan:
        a, b = max(k0, k), min(k1, k + hi - lo)
        if a < b:
            out.append([lo + a - k, lo + b - k, id0 + a])
        k += hi - lo
    return out


def _plan_rows(plan: list[list[int]], ks: np.ndarray) -> np.ndarray:
    """The source rows of a run's rows number ``ks`` (``plan``'s ranges, in order)."""
    lengths = np.array([hi - lo for lo, hi in plan], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    which = np.searchsorted(starts, ks, side="right") - 1
    return np.array([lo for lo, _ in plan], np.int64)[which] + (ks - starts[which])


def _merge(done: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for seg in sorted(done):
        if out and out[-1][1] == seg[0] and out[-1][2] + (out[-1][1] - out[-1][0]) == seg[2]:
            out[-1][1] = seg[1]
        else:
            out.append(list(seg))
    return out


def _todo(done: list[list[int]], target: int) -> list[list[int]]:
    """Row ranges below ``target`` that no segment of ``done`` covers."""
    out, at = [], 0
    for lo, hi, _ in sorted(done):
        if lo > at:
            out.append([at, min(lo, target)])
        at = max(at, hi)
        if at >= target:
            break
    if at < target:
        out.append([at, target])
    return [r for r in out if r[1] > r[0]]


def _row_ids(done: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Every recorded row and its id, in row order."""
    if not done:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi, _ in sorted(done)])
    ids = np.concatenate([np.arange(i, i + hi - lo, dtype=np.int64) for lo, hi, i in sorted(done)])
    return rows, ids


def records_digest(ids: np.ndarray, y: np.ndarray, task: np.ndarray, x: np.ndarray,
                   h: Any | None = None) -> Any:
    """Feed rows to a SHA-256 (``h``, new when None) and return it: per row, in order, the id
    (int64 little-endian), the label (int64 LE), the task (int16 LE) and the sample's bytes (C
    order, little-endian). Fed in any batches, the same rows give the same digest.

    >>> import numpy as np
    >>> a = records_digest(np.arange(4), np.zeros(4), np.zeros(4), np.ones((4, 2), np.uint8))
    >>> b = records_digest(np.arange(2), np.zeros(2), np.zeros(2), np.ones((2, 2), np.uint8))
    >>> a.hexdigest() == records_digest(np.arange(2, 4), np.zeros(2), np.zeros(2), np.ones((2, 2), np.uint8), b).hexdigest()
    True
    """
    h = hashlib.sha256() if h is None else h
    xd = x.dtype.newbyteorder("<")
    rec = np.empty(len(ids), np.dtype([("id", "<i8"), ("y", "<i8"), ("task", "<i2"), ("x", xd, x.shape[1:])]))
    rec["id"], rec["y"], rec["task"], rec["x"] = ids, y, task, x
    h.update(rec.tobytes())
    return h


def _adopted(tier: Any) -> bool:
    """An adopted image folder (``layout = "imagefolder"``): read-only, never written by an add."""
    return getattr(tier, "layout", None) == "imagefolder"


def _open_ro(config: CarouselConfig) -> list[Any]:
    """The memory's writable tiers' stores, opened read-only, fastest first (missing ones skipped)."""
    stores = []
    try:
        for tier in config.tiers:
            if Path(tier.path).exists() and not _adopted(tier):
                url = tier.url()
                stores.append(open_store(url if "mode=ro" in url else url + "&mode=ro"))
    except BaseException:
        for s in stores:
            s.close()
        raise
    return stores


def _read_stored(stores: list[Any], ids: np.ndarray) -> tuple[dict[str, np.ndarray] | None, np.ndarray]:
    """Records of ``ids`` from the first store holding each, and the mask of ids found."""
    found = np.zeros(ids.size, bool)
    out: dict[str, np.ndarray] | None = None
    for store in stores:
        want = np.flatnonzero(~found)
        if not want.size:
            break
        have = want[store.contains(ids[want])]
        if not have.size:
            continue
        got = store.get_many(ids[have])
        if out is None:
            out = {k: np.zeros((ids.size, *v.shape[1:]), v.dtype) for k, v in got.items()}
        for k, v in got.items():
            out[k][have] = v
        found[have] = True
    return out, found


# ---------------------------------------------------------------------------------------------- job

class _Job:
    """One import into one memory: the source, its record, the rows to add."""

    def __init__(self, config: CarouselConfig, source: str | os.PathLike[str], opts: ImportOptions) -> None:
        _check_memory(config)
        self.config, self.opts = config, opts
        try:
            self.src = open_source(source, opts.split, opts.x_key, opts.y_key)
        except FormatError as exc:
            raise ImportSourceError(str(exc)) from None
        mc = config.memory
        where = str(self.src.path)
        self.adapt = _adapter(self.src.sample_shape, tuple(mc.sample_shape), where)
        if self.src.dtype != np.dtype(mc.dtype):
            raise ImportSourceError(f"{where}: samples are {self.src.dtype}, the memory stores {mc.dtype}; import "
                                    "into a memory whose [memory] dtype matches (carousel converts nothing)")
        labels = self.src.labels()
        if labels.size and (labels.min() < 0 or labels.max() > mc.max_label):
            raise ImportSourceError(f"{where}: labels span {int(labels.min())}..{int(labels.max())}; the memory takes "
                                    f"0..{mc.max_label} (memory.max_label)")
        self.tasks = _tasks(self.src, opts)
        self.identity = _source_identity(self.src)
        options = opts.identity()
        self.key = hashlib.sha256(json.dumps([self.identity["sha256"], options], sort_keys=True).encode()
                                  ).hexdigest()[:20]
        self.folder = state_dir_of(config) / IMPORTS_DIR
        self.path = self.folder / f"{self.key}.json"
        self.target = len(self.src) if opts.limit is None else min(len(self.src), opts.limit)

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples (the memory's shape), labels and tasks of source ``rows`` (sorted, any gaps)."""
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        x, y = self.src.read(lo, hi)
        sel = rows - lo
        return self.adapt(x[sel]), y[sel], self.tasks[rows]

    def load(self) -> dict[str, Any]:
        """This import's record; a fresh one when there is none. Refuses a source whose import at
        the same path with the same options has other content (the source changed since)."""
        if self.path.exists():
            try:
                rec = json.loads(self.path.read_text())
            except ValueError as exc:  # written by rename, so only a hand edit or a damaged disk gets here
                raise ImportSourceError(f"{self.path}: this import's record is unreadable ({exc}); remove it to "
                                        "start the import afresh (rows it stored stay in the memory)") from None
            rec["source"] = self.identity  # same content; the path, mtimes may be new
            return rec
        options = self.opts.identity()
        same_rows = {k: v for k, v in options.items() if k != "tasks"}
        for p, other in _records(self.folder):
            theirs = other.get("options", {})
            if (other.get("source", {}).get("sha256") == self.identity["sha256"]
                    and {k: v for k, v in theirs.items() if k != "tasks"} == same_rows):
                raise ImportSourceError(
                    f"these rows of {self.identity['path']} were imported before with other task ids "
                    f"({theirs.get('tasks')!r}, now {options['tasks']!r}; {other.get('rows', 0)} rows stored, record "
                    f"{p}); rerun with the same task options to resume it, or remove {p} to import the rows again "
                    "beside the ones already stored")
            if other.get("source", {}).get("path") == self.identity["path"] and theirs == options:
                raise ImportSourceError(
                    f"{self.identity['path']} changed since it was imported ({other.get('rows', 0)} rows stored, "
                    f"source sha256 {other['source']['sha256'][:16]}..., now {self.identity['sha256'][:16]}...; "
                    f"record {p}). To resume that import, restore the file it read; to import the new content as "
                    f"new samples (beside the rows already stored), remove {p}")
        return {"version": RECORD_VERSION, "source": self.identity, "options": options, "done": [], "run": None,
                "rows": 0, "complete": False, "records_sha256": None, "started_at": time.time()}

    def save(self, rec: dict[str, Any]) -> None:
        rec["done"] = _merge(rec["done"])
        rec["rows"] = int(sum(hi - lo for lo, hi, _ in rec["done"]))
        rec["updated_at"] = time.time()
        _write_json(self.path, rec)

    def reconcile(self, rec: dict[str, Any], memory: Any) -> int:
        """Rows a killed run added after its last recorded checkpoint and the tiers hold: checked
        against the source and recorded as done. Returns how many."""
        run = rec.get("run")
        if not run:
            return 0
        id0, plan, c = run["id_start"], run["plan"], run["committed"]
        planned = sum(hi - lo for lo, hi in plan)
        next_id = int(memory.stats()["added"])
        cand = np.arange(id0 + c, min(id0 + planned, next_id), dtype=np.int64)
        found_rows = 0
        if cand.size:
            home = memory.catalog.home[cand]
            cand = cand[home >= 0]  # on a tier (a kill lost the rest before write-behind stored them)
        if cand.size:
            stores = [t.store for t in memory.tiers]
            ks = cand - id0
            rows = _plan_rows(plan, ks)
            order = np.argsort(rows)
            x, y, t = self.rows(rows[order])
            got, found = _read_stored(stores, cand[order])
            same = found.copy()
            if got is not None:
                flat = (got["x"].reshape(len(cand), -1) == x.reshape(len(cand), -1)).all(axis=1)
                same &= flat & (got["y"] == y) & (got["task"] == t)
            for k in ks[order][same]:  # ids whose records are the rows this run added: done
                rec["done"].extend(_segments(plan, int(k), int(k) + 1, id0))
            found_rows = int(same.sum())
        rec["run"] = None
        return found_rows

    def check_capacity(self, memory: Any, rows: int, done: int) -> None:
        """Refuse rows the tiers cannot hold: the last tier would evict samples (maybe imported ones)."""
        stored = sum(len(t.store) for t in memory.tiers)
        capacity = sum(t.capacity for t in memory.tiers)
        if stored + rows > capacity:
            raise ImportSourceError(
                f"{rows} rows do not fit: the tiers hold {stored} samples of {capacity} in all, and samples over "
                f"capacity are evicted from the last tier; import fewer rows (--limit {done + max(0, capacity - stored)}"
                ") or give the tiers more capacity")


def import_dataset(config: CarouselConfig, source: str | os.PathLike[str], opts: ImportOptions | None = None, *,
                   progress: bool | None = False, log: Callable[[str], None] | None = None,
                   stop: Callable[[], bool] | None = None) -> ImportResult:
    """Import the data set at ``source`` into the memory ``config`` describes, resuming an
    interrupted import of the same source; see the module docstring.

    ``progress``: draw a bar on stderr (None: when stderr is a terminal). ``log`` gets one-line
    notes (a resumed import, rows recovered). ``stop``: asked between batches; once true, the rows
    added so far are flushed and recorded and :class:`KeyboardInterrupt` is raised (the command
    line's SIGINT and SIGTERM set it: a signal between two adds, never inside one). The caller makes
    sure no other process (a daemon) writes the memory: the stores refuse a second writer
    (``StoreLockedError``) in any case. Raises :class:`ImportSourceError` before anything is added
    for a source that does not fit.
    """
    opts = opts or ImportOptions()
    say = log or (lambda _line: None)
    job = _Job(config, source, opts)
    rec = job.load()
    t0 = time.monotonic()
    from .memory import CarouselMemory  # torch: only once the source and the options are known good

    memory = CarouselMemory(config)
    added = recovered = 0
    try:
        recovered = job.reconcile(rec, memory)
        if recovered:
            say(f"{recovered} rows an interrupted run stored after its last checkpoint: found on the tiers, "
                "checked against the source, kept")
        todo = _todo(rec["done"], job.target)
        n_todo = sum(hi - lo for lo, hi in todo)
        if rec["done"] and n_todo:
            say(f"resuming: {sum(hi - lo for lo, hi, _ in rec['done'])} rows imported before, {n_todo} to go")
        if n_todo:
            job.check_capacity(memory, n_todo, job.target - n_todo)
            rec["complete"] = False
            id0 = int(memory.stats()["added"])  # one writer, no leases: the next add's first id
            rec["run"] = {"id_start": id0, "plan": todo, "committed": 0}
            job.save(rec)  # before the first add: a kill from here on is reconciled by id
            bar = ProgressBar(job.target, "import", start=job.target - n_todo, enabled=progress)
            k = 0

            def commit() -> None:
                memory.flush(timeout_s=300.0)  # stored and durable first, then recorded
                rec["done"].extend(_segments(todo, rec["run"]["committed"], k, id0))
                rec["run"]["committed"] = k
                job.save(rec)

            try:
                for lo, hi in todo:
                    for a in range(lo, hi, opts.batch):
                        if stop is not None and stop():
                            raise KeyboardInterrupt  # below: what was added is flushed, then recorded
                        b = min(hi, a + opts.batch)
                        x, y, t = job.rows(np.arange(a, b, dtype=np.int64))
                        ids = memory.add(x, y, task=t).numpy()
                        if not np.array_equal(ids, np.arange(id0 + k, id0 + k + ids.size)):
                            raise RuntimeError(f"ids {ids[:3].tolist()}... are not the run's next ones ({id0 + k}...): "
                                               "another writer added to the memory during the import")
                        k += ids.size
                        added += ids.size
                        if k - rec["run"]["committed"] >= opts.checkpoint_rows:
                            commit()
                        bar.update(job.target - n_todo + k)
                commit()
            except BaseException:
                if k > rec["run"]["committed"]:
                    try:  # keep what was added (Ctrl-C, a bad file further on): a rerun goes on from here
                        commit()
                    except Exception:  # noqa: BLE001 - the first error is the one to report; rows are reconciled later
                        pass
                raise
            finally:
                bar.close()
            rec["run"] = None
        job.save(rec)
    finally:
        memory.close()
    seconds = time.monotonic() - t0
    digest, problems = _check_stored(job, rec, progress)
    if problems:
        raise ImportSourceError(f"the import stored {rec['rows']} rows but reading them back found: {problems[0]}"
                                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                                + "; the tiers' capacity or class quotas may be too small for the data set")
    rec.update(complete=rec["rows"] >= job.target, records_sha256=digest, finished_at=time.time())
    job.save(rec)
    return ImportResult(rec["rows"], added, recovered, job.identity["sha256"], digest, job.path, seconds)


def _check_stored(job: _Job, rec: dict[str, Any], progress: bool | None = False) -> tuple[str, list[str]]:
    """Read every recorded row back from the tiers (read-only), compare it with the source row and
    return the records' SHA-256 (:func:`records_digest`) and a line per kind of problem found."""
    rows, ids = _row_ids(rec["done"])
    stores = _open_ro(job.config)
    h = hashlib.sha256()
    missing = differ = 0
    bar = ProgressBar(ids.size, "check ", enabled=progress)
    try:
        for a in range(0, ids.size, _READ_ROWS):
            bar.update(a)
            r, i = rows[a:a + _READ_ROWS], ids[a:a + _READ_ROWS]
            got, found = _read_stored(stores, i)
            missing += int((~found).sum())
            if got is None:
                continue
            x, y, t = job.rows(r)
            same = (got["x"].reshape(len(i), -1) == x.reshape(len(i), -1)).all(axis=1) & (got["y"] == y) \
                & (got["task"] == t)
            differ += int((found & ~same).sum())
            records_digest(i, got["y"], got["task"], got["x"], h)
        bar.update(ids.size)
    finally:
        bar.close()
        for s in stores:
            s.close()
    problems = []
    if missing:
        problems.append(f"{missing} of {ids.size} imported rows are on no tier (evicted since, or lost)")
    if differ:
        problems.append(f"{differ} stored records differ from their source rows")
    return h.hexdigest(), problems


def verify_import(config: CarouselConfig, source: str | os.PathLike[str],
                  opts: ImportOptions | None = None) -> VerifyResult:
    """Re-check an import: the source's files against the sha256s recorded, and the records on the
    tiers (read-only) against the source and the recorded ``records_sha256``.

    Also works while a daemon serves the memory (its tiers are read, not written), though samples
    it evicted since count as missing. Raises :class:`ImportSourceError` when no import of
    ``source`` with these options is recorded.
    """
    opts = opts or ImportOptions()
    _check_memory(config)
    lines: list[str] = []
    ok = True
    try:
        job: _Job | None = _Job(config, source, opts)
        ident = job.identity
        path = job.path if job.path.exists() else None
    except ImportSourceError as exc:  # the source is unreadable now: check what was recorded by path
        job, ident, path = None, None, None
        lines.append(f"source: cannot be read now: {exc}")
        ok = False
    folder = state_dir_of(config) / IMPORTS_DIR
    given = str(Path(source).expanduser().absolute())
    where = ident["path"] if ident is not None else given  # an IDX folder resolves to its images file
    rec = json.loads(path.read_text()) if path else None
    if rec is None:  # the content changed (or cannot be read): find the import by path and options
        for _p, other in _records(folder):
            was = other.get("source", {}).get("path", "")
            if where in (was, os.path.dirname(was)) and other.get("options") == opts.identity():
                rec = other
        if rec is None:
            raise ImportSourceError(f"no import of {where} with these options is recorded in {folder}")
    if ident is not None:
        if ident["sha256"] == rec["source"]["sha256"]:
            lines.append(f"source: {len(ident['files'])} file(s), sha256 {ident['sha256']}: as imported")
        else:
            ok = False
            before = {os.path.basename(f["path"]): f for f in rec["source"]["files"]}
            for f in ident["files"]:
                old = before.get(os.path.basename(f["path"]))
                if old is None or old["sha256"] != f["sha256"]:
                    lines.append(f"source: {f['path']} changed since the import: sha256 "
                                 f"{old['sha256'] if old else '(not read then)'} then, {f['sha256']} now")
            lines.append(f"source: sha256 {ident['sha256']} now, {rec['source']['sha256']} when imported")
    if not rec.get("records_sha256"):
        lines.append(f"records: the import is not finished ({rec.get('rows', 0)} rows so far); rerun it first")
        return VerifyResult(False, lines)
    if job is not None and ok:
        digest, problems = _check_stored(job, rec)
    else:  # no source to compare rows with: the digest alone
        rows, ids = _row_ids(rec["done"])
        stores = _open_ro(config)
        h, missing = hashlib.sha256(), 0
        try:
            for a in range(0, ids.size, _READ_ROWS):
                got, found = _read_stored(stores, ids[a:a + _READ_ROWS])
                missing += int((~found).sum())
                if got is not None:
                    records_digest(ids[a:a + _READ_ROWS], got["y"], got["task"], got["x"], h)
        finally:
            for s in stores:
                s.close()
        digest = h.hexdigest()
        problems = [f"{missing} of {ids.size} imported rows are on no tier (evicted since, or lost)"] if missing else []
    lines += [f"records: {p}" for p in problems]
    if digest == rec["records_sha256"]:
        lines.append(f"records: {rec['rows']} rows, sha256 {digest}: as imported")
    else:
        ok = False
        lines.append(f"records: sha256 {digest} now, {rec['records_sha256']} when imported")
    return VerifyResult(ok and not problems, lines)


def describe(result: ImportResult) -> list[str]:
    """The lines ``carousel import`` prints at the end (the manifest's summary)."""
    return [f"imported {result.rows} rows ({result.added} added now"
            + (f", {result.recovered} recovered from an interrupted run" if result.recovered else "")
            + (f", {result.rate:,.0f} samples/s" if result.added else "") + ")",
            f"source sha256:  {result.source_sha256}",
            f"records sha256: {result.records_sha256}",
            f"manifest:       {result.record}"]

