"""``CarouselReplayPlugin``: replay from a carousel memory in any Avalanche supervised strategy.

Avalanche's ``ReplayPlugin`` keeps its exemplars in a RAM buffer (``ReservoirSamplingBuffer``,
``ClassBalancedBuffer``, ...) and concatenates them to the experience's data loader. This plugin
replaces both: every training iteration it draws ``replay_size`` samples from a carousel memory
(``sample()``: RAM only, never waiting on storage) and appends them to the mini-batch before the
forward pass; after the forward pass it reports the replayed samples' logits (``observe``), so
CarM's swap policy sees what the model made of them; after the update it adds the mini-batch's
own samples to the memory (to flash/disk with tiers, to the EM by reservoir admission)::

    from avalanche.training import Naive
    from carousel.integrations.avalanche import CarouselReplayPlugin

    replay = CarouselReplayPlugin(mem_size=200, tiers=[{"kind": "lmdb", "capacity": 100_000}])
    strategy = Naive(model, optimizer, criterion, plugins=[replay], train_mb_size=32)
    for experience in benchmark.train_stream:
        strategy.train(experience)

The memory holds the tensors the strategy trains on (after the dataset's transforms), with their
labels and task labels; it is built at the first mini-batch from its shape and dtype (or pass an
open ``memory``: a ``CarouselMemory`` or a daemon's ``MemoryClient``). Needs ``avalanche-lib``
(``pip install 'carousel[avalanche]'``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from ._memory import memory_for

__all__ = ["CarouselReplayPlugin"]


class CarouselReplayPlugin(SupervisedPlugin):
    """Replay ``replay_size`` samples per training iteration from a carousel memory of ``mem_size``
    EM slots (``replay_size`` defaults to the mini-batch size).

    ``tiers``: carousel ``[[tiers]]`` tables (``path`` defaults to a folder under ``root``); none
    is a RAM-only reservoir buffer. ``swap``: a ``[swap]`` table; swaps start with the first
    experience here, since class-incremental benchmarks label every experience task 0.
    """

    def __init__(self, mem_size: int = 200, *, replay_size: int | None = None,
                 tiers: Sequence[Mapping[str, Any]] | None = None, swap: Mapping[str, Any] | None = None,
                 memory: Any = None, root: str | Path | None = None, seed: int = 0) -> None:
        super().__init__()
        if int(mem_size) <= 0:
            raise ValueError(f"mem_size must be positive, got {mem_size}")
        if replay_size is not None and int(replay_size) < 0:
            raise ValueError(f"replay_size must be >= 0, got {replay_size}")
        self.mem_size, self.replay_size = int(mem_size), replay_size
        self._tiers = [dict(t) for t in tiers or []]
        self._swap = {"start_task": 0, **(swap or {})}
        self._given = memory
        self.memory = memory
        self._root = Path(root) if root is not None else None
        self._owns_root = root is None
        self._seed = seed
        self._stream: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._replayed: torch.Tensor | None = None
        self._n = 0

    # ---- the plugin callbacks (training only) ----------------------------------------------------
    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        x, y, t = strategy.mb_x, strategy.mb_y, strategy.mb_task_id
        self._n = len(x)
        self._stream = (x.detach().cpu(), y.detach().cpu(), t.detach().cpu())
        self._replayed = None
        if self.memory is None:
            self.memory = self._open(self._stream[0])
        n = self._n if self.replay_size is None else int(self.replay_size)
        if n == 0:
            return
        batch = self.memory.sample(n)
        if not len(batch):
            return
        device = x.device
        strategy.mbatch[0] = torch.cat([x, batch.x.to(device, dtype=x.dtype)])
        strategy.mbatch[1] = torch.cat([y, batch.y.to(device, dtype=y.dtype)])
        strategy.mbatch[-1] = torch.cat([t, batch.task.to(device, dtype=t.dtype)])
        self._replayed = batch.ids

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self._replayed is not None:
            self.memory.observe(self._replayed, logits=strategy.mb_output[self._n:].detach().float().cpu())

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self._stream is not None:
            x, y, t = self._stream
            self.memory.add(x, y.long(), t.long())
            self._stream = None

    # ---- carousel's side ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the memory this plugin opened (and remove its temporary folder)."""
        if self.memory is not None and self._given is None:
            self.memory.close()
            self.memory = None
        if self._owns_root and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def _open(self, x: torch.Tensor) -> Any:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="carousel-avalanche-"))
        memory, _ = memory_for(x, self.mem_size, self._root, self._tiers, self._swap, self._seed)
        return memory
