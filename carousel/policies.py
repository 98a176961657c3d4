"""Admission and swap policies: which samples enter the episodic memory (EM) and which leave it.

Three extension points, each one small ABC, a registry by name (so a TOML config can pick a policy)
and a factory that raises :class:`ValueError` for unknown names:

================  ==========================  =====================================================
ABC               registry / factory          question it answers
================  ==========================  =====================================================
AdmissionPolicy   ``ADMISSION_POLICIES`` /    which EM slot does each incoming stream sample take?
                  :func:`make_admission`
SwapOutPolicy     ``SWAP_OUT_POLICIES`` /     which EM samples just replayed leave for storage?
                  :func:`make_swap_out`
SwapInPolicy      ``SWAP_IN_POLICIES`` /      from which class is each freed slot refilled?
                  :func:`make_swap_in`
================  ==========================  =====================================================

Policies are pure functions of numpy arrays: no I/O, no locks, no torch, no state between calls;
every random choice comes from the ``rng`` passed in, so the same seed gives the same answer. The
public method of each ABC validates its inputs (a rejected call changes nothing), hands read-only
arrays to the subclass's ``_admit`` / ``_select`` / ``_choose``, and returns an ``int64`` array.

The swap rules follow CarM ("Carousel Memory", DAC 2022, arXiv 2110.07276): on every training step
the EM samples of the batch just replayed are swap candidates; ``k = ceil(ratio * n_candidates)``
of them are victims, and each victim's slot is refilled with a random stored sample of the class
the swap-in policy names (CarM: the victim's own class).

Why one module of ~660 lines: three small families (an ABC and two to four implementations of
~30 lines each) that share the validation helpers at the top and the registries at the bottom,
which a TOML config picks from. A family that grows past that gets a subpackage with a
``base.py``, as the memory kinds have (:mod:`carousel.kinds`).

Example, one step of the memory's bookkeeping:

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> admission = make_admission("reservoir")
>>> admission.admit(np.array([3, 4]), np.array([7, -1, -1]), seen=1, rng=rng).tolist()
[1, 2]
>>> out = make_swap_out("carm").select(
...     candidates=np.array([0, 1, 2]), labels=np.array([7, 3, 4]),
...     correct=np.array([1, 1, 0], np.int8), entropy=np.array([0.9, 0.1, 0.2], np.float32),
...     loss=np.full(3, np.nan, np.float32), ratio=0.5, rng=rng)
>>> out.tolist()   # k = ceil(0.5 * 3) = 2: the two correct ones, most confident first
[1, 0]
>>> make_swap_in("same_class_random").choose(
...     np.array([3, 7]), available={3: 5, 7: 0}, em_class_counts={3: 1, 4: 1, 7: 1}, rng=rng).tolist()
[3, -1]
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, ClassVar, TypeVar

import numpy as np

from .grouping import group_ranks

__all__ = [
    "ADMISSION_POLICIES",
    "SWAP_IN_POLICIES",
    "SWAP_OUT_POLICIES",
    "AdmissionPolicy",
    "CarmBalancedSwapOut",
    "CarmSwapOut",
    "ClassBalancedAdmission",
    "ClassBalancedSwapIn",
    "LossSwapOut",
    "RandomSwapIn",
    "RandomSwapOut",
    "ReservoirAdmission",
    "SameClassRandomSwapIn",
    "SwapInPolicy",
    "SwapOutPolicy",
    "make_admission",
    "make_swap_in",
    "make_swap_out",
    "swap_count",
]


# ---- shared arithmetic and validation ---------------------------------------------------------------
@functools.lru_cache(maxsize=64)  # one ratio a run, asked every step: Fraction() costs ~20 us
def _exact_ratio(ratio: float) -> Fraction:
    # The decimal the user wrote, not its binary float: 0.55 * 100 is 55.00000000000001 in floats,
    # and ceil() of that would swap 56 of 100 instead of 55. repr() is the shortest round-tripping
    # decimal, so Fraction(repr(0.55)) == 11/20 exactly.
    return Fraction(repr(float(ratio)))


def _check_ratio(ratio: float) -> float:
    r = float(ratio)
    if not 0.0 <= r <= 1.0:  # also rejects nan
        raise ValueError(f"swap ratio must be in [0, 1], got {ratio!r}")
    return r


def swap_count(n_candidates: int, ratio: float) -> int:
    """Number of victims for ``n_candidates`` swap candidates: ``ceil(ratio * n_candidates)``.

    ``ratio`` is read as the decimal it prints as, so ``swap_count(100, 0.55)`` is 55, not the 56
    that ``math.ceil(0.55 * 100)`` gives.
    Raises :class:`ValueError` if ``ratio`` is outside ``[0, 1]`` or ``n_candidates < 0``.

    >>> swap_count(100, 0.55), swap_count(7, 0.5), swap_count(3, 0.01), swap_count(0, 1.0)
    (55, 4, 1, 0)
    """
    if n_candidates < 0:
        raise ValueError(f"n_candidates must be >= 0, got {n_candidates}")
    r = _exact_ratio(_check_ratio(ratio))
    return -((-r.numerator * int(n_candidates)) // r.denominator)


def _readonly(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False  # a policy that tries to edit its input fails loudly
    return view


def _int_vector(name: str, values: Any, minimum: int | None = None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if minimum is not None and arr.size and arr.min() < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(arr.min())}")
    return _readonly(arr)


def _float_vector(name: str, values: Any, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like candidates, got {arr.shape}")
    if arr.size and arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}")
    return _readonly(arr.astype(np.float64, copy=False))


def _count_dict(name: str, counts: Mapping[int, int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for cls, count in counts.items():
        if int(count) < 0:
            raise ValueError(f"{name}[{cls}] must be >= 0, got {count}")
        out[int(cls)] = int(count)
    return out


# ---- admission ----------------------------------------------------------------------------------------
class AdmissionPolicy(ABC):
    """Decides which EM slot each incoming stream sample is written to.

    Subclasses set :attr:`name` and implement :meth:`_admit`; :meth:`admit` validates first.
    """

    name: ClassVar[str]

    def admit(
        self,
        labels: np.ndarray,
        slot_labels: np.ndarray,
        seen: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """The EM slot for each incoming sample, or -1 where it is not admitted.

        Args:
            labels: ``int64 (n,)``, class of each incoming sample, in stream order, all ``>= 0``.
            slot_labels: ``int64 (em_size,)``, class held by each EM slot, ``-1`` for an empty slot.
            seen: number of stream samples seen before this batch (the first sample of the batch
                is stream sample number ``seen``, counting from 0).
            rng: the only source of randomness.

        Returns:
            ``int64 (n,)``: slot indices in ``[0, em_size)`` or ``-1``. No slot appears twice: the
            result is as if the samples were admitted one by one in order, so a sample whose slot
            is taken again later in the same batch gets ``-1``.

        Raises:
            ValueError: arrays not 1-D integers, a label ``< 0``, a slot label ``< -1``, ``seen < 0``.
        """
        labels = _int_vector("labels", labels, minimum=0)
        slot_labels = _int_vector("slot_labels", slot_labels, minimum=-1)
        if int(seen) < 0:
            raise ValueError(f"seen must be >= 0, got {seen}")
        return np.asarray(self._admit(labels, slot_labels, int(seen), rng), dtype=np.int64)

    @abstractmethod
    def _admit(
        self, labels: np.ndarray, slot_labels: np.ndarray, seen: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Validated, read-only inputs; return the slots as :meth:`admit` documents."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _last_write_wins(slots: np.ndarray) -> np.ndarray:
    """Set every admitted entry whose slot is written again later in the batch to -1."""
    written = np.flatnonzero(slots >= 0)
    if written.size < 2:
        return slots
    # np.unique on the reversed order returns each slot's first hit there = its last write.
    _, last = np.unique(slots[written][::-1], return_index=True)
    keep = np.zeros(slots.shape, dtype=bool)
    keep[written[::-1][last]] = True
    return np.where(keep, slots, -1)


class ReservoirAdmission(AdmissionPolicy):
    """Vitter's algorithm R, the admission of ER and DER: a uniform sample of the whole stream.

    Empty slots fill first, lowest index first. After that, stream sample number ``t`` (0-based)
    draws ``j`` uniformly from ``[0, t]`` and replaces slot ``j`` if ``j < em_size``: it is kept
    with probability ``em_size / (t + 1)``, in a uniformly random slot.

    >>> import numpy as np
    >>> ReservoirAdmission().admit(np.array([5, 5, 6]), np.array([-1, 2, -1]), seen=1,
    ...                            rng=np.random.default_rng(0)).tolist()  # third: kept w.p. 3/4
    [0, 2, -1]
    """

    name = "reservoir"

    def _admit(self, labels, slot_labels, seen, rng):
        n, em_size = len(labels), len(slot_labels)
        out = np.full(n, -1, dtype=np.int64)
        if n == 0 or em_size == 0:
            return out
        empty = np.flatnonzero(slot_labels == -1)
        filled = min(len(empty), n)
        out[:filled] = empty[:filled]
        if filled < n:
            t = seen + np.arange(filled, n, dtype=np.int64)
            j = rng.integers(0, t + 1)
            out[filled:] = np.where(j < em_size, j, -1)
            out = _last_write_wins(out)
        return out


class ClassBalancedAdmission(AdmissionPolicy):
    """GDumb's greedy class-balanced sampler (Prabhu et al., ECCV 2020).

    A sample takes an empty slot if one exists (lowest index first); otherwise, if its class holds
    fewer slots than the largest class, it replaces a uniformly random slot of one of the largest
    classes (chosen uniformly among ties); otherwise it is not admitted. The view of the slots is
    updated sample by sample, so a batch ends as balanced as a one-by-one stream would.

    >>> import numpy as np
    >>> ClassBalancedAdmission().admit(np.array([2, 1, 1]), np.array([0, 0, 1, -1]), seen=3,
    ...                                rng=np.random.default_rng(0)).tolist()
    [3, 1, -1]

    (the empty slot; then a slot of class 0, the largest; then class 1 is itself the largest.)
    """

    name = "class_balanced"

    def _admit(self, labels, slot_labels, seen, rng):
        view = slot_labels.copy()
        writer = np.full(len(view), -1, dtype=np.int64)  # batch index that wrote each slot
        out = np.full(len(labels), -1, dtype=np.int64)
        classes, counts = np.unique(view[view >= 0], return_counts=True)
        count = dict(zip(classes.tolist(), counts.tolist()))
        empty = np.flatnonzero(view == -1).tolist()[::-1]  # pop() gives the lowest index
        for i, cls in enumerate(labels.tolist()):
            if empty:
                slot = empty.pop()
            else:
                largest = max(count.values(), default=0)
                if count.get(cls, 0) >= largest:
                    continue
                biggest = sorted(c for c, v in count.items() if v == largest)
                drop = biggest[int(rng.integers(len(biggest)))]
                slots = np.flatnonzero(view == drop)
                slot = int(slots[rng.integers(len(slots))])
                count[drop] -= 1
                if writer[slot] >= 0:
                    out[writer[slot]] = -1
            view[slot] = cls
            writer[slot] = i
            count[cls] = count.get(cls, 0) + 1
            out[i] = slot
        return out


class BalancoirAdmission(AdmissionPolicy):
    """Balanced reservoir sampling ("balancoir", Buzzega et al., "Rethinking Experience Replay: a
    Bag of Tricks for Continual Learning", ICPR 2020; Mammoth's ``balancoir`` buffer).

    Empty slots fill first, lowest index first. After that, stream sample number ``t`` (0-based)
    draws ``j`` uniformly from ``[0, t]``; it is admitted when ``j < em_size`` (reservoir's odds),
    and also whenever its class holds fewer slots than the median of the classes in the EM (an
    unseen class holds none): it then replaces a uniformly random slot of the largest class
    (the lowest label among ties), not slot ``j``. So the reservoir's rate is kept while
    minority classes are always let in at the expense of the majority.

    >>> import numpy as np
    >>> BalancoirAdmission().admit(np.array([2, 0]), np.array([0, 0, 0, 1]), seen=100,
    ...                            rng=np.random.default_rng(0)).tolist()   # class 2 is new: in
    [2, -1]
    """

    name = "balancoir"

    def _admit(self, labels, slot_labels, seen, rng):
        view = slot_labels.copy()
        out = np.full(len(labels), -1, dtype=np.int64)
        writer = np.full(len(view), -1, dtype=np.int64)  # batch index that wrote each slot
        empty = np.flatnonzero(view == -1).tolist()[::-1]  # pop() gives the lowest index
        for i, cls in enumerate(labels.tolist()):
            if empty:
                slot = empty.pop()
            else:
                classes, counts = np.unique(view, return_counts=True)
                mine = counts[classes == cls]
                minority = not mine.size or mine[0] < np.median(counts)
                if not minority and int(rng.integers(0, seen + i + 1)) >= len(view):
                    continue
                if len(view) == 0:
                    continue
                largest = classes[np.argmax(counts)]
                slots = np.flatnonzero(view == largest)
                slot = int(slots[rng.integers(len(slots))])
                if writer[slot] >= 0:
                    out[writer[slot]] = -1
            view[slot] = cls
            writer[slot] = i
            out[i] = slot
        return out


# ---- swap-out -----------------------------------------------------------------------------------------
class SwapOutPolicy(ABC):
    """Chooses the victims among the swap candidates (the EM samples of the batch just replayed).

    Subclasses set :attr:`name` and implement :meth:`_select`, which returns positions into the
    candidate arrays; :meth:`select` validates, computes ``k`` and maps positions to slots.
    """

    name: ClassVar[str]

    def select(
        self,
        candidates: np.ndarray,
        labels: np.ndarray,
        correct: np.ndarray,
        entropy: np.ndarray,
        loss: np.ndarray,
        ratio: float,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """The victim slots, in eviction order (most evictable first).

        Args:
            candidates: ``int64 (n,)``, EM slots that were just replayed, no repeats.
            labels: ``int64 (n,)``, class of each candidate.
            correct: ``int8 (n,)``, 1 if the model predicted the candidate correctly, 0 if wrongly,
                -1 if unknown.
            entropy: ``float32 (n,)``, entropy of the softmax prediction (nan if unknown).
            loss: ``float32 (n,)``, per-sample loss (nan if unknown).
            ratio: fraction of candidates to swap out, in ``[0, 1]``.
            rng: the only source of randomness.

        Returns:
            ``int64 (k,)`` with ``k = swap_count(n, ratio)``: distinct slots taken from ``candidates``.

        Raises:
            ValueError: shapes differ, candidates repeat, ``correct`` outside {-1, 0, 1},
                ``ratio`` outside ``[0, 1]``.
        """
        candidates = _int_vector("candidates", candidates)
        n = len(candidates)
        labels = _int_vector("labels", labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},) like candidates, got {labels.shape}")
        correct = _int_vector("correct", correct, minimum=-1)
        if correct.shape != (n,):
            raise ValueError(f"correct must have shape ({n},) like candidates, got {correct.shape}")
        if n and correct.max() > 1:
            raise ValueError(f"correct must be -1, 0 or 1, got {int(correct.max())}")
        entropy = _float_vector("entropy", entropy, n)
        loss = _float_vector("loss", loss, n)
        k = swap_count(n, ratio)
        if len(np.unique(candidates)) != n:
            raise ValueError("candidates must not repeat a slot")
        if k == 0:
            return np.empty(0, dtype=np.int64)
        positions = self._select(labels, correct, entropy, loss, _check_ratio(ratio), k, rng)
        return candidates[np.asarray(positions, dtype=np.int64)]

    @abstractmethod
    def _select(
        self,
        labels: np.ndarray,
        correct: np.ndarray,
        entropy: np.ndarray,
        loss: np.ndarray,
        ratio: float,
        k: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Validated, read-only inputs, ``1 <= k <= n``; return ``k`` distinct positions."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _carm_order(correct: np.ndarray, entropy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All positions, CarM's eviction order: easy samples leave first, hard ones stay.

    Correct predictions by ascending entropy (confidently right = learned, little to gain from
    replaying it), then wrong ones by descending entropy (a confident mistake is the most useful
    sample to keep, so it goes last), then unknown ones in random order. A nan entropy sorts last
    within its group; equal entropies keep candidate order.
    """
    right = np.flatnonzero(correct == 1)
    right = right[np.argsort(entropy[right], kind="stable")]
    wrong = np.flatnonzero(correct == 0)
    wrong = wrong[np.argsort(-entropy[wrong], kind="stable")]
    unknown = rng.permutation(np.flatnonzero(correct == -1))
    return np.concatenate([right, wrong, unknown])


class CarmSwapOut(SwapOutPolicy):
    """CarM's entropy rule: the first ``k`` of :func:`_carm_order`.

    >>> import numpy as np
    >>> CarmSwapOut().select(np.array([10, 11, 12]), np.zeros(3, np.int64),
    ...                      correct=np.array([0, 1, 1], np.int8),
    ...                      entropy=np.array([0.1, 0.8, 0.2], np.float32),
    ...                      loss=np.full(3, np.nan, np.float32), ratio=1.0,
    ...                      rng=np.random.default_rng(0)).tolist()
    [12, 11, 10]
    """

    name = "carm"

    def _select(self, labels, correct, entropy, loss, ratio, k, rng):
        return _carm_order(correct, entropy, rng)[:k]


class CarmBalancedSwapOut(SwapOutPolicy):
    """CarM's entropy rule with per-class quotas, so one class cannot lose all its replayed samples.

    A class with ``n_c`` candidates gives ``floor(n_c * ratio)`` victims; the ``k - sum(quotas)``
    left over go one each to distinct random classes that still have candidates left (there are
    always enough: each class whose ``n_c * ratio`` is fractional has one). Within a class the
    victims are its first ones in CarM order; the result is in CarM order overall.

    >>> import numpy as np
    >>> out = CarmBalancedSwapOut().select(
    ...     np.arange(8), np.array([0, 0, 0, 0, 0, 1, 1, 1]), correct=np.ones(8, np.int8),
    ...     entropy=np.arange(8, dtype=np.float32), loss=np.full(8, np.nan, np.float32),
    ...     ratio=0.5, rng=np.random.default_rng(0))
    >>> len(out), {0, 1, 5} <= set(out.tolist())   # quotas 2 and 1, plus 1 for a random class
    (4, True)
    """

    name = "carm_balanced"

    def _select(self, labels, correct, entropy, loss, ratio, k, rng):
        order = _carm_order(correct, entropy, rng)
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        classes, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
        r = _exact_ratio(ratio)
        # Python ints: numerator * n_c can overflow int64 for ratios with many decimals.
        quota = np.array([(r.numerator * int(s)) // r.denominator for s in sizes], dtype=np.int64)
        rest = k - int(quota.sum())
        if rest > 0:
            # ceil(sum x_c) <= sum ceil(x_c), so rest <= the number of classes left with candidates.
            open_classes = np.flatnonzero(sizes > quota)
            quota[rng.choice(open_classes, size=rest, replace=False)] += 1
        by_class = inverse[order]
        chosen = np.concatenate([order[by_class == c][: quota[c]] for c in range(len(classes))])
        return chosen[np.argsort(rank[chosen], kind="stable")]


class RandomSwapOut(SwapOutPolicy):
    """``k`` candidates uniformly at random: the baseline that ignores the model.

    >>> import numpy as np
    >>> RandomSwapOut().select(np.array([4, 5]), np.zeros(2, np.int64), np.ones(2, np.int8),
    ...                        np.zeros(2, np.float32), np.zeros(2, np.float32), ratio=1.0,
    ...                        rng=np.random.default_rng(0)).size
    2
    """

    name = "random"

    def _select(self, labels, correct, entropy, loss, ratio, k, rng):
        return rng.choice(len(labels), size=k, replace=False)


class LossSwapOut(SwapOutPolicy):
    """Lowest loss first (the sample the model has learned best); unknown loss last, in random order.

    >>> import numpy as np
    >>> LossSwapOut().select(np.array([1, 2, 3]), np.zeros(3, np.int64), np.full(3, -1, np.int8),
    ...                      np.zeros(3, np.float32), np.array([0.7, np.nan, 0.2], np.float32),
    ...                      ratio=0.6, rng=np.random.default_rng(0)).tolist()
    [3, 1]
    """

    name = "loss"

    def _select(self, labels, correct, entropy, loss, ratio, k, rng):
        known = np.flatnonzero(~np.isnan(loss))
        known = known[np.argsort(loss[known], kind="stable")]
        unknown = rng.permutation(np.flatnonzero(np.isnan(loss)))
        return np.concatenate([known, unknown])[:k]


# ---- swap-in ------------------------------------------------------------------------------------------
class SwapInPolicy(ABC):
    """Names the class each victim's slot is refilled from (the swap engine draws the sample).

    Subclasses set :attr:`name` and implement :meth:`_choose`; :meth:`choose` validates first and
    hands the subclass its own copies of the two dicts, so it can count them down as it assigns.
    """

    name: ClassVar[str]

    def choose(
        self,
        victim_labels: np.ndarray,
        available: Mapping[int, int],
        em_class_counts: Mapping[int, int],
        rng: np.random.Generator,
    ) -> np.ndarray:
        """The class to draw each victim's replacement from, or -1 where none can be drawn.

        Args:
            victim_labels: ``int64 (n,)``, class of each victim, in eviction order.
            available: class -> number of stored samples of that class not in the EM.
            em_class_counts: class -> number of EM slots holding that class, victims included.
            rng: the only source of randomness.

        Returns:
            ``int64 (n,)``: a class per victim or -1. Within one call no class is named more
            often than ``available`` allows; earlier victims are served first.

        Raises:
            ValueError: ``victim_labels`` not 1-D integers, a negative count, or fewer EM samples
                of a class than victims of it.
        """
        victims = _int_vector("victim_labels", victim_labels)
        available = _count_dict("available", available)
        em_class_counts = _count_dict("em_class_counts", em_class_counts)
        classes, n_victims = np.unique(victims, return_counts=True)
        for cls, nv in zip(classes.tolist(), n_victims.tolist()):
            if em_class_counts.get(cls, 0) < nv:
                raise ValueError(
                    f"em_class_counts[{cls}] is {em_class_counts.get(cls, 0)} but {nv} victims "
                    f"have class {cls}; the counts must include the victims"
                )
        return np.asarray(self._choose(victims, available, em_class_counts, rng), dtype=np.int64)

    @abstractmethod
    def _choose(
        self,
        victim_labels: np.ndarray,
        available: dict[int, int],
        em_class_counts: dict[int, int],
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Validated inputs (the dicts are private copies); return classes as :meth:`choose` says."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SameClassRandomSwapIn(SwapInPolicy):
    """CarM's rule: refill from the victim's own class, so the EM class histogram never changes.

    -1 once that class has no stored sample left outside the EM.

    >>> import numpy as np
    >>> SameClassRandomSwapIn().choose(np.array([2, 2, 5]), {2: 1, 5: 3}, {2: 4, 5: 4},
    ...                                np.random.default_rng(0)).tolist()
    [2, -1, 5]
    """

    name = "same_class_random"

    def _choose(self, victim_labels, available, em_class_counts, rng):
        # The first ``available[cls]`` victims of a class get one (their place among its victims).
        groups = group_ranks(victim_labels)
        room = np.array([available.get(c, 0) for c in groups.keys.tolist()], dtype=np.int64)
        return np.where(groups.rank < room[groups.index], victim_labels, -1).astype(np.int64)


class ClassBalancedSwapIn(SwapInPolicy):
    """Refill from the class with the fewest EM samples, moving the EM toward a balanced histogram.

    Victims are counted as gone before anything is assigned (they all leave in this swap); each
    assignment then adds one to its class. Only classes with stored samples left are eligible;
    ties are broken uniformly at random.

    >>> import numpy as np
    >>> ClassBalancedSwapIn().choose(np.array([0, 0]), {0: 9, 1: 9}, {0: 5, 1: 1},
    ...                              np.random.default_rng(0)).tolist()
    [1, 1]
    """

    name = "class_balanced"

    def _choose(self, victim_labels, available, em_class_counts, rng):
        out = np.full(len(victim_labels), -1, dtype=np.int64)
        for cls in victim_labels.tolist():
            em_class_counts[cls] -= 1
        classes = np.array(sorted(set(available) | set(em_class_counts)), dtype=np.int64)
        counts = np.array([em_class_counts.get(c, 0) for c in classes.tolist()], dtype=np.int64)
        left = np.array([available.get(c, 0) for c in classes.tolist()], dtype=np.int64)
        for i in range(len(victim_labels)):
            eligible = left > 0
            if not eligible.any():
                break
            fewest = counts[eligible].min()
            ties = np.flatnonzero(eligible & (counts == fewest))
            j = ties[rng.integers(len(ties))]
            out[i] = classes[j]
            counts[j] += 1
            left[j] -= 1
        return out


class RandomSwapIn(SwapInPolicy):
    """A uniformly random stored sample of any class: class ``c`` with probability ``available[c] / total``.

    Draws without replacement over the stored samples, so ``available`` is never exceeded; victims
    beyond the total get -1.

    >>> import numpy as np
    >>> RandomSwapIn().choose(np.array([0, 0, 0]), {0: 0, 3: 2}, {0: 3},
    ...                       np.random.default_rng(0)).tolist()
    [3, 3, -1]
    """

    name = "random"

    def _choose(self, victim_labels, available, em_class_counts, rng):
        out = np.full(len(victim_labels), -1, dtype=np.int64)
        classes = np.array(sorted(c for c, v in available.items() if v > 0), dtype=np.int64)
        ends = np.cumsum([available[c] for c in classes.tolist()], dtype=np.int64)
        total = int(ends[-1]) if len(ends) else 0
        m = min(len(victim_labels), total)
        if m:
            picks = rng.choice(total, size=m, replace=False)
            out[:m] = classes[np.searchsorted(ends, picks, side="right")]
        return out


# ---- registries and factories -------------------------------------------------------------------------
# Plain dicts: a third-party policy is added with ``SWAP_OUT_POLICIES["mine"] = MySwapOut``.
ADMISSION_POLICIES: dict[str, type[AdmissionPolicy]] = {
    cls.name: cls for cls in (ReservoirAdmission, ClassBalancedAdmission, BalancoirAdmission)
}
SWAP_OUT_POLICIES: dict[str, type[SwapOutPolicy]] = {
    cls.name: cls for cls in (CarmSwapOut, CarmBalancedSwapOut, RandomSwapOut, LossSwapOut)
}
SWAP_IN_POLICIES: dict[str, type[SwapInPolicy]] = {
    cls.name: cls for cls in (SameClassRandomSwapIn, ClassBalancedSwapIn, RandomSwapIn)
}

_P = TypeVar("_P")


def _make(kind: str, registry: Mapping[str, type[_P]], name: str, options: dict[str, Any]) -> _P:
    try:
        cls = registry[name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} policy {name!r}; known: {', '.join(sorted(registry))}"
        ) from None
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        # A TOML typo should read as a config error, not as a Python signature mismatch.
        raise ValueError(f"{kind} policy {name!r} does not accept options {sorted(options)}: {err}") from None
    return cls(**options)


def make_admission(name: str, **options: Any) -> AdmissionPolicy:
    """The admission policy registered as ``name`` in :data:`ADMISSION_POLICIES`.

    Raises :class:`ValueError` naming the unknown name (and the known ones) or the unknown option.

    >>> make_admission("reservoir")
    ReservoirAdmission()
    """
    return _make("admission", ADMISSION_POLICIES, name, options)


def make_swap_out(name: str, **options: Any) -> SwapOutPolicy:
    """The swap-out policy registered as ``name`` in :data:`SWAP_OUT_POLICIES`.

    >>> make_swap_out("carm")
    CarmSwapOut()
    """
    return _make("swap-out", SWAP_OUT_POLICIES, name, options)


def make_swap_in(name: str, **options: Any) -> SwapInPolicy:
    """The swap-in policy registered as ``name`` in :data:`SWAP_IN_POLICIES`.

    >>> make_swap_in("nope")
    Traceback (most recent call last):
    ...
    ValueError: unknown swap-in policy 'nope'; known: class_balanced, random, same_class_random
    """
    return _make("swap-in", SWAP_IN_POLICIES, name, options)
