"""``CarouselBuffer``: Mammoth's rehearsal ``Buffer`` on a carousel memory.

Mammoth's rehearsal models (ER, DER++, X-DER, iCaRL, GDumb, TwF, ...) talk to ``utils/buffer.py``'s
``Buffer``; :class:`CarouselBuffer` answers the same calls, so a model runs unchanged with
``self.buffer = CarouselBuffer(self.args.buffer_size, self.device, tiers=[...])`` and replays from
an EM of ``buffer_size`` samples that CarM keeps rotating with every sample on flash or disk.

>>> import torch
>>> buf = CarouselBuffer(8)                           # RAM-only; tiers=[{"kind": "lmdb", ...}] adds flash
>>> buf.add_data(examples=torch.rand(4, 3), labels=torch.tensor([0, 1, 0, 1]), logits=torch.rand(4, 2))
>>> inputs, labels, logits = buf.get_data(2)
>>> inputs.shape, labels.shape, logits.shape, len(buf), buf.is_empty()
(torch.Size([2, 3]), torch.Size([2]), torch.Size([2, 2]), 4, False)
>>> buf.logits[0] = 0.0                               # a live view of the EM, as Mammoth's tensors are
>>> float(buf.get_data_by_index([0])[2].abs().sum())
0.0
>>> buf.close()

What is supported, as Mammoth's ``Buffer`` does it:

- ``add_data(examples, labels, logits, task_labels, attention_maps, true_labels,
  sample_selection_scores)``: the fields of the first call are the buffer's (``used_attributes``);
  a later call may give fewer (the others are stored as zeros -- Mammoth leaves the slot's old
  values there) but not new ones (the EM's columns are allocated by then: ``empty()`` first).
- ``get_data`` with ``transform``, ``return_index``, ``device``, ``mask_task_out``/``cpt``,
  ``return_not_aug``/``not_aug_transform``, ``force_indexes``; ``get_data_by_index``,
  ``get_balanced_data``, ``get_all_data`` (in position order), ``__getitem__``, iteration,
  ``get_dataloader``, ``is_full``, ``is_empty``, ``len``, ``empty``, ``to``, a settable
  ``buffer_size`` (a new size takes effect at the next ``empty()``, as Mammoth's ``fill_buffer``
  uses it), ``n_tasks=`` / ``dataset=`` constructor arguments.
- Transforms are applied Mammoth's way: a batched ``nn.Module`` (a Kornia augmentation) once on
  the whole batch, any other callable (a torchvision pipeline) per sample (``_mammoth_transforms``).
- ``examples``, ``labels``, ``logits``, ``task_labels``, ``true_labels`` are live views of the EM
  (``buffer_size`` rows, one per buffer position = EM slot): models read and write them in
  place, and the indexes ``get_data(return_index=True)`` returns are those positions. Once
  positions are handed out, the memory keeps in-place writes (``keep_em_writes``: a sample that
  leaves the EM takes its row, as changed, to storage) and each later draw waits for the swaps
  asked before it, so no position changes sample between a draw and the model's writes to it;
  the draws of a step are reported to the swap engine at its end (the next ``add_data``, or
  :meth:`CarouselBuffer.end_step`, which :meth:`CarouselBuffer.attach` calls after each
  ``meta_observe``). Labels changed in place are not seen by class filters and swap-in choices.
  The views are CPU tensors whatever ``device`` is (the EM is in RAM): Mammoth's ``Buffer``
  defaults to ``"cpu"`` and most models keep it there; a model that builds its buffer on an
  accelerator and mixes the views with device tensors must move them.
- ``serialize()`` and Mammoth's loading of a serialized buffer (``--savecheck`` with
  ``--save_checkpoint_mode safe``: ``load_buffer`` sets each field and ``num_seen_examples``);
  ``copy.deepcopy`` and pickling give a RAM-only buffer holding a copy of the EM (``old_pickle``
  checkpoints pickle it so; Mammoth's ``load_buffer`` accepts only its own ``Buffer`` objects
  there, so load carousel checkpoints from ``safe`` ones). The stored samples are not copied.
- ``sample_selection_strategy``: ``reservoir`` (carousel's reservoir admission), ``balancoir``
  (carousel's ``BalancoirAdmission``), and ``lars``, ``labrs``, ``abs`` (per-position scores from
  ``sample_selection_fn.update`` and ``add_data(sample_selection_scores=)`` in an EM column that
  travels with its samples through swaps; ``_mammoth_selection``), all with or without tiers.
  ``unlimited`` grows the buffer without bound, against a fixed RAM budget: it raises
  ``ValueError`` saying why (:data:`UNSUPPORTED_STRATEGIES`). ``attention_maps`` (TwF) are kept per position in RAM, in a
  RAM-only buffer only: with tiers, swaps would pair a position's maps with another sample.

Task boundaries. CarM does not swap during the first task (``[swap] start_task = 1``, the
default here). The buffer learns the task from ``task_labels`` when a model gives them, from the
model when :meth:`CarouselBuffer.attach` hooked its ``meta_begin_task``, from
:meth:`CarouselBuffer.begin_task` calls, and otherwise guesses it: a batch made only of classes
never seen before starts a new task (class-incremental streams; a domain-incremental one needs
one of the others). The RAM-only comparison at the same budget is the same model with Mammoth's
own buffer at the same ``--buffer_size`` (or ``CarouselBuffer`` without ``tiers``): both hold
``buffer_size`` samples in RAM, and only the tiered one swaps.

Swapping needs to know what the model made of replayed samples. Mammoth models do not tell their
buffer, so each draw is reported as replayed (``observe`` without statistics: the swap-out policy
ranks those samples at random); :meth:`CarouselBuffer.observe` with the logits of the last draw
lets CarM's policy rank them by correctness and entropy.

Leaks. Mammoth never calls ``close()``: the memory and the temporary folder of a buffer given no
``root`` are released when it is garbage-collected or at interpreter exit (``_mammoth_owned``);
a ``root`` the user gave stays.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..batch import Batch
from ._mammoth_owned import Owned
from ._mammoth_selection import (
    SCORE_FIELD,
    SCORE_STRATEGIES,
    LabelOnlySelection,
    ScoreAwareAdmission,
    ScoreSelection,
)
from ._mammoth_transforms import apply_transform
from ._memory import memory_for

__all__ = ["UNSUPPORTED_STRATEGIES", "CarouselBuffer"]

_FIELDS = ("examples", "labels", "logits", "task_labels", "true_labels")
_COLUMN = {"examples": "x", "labels": "y", "logits": "logits", "task_labels": "task_labels",
           "true_labels": "true_labels"}
# The config's admission policy per strategy (the loss-aware ones replace it once the memory is open).
_ADMISSION = {"reservoir": "reservoir", "balancoir": "balancoir", "lars": "reservoir", "labrs": "reservoir",
              "abs": "reservoir"}
#: Mammoth's strategies this buffer refuses, and why.
UNSUPPORTED_STRATEGIES = {
    "unlimited": "it grows the buffer with every sample, and the EM is a fixed RAM budget allocated once; "
                 "give the stream to storage tiers instead (every sample is stored there)",
}
Transform = Callable[[torch.Tensor], torch.Tensor]
_MAX_TASK = 32767  # the largest task a carousel memory records (an int16 column)


class CarouselBuffer:
    """Mammoth's ``Buffer`` on a carousel memory whose EM holds ``buffer_size`` samples.

    Args:
        buffer_size: EM slots (the buffer's positions).
        device: where batches come back (the EM itself stays in RAM, storage behind it).
        sample_selection_strategy: ``"reservoir"``, ``"balancoir"``, ``"lars"``, ``"labrs"`` or
            ``"abs"``; ``"unlimited"`` raises ``ValueError`` (:data:`UNSUPPORTED_STRATEGIES`).
        n_tasks: accepted for Mammoth's ring-buffer models; unused.
        dataset: Mammoth's dataset, for ``abs`` (its ``get_offsets()`` tells the past classes).
        tiers: carousel ``[[tiers]]`` tables (``kind``, ``capacity``, ...; ``path`` defaults to a
            folder under ``root``) -- none gives a RAM-only buffer, like Mammoth's own.
        swap: a ``[swap]`` table (default: CarM's policy, ratio 0.5, from the second task on).
        memory: use an open memory instead (a ``CarouselMemory``, or a daemon's ``MemoryClient``:
            then no positions, views or attention maps); its fields must match ``add_data``'s.
        root: where the tiers live (default: a temporary folder, removed with the buffer).
        seed: the memory's seed (and the buffer's own draws').

    Raises:
        ValueError: a non-positive ``buffer_size``, an unsupported strategy, ``abs`` without
            ``dataset``, or a loss-aware strategy on a ``memory`` given.
    """

    def __init__(self, buffer_size: int, device: str | torch.device = "cpu",
                 sample_selection_strategy: str = "reservoir", *, n_tasks: int | None = None, dataset: Any = None,
                 tiers: Sequence[Mapping[str, Any]] | None = None, swap: Mapping[str, Any] | None = None,
                 memory: Any = None, root: str | Path | None = None, seed: int = 0) -> None:
        if int(buffer_size) <= 0:
            raise ValueError(f"buffer_size must be positive, got {buffer_size}")
        strategy = str(sample_selection_strategy).lower()
        if strategy in UNSUPPORTED_STRATEGIES:
            raise ValueError(f"CarouselBuffer does not support sample_selection_strategy={strategy!r}: "
                             f"{UNSUPPORTED_STRATEGIES[strategy]}. Use 'reservoir' or 'balancoir'.")
        if strategy not in _ADMISSION:
            raise ValueError(f"unknown sample_selection_strategy {strategy!r}; supported: {sorted(_ADMISSION)}")
        if strategy in SCORE_STRATEGIES and memory is not None:
            raise ValueError(f"sample_selection_strategy={strategy!r} keeps per-slot scores in the buffer's own "
                             "memory (an EM column and an admission policy that reads it): give no memory=")
        if strategy == "abs" and dataset is None:
            raise ValueError("sample_selection_strategy='abs' needs dataset= (its get_offsets() tells past classes)")
        self.sample_selection_strategy = strategy
        self._dataset = dataset
        # Models call its update() after each step, whatever the strategy (_mammoth_selection).
        self.sample_selection_fn = (ScoreSelection(strategy, lambda: self._pool().tensors[SCORE_FIELD])
                                    if strategy in SCORE_STRATEGIES else LabelOnlySelection(strategy))
        self._buffer_size = int(buffer_size)
        self.device = device
        self.n_tasks = n_tasks
        self.num_seen_examples = 0
        self.attributes = list(_FIELDS)
        self.attention_maps: list[Any] = [None] * self._buffer_size
        self._tiers = [dict(t) for t in tiers or []]
        self._swap = {"start_task": 1, **(swap or {})}
        self._seed = seed
        self._rng = np.random.default_rng([seed, 7])
        self._given = memory
        self._root = Path(root) if root is not None else None
        self._owned = Owned()
        self._finalizer = self._owned.watch(self)
        self._used: tuple[str, ...] = ()
        self._staged: dict[str, torch.Tensor] = {}  # fields set before any add_data (a loaded checkpoint)
        self._draws: list[torch.Tensor] = []  # ids drawn and not yet reported to the memory
        self._last_ids: torch.Tensor | None = None  # the last draw, for observe()
        self._positions = False  # positions (views, indexes) handed out
        self._unsettled = False  # swaps or admissions asked for since positions were last made stable
        self._task = 0
        self._task_classes: set[int] = set()  # classes of the current task (task guessing)
        self._seen_classes: set[int] = set()
        self._seen_tasks: set[int] = set()
        self._dl_transform: Transform | None = None
        self._it_index = 0

    # ---- sizes and state ------------------------------------------------------------------------
    @property
    def buffer_size(self) -> int:
        """The buffer's size; set, it takes effect at once before the first ``add_data`` and at
        the next :meth:`empty` after (the EM is allocated once)."""
        return self._buffer_size

    @buffer_size.setter
    def buffer_size(self, value: int) -> None:
        if int(value) <= 0:
            raise ValueError(f"buffer_size must be positive, got {value}")
        self._buffer_size = int(value)
        if self.memory is None:
            self.attention_maps = [None] * self._buffer_size

    @property
    def memory(self) -> Any:
        """The carousel memory behind the buffer (None before the first ``add_data``)."""
        return self._given if self._given is not None else self._owned.memory

    @property
    def used_attributes(self) -> list[str]:
        """The fields this buffer holds (set by the first ``add_data``)."""
        self._load_staged()
        return list(self._used)

    def _em_size(self) -> int:
        memory = self.memory
        if memory is None:
            return self._buffer_size
        pool = getattr(memory, "pool", None)
        return pool.size if pool is not None else self._buffer_size

    def __len__(self) -> int:
        self._load_staged()
        return min(self.num_seen_examples, self._em_size())

    def is_empty(self) -> bool:
        return len(self) == 0

    def is_full(self) -> bool:
        """Whether as many samples were seen as the buffer holds."""
        return self.num_seen_examples >= self._buffer_size

    def to(self, device: str | torch.device) -> CarouselBuffer:
        """Batches come back on ``device`` from now on (the memory itself stays in RAM / storage)."""
        self.device = device
        return self

    # ---- task boundaries ------------------------------------------------------------------------
    def begin_task(self, task: int) -> None:
        """Samples added from now on belong to ``task`` (swapping starts at ``[swap] start_task``)."""
        self.end_step()
        self._task = int(task)
        self._task_classes = set()

    def end_step(self) -> None:
        """The model's step is over: report its draws as replayed (the swap engine may now
        refill their positions)."""
        self._report_draws()

    def attach(self, model: Any) -> Any:
        """Hook a Mammoth model's ``meta_begin_task`` (the buffer learns the task index from
        ``model.current_task``) and ``meta_observe`` (each training step ends with
        :meth:`end_step`); returns ``model``. The hooks are set on the instance only."""
        begin, observe = model.meta_begin_task, model.meta_observe

        def meta_begin_task(*args: Any, **kwargs: Any) -> Any:
            out = begin(*args, **kwargs)
            self.begin_task(int(model.current_task))
            return out

        def meta_observe(*args: Any, **kwargs: Any) -> Any:
            try:
                return observe(*args, **kwargs)
            finally:
                self.end_step()

        object.__setattr__(model, "meta_begin_task", meta_begin_task)  # past nn.Module's __setattr__
        object.__setattr__(model, "meta_observe", meta_observe)
        return model

    def _task_of(self, labels: torch.Tensor | None) -> int:
        """The task of an ``add_data`` without task labels: the current one, or a new one when the
        batch holds only classes never seen (a class-incremental stream's next task)."""
        if labels is not None and labels.numel():
            classes = set(labels.tolist())
            if self._task_classes and not classes & self._seen_classes:
                self._task += 1
                self._task_classes = set()
            self._task_classes |= classes
        return self._task

    # ---- add --------------------------------------------------------------------------------------
    def add_data(self, examples: torch.Tensor, labels: torch.Tensor | None = None, logits: torch.Tensor | None = None,
                 task_labels: torch.Tensor | None = None, attention_maps: Sequence[torch.Tensor] | None = None,
                 true_labels: torch.Tensor | None = None,
                 sample_selection_scores: torch.Tensor | None = None) -> None:
        """Add samples; the admission policy decides which enter the EM (with tiers every sample
        also goes to storage). ``sample_selection_scores`` are the new samples' scores for a
        loss-aware strategy (0 when not given); reservoir and balancoir ignore them, as Mammoth's do.

        Raises:
            ValueError: a field the buffer was not made with, or attention maps with tiers or a
                daemon's memory.
        """
        self._load_staged()
        given = {"examples": examples, "labels": labels, "logits": logits, "task_labels": task_labels,
                 "true_labels": true_labels}
        if not self._used:
            self._used = tuple(a for a in _FIELDS if given[a] is not None)
            if self.memory is None:
                self._open(given)
        new = [a for a in _FIELDS if given[a] is not None and a not in self._used]
        if new:
            raise ValueError(f"this buffer holds {list(self._used)} (the fields of its first add_data); "
                             f"add_data got {new} too: empty() the buffer to start with other fields")
        if attention_maps is not None and (not hasattr(self.memory, "pool") or self.memory.tiers):
            raise ValueError("attention maps are kept per buffer position in RAM: a tiered buffer's swaps would "
                             "pair them with other samples, and a daemon's memory has no positions here")
        self._report_draws()  # a Mammoth step ends with add_data: its draws were replayed
        n = examples.shape[0]
        y = labels.detach().cpu().long() if labels is not None else torch.zeros(n, dtype=torch.int64)
        if task_labels is not None:
            # The task_labels column keeps the model's values as given; the memory's own task (its
            # swap gate, in [0, 32767]) clamps them: BiC labels the first task's samples -1.
            task = task_labels.detach().cpu().long().clamp(0, _MAX_TASK)
            self._task = max(self._task, int(task.max())) if n else self._task
        else:
            task = self._task_of(y if labels is not None else None)
        extras = {}
        fields = self._fields()
        if SCORE_FIELD in fields:
            extras[SCORE_FIELD] = (torch.zeros(n) if sample_selection_scores is None
                                   else sample_selection_scores.detach().cpu().float().reshape(n))
        missing = [a for a in ("logits", "true_labels") if a in self._used and a not in fields]
        if missing:
            raise ValueError(f"the memory given to this buffer has no field for {missing}; add them to its extras")
        for name in ("logits", "task_labels", "true_labels"):
            if name in self._used and name in fields:
                value = given[name]
                if value is None:  # a subset of the fields: the others stored as zeros
                    shape, dtype = fields[name]
                    value = torch.zeros((n, *shape), dtype=torch.float32 if dtype.startswith("float") else torch.int64)
                extras[name] = (value.detach().cpu().float() if name == "logits" else value.detach().cpu().long())
        ids = self.memory.add(examples.detach().cpu(), y, task, **extras)
        self.num_seen_examples += n
        self._unsettled = True
        self._seen_classes.update(y.tolist())
        self._seen_tasks.update(task.tolist() if isinstance(task, torch.Tensor) else [task])
        if attention_maps is not None:  # RAM-only: admitted synchronously, slots known now
            slots = self.memory.catalog.slot[ids.numpy()]
            for i, slot in enumerate(slots.tolist()):
                if slot >= 0:
                    self.attention_maps[slot] = [at[i].byte().cpu() for at in attention_maps]

    # ---- views ------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> torch.Tensor:
        # Only for names not found otherwise: the fields, absent (AttributeError) when not held,
        # so Mammoth's hasattr(buffer, "logits") reads as it does on its own buffer.
        if name in _COLUMN and not name.startswith("_"):
            self._load_staged()
            if name in self._used:
                return self._view(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _COLUMN:
            self._set_field(name, value)
        else:
            object.__setattr__(self, name, value)

    def _set_field(self, name: str, value: torch.Tensor) -> None:
        """``buffer.logits = t``: before any ``add_data`` (a checkpoint being loaded), staged and
        added on first use, row ``i`` at position ``i``; after, copied into the EM's rows."""
        if self.memory is None and not self._used:
            self._staged[name] = value.detach().cpu()
            return
        self._load_staged()
        view = self._view(name)
        view[: len(value)] = value.to(view.dtype).cpu()

    def _view(self, name: str) -> torch.Tensor:
        """The EM column of field ``name``: positions handed out from now on."""
        self._stable_positions()
        tensors = self._pool().tensors
        # A memory given without a task_labels field: its own task column (int16) stands in.
        return tensors[_COLUMN[name] if _COLUMN[name] in tensors or name != "task_labels" else "task"]

    def _pool(self) -> Any:
        pool = getattr(self.memory, "pool", None)
        if pool is None:
            raise RuntimeError("buffer positions (the field views, return_index, force_indexes, get_data_by_index) "
                               "need an in-process memory: a daemon's memory keeps its EM in the daemon")
        return pool

    def _stable_positions(self) -> None:
        """Make positions safe to hand out: the memory keeps in-place writes from now on, and
        every admission and swap asked for so far is carried out (none moves a sample under the
        model until the step's draws are reported)."""
        memory = self.memory
        self._pool()
        if not self._positions:
            memory.keep_em_writes()
            self._positions = True
        if self._unsettled:
            memory.wait_admitted()
            engine = getattr(memory, "_engine", None)
            if engine is not None:
                engine.wait_idle()
            self._unsettled = False

    # ---- draws ------------------------------------------------------------------------------------
    def get_data(self, size: int, transform: Transform | None = None, return_index: bool = False,
                 device: str | torch.device | None = None, mask_task_out: int | None = None, cpt: int | None = None,
                 return_not_aug: bool = False, not_aug_transform: Transform | None = None,
                 force_indexes: Any = None) -> tuple[torch.Tensor, ...]:
        """Up to ``size`` distinct samples: ``(indexes?, not_aug?, examples, labels, logits,
        task_labels, true_labels)`` for the fields held, Mammoth's order. ``mask_task_out``
        leaves a task out (by ``task_labels``, else by ``label // cpt``); ``force_indexes``
        reads those positions; ``return_index`` puts the positions first.

        Raises:
            RuntimeError: nothing added yet; positions asked of a daemon's memory.
            ValueError: ``mask_task_out`` without task labels or ``cpt``.
        """
        self._require_data()
        if mask_task_out is not None and "task_labels" not in self._used and cpt is None:
            raise ValueError("mask_task_out needs task labels in the buffer or cpt (classes per task)")
        positions = return_index or force_indexes is not None
        if not self._positions:
            self._report_draws()  # no positions out: the draws so far were replayed
        if positions or (self._positions and hasattr(self.memory, "pool")):
            self._stable_positions()
        size = min(int(size), len(self))
        if force_indexes is not None:
            slots = np.asarray(force_indexes, dtype=np.int64).reshape(-1)
            self._check_positions(slots)
            batch = self._pool().gather(slots, self._extras())
        elif hasattr(self.memory, "pool") and (positions or mask_task_out is not None):
            slots, batch = self._pick(size, mask_task_out, cpt)
        else:
            slots, batch = None, self._sample(size, mask_task_out, cpt)
        self._draws.append(batch.ids)
        self._last_ids = batch.ids
        out = self._tuple(batch, transform, device, return_not_aug, not_aug_transform)
        if return_index:
            out = (torch.from_numpy(np.asarray(slots, dtype=np.int64)).to(self._target(device)), *out)
        return out

    def get_data_by_index(self, indexes: Any, transform: Transform | None = None,
                          device: str | torch.device | None = None) -> tuple[torch.Tensor, ...]:
        """The samples at buffer positions ``indexes``: ``(examples, labels, ...)``."""
        self._require_data()
        self._stable_positions()
        slots = np.asarray(indexes.cpu() if isinstance(indexes, torch.Tensor) else indexes, dtype=np.int64)
        self._check_positions(slots.reshape(-1))
        batch = self._pool().gather(slots.reshape(-1), self._extras())
        return self._tuple(batch, transform, device)

    def get_balanced_data(self, size: int, transform: Transform | None = None,
                          n_classes: int = -1) -> tuple[torch.Tensor, ...]:
        """``size`` samples spread evenly over ``n_classes`` random classes (all held, with -1)
        that each hold enough of them; a plain draw when none does."""
        self._require_data()
        self.memory.wait_admitted()
        pool = self._pool()
        size = min(int(size), len(self))
        with pool.lock:
            held = np.flatnonzero(pool.slot_ids >= 0)
            labels = pool.arrays["y"][held].copy()
        classes, counts = np.unique(labels, return_counts=True)
        k = len(classes) if n_classes == -1 else min(int(n_classes), len(classes))
        while k > 0:
            per = np.full(k, size // k)
            per[: size % k] += 1
            eligible = classes[counts >= per[0]]
            if len(eligible) >= k:
                break
            k = len(eligible)
        if k == 0:
            return self.get_data(size, transform=transform)
        chosen = self._rng.permutation(eligible)[:k]
        slots = np.concatenate([self._rng.choice(held[labels == c], int(m), replace=False)
                                for c, m in zip(chosen.tolist(), per.tolist())])
        batch = pool.gather(slots, self._extras())
        self._draws.append(batch.ids)  # replayed like any draw (CaSpeR trains on it)
        return self._tuple(batch, transform, None)

    def get_all_data(self, transform: Transform | None = None,
                     device: str | torch.device | None = None) -> tuple[torch.Tensor, ...]:
        """Every sample the EM holds, in position order (a daemon's memory: in id order)."""
        self._require_data()
        if hasattr(self.memory, "pool"):
            self.memory.wait_admitted()
            pool = self._pool()
            with pool.lock:
                batch = pool.gather_locked(np.flatnonzero(pool.slot_ids >= 0), self._extras())
        else:
            batch = self.memory.sample(self._em_size(), seed=0)
            order = torch.argsort(batch.ids)
            batch = Batch(batch.ids[order], batch.x[order], batch.y[order], batch.task[order],
                          {k: v[order] for k, v in batch.extras.items()})
        return self._tuple(batch, transform, device)

    def __getitem__(self, index: int, transform: Transform | None = None) -> list[torch.Tensor]:
        """The sample at position ``index`` as a list of fields (``get_dataloader``'s items)."""
        data = self.get_data_by_index([int(index)], transform=transform or self._dl_transform)
        return [d.squeeze(0) for d in data]

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        """Every held position in order, as :meth:`__getitem__` gives it."""
        for index in range(len(self)):
            yield self[index]

    def get_dataloader(self, args: Any, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                       transform: Transform | None = None, sampler: Any = None) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` over the held positions (in this process: ``num_workers=0``, as
        Mammoth's), seeded by ``args.seed`` when it has one."""
        self._require_data()
        self._dl_transform = transform
        seed = getattr(args, "seed", None)
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        return torch.utils.data.DataLoader(self, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                           drop_last=drop_last, sampler=sampler, num_workers=0, generator=generator)

    # ---- carousel's side --------------------------------------------------------------------------
    def observe(self, logits: torch.Tensor | None = None, loss: torch.Tensor | None = None) -> None:
        """Report what the model made of the last ``get_data`` draw (its logits or per-sample
        losses, in draw order): CarM's swap-out then ranks those samples properly."""
        if self._last_ids is None:
            raise RuntimeError("observe() refers to the last get_data() draw; there is none")
        ids, self._last_ids = self._last_ids, None
        self._draws = [d for d in self._draws if d is not ids]
        self.memory.observe(ids, logits=None if logits is None else logits.detach().cpu(),
                            loss=None if loss is None else loss.detach().cpu())
        self._unsettled = True

    def stats(self) -> dict[str, Any]:
        return self.memory.stats() if self.memory is not None else {"added": 0}

    def serialize(self, out_device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Each field held, every position (``buffer_size`` rows), copied: what Mammoth's safe
        checkpoints save and its ``load_buffer`` sets back one field at a time."""
        self._require_data()
        self.memory.wait_admitted()
        pool = self._pool()
        with pool.lock:
            return {name: pool.tensors[_COLUMN[name]].clone().to(out_device) for name in self._used}

    def empty(self) -> None:
        """Forget everything (Mammoth rebuilds buffers this way): the memory this buffer opened is
        closed and the stores it created are deleted; the next ``add_data`` starts a new one
        (with the current ``buffer_size``). The task count goes on."""
        if self._given is not None:
            raise RuntimeError("a memory given to CarouselBuffer is not the buffer's to empty")
        self._owned.delete_created()
        self.num_seen_examples = 0
        self._used = ()
        self._staged = {}
        self._draws, self._last_ids = [], None
        self._positions = self._unsettled = False
        self.attention_maps = [None] * self._buffer_size

    def close(self) -> None:
        """Close the memory this buffer opened (and remove its temporary folder); idempotent."""
        self._draws, self._last_ids = [], None
        self._finalizer()
        self._finalizer = self._owned.watch(self)  # a buffer used again after close() is released again

    def __enter__(self) -> CarouselBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy``, pickle): the EM's rows and the counters; RAM-only."""
        state = {"buffer_size": self._buffer_size, "device": str(self.device), "seed": self._seed,
                 "strategy": self.sample_selection_strategy, "n_tasks": self.n_tasks,
                 "num_seen_examples": self.num_seen_examples, "task": self._task,
                 "fields": self.serialize() if self._used else dict(self._staged),
                 "attention_maps": copy.deepcopy(self.attention_maps)}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["buffer_size"], state["device"], state["strategy"], n_tasks=state["n_tasks"],
                      seed=state["seed"])
        for name in _FIELDS:
            if name in state["fields"]:
                self._staged[name] = state["fields"][name]
        self.num_seen_examples = state["num_seen_examples"]
        self._task = state["task"]
        self.attention_maps = state["attention_maps"]

    # ---- internals --------------------------------------------------------------------------------
    def _open(self, given: Mapping[str, torch.Tensor | None]) -> None:
        root = self._root or self._owned.temp_root  # after empty(): the same temporary folder again
        if root is None:
            root = self._owned.temp_root = Path(tempfile.mkdtemp(prefix="carousel-buffer-"))
        extras = {name: given[name] for name in ("logits", "task_labels", "true_labels") if given[name] is not None}
        scored = self.sample_selection_strategy in SCORE_STRATEGIES
        if scored:
            extras[SCORE_FIELD] = torch.zeros(1)
        self._owned.memory, self._owned.created = memory_for(
            given["examples"], self._buffer_size, root, self._tiers, self._swap, self._seed, extras,
            _ADMISSION[self.sample_selection_strategy])
        self.attention_maps = [None] * self._buffer_size
        if scored:
            memory = self._owned.memory
            column = memory.pool.arrays[SCORE_FIELD]
            dataset = self._dataset  # not self: the memory's threads keep the policy, the buffer must stay collectable
            past = (lambda: int(dataset.get_offsets()[0])) if dataset is not None else None
            memory.set_admission(ScoreAwareAdmission(self.sample_selection_strategy, lambda: column, past))
            memory.keep_em_writes()  # update() writes scores in place: they leave the EM with their samples

    def _load_staged(self) -> None:
        """Add the rows of a loaded checkpoint (fields set before any ``add_data``) in order:
        into an empty EM, row ``i`` takes position ``i``."""
        if not self._staged or "examples" not in self._staged:
            return
        staged, self._staged = self._staged, {}
        seen = self.num_seen_examples
        self.add_data(**staged)
        self.num_seen_examples = max(seen, self.num_seen_examples)

    def _fields(self) -> dict[str, tuple[tuple[int, ...], str]]:
        memory = self.memory
        fields = getattr(memory, "fields", None) or getattr(memory, "schema", None) or {}
        return {k: (tuple(v[0]), str(v[1])) for k, v in dict(fields).items()}

    def _extras(self) -> tuple[str, ...]:
        fields = self._fields()
        return tuple(n for n in ("logits", "task_labels", "true_labels") if n in self._used and n in fields)

    def _sample(self, size: int, mask_task_out: int | None, cpt: int | None) -> Batch:
        """A draw through the memory's ``sample`` (no positions needed)."""
        filters: dict[str, Any] = {}
        if mask_task_out is not None:
            if "task_labels" in self._used:
                filters["tasks"] = sorted(t for t in self._seen_tasks if t != mask_task_out)
            else:
                filters["classes"] = sorted(c for c in self._seen_classes if c // cpt != mask_task_out)
        return self.memory.sample(size, **filters)

    def _pick(self, size: int, mask_task_out: int | None, cpt: int | None) -> tuple[np.ndarray, Batch]:
        """Random held positions (leaving ``mask_task_out``'s out) and their samples, in one lock."""
        pool = self._pool()
        extras = self._extras()
        with pool.lock:
            ok = pool.slot_ids >= 0
            if mask_task_out is not None:
                if "task_labels" in extras:
                    ok &= pool.arrays["task_labels"] != mask_task_out
                elif "task_labels" in self._used:
                    ok &= pool.slot_tasks != mask_task_out
                else:
                    ok &= pool.arrays["y"] // cpt != mask_task_out
            held = np.flatnonzero(ok)
            slots = self._rng.choice(held, min(size, held.size), replace=False)
            return slots, pool.gather_locked(slots, extras)

    def _check_positions(self, slots: np.ndarray) -> None:
        pool = self._pool()
        if slots.size and (slots.min() < 0 or slots.max() >= pool.size or (pool.slot_ids[slots] < 0).any()):
            raise IndexError(f"buffer positions {slots[:8].tolist()}: the buffer holds positions 0..{len(self) - 1}")

    def _target(self, device: str | torch.device | None) -> str | torch.device:
        return self.device if device is None else device

    def _tuple(self, batch: Batch, transform: Transform | None, device: str | torch.device | None,
               return_not_aug: bool = False, not_aug_transform: Transform | None = None) -> tuple[torch.Tensor, ...]:
        target = self._target(device)
        x = batch.x.to(self.device)  # transforms run where Mammoth's buffer keeps its examples
        out: list[torch.Tensor] = []
        if return_not_aug:
            out.append(apply_transform(x, not_aug_transform).to(target))
        out.append(apply_transform(x, transform).to(target))
        for name in self._used[1:]:
            if name == "labels":
                out.append(batch.y.to(target))
            elif name in batch.extras:
                out.append(batch.extras[name].to(target))
            elif name == "task_labels":  # a daemon's memory without that field: its task column
                out.append(batch.task.long().to(target))
        return tuple(out)

    def _report_draws(self) -> None:
        """Report every draw not reported yet as replayed (one ``observe``), so the swap engine
        may refill their positions."""
        if not self._draws:
            return
        draws, self._draws = self._draws, []
        # numpy, not torch: no torch op on the trainer's thread for carousel's bookkeeping (docs/design.md)
        ids = np.unique(np.concatenate([np.asarray(d) for d in draws]))
        if ids.size and self.memory is not None:
            self.memory.observe(ids)
            self._unsettled = True

    def _require_data(self) -> None:
        self._load_staged()
        if self.memory is None or not self._used:
            raise RuntimeError("the buffer is empty: add_data() first")
