"""``ReplayDataset``: replay batches from a daemon as a ``torch.utils.data.IterableDataset``.

Each ``DataLoader`` worker opens its own connection (and shared-memory rings) to the daemon and
yields its share of the batches, so replay draws run in parallel with the training step. Use
``batch_size=None``: every item already is a :class:`~carousel.Batch`.

>>> from torch.utils.data import DataLoader                                     # doctest: +SKIP
>>> replay = DataLoader(ReplayDataset(sock, batch_size=32, num_batches=1000),   # doctest: +SKIP
...                     batch_size=None, num_workers=2, pin_memory=True)
>>> for (x, y), batch in zip(stream_loader, replay): ...                        # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from .batch import Batch
from .client import MemoryClient, connect

__all__ = ["ReplayDataset"]


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
