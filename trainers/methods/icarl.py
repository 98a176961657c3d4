"""iCaRL (Rebuffi et al., CVPR 2017, "iCaRL: Incremental Classifier and Representation Learning").

Mammoth-style. Training: sigmoid binary cross-entropy over the classes seen so far, on the stream
mini-batch plus a replay draw of exemplars; the targets are one-hot for the current task's classes
and, for the classes of earlier tasks, the sigmoid outputs of a frozen copy of the model taken at
the end of the previous task (distillation). The head is sliced to the seen classes, as Mammoth
does, so unseen classes get no gradient.

At the end of a task, :func:`herding` picks ``m = em_size // seen_classes`` exemplars per new
class from the task's training data (features of the unaugmented samples) and they are added to
the memory in herding order. The memory's class-balanced admission makes room by evicting random
exemplars of the largest old classes -- iCaRL drops the *tail* of each old class's herding list
instead, which needs a targeted removal the memory API does not offer. Then the class means of the
exemplars in the memory are computed (L2-normalized features, averaged with the horizontally
flipped copies when the stream augments, as iCaRL does) and :meth:`ICaRL.predict` is the
nearest-mean-of-exemplars classifier: logits are ``-distance`` to each class mean, ``-inf`` for a
class without exemplars. The means are recomputed lazily after any further training step.

Defaults are Mammoth's best for Seq-CIFAR-10, buffer 200: lr 0.1, ``wd_reg`` 1e-5 (an L2 penalty
on every parameter added to the loss).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..streams import Task
from . import register
from .base import Context, Method

_CHUNK = 256  # samples per forward pass when extracting features


def herding(features: torch.Tensor, m: int) -> torch.LongTensor:
    """iCaRL's herding: indices of ``min(m, N)`` samples whose running mean tracks the class mean.

    ``features``: ``(N, D)``; each row is L2-normalized first. Step ``i`` picks, among the samples
    not picked yet, the one that brings the mean of the ``i + 1`` chosen samples nearest to the
    mean of all normalized features. The result is in picking order (the first is the sample
    nearest the class mean), without repeats.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    feats = F.normalize(features.detach().float(), dim=1)
    n = feats.shape[0]
    m = max(0, min(int(m), n))
    target = feats.mean(0)
    running = torch.zeros_like(target)
    taken = torch.zeros(n, dtype=torch.bool, device=feats.device)
    chosen = torch.empty(m, dtype=torch.long)
    for i in range(m):
        cost = ((target - (running + feats) / (i + 1)) ** 2).sum(1)
        cost[taken] = float("inf")
        j = int(cost.argmin())
        chosen[i] = j
        taken[j] = True
        running += feats[j]
    return chosen


@register
class ICaRL(Method):
    name = "icarl"
    admission = "class_balanced"
    default_lr = {"*": 0.1}

    def __init__(self, ctx: Context, em_size: int | None = None, wd_reg: float = 1e-5, **hparams: Any) -> None:
        if em_size is None:
            raise ValueError("icarl needs the memory's EM size to size its exemplar sets: pass em_size=K "
                             "(the runner passes it)")
        if int(em_size) <= 0:
            raise ValueError(f"icarl: em_size must be positive, got {em_size}")
        super().__init__(ctx, **hparams)
        self.em_size = int(em_size)
        self.wd_reg = float(wd_reg)
        self.old_model: torch.nn.Module | None = None
        self.old_classes = 0                       # classes the frozen copy knows
        self.class_means: torch.Tensor | None = None   # (num_classes, D); stale once training moves
        self.has_mean: torch.Tensor | None = None      # (num_classes,) bool

    # ---- training ----------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, task: int) -> float:
        self.class_means = None  # the features move: exemplar means must be recomputed
        batch = self.replay()
        inputs, labels = self.prep(x), y.to(self.device)
        if batch is not None:
            inputs = torch.cat([inputs, self.prep(batch.x)])
            labels = torch.cat([labels, batch.y.to(self.device, non_blocking=True)])
        out = self.model(inputs)
        seen = self.seen_classes
        targets = F.one_hot(labels, out.shape[1]).float()[:, :seen]
        if self.old_model is not None and self.old_classes > 0:
            with torch.no_grad():  # distillation: old classes learn what the old model said
                targets[:, :self.old_classes] = torch.sigmoid(self.old_model(inputs)[:, :self.old_classes])
        loss = F.binary_cross_entropy_with_logits(out[:, :seen], targets)
        if self.wd_reg:
            loss = loss + self.wd_reg * sum((p ** 2).sum() for p in self.model.parameters())
        return self.step(loss, (batch, out[x.shape[0]:]))

    def end_task(self, task: Task) -> None:
        m = self.em_size // max(self.seen_classes, 1)
        xs, ys = torch.from_numpy(np.ascontiguousarray(task.train_x)), np.asarray(task.train_y)
        for c in np.unique(ys).tolist():
            idx = np.flatnonzero(ys == c)
            order = herding(self._features(xs[idx], flip=False), m)
            pick = torch.from_numpy(idx[order.numpy()])
            # Herding order: under back-pressure or a later shrink the first ones are the best.
            self.add(xs[pick], torch.full((len(pick),), c, dtype=torch.int64), task.index)
        self.old_model = copy.deepcopy(self.model).eval()
        for p in self.old_model.parameters():
            p.requires_grad_(False)
        self.old_classes = self.seen_classes
        self.compute_class_means()

    # ---- nearest mean of exemplars -----------------------------------------------------------------
    @torch.no_grad()
    def _features(self, x: torch.Tensor, flip: bool) -> torch.Tensor:
        """L2-normalized penultimate features of raw uint8 samples (unaugmented), in eval mode.

        With ``flip`` (and an augmenting stream) the normalized features of the horizontally
        flipped copy are averaged in, as iCaRL's class means do.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            parts = []
            for start in range(0, x.shape[0], _CHUNK):
                xb = self.prep(x[start:start + _CHUNK], train=False)
                f = F.normalize(self.model.features(xb).float(), dim=1)
                if flip:
                    f = (f + F.normalize(self.model.features(xb.flip(-1)).float(), dim=1)) / 2
                parts.append(f)
            return torch.cat(parts) if parts else torch.zeros(0, 0, device=self.device)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def compute_class_means(self) -> None:
        """Class means of the exemplars the memory holds now (normalized); classes without
        exemplars get none."""
        # Seeded: a fresh draw of the EM as it is now. Through the daemon an unseeded sample() may
        # come from a ring batch drawn before the exemplars just added.
        batch = self.memory.sample(self.em_size, seed=0)
        self.class_means, self.has_mean = None, None
        if not len(batch):
            return
        feats = self._features(batch.x, flip=bool(self.stream.augment))
        labels = batch.y.to(feats.device)
        num_classes = self.stream.num_classes
        sums = torch.zeros(num_classes, feats.shape[1], device=feats.device).index_add_(0, labels, feats)
        counts = torch.bincount(labels, minlength=num_classes)
        self.has_mean = counts > 0
        self.class_means = F.normalize(sums / counts.clamp(min=1).unsqueeze(1).float(), dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``-distance`` from the normalized features of ``x`` to each class's exemplar mean."""
        if self.class_means is None:
            self.compute_class_means()
        if self.class_means is None:  # no exemplars yet (mid first task): the network's own head
            return self.masked(super().predict(x))
        self.model.eval()
        try:
            feats = F.normalize(self.model.features(x).float(), dim=1)
        finally:
            self.model.train()
        dist = torch.cdist(feats, self.class_means)
        dist[:, ~self.has_mean] = float("inf")
        return -dist
