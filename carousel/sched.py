"""Carousel's threads yield to the trainer's: they run under Linux's ``SCHED_BATCH``.

A thread woken under the default policy (``SCHED_OTHER``) may preempt the running one at once
(wake-up preemption). When the trainer posts an add, the daemon's event loop, the write-behind
thread or the swap engine wakes, and on cores that are all busy (``DataLoader`` workers, other
jobs) the scheduler would often take the core from the trainer for it: measured on the 2-core
machine with a CPU hog per core, the p99 of a trainer's ``add``/``sample``/``observe`` through
the daemon was 4.5-5.5 ms, 0.6-1.3 ms with the daemon under ``SCHED_BATCH`` (medians unchanged).
``SCHED_BATCH`` threads get the same share of the CPU (same nice value) but never preempt on
wake-up, which is what a background service should do. Any user may switch a thread of its own to
it; elsewhere (not Linux, a sandbox that forbids it) nothing changes.

The daemon does it for all its threads alike (:func:`batch_process`). An in-process memory's own
threads are :class:`Yielding` threads: under ``SCHED_BATCH`` only while the trainer takes short
steps, waiting on something else most of the time (an accelerator), and they keep up with their
work (the class says why). ``CAROUSEL_YIELD=0`` in the
environment keeps every thread under the default policy.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque

# What :class:`Yielding` threads do: "yield" (SCHED_BATCH while they keep up), or nothing because
# every thread stays where the process put it: "batch" (batch_process() ran: the daemon's) or
# "other" (keep_default_policy(): CAROUSEL_YIELD=0, or a daemon's batch_scheduling = false).
_mode = "yield" if os.environ.get("CAROUSEL_YIELD", "1") != "0" else "other"


def batch_process() -> int:
    """Put every thread of this process under ``SCHED_BATCH`` (threads started later inherit
    it from the thread that starts them); the number of threads switched."""
    global _mode
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return 0
    _mode = "batch"  # every thread stays there: Yielding changes nothing from now on
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


#: Yielding threads yield only while the trainer's steps are shorter than this (median of the
#: last 8 intervals between its ``sample`` calls) ...
SHORT_STEP_S = float(os.environ.get("CAROUSEL_YIELD_BELOW_S", "0.007"))
#: ... and its thread spends at most this share of them on a core (the rest waiting on an
#: accelerator, a sleep, I/O: the GIL free for our threads): see :class:`Yielding`.
MAX_TRAINER_CPU = 0.5
# (time.monotonic(), time.thread_time()) of the trainer's thread at its last sample() calls.
_samples: deque[tuple[float, float]] = deque(maxlen=9)


def trainer_sampled() -> None:
    """Called by an in-process memory's ``sample`` on the trainer's thread (~0.5 us: the thread's
    CPU clock is a system call, which keeps the GIL)."""
    _samples.append((time.monotonic(), time.thread_time()))


def short_steps() -> bool:
    """Whether the trainer of this process takes short steps now, mostly waiting on something else:
    over its last 9 ``sample`` calls, the median interval under :data:`SHORT_STEP_S`, its thread on
    a core at most :data:`MAX_TRAINER_CPU` of the time, and the last call no older than 4 intervals."""
    marks = list(_samples)
    if len(marks) < 3:
        return False
    period = statistics.median(b[0] - a[0] for a, b in zip(marks, marks[1:]))
    wall, cpu = marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1]
    return (period < SHORT_STEP_S and cpu <= MAX_TRAINER_CPU * wall
            and time.monotonic() - marks[-1][0] < 4 * max(period, 1e-3))


def keep_default_policy() -> None:
    """No thread of this process changes its policy from now on (:class:`Yielding` neither)."""
    global _mode
    _mode = "other"


def policy_of(tid: int = 0) -> str:
    """The scheduling policy of a thread of this process, by name (``"batch"``, ``"other"``, ...)."""
    names = {getattr(os, n): n.removeprefix("SCHED_").lower() for n in dir(os) if n.startswith("SCHED_")
             and n not in ("SCHED_RESET_ON_FORK",) and isinstance(getattr(os, n), int)}
    try:
        return names.get(os.sched_getscheduler(tid), "unknown")
    except OSError:
        return "unknown"


class Yielding:
    """The policy of one background thread of the trainer's own process (an in-process memory's
    writer, swap worker, swap loop and I/O threads, id reserver): ``SCHED_BATCH`` while the
    trainer takes short steps (:func:`short_steps`) and the thread keeps up with its work, the
    default policy otherwise. Created on the thread it governs, which calls :meth:`keep_up` at
    its natural points (before it waits for work, before each piece of work).

    Why: on busy cores a background thread woken by the trainer's ``add`` or ``observe`` took the
    trainer's core at once (wake-up preemption), and the trainer's call waited a scheduler slice:
    in-process call p99s of 2-5 ms at 2-5 ms steps, 0.2-0.8 ms with these threads under
    ``SCHED_BATCH`` (``benchmarks.stall --busy``, docs/results/stall.md). Why not always:

    - with long steps (20 ms) the threads' work, no longer preempting anyone, still held a core
      when the trainer woke from its step, which then waited ~3 ms for one (median, with a CPU
      hog per core): steps of 7 ms or more (:data:`SHORT_STEP_S`) keep the default policy, where
      the tail matters less than that median;
    - a thread that shares the trainer's GIL and may not preempt can lose nearly every GIL hand-off
      to a trainer running Python without pause, and fall behind for whole tasks (it did, twice:
      tiered iCaRL and GDumb runs on CPU that swapped nothing): a trainer whose thread is on a
      core more than half of the time (:data:`MAX_TRAINER_CPU`: training on the CPU) keeps the
      default policy, and a thread that is ``behind`` -- work queued beyond what one pass takes,
      or someone waiting for it -- competes as any thread does until it has caught up.

    In a process under ``SCHED_BATCH`` as a whole (the daemon's: :func:`batch_process`) or after
    :func:`keep_default_policy` it changes nothing.
    """

    def __init__(self) -> None:
        try:  # a thread starts with its starter's policy: maybe a yielding thread's SCHED_BATCH
            self.batch = hasattr(os, "SCHED_BATCH") and os.sched_getscheduler(0) == os.SCHED_BATCH
        except OSError:
            self.batch = False
        self.enabled = _mode == "yield" and hasattr(os, "SCHED_BATCH")

    def keep_up(self, behind: bool = False) -> None:
        """Set the policy for the work at hand: ``SCHED_BATCH`` while the trainer takes short steps
        (:func:`short_steps`) and this thread is not ``behind``, else the default one (a system
        call only when it changes)."""
        if not self.enabled:
            return
        want = not behind and short_steps()
        if want == self.batch:
            return
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH if want else os.SCHED_OTHER, os.sched_param(0))
        except OSError:  # a sandbox that forbids it: nothing changes from here on
            self.enabled = False
            return
        self.batch = want
