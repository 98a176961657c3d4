"""The daemon's threads yield to the trainer's: they run under Linux's ``SCHED_BATCH``.

A thread woken under the default policy (``SCHED_OTHER``) may preempt the running one at once
(wake-up preemption). When the trainer posts an add, the daemon's event loop, the write-behind
thread or the swap engine wakes, and on cores that are all busy (``DataLoader`` workers, other
jobs) the scheduler would often take the core from the trainer for it: measured on the 2-core
machine with a CPU hog per core, the p99 of a trainer's ``add``/``sample``/``observe`` through
the daemon was 4.5-5.5 ms, 0.6-1.3 ms with the daemon under ``SCHED_BATCH`` (medians unchanged).
``SCHED_BATCH`` threads get the same share of the CPU (same nice value) but never preempt on
wake-up, which is what a background service should do. Any user may switch a thread of its own to
it; elsewhere (not Linux, a sandbox that forbids it) nothing changes.

Only the daemon does it, for all its threads alike. Tried on the in-process memory's own threads
(writer, swap engine) it cut the trainer's busy-core p99 there too (``observe`` ~5 -> 0.2 ms), but
a ``SCHED_BATCH`` writer sharing the trainer's GIL fell behind for whole tasks in one test sequence
(tests/storage_backends, then the tiered iCaRL run: nothing stored, so nothing to swap in), so
in-process threads keep the default policy.
"""

from __future__ import annotations

import os


def batch_process() -> int:
    """Put every thread of this process under ``SCHED_BATCH`` (threads started later inherit
    it from the thread that starts them); the number of threads switched."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return 0
    done = 0
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            done += 1
        except OSError:
            pass
    return done


def policy_of(tid: int = 0) -> str:
    """The scheduling policy of a thread of this process, by name (``"batch"``, ``"other"``, ...)."""
    names = {getattr(os, n): n.removeprefix("SCHED_").lower() for n in dir(os) if n.startswith("SCHED_")
             and n not in ("SCHED_RESET_ON_FORK",) and isinstance(getattr(os, n), int)}
    try:
        return names.get(os.sched_getscheduler(tid), "unknown")
    except OSError:
        return "unknown"
