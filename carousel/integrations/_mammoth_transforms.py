"""How :class:`~carousel.integrations.mammoth.CarouselBuffer` applies a Mammoth transform to a batch.

Mammoth hands its buffer two kinds of augmentation: a Kornia ``AugmentationSequential`` (its
``KorniaAugNoGrad``), an ``nn.Module`` that takes the whole batch ``(n, C, H, W)`` and draws its
random parameters per sample; and a torchvision pipeline, which takes one image ``(C, H, W)`` at a
time. Mammoth's ``apply_transform`` calls the first once on the batch and the second once per
sample, stacking the results. Stacking a batched module's per-sample results instead gives
``(n, 1, C, H, W)``, so the kind matters.

Without importing either library: a transform is batched when it is a ``torch.nn.Module`` that
does not come from torchvision (torchvision's tensor transforms are modules too, but they draw
one set of random parameters per call, so Mammoth applies them -- as a ``Compose``, which is not
a module -- per sample). Every other callable is applied per sample.

>>> import torch
>>> class Flip(torch.nn.Module):              # batched, as a Kornia augmentation is
...     def forward(self, x):
...         return x.flip(-1)
>>> apply_transform(torch.zeros(4, 3, 8, 8), Flip()).shape
torch.Size([4, 3, 8, 8])
>>> apply_transform(torch.zeros(4, 3, 8, 8), lambda e: e[None]).shape   # per sample, then stacked
torch.Size([4, 1, 3, 8, 8])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["apply_transform", "is_batched"]

Transform = Callable[[torch.Tensor], torch.Tensor]


def is_batched(transform: Any) -> bool:
    """Whether ``transform`` takes a whole batch (an ``nn.Module`` not from torchvision)."""
    if not isinstance(transform, torch.nn.Module):
        return False
    return not any(cls.__module__.split(".")[0] == "torchvision" for cls in type(transform).__mro__)


def apply_transform(x: torch.Tensor, transform: Transform | None) -> torch.Tensor:
    """``transform`` applied to the batch ``x`` as Mammoth applies it: once on the whole batch
    when it is batched (:func:`is_batched`), else per sample on the CPU, stacked and moved back
    to ``x``'s device. ``None`` returns ``x`` itself. An empty batch is returned unchanged."""
    if transform is None or not len(x):
        return x
    if is_batched(transform):
        with torch.no_grad():  # an augmentation, never part of the graph (Mammoth's KorniaAugNoGrad)
            return transform(x)
    return torch.stack([transform(e) for e in x.cpu()]).to(x.device)
