"""Mammoth's sample-selection strategies on a carousel memory (``CarouselBuffer.sample_selection_fn``).

Mammoth's loss-aware models (ER-tricks, ER-ACE-tricks, ER-ACE-AER-ABS) call ``buffer.sample_selection_fn
.update(indexes, scores)`` after each step and pass ``sample_selection_scores`` to ``add_data``;
the strategy then picks which position a new sample replaces:

- ``lars`` (loss-aware reservoir, Buzzega et al. 2020): once full, sample number ``t`` is admitted
  with the reservoir's odds; the position it replaces is drawn with probability proportional to its
  score, min-max normalised (the models pass minus the loss: high-loss samples stay);
- ``labrs``: the same, each position's score mixed half and half with the size of its class in the
  buffer (so large classes give way first);
- ``abs`` (asymmetric balanced sampling, Millunzi et al.): positions of past classes (below the
  dataset's first class of the current task) and of current ones are chosen between in proportion
  to how many each holds; within past classes a lower score is replaced first, within current
  ones a higher.

Here the scores are an EM column (``selection_score``), one per slot: ``update`` writes it in place,
``add_data`` stores the new samples' scores with them, and since the buffer turns on the memory's
``keep_em_writes`` a score leaves the EM with its sample and comes back with it when a swap returns
it -- so the strategies hold with tiers too. :class:`ScoreAwareAdmission` is the admission policy
that reads the column. Unlike Mammoth's, a batch never picks the same position twice (Mammoth's
per-sample loop may overwrite a sample it has just admitted), and a buffer with every score equal
picks uniformly.

Reservoir and balancoir decide from labels alone: :class:`LabelOnlySelection` takes ``update``
calls and keeps nothing, as Mammoth's do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from ..policies import AdmissionPolicy

__all__ = ["SCORE_FIELD", "SCORE_STRATEGIES", "LabelOnlySelection", "ScoreAwareAdmission", "ScoreSelection"]

SCORE_STRATEGIES = ("lars", "labrs", "abs")
SCORE_FIELD = "selection_score"  # the EM column (float32, one per slot)


def _minmax(s: np.ndarray) -> np.ndarray:
    span = s.max() - s.min() if s.size else 0.0
    return (s - s.min()) / span if span > 0 else np.zeros_like(s)


def _pick(weights: np.ndarray, candidates: np.ndarray, rng: np.random.Generator) -> int:
    """One of ``candidates`` with probability proportional to ``weights`` (uniform if they are all 0)."""
    total = weights.sum()
    if not candidates.size:
        return -1
    if total <= 0 or not np.isfinite(total):
        return int(candidates[rng.integers(candidates.size)])
    return int(rng.choice(candidates, p=weights / total))


class ScoreAwareAdmission(AdmissionPolicy):
    """Mammoth's ``lars`` / ``labrs`` / ``abs`` admission over the EM's per-slot scores.

    ``scores()`` returns the current per-slot scores (the EM column); ``past_classes()`` (``abs``
    only) the number of classes before the current task. Empty slots fill first, lowest first.

    >>> import numpy as np
    >>> scores = np.array([0.0, 0.0, 1.0, 0.0], np.float32)       # slot 2: the lowest loss
    >>> policy = ScoreAwareAdmission("lars", lambda: scores)
    >>> policy.admit(np.array([1]), np.array([0, 0, 1, 1]), seen=4, rng=np.random.default_rng(0)).tolist()
    [2]
    """

    name: ClassVar[str] = "mammoth_score_aware"

    def __init__(self, strategy: str, scores: Callable[[], np.ndarray],
                 past_classes: Callable[[], int] | None = None) -> None:
        if strategy not in SCORE_STRATEGIES:
            raise ValueError(f"strategy must be one of {SCORE_STRATEGIES}, got {strategy!r}")
        if strategy == "abs" and past_classes is None:
            raise ValueError("abs needs past_classes (the dataset's first class of the current task)")
        self.strategy, self._scores, self._past = strategy, scores, past_classes

    def _admit(self, labels, slot_labels, seen, rng):
        view = slot_labels.copy()
        scores = np.asarray(self._scores(), dtype=np.float64).copy()
        taken = np.zeros(view.size, dtype=bool)  # written by this batch: not picked again in it
        out = np.full(len(labels), -1, dtype=np.int64)
        empty = np.flatnonzero(view == -1).tolist()[::-1]
        for i, cls in enumerate(labels.tolist()):
            if empty:
                slot = empty.pop()
            elif view.size == 0 or int(rng.integers(0, seen + i)) >= view.size:
                continue  # the reservoir's odds: em_size / (number seen)
            else:
                slot = self._victim(view, scores, taken, rng)
                if slot < 0:
                    continue
            view[slot], taken[slot], scores[slot] = cls, True, 0.0
            out[i] = slot
        return out

    def _victim(self, view: np.ndarray, scores: np.ndarray, taken: np.ndarray, rng: np.random.Generator) -> int:
        free = np.flatnonzero(~taken)
        if self.strategy == "lars":
            return _pick(_minmax(scores)[free], free, rng)
        if self.strategy == "labrs":
            _, inverse, counts = np.unique(view, return_inverse=True, return_counts=True)
            balance = counts[inverse].astype(np.float64)
            scale = np.abs(scores).mean() * np.abs(balance).mean()
            mixed = 0.5 * (scores / scale if scale > 0 else scores) + 0.5 * balance
            return _pick(_minmax(mixed)[free], free, rng)
        past = view < int(self._past())
        if rng.random() < past.mean():  # a past sample goes, as often as the past holds positions
            group = free[past[free]]
            return _pick(1.0 - _minmax(scores[group]), group, rng)
        group = free[~past[free]]
        return _pick(_minmax(scores[group]), group, rng)


class ScoreSelection:
    """``sample_selection_fn`` of a buffer with a loss-aware strategy: ``update(indexes, values)``
    writes per-position scores into the EM column ``column()`` returns."""

    def __init__(self, name: str, column: Callable[[], torch.Tensor]) -> None:
        self.name, self._column = name, column

    def update(self, indexes: Any, values: Any) -> None:
        """Set the scores of buffer positions ``indexes`` (from ``get_data(return_index=True)``)."""
        column = self._column()
        idx = torch.as_tensor(indexes).long().cpu()
        column[idx] = torch.as_tensor(values).detach().float().cpu().reshape(-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class LabelOnlySelection:
    """The strategy object of a buffer whose admission reads labels only (reservoir, balancoir).

    >>> LabelOnlySelection("reservoir").update([0, 1], [0.5, 0.2])   # accepted, like Mammoth's
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def update(self, indexes: Any, values: Any) -> None:
        """Per-position scores from the model: not used by a label-only strategy."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
