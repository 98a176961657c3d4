"""The catalog: where every sample is, and what the trainer observed about it.

Ids are dense (the memory hands them out 0, 1, 2, ...; a crash skips at most a block of them, see
:mod:`carousel.ids`), so every column is a numpy array indexed by id -- no per-sample Python
objects. ``home`` says which storage tier holds the sample (or that it is still queued for
write-behind, evicted, or that no sample has the id); ``slot`` says which EM slot holds a copy. In
CarM every stream sample goes to storage and the EM caches some of them, so a sample has exactly
one home (a tier, the write-behind queue, or "evicted") and at most one slot.

Labels need not be dense (an open-world stream may use any label up to ``memory.max_label``), so
nothing is sized by a label's value: each distinct label gets a dense *class index* (0, 1, 2, ...
in order of first sight) when its first sample is registered, and per-class counts are
``np.bincount`` over those indices -- as cheap as over dense labels, and as large as the number of
distinct classes, whatever the labels' values.

The statistics columns (correctness, softmax entropy, loss, times replayed) are what swap-out
policies read. One lock guards all columns; it is never held during I/O.

Samples of an adopted read-only tier (an image folder holding a whole data set, future tasks'
classes included) are registered *dormant*: a class that only such samples have is left out of
every swap-in count and draw (:meth:`Catalog.available_by_class`, :meth:`Catalog.swap_in_pool`,
:meth:`Catalog.draw_swap_in`) until a sample of it is registered otherwise (added by the stream,
or found on a writable tier), so no swap-in policy -- not even ``random`` or ``class_balanced``,
which may name a class the EM does not hold -- brings a class the stream has not reached yet.

>>> import numpy as np
>>> cat = Catalog()
>>> cat.register(np.arange(4), np.array([7, 2**40, 7, 3]), np.zeros(4, np.int64), home=0)
>>> cat.available_by_class()
{3: 1, 7: 2, 1099511627776: 1}
>>> cat.class_counts(np.array([0, 1, 2, -1]))   # the classes of ids 0, 1, 2 (-1: an empty slot)
{7: 2, 1099511627776: 1}
"""

from __future__ import annotations

import threading

import numpy as np

PENDING = -1  # queued for write-behind, not yet on any tier
EVICTED = -2  # dropped for good (last tier full, or not admitted in a RAM-only memory)
RAM_ONLY = -3  # held by an EM slot only (RAM-only memory: no storage tiers)
UNUSED = -4  # no sample has this id: never registered (skipped after a crash, or lost in it unstored)
_NO_IDS = np.zeros(0, np.int64)


class Catalog:
    """Columns per id: ``label``, ``task``, ``home``, ``slot``, ``correct``, ``entropy``, ``loss``,
    ``replays``, ``prefetched``, ``weight`` (a coreset memory's per-sample weight; 1 otherwise),
    ``nbytes`` (bytes of the stored record, what a tier's byte budget counts; 0 until stored),
    ``cls`` (the label's dense class index; ``class_labels[cls]`` is the label).

    With ``crc_columns`` > 0 (the integrity mode, :mod:`carousel.integrity`) also ``crc``: a
    ``(capacity, crc_columns)`` uint32 matrix, the reference CRC-32C of each checked field of each
    id, written once (``add()``, recovery) before the id can enter the EM and never changed;
    without it ``crc`` is None and costs nothing."""

    def __init__(self, capacity: int = 1024, crc_columns: int = 0) -> None:
        self.lock = threading.RLock()
        self.n = 0
        self._crc_columns = crc_columns
        self._alloc(capacity)
        # Per class, every id registered with it, in a growable array (used: _class_len): what a
        # swap-in draws from. Appended to by register() in amortized O(ids added), never rebuilt
        # per add: rebuilding it cost O(ids of the class) per add, growing with the stored set.
        self._class_arr: dict[int, np.ndarray] = {}
        self._class_len: dict[int, int] = {}
        self._class_index: dict[int, int] = {}  # label -> dense class index
        self.class_labels = np.zeros(0, np.int64)  # dense class index -> label
        self._dormant: set[int] = set()  # labels only an adopted tier holds, no add has brought (see above)
        # Bumped whenever a class may appear in available_by_class() that could not before: its
        # first sample stored (note_stored), or its dormancy ended. A cached count (the swap
        # engine's) that lacks a class it needs recounts at once when this moved, not a while later.
        self.classes_version = 0
        self._stored_cls = np.zeros(0, np.bool_)  # by dense class index: a sample of it was ever stored

    def _alloc(self, capacity: int) -> None:
        old = getattr(self, "label", None)
        cols = {"label": (np.int64, -1), "task": (np.int64, -1), "home": (np.int8, UNUSED),
                "slot": (np.int32, -1), "correct": (np.int8, -1), "entropy": (np.float32, np.nan),
                "loss": (np.float32, np.nan), "replays": (np.int32, 0), "prefetched": (np.bool_, False),
                "weight": (np.float32, 1.0), "nbytes": (np.uint32, 0), "cls": (np.int32, -1)}
        for name, (dtype, fill) in cols.items():
            new = np.full(capacity, fill, dtype=dtype)
            if old is not None:
                new[:self.n] = getattr(self, name)[:self.n]
            setattr(self, name, new)
        crc = None
        if self._crc_columns:
            crc = np.zeros((capacity, self._crc_columns), np.uint32)
            if old is not None:
                crc[:self.n] = self.crc[:self.n]
        self.crc: np.ndarray | None = crc

    def ensure_capacity(self, capacity: int) -> None:
        """Columns for ids below ``capacity`` (unregistered ones read as ``UNUSED``, label -1)."""
        with self.lock:
            if capacity > self.label.size:
                self._alloc(capacity)

    def register(self, ids: np.ndarray, labels: np.ndarray, tasks: np.ndarray, home: int | np.ndarray,
                 dormant: bool = False) -> None:
        """Add new ids (any order, possibly sparse after recovery) with their labels and home.

        ``dormant``: the ids are an adopted read-only tier's; a class first seen here stays out of
        swap-ins until registered without ``dormant`` (or :meth:`open_classes`)."""
        with self.lock:
            top = int(ids.max()) + 1 if ids.size else 0
            if top > self.label.size:
                self._alloc(max(top, 2 * self.label.size))
            self.n = max(self.n, top)
            self.label[ids] = labels
            self.task[ids] = tasks
            self.home[ids] = home
            if not ids.size:
                return
            # Grouped by one stable sort (faster than a mask per class): each class's ids, in order.
            order = np.argsort(labels, kind="stable")
            sorted_labels, sorted_ids = labels[order], ids[order]
            bounds = [0, *(np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1).tolist(), ids.size]
            classes = sorted_labels[bounds[:-1]].tolist()
            if dormant:
                self._dormant.update(c for c in classes if c not in self._class_index)
            elif self._dormant:
                self._wake(classes)
            index = np.array([self._class_of(c) for c in classes], dtype=np.int32)
            self.cls[sorted_ids] = np.repeat(index, np.diff(bounds))
            for c, lo, hi in zip(classes, bounds[:-1], bounds[1:]):
                self._append_class(c, sorted_ids[lo:hi])
            stored = np.asarray(home) >= 0  # registered already stored (recovery, an adopted tier)
            if stored.any():
                self._note_stored_locked(ids[stored] if stored.ndim else ids)

    def note_stored(self, ids: np.ndarray) -> None:
        """``ids`` (registered) now have a tier as their home: the write-behind thread calls this
        after it stored them. Bumps ``classes_version`` when one of their classes had no stored
        sample before (a few microseconds: the classes of one write batch)."""
        with self.lock:
            self._note_stored_locked(ids)

    def _note_stored_locked(self, ids: np.ndarray) -> None:
        if not ids.size:
            return
        cls = self.cls[ids]
        top = int(cls.max()) + 1
        if top > self._stored_cls.size:
            grown = np.zeros(max(16, 2 * top), np.bool_)
            grown[:self._stored_cls.size] = self._stored_cls
            self._stored_cls = grown
        if not self._stored_cls[cls].all():
            self._stored_cls[cls] = True
            self.classes_version += 1

    def _wake(self, labels: list[int]) -> None:
        """End the dormancy of ``labels`` (caller holds the lock)."""
        if self._dormant.intersection(labels):
            self._dormant.difference_update(labels)
            self.classes_version += 1

    def open_classes(self, labels: np.ndarray) -> None:
        """End the dormancy of ``labels`` (a restart: classes a checkpoint saw the stream add)."""
        with self.lock:
            if self._dormant:
                self._wake(np.unique(labels).tolist())

    def dormant_classes(self) -> set[int]:
        """Labels held only by an adopted tier and not yet brought by the stream."""
        with self.lock:
            return set(self._dormant)

    def _append_class(self, cls: int, ids: np.ndarray) -> None:
        arr, k = self._class_arr.get(cls), self._class_len.get(cls, 0)
        if arr is None or k + ids.size > arr.size:
            grown = np.empty(max(64, 2 * (k + ids.size)), np.int64)
            if arr is not None:
                grown[:k] = arr[:k]
            self._class_arr[cls] = arr = grown
        arr[k:k + ids.size] = ids
        self._class_len[cls] = k + ids.size

    def _class_of(self, label: int) -> int:
        """The dense class index of ``label``, a new one for a label not seen before."""
        k = self._class_index.get(label)
        if k is None:
            k = self._class_index[label] = len(self._class_index)
            if k >= self.class_labels.size:
                grown = np.zeros(max(16, 2 * self.class_labels.size), np.int64)
                grown[:k] = self.class_labels[:k]
                self.class_labels = grown
            self.class_labels[k] = label
        return k

    def _count(self, cls: np.ndarray) -> dict[int, int]:
        """Label -> count of the dense class indices ``cls`` (classes with a count of 0 left out)."""
        counts = np.bincount(cls)  # as long as the number of distinct classes, not the largest label
        return {c: k for c, k in zip(self.class_labels[:counts.size].tolist(), counts.tolist()) if k}

    def class_counts(self, ids: np.ndarray) -> dict[int, int]:
        """Label -> how many of ``ids`` have it (negative ids, empty EM slots, are skipped)."""
        with self.lock:
            return self._count(self.cls.take(ids[ids >= 0]))

    def class_ids(self, cls: int) -> np.ndarray:
        """Every id registered with label ``cls`` (evicted ones too, until compacted: filter by ``home``)."""
        with self.lock:
            k = self._class_len.get(cls, 0)
            if not k:
                return np.zeros(0, np.int64)
            ids = self._class_arr[cls][:k]
            evicted = self.home[ids] == EVICTED
            if evicted.sum() * 2 > k:  # mostly evicted: compact, so draws stay cheap
                kept = ids[~evicted]
                self._class_arr[cls], self._class_len[cls] = kept.copy(), kept.size
                return self._class_arr[cls]
            return ids

    def swap_in_pool(self, cls: int, below: int | None = None, eligible: np.ndarray | None = None) -> np.ndarray:
        """Stored ids of class ``cls`` that are not in the EM and not already being prefetched
        (and, with ``below``, smaller than it: a deterministic memory's stored-by-now set).
        ``eligible``: :meth:`swap_in_eligible` ``(below)``, taken under the same hold of the lock
        (one gather per class then, not three)."""
        with self.lock:
            if cls in self._dormant:
                return np.zeros(0, np.int64)
            ids = self.class_ids(cls)
            if eligible is None and below is not None:
                eligible = self.swap_in_eligible(below)
            if eligible is not None:  # it covers the ids below min(n, below); a class's ids are all below n
                ids = ids[ids < eligible.size]
                return ids[eligible[ids]]
            return ids[(self.home[ids] >= 0) & (self.slot[ids] < 0) & ~self.prefetched[ids]]

    def swap_in_eligible(self, below: int) -> np.ndarray:
        """The mask, over ids ``[0, min(n, below))``, of those a deterministic swap-in may draw:
        stored, not in the EM, not already chosen (what :meth:`available_by_class` and
        :meth:`swap_in_pool` test with ``below``, computed once for a whole request)."""
        with self.lock:
            live = slice(0, min(self.n, below))
            return (self.home[live] >= 0) & (self.slot[live] < 0) & ~self.prefetched[live]

    def draw_swap_in(self, cls: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``n`` distinct ids drawn uniformly from :meth:`swap_in_pool` ``(cls)``.

        By rejection, in O(n) rather than O(ids of the class): nearly every stored id is eligible
        (the EM holds a few hundred of them), so positions drawn at random from the class's ids
        and filtered mostly hit. When too few do, the whole pool is filtered instead.
        """
        with self.lock:
            if cls in self._dormant:
                return np.zeros(0, np.int64)
            # The class's ids as registered, evicted ones and all (the draw filters them out):
            # class_ids() would look at every one of them to decide on compacting, an O(ids) pass
            # per draw (~0.1 ms at 100 k ids of a class). Only a draw that comes up short does.
            ids = self._class_arr.get(cls, _NO_IDS)[:self._class_len.get(cls, 0)]
            if not ids.size or n <= 0:
                return np.zeros(0, np.int64)
            if ids.size > 8 * n:
                cand = np.unique(ids[rng.integers(0, ids.size, 4 * n + 16)])
                cand = cand[(self.home[cand] >= 0) & (self.slot[cand] < 0) & ~self.prefetched[cand]]
                if cand.size >= n:
                    return rng.permutation(cand)[:n]
            ids = self.class_ids(cls)
            pool = ids[(self.home[ids] >= 0) & (self.slot[ids] < 0) & ~self.prefetched[ids]]
            return rng.choice(pool, min(n, pool.size), replace=False) if pool.size else pool

    def available_by_class(self, below: int | None = None, eligible: np.ndarray | None = None) -> dict[int, int]:
        """Class -> number of stored samples not in the EM (what a swap-in can draw from). With
        ``below`` (a deterministic memory): only ids below it, and none already chosen as a
        candidate; ``eligible`` (:meth:`swap_in_eligible` ``(below)``) gives that mask ready-made."""
        with self.lock:
            if eligible is None and below is not None:
                eligible = self.swap_in_eligible(below)
            if eligible is not None:
                live, ok = slice(0, eligible.size), eligible
            else:
                live = slice(0, self.n)
                ok = (self.home[live] >= 0) & (self.slot[live] < 0)
            counts = self._count(self.cls[live][ok])
            if self._dormant:
                return {c: k for c, k in counts.items() if c not in self._dormant}
            return counts

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
