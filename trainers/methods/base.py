"""What every continual-learning method shares: the replay memory it talks to, the step contract.

A method sees the stream one mini-batch at a time (raw uint8 samples, remapped labels, the task
index) and talks to its replay memory through carousel's public API only -- ``add``, ``sample``,
``observe`` -- so the same code runs on a RAM-only buffer, a tiered ``CarouselMemory``, a daemon
client (``carousel.connect``) or the storage-only baseline. Replayed samples are augmented like
stream samples (memories hold raw uint8 samples), and every replay step reports the model's logits
to ``observe`` so carousel's swap policies see correctness and entropy.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from carousel.batch import Batch
from carousel.kinds.saliency import grad_cam, last_conv_block

from ..augment import prepare
from ..streams import Stream, Task


class ReplayMemory(Protocol):
    """What a method needs from a memory: ``CarouselMemory`` and ``MemoryClient`` both are one."""

    def add(self, x: Any, y: Any, task: Any, **extras: Any) -> torch.Tensor: ...
    def sample(self, n: int, **kwargs: Any) -> Batch: ...
    def observe(self, ids: Any, logits: Any = None, loss: Any = None) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def end_step(self) -> None: ...


class PhaseTimer:
    """Seconds spent per phase (``train``, ``replay_sample``, ``eval``, ...), summed over calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def timed(self, phase: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[phase] += time.perf_counter() - self.t0

        return _Span()


@dataclass
class Context:
    """Everything a method is built with; the runner fills it."""

    stream: Stream
    model: nn.Module
    memory: ReplayMemory
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 32                  # stream samples per step
    replay_size: int = 32                 # replay samples per draw
    lr: float | None = None               # None: the method's default for the benchmark
    epochs: int = 1
    seed: int = 0
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    generator: torch.Generator | None = None   # augmentation randomness
    memory_kind: str = "plain"            # "coreset": per-sample weights and retain(); "saliency": add() sends maps
    tiered: bool = False                  # the memory keeps samples beyond the EM (carousel mode: storage tiers)


class Method(ABC):
    """One continual-learning method. Subclasses set ``name`` and implement :meth:`train_step`.

    The runner calls, per task: :meth:`begin_task`, :meth:`train_step` for every mini-batch of
    the task's training data (for each epoch), :meth:`end_task`; and :meth:`predict` to evaluate.
    """

    name: ClassVar[str]
    admission: ClassVar[str] = "reservoir"   # the memory's admission policy this method expects
    default_lr: ClassVar[dict[str, float]] = {}  # per benchmark name; "*" for the rest
    # Labels of the replay batches drawn since a trace (trainers.trace.Tracer) last read them;
    # None, the default, records nothing.
    replayed: list[torch.Tensor] | None = None
    # Cross-entropy of each replayed batch under the model that trained on it (before its update),
    # kept for the trace the same way: how much the replay still has to teach (a fixed RAM buffer is
    # soon memorized; a rotating carousel EM keeps bringing samples the model has not fitted).
    replay_ce: list[float] | None = None

    def __init__(self, ctx: Context, **hparams: Any) -> None:
        self.ctx = ctx
        self.model = ctx.model
        self.memory = ctx.memory
        self.stream = ctx.stream
        self.device = ctx.device
        self.hparams = hparams
        lr = ctx.lr if ctx.lr is not None else self.default_lr.get(ctx.stream.name, self.default_lr.get("*", 0.1))
        self.lr = lr
        self.opt = self.make_optimizer()
        self.task: Task | None = None
        self.seen_classes = 0                # head outputs in use: classes of tasks seen so far

    @classmethod
    def extras(cls, num_classes: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Extra per-sample fields the memory must hold for this method (name -> (shape, dtype))."""
        return {}

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)

    # ---- the contract ----------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        self.task = task
        self.seen_classes = max(self.seen_classes, max(task.classes) + 1)
        self.model.train()

    @abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor, task: int) -> float:
        """One optimizer step on a stream mini-batch (``x`` raw uint8 on the CPU); returns the loss."""

    def end_task(self, task: Task) -> None:
        """Called after the task's last step (iCaRL's herding, GDumb's retraining, ...)."""

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over every class of the head, for a normalized float batch on the device."""
        self.model.eval()
        out = self.model(x)
        self.model.train()
        return out

    # ---- helpers for subclasses ------------------------------------------------------------------
    def prep(self, x: torch.Tensor, train: bool = True) -> torch.Tensor:
        """Raw uint8 samples -> normalized (and, for training, augmented) floats on the device."""
        return prepare(x.to(self.device, non_blocking=True), self.stream, train=train, generator=self.ctx.generator)

    def replay(self, n: int | None = None, **kwargs: Any) -> Batch | None:
        """A replay batch from the memory (None while it is empty), timed as ``replay_sample``;
        its labels go to :attr:`replayed` when a trace listens. On a CUDA device the batch comes
        in page-locked memory, so the methods' ``.to(device, non_blocking=True)`` copies overlap
        the step."""
        if self.device.type == "cuda":
            kwargs = {"pin_memory": True, **kwargs}
        with self.ctx.timer.timed("replay_sample"):
            batch = self.memory.sample(self.ctx.replay_size if n is None else n, **kwargs)
        if self.replayed is not None and len(batch):
            self.replayed.append(batch.y)
        return batch if len(batch) else None

    def observe(self, batch: Batch, logits: torch.Tensor) -> None:
        """Tell the memory what the model made of replayed samples (drives CarM's swap-out)."""
        with self.ctx.timer.timed("replay_observe"):
            self.memory.observe(batch.ids, logits=logits.detach()[:, :self.seen_classes].float().cpu())

    def step(self, loss: torch.Tensor, *replayed: tuple[Batch | None, torch.Tensor | None]) -> float:
        """One optimizer step on ``loss``, then ``observe`` every ``(batch, its logits)`` replayed in
        it (None batches skipped): the swap policies see what this step's model made of them."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        for batch, logits in replayed:
            if batch is not None:
                self.observe(batch, logits)
                if self.replay_ce is not None and logits is not None:
                    with torch.no_grad():
                        self.replay_ce.append(float(F.cross_entropy(self.masked(logits.detach()),
                                                                    batch.y.to(logits.device))))
        self.memory.end_step()  # a deterministic memory lands the swaps asked for a step ago here
        return float(loss.detach())

    def add(self, x: torch.Tensor, y: torch.Tensor, task: int, **extras: torch.Tensor) -> torch.Tensor:
        """Add raw stream samples to the memory; returns their ids. For a saliency memory the
        samples' Grad-CAM maps (the predicted class among the current task's) go along, timed
        as ``saliency``: the memory keeps only their salient pixels on storage."""
        if self.ctx.memory_kind == "saliency":
            with self.ctx.timer.timed("saliency"):
                classes = self.task.classes if self.task is not None else None
                extras = {**extras, "saliency": grad_cam(self.model, self.prep(x, train=False),
                                                         last_conv_block(self.model), classes)}
        with self.ctx.timer.timed("memory_add"):
            return self.memory.add(x, y, task, **{k: v.detach().cpu() for k, v in extras.items()})

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of classes not seen yet set to -inf: class-incremental training over seen classes."""
        if self.seen_classes < logits.shape[1]:
            logits = logits.clone()
            logits[:, self.seen_classes:] = float("-inf")
        return logits
