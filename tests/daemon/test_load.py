"""Load test (RELIABILITY item 20): 4 client processes sample batches of 256 CIFAR-sized samples
while a fifth adds, for ``CAROUSEL_LOAD_SECONDS`` (default 30; longer runs: set it) seconds, against a real daemon with
an LMDB tier small enough that it evicts throughout.

Asserted: no client sees an error (every batch is full, without duplicate ids, and every row is
the sample its id names); no sample is lost (the adder's acknowledged ids are exactly what the
daemon counts as added, and after a flush the tier plus the evicted account for every one of
them; what the tier holds on disk is intact); and the daemon does not leak: its RSS, open fds,
threads and /dev/shm segments, read every second, stay within 10% of their value after warm-up
(a burst of concurrent requests before the run, then the first third of the run) during the
last third. The client-side sample latency (p50/p99) is
printed (run with ``-s``) and recorded as junit properties.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import numpy as np
import pytest

import carousel
from tests.daemon import workers
from tests.daemon.harness import start_daemon

DURATION = float(os.environ.get("CAROUSEL_LOAD_SECONDS", "30"))
SHAPE = (3, 32, 32)
EM_SIZE = 512
BATCH = 256
SAMPLERS = 4
TIER_CAPACITY = 4000  # ~6 s of adds: the tier is full and evicting long before warm-up ends
PER_ADD, ADD_INTERVAL = 64, 0.1  # 640 samples/s, each add 200 KB (through the upload segment)
FLAT = 0.10


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
                out[key] = int(value.split()[0])
    return out


def _reading(d) -> dict[str, float]:
    st = _proc_status(d.pid)
    return {"t": time.monotonic(), "rss_kib": st["VmRSS"], "rss_anon_kib": st.get("RssAnon", 0),
            "rss_file_kib": st.get("RssFile", 0), "rss_shmem_kib": st.get("RssShmem", 0),
            "threads": st["Threads"], "fds": len(os.listdir(f"/proc/{d.pid}/fd")), "shm": len(d.shm_segments())}


def _saturate_request_pool(sock: str, clients: int = 10, seconds: float = 1.5) -> None:
    """Part of the warm-up: as many concurrent socket requests as the daemon admits, so its request
    thread pool (started lazily, one thread per request that finds none idle, up to its maximum)
    and the OpenMP helpers of those threads exist before the baseline is read. Without this, a
    60 s run sees the thread count creep up for its first ~50 s as rare peaks of concurrency add
    the pool's last threads; growth past the pool's maximum still shows."""
    import threading

    errors = []

    def hammer(k: int) -> None:
        try:
            with carousel.connect(sock) as c:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    c.sample(EM_SIZE, seed=k)  # over the socket: a gather on a pool thread
                    c.stats()
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else float("nan")


@pytest.mark.slow
def test_sampling_under_load(tmp_path, record_property):
    t_begin = time.monotonic()
    d = start_daemon(tmp_path, memory={"em_size": EM_SIZE, "sample_shape": list(SHAPE)},
                     tiers=[{"kind": "lmdb", "path": str(tmp_path / "d" / "data" / "flash"),
                             "capacity": TIER_CAPACITY}],
                     wait=False)  # the clients import torch meanwhile and connect when it serves
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start_box = ctx.Value("d", 0.0)
    go = ctx.Event()
    readies = [ctx.Event() for _ in range(SAMPLERS + 1)]
    procs = [ctx.Process(target=workers.load_adder, name="adder",
                         args=(d.socket, SHAPE, EM_SIZE, PER_ADD, ADD_INTERVAL, start_box, DURATION, readies[0], go,
                               results))]
    procs += [ctx.Process(target=workers.load_sampler, name=f"sampler-{k}",
                          args=(d.socket, k, BATCH, SHAPE, start_box, DURATION, readies[k + 1], go, results))
              for k in range(SAMPLERS)]
    outs: list[dict] = []
    readings: list[dict] = []
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 90
        for ev in readies:
            assert ev.wait(max(0.0, deadline - time.monotonic())), f"clients not ready:\n{d.log()[-3000:]}"
        assert d.proc.poll() is None, d.log()
        _saturate_request_pool(d.socket)
        start = time.monotonic() + 0.2
        start_box.value = start
        go.set()
        t_setup = start - t_begin
        while time.monotonic() < start + DURATION:
            readings.append(_reading(d) | {"t": time.monotonic() - start})
            time.sleep(max(0.0, 1.0 - (time.monotonic() - start) % 1.0))
        for _ in procs:
            outs.append(results.get(timeout=60))
        for p in procs:
            p.join(30)
        assert all(p.exitcode == 0 for p in procs), [(p.name, p.exitcode) for p in procs]

        # ---- no errors ---------------------------------------------------------------------------------
        for out in outs:
            who = out.get("role") + str(out.get("worker", ""))
            assert not out["errors"], f"{who} (pid {out['pid']}) saw {len(out['errors'])} error(s):\n" + \
                "\n".join(out["errors"][:10])
        adder = next(o for o in outs if o["role"] == "adder")
        samplers = [o for o in outs if o["role"] == "sampler"]
        assert adder["acked"] >= EM_SIZE + PER_ADD * int(DURATION / ADD_INTERVAL) * 0.5, \
            f"the adder managed only {adder['acked']} samples"
        assert all(o["batches"] > 0 for o in samplers)

        # ---- nothing lost ------------------------------------------------------------------------------
        with carousel.connect(d.socket) as c:
            c.flush()
            st = c.stats()
        tiers = st["tiers"]
        assert st["added"] == adder["acked"], f"daemon counts {st['added']} added, the adder was acknowledged " \
                                              f"{adder['acked']}"
        assert st["pending_writes"] == 0 and st["errors"] == {"write_behind": None, "swap": None}, st
        assert tiers["ram"]["samples"] == EM_SIZE
        assert tiers["0-lmdb"]["samples"] <= TIER_CAPACITY
        assert tiers["0-lmdb"]["samples"] + st["evicted"] == st["added"], \
            f"tier {tiers['0-lmdb']['samples']} + evicted {st['evicted']} != added {st['added']}"
        assert st["evicted"] > 0, "the tier never filled: the load did not exercise eviction"
        stored_count = tiers["0-lmdb"]["samples"]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        rc = None
        try:
            rc = d.stop(timeout=60)
        finally:
            d.close()
    assert rc == 0, f"daemon exit code {rc}:\n{d.log()[-3000:]}"
    assert not d.shm_segments()

    # ---- the tier on disk: every stored sample intact -------------------------------------------------
    from storage_backends import open_store
    with open_store(f"lmdb://{tmp_path / 'd' / 'data' / 'flash'}") as store:
        ids = np.sort(store.ids())
        assert ids.size == stored_count
        assert ids.max() < st["added"]
        for lo in range(0, ids.size, 1024):
            part = ids[lo:lo + 1024]
            rows = store.get_many(part)
            why = workers.check_rows(part, rows["x"], rows["y"], SHAPE, probe=3072)
            assert why is None, why

    # ---- latency and flatness -------------------------------------------------------------------------
    lat = np.concatenate([np.asarray(o["latencies"]) for o in samplers])
    summary = {
        "duration_s": DURATION, "setup_s": round(t_setup, 1), "batches": int(lat.size),
        "batches_per_s": round(lat.size / DURATION, 1), "added": int(st["added"]), "evicted": int(st["evicted"]),
        "swapped_in": int(st["swapped_in"]), "observes": sum(o["observes"] for o in samplers),
        "p50_ms": round(_pct(lat, 50) * 1e3, 3), "p90_ms": round(_pct(lat, 90) * 1e3, 3),
        "p99_ms": round(_pct(lat, 99) * 1e3, 3), "max_ms": round(float(lat.max()) * 1e3, 1),
        "per_client_p50_p99_ms": [(round(_pct(np.asarray(o["latencies"]), 50) * 1e3, 3),
                                   round(_pct(np.asarray(o["latencies"]), 99) * 1e3, 3)) for o in samplers],
        "add_p50_ms": round(_pct(np.asarray(adder["latencies"]), 50) * 1e3, 2),
        "add_p99_ms": round(_pct(np.asarray(adder["latencies"]), 99) * 1e3, 2),
    }
    warm = [r for r in readings if r["t"] >= DURATION / 3]
    last = [r for r in readings if r["t"] >= 2 * DURATION / 3]
    assert warm and last, readings
    base = warm[0]
    for key in ("rss_kib", "rss_anon_kib", "rss_file_kib", "fds", "threads", "shm"):
        summary[key] = [base[key], min(r[key] for r in last), max(r[key] for r in last)]
    print("\nload test:", json.dumps(summary))
    (tmp_path / "load-summary.json").write_text(json.dumps({"summary": summary, "readings": readings}, indent=1))
    for key, value in summary.items():
        record_property(key, value)
    for key in ("rss_kib", "fds", "threads", "shm"):
        bad = [r for r in last if abs(r[key] - base[key]) > FLAT * base[key]]
        assert not bad, f"daemon {key} not flat within {FLAT:.0%} after warm-up: {base[key]} at " \
                        f"t={base['t']:.0f} s, then {[(round(r['t']), r[key]) for r in bad][:10]}"
