"""Batch rings: one client's standing sample request in a shared-memory segment.

A ring is ``slots`` batches of ``n`` rows in one segment (:mod:`carousel.daemon.shm`), each slot
in one of three states, written by one side each::

    FREE --daemon fills it--> READY --client takes it--> TAKEN --client's tensors die--> FREE

so neither side needs a lock across processes: the daemon only writes FREE slots and flips
them to READY; the client only flips READY to TAKEN and TAKEN back to FREE. The client's batch
tensors view the slot directly (no copy); the slot is handed back when the last of them is freed.
The daemon's side is :class:`BatchRing`, the client's :class:`RingReader`; a ring's place in the
segment is its :class:`RingLayout`, sent to the client as JSON.
"""

from __future__ import annotations

import mmap
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..em_pool import torch_dtype
from .shm import FUTEX, Doorbell, Segment, address_of, align, fence_lock

_STATE_STRIDE = 64  # one cache line per slot state: the two processes never share a line
FREE, READY, TAKEN = 0, 1, 2


@dataclass(frozen=True)
class RingLayout:
    """Where everything lives in a ring segment; sent to the client as JSON (:meth:`to_json`)."""

    n: int
    slots: int
    slot_bytes: int
    data_offset: int
    fields: tuple[tuple[str, str, tuple[int, ...], int], ...]  # (name, dtype, row shape, offset in slot)

    @classmethod
    def plan(cls, n: int, slots: int, fields: Mapping[str, tuple[tuple[int, ...], str]]) -> RingLayout:
        """``"id"`` (int64) first, then every field, each aligned; slots page-aligned."""
        entries = []
        offset = 0
        for name, (shape, dtype) in {"id": ((), "int64"), **fields}.items():
            entries.append((name, dtype, tuple(shape), offset))
            offset = align(offset + n * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        slot_bytes = align(max(offset, 1), mmap.PAGESIZE)
        data_offset = align((slots + 1) * _STATE_STRIDE, mmap.PAGESIZE)
        return cls(n, slots, slot_bytes, data_offset, tuple(entries))

    @property
    def size(self) -> int:
        return self.data_offset + self.slots * self.slot_bytes

    def to_json(self) -> dict:
        return {"n": self.n, "slots": self.slots, "slot_bytes": self.slot_bytes, "data_offset": self.data_offset,
                "fields": [[name, dtype, list(shape), off] for name, dtype, shape, off in self.fields]}

    @classmethod
    def from_json(cls, d: Mapping) -> RingLayout:
        return cls(int(d["n"]), int(d["slots"]), int(d["slot_bytes"]), int(d["data_offset"]),
                   tuple((str(f[0]), str(f[1]), tuple(int(x) for x in f[2]), int(f[3])) for f in d["fields"]))


def _states(seg: Segment, slots: int) -> np.ndarray:
    # Per slot, one cache line apart: (state, rows, epoch it was filled in, its publication's
    # number); then one line for the ring itself: (current epoch of the memory, batches published,
    # a client is waiting, 0).
    return np.ndarray((slots + 1, 4), dtype=np.uint32, buffer=seg.map, offset=0, strides=(_STATE_STRIDE, 4))


class BatchRing:
    """The daemon's side of a ring: tensors over each slot, filled by :meth:`fill`."""

    def __init__(self, layout: RingLayout, key: tuple) -> None:
        self.layout, self.key = layout, key
        self.segment = Segment.create(layout.size)
        self.states = _states(self.segment, layout.slots)
        self._published_addr = address_of(self.segment, layout.slots * _STATE_STRIDE + 4)
        raw = torch.frombuffer(self.segment.map, dtype=torch.uint8)
        self.outs: list[dict[str, torch.Tensor]] = []
        for i in range(layout.slots):
            base = layout.data_offset + i * layout.slot_bytes
            out = {}
            for name, dtype, shape, off in layout.fields:
                dt = torch_dtype(dtype)
                count = layout.n * int(np.prod(shape, dtype=np.int64))
                nbytes = count * torch.empty(0, dtype=dt).element_size()
                out[name] = raw[base + off: base + off + nbytes].view(dt).view(layout.n, *shape)
            self.outs.append(out)
        self.filled = 0

    def free_slots(self) -> np.ndarray:
        return np.flatnonzero(self.states[:-1, 0] == FREE)

    def set_epoch(self, epoch: int) -> None:
        """The memory changed (samples were added): a batch filled before with fewer than ``n``
        rows is stale, and the client asks for a fresh one instead of taking it."""
        self.states[-1, 0] = epoch

    def publish(self, slot: int, rows: int, epoch: int = 0) -> None:
        self.states[slot, 1] = rows
        self.states[slot, 2] = epoch
        self.states[slot, 3] = (int(self.states[-1, 1]) + 1) & 0xFFFFFFFF  # the published count it makes
        with fence_lock:  # every write of the slot is visible before READY is
            pass
        self.states[slot, 0] = READY
        head = self.states[-1]
        head[1] = (int(head[1]) + 1) & 0xFFFFFFFF  # the futex word: a waiting client sleeps on its old value
        with fence_lock:  # READY and the count are stored before the waiter flag is read
            pass
        if head[2] and FUTEX is not None:
            head[2] = 0
            FUTEX[1](self._published_addr)
        self.filled += 1

    def close(self) -> None:
        self.outs.clear()
        self.states = None
        self.segment.close()


def _use_count_api():
    """torch's count of tensors sharing a storage, if this torch has it (private API, so checked)."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return None
    try:
        probe = torch.zeros(1)
        before = fn(probe.untyped_storage()._cdata)
        view = probe.detach()
        ok = fn(probe.untyped_storage()._cdata) == before + 1
        del view
        return fn if ok and fn(probe.untyped_storage()._cdata) == before else None
    except Exception:  # noqa: BLE001 - any surprise: fall back to finalizers
        return None


_USE_COUNT = _use_count_api()


class RingReader:
    """The client's side of a ring: :meth:`take` returns a ready batch's tensors, without a copy.

    Every slot has its own torch storage over the shared memory, and tensors that stay with the
    reader. A batch handed out is a set of fresh views of them; when torch's count of tensors
    sharing the slot's storage is back to what the reader itself holds, every tensor of that
    batch (and every view the user made of one) is gone, and the slot goes back to the daemon.
    That check runs at each :meth:`take` -- a few hundred nanoseconds per slot held.
    """

    def __init__(self, name: str, layout: RingLayout, doorbell: Doorbell | None = None) -> None:
        self.layout = layout
        self.doorbell = doorbell
        self.segment = Segment.attach(name, layout.size)
        self.states = _states(self.segment, layout.slots)
        self._slots: list[dict[str, torch.Tensor]] = []
        self._storage: list[int] = []
        self._baseline: list[int] = []
        for i in range(layout.slots):
            raw = torch.frombuffer(self.segment.map, dtype=torch.uint8, count=layout.slot_bytes,
                                   offset=layout.data_offset + i * layout.slot_bytes)
            views = {"": raw}
            for fname, dtype, shape, off in layout.fields:
                dt = torch_dtype(dtype)
                nbytes = layout.n * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                views[fname] = raw[off:off + nbytes].view(dt).view(layout.n, *shape)
            self._slots.append(views)
            cdata = raw.untyped_storage()._cdata
            self._storage.append(cdata)
            self._baseline.append(_USE_COUNT(cdata) if _USE_COUNT else 0)
        self._taken: set[int] = set()
        self._published_addr = address_of(self.segment, layout.slots * _STATE_STRIDE + 4)
        self._lock = threading.Lock()
        self._alive = True

    def take(self) -> dict[str, torch.Tensor] | None:
        """The freshest READY batch as tensors viewing the slot, or None if none is ready.

        Freshest, not oldest: a batch waits in its slot from the moment it is drawn, and the
        samples it names may leave the EM meanwhile (swapped out: their replay then triggers no
        swap). Taking the last one published keeps a replay batch about a step old however many
        slots the ring has; the others wait as a reserve for the steps when the filler is late
        (busy cores), and are refilled fresh once taken."""
        lay = self.layout
        with self._lock:
            if not self._alive:
                return None
            states = self.states
            self._reclaim_locked()
            # Age in publications, mod 2**32 as the counter wraps; a daemon that leaves the number
            # 0 makes every age alike: the first READY slot is taken. The counter is read after the
            # slots: the filler counts a publication after its READY, so no slot seen READY here is
            # newer than the count. (Python ints over a few slots: cheaper than numpy's temporaries
            # on the trainer's thread.)
            seen = list(zip(states[:-1, 0].tolist(), states[:-1, 3].tolist()))
            published = int(states[-1, 1])
            slot, best = -1, 1 << 32
            for i, (state, number) in enumerate(seen):
                if state == READY and (published - number) & 0xFFFFFFFF < best:
                    slot, best = i, (published - number) & 0xFFFFFFFF
            if slot < 0:
                return None
            rows = int(states[slot, 1])
            if rows < lay.n and states[slot, 2] != states[-1, 0]:
                states[slot, 0] = FREE  # short and stale: the memory has grown since
                if self.doorbell is not None:
                    self.doorbell.ring()  # the filler sleeps until a slot comes back: this one did
                return None
            states[slot, 0] = TAKEN
            with fence_lock:  # reads of the slot happen after READY was seen
                pass
            if _USE_COUNT is None:
                return self._take_with_finalizer(slot, rows)
            # The views are made under the lock: until they exist, another thread's reclaim
            # would see the slot unused and hand it back while we read it.
            self._taken.add(slot)
            views = self._slots[slot]
            if rows == lay.n:
                return {name: views[name].detach() for name, _, _, _ in lay.fields}
            return {name: views[name][:rows] for name, _, _, _ in lay.fields}

    def _reclaim_locked(self) -> None:
        """Slots whose batch the user has dropped go back to the daemon (which is told)."""
        if _USE_COUNT is None or not self._taken:
            return
        freed = [s for s in self._taken if _USE_COUNT(self._storage[s]) == self._baseline[s]]
        for slot in freed:
            self._taken.discard(slot)
            self.states[slot, 0] = FREE
        if freed and self.doorbell is not None:
            self.doorbell.ring()

    def wait(self, timeout_s: float) -> None:
        """Sleep until the daemon publishes a batch, or ``timeout_s`` passes (a short poll where
        futexes are unavailable)."""
        if FUTEX is None:
            time.sleep(min(timeout_s, 5e-5))
            return
        with self._lock:
            if not self._alive:
                return
            self._reclaim_locked()  # what we drop is what the filler needs to make the next batch
            head = self.states[-1]
            seen = int(head[1])
            head[2] = 1
            with fence_lock:  # the flag is stored before READY is looked at again
                pass
            if (self.states[:-1, 0] == READY).any():
                return
        FUTEX[0](self._published_addr, seen, timeout_s)

    def _take_with_finalizer(self, slot: int, rows: int) -> dict[str, torch.Tensor]:
        # Fallback: an anchor array referenced only by the new tensors' storage; when it dies,
        # every tensor of the batch is gone.
        lay = self.layout
        self._taken.discard(slot)
        anchor = np.frombuffer(self.segment.map, dtype=np.uint8, count=lay.slot_bytes,
                               offset=lay.data_offset + slot * lay.slot_bytes)
        weakref.finalize(anchor, self._give_back, slot)
        raw = torch.from_numpy(anchor)
        del anchor
        out = {}
        for name, dtype, shape, off in lay.fields:
            row = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            out[name] = raw[off:off + rows * row].view(torch_dtype(dtype)).view(rows, *shape)
        return out

    def _give_back(self, slot: int) -> None:
        if self._alive:
            try:
                self.states[slot, 0] = FREE
            except (ValueError, TypeError):  # the map was closed meanwhile
                return
            if self.doorbell is not None:
                self.doorbell.ring()

    def close(self) -> None:
        with self._lock:
            self._alive = False
            self.states = None
            self._slots.clear()
        self.segment.close()
