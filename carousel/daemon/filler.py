"""The ring filler: a thread that keeps every client's shared-memory rings full of ready batches.

A client's steady-state ``sample()`` is a look into its ring (:mod:`carousel.daemon.shm_ring`); the
:class:`Filler` fills each FREE slot with ``CarouselMemory.sample_into`` (one copy, straight into
shared memory) and sleeps on the daemon's doorbell, rung by clients handing slots back, when there
is nothing to fill. No polling, no socket round trip.
"""

from __future__ import annotations

import logging
import threading
import time

from .metrics import DaemonMetrics
from .served import Served
from .shm import FUTEX, Doorbell
from .shm_ring import BatchRing
from .torch_threads import set_torch_threads

log = logging.getLogger("carousel.daemon")


class Filler(threading.Thread):
    """Keeps every ring's FREE slots filled with fresh batches, so clients never wait on a socket."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        super().__init__(name="carousel-ring-filler", daemon=True)
        self.lock = threading.Lock()  # guards ``rings`` and every ring's segment while it is written
        self.rings: dict[int, tuple[Served, BatchRing, dict]] = {}
        self._halt = threading.Event()
        self.doorbell = Doorbell.create()  # rung by clients handing slots back, and by us
        self._metrics = metrics
        self._logged = 0.0
        self.torch_threads = 1
        self.last_error: BaseException | None = None

    def add(self, ring_id: int, served: Served, ring: BatchRing, filters: dict) -> None:
        with self.lock:
            self.rings[ring_id] = (served, ring, filters)
        self.doorbell.ring()

    def remove(self, ring_id: int) -> None:
        with self.lock:
            entry = self.rings.pop(ring_id, None)
            if entry is not None:
                entry[1].close()

    def wake(self) -> None:
        self.doorbell.ring()

    def added(self, served: Served) -> None:
        """``served`` got new samples: its rings' short batches are stale from now on.

        The filler is not woken for it: it fills FREE slots as soon as there are any, so an add
        gives it nothing new to do (a client hands a stale batch back, and that rings). Waking it
        on every add cost each add a futex wake and, on a busy machine, the preemption that
        follows -- the most of an add's time in the daemon. Only after a failed fill, which left
        slots FREE, is it woken, to try again now rather than at its next timeout."""
        with self.lock:
            for owner, ring, _ in self.rings.values():
                if owner is served:
                    ring.set_epoch(served.epoch)
        if self.last_error is not None:
            self.doorbell.ring()

    def _failed(self, served: Served, exc: Exception) -> None:
        # Logged when the error changes or every 10 s, not on every pass.
        now = time.monotonic()
        if repr(exc) != repr(self.last_error) or now - self._logged > 10:
            log.warning("ring fill failed", extra={"memory": served.name, "error": repr(exc)})
            self._logged = now
        self.last_error = exc

    def run(self) -> None:
        set_torch_threads(self.torch_threads)
        # Every way a slot becomes FREE rings the doorbell (a client handing a batch back or
        # dropping a stale one, a new ring, a failed fill), so with futexes the filler sleeps until
        # rung: a short first timeout, doubled while idle, woke it ~5 times per training step for
        # nothing (0.6 ms of CPU per 2 ms step). Without futexes the doorbell cannot wake it: poll.
        first = 0.05 if FUTEX is not None else 5e-5
        idle = first
        while not self._halt.is_set():
            seen = self.doorbell.value()
            work = 0
            with self.lock:
                for served, ring, filters in list(self.rings.values()):
                    if served.memory._closed:
                        continue
                    for slot in ring.free_slots():
                        epoch = served.epoch  # read first: a batch is never newer than its label
                        try:
                            rows = served.memory.sample_into(ring.layout.n, ring.outs[slot], **filters)
                        except Exception as exc:  # noqa: BLE001 - a broken memory must not stop the others
                            self._failed(served, exc)
                            break
                        # Empty or short batches are published too (labelled with the epoch they
                        # saw): a client takes them at once, and hands them back after an add.
                        ring.publish(int(slot), rows, epoch)
                        self._metrics.ring_batches.inc()
                        work += 1
            if work:
                idle = first
            else:
                # Asleep until a client hands a slot back (it rings the doorbell) or a ring or a
                # sample arrives; the timeout only bounds what a client without futexes costs.
                self.doorbell.wait(seen, idle)
                idle = min(idle * 2, 0.05)

    def stop(self) -> None:
        self._halt.set()
        self.doorbell.ring()
        if self.is_alive():
            self.join(timeout=10)
        with self.lock:
            for _, ring, _ in self.rings.values():
                ring.close()
            self.rings.clear()
        self.doorbell.close()

