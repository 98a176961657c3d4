"""DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for General Continual Learning").

The logits a sample had when it entered are stored with it (a memory extra, ``logits``). Each
step adds to the stream cross-entropy ``alpha * MSE(model(x'), stored logits)`` on one replay draw
and ``beta * CE(model(x''), y'')`` on a second, independent draw. Defaults are Mammoth's best for
buffer 200: Seq-CIFAR-10 lr 0.03, alpha 0.1, beta 0.5; Seq-MNIST lr 0.03, alpha 0.2, beta 1.0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import register
from .base import Context, Method

_MNIST_LIKE = ("split-mnist", "split-fashion-mnist")


@register
class DERpp(Method):
    name = "derpp"
    default_lr = {"*": 0.03}

    def __init__(self, ctx: Context, alpha: float | None = None, beta: float | None = None, **hparams: Any) -> None:
        super().__init__(ctx, **hparams)
        mnist = ctx.stream.name in _MNIST_LIKE
        self.alpha = alpha if alpha is not None else (0.2 if mnist else 0.1)
        self.beta = beta if beta is not None else (1.0 if mnist else 0.5)

    @classmethod
    def extras(cls, num_classes: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"logits": ((num_classes,), "float32")}

    def train_step(self, x: torch.Tensor, y: torch.Tensor, task: int) -> float:
        logits = self.model(self.prep(x))
        loss = F.cross_entropy(self.masked(logits), y.to(self.device))
        first, second = self.replay(), self.replay()
        out1 = out2 = None
        if first is not None:  # dark knowledge: match the logits the sample had when stored
            out1 = self.model(self.prep(first.x))
            loss = loss + self.alpha * F.mse_loss(out1, first.extras["logits"].to(self.device, non_blocking=True))
        if second is not None:
            out2 = self.model(self.prep(second.x))
            loss = loss + self.beta * F.cross_entropy(self.masked(out2), second.y.to(self.device, non_blocking=True))
        value = self.step(loss, (first, out1), (second, out2))
        self.add(x, y, task, logits=logits)
        return value
