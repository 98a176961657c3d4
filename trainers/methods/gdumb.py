"""GDumb (Prabhu et al., ECCV 2020, "GDumb: A Simple Approach that Questions Our Progress in
Continual Learning").

The learner does nothing while the stream passes but offer every sample to the memory, whose
greedy class-balanced admission (``admission = "class_balanced"``) keeps the EM balanced. At the
end of every task the model is re-initialized (every module's ``reset_parameters``: weights and
batch-norm statistics) and trained from scratch on the memory's contents alone: each epoch draws
the whole EM (``sample(em_size)``) and goes through it in shuffled mini-batches of
``ctx.batch_size``, observing every mini-batch's logits so a carousel memory swaps samples in from
storage while GDumb trains (the EM the next epoch draws is partly new). Evaluation masks the head
to the classes seen, as GDumb does.

Optimizer as in the paper: SGD, momentum 0.9, weight decay 1e-6, gradient norm clipped at 10, and
the learning rate (method lr, default 0.05) cosine-annealed per step down to 5e-4 over the whole
retraining. Deviations, for CPU budgets: the ``epochs`` hparam (retraining epochs, not the
runner's ``--epochs`` over the stream; ``--hparam epochs=N``) defaults to 10 where the paper trains
256 epochs with warm restarts (SGDR), and there is no CutMix.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from carousel.batch import Batch

from ..streams import Task
from . import register
from .base import Context, Method

_MIN_LR = 5e-4
_CLIP = 10.0


def reset_parameters(model: torch.nn.Module) -> int:
    """Re-initialize every module of ``model`` that knows how; returns how many did."""
    n = 0
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
            n += 1
    return n


def _rows(batch: Batch, idx: torch.Tensor) -> Batch:
    return Batch(batch.ids[idx], batch.x[idx], batch.y[idx], batch.task[idx],
                 {k: v[idx] for k, v in batch.extras.items()})


@register
class GDumb(Method):
    name = "gdumb"
    admission = "class_balanced"
    default_lr = {"*": 0.05}

    def __init__(self, ctx: Context, em_size: int | None = None, epochs: int = 10, **hparams: Any) -> None:
        if em_size is None:
            raise ValueError("gdumb retrains on the whole EM and needs its size: pass em_size=K "
                             "(the runner passes it)")
        if int(em_size) <= 0 or int(epochs) < 0:
            raise ValueError(f"gdumb: em_size must be positive and epochs >= 0, got {em_size}, {epochs}")
        super().__init__(ctx, **hparams)
        self.em_size = int(em_size)
        self.epochs = int(epochs)
        self.generator = torch.Generator().manual_seed(ctx.seed)  # minibatch shuffling

    def train_step(self, x: torch.Tensor, y: torch.Tensor, task: int) -> float:
        self.add(x, y, task)  # GDumb learns nothing online: the memory is the whole learner
        return 0.0

    def end_task(self, task: Task) -> None:
        self.retrain()

    def retrain(self) -> None:
        """Re-initialize the model and train it from scratch on the memory's contents."""
        reset_parameters(self.model)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-6)
        bs = max(1, self.ctx.batch_size)
        steps_per_epoch = math.ceil(self.em_size / bs)
        total, step = max(1, self.epochs * steps_per_epoch), 0
        floor = min(_MIN_LR, self.lr)
        for _ in range(self.epochs):
            # Seeded: a fresh draw of the EM as it is now (the samples swapped in during the last
            # epoch included); through the daemon an unseeded sample() may come from a ring batch
            # drawn before the task's last adds.
            batch = self.replay(self.em_size, seed=int(torch.randint(2 ** 31, (), generator=self.generator)))
            if batch is None:
                return
            order = torch.randperm(len(batch), generator=self.generator)
            for start in range(0, len(batch), bs):
                mb = _rows(batch, order[start:start + bs])
                lr = floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
                for group in self.opt.param_groups:
                    group["lr"] = lr
                logits = self.model(self.prep(mb.x))
                loss = F.cross_entropy(self.masked(logits), mb.y.to(self.device, non_blocking=True))
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), _CLIP)
                self.opt.step()
                self.observe(mb, logits)
                self.memory.end_step()
                step += 1

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.masked(super().predict(x))
