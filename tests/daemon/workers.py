"""Client-process bodies for the daemon tests (a helper module, not a test file).

They run in ``multiprocessing`` 'spawn' children: top-level functions taking plain arguments,
returning (or putting on a queue) plain, picklable results. Every error is caught and returned as
text, so the parent asserts on it instead of a child dying silently.

Samples' contents follow :func:`pattern`: a sample's ``x`` is a function of its id alone, so any
process can check any row it is handed without knowing who added it.
"""

from __future__ import annotations

import os
import time
import traceback

import numpy as np


def pattern(ids: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` (uint8) of the samples ``ids``: byte ``i`` of sample ``k`` is ``(k * 131 + i * 7) % 251``,
    except byte 0, which is ``(k // 251) % 256`` (so ids 251 apart still differ)."""
    ids = np.asarray(ids, dtype=np.int64)
    width = int(np.prod(shape))
    out = (ids[:, None] * 131 + np.arange(width, dtype=np.int64)[None, :] * 7) % 251
    out[:, 0] = (ids // 251) % 256
    return out.astype(np.uint8).reshape(len(ids), *shape)


def label_of(ids: np.ndarray) -> np.ndarray:
    return (np.asarray(ids, dtype=np.int64) * 7919) % 10


def check_rows(ids: np.ndarray, x: np.ndarray, y: np.ndarray, shape: tuple[int, ...], probe: int = 64) -> str | None:
    """None when the rows match :func:`pattern` (the first ``probe`` bytes of each); else why not."""
    ids = np.asarray(ids, dtype=np.int64)
    flat = np.asarray(x).reshape(len(ids), -1)[:, :probe]
    want = pattern(ids, shape).reshape(len(ids), -1)[:, :probe]
    bad = np.flatnonzero((flat != want).any(axis=1))
    if bad.size:
        return f"x of ids {ids[bad][:5].tolist()} does not match what was added"
    bad = np.flatnonzero(np.asarray(y) != label_of(ids))
    if bad.size:
        return f"y of ids {ids[bad][:5].tolist()} is {np.asarray(y)[bad][:5].tolist()}, added " \
               f"{label_of(ids[bad][:5]).tolist()}"
    return None


def add_then_sample(sock: str, worker: int, n_add: int, n_batches: int, batch: int,
                    shape: tuple[int, ...]) -> dict:
    """Connect, add ``n_add`` samples (x by id is unknown before the add, so this worker's rows carry
    its number in every byte and its label), then draw batches; report what it saw."""
    import torch

    import carousel

    out: dict = {"pid": os.getpid(), "errors": [], "ids": [], "batches": 0, "own_seen": 0}
    try:
        c = carousel.connect(sock)
        x = torch.full((n_add, *shape), worker + 1, dtype=torch.uint8)
        y = torch.full((n_add,), 100 + worker, dtype=torch.int64)
        ids = c.add(x, y, task=worker)
        out["ids"] = ids.tolist()
        for _ in range(n_batches):
            b = c.sample(batch)
            if len(set(b.ids.tolist())) != len(b):
                out["errors"].append(f"duplicate ids in a batch: {b.ids.tolist()}")
            # Every row's bytes, label and task say which worker added it.
            w = b.y - 100
            if not bool(((w >= 0) & (w < 16)).all()):
                out["errors"].append(f"unexpected labels {b.y.tolist()}")
                continue
            want_x = (w + 1).to(torch.uint8)[:, None].expand(len(b), b.x[0].numel())
            if not torch.equal(b.x.reshape(len(b), -1), want_x) or not torch.equal(b.task.to(torch.int64), w):
                out["errors"].append("a row's x or task does not match its label's worker")
            mine = set(ids.tolist())
            out["own_seen"] += sum(1 for i in b.ids.tolist() if i in mine)
            out["batches"] += 1
        # A ring's batches may have been drawn before this worker's add landed in the EM (the add
        # is queued; sample() says so): on a loaded machine all 20 above can be. The promise is
        # that its samples reach its batches soon, so it keeps drawing until they do, or 30 s.
        deadline = time.monotonic() + 30
        while not out["own_seen"] and time.monotonic() < deadline:
            out["own_seen"] += sum(1 for i in c.sample(batch).ids.tolist() if i in set(ids.tolist()))
        out["stats_added"] = c.stats()["added"]
        c.close()
    except Exception:  # noqa: BLE001 - reported to the parent
        out["errors"].append(traceback.format_exc())
    return out


# ---- the load test -------------------------------------------------------------------------------------
def load_sampler(sock: str, worker: int, batch: int, shape: tuple[int, ...], start_box, duration: float,
                 ready, go, results) -> None:
    """Sample ``batch``-row batches from ``start_box.value`` (monotonic) for ``duration`` s, check
    every row against :func:`pattern`, observe every 4th batch; put ``{"worker", "errors", "latencies", ...}`` on
    ``results``."""
    out: dict = {"worker": worker, "role": "sampler", "pid": os.getpid(), "errors": [], "latencies": [],
                 "batches": 0, "short": 0, "observes": 0}
    try:
        import torch

        import carousel

        c = carousel.connect(sock, reconnect_s=60, wait_s=90)  # the daemon may still be opening
        c.stats()  # connected
        ready.set()
        go.wait(120)
        deadline = start_box.value + duration
        rng = np.random.default_rng(worker)
        lat = []
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                b = c.sample(batch)
            except Exception as exc:  # noqa: BLE001
                out["errors"].append(f"sample: {exc!r}")
                continue
            lat.append(time.perf_counter() - t0)
            out["batches"] += 1
            ids = b.ids.numpy()
            if len(b) != batch:
                out["short"] += 1
                out["errors"].append(f"short batch: {len(b)} rows")
            if np.unique(ids).size != ids.size:
                out["errors"].append("duplicate ids in a batch")
            why = check_rows(ids, b.x.numpy(), b.y.numpy(), shape, probe=16)
            if why:
                out["errors"].append(why)
            if out["batches"] % 4 == 0:
                try:
                    c.observe(b.ids, loss=torch.from_numpy(rng.random(len(b), dtype=np.float32)))
                    out["observes"] += 1
                except Exception as exc:  # noqa: BLE001
                    out["errors"].append(f"observe: {exc!r}")
            del b
            if len(out["errors"]) > 20:
                break
        out["latencies"] = lat
        c.close()
    except Exception:  # noqa: BLE001
        out["errors"].append(traceback.format_exc())
    finally:
        ready.set()
        results.put(out)


def load_adder(sock: str, shape: tuple[int, ...], prefill: int, per_add: int, interval: float, start_box,
               duration: float, ready, go, results) -> None:
    """Add ``prefill`` samples, signal ready, then ``per_add`` every ``interval`` s until ``duration``
    ends; ids must come back consecutive from 0 (this is the only adder). The prefill is task 0,
    the run task 1 then (second half) task 2: swapping (from task 1 on) runs throughout the run."""
    out: dict = {"role": "adder", "pid": os.getpid(), "errors": [], "acked": 0, "latencies": [], "adds": 0}
    try:
        import torch

        import carousel

        c = carousel.connect(sock, reconnect_s=60, wait_s=90)  # the daemon may still be opening
        next_id = 0

        def add(n: int, task: int) -> None:
            nonlocal next_id
            ids = np.arange(next_id, next_id + n)
            t0 = time.perf_counter()
            got = c.add(torch.from_numpy(pattern(ids, shape)), torch.from_numpy(label_of(ids)), task=task).numpy()
            out["latencies"].append(time.perf_counter() - t0)
            if not np.array_equal(got, ids):
                raise AssertionError(f"add returned ids {got[:4]}.. expected {ids[:4]}..")
            next_id += n
            out["acked"] = next_id
            out["adds"] += 1

        for lo in range(0, prefill, per_add):
            add(min(per_add, prefill - lo), 0)
        ready.set()
        go.wait(120)
        start = start_box.value
        deadline = start + duration
        tick = time.monotonic()
        while time.monotonic() < deadline:
            task = min(2, 1 + int(2 * (time.monotonic() - start) / duration))
            try:
                add(per_add, task)
            except Exception as exc:  # noqa: BLE001
                out["errors"].append(f"add: {exc!r}")
                if len(out["errors"]) > 20:
                    break
            tick += interval
            time.sleep(max(0.0, tick - time.monotonic()))
        c.close()
    except Exception:  # noqa: BLE001
        out["errors"].append(traceback.format_exc())
    finally:
        ready.set()
        results.put(out)
