"""``CarouselBuffer``: Mammoth's rehearsal ``Buffer`` interface on a carousel memory.

Mammoth's rehearsal models (ER, DER, DER++, ...) talk to their buffer through ``add_data``,
``get_data``, ``is_empty`` and ``len``; :class:`CarouselBuffer` answers the same calls, so such a
model runs unchanged with ``self.buffer = CarouselBuffer(args.buffer_size, self.device, tiers=...)``
and replays from an EM of ``buffer_size`` samples that CarM keeps rotating with every sample on
flash or disk. Like Mammoth's buffer it learns its fields from the first ``add_data`` (examples,
and whichever of labels, logits and task labels are given) and returns them in that order.

>>> import torch
>>> buf = CarouselBuffer(8)                           # RAM-only; tiers=[{"kind": "lmdb", ...}] adds flash
>>> buf.add_data(examples=torch.rand(4, 3), labels=torch.tensor([0, 1, 0, 1]), logits=torch.rand(4, 2))
>>> inputs, labels, logits = buf.get_data(2)
>>> inputs.shape, labels.shape, logits.shape, len(buf), buf.is_empty()
(torch.Size([2, 3]), torch.Size([2]), torch.Size([2, 2]), 4, False)
>>> buf.close()

Swapping needs to know what the model made of replayed samples. Mammoth models do not tell their
buffer, so by default each ``get_data`` reports the previous draw as replayed (``observe`` without
statistics: the swap-out policy ranks those samples at random); call :meth:`CarouselBuffer.observe`
with the logits of the last draw to let CarM's policy rank them by correctness and entropy.
Indexes from ``return_index=True`` are carousel ids, not buffer positions.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..batch import Batch
from ._memory import memory_for

__all__ = ["CarouselBuffer"]

_ATTRIBUTES = ("examples", "labels", "logits", "task_labels")


class CarouselBuffer:
    """Mammoth's ``Buffer`` on a carousel memory whose EM holds ``buffer_size`` samples.

    ``tiers``: carousel ``[[tiers]]`` tables (``kind``, ``capacity``, ...; ``path`` defaults to a
    folder under ``root``) -- none gives a RAM-only reservoir buffer, like Mammoth's own.
    ``swap``: a ``[swap]`` table (default: CarM's policy and ratio 0.5, swapping from the first
    draw on: the buffer does not know where tasks begin). ``memory``: use an open memory instead
    (a ``CarouselMemory`` or a daemon's ``MemoryClient``; its fields must match what ``add_data``
    gets). ``root``: where the tiers live (default: a temporary folder, removed by :meth:`close`).
    """

    def __init__(self, buffer_size: int, device: str | torch.device = "cpu", *,
                 tiers: Sequence[Mapping[str, Any]] | None = None, swap: Mapping[str, Any] | None = None,
                 memory: Any = None, root: str | Path | None = None, seed: int = 0,
                 auto_observe: bool = True) -> None:
        if int(buffer_size) <= 0:
            raise ValueError(f"buffer_size must be positive, got {buffer_size}")
        self.buffer_size = int(buffer_size)
        self.device = device
        self.num_seen_examples = 0
        self.attributes = list(_ATTRIBUTES)
        self._tiers = [dict(t) for t in tiers or []]
        self._swap = {"start_task": 0, **(swap or {})}
        self._seed = seed
        self._auto_observe = auto_observe
        self._given = memory
        self._memory = memory
        self._owns_root = root is None
        self._root = Path(root) if root is not None else None
        self._used: tuple[str, ...] = ()
        self._last_ids: torch.Tensor | None = None  # the last draw, not yet observed
        self._seen_tasks: set[int] = set()
        self._seen_classes: set[int] = set()
        self._created: list[Path] = []  # folders this buffer made (empty() deletes them)

    # ---- Mammoth's interface -------------------------------------------------------------------
    def to(self, device: str | torch.device) -> CarouselBuffer:
        """Batches come back on ``device`` from now on (the memory itself stays in RAM / storage)."""
        self.device = device
        return self

    def __len__(self) -> int:
        return min(self.num_seen_examples, self.buffer_size)

    @property
    def used_attributes(self) -> list[str]:
        """The attributes this buffer holds (set by the first ``add_data``)."""
        return list(self._used)

    def is_empty(self) -> bool:
        return self.num_seen_examples == 0

    def add_data(self, examples: torch.Tensor, labels: torch.Tensor | None = None, logits: torch.Tensor | None = None,
                 task_labels: torch.Tensor | None = None, attention_maps: Any = None) -> None:
        """Add samples; the memory's admission (reservoir) decides which enter the EM, and with
        tiers every sample also goes to storage."""
        if attention_maps is not None:
            raise ValueError("CarouselBuffer does not store attention maps")
        given = {"examples": examples, "labels": labels, "logits": logits, "task_labels": task_labels}
        if self._memory is None or not self._used:
            self._used = tuple(a for a in _ATTRIBUTES if given[a] is not None)
            if self._memory is None:
                self._memory = self._open(examples, logits)
        unexpected = [a for a in _ATTRIBUTES if (given[a] is None) != (a not in self._used)]
        if unexpected:
            raise ValueError(f"this buffer holds {list(self._used)}; add_data got "
                             f"{[a for a in _ATTRIBUTES if given[a] is not None]}")
        x = examples.detach().cpu()
        n = x.shape[0]
        y = labels.detach().cpu().long() if labels is not None else torch.zeros(n, dtype=torch.int64)
        task = task_labels.detach().cpu().long() if task_labels is not None else 0
        extras = {"logits": logits.detach().cpu().float()} if logits is not None else {}
        self._memory.add(x, y, task, **extras)
        self.num_seen_examples += n
        self._seen_classes.update(y.tolist())
        self._seen_tasks.update(task.tolist() if isinstance(task, torch.Tensor) else [task])

    def get_data(self, size: int, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 return_index: bool = False, device: str | torch.device | None = None,
                 mask_task_out: int | None = None, cpt: int | None = None) -> tuple[torch.Tensor, ...]:
        """Up to ``size`` distinct samples from the EM: ``(examples, labels, logits, task_labels)``
        for the attributes held, with ``transform`` applied to each example; ``return_index``
        puts their ids first. ``mask_task_out`` leaves out a task (by task label, or by
        ``label // cpt`` when the buffer holds no task labels)."""
        self._require_data()
        if self._auto_observe and self._last_ids is not None:
            self._memory.observe(self._last_ids)  # the previous draw was replayed: let swaps rotate it
        filters: dict[str, Any] = {}
        if mask_task_out is not None:
            if "task_labels" in self._used:
                filters["tasks"] = sorted(t for t in self._seen_tasks if t != mask_task_out)
            elif cpt is not None:
                filters["classes"] = sorted(c for c in self._seen_classes if c // cpt != mask_task_out)
            else:
                raise ValueError("mask_task_out needs task labels in the buffer or cpt (classes per task)")
        batch = self._memory.sample(min(int(size), len(self)), **filters)
        self._last_ids = batch.ids
        return self._tuple(batch, transform, device, return_index)

    def get_all_data(self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     device: str | torch.device | None = None) -> tuple[torch.Tensor, ...]:
        """Every sample the EM holds now, in id order."""
        self._require_data()
        batch = self._memory.sample(self.buffer_size, seed=0)
        order = torch.argsort(batch.ids)
        batch = Batch(batch.ids[order], batch.x[order], batch.y[order], batch.task[order],
                      {k: v[order] for k, v in batch.extras.items()})
        return self._tuple(batch, transform, device, False)

    def observe(self, logits: torch.Tensor | None = None, loss: torch.Tensor | None = None) -> None:
        """Report what the model made of the last ``get_data`` draw (its logits or per-sample losses,
        in draw order): CarM's swap-out then ranks those samples properly."""
        if self._last_ids is None:
            raise RuntimeError("observe() refers to the last get_data() draw; there is none")
        self._memory.observe(self._last_ids, logits=None if logits is None else logits.detach().cpu(),
                             loss=None if loss is None else loss.detach().cpu())
        self._last_ids = None

    def empty(self) -> None:
        """Forget everything (Mammoth rebuilds buffers this way): the memory this buffer opened is
        closed and the stores it created are deleted; the next ``add_data`` starts a new one."""
        if self._given is not None:
            raise RuntimeError("a memory given to CarouselBuffer is not the buffer's to empty")
        self._close_memory()
        for path in self._created:
            shutil.rmtree(path, ignore_errors=True)
        self._created = []
        self.num_seen_examples = 0
        self._used = ()
        self._seen_tasks.clear()
        self._seen_classes.clear()

    # ---- carousel's side --------------------------------------------------------------------------
    @property
    def memory(self) -> Any:
        """The carousel memory behind the buffer (None before the first ``add_data``)."""
        return self._memory

    def stats(self) -> dict[str, Any]:
        return self._memory.stats() if self._memory is not None else {"added": 0}

    def close(self) -> None:
        """Close the memory this buffer opened (and remove its temporary folder); idempotent."""
        self._close_memory()
        if self._owns_root and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> CarouselBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals --------------------------------------------------------------------------------
    def _open(self, examples: torch.Tensor, logits: torch.Tensor | None) -> Any:
        if self._given is not None:
            return self._given
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="carousel-buffer-"))
        memory, self._created = memory_for(examples, self.buffer_size, self._root, self._tiers, self._swap,
                                           self._seed, {"logits": logits} if logits is not None else None)
        return memory

    def _tuple(self, batch: Any, transform, device, return_index: bool) -> tuple[torch.Tensor, ...]:
        target = self.device if device is None else device
        x = batch.x
        if transform is not None:
            x = torch.stack([transform(e) for e in x]) if len(x) else x
        out: list[torch.Tensor] = [x.to(target)]
        for name in self._used[1:]:
            out.append({"labels": batch.y, "logits": batch.extras.get("logits"),
                        "task_labels": batch.task.long()}[name].to(target))
        if return_index:
            out.insert(0, batch.ids.to(target))
        return tuple(out)

    def _require_data(self) -> None:
        if self._memory is None or not self._used:
            raise RuntimeError("the buffer is empty: add_data() first")

    def _close_memory(self) -> None:
        if self._memory is not None and self._given is None:
            self._memory.close()
            self._memory = None
        self._last_ids = None
