"""``CarouselBuffer.sample_selection_fn``: what Mammoth's models call on their buffer's strategy.

Mammoth's loss-aware models (ER-tricks, ER-ACE-tricks) call ``buffer.sample_selection_fn.update(
indexes, scores)`` after each step, whatever strategy the buffer uses; Mammoth's reservoir and
balancoir ignore it (their base class's ``update`` does nothing). carousel's admission decides from
labels, so this object, too, takes the call and keeps nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LabelOnlySelection"]


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
