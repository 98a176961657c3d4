"""RELIABILITY items 15-16: shared memory after a client or the daemon is SIGKILLed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

import carousel

from .rawwire import daemons  # noqa: F401 - the fixture
from .rawwire import own_records, segments_of, wait_for

# A client that adds through an upload segment (> 64 KiB) and samples through a ring, keeps the
# batches (so it holds ring slots), reports, and waits to be killed.
_HOLDER = r"""
import json, sys, time
import numpy as np
import carousel
from carousel.daemon import client as client_module
client_module._POST_MAX_BYTES = 1 << 16  # the add below goes through the upload segment
c = carousel.connect(sys.argv[1])
rng = np.random.default_rng(0)
c.add(rng.integers(0, 256, (400, 3, 8, 8), dtype=np.uint8), rng.integers(0, 10, 400), 0)
held = []
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    held.append(c.sample(16))
    # Slots in state TAKEN (2) in the shared segment: what the daemon sees this client holding.
    taken = sum(int((r.states[:-1, 0] == 2).sum()) for r in c._rings.values())
    if taken >= 2 and len(held) >= 4:
        break
    time.sleep(0.01)
print(json.dumps({"taken": taken, "rings": len(c._rings), "upload": c._upload is not None,
                  "rows": [len(b.ids) for b in held]}), flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(120)
def test_15_killed_client_slots_reclaimed(daemons):
    d = daemons(metrics=False)
    watcher = carousel.connect(d.socket, use_shm=False)  # makes no segment of its own
    baseline = segments_of(d.pid)                        # the daemon's own (a doorbell, say)
    base_count = watcher.status()["shm_segments"]
    assert base_count == len(baseline), (base_count, baseline)
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, d.socket], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(child.stdout.readline())
        # It holds ring slots (batches it never released) and an upload segment.
        assert info["taken"] >= 1 and info["rings"] >= 1 and info["upload"], info
        held = segments_of(d.pid)
        assert len(held) >= len(baseline) + 2, held
        assert watcher.status()["shm_segments"] >= base_count + 2
        assert watcher.status()["clients"] == 2
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        # The daemon sees the socket close and unlinks everything that client had.
        assert wait_for(lambda: segments_of(d.pid) == baseline, 5.0), segments_of(d.pid)
        st = wait_for(lambda: (lambda s: s if s["clients"] == 1 and s["shm_segments"] == base_count else None)(
            watcher.status()), 5.0)
        assert st, watcher.status()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # The daemon is fine and a new shared-memory client works.
    with carousel.connect(d.socket) as c:
        for _ in range(5):
            assert len(c.sample(16).ids) == 16
        assert c.stats()["added"] == 400
    assert wait_for(lambda: segments_of(d.pid) == baseline, 5.0), segments_of(d.pid)
    watcher.close()
    assert d.stop() == 0
    assert segments_of(d.pid) == []


@pytest.mark.timeout(120)
def test_16_daemon_killed_segments_swept_client_reconnects(daemons):
    d1 = daemons(name="d", metrics=False)
    c = carousel.connect(d1.socket, reconnect_s=30)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (400, 3, 8, 8), dtype=np.uint8)
    c.add(x, rng.integers(0, 10, 400), 0)           # an upload segment
    c.flush()
    held = [c.sample(16) for _ in range(3)]         # a ring, with slots held
    assert c.daemon_pid == d1.pid
    live = segments_of(d1.pid)
    assert len(live) >= 2, live                     # at least the ring and the upload segment

    d1.proc.send_signal(signal.SIGKILL)
    d1.proc.wait(10)
    # Left behind (only another daemon of this uid starting right now could sweep them first).
    assert segments_of(d1.pid) == live, "a SIGKILLed daemon cannot unlink its segments; where did they go?"

    d2 = daemons(name="d", metrics=False)          # the same profile, data and socket
    assert segments_of(d1.pid) == [], segments_of(d1.pid)
    # Swept at start. (Not asserted to be d2's doing from its log: any daemon of this uid that starts
    # meanwhile -- another test run on this machine -- sweeps dead daemons' segments too.)
    swept = [r for r in own_records(d2) if r.get("msg") == "swept shared memory of dead daemons"]
    assert all(r["segments"] >= 1 for r in swept), swept

    # The old client carries on against the new daemon: no exception, the right data.
    for _ in range(10):
        b = c.sample(16)
        assert len(b.ids) == 16
        assert set(b.ids.tolist()) <= set(range(400))
    st = c.stats()
    assert st["added"] >= 400, st  # the next id: a SIGKILL skips the rest of the reserved id block
    assert c.daemon_pid == d2.pid
    ids = c.add(x[:10], np.arange(10), 1)
    assert ids.tolist() == list(range(st["added"], st["added"] + 10))  # new ids, none reused
    b = c.sample(64, seed=5)
    assert len(b.ids) == 64
    for k, i in enumerate(b.ids.tolist()):
        if i < 400:
            assert np.array_equal(b.x[k].numpy(), x[i]), i
    del held, b
    c.close()
    assert d2.stop() == 0
    assert segments_of(d2.pid) == []
