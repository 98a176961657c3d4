"""RELIABILITY items 17-19 and a durability round (item 1 flavour) against real processes:
two daemons on one data directory, SIGTERM during heavy ingest, invalid profiles, SIGKILL after flush."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import carousel
from storage_backends import open_store

from .harness import CIFAR, write_profile
from .rawwire import daemons  # noqa: F401 - the fixture
from .rawwire import own_records, segments_of, wait_for


# ---- 17: one data directory, one daemon ------------------------------------------------------------------
def _serve(profile: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "carousel", "serve", "--config", str(profile)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(120)
def test_17_second_daemon_on_same_data_dir_refused(daemons, tmp_path):
    d1 = daemons(name="d1", metrics=False)
    c = carousel.connect(d1.socket, use_shm=False)
    c.add(np.zeros((3, 3, 8, 8), np.uint8), [0, 1, 2], 0)
    data_dir = tmp_path / "d1" / "data"
    # Same data directory, its own socket directory.
    p2 = write_profile(tmp_path / "p2.toml", {"socket_dir": str(tmp_path / "sock2"), "data_dir": str(data_dir),
                                              "metrics": ""}, dict(CIFAR), None,
                       [{"kind": "lmdb", "path": str(data_dir / "flash"), "capacity": 10000}])
    res = _serve(p2)
    assert res.returncode not in (0, None), res
    assert str(data_dir / "daemon.lock") in res.stderr, res.stderr
    assert f"pid {d1.pid}" in res.stderr, res.stderr
    assert not (tmp_path / "sock2" / "carousel.sock").exists()
    # Same socket directory, another data directory: refused by the socket's lock, and the first
    # daemon's socket is not unlinked on the way.
    p3 = write_profile(tmp_path / "p3.toml", {"socket_dir": str(Path(d1.socket).parent),
                                              "data_dir": str(tmp_path / "data3"), "metrics": ""},
                       dict(CIFAR), None, [])
    res = _serve(p3)
    assert res.returncode not in (0, None), res
    assert "carousel.sock.lock" in res.stderr and f"pid {d1.pid}" in res.stderr, res.stderr
    # The first daemon never noticed: same socket, same data.
    assert d1.proc.poll() is None
    with carousel.connect(d1.socket, use_shm=False) as c2:
        assert c2.stats()["added"] == 3 and c2.daemon_pid == d1.pid
    assert c.stats()["added"] == 3
    c.close()
    assert d1.stop() == 0
    # Once it is gone, the lock is free again.
    d2 = daemons(name="d1", metrics=False)
    with carousel.connect(d2.socket, use_shm=False) as c3:
        assert c3.stats()["added"] == 3
    assert d2.stop() == 0


# ---- a client process that adds batches and writes down what was acknowledged ------------------------------
# Batch i is a function of i alone, so the test can regenerate every acknowledged sample. An add
# returns once sent (its reply is read later): a batch counts as acknowledged once a flush() after
# it returned -- after each add, or after every fourth.
_WRITER = r"""
import sys, numpy as np, carousel
from carousel.daemon import client as client_module
client_module._POST_MAX_BYTES = 1 << 16  # every fourth batch (512 samples) goes through the upload segment
sock, ack, flush_each = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
c = carousel.connect(sock, reconnect_s=1)
out = open(ack, "a")
i = 0
sent = []
while True:
    n = 512 if i % 4 == 3 else 96
    rng = np.random.default_rng(i)
    x = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    try:
        sent.append((i, c.add(x, y, i // 20)))
        if flush_each or i % 4 == 3:
            c.flush()
            for j, ids in sent:
                out.write(f"{j} {' '.join(map(str, ids.tolist()))}\n")
            out.flush()
            sent = []
    except Exception as exc:
        print("writer stopped:", repr(exc), flush=True)
        break
    i += 1
"""


def _start_writer(sock: str, ack: Path, flush_each: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, sock, str(ack), "1" if flush_each else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _acked(ack: Path) -> dict[int, list[int]]:
    out = {}
    for line in ack.read_text().split("\n")[:-1]:  # a last line without its newline was never acknowledged
        if not line.strip():
            continue
        parts = [int(v) for v in line.split()]
        out[parts[0]] = parts[1:]
    return out


def _lines(ack: Path) -> int:
    return ack.read_text().count("\n") if ack.exists() else 0


def _check_stored(tier_path: Path, acked: dict[int, list[int]]) -> int:
    """Every acknowledged id is in the LMDB tier once, byte for byte; returns how many."""
    all_ids = [i for ids in acked.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)), "an id was handed out twice"
    with open_store(f"lmdb://{tier_path}") as store:
        stored = store.ids()
        assert stored.size == np.unique(stored).size
        missing = sorted(set(all_ids) - set(stored.tolist()))
        assert not missing, f"{len(missing)} acknowledged samples lost, first {missing[:10]}"
        for i, ids in acked.items():
            n = len(ids)
            rng = np.random.default_rng(i)
            x = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
            y = rng.integers(0, 10, n)
            got = store.get_many(np.asarray(ids, np.int64))
            assert np.array_equal(got["x"], x), f"batch {i}: stored pixels differ"
            assert np.array_equal(got["y"].astype(np.int64), y), f"batch {i}: stored labels differ"
            assert np.all(got["task"] == i // 20)
    return len(all_ids)


# ---- 18: SIGTERM during heavy ingest ------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_18_sigterm_during_ingest_drains_and_exits_0(daemons, tmp_path):
    tier = tmp_path / "d" / "data" / "flash"
    tiers = [{"kind": "lmdb", "path": str(tier), "capacity": 200000}]
    d = daemons(name="d", metrics=False, tiers=tiers)
    ack = tmp_path / "ack18.txt"
    writer = _start_writer(d.socket, ack, flush_each=False)
    try:
        assert wait_for(lambda: _lines(ack) >= 40 or writer.poll() is not None, 60), "the writer made no progress"
        assert writer.poll() is None, writer.stdout.read()
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(30)
        took = time.monotonic() - t0
        assert rc == 0, d.log()
        writer.wait(30)
        out = writer.stdout.read()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert "writer stopped" in out, out          # it noticed, with an error, and stopped
    assert took < 30
    recs = own_records(d)
    assert any(r.get("msg") == "stopped cleanly" for r in recs), d.log()
    assert segments_of(d.pid) == []
    assert not Path(d.socket).exists()
    acked = _acked(ack)
    n = _check_stored(tier, acked)
    assert n >= 40 * 96
    # A restart sees every one of them.
    d2 = daemons(name="d", metrics=False, tiers=tiers)
    with carousel.connect(d2.socket, use_shm=False) as c:
        st = c.stats()
        top = max(i for ids in acked.values() for i in ids)
        assert st["added"] >= top + 1, st
        assert st["tiers"]["0-lmdb"]["samples"] >= n, st
        new = c.add(np.zeros((1, 3, 8, 8), np.uint8), [0], 0)
        assert int(new[0]) >= top + 1          # no acknowledged id is handed out again
    assert d2.stop() == 0


# ---- durability: SIGKILL the daemon while a client adds; flushed samples survive -------------------------------
@pytest.mark.timeout(180)
def test_durability_sigkill_daemon_after_flush(daemons, tmp_path):
    tier = tmp_path / "d" / "data" / "flash"
    tiers = [{"kind": "lmdb", "path": str(tier), "capacity": 200000}]
    for rnd, after in enumerate((5, 17)):          # two rounds on the same data, killed at different points
        d = daemons(name="d", metrics=False, tiers=tiers)
        ack = tmp_path / f"ack-kill-{rnd}.txt"
        writer = _start_writer(d.socket, ack, flush_each=True)
        try:
            assert wait_for(lambda: _lines(ack) >= after or writer.poll() is not None, 60)
            assert writer.poll() is None, writer.stdout.read()
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
        finally:
            writer.kill()
            writer.wait()
        acked = _acked(ack)
        if rnd == 0:
            first = acked
        else:  # the second round's writer starts its batch numbering at 0 again: check each round by itself
            _check_stored(tier, first)
        assert _check_stored(tier, acked) >= after * 96
    d = daemons(name="d", metrics=False, tiers=tiers)
    with carousel.connect(d.socket, use_shm=False) as c:
        st = c.stats()
        tops = [max(i for ids in a.values() for i in ids) for a in (first, acked)]
        assert st["added"] >= max(tops) + 1, st
        assert st["tiers"]["0-lmdb"]["samples"] >= sum(len(v) for a in (first, acked) for v in a.values())
    assert d.stop() == 0


# ---- 19: invalid profiles -----------------------------------------------------------------------------------
_GOOD_MEMORY = "[memory]\nem_size = 64\nsample_shape = [3, 8, 8]\n"
_BAD = {
    "toml_syntax": ("[daemon\nsocket_dir = 'x'\n" + _GOOD_MEMORY, "<toml>", None),
    "daemon_unknown_key": ("[daemon]\nmax_clientz = 4\n" + _GOOD_MEMORY, "daemon.max_clientz", "unknown key"),
    "daemon_out_of_range": ("[daemon]\nmax_clients = 0\n" + _GOOD_MEMORY, "daemon.max_clients", "must be"),
    "daemon_timeout_out_of_range": ("[daemon]\nread_timeout_s = -1.0\n" + _GOOD_MEMORY, "daemon.read_timeout_s",
                                    "must be"),
    "memory_unknown_key": ("[daemon]\n[memory]\nem_size = 64\nsample_shape = [3, 8, 8]\nem_sise = 3\n",
                           "memory.em_sise", "unknown key"),
    "memory_out_of_range": ("[daemon]\n[memory]\nem_size = -5\nsample_shape = [3, 8, 8]\n", "memory.em_size",
                            "must be"),
}


def _run_bad(case: str, body: str, base: Path, argv0: str) -> tuple[Path, subprocess.CompletedProcess]:
    sock_dir, data_dir = base / "sock", base / "data"
    prof = base / "profile.toml"
    if not prof.exists():
        # Paths first, so a daemon that did start would use (and create) these.
        prof.write_text(body.replace("[daemon]\n", f"[daemon]\nsocket_dir = \"{sock_dir}\"\n"
                                                   f"data_dir = \"{data_dir}\"\nmetrics = \"\"\n", 1))
    argv = ["serve", "--config", str(prof)] if argv0 == "serve" else ["check-config", str(prof)]
    return prof, subprocess.run([sys.executable, "-m", "carousel", *argv], capture_output=True, text=True,
                                timeout=60, env={**os.environ, "XDG_RUNTIME_DIR": str(base / "xdg")})


@pytest.mark.timeout(180)
def test_19_invalid_profiles_exit_2_nothing_started(tmp_path):
    for case in _BAD:
        (tmp_path / case).mkdir()
    # Each run is an interpreter start (about a second of CPU): check-config on every case, serve
    # on one of each kind; two at a time.
    jobs = [(case, "check-config") for case in _BAD] + \
        [(case, "serve") for case in ("toml_syntax", "daemon_unknown_key", "daemon_out_of_range",
                                      "memory_out_of_range")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda j: _run_bad(j[0], _BAD[j[0]][0], tmp_path / j[0], j[1]), jobs))
    for (case, argv0), (prof, res) in zip(jobs, results):
        _, key, reason = _BAD[case]
        base = tmp_path / case
        what = f"{case}: carousel {argv0}"
        assert res.returncode == 2, (what, res.returncode, res.stdout, res.stderr)
        err = res.stderr
        assert str(prof) in err, (what, err)          # the file
        assert key in err, (what, err)                # the key
        tail = err.split(key, 1)[1].strip(" :\n")     # and a reason after it
        assert len(tail) >= 8, (what, err)
        if reason:
            assert reason in tail, (what, err)
        assert "Traceback" not in err, (what, err)
        # Nothing started: no socket, no socket directory, no lock, no data.
        assert not (base / "sock").exists() and not (base / "data").exists(), (what, os.listdir(base))
        assert not (base / "xdg").exists(), (what, os.listdir(base))
