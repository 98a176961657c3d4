"""The daemon's threads run under SCHED_BATCH (carousel.sched), all of them (``[daemon]
batch_scheduling``, on by default); an in-process memory changes no thread's policy."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from carousel import CarouselMemory
from carousel.config import ConfigError
from carousel.daemon.profile import DaemonConfig
from carousel.sched import policy_of
from tests.daemon.harness import start_daemon



def _batch_this_thread() -> bool:
    """Put the calling thread under SCHED_BATCH; False where the system refuses."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # 0: the calling thread (Linux)
    except (AttributeError, OSError):
        return False
    return True


def _allowed() -> bool:
    """Whether this system lets a thread switch itself to SCHED_BATCH (a seccomp profile may not)."""
    out = []
    t = threading.Thread(target=lambda: out.append(_batch_this_thread()))
    t.start()
    t.join()
    return out == [True]


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not _allowed(),
                                reason="SCHED_BATCH is Linux's, and this system refuses it")


def policies(pid: int) -> dict[int, str]:
    """Each thread of process ``pid`` -> its scheduling policy."""
    return {int(t): policy_of(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def test_policy_of_reads_each_threads_own_policy():
    before = policy_of(0)
    seen = {}

    def run():
        seen["ok"] = _batch_this_thread()
        seen["policy"] = policy_of(0)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == {"ok": True, "policy": "batch"}
    assert policy_of(0) == before == "other"


@pytest.mark.parametrize("on", [True, False])
def test_every_daemon_thread_under_batch_scheduling_unless_turned_off(tmp_path, on):
    d = start_daemon(tmp_path, daemon={} if on else {"batch_scheduling": False}, metrics=False)
    try:
        seen = policies(d.pid)
        assert len(seen) >= 4  # the loop, the pool, the filler, the memory's writer and engine...
        assert set(seen.values()) == {"batch" if on else "other"}, seen
    finally:
        assert d.stop() == 0


def test_batch_scheduling_must_be_a_boolean():
    with pytest.raises(ConfigError, match="batch_scheduling"):
        DaemonConfig(batch_scheduling="yes")


def test_an_in_process_memory_changes_no_threads_policy(tmp_path):
    cfg = {"memory": {"em_size": 16, "sample_shape": [4]},
           "swap": {"workers": 1, "start_task": 0},
           "tiers": [{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": 1000}]}
    with CarouselMemory.from_dict(cfg) as mem:
        ids = mem.add(torch.zeros(20, 4, dtype=torch.uint8), torch.arange(20) % 2, task=0)
        mem.observe(ids[:8])  # the swap engine's worker and its I/O pool start working
        mem.flush()
        named = {t.name: t.native_id for t in threading.enumerate()}
        ours = {name: policy_of(tid) for name, tid in named.items()
                if name.startswith(("carousel-write-behind", "carousel-swap"))}
        assert {"carousel-write-behind", "carousel-swap", "carousel-swap-worker"} <= set(ours)
        assert set(ours.values()) == {"other"}, ours  # see carousel.sched: why not in-process
        assert policy_of(0) == "other"
