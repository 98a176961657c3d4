"""The catalog: where every sample is, and what the trainer observed about it.

Ids are dense (the memory hands them out 0, 1, 2, ...), so every column is a numpy array indexed
by id -- no per-sample Python objects. ``home`` says which storage tier holds the sample (or that
it is still queued for write-behind, or evicted); ``slot`` says which EM slot holds a copy. In
CarM every stream sample goes to storage and the EM caches some of them, so a sample has exactly
one home (a tier, the write-behind queue, or "evicted") and at most one slot.

The statistics columns (correctness, softmax entropy, loss, times replayed) are what swap-out
policies read. One lock guards all columns; it is never held during I/O.
"""

from __future__ import annotations

import threading

import numpy as np

PENDING = -1  # queued for write-behind, not yet on any tier
EVICTED = -2  # dropped for good (last tier full, or not admitted in a RAM-only memory)
RAM_ONLY = -3  # held by an EM slot only (RAM-only memory: no storage tiers)


class Catalog:
    """Columns per id: ``label``, ``task``, ``home``, ``slot``, ``correct``, ``entropy``, ``loss``,
    ``replays``, ``prefetched``, ``weight`` (a coreset memory's per-sample weight; 1 otherwise),
    ``nbytes`` (bytes of the stored record, what a tier's byte budget counts; 0 until stored)."""

    def __init__(self, capacity: int = 1024) -> None:
        self.lock = threading.RLock()
        self.n = 0
        self._alloc(capacity)
        self._by_class: dict[int, list[np.ndarray]] = {}  # candidate lists for swap-in draws
        self._class_ids: dict[int, np.ndarray] = {}

    def _alloc(self, capacity: int) -> None:
        old = getattr(self, "label", None)
        cols = {"label": (np.int64, -1), "task": (np.int64, -1), "home": (np.int8, EVICTED),
                "slot": (np.int32, -1), "correct": (np.int8, -1), "entropy": (np.float32, np.nan),
                "loss": (np.float32, np.nan), "replays": (np.int32, 0), "prefetched": (np.bool_, False),
                "weight": (np.float32, 1.0), "nbytes": (np.uint32, 0)}
        for name, (dtype, fill) in cols.items():
            new = np.full(capacity, fill, dtype=dtype)
            if old is not None:
                new[:self.n] = getattr(self, name)[:self.n]
            setattr(self, name, new)

    def register(self, ids: np.ndarray, labels: np.ndarray, tasks: np.ndarray, home: int | np.ndarray) -> None:
        """Add new ids (any order, possibly sparse after recovery) with their labels and home."""
        with self.lock:
            top = int(ids.max()) + 1 if ids.size else 0
            if top > self.label.size:
                self._alloc(max(top, 2 * self.label.size))
            self.n = max(self.n, top)
            self.label[ids] = labels
            self.task[ids] = tasks
            self.home[ids] = home
            for c in np.unique(labels):
                self._by_class.setdefault(int(c), []).append(ids[labels == c])
                self._class_ids.pop(int(c), None)

    def class_ids(self, cls: int) -> np.ndarray:
        """Every id ever registered with label ``cls`` (evicted ones included; filter by ``home``)."""
        with self.lock:
            ids = self._class_ids.get(cls)
            if ids is None:
                parts = self._by_class.get(cls, [])
                ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
                ids = ids[self.home[ids] != EVICTED]  # compacted whenever rebuilt
                self._by_class[cls] = [ids]
                self._class_ids[cls] = ids
            return ids

    def swap_in_pool(self, cls: int) -> np.ndarray:
        """Stored ids of class ``cls`` that are not in the EM and not already being prefetched."""
        with self.lock:
            ids = self.class_ids(cls)
            return ids[(self.home[ids] >= 0) & (self.slot[ids] < 0) & ~self.prefetched[ids]]

    def available_by_class(self) -> dict[int, int]:
        """Class -> number of stored samples not in the EM (what a swap-in can draw from)."""
        with self.lock:
            live = slice(0, self.n)
            mask = (self.home[live] >= 0) & (self.slot[live] < 0)
            labels = self.label[live][mask]
            if not labels.size:
                return {}
            counts = np.bincount(labels)
            return {int(c): int(counts[c]) for c in np.flatnonzero(counts)}

    def tier_ids(self, tier: int) -> np.ndarray:
        with self.lock:
            return np.flatnonzero(self.home[:self.n] == tier)

    def count(self, home: int) -> int:
        with self.lock:
            return int((self.home[:self.n] == home).sum())

    def observe(self, ids: np.ndarray, correct: np.ndarray | None, entropy: np.ndarray | None,
                loss: np.ndarray | None) -> None:
        with self.lock:
            ok = (ids >= 0) & (ids < self.n)
            ids = ids[ok]
            if correct is not None:
                self.correct[ids] = correct[ok]
            if entropy is not None:
                self.entropy[ids] = entropy[ok]
            if loss is not None:
                self.loss[ids] = loss[ok]
            np.add.at(self.replays, ids, 1)
