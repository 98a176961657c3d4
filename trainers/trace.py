"""A per-step trace of a run (``--trace-every N``): what the EM held, what was replayed, how fast
the swaps went, and -- with ``--trace-eval-every M`` -- each seen task's accuracy, between the
per-task evaluations, so the moment a run loses what it knew shows on a plot.

Every ``N`` train steps (and after every task's ``end_task``) one JSON line goes to ``trace.jsonl``
next to ``result.json``::

    {"step": 120, "task": 1, "phase": "train", "t_s": 41.2, "step_s": 0.21, "loss": 0.83,
     "replay_loss": 0.41, "replayed": {"0": 96, "1": 101, ...}, "em": {"0": 130, "1": 122, ...},
     "added": 3840, "swapped_in": 1904, "swapped_out": 1904, "swap_lag": 3, "pending_writes": 0,
     "prefetched": 12, "acc": [71.5, 93.0], "class_acc": {"0": 60.0, "1": 83.0, "2": 91.0, "3": 95.0},
     "confusion": {"0": {"1": 31, "2": 9}, "1": {"0": 17}}}

- ``step``: train steps done so far (over every task); ``phase``: ``train`` or ``end_task``.
- ``loss``, ``step_s``: mean loss and seconds per step over the steps since the last record.
- ``replay_loss``: mean cross-entropy of the replayed batches under the model that trained on them
  (before its update): near 0 once a fixed buffer is memorized.
- ``replayed``: labels of every replayed sample since the last record (class -> count).
- ``em``: the EM's class histogram now (``stats()["em_classes"]``).
- ``added`` ... ``prefetched``: the memory's cumulative counters and queue lengths, as its
  ``stats()`` gives them (absent from a memory that has none, e.g. ``--memory storage``).
- ``acc`` (every ``M`` steps and at each ``end_task`` record): class-IL accuracy (percent) of each
  task seen so far, the current one included, on a fixed subset of its test set
  (``--trace-eval-size`` samples, evenly spaced, the same at every record); ``class_acc``: the same
  per class; ``confusion``: where the misclassified samples went (true label -> predicted label ->
  count, errors only): a task at 50 % whose second class all went to an old class shows there.

The trace only observes: it draws no random numbers and changes no state, so a RAM-only run gives
the same result with it as without (a test checks this). One exception: iCaRL's ``predict``
computes class means from a memory draw, so evaluating it mid-task changes the run.
:func:`trainers.plot.trace_figure` draws ``trace.png`` from the records.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .augment import prepare
from .streams import Stream

TRACE_FILE = "trace.jsonl"
_COUNTERS = ("added", "swapped_in", "swapped_out", "swap_lag", "pending_writes", "prefetched", "evicted")


class Tracer:
    """Writes the trace records of one run; ``every``/``eval_every`` of 0 turn either part off.

    The runner calls :meth:`after_step` after every train step and :meth:`after_task` after every
    ``end_task``; the method reports its replay draws through ``method.replayed`` (a list the
    tracer sets and empties). Records go to ``path`` (one JSON line each, flushed) and are kept in
    :attr:`records`.
    """

    def __init__(self, stream: Stream, every: int, eval_every: int = 0, eval_size: int = 200,
                 path: Path | None = None, device: torch.device | None = None) -> None:
        if every < 0 or eval_every < 0 or eval_size < 1:
            raise ValueError(f"trace: every ({every}) and eval_every ({eval_every}) must be >= 0, "
                             f"eval_size ({eval_size}) >= 1")
        self.stream = stream
        self.every, self.eval_every = int(every), int(eval_every)
        self.device = device or torch.device("cpu")
        self.records: list[dict[str, Any]] = []
        # Evenly spaced test samples per task: fixed, drawn without any random number.
        self.subsets = []
        for task in stream.tasks:
            idx = np.linspace(0, len(task.test_y) - 1, min(eval_size, len(task.test_y))).round().astype(np.int64)
            self.subsets.append((task.test_x[np.unique(idx)], task.test_y[np.unique(idx)]))
        self._fh: IO[str] | None = open(path, "w", encoding="utf-8") if path is not None else None
        self._t0 = time.perf_counter()
        self._t_last = self._t0
        self._losses: list[float] = []
        self._step = 0
        self.seconds = 0.0        # spent recording, in all
        self.step_seconds = 0.0   # of which inside the train loop (the runner takes it off the train time)

    @property
    def enabled(self) -> bool:
        return bool(self.every or self.eval_every)

    def attach(self, method: Any) -> None:
        """Make ``method`` report its replay draws here (``Method.replay`` appends to the list)."""
        method.replayed = []
        method.replay_ce = []

    def after_step(self, method: Any, memory: Any, task: int, loss: float) -> None:
        """Count the step; write a record when it is due."""
        self._step += 1
        self._losses.append(loss)
        record_due = self.every and self._step % self.every == 0
        eval_due = self.eval_every and self._step % self.eval_every == 0
        if record_due or eval_due:
            t0 = time.perf_counter()
            self._record(method, memory, task, "train", bool(eval_due))
            self.step_seconds += time.perf_counter() - t0

    def after_task(self, method: Any, memory: Any, task: int) -> None:
        """A record after ``end_task`` (GCR's selection and GDumb's retraining change the EM there)."""
        self._record(method, memory, task, "end_task", bool(self.eval_every))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _record(self, method: Any, memory: Any, task: int, phase: str, evaluate: bool) -> None:
        now = time.perf_counter()
        labels = method.replayed or []
        replayed = Counter()
        for y in labels:
            replayed.update(y.tolist())
        method.replayed = []
        ce = method.replay_ce or []
        method.replay_ce = []
        rec: dict[str, Any] = {"step": self._step, "task": task, "phase": phase, "t_s": round(now - self._t0, 3),
                               "step_s": round((now - self._t_last) / len(self._losses), 4) if self._losses else None,
                               "loss": float(np.mean(self._losses)) if self._losses else None,
                               "replay_loss": float(np.mean(ce)) if ce else None,
                               "replayed": {str(k): v for k, v in sorted(replayed.items())}}
        stats = memory.stats()
        if "em_classes" in stats:
            rec["em"] = {str(k): int(v) for k, v in stats["em_classes"].items()}
        rec.update({k: stats[k] for k in _COUNTERS if k in stats})
        if evaluate:
            rec["acc"], rec["class_acc"], rec["confusion"] = self.evaluate(method, task)
        self.records.append(rec)
        if self._fh is not None:
            self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self._fh.flush()
        self._losses = []
        self._t_last = time.perf_counter()  # the record's own cost is not a step's
        self.seconds += self._t_last - now

    @torch.no_grad()
    def evaluate(self, method: Any, upto: int) -> tuple[list[float], dict[str, float], dict[str, dict[str, int]]]:
        """Class-IL accuracy (percent) of tasks ``0..upto`` on their fixed subsets, the same per class,
        and the errors as ``{true: {predicted: count}}`` (labels as strings)."""
        seen = (upto + 1) * self.stream.classes_per_task
        was_training = method.model.training
        acc: list[float] = []
        per_class: dict[str, float] = {}
        confusion: dict[str, dict[str, int]] = {}
        try:
            for xs, ys in self.subsets[:upto + 1]:
                x = prepare(torch.from_numpy(xs).to(self.device), self.stream, train=False)
                pred = method.predict(x).float()[:, :seen].argmax(1).cpu().numpy()
                acc.append(round(100.0 * float(np.mean(pred == ys)), 2))
                for c in np.unique(ys):
                    mine = pred[ys == c]
                    per_class[str(c)] = round(100.0 * float(np.mean(mine == c)), 2)
                    wrong, counts = np.unique(mine[mine != c], return_counts=True)
                    if wrong.size:
                        confusion[str(c)] = {str(w): int(k) for w, k in zip(wrong, counts)}
        finally:
            method.model.train(was_training)
        return acc, per_class, confusion


def read_trace(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``trace.jsonl`` (a torn last line, from a run killed mid-write, is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
