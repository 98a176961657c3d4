"""Carousel's threads run under SCHED_BATCH (carousel.sched): the daemon's, all of them (``[daemon]
batch_scheduling``, on by default); an in-process memory's own, while they keep up (``Yielding``),
never the trainer's."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque

import pytest
import torch

from carousel import CarouselMemory
from carousel.config import ConfigError
from carousel.daemon.profile import DaemonConfig
from carousel import sched
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


def _ours() -> dict[str, int]:
    return {t.name: t.native_id for t in threading.enumerate()
            if t.native_id is not None
            and t.name.startswith(("carousel-write-behind", "carousel-swap", "carousel-ids"))}


def _tiered(tmp_path, **tier) -> dict:
    return {"memory": {"em_size": 16, "sample_shape": [4]},
            "swap": {"workers": 1, "start_task": 0},
            "write_behind": {"queue_samples": 100_000, "batch": 16},
            "tiers": [{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": 100_000, **tier}]}


def _steps(mem, n: int, step_s: float) -> None:
    """``n`` trainer steps of ``step_s``: add, sample, the step, observe."""
    for _ in range(n):
        mem.add(torch.zeros(4, 4, dtype=torch.uint8), torch.arange(4) % 2, task=0)
        batch = mem.sample(4)
        time.sleep(step_s)
        mem.observe(batch.ids)


def _policies_while_stepping(mem, want: str, step_s: float, timeout_s: float = 10.0,
                             skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Take steps until every thread of the memory's (but ``skip``) is under ``want`` (or the
    timeout); their policies."""
    deadline = time.monotonic() + timeout_s
    while True:
        _steps(mem, 5, step_s)
        seen = {name: policy_of(tid) for name, tid in _ours().items() if name not in skip}
        if set(seen.values()) == {want} or time.monotonic() > deadline:
            return seen


def test_an_in_process_memorys_threads_yield_to_a_trainer_taking_short_steps(tmp_path):
    with CarouselMemory.from_dict(_tiered(tmp_path)) as mem:
        assert sched.SHORT_STEP_S == 0.007  # the default: steps of up to ~5 ms yield, 10 ms no longer
        seen = _policies_while_stepping(mem, "batch", 0.001)
        assert {"carousel-write-behind", "carousel-swap", "carousel-swap-worker", "carousel-ids"} <= set(seen), seen
        assert set(seen.values()) == {"batch"}, seen
        assert policy_of(0) == "other"  # the trainer's thread is never touched
        # Long steps: a yielding thread's work could still hold a core when the trainer wakes
        # (measured: +3 ms a 20 ms step), so they compete as any thread does. (The id reserver,
        # woken once per 4,096 ids, looks again when it is next woken.)
        seen = _policies_while_stepping(mem, "other", 0.02, skip=("carousel-ids",))
        assert {"carousel-write-behind", "carousel-swap", "carousel-swap-worker"} <= set(seen), seen
        assert set(seen.values()) == {"other"}, seen


def _spin(seconds: float) -> None:
    """The trainer's thread on a core (training on the CPU), GIL held."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_short_steps_follow_the_trainers_sample_calls(monkeypatch):
    monkeypatch.setattr(sched, "_samples", deque(maxlen=9))
    assert not sched.short_steps()  # no trainer yet
    for _ in range(9):  # 2 ms steps waiting on an accelerator (a sleep: off the core, GIL free)
        sched.trainer_sampled()
        time.sleep(0.002)
    assert sched.short_steps()
    time.sleep(0.1)  # the trainer went away (evaluation, a task boundary): no longer
    assert not sched.short_steps()
    for _ in range(9):  # long steps
        sched.trainer_sampled()
        time.sleep(0.012)
    assert not sched.short_steps()
    for _ in range(9):  # short steps, computed on the trainer's own thread (CPU training)
        sched.trainer_sampled()
        _spin(0.002)
    assert not sched.short_steps()


def test_a_writer_that_falls_behind_competes_as_any_thread_until_it_caught_up(tmp_path, monkeypatch):
    """A SCHED_BATCH thread sharing a busy trainer's GIL can lose nearly every hand-off: behind (more
    queued than a pass takes), the writer runs under the default policy; idle again, SCHED_BATCH."""
    monkeypatch.setattr(sched, "short_steps", lambda: True)  # whatever this loop's steps look like
    with CarouselMemory.from_dict(_tiered(tmp_path, sync=True)) as mem:  # an fsync a pass: a slow tier
        assert _policies_while_stepping(mem, "batch", 0.001)["carousel-write-behind"] == "batch"
        writer = _ours()["carousel-write-behind"]
        seen = set()
        for _ in range(400):  # adds of 8 every few us against passes of 16 with an fsync each
            mem.add(torch.zeros(8, 4, dtype=torch.uint8), torch.arange(8) % 2, task=0)
            seen.add(policy_of(writer))
        assert "other" in seen, seen
        mem.flush()
        assert _policies_while_stepping(mem, "batch", 0.001)["carousel-write-behind"] == "batch"  # caught up


def test_carousel_yield_0_keeps_every_thread_under_the_default_policy(tmp_path):
    script = (
        "import sys, threading, time, torch\n"
        "from carousel import CarouselMemory\n"
        "from carousel.sched import policy_of\n"
        f"cfg = {_tiered(tmp_path)!r}\n"
        "with CarouselMemory.from_dict(cfg) as mem:\n"
        "    ids = mem.add(torch.zeros(20, 4, dtype=torch.uint8), torch.arange(20) % 2, task=0)\n"
        "    for _ in range(40):\n"
        "        mem.sample(4); time.sleep(0.001)\n"
        "    mem.observe(ids[:8]); mem.flush()\n"
        "    print(sorted({policy_of(t.native_id) for t in threading.enumerate()}))\n")
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "CAROUSEL_YIELD": "0"},
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['other']", out


def test_yielding_switches_only_while_on_and_changes_nothing_in_a_batch_process(monkeypatch):
    monkeypatch.setattr(sched, "short_steps", lambda: True)

    def run(out):
        y = sched.Yielding()
        for behind in (False, True, False):
            y.keep_up(behind)
            out.append(policy_of(0))
    out: list[str] = []
    t = threading.Thread(target=run, args=(out,))
    t.start()
    t.join()
    assert out == ["batch", "other", "batch"]
    for mode in ("batch", "other"):  # the daemon's process (all batch), or CAROUSEL_YIELD=0
        monkeypatch.setattr(sched, "_mode", mode)
        out = []
        t = threading.Thread(target=run, args=(out,))
        t.start()
        t.join()
        assert out == ["other"] * 3  # a thread started by this (default-policy) one stays there
