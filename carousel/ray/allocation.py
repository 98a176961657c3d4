"""How many samples of one ``sample(n)`` each shard serves: pure functions of shard compositions.

A shard's :class:`Composition` is what its EM holds, counted by (class, task). Every reply of a
shard carries a fresh one, so the client plans the next draw without an extra round trip.

- A plain draw is uniform over the union of the available shards' EMs: the per-shard counts of a
  uniform draw of ``n`` distinct samples follow the multivariate hypergeometric distribution over
  the shards' eligible counts (those matching ``classes`` / ``tasks``), which is what is drawn.
- A ``balanced`` draw gives every class the same expected share; a shard's share is the sum over
  classes of its fraction of that class (exact when every class lives on one shard, as with
  ``routing = "class"``, and when classes spread evenly, as with ``routing = "key"``).
- ``local_share`` (optional): that fraction of the batch comes from the local shards first (the
  ones on the caller's node or named by the caller), the rest from remote shards in proportion to
  their size; whatever one side cannot serve, the other does.

Unavailable shards (restarting) get nothing; the batch is drawn from the others.

>>> import numpy as np
>>> comps = [Composition.of(np.array([0, 0, 1]), np.array([0, 0, 0])), Composition.of(np.array([2]), np.array([1]))]
>>> plan = allocate(4, comps, rng=np.random.default_rng(0))
>>> plan.tolist(), int(plan.sum())
([3, 1], 4)
>>> allocate(4, comps, available=np.array([True, False]), rng=np.random.default_rng(0)).tolist()
[3, 0]
>>> allocate(2, comps, classes=[2], rng=np.random.default_rng(0)).tolist()
[0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Composition", "allocate"]


@dataclass(frozen=True, eq=False)
class Composition:
    """What one shard's EM holds: ``counts[i]`` samples of class ``labels[i]`` and task ``tasks[i]``
    (int64 arrays, one entry per distinct pair)."""

    labels: np.ndarray
    tasks: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, labels: np.ndarray, tasks: np.ndarray) -> Composition:
        """Count the (class, task) pairs of the filled EM slots' ``labels`` and ``tasks``."""
        labels = np.asarray(labels, dtype=np.int64)
        tasks = np.asarray(tasks, dtype=np.int64)
        if not labels.size:
            return cls.empty()
        # One int64 key per pair (a task fits 16 bits: add() keeps it in int16): a 1-D unique is
        # ~15x faster than np.unique(axis=1) here (11 us vs 167 us for an EM of 500).
        keys, counts = np.unique((labels << 16) | tasks, return_counts=True)
        return cls(keys >> 16, keys & 0xFFFF, counts.astype(np.int64))

    @classmethod
    def empty(cls) -> Composition:
        z = np.zeros(0, np.int64)
        return cls(z, z, z)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """A form that crosses process boundaries as plain arrays."""
        return {"labels": self.labels, "tasks": self.tasks, "counts": self.counts}

    @classmethod
    def from_arrays(cls, d: dict[str, np.ndarray]) -> Composition:
        return cls(np.asarray(d["labels"], np.int64), np.asarray(d["tasks"], np.int64),
                   np.asarray(d["counts"], np.int64))

    def matching(self, classes: Any = None, tasks: Any = None) -> np.ndarray:
        """Which entries a draw restricted to ``classes`` / ``tasks`` may take (bool mask)."""
        ok = np.ones(self.labels.size, dtype=bool)
        if classes is not None:
            ok &= np.isin(self.labels, np.asarray(classes, dtype=np.int64).ravel())
        if tasks is not None:
            ok &= np.isin(self.tasks, np.asarray(tasks, dtype=np.int64).ravel())
        return ok


def allocate(n: int, comps: Sequence[Composition | None], *, available: np.ndarray | None = None,
             classes: Any = None, tasks: Any = None, balanced: bool = False, local: np.ndarray | None = None,
             local_share: float | None = None, rng: np.random.Generator) -> np.ndarray:
    """Samples to draw from each shard (int64, one per shard; sums to ``min(n, eligible)``).

    ``comps``: each shard's composition (None: unknown, treated as empty); ``available``: shards
    that may be asked (default all); ``local``: the local shards (for ``local_share``).
    """
    k = len(comps)
    avail = np.ones(k, bool) if available is None else np.asarray(available, bool)
    per_class, eligible = _eligible(comps, avail, classes, tasks)
    if local_share is None or local is None or not np.asarray(local, bool)[avail].any():
        return _spread(n, eligible, per_class, balanced, rng)
    loc = np.asarray(local, bool) & avail
    e_loc, e_rem = np.where(loc, eligible, 0), np.where(loc, 0, eligible)
    plan = _spread(min(int(round(local_share * n)), int(e_loc.sum())), e_loc, per_class * loc[:, None], balanced, rng)
    plan += _spread(n - int(plan.sum()), e_rem, per_class * ~loc[:, None], balanced, rng)
    short = n - int(plan.sum())
    if short > 0:  # the remote shards could not serve their part: the local ones top it up
        room = np.where(loc, e_loc - plan, 0)
        plan += _spread(short, room, np.minimum(per_class * loc[:, None], room[:, None]), balanced, rng)
    return plan


def _eligible(comps: Sequence[Composition | None], avail: np.ndarray, classes: Any, tasks: Any
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per shard and class, the EM samples a draw may take: ``(shards x classes)`` and its row sums."""
    parts = []
    for c in comps:
        m = c.matching(classes, tasks) if c is not None else None
        parts.append((c.labels[m], c.counts[m]) if c is not None else (np.zeros(0, np.int64),) * 2)
    labels = np.unique(np.concatenate([lab for lab, _ in parts])) if parts else np.zeros(0, np.int64)
    per_class = np.zeros((len(comps), labels.size), np.int64)
    for i, (lab, cnt) in enumerate(parts):
        if avail[i] and lab.size:
            np.add.at(per_class[i], np.searchsorted(labels, lab), cnt)
    return per_class, per_class.sum(axis=1)


def _spread(n: int, eligible: np.ndarray, per_class: np.ndarray, balanced: bool, rng: np.random.Generator
            ) -> np.ndarray:
    """Split ``n`` over shards holding ``eligible`` samples: uniform over their union, or class-balanced."""
    eligible = np.asarray(eligible, np.int64)
    m = min(int(n), int(eligible.sum()))
    if m <= 0:
        return np.zeros(eligible.size, np.int64)
    if not balanced:
        return rng.multivariate_hypergeometric(eligible, m).astype(np.int64)
    totals = per_class.sum(axis=0)
    present = totals > 0
    p = (per_class[:, present] / totals[present]).sum(axis=1) / max(int(present.sum()), 1)
    plan = rng.multinomial(m, p / p.sum()).astype(np.int64)
    for _ in range(eligible.size):  # a shard asked for more than it holds hands the rest on
        over = np.maximum(plan - eligible, 0)
        if not over.any():
            break
        plan -= over
        room = eligible - plan
        q = np.where(room > 0, p + 1e-12, 0.0)
        plan += np.minimum(rng.multinomial(int(over.sum()), q / q.sum()), room)
    missing = m - int(plan.sum())
    for i in np.argsort(plan - eligible):  # rare: whatever is still missing, from any shard with room
        if missing <= 0:
            break
        take = min(missing, int(eligible[i] - plan[i]))
        plan[i] += take
        missing -= take
    return plan
