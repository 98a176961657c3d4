"""Crash tests with real processes and SIGKILL (RELIABILITY.md, durability 1-3).

What must hold after a writer is killed at any moment:

- every ``put_many`` / ``delete_many`` that returned (the writer printed its ACK line) is visible,
  byte for byte, exactly once; acknowledged deletes stay deleted;
- the one call in flight at the kill is wholly visible or wholly absent, never partial;
- reopening needs the URL only; ``len()`` matches; no index entry points at a missing or damaged
  row (``get_many(ids())`` passes every checksum) and nothing was quarantined;
- a Zarr chunk write cut short leaves no torn row and its ``*.partial`` orphans are swept on open;
  the files store's temp files and unnamed record files are swept the same way;
- an LMDB write transaction cut short leaves the last commit; stale reader slots are cleared;
- the writer lock dies with its holder.

The writer is a small script written into ``tmp_path``; the parent imports the same file to know
the plan, so the two can never disagree about what an ACK means.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from storage_backends import StoreLockedError, open_store

ROOT = Path(__file__).resolve().parents[2]

WRITER_SRC = r'''
"""Crash-test writer, written into tmp_path by tests/storage_backends/test_crash.py.

    python crash_writer.py URL START_STEP START_OP [COMPACT_BYTES]

Opens the store, runs the deterministic plan from (START_STEP, START_OP) on and prints
"ACK step op" (flushed) after each call returns. It never stops by itself: the parent kills it.
"""
import sys

import numpy as np

BATCH = 64
NEW_BASE = 10_000_000  # ids first written by a mixed replace-and-add call
from tests.storage_backends.crash_records import SCHEMA, fields  # noqa: E402 - shared with test_faults.py


def step_ops(b):
    """The calls of step ``b``: ``(kind, ids, seed)``; ``kind`` is "put" or "delete"."""
    ops = [("put", np.arange(b * BATCH, (b + 1) * BATCH, dtype=np.int64), b)]
    if b % 3 == 2:  # replace 16 ids of batch b-2 and add 8 new ids, in one call, unsorted
        old = np.arange((b - 2) * BATCH, (b - 2) * BATCH + 16, dtype=np.int64)
        new = np.arange(NEW_BASE + 8 * b, NEW_BASE + 8 * b + 8, dtype=np.int64)
        ops.append(("put", np.concatenate([new[:4], old[::-1], new[4:]]), 1_000_000 + b))
    if b % 4 == 3:  # delete 8 ids of batch b-3 (never touched by a replace)
        ops.append(("delete", np.arange((b - 3) * BATCH + 20, (b - 3) * BATCH + 28, dtype=np.int64), None))
    return ops


def main():
    url, step, op = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    compact_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    if compact_bytes:
        # Compact the row manifest (Zarr, flat) every COMPACT_BYTES of journal (the store waits for
        # 1 MiB and 24 bytes per live id), so that kills also land inside compactions: snapshot
        # write, journal switch, unlink of the old pair.
        from storage_backends.row_manifest import Manifest

        def maybe_compact(self):
            if self._journal_bytes > compact_bytes:
                self.compact()

        Manifest._maybe_compact = maybe_compact
    from storage_backends import open_store

    store = open_store(url, SCHEMA)
    print("READY", flush=True)
    while True:
        ops = step_ops(step)
        for k in range(op, len(ops)):
            kind, ids, seed = ops[k]
            if kind == "put":
                store.put_many(ids, fields(ids, seed))
            else:
                store.delete_many(ids)
            print(f"ACK {step} {k}", flush=True)
        step, op = step + 1, 0


if __name__ == "__main__":
    main()
'''


# ---- helpers ------------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def load_writer(tmp_path: Path):
    """Write the writer script into ``tmp_path`` and import it here too (for its plan)."""
    path = tmp_path / "crash_writer.py"
    path.write_text(WRITER_SRC)
    spec = importlib.util.spec_from_file_location(f"crash_writer_{abs(hash(str(tmp_path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


class Model:
    """What the store must hold: ``id -> (seed, index in that put)``; trivially correct."""

    def __init__(self, writer) -> None:
        self.w = writer
        self.rec: dict[int, tuple[int, int]] = {}
        self.put_ids: dict[int, np.ndarray] = {}  # seed -> ids of the put that used it

    def copy(self) -> Model:
        m = Model(self.w)
        m.rec = dict(self.rec)
        m.put_ids = self.put_ids  # append-only, shared
        return m

    def apply(self, op) -> None:
        kind, ids, seed = op
        if kind == "put":
            self.put_ids[seed] = ids
            for i, id_ in enumerate(ids.tolist()):
                self.rec[id_] = (seed, i)
        else:
            for id_ in ids.tolist():
                del self.rec[id_]  # a KeyError here means the plan deletes an absent id

    def ids(self) -> np.ndarray:
        return np.array(sorted(self.rec), dtype=np.int64)

    def expected(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The exact records of ``ids`` (all in the model), in that order."""
        out = {name: np.empty((ids.size, *shape), dtype) for name, (shape, dtype) in self.w.SCHEMA.items()}
        by_seed: dict[int, list[tuple[int, int]]] = {}
        for pos, id_ in enumerate(ids.tolist()):
            seed, i = self.rec[id_]
            by_seed.setdefault(seed, []).append((pos, i))
        for seed, pairs in by_seed.items():
            made = self.w.fields(self.put_ids[seed], seed)
            dst = np.array([p for p, _ in pairs])
            src = np.array([i for _, i in pairs])
            for name in out:
                out[name][dst] = made[name][src]
        return out

    def mismatch(self, ids: np.ndarray, got: dict[str, np.ndarray]) -> str | None:
        """``None`` if the store's ``ids`` and records equal the model exactly, else why not."""
        want = self.ids()
        if not np.array_equal(ids, want):
            extra = np.setdiff1d(ids, want)
            missing = np.setdiff1d(want, ids)
            return f"ids differ: {missing.size} missing {missing[:8].tolist()}, {extra.size} extra {extra[:8].tolist()}"
        exp = self.expected(ids)
        bad = np.zeros(ids.size, dtype=bool)
        for name in exp:
            bad |= (got[name] != exp[name]).reshape(ids.size, -1).any(axis=1)
        if bad.any():
            return f"{int(bad.sum())} record(s) with wrong bytes, e.g. ids {ids[bad][:8].tolist()}"
        return None


def snapshot(url: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Reopen with the URL only and read everything, checking the store's own invariants."""
    with open_store(url) as store:
        ids = store.ids()
        assert np.all(np.diff(ids) > 0), "ids() must be ascending and unique"
        assert len(store) == ids.size
        assert store.quarantined_ids().size == 0, f"records quarantined: {store.quarantined_ids()[:8]}"
        got = store.get_many(ids)  # every index entry points at a row that passes its checksum
        assert store.contains(ids).all()
        chunked = np.sort(np.concatenate([c.ids for c in store.iter_chunks()] or [np.zeros(0, np.int64)]))
        assert np.array_equal(chunked, ids), "iter_chunks() and ids() disagree"
        if url.startswith("files://"):  # the open swept what the kill left: one file per live record
            left = sorted(p.name for p in (store.path / "data").rglob("*") if p.is_file())
            assert len(left) == ids.size and all(n.endswith(".rec") for n in left), left[:8]
    return ids, got


def run_writer(script: Path, url: str, start: tuple[int, int], delay_s: float, tmp_path: Path,
               compact_bytes: int = 0) -> list[tuple[int, int]]:
    """Start the writer, SIGKILL it ``delay_s`` after it opened the store; return its ACKs."""
    err_path = tmp_path / "writer.stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(script), url, str(start[0]), str(start[1]),
                                 str(compact_bytes)], stdout=subprocess.PIPE, stderr=err, text=True,
                                env=child_env())
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:  # drain stdout continuously, so the writer never blocks on a full pipe
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("READY"):
                ready.set()
        ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert ready.wait(60), "writer did not start"
        time.sleep(delay_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        reader.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, \
        f"writer exited by itself (rc {proc.returncode}): {err_path.read_text()[-3000:]}"
    assert lines and lines[0] == "READY", f"writer output {lines[:3]}: {err_path.read_text()[-3000:]}"
    acks = []
    for line in lines[1:]:
        tag, step, op = line.split()
        assert tag == "ACK", line
        acks.append((int(step), int(op)))
    return acks


def plan_from(writer, step: int, op: int):
    """The writer's calls from ``(step, op)`` on, as ``((step, op), call)``."""
    while True:
        ops = writer.step_ops(step)
        for k in range(op, len(ops)):
            yield (step, k), ops[k]
        step, op = step + 1, 0


# ---- 1. random kills, many rounds, every store flavour -----------------------------------------
CASES = [
    # (id, scheme, URL query, COMPACT_BYTES for the writer, longest delay before the kill in s)
    ("lmdb-sync1-smallmap", "lmdb", "sync=1&map_size=256KiB", 0, 0.2),  # kills land in map growth too
    ("lmdb-sync0", "lmdb", "sync=0", 0, 0.06),  # ~2,000 calls/s here: keep the store small
    ("zarr-sync1", "zarr", "chunk=16&sync=1", 16384, 0.25),  # ... and in manifest compactions
    ("zarr-sync0", "zarr", "chunk=16&sync=0", 0, 0.25),
    ("zarr-zstd-sync0", "zarr", "chunk=16&codec=zstd&sync=0", 16384, 0.25),
    ("flat-sync1", "flat", "chunk=16&sync=1", 16384, 0.25),  # the flat store's manifest compacts too
    ("flat-sync0", "flat", "chunk=16&sync=0", 0, 0.25),
    ("files-sync1", "files", "chunk=16&sync=1", 16384, 0.25),  # kills land between a batch's renames too
    ("files-sync0-zstd", "files", "chunk=16&sync=0&codec=zstd", 0, 0.25),
]
ROUNDS = 6


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sigkill_at_random_moments_keeps_every_acknowledged_call(tmp_path, case):
    name, scheme, query, compact_bytes, max_delay_s = case
    script, writer = load_writer(tmp_path)
    url = f"{scheme}://{tmp_path / 'store'}?{query}"
    rng = random.Random(f"carousel-crash-{name}")  # seeded: a failure replays the same kills
    model = Model(writer)
    start = (0, 0)
    acked_total = 0
    for _round in range(ROUNDS):
        acks = run_writer(script, url, start, rng.uniform(0.005, max_delay_s), tmp_path, compact_bytes)
        plan = plan_from(writer, *start)
        for ack in acks:  # the acknowledged calls, in order, change the model
            where, op = next(plan)
            assert ack == where, f"writer acknowledged {ack}, plan expected {where}"
            model.apply(op)
        acked_total += len(acks)
        where, inflight = next(plan)  # the call running (or about to run) at the kill
        after = model.copy()
        after.apply(inflight)

        ids, got = snapshot(url)
        why_not_before = model.mismatch(ids, got)
        why_not_after = after.mismatch(ids, got)
        assert why_not_before is None or why_not_after is None, (
            f"round {_round}: the store is neither the acknowledged state nor that plus the in-flight "
            f"call {where} ({inflight[0]} of {inflight[1].size} ids). vs acknowledged: {why_not_before}; "
            f"vs acknowledged + in-flight: {why_not_after}")
        if why_not_before is None:  # the in-flight call left no trace: the next writer redoes it
            start = where
        else:  # it completed before the kill: keep it, continue after it
            model = after
            nxt = next(plan)[0]
            start = nxt
    assert acked_total >= ROUNDS, f"the writers acknowledged only {acked_total} calls: nothing was tested"
    assert len(model.rec) > 0


# ---- 2. SIGKILL inside a Zarr chunk write --------------------------------------------------------
ZARR_KILL_SRC = r'''
import os, pathlib, signal, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
from crash_writer import SCHEMA, fields
from storage_backends import open_store

url, nth = sys.argv[1], int(sys.argv[2])
store = open_store(url, SCHEMA)
for b in range(3):
    ids = np.arange(b * 64, b * 64 + 64)
    store.put_many(ids, fields(ids, b))
print("ACKED", flush=True)

# zarr writes every chunk to "<chunk>.<uuid>.partial" and renames it into place: die at the
# nth rename of this call, with the .partial complete on disk and the chunk not yet replaced.
real_replace = pathlib.Path.replace
renames = 0

def replace(self, target):
    global renames
    if self.name.endswith(".partial"):
        renames += 1
        if renames == nth:
            print("KILL", self, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(self, target)

pathlib.Path.replace = replace
ids = np.concatenate([np.arange(0, 32), np.arange(5000, 5032)])  # replaces 32, adds 32
store.put_many(ids, fields(ids, 99))
print("RETURNED", flush=True)
'''


@pytest.mark.timeout(60)
@pytest.mark.parametrize("nth, query", [
    (1, "chunk=16&codec=none&sync=1"),  # first chunk of x: nothing of the call is in place
    (5, "chunk=16&codec=zstd&sync=0"),  # x complete, y not: torn across fields on disk
    (6, "chunk=16&codec=none&sync=0"),  # x and y complete, task not
])
def test_sigkill_during_zarr_chunk_write_leaves_no_torn_row_and_orphans_are_swept(tmp_path, nth, query):
    _, writer = load_writer(tmp_path)
    script = tmp_path / "zarr_kill.py"
    script.write_text(ZARR_KILL_SRC)
    store_dir = tmp_path / "store"
    url = f"zarr://{store_dir}?{query}"
    r = subprocess.run([sys.executable, str(script), url, str(nth)], capture_output=True, text=True,
                       env=child_env(), timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    out = r.stdout.split("\n")
    assert out[0] == "ACKED" and out[1].startswith("KILL "), r.stdout
    orphan = Path(out[1].split(" ", 1)[1])
    assert orphan.exists(), "the kill should have left the chunk's .partial file behind"

    model = Model(writer)
    for b in range(3):
        ids = np.arange(b * 64, b * 64 + 64)
        model.apply(("put", ids, b))
    # Orphans of other crashes, anywhere in the tree: the open must sweep them too.
    fakes = [store_dir / "x" / "c" / "0" / "0" / "0.0123456789abcdef.partial",
             store_dir / "y" / "c" / "9.fedcba9876543210.partial"]
    for fake in fakes:
        fake.parent.mkdir(parents=True, exist_ok=True)
        fake.write_bytes(b"\xde\xad" * 1000)

    ids, got = snapshot(url)  # a writable open: sweeps
    assert model.mismatch(ids, got) is None, model.mismatch(ids, got)
    left = sorted(store_dir.rglob("*.partial"))
    assert not left, f"orphans not swept: {left}"

    # The store keeps working: redo the interrupted call (it reuses the rows it had written).
    new = np.concatenate([np.arange(0, 32), np.arange(5000, 5032)])
    with open_store(url) as store:
        store.put_many(new, writer.fields(new, 99))
    model.apply(("put", new, 99))
    ids, got = snapshot(url)
    assert model.mismatch(ids, got) is None, model.mismatch(ids, got)


# ---- 3. SIGKILL inside an LMDB write transaction; stale readers -----------------------------------
LMDB_KILL_SRC = r'''
import os, signal, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
from crash_writer import SCHEMA, fields
from storage_backends import open_store

url, n_new = sys.argv[1], int(sys.argv[2])
store = open_store(url, SCHEMA)
for b in range(3):
    ids = np.arange(b * 64, b * 64 + 64)
    store.put_many(ids, fields(ids, b))
print("ACKED", store._env.info()["map_size"], flush=True)

real_write = store._write

def write_then_die(body, needed):
    def body_then_kill(txn):
        body(txn)  # every record is in the open write transaction; the commit never comes
        print("KILL", store._env.info()["map_size"], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(body_then_kill, needed)

store._write = write_then_die
ids = np.concatenate([np.arange(0, 32), np.arange(5000, 5000 + n_new)])
store.put_many(ids, fields(ids, 99))
print("RETURNED", flush=True)
'''


@pytest.mark.timeout(60)
@pytest.mark.parametrize("query, n_new, grows", [
    ("sync=1", 32, False),
    ("sync=0", 32, False),
    ("sync=1&map_size=256KiB", 600, True),  # the killed transaction first grew the map
])
def test_sigkill_inside_lmdb_write_txn_keeps_last_commit(tmp_path, query, n_new, grows):
    _, writer = load_writer(tmp_path)
    script = tmp_path / "lmdb_kill.py"
    script.write_text(LMDB_KILL_SRC)
    url = f"lmdb://{tmp_path / 'store'}?{query}"
    r = subprocess.run([sys.executable, str(script), url, str(n_new)], capture_output=True, text=True,
                       env=child_env(), timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    out = r.stdout.split("\n")
    assert out[0].startswith("ACKED ") and out[1].startswith("KILL "), r.stdout
    if grows:
        assert int(out[1].split()[1]) > int(out[0].split()[1]), "the map should have grown in the killed txn"

    model = Model(writer)
    for b in range(3):
        model.apply(("put", np.arange(b * 64, b * 64 + 64), b))
    ids, got = snapshot(url)
    assert model.mismatch(ids, got) is None, model.mismatch(ids, got)

    # A later writer works and its commits stick.
    new = np.concatenate([np.arange(0, 32), np.arange(5000, 5000 + n_new)])
    with open_store(url) as store:
        store.put_many(new, writer.fields(new, 99))
        store.delete_many(np.arange(100, 110))
    model.apply(("put", new, 99))
    model.apply(("delete", np.arange(100, 110), None))
    ids, got = snapshot(url)
    assert model.mismatch(ids, got) is None, model.mismatch(ids, got)


HOLDER_SRC = r'''
import sys, time
from storage_backends import open_store
store = open_store(sys.argv[1])
if sys.argv[2] == "txn":
    txn = store._read().__enter__()  # a read transaction held open: a reader slot pins its snapshot
    txn.get(b"\0" * 8, db=store._data)
print("HOLDING", flush=True)
time.sleep(120)
'''


def start_holder(tmp_path: Path, url: str, what: str) -> subprocess.Popen:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER_SRC)
    proc = subprocess.Popen([sys.executable, str(script), url, what], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    line = proc.stdout.readline().strip()
    if line != "HOLDING":
        proc.kill()
        raise AssertionError(f"holder failed: {line!r} {proc.stderr.read()[-3000:]}")
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.timeout(60)
def test_stale_lmdb_readers_of_killed_processes_are_cleared(tmp_path):
    """A killed reader's slot pins the snapshot it read, so LMDB could never reuse the pages
    replaced since: with ``max_size`` 3 MiB and 200 KiB live, rewriting the records 40 times
    only fits if the slot is cleared. An idle reader process stays alive throughout, so LMDB
    does not simply reset its lock table on the next open: the store has to call reader_check."""
    _, writer = load_writer(tmp_path)
    url = f"lmdb://{tmp_path / 'store'}?map_size=1MiB&max_size=3MiB"
    ids = np.arange(64)
    with open_store(url, writer.SCHEMA) as store:
        store.put_many(ids, writer.fields(ids, 0))
    idle = start_holder(tmp_path, url + "&mode=ro", "open")
    try:
        # (a) killed while no writer is open: cleared when the next writer opens.
        kill(start_holder(tmp_path, url + "&mode=ro", "txn"))
        with open_store(url) as store:
            for seed in range(1, 41):
                store.put_many(ids, writer.fields(ids, seed))
            assert np.array_equal(store.get_many(ids)["x"], writer.fields(ids, 40)["x"])
            # (b) killed while a long-lived writer (sync=1: no flush loop) has the store open.
            kill(start_holder(tmp_path, url + "&mode=ro", "txn"))
            for seed in range(41, 81):
                store.put_many(ids, writer.fields(ids, seed))
    finally:
        kill(idle)
    with open_store(url) as store:
        got = store.get_many(ids)
    want = writer.fields(ids, 80)
    for name in want:
        assert np.array_equal(got[name], want[name])


# ---- 4. the writer lock dies with its holder ------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheme", ["lmdb", "zarr", "flat", "files"])
def test_writer_lock_is_released_when_its_holder_is_killed(tmp_path, scheme):
    _, writer = load_writer(tmp_path)
    url = f"{scheme}://{tmp_path / 'store'}"
    ids = np.arange(10)
    with open_store(url, writer.SCHEMA) as store:
        store.put_many(ids, writer.fields(ids, 1))
    holder = start_holder(tmp_path, url, "open")
    try:
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            open_store(url)
    finally:
        kill(holder)
    with open_store(url) as store:  # right away: no stale lock file, no waiting
        store.put_many(ids + 10, writer.fields(ids + 10, 2))
        assert len(store) == 20
        assert np.array_equal(store.get_many(ids)["x"], writer.fields(ids, 1)["x"])
