"""The RAM episodic memory (EM): preallocated tensors, one row per slot, never reallocated.

One short lock guards the slots. It is held only for memcpy-sized work -- writing admitted or
swapped-in samples into slots, and gathering a batch -- never while storage is read: the swap
engine decodes candidates first and only then copies them in. So ``sample()`` never waits on
storage, and never sees a half-written slot.

Every copy on the trainer's thread is a numpy copy (one thread, whatever ``torch.set_num_threads``
says): see :meth:`EMPool.gather_locked` for why not torch's ``index_select``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import numpy as np
import torch

from .batch import Batch
from .inputs import as_array

EMPTY = -1


def _index(slots: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Slots as an int64 index tensor (no copy when they already are one)."""
    if isinstance(slots, torch.Tensor):
        return slots
    return torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64))


def take_rows(src: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``src[idx]`` (into ``out`` when given), copied with the GIL held throughout.

    numpy releases the GIL while it copies rows of more than one dimension (a fancy index, or
    ``np.take``), and a thread that releases it inside the EM's lock, or inside a trainer's call,
    hands it to whichever thread waits for it: the trainer then waits for that thread's whole stretch,
    and on busy cores for as long as the OS keeps that thread off a core (milliseconds). So rows
    go by ``memoryview`` slices, one ``memcpy`` each under the GIL (~0.3 us a row: ~10 us for 32);
    a one-dimensional field is one fancy index, which numpy copies without releasing it.
    """
    if src.ndim == 1:
        if out is None:
            return src[idx]
        out[:idx.size] = src[idx]
        return out
    if out is None:
        out = np.empty((idx.size, *src.shape[1:]), dtype=src.dtype)
    row = src.itemsize * int(np.prod(src.shape[1:]))
    if not (row and idx.size):  # nothing to copy (memoryview cannot cast a view of zeros)
        return out
    s, d = memoryview(src).cast("B"), memoryview(out).cast("B")
    for i, j in enumerate(idx.tolist()):
        d[i * row:(i + 1) * row] = s[j * row:(j + 1) * row]
    return out


def put_rows(dst: np.ndarray, slots: np.ndarray, src: np.ndarray, rows: np.ndarray | None = None) -> None:
    """``dst[slots] = src[rows]`` (``rows``: every row of ``src`` when None), with the GIL held
    throughout: see :func:`take_rows`. ``dst`` is the EM's own C-contiguous array."""
    if dst.ndim == 1:
        dst[slots] = src if rows is None else src[rows]
        return
    if src.shape[1:] != dst.shape[1:]:  # numpy's assignment would have raised (or broadcast)
        raise ValueError(f"rows of shape {src.shape[1:]} for slots of shape {dst.shape[1:]}")
    src = np.ascontiguousarray(src, dtype=dst.dtype)  # the cast numpy's assignment makes
    row = src.itemsize * int(np.prod(src.shape[1:]))
    if not (row and slots.size):
        return
    d, s = memoryview(dst).cast("B"), memoryview(src).cast("B")
    pairs = zip(slots.tolist(), range(slots.size) if rows is None else rows.tolist())
    for j, i in pairs:
        d[j * row:(j + 1) * row] = s[i * row:(i + 1) * row]


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Draw probabilities that give every class the same total weight."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse]
    return w / w.sum()


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a numpy dtype name (``"uint8"`` -> ``torch.uint8``)."""
    return torch.from_numpy(np.zeros(0, dtype=np.dtype(name))).dtype


class EMPool:
    """``size`` slots of every field, plus the id held by each slot (``-1``: empty)."""

    def __init__(self, size: int, fields: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.tensors = {name: torch.zeros((size, *shape), dtype=torch_dtype(dtype))
                        for name, (shape, dtype) in fields.items()}
        # numpy views of the same memory, for copies of small fields and for writes: torch's
        # per-op dispatch costs more than such copies.
        self.arrays = {name: t.numpy() for name, t in self.tensors.items()}
        self.slot_ids = np.full(size, EMPTY, dtype=np.int64)  # written under ``lock`` only
        self.slot_labels = np.full(size, EMPTY, dtype=np.int64)
        self.slot_tasks = np.full(size, EMPTY, dtype=np.int64)
        self._slot_ids_t = torch.from_numpy(self.slot_ids)  # the same memory, for torch gathers
        self._order = np.zeros(0, dtype=np.int64)  # a shuffled pass over the filled slots
        self._cursor = 0
        self._filled: np.ndarray | None = None  # filled slots, until a write fills an empty one
        self._shuffle: np.random.Generator | None = None  # seeded from the first draw's rng
        # Called with ``(ids, rows)`` of the samples a :meth:`write` pushes out of their slots
        # (copies taken under the lock, the call made after it): the memory sets it when the EM's
        # rows may have been changed in place, so those changes follow the samples to storage.
        self.on_leave: Callable[[np.ndarray, dict[str, np.ndarray]], None] | None = None

    def draw_locked(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``n`` distinct filled slots, uniformly at random (caller holds ``lock``).

        Slots are dealt from a shuffled pass over the EM. A batch that would run past the pass's
        end is its last ``n`` slots instead (overlapping the batch before), so a pass replays every
        slot -- none sits out until the next shuffle -- and each shuffle serves ``ceil(size / n)``
        batches (2 at EM 500 for batches of 256, against 1 if the remainder were dropped). Any
        ``n`` positions of a uniform permutation are a uniform draw without replacement, so every
        slot is equally likely in every batch. The shuffle is numpy's ``permutation`` on a generator
        seeded once from ``rng``, so a seeded memory stays reproducible. (It was ``torch.randperm``,
        2 us faster per pass at EM 500, but its fill runs on torch's intra-op pool from 32 Ki slots:
        nothing on the trainer's thread may wake that pool, see :meth:`gather_locked`.)
        """
        m = self._order.size
        if self._cursor >= m:
            if self._filled is None:
                self._filled = np.flatnonzero(self.slot_ids != EMPTY)
            if self._shuffle is None:
                self._shuffle = np.random.default_rng(int(rng.integers(1 << 62)))
            perm = self._shuffle.permutation(self._filled.size)
            # A full EM (the steady state) fills slots 0..size-1: the permutation is the order.
            self._order = perm if self._filled.size == self.size else self._filled[perm]
            self._cursor = 0
            m = self._order.size
        start = min(self._cursor, max(m - n, 0))
        self._cursor = start + n
        return self._order[start:start + n]

    def write(self, slots: np.ndarray, ids: np.ndarray, fields: Mapping[str, torch.Tensor | np.ndarray],
              expect: np.ndarray | None = None) -> np.ndarray:
        """Copy samples into ``slots``; return the mask of slots actually written.

        With ``expect``, a slot is written only if it still holds the id given there: a swap-in
        whose victim was replaced meanwhile (by admission) must not overwrite the newcomer.
        """
        slots = np.asarray(slots, dtype=np.int64)
        # Contiguous before the lock (a copy here releases the GIL, which is fine outside it).
        arrays = self.arrays
        src = {k: np.ascontiguousarray(as_array(v), dtype=arrays[k].dtype if k in arrays else None)
               for k, v in fields.items()}
        leaving = None
        with self.lock:  # nothing in here releases the GIL (put_rows, take_rows): see take_rows
            ok = np.ones(slots.size, dtype=bool) if expect is None else self.slot_ids[slots] == expect
            if not ok.any():
                return ok
            # Every row, as a view, in the usual case: under the lock only the copies into the
            # slots, no boolean-mask copy of the sources first.
            rows = None if ok.all() else np.flatnonzero(ok)
            dst = slots if rows is None else slots[rows]
            if self.on_leave is not None:
                old = self.slot_ids[dst]
                held = dst[old != EMPTY]
                if held.size:
                    leaving = (self.slot_ids[held].copy(),
                               {name: take_rows(arr, held) for name, arr in self.arrays.items()})
            if (self.slot_ids[dst] == EMPTY).any():
                self._order = self._order[:0]  # newly filled slots join from the next pass
                self._filled = None
            for name, arr in self.arrays.items():
                put_rows(arr, dst, src[name], rows)
            rows = slice(None) if rows is None else rows
            self.slot_ids[dst] = np.asarray(ids)[rows]
            self.slot_labels[dst] = src["y"][rows]
            self.slot_tasks[dst] = src["task"][rows]
        if leaving is not None:
            self.on_leave(*leaving)
        return ok

    def replace_locked(self, clear: np.ndarray, slots: np.ndarray, ids: np.ndarray, fields: Mapping[str, np.ndarray],
                       set_field: tuple[str, np.ndarray, np.ndarray] | None = None) -> None:
        """In one step, by a caller that holds ``lock``: empty the slots ``clear``, write ``ids`` with
        ``fields`` into ``slots``, then set ``set_field = (name, slots, values)``. A coreset update:
        a concurrent ``sample()`` sees the slice before or after, never half of it; the caller
        changes what must change with it (the catalog's weights) under the same lock."""
        if clear.size:
            self.slot_ids[clear] = EMPTY
            self.slot_labels[clear] = EMPTY
            self.slot_tasks[clear] = EMPTY
        if clear.size or (slots.size and (self.slot_ids[slots] == EMPTY).any()):
            self._order = self._order[:0]  # the next draw deals from the slots filled now
            self._filled = None
        if slots.size:
            for name, arr in self.arrays.items():
                put_rows(arr, slots, fields[name])
            self.slot_ids[slots] = ids
            self.slot_labels[slots] = fields["y"]
            self.slot_tasks[slots] = fields["task"]
        if set_field is not None:
            name, where, values = set_field
            self.arrays[name][where] = values

    def gather(self, slots: np.ndarray, extras: tuple[str, ...]) -> Batch:
        """The samples in ``slots`` as a :class:`Batch` (fresh tensors, safe to keep)."""
        with self.lock:
            return self.gather_locked(slots, extras)

    def gather_locked(self, slots: np.ndarray | torch.Tensor, extras: tuple[str, ...],
                      out: Mapping[str, torch.Tensor] | None = None) -> Batch:
        """:meth:`gather` for a caller that already holds ``lock``; with ``out``
        (:meth:`pinned_rows`, allocated before taking the lock) the rows land in its first
        ``len(slots)`` rows and the batch is views of them.

        Every field is one numpy gather into a fresh array that torch then wraps: single-threaded
        whatever the trainer's ``torch.set_num_threads``. ``index_select`` ran the image field on
        torch's intra-op pool (OpenMP): at default threads on a busy 2-core machine that made
        ``sample(32)`` wait at the pool's barrier for a worker the OS had not scheduled (p50 5.4
        ms, p99 38 ms, against 7-10 us for this numpy gather of 32 x 3 KiB), and the pool's
        worker spun on a core after every call (3 ms of CPU a 2 ms step). At 256 rows the pool
        was ~1.7x faster on quiet cores (17 us against 30 us): too little to be worth a barrier.
        """
        idx = np.asarray(slots.numpy() if isinstance(slots, torch.Tensor) else slots, dtype=np.int64)
        a = self.arrays
        if out is not None:
            k = idx.size
            rows = {name: t[:k] for name, t in out.items()}
            for name, t in rows.items():
                take_rows(self.slot_ids if name == "id" else a[name], idx, t.numpy())
            return Batch(rows["id"], rows["x"], rows["y"], rows["task"], {k: rows[k] for k in extras})
        return Batch(torch.from_numpy(self.slot_ids[idx]), torch.from_numpy(take_rows(a["x"], idx)),
                     torch.from_numpy(a["y"][idx]), torch.from_numpy(a["task"][idx]),
                     {k: torch.from_numpy(take_rows(a[k], idx)) for k in extras})

    def pinned_rows(self, n: int, extras: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Fresh page-locked tensors for a batch of up to ``n`` rows (``"id"``, ``x``, ``y``,
        ``task`` and ``extras``), for :meth:`gather_locked`'s ``out``. Needs a CUDA device
        (:func:`carousel.batch.can_pin`). Fresh each call, so a batch handed out stays valid
        however long it is kept; torch's caching host allocator hands freed blocks back (after
        the copies that read them are done), so in steady state nothing new is page-locked."""
        n = min(n, self.size)
        out = {"id": torch.empty(n, dtype=torch.int64, pin_memory=True)}
        for name in ("x", "y", "task", *extras):
            t = self.tensors[name]
            out[name] = torch.empty((n, *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        return out

    def gather_into_locked(self, slots: np.ndarray | torch.Tensor, out: Mapping[str, torch.Tensor]) -> None:
        """Gather ``slots`` into the first ``len(slots)`` rows of ``out`` (``"id"`` and every field).

        Through ``index_select``: the daemon's ring filler calls this on its own thread, which
        sets its own intra-op thread count (:mod:`carousel.daemon.torch_threads`)."""
        index = _index(slots)
        k = int(index.numel())
        torch.index_select(self._slot_ids_t, 0, index, out=out["id"][:k])
        for name, src in self.tensors.items():
            torch.index_select(src, 0, index, out=out[name][:k])

    def labels_snapshot(self) -> np.ndarray:
        """A consistent copy of ``slot_labels`` alone (what admission reads on every ``add``: one
        copy of the EM's labels instead of three arrays)."""
        with self.lock:
            return self.slot_labels.copy()

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Consistent copies of ``(slot_ids, slot_labels, slot_tasks)``."""
        with self.lock:
            return self.slot_ids.copy(), self.slot_labels.copy(), self.slot_tasks.copy()

    def filled(self) -> int:
        return int((self.slot_ids != EMPTY).sum())
