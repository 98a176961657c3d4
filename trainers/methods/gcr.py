"""GCR (Tiwari et al., CVPR 2022, "GCR: Gradient Coreset Based Replay Buffer Selection for
Continual Learning"), built on DER++'s losses with per-sample weights.

Every EM sample carries the logits it had when stored (``logits``, as in DER++) and a coreset
weight (``weight``). Each step adds to the stream cross-entropy ``alpha * sum_i w_i/sum(w) *
MSE_i(model(x'_i), stored logits_i)`` on one replay draw and ``beta * sum_i w_i/sum(w) *
CE_i(model(x''_i), y''_i)`` on a second, independent draw; equal weights give DER++ exactly.

Selection. While a task streams by, its samples are kept as candidates in a bounded RAM pool
(per class, a reservoir of up to ``pool_factor`` times the per-class budget). At the end of the
task, for each new class, :func:`gradient_coreset` picks ``m = em_size // seen_classes`` of that
class's candidates, with weights, whose weighted last-layer gradient matches the class's summed
gradient over all its candidates; the weights are rescaled to average 1 and the samples are
added with their logits and weights (the memory's class-balanced admission makes room by
evicting old classes' surplus). The gradients and the stored logits come from the model at the
end of the task, in eval mode, on unaugmented samples.

Deviations from the paper, and why:

- The paper re-selects the coreset (and re-weights) from the union of buffer and stream at
  every selection round, so old samples' weights change too. With a memory of
  ``kind = "coreset"`` (``--memory-kind coreset``) this is done per class at the end of every task:
  each old class's EM slice is re-selected and re-weighted by :func:`gradient_coreset` and applied
  with ``retain(ids, weights)``, which shrinks it to its new budget (its other samples stay on
  storage, where CarM's swaps can bring them back); each new class's selection is set exactly the
  same way. With a plain memory, a sample keeps the weight it was stored with and old classes
  shrink by the admission's random eviction.
- With a coreset memory that has storage tiers (``--memory carousel``), every stream sample is
  stored as it streams by (with its training-time logits, as DER++ stores them, and weight 1) and
  the selection is applied to those stored ids with ``retain``; between selections CarM's swaps
  rotate other stored samples (weight 1 unless selected before) through the EM. So the dark-
  knowledge targets of a carousel GCR are the training-time logits, not the end-of-task ones.
- Selection happens once per task, per class (the paper's per-class variant), not every few
  steps.
- No supervised-contrastive term (the paper's ``L_SC``); the losses are DER++'s, weighted.

Defaults: alpha 0.1, beta 0.5, lr 0.03 (DER++'s Seq-CIFAR-10 values, which GCR starts from).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..streams import Task
from . import register
from .base import Context, Method

_CHUNK = 256  # samples per forward pass at selection time


# ---- the coreset ----------------------------------------------------------------------------------
def last_layer_gradients(feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient of cross-entropy w.r.t. the last linear layer: ``(N, C + C * D)``.

    ``concat(p - onehot(y), outer(p - onehot(y), feats).flatten())`` with ``p = softmax(logits)``:
    the bias gradient, then the weight gradient row by row.
    """
    d = torch.softmax(logits.float(), dim=1) - F.one_hot(labels.long(), logits.shape[1]).float()
    return torch.cat([d, (d.unsqueeze(2) * feats.float().unsqueeze(1)).flatten(1)], dim=1)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one intra-op thread for the duration (process-wide, restored after).

    The pursuit is hundreds of small matrix ops in a row; spreading each over threads only adds
    synchronization, which on a busy 2-core machine cost 8 s instead of 0.1 s for 250 picks of
    2,500 candidates (measured).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _nnls(q: torch.Tensor, h: torch.Tensor, w0: torch.Tensor | None = None) -> torch.Tensor:
    """``argmin_{w >= 0} 0.5 w'Qw - h'w`` for a positive-definite ``Q``: Lawson-Hanson's active set.

    ``w0`` (optional) must be the solution restricted to its own support (the previous OMP
    round's answer, padded with zeros): then usually only the new column enters, one solve.
    Float64 torch with Cholesky solves (``Q`` is symmetric positive definite).
    """
    n = h.shape[0]
    w = torch.zeros_like(h) if w0 is None else w0.clone()
    passive = w > 0
    tol = 1e-12 * max(1.0, float(h.abs().max())) if n else 0.0
    for _ in range(3 * n + 10):
        g = h - q @ w  # minus the gradient: > 0 where raising w lowers the objective
        enter = ~passive & (g > tol)
        if not bool(enter.any()):
            break
        passive[int(torch.where(enter, g, torch.full_like(g, -float("inf"))).argmax())] = True
        for _ in range(3 * n + 10):
            s = torch.zeros_like(h)
            p = torch.nonzero(passive).flatten()
            if len(p):
                chol = torch.linalg.cholesky(q[p][:, p])
                s[p] = torch.cholesky_solve(h[p].unsqueeze(1), chol).flatten()
            bad = passive & (s <= 0)
            if not bool(bad.any()):
                w = s
                break
            # Step from w toward s as far as stays feasible; the variables that hit zero leave.
            alpha = float((w[bad] / (w[bad] - s[bad])).min())
            w = w + alpha * (s - w)
            passive &= w > tol
            w[~passive] = 0.0
    return w


def gradient_coreset(feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, k: int, *,
                     target: torch.Tensor | None = None, reg: float = 1e-3,
                     generator: torch.Generator | None = None) -> tuple[torch.LongTensor, torch.Tensor]:
    """A weighted subset of ``k`` samples whose summed last-layer gradient matches ``target``.

    ``feats``: ``(N, D)`` penultimate features, ``logits``: ``(N, C)``, ``labels``: ``(N,)`` in
    ``[0, C)``. Gradients are :func:`last_layer_gradients`; ``target`` defaults to their sum over
    all ``N``. Non-negative orthogonal matching pursuit: repeatedly pick the sample whose gradient
    is most positively correlated with the residual, then re-solve non-negative least squares,
    with ridge ``reg`` (relative to the mean squared gradient norm, so it does not depend on the
    gradients' scale), on the samples picked so far; stop when ``k`` are picked, no sample
    correlates positively, or the residual stops shrinking. Picked samples whose weight ends at
    zero are dropped; a shortfall is filled with random other samples of weight 1.

    Returns ``(indices, weights)``: ``min(k, N)`` distinct indices (the pursuit's support first,
    in picking order) and their non-negative float32 weights.
    """
    n = feats.shape[0]
    if logits.shape[0] != n or labels.shape[0] != n:
        raise ValueError(f"feats, logits, labels must have the same length, got {n}, {logits.shape[0]}, "
                         f"{labels.shape[0]}")
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    with _one_thread():
        return _pursuit(feats, logits, labels, k, target, reg, generator)


def _pursuit(feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, k: int, target: torch.Tensor | None,
             reg: float, generator: torch.Generator | None) -> tuple[torch.LongTensor, torch.Tensor]:
    n = feats.shape[0]
    grads = last_layer_gradients(feats.detach().cpu(), logits.detach().cpu(), labels.cpu())  # (N, P)
    b = grads.sum(0) if target is None else target.detach().float().cpu().reshape(-1)
    if b.shape[0] != grads.shape[1]:
        raise ValueError(f"target must have {grads.shape[1]} values, got {b.shape[0]}")
    # A floor keeps Q positive definite (Cholesky) even with reg=0 and duplicate gradients.
    lam = max(reg, 1e-9) * float((grads.double() ** 2).sum(1).mean())
    b_norm = float(b.norm())
    picked: list[int] = []
    taken = torch.zeros(n, dtype=torch.bool)
    chosen = torch.zeros(k, grads.shape[1])           # gradients of the picked samples, in order
    gram = torch.zeros(k, k, dtype=torch.float64)      # their Gram matrix, grown a row at a time
    h = torch.zeros(k, dtype=torch.float64)            # their inner products with the target
    w = torch.zeros(0, dtype=torch.float64)
    resid, resid_norm = b.clone(), b_norm
    while len(picked) < k and resid_norm > 1e-7 * b_norm:
        corr = grads @ resid
        corr[taken] = -float("inf")
        j = int(corr.argmax())
        if not corr[j] > 0:
            break  # no sample's gradient reduces the residual with a non-negative weight
        s = len(picked)
        gj = grads[j]
        row = (chosen[:s] @ gj).double()
        gram[s, :s], gram[:s, s], gram[s, s] = row, row, float(gj.double() @ gj.double())
        h[s] = float(gj.double() @ b.double())
        q = gram[:s + 1, :s + 1] + lam * torch.eye(s + 1, dtype=torch.float64)
        w_new = _nnls(q, h[:s + 1], torch.cat([w, w.new_zeros(1)]))
        chosen[s] = gj
        new_resid = b - w_new.float() @ chosen[:s + 1]
        new_norm = float(new_resid.norm())
        if new_norm >= resid_norm * (1 - 1e-6):
            break  # the pursuit has stalled: j is not kept
        picked.append(j)
        taken[j] = True
        w, resid, resid_norm = w_new, new_resid, new_norm
    keep = w > 0
    support = torch.tensor(picked, dtype=torch.long)[keep]
    weights = w[keep].float()
    if len(support) < k:  # fill at random, weight 1, as GradMatch does
        free = torch.ones(n, dtype=torch.bool)
        free[support] = False
        rest = torch.nonzero(free).flatten()
        fill = rest[torch.randperm(len(rest), generator=generator)[:k - len(support)]]
        support = torch.cat([support, fill])
        weights = torch.cat([weights, torch.ones(len(fill))])
    return support, weights


# ---- the candidate pool ---------------------------------------------------------------------------
class ClassReservoir:
    """Per class, a uniform sample (Vitter's algorithm R) of up to ``cap`` stream samples."""

    def __init__(self, cap: int, seed: int = 0) -> None:
        self.cap = max(1, int(cap))
        self.samples: dict[int, list[torch.Tensor]] = {}
        self.ids: dict[int, list[int]] = {}  # memory ids of the kept samples (-1: not in the memory)
        self.seen: dict[int, int] = {}
        self._rng = np.random.default_rng(seed)

    def offer(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Offer stream samples (with their memory ids, when the memory already holds them)."""
        for i, c in enumerate(y.tolist()):
            t = self.seen.get(c, 0)
            self.seen[c] = t + 1
            kept = self.samples.setdefault(c, [])
            kept_ids = self.ids.setdefault(c, [])
            sid = -1 if ids is None else int(ids[i])
            if len(kept) < self.cap:
                kept.append(x[i].clone())
                kept_ids.append(sid)
            else:
                j = int(self._rng.integers(0, t + 1))
                if j < self.cap:
                    kept[j] = x[i].clone()
                    kept_ids[j] = sid

    def clear(self) -> None:
        self.samples.clear()
        self.ids.clear()
        self.seen.clear()


# ---- the method -----------------------------------------------------------------------------------
@register
class GCR(Method):
    name = "gcr"
    admission = "class_balanced"
    default_lr = {"*": 0.03}

    def __init__(self, ctx: Context, em_size: int | None = None, alpha: float = 0.1, beta: float = 0.5,
                 pool_factor: int = 10, reg: float = 1e-3, **hparams: Any) -> None:
        if em_size is None:
            raise ValueError("gcr needs the memory's EM size to size its per-class coresets: pass em_size=K "
                             "(the runner passes it)")
        if int(em_size) <= 0 or int(pool_factor) < 1:
            raise ValueError(f"gcr: em_size and pool_factor must be positive, got {em_size}, {pool_factor}")
        super().__init__(ctx, **hparams)
        self.em_size = int(em_size)
        self.alpha, self.beta, self.reg = float(alpha), float(beta), float(reg)
        self.pool_factor = int(pool_factor)
        self.pool = ClassReservoir(1, seed=ctx.seed)
        # A tiered coreset memory (carousel mode) keeps every stream sample on storage, so the
        # selection is applied to stored ids with retain() and swaps bring other stored samples in.
        self._stores_stream = ctx.memory_kind == "coreset" and ctx.tiered
        self.generator = torch.Generator().manual_seed(ctx.seed)  # the coreset's random fill

    @classmethod
    def extras(cls, num_classes: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"logits": ((num_classes,), "float32"), "weight": ((), "float32")}

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        budget = self.em_size // max(self.seen_classes, 1)
        self.pool = ClassReservoir(self.pool_factor * max(budget, 1), seed=self.ctx.seed + task.index)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, task: int) -> float:
        logits = self.model(self.prep(x))
        loss = F.cross_entropy(self.masked(logits), y.to(self.device))
        first, second = self.replay(), self.replay()
        out1 = out2 = None
        if first is not None:  # weighted dark knowledge
            out1 = self.model(self.prep(first.x))
            per = ((out1 - first.extras["logits"].to(self.device, non_blocking=True)) ** 2).mean(1)
            loss = loss + self.alpha * (_normalized(first.extras["weight"]).to(self.device) * per).sum()
        if second is not None:  # weighted replay cross-entropy
            out2 = self.model(self.prep(second.x))
            per = F.cross_entropy(self.masked(out2), second.y.to(self.device, non_blocking=True), reduction="none")
            loss = loss + self.beta * (_normalized(second.extras["weight"]).to(self.device) * per).sum()
        value = self.step(loss, (first, out1), (second, out2))
        ids = None
        if self._stores_stream:  # every stream sample goes to storage, with its logits (as in DER++)
            ids = self.add(x, y, task, logits=logits.detach())
        self.pool.offer(x, y, ids)
        return value

    def end_task(self, task: Task) -> None:
        m = self.em_size // max(self.seen_classes, 1)
        coreset = self.ctx.memory_kind == "coreset" and callable(getattr(self.memory, "retain", None))
        if coreset:  # re-select every old class's coreset from its EM slice, re-weighted; frees room
            self._reselect_old(m, exclude=set(self.pool.samples))
        selected: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for c in sorted(self.pool.samples):
            xs = torch.stack(self.pool.samples[c])
            feats, logits = self._forward(xs)
            labels = torch.full((len(xs),), c, dtype=torch.long)
            idx, w = gradient_coreset(feats, logits[:, :self.seen_classes], labels, m,
                                      reg=self.reg, generator=self.generator)
            if not len(idx):
                continue
            w = w * (len(w) / w.sum())  # average 1: the replay losses normalize per draw anyway
            if self._stores_stream:  # already stored: the EM's slice becomes exactly this selection
                selected.append((c, torch.tensor(self.pool.ids[c])[idx], w))
                continue
            ids = self.add(xs[idx], labels[idx], task.index, logits=logits[idx], weight=w)
            if coreset:  # exactly this selection: whatever admission did besides is undone
                self.memory.retain(ids, w, classes=[c])
        if selected:
            # Admission filled the EM with the new classes unevenly: shrink the slices that hold
            # more than their selection first, so that the growing ones find the freed slots.
            em = self.memory.sample(self.em_size, seed=int(torch.randint(2 ** 31, (), generator=self.generator)))
            held = torch.bincount(em.y.long(), minlength=self.seen_classes) if len(em) else None
            selected.sort(key=lambda s: -(int(held[s[0]]) - len(s[1])) if held is not None else 0)
            for c, ids, w in selected:
                self.memory.retain(ids, w, classes=[c])
        self.pool.clear()

    def _reselect_old(self, m: int, exclude: set[int]) -> None:
        """Per old class, the gradient coreset of its current EM slice, applied with ``retain``."""
        # Seeded: the EM as it is now (a daemon's ring batch may predate the last swaps).
        em = self.memory.sample(self.em_size, seed=int(torch.randint(2 ** 31, (), generator=self.generator)))
        if not len(em):
            return
        labels_all = em.y.long()
        for c in sorted(set(labels_all.tolist()) - exclude):
            rows = torch.nonzero(labels_all == c).flatten()
            feats, logits = self._forward(em.x[rows])
            labels = torch.full((len(rows),), c, dtype=torch.long)
            idx, w = gradient_coreset(feats, logits[:, :self.seen_classes], labels, min(m, len(rows)),
                                      reg=self.reg, generator=self.generator)
            if len(idx):
                self.memory.retain(em.ids[rows][idx], w * (len(w) / w.sum()), classes=[c])

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features and logits of raw uint8 samples, unaugmented, in eval mode (CPU)."""
        was_training = self.model.training
        self.model.eval()
        try:
            feats, logits = [], []
            for start in range(0, x.shape[0], _CHUNK):
                f = self.model.features(self.prep(x[start:start + _CHUNK], train=False))
                feats.append(f.float().cpu())
                logits.append(self.model.classifier(f).float().cpu())
            return torch.cat(feats), torch.cat(logits)
        finally:
            self.model.train(was_training)


def _normalized(w: torch.Tensor) -> torch.Tensor:
    """``w / w.sum()``; uniform if the weights sum to nothing (cannot happen for GCR's own)."""
    w = w.float().clamp(min=0)
    total = w.sum()
    return w / total if total > 0 else torch.full_like(w, 1.0 / max(len(w), 1))
