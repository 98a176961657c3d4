"""CarouselBuffer driven the way Mammoth's rehearsal models drive their ``Buffer`` (aimagelab/mammoth
``models/``): each class below makes the buffer calls of the models it names, in their order and
with their arguments, on a tiny class-incremental stream (3 tasks x 2 classes, 3x8x8 images whose
pixels all equal the sample's number, so any row names its sample). Written for these tests; no
Mammoth code. Where swapping matters the buffer has an LMDB tier and swaps from the second task."""

from __future__ import annotations

from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carousel.integrations.mammoth import CarouselBuffer

TASKS, CPT, STEPS, BATCH, MB = 3, 2, 5, 8, 8


class Flip(nn.Module):
    """A batched augmentation, as Mammoth's Kornia transforms are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 4
        return x.flip(-1)


def stream():
    """``(task, step, x, y)``; sample ``k`` is the image filled with ``k``, of class ``2 * task + k % 2``."""
    k = 0
    for task in range(TASKS):
        for step in range(STEPS):
            n = torch.arange(k, k + BATCH)
            x = n.float()[:, None, None, None].expand(BATCH, 3, 8, 8).clone()
            yield task, step, x, (n % CPT + CPT * task)
            k += BATCH


LABEL = {}  # sample number -> class
for _t, _s, _x, _y in stream():
    LABEL.update(zip(_x[:, 0, 0, 0].long().tolist(), _y.tolist()))


def num(x: torch.Tensor) -> list[int]:
    return x.flatten(1)[:, 0].round().long().tolist()


def check_rows(x: torch.Tensor, y: torch.Tensor) -> None:
    """Every returned example comes with its own label."""
    assert [LABEL[k] for k in num(x)] == y.tolist()


class Model:
    """What every Mammoth model has: a net, an optimiser, ``current_task``, ``transform``."""

    def __init__(self, buffer: CarouselBuffer) -> None:
        self.buffer, self.current_task = buffer, 0
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, TASKS * CPT))
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01)
        self.transform, self.device = Flip(), "cpu"

    def step(self, loss: torch.Tensor) -> float:
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def end_task(self) -> None:
        pass


class ErLike(Model):
    """ER, A-GEM-R, MER, ER-ACE, GEM's and A-GEM's replay draws, HAL's and CCIC's draws: one
    ``get_data(minibatch, transform, device)``, then ``add_data(examples, labels)``. CCIC also
    reads ``buffer.labels[:num_seen_examples]`` and draws with ``mask_task_out``/``cpt``."""

    def observe(self, x, y, not_aug):
        n = len(x)
        if not self.buffer.is_empty():
            bx, by = self.buffer.get_data(MB, transform=self.transform, device=self.device)
            check_rows(bx.flip(-1), by)
            seen = self.buffer.labels[: self.buffer.num_seen_examples]  # CCIC
            assert len(seen) == len(self.buffer.examples[: self.buffer.num_seen_examples])
            if self.current_task > 0:
                (masked,) = self.buffer.get_data(MB, mask_task_out=self.current_task, transform=self.transform,
                                                 cpt=CPT, device=self.device)[:1]
                assert all(LABEL[k] // CPT != self.current_task for k in num(masked))
            x, y = torch.cat((x, bx)), torch.cat((y, by))
        loss = self.step(F.cross_entropy(self.net(x), y))
        self.buffer.add_data(examples=not_aug, labels=y[:n])
        return loss


class DerPP(Model):
    """DER (``add_data(examples, logits)``), DER++ (two draws: logits, then labels) and FDR's
    observe (``get_data`` -> examples, logits, task labels)."""

    def observe(self, x, y, not_aug):
        out = self.net(x)
        loss = F.cross_entropy(out, y)
        if not self.buffer.is_empty():
            bx, _, blog, _ = self.buffer.get_data(MB, transform=self.transform, device=self.device)
            loss = loss + F.mse_loss(self.net(bx), blog)
            bx, by, _, btl = self.buffer.get_data(MB, transform=self.transform, device=self.device)
            check_rows(bx.flip(-1), by)
            assert (btl <= self.current_task).all()
            loss = loss + F.cross_entropy(self.net(bx), by)
        self.step(loss)
        self.buffer.add_data(examples=not_aug, labels=y, logits=out.data,
                             task_labels=torch.full((len(y),), self.current_task))


class XDer(Model):
    """X-DER, X-DER-CE, X-DER-RPC: two ``return_index`` draws per step, then in-place writes of
    ``buffer.logits[idx]`` / ``buffer.task_labels[idx]`` at both draws' positions; ``eye(buffer_size)
    [idx]``; at the task's end ``get_data(buffer_size, return_index=True)`` and more writes, then
    ``get_all_data`` / ``empty`` / ``add_data`` per class and ``buffer_size - num_seen_examples``."""

    def observe(self, x, y, not_aug):
        out = self.net(x)
        loss = F.cross_entropy(out, y)
        if not self.buffer.is_empty():
            i1, bx1, _by1, blog1, _ = self.buffer.get_data(MB, transform=self.transform, device=self.device,
                                                          return_index=True)
            i2, bx2, _by2, blog2, _ = self.buffer.get_data(MB, transform=self.transform, device=self.device,
                                                          return_index=True)
            idx = torch.cat([i1, i2])
            _, first = np.unique(idx.numpy(), return_index=True)
            umask = torch.zeros(len(idx), dtype=torch.bool)
            umask[first] = True
            eyey = torch.eye(self.buffer.buffer_size)[idx][umask]
            assert (eyey.argmax(1) == idx[umask]).all()
            bx = torch.cat([bx1, bx2])
            # the model writes where the draw was: each position still holds the drawn sample
            assert num(self.buffer.examples[idx]) == num(bx.flip(-1))
            mark = torch.tensor(num(bx.flip(-1)), dtype=torch.float32)[:, None].expand(-1, TASKS * CPT)
            self.buffer.logits[idx[umask], :] = mark[umask] + 0.25
            self.buffer.task_labels[idx[umask]] = self.current_task
            loss = loss + F.mse_loss(self.net(bx), torch.cat([blog1, blog2]))
        self.step(loss)
        self.buffer.add_data(examples=not_aug, labels=y, logits=out.data,
                             task_labels=torch.full((len(y),), self.current_task))

    def end_task(self):
        idx, bx, by, blog, _ = self.buffer.get_data(self.buffer.buffer_size, transform=None, return_index=True)
        chosen = (by // CPT) < self.current_task
        self.buffer.logits[idx[chosen], :] = blog[chosen] * 0 + torch.tensor(num(bx[chosen]))[:, None] + 0.25
        self.buffer.task_labels[idx[chosen]] = self.current_task
        bx, by, blog, btl = self.buffer.get_all_data()
        assert (blog[:, 0][(by // CPT) < self.current_task] == torch.tensor(
            num(bx[(by // CPT) < self.current_task])) + 0.25).all()
        self.buffer.empty()
        for c in by.unique():
            keep = by == c
            self.buffer.add_data(examples=bx[keep][:4], labels=by[keep][:4], logits=blog[keep][:4],
                                 task_labels=btl[keep][:4])
        assert self.buffer.buffer_size - self.buffer.num_seen_examples >= 0


class Rebuilding(Model):
    """BiC, FDR, RPC at a task's end: ``get_all_data()``, ``empty()``, then ``add_data`` of
    ``buffer_size // tasks`` per task (examples, labels, task labels); GDumb's fit:
    ``get_data(len(buffer.examples), transform)``."""

    def observe(self, x, y, not_aug):
        self.last = (not_aug, y)
        return self.step(F.cross_entropy(self.net(x), y))

    def end_task(self):
        per_task = self.buffer.buffer_size // (self.current_task + 1)
        if not self.buffer.is_empty():
            bx, by, btl = self.buffer.get_all_data()
            self.buffer.empty()
            for tl in btl.unique():
                keep = btl == tl
                self.buffer.add_data(examples=bx[keep][:per_task], labels=by[keep][:per_task],
                                     task_labels=btl[keep][:per_task])
        x, y = self.last
        # BiC's form: float task labels, current_task - 1 (so -1 for the first task's samples).
        tl = (torch.ones(len(y)) * (self.current_task - 1))[:per_task]
        self.buffer.add_data(examples=x[:per_task], labels=y[:per_task], task_labels=tl)
        assert (self.buffer.get_all_data()[2] == self.current_task - 1).sum() == len(tl)  # kept as given
        all_x, all_y = self.buffer.get_data(len(self.buffer.examples), transform=self.transform)[:2]  # GDumb
        check_rows(all_x.flip(-1), all_y)
        assert len(all_x) == len(self.buffer)


class FillBuffer(Model):
    """iCaRL, LUCIR, GEM, A-GEM through Mammoth's ``fill_buffer``: ``buffer_size = ...`` then
    ``used_attributes``, ``get_all_data()``, ``empty()`` and ``add_data`` per class (with logits
    for iCaRL, task labels for GEM); iCaRL's class means ``get_all_data(transform, device)``;
    ``icarl_replay``'s ``buffer.labels / examples[:len(buffer)]``."""

    def observe(self, x, y, not_aug):
        self.seen = getattr(self, "seen", []) + [(not_aug, y)]
        return self.step(F.cross_entropy(self.net(x), y))

    def end_task(self):
        self.buffer.buffer_size = 12
        per_class = self.buffer.buffer_size // (CPT * (self.current_task + 1))
        if self.current_task > 0:
            assert self.buffer.used_attributes == ["examples", "labels", "logits", "task_labels"]
            bx, by, blog, btl = self.buffer.get_all_data()
            self.buffer.empty()
            for c in by.unique():
                keep = by == c
                self.buffer.add_data(examples=bx[keep][:per_class], labels=by[keep][:per_class],
                                     logits=blog[keep][:per_class], task_labels=btl[keep][:per_class])
        x = torch.cat([s[0] for s in self.seen])
        y = torch.cat([s[1] for s in self.seen])
        self.seen = []
        for c in y.unique():
            keep = y == c
            with torch.no_grad():
                logits = self.net(x[keep][:per_class])
            self.buffer.add_data(examples=x[keep][:per_class], labels=y[keep][:per_class], logits=logits,
                                 task_labels=torch.full((len(logits),), self.current_task))
        ex, lab = self.buffer.get_all_data(self.transform, device=self.device)[:2]
        check_rows(ex.flip(-1), lab)
        assert self.buffer.labels.cpu().numpy()[: len(self.buffer)].tolist() == lab.tolist()
        check_rows(self.buffer.examples[: len(self.buffer)], self.buffer.labels[: len(self.buffer)])


class Tricks(Model):
    """ER-tricks, ER-ACE-tricks (``sample_selection_strategy='labrs'``, their default):
    ``get_data(return_index=True)``, then
    ``sample_selection_fn.update(indexes, -losses)`` and ``add_data(sample_selection_scores=)``;
    at a task's end ``get_data(buffer_size, transform=normalization)``."""

    def observe(self, x, y, not_aug):
        n = len(x)
        if not self.buffer.is_empty():
            idx, bx, by = self.buffer.get_data(MB, transform=self.transform, device=self.device, return_index=True)
            x, y = torch.cat((x, bx)), torch.cat((y, by))
        scores = F.cross_entropy(self.net(x), y, reduction="none")
        self.step(scores.mean())
        if n < len(x):
            self.buffer.sample_selection_fn.update(idx, -scores.detach()[n:])
        self.buffer.add_data(examples=not_aug, labels=y[:n], sample_selection_scores=-scores.detach()[:n])

    def end_task(self):
        x, y = self.buffer.get_data(self.buffer.buffer_size, transform=nn.Identity())
        check_rows(x, y)


class Offsets:
    """The dataset ABS reads: ``get_offsets()`` -> the current task's first and end class."""

    def __init__(self) -> None:
        self.task = 0

    def get_offsets(self):
        return CPT * self.task, CPT * (self.task + 1)


class AerAbs(Model):
    """ER-ACE-AER-ABS (``Buffer(size, device, dataset=dataset, sample_selection_strategy='abs')``):
    ``get_data(return_index=True, return_not_aug=True)``, ``sample_selection_fn.update(indexes,
    losses)`` and ``add_data(examples, labels, sample_selection_scores=)`` of the clean part;
    ``get_all_data(device="cpu")``."""

    def observe(self, x, y, not_aug):
        DATASET.task = self.current_task
        if not self.buffer.is_empty():
            idx, na, bx, by = self.buffer.get_data(MB, transform=self.transform, device=self.device,
                                                   return_index=True, return_not_aug=True)
            check_rows(na, by)
            assert num(bx.flip(-1)) == num(na)
            losses = F.cross_entropy(self.net(na), by, reduction="none").detach()
            self.buffer.sample_selection_fn.update(idx, losses)
        scores = F.cross_entropy(self.net(x), y, reduction="none")
        self.step(scores.mean())
        clean = scores.detach() < scores.detach().median() + 1
        self.buffer.add_data(examples=not_aug[clean], labels=y[clean], sample_selection_scores=scores.detach()[clean])

    def end_task(self):
        check_rows(*self.buffer.get_all_data(device="cpu"))


DATASET = Offsets()


class NoisyLabels(Model):
    """CNLL, SPR, PuriDivER: a delayed buffer filled one sample at a time
    (``add_data(examples=x.unsqueeze(0), labels, true_labels)``) until ``is_full()``; its
    ``examples`` / ``labels`` / ``true_labels`` indexed by a selection and moved on; ``to(device)``;
    ``get_dataloader`` batches; ``get_all_data()`` with true labels; ``labels == true_labels``."""

    def __init__(self, buffer):
        super().__init__(buffer)
        self.delayed = CarouselBuffer(8, "cpu")

    def observe(self, x, y, not_aug):
        for i in range(len(x)):
            self.delayed.add_data(examples=not_aug[i].unsqueeze(0), labels=y[i:i + 1], true_labels=y[i:i + 1])
            if self.delayed.is_full():
                self.delayed.to(self.device)
                xs, ys, ts = self.delayed.examples, self.delayed.labels, self.delayed.true_labels
                clean = (torch.arange(len(xs)) % 2 == 0)
                self.buffer.add_data(examples=xs[clean], labels=ys[clean], true_labels=ts[clean])
                self.delayed.empty()
        if self.buffer.is_empty():
            return
        args = Namespace(seed=0, batch_size=4)
        for batch in self.buffer.get_dataloader(args, batch_size=args.batch_size, shuffle=True, drop_last=True):
            check_rows(batch[0], batch[1])
        bx, by, bt = self.buffer.get_all_data()
        check_rows(bx, by)
        assert (by == bt).all() and (self.buffer.labels[: len(self.buffer)] == self.buffer.true_labels[
            : len(self.buffer)]).all()
        xp = self.buffer.get_data(4)[0]  # SPR's draw
        assert xp.shape[1:] == (3, 8, 8)


class TwF(Model):
    """TwF (RAM-only: attention maps stay per position in RAM): ``add_data(..., attention_maps=)``;
    at a task's start, over ``batch_iterate(len(buffer))``, ``buffer.labels[idxs]``,
    ``buffer.examples[idxs]`` and ``buffer.attention_maps[idx] = [...]``; in observe
    ``get_data(return_index=True)`` and ``attention_maps[c]`` for each drawn position."""

    def observe(self, x, y, not_aug):
        out = self.net(x)
        if len(self.buffer) > 0:
            idx, bx, by, _ = self.buffer.get_data(MB, transform=None, return_index=True)
            check_rows(bx, by)
            maps = [self.buffer.attention_maps[c] for c in idx]
            assert all(int(m[0][0]) == k % 256 for m, k in zip(maps, num(bx)))
        self.step(F.cross_entropy(out, y))
        self.buffer.add_data(examples=not_aug, labels=y, logits=out.data,
                             attention_maps=[not_aug[:, 0, 0, :2]])

    def end_task(self):
        for lo in range(0, len(self.buffer), 4):
            idxs = list(range(lo, min(lo + 4, len(self.buffer))))
            labels, examples = self.buffer.labels[idxs], self.buffer.examples[idxs]
            check_rows(examples, labels)
            for i in idxs:
                self.buffer.attention_maps[i] = [self.buffer.examples[i][:, 0, 0].byte()[:2]]


class Casper(Model):
    """CaSpeR (``sample_selection_strategy='balancoir'``): ``get_all_data(transform)`` and
    ``get_balanced_data(batch, transform, n_classes)`` beside ER's draws."""

    def observe(self, x, y, not_aug):
        if not self.buffer.is_empty():
            bx, by = self.buffer.get_balanced_data(4, transform=self.transform, n_classes=2)
            check_rows(bx.flip(-1), by)
            assert len(by.unique()) <= 2
            ax, ay = self.buffer.get_all_data(transform=self.transform)
            check_rows(ax.flip(-1), ay)
        self.step(F.cross_entropy(self.net(x), y))
        self.buffer.add_data(examples=not_aug, labels=y)


MODELS = {  # model class -> (tiers?, extra constructor arguments)
    ErLike: (True, {}), DerPP: (True, {}), XDer: (True, {}), Rebuilding: (True, {}), FillBuffer: (True, {}),
    Tricks: (True, {"sample_selection_strategy": "labrs"}),
    AerAbs: (True, {"sample_selection_strategy": "abs", "dataset": DATASET}), NoisyLabels: (True, {}), TwF: (False, {}), Casper: (True, {"sample_selection_strategy": "balancoir"}),
}


@pytest.mark.parametrize("model_cls", list(MODELS), ids=lambda c: c.__name__)
def test_mammoth_models_buffer_calls(tmp_path, model_cls):
    tiered, kwargs = MODELS[model_cls]
    tiers = [{"kind": "lmdb", "capacity": 1000}] if tiered else None
    torch.manual_seed(0)
    with CarouselBuffer(16, "cpu", tiers=tiers, root=tmp_path / "b", n_tasks=TASKS, **kwargs) as buf:
        model = model_cls(buf)
        for task, step, x, y in stream():
            if task != model.current_task:
                model.end_task()
                model.current_task = task
            model.observe(Flip()(x), y, x)
        model.end_task()
        assert len(buf) > 0 and buf.stats()["current_task"] >= 1
        if tiered:
            buf.memory.flush()
            assert buf.stats()["tiers"]["0-lmdb"]["samples"] > 0
