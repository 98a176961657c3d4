"""What ``sample()`` returns: one replay batch as stacked tensors.

>>> import torch
>>> b = Batch(torch.arange(2), torch.zeros(2, 3, dtype=torch.uint8), torch.tensor([4, 5]), torch.zeros(2, dtype=torch.int16))
>>> len(b), b.to("cpu", non_blocking=True).y.tolist()
(2, [4, 5])
>>> pinned = b.pin_memory()      # page-locked copies where an accelerator can use them, else b itself
>>> pinned.x.is_pinned() == can_pin()
True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@functools.lru_cache(maxsize=1)
def can_pin() -> bool:
    """Whether torch can page-lock host memory here: a CUDA device is present. (Without one,
    ``torch.Tensor.pin_memory()`` raises; ``sample(..., pin_memory=True)`` then returns the
    ordinary batch.) Asked once per process: the answer does not change while it runs."""
    return torch.cuda.is_available()


@dataclass(slots=True)
class Batch:
    """A replay batch. Every tensor has the batch size as its first dimension.

    A plain record, not a frozen one: a frozen dataclass's ``__init__`` costs 0.62 us against
    0.17 us, 2 % of ``sample()`` at EM 500. Nothing in carousel keeps a batch after handing it out.

    ``ids`` (int64) name the samples for :meth:`CarouselMemory.observe`; ``x`` has the memory's
    sample shape and dtype, ``y`` is int64, ``task`` int16; ``extras`` holds the memory's extra
    fields (stored logits, a coreset weight, ...) by name.
    """

    ids: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch on ``device``. With ``non_blocking=True`` from pinned memory
        (``sample(n, pin_memory=True)``) the host-to-device copies overlap the accelerator's work."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.ids), move(self.x), move(self.y), move(self.task),
                     {k: move(v) for k, v in self.extras.items()})

    def pin_memory(self) -> Batch:
        """The same batch in pinned memory (``DataLoader(pin_memory=True)`` calls this): page-locked
        copies, or this batch itself where nothing can be pinned (no CUDA device: :func:`can_pin`)."""
        if not can_pin():
            return self
        pin = lambda t: t if t.is_pinned() else t.pin_memory()  # noqa: E731
        return Batch(pin(self.ids), pin(self.x), pin(self.y), pin(self.task),
                     {k: pin(v) for k, v in self.extras.items()})
