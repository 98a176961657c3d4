"""Experience Replay (ER; Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning").

Each step: 32 stream samples and 32 replayed samples go through the model together under one
cross-entropy; then the stream samples are offered to the memory (reservoir admission). With a
carousel memory the EM's contents rotate through storage, which is the CarM effect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from .base import Method


@register
class ER(Method):
    name = "er"
    default_lr = {"*": 0.1}  # Mammoth's ER on Seq-CIFAR-10 / Seq-MNIST, buffer 200

    def train_step(self, x: torch.Tensor, y: torch.Tensor, task: int) -> float:
        batch = self.replay()
        inputs, targets = self.prep(x), y.to(self.device)
        if batch is not None:
            inputs = torch.cat([inputs, self.prep(batch.x)])
            targets = torch.cat([targets, batch.y.to(self.device, non_blocking=True)])
        logits = self.model(inputs)
        loss = F.cross_entropy(self.masked(logits), targets)
        value = self.step(loss, (batch, logits[x.shape[0]:]))
        self.add(x, y, task)
        return value
