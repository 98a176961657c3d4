"""Replay batches from a daemon as ``torch.utils.data.IterableDataset``s.

- ``ReplayDataset``: replay batches only. Each ``DataLoader`` worker opens its own connection (and
  shared-memory rings) to the daemon and yields its share of the batches, so replay draws run in
  parallel with the training step. Use ``batch_size=None``: every item already is a
  :class:`~carousel.Batch`.
- ``StreamReplayDataset``: the stream and replay in one ``DataLoader``: each item is a stream
  mini-batch ``(x, y)`` from a map-style dataset (shuffled, split over workers) and a replay
  :class:`~carousel.Batch` drawn beside it, so loading, decoding and replay draws all happen in the
  workers (with ``pin_memory=True`` too).

Example (needs a running daemon, so not a doctest)::

    from torch.utils.data import DataLoader
    replay = DataLoader(ReplayDataset(sock, batch_size=32, num_batches=1000),
                        batch_size=None, num_workers=2, pin_memory=True)
    for (x, y), batch in zip(stream_loader, replay): ...
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..batch import Batch
from .client import MemoryClient, connect

__all__ = ["ReplayDataset", "StreamReplayDataset"]


class ReplayDataset(IterableDataset):
    """``num_batches`` replay batches of ``batch_size`` (``None``: endless), split over workers.

    ``copy=True`` hands out batches that own their memory instead of views of a shared-memory ring
    slot; a ``DataLoader`` worker copies into its own shared memory anyway, so the default is False.
    """

    def __init__(self, socket_path: str | None = None, memory: str = "default", *, batch_size: int = 32,
                 num_batches: int | None = None, classes: Any = None, tasks: Any = None, balanced: bool = False,
                 skip_empty: bool = True, copy: bool = False, token: str | None = None) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches must be >= 0 or None, got {num_batches}")
        self.socket_path, self.memory, self.token = socket_path, memory, token
        self.batch_size, self.num_batches = batch_size, num_batches
        self.filters = {"classes": classes, "tasks": tasks, "balanced": balanced}
        self.skip_empty, self.copy = skip_empty, copy

    def _share(self) -> int | None:
        info = get_worker_info()
        if self.num_batches is None or info is None:
            return self.num_batches
        base, extra = divmod(self.num_batches, info.num_workers)
        return base + (1 if info.id < extra else 0)

    def __iter__(self) -> Iterator[Batch]:
        share = self._share()
        client: MemoryClient = connect(self.socket_path, self.memory, token=self.token)
        try:
            done = 0
            while share is None or done < share:
                batch = client.sample(self.batch_size, **self.filters)
                if len(batch) == 0 and self.skip_empty:
                    time.sleep(0.01)  # nothing in the memory yet: wait for the trainer's first add
                    continue
                if self.copy:
                    batch = Batch(batch.ids.clone(), batch.x.clone(), batch.y.clone(), batch.task.clone(),
                                  {k: v.clone() for k, v in batch.extras.items()})
                yield batch
                done += 1
        finally:
            client.close()


class StreamReplayDataset(IterableDataset):
    """One pass over ``stream`` in mini-batches of ``batch_size``, each with a replay batch of
    ``replay_size`` from the daemon: items are ``(x, y, replay)``.

    ``stream`` is map-style and returns ``(x, y)`` per index (tensors or numbers); the order is a
    permutation drawn from ``seed`` and ``epoch`` (call :meth:`set_epoch` for a new one), split
    over workers by whole mini-batches. A replay batch is empty while the memory is (the first
    steps of a run): the trainer adds the stream batch to the memory itself, after its step, so
    what it adds and observes stays in its own process and order. The trainer's adds are posted
    (docs/protocol.md), and workers draw ahead of the step, so how many of the first batches come
    with an empty replay depends on timing; once the memory holds samples, every batch has some.

    Example (needs a running daemon, so not a doctest)::

        loader = DataLoader(StreamReplayDataset(task_data, sock, batch_size=32, replay_size=32),
                            batch_size=None, num_workers=2, pin_memory=True)
        for x, y, replay in loader:
            logits = model(torch.cat([x, replay.x]))
    """

    def __init__(self, stream: Dataset, socket_path: str | None = None, memory: str = "default", *,
                 batch_size: int = 32, replay_size: int = 32, seed: int = 0, drop_last: bool = False,
                 token: str | None = None, **filters: Any) -> None:
        super().__init__()
        if batch_size <= 0 or replay_size < 0:
            raise ValueError(f"batch_size must be positive and replay_size >= 0, got {batch_size}, {replay_size}")
        unknown = set(filters) - {"classes", "tasks", "balanced"}
        if unknown:
            raise TypeError(f"unknown replay filters {sorted(unknown)}; known: classes, tasks, balanced")
        self.stream, self.socket_path, self.memory, self.token = stream, socket_path, memory, token
        self.batch_size, self.replay_size, self.seed, self.drop_last = batch_size, replay_size, seed, drop_last
        self.filters = filters
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle differently on the next pass (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.stream)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Any, Any, Batch]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.stream), generator=g)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        info = get_worker_info()
        if info is not None:
            batches = batches[info.id::info.num_workers]
        client: MemoryClient = connect(self.socket_path, self.memory, token=self.token)
        try:
            for idx in batches:
                items = [self.stream[int(i)] for i in idx]
                x = torch.stack([torch.as_tensor(it[0]) for it in items])
                y = torch.as_tensor([int(it[1]) for it in items], dtype=torch.int64)
                replay = client.sample(self.replay_size, **self.filters)
                # A ring slot is recycled once its views are dropped: hand out a batch that owns its memory.
                replay = Batch(replay.ids.clone(), replay.x.clone(), replay.y.clone(), replay.task.clone(),
                               {k: v.clone() for k, v in replay.extras.items()})
                yield x, y, replay
        finally:
            client.close()
