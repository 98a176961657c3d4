"""``python -m benchmarks.starvation``: does CPU or I/O starvation make carousel-mode runs collapse?

    python -m benchmarks.starvation --cells derpp-carousel:12,er-carousel:10 --conditions quiet,loaded
    python -m benchmarks.starvation --cells derpp-ram:12,er-ram:10 --conditions quiet
    python -m benchmarks.starvation --table-only              # rebuild the table from the runs on disk

Issue 20 saw carousel runs lose most of what they knew mid-training (the task just trained ending
near 50 % class-IL), on loaded machines. This script runs *cells* -- a method and memory mode as
one of those runs had them -- under *conditions*:

- ``quiet``: nothing started beside the run (the machine may still be shared: the table gives the
  load average at the start and during the run);
- ``loaded``: one CPU hog per core and an I/O hog fsyncing a scratch file on the tiers' file system
  (:mod:`benchmarks.hogs`), started before the run and stopped after it; ``cpu`` and ``io``: one kind only.

Every run is ``python -m trainers run`` in its own process (the command is in ``run.json``), with
the trace on (``trace.jsonl``, ``trace.png``: the EM's class histogram, the replayed classes, the
swap counters and per-task accuracy every few steps) and ``CAROUSEL_VERIFY=1`` in its environment
(the memory's integrity mode, where the carousel in use has one; lines naming ``IntegrityError`` in
the run's log and its daemon's log are counted). Runs go to ``OUT/CELL-sSEED-CONDITION-rREPEAT/``;
one that already finished (``run.json`` there) is skipped, so an interrupted round resumes and
several invocations can fill one folder. The table covers every run in ``OUT``: ``table.md`` and
``starvation.json``.

A run **collapses** when a task's class-IL accuracy right after it was trained is below 60 %
(``--just-trained-below``): the signature the issue's runs share (the task just trained near 50 %).
Drops of one task by more than 30 points while the next task trains (``--drop-above``) are listed
beside it, not counted as a collapse: on Split-FashionMNIST RAM-only runs have them too (similar
classes in different tasks: sneaker / sandal / ankle boot, T-shirt / pullover / coat / shirt). The
trace adds what the per-task matrix cannot show: the lowest accuracy any old task had at any traced
step (mid-task dips: the "stability gap"), the largest fall between two traced steps, the fewest
samples the EM held of an old class, the worst class at a task's end and where its samples went.

Why here: a benchmark is a script in ``benchmarks/`` with its own command that measures and asserts
nothing (STYLE.md); it drives the trainers through their CLI like a user would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .hogs import Hogs

ROOT = Path(__file__).resolve().parent.parent

# Issue 20's DER++ / ER setting: Split-FashionMNIST, EM 500, 1,000 training samples per class, 1 epoch,
# one torch thread, default swap settings.
# The issue's runs had a constant learning rate (the trainers' default then; cosine since): pinned here.
_FASHION = ["--benchmark", "split-fashion-mnist", "--em-size", "500", "--limit-per-class", "1000",
            "--epochs", "1", "--threads", "1", "--lr-schedule", "constant"]
# The quick start's demo (``python -m trainers demo``): ER, EM 200, 1,000 per class, 1,000 test samples
# per task, torch's default threads.
_DEMO = ["--benchmark", "split-fashion-mnist", "--method", "er", "--em-size", "200", "--limit-per-class", "1000",
         "--arch", "reduced-resnet18", "--eval-limit", "1000", "--lr-schedule", "constant"]
# README's GCR comparison: every training sample, EM 200, coreset memory kind, torch's default threads.
_GCR = ["--benchmark", "split-fashion-mnist", "--method", "gcr", "--memory-kind", "coreset", "--em-size", "200",
        "--lr-schedule", "constant"]


@dataclass(frozen=True)
class Cell:
    """One kind of run: its ``trainers run`` flags (less seed, out and trace), default seeds, and the
    RAM-only cell it is compared with (for a carousel cell)."""

    args: tuple[str, ...]
    seeds: tuple[int, ...]
    reference: str | None = None
    about: str = ""


CELLS: dict[str, Cell] = {
    "derpp-carousel": Cell((*_FASHION, "--method", "derpp", "--memory", "carousel"), (10, 11, 12), "derpp-ram",
                           "DER++, carousel (issue: seed 12 fell to 62.1 against 77.8 RAM-only)"),
    "derpp-ram": Cell((*_FASHION, "--method", "derpp", "--memory", "ram"), (10, 11, 12)),
    "er-carousel": Cell((*_FASHION, "--method", "er", "--memory", "carousel"), (10, 11, 12), "er-ram",
                        "ER, carousel (issue: seed 10 gave 78.8, then 67.5)"),
    "er-ram": Cell((*_FASHION, "--method", "er", "--memory", "ram"), (10, 11, 12)),
    # The runs swapped in the background (``--swap-mode async``, then the only mode): what a
    # swap thread managed to do depended on timing. The cells above use the trainers' default, the
    # deterministic mode (swaps at step boundaries: the same run whatever the load).
    "derpp-carousel-async": Cell((*_FASHION, "--method", "derpp", "--memory", "carousel", "--swap-mode", "async"),
                                 (10, 11, 12), "derpp-ram", "DER++, carousel, background swapping as in the issue"),
    "er-carousel-async": Cell((*_FASHION, "--method", "er", "--memory", "carousel", "--swap-mode", "async"),
                              (10, 11, 12), "er-ram", "ER, carousel, background swapping as in the issue"),
    # Swap rates: the share of each replayed batch exchanged for stored samples (default 0.5).
    **{f"{m}-carousel-ratio{r}": Cell((*_FASHION, "--method", m, "--memory", "carousel", "--swap-ratio", r),
                                     (10, 11, 12), f"{m}-ram", f"{m}, carousel, swap ratio {r}")
       for m in ("er", "derpp") for r in ("0.1", "0.25")},
    # A learning rate falling along a half cosine over each task (``--lr-schedule cosine``), in both modes.
    **{f"{m}-{mode}-cosine": Cell((*_FASHION, "--method", m, "--memory", mode, "--lr-schedule", "cosine"),
                                  (10, 11, 12), f"{m}-ram-cosine" if mode == "carousel" else None,
                                  f"{m}, {mode}, cosine learning rate within each task")
       for m in ("er", "derpp") for mode in ("carousel", "ram")},
    **{f"{m}-carousel-async-cosine": Cell((*_FASHION, "--method", m, "--memory", "carousel", "--swap-mode", "async",
                                           "--lr-schedule", "cosine"), (10, 11, 12), f"{m}-ram-cosine",
                                          f"{m}, carousel, background swapping, cosine learning rate within each task")
       for m in ("er", "derpp")},
    "er-daemon": Cell((*_DEMO, "--memory", "carousel", "--daemon"), (0,), "er-demo-ram",
                      "the demo's ER through a carousel daemon (issue: dipped on an overloaded machine)"),
    "er-daemon-async": Cell((*_DEMO, "--memory", "carousel", "--daemon", "--swap-mode", "async"), (0,),
                            "er-demo-ram", "the demo's ER through a daemon, background swapping and rings as in the issue"),
    "er-demo-ram": Cell((*_DEMO, "--memory", "ram"), (0,)),
    "gcr-carousel": Cell((*_GCR, "--memory", "carousel"), (1,), "gcr-ram",
                         "GCR, coreset memory, carousel (README: seed 1 collapsed in the last task)"),
    "gcr-ram": Cell((*_GCR, "--memory", "ram"), (1,)),
    # The same with 1,000 training samples per class (a sixth of the time): what a 2-core machine can repeat.
    "gcr1k-carousel": Cell((*_GCR, "--limit-per-class", "1000", "--memory", "carousel"), (1, 2), "gcr1k-ram",
                           "GCR, coreset memory, carousel, 1,000 per class"),
    "gcr1k-ram": Cell((*_GCR, "--limit-per-class", "1000", "--memory", "ram"), (1, 2)),
}

# condition -> (CPU hogs, I/O hog); None: one per core.
CONDITIONS: dict[str, tuple[int | None, bool]] = {"quiet": (0, False), "loaded": (None, True),
                                                   "cpu": (None, False), "io": (0, True)}
INTEGRITY = re.compile(r"\bIntegrityError\b")


# ---- planning and running ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Planned:
    cell: str
    seed: int
    condition: str
    repeat: int

    @property
    def name(self) -> str:
        return f"{self.cell}-s{self.seed}-{self.condition}-r{self.repeat}"


def parse_cells(text: str, seeds: Sequence[int] | None = None) -> dict[str, list[int]]:
    """``"derpp-carousel:12,er-ram"`` -> ``{"derpp-carousel": [12], "er-ram": seeds or its defaults}``
    (several seeds: ``er-ram:10+11``).

    >>> parse_cells("derpp-carousel:12,er-ram", seeds=[3])
    {'derpp-carousel': [12], 'er-ram': [3]}
    """
    out: dict[str, list[int]] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, sep, own = item.partition(":")
        if name not in CELLS:
            raise ValueError(f"unknown cell {name!r}; known: {', '.join(CELLS)}")
        out[name] = [int(s) for s in own.split("+")] if sep else list(seeds or CELLS[name].seeds)
    return out


def plan(cells: Mapping[str, Sequence[int]], conditions: Sequence[str], repeats: int) -> list[Planned]:
    """Every (cell, seed, condition, repeat), interleaved so that a slow stretch of a shared machine
    falls on every cell and condition alike rather than on one."""
    for c in conditions:
        if c not in CONDITIONS:
            raise ValueError(f"unknown condition {c!r}; known: {', '.join(CONDITIONS)}")
    seeds = sorted({s for ss in cells.values() for s in ss})
    return [Planned(cell, seed, cond, r) for r in range(repeats) for seed in seeds for cell, ss in cells.items()
            if seed in ss for cond in conditions]


def run_command(p: Planned, out: Path, trace: Sequence[str], extra: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "trainers", "run", *CELLS[p.cell].args, "--seed", str(p.seed),
            "--no-progress", *trace, *extra, "--out", str(out)]


def execute(p: Planned, out: Path, trace: Sequence[str], extra: Sequence[str], *, verify: bool, scratch: Path | None,
            timeout_s: float) -> dict[str, Any]:
    """One run under its condition; writes and returns its ``run.json`` (with the run's outcome)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = run_command(p, out, trace, extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if verify:
        env["CAROUSEL_VERIFY"] = "1"
    cpu, io = CONDITIONS[p.condition]
    cpu = (os.cpu_count() or 1) if cpu is None else cpu
    meta: dict[str, Any] = {"cell": p.cell, "seed": p.seed, "condition": p.condition, "repeat": p.repeat,
                            "command": shlex.join(cmd), "verify": verify, "hogs": {"cpu": cpu, "io": io},
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": os.getloadavg()[0]}
    loads: list[float] = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with Hogs(cpu=cpu, io=io, scratch_dir=scratch) as hogs, open(out / "log.txt", "wb") as log:
        # Its own process group: a timeout or an interrupt stops the run and a daemon it started.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        meta["hogs"]["pids"], meta["pid"] = hogs.pids, proc.pid
        print(f"starvation: {p.name} (load {meta['load_start']:.2f}; run pid {proc.pid}, hog pids {hogs.pids}): "
              f"{meta['command']}", flush=True)
        try:
            while True:
                try:
                    code = proc.wait(5.0)
                    break
                except subprocess.TimeoutExpired:
                    loads.append(os.getloadavg()[0])
                    if time.perf_counter() - t0 > timeout_s:
                        _kill_group(proc)
                        code = "timeout"
                        break
        finally:
            if proc.poll() is None:
                _kill_group(proc)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - t0
    logs = [out / "log.txt", out / "daemon.log"]
    meta.update(wall_s=wall, returncode=code, load_mean=sum(loads) / len(loads) if loads else meta["load_start"],
                cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
                integrity_errors={f.name: _count(f, INTEGRITY) for f in logs if f.is_file()},
                status="ok" if code == 0 and (out / "result.json").is_file() else "failed",
                error=None if code == 0 else _last_error(out / "log.txt"))
    (out / "run.json").write_text(json.dumps(meta, indent=1))
    return meta


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the run's process group (the run and its daemon), SIGKILL after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _count(path: Path, pattern: re.Pattern[str]) -> int:
    return sum(1 for line in path.read_text(errors="replace").splitlines() if pattern.search(line))


def _last_error(path: Path) -> str | None:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.is_file() else []
    return lines[-1][:500] if lines else None


# ---- reading runs back ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    just_trained_below: float = 60.0
    drop_above: float = 30.0


def collapse_reasons(acc: Sequence[Sequence[float | None]], th: Thresholds = Thresholds()) -> list[str]:
    """Why the class-IL matrix ``acc[k][j]`` (after task k, on task j) counts as a collapse (a task
    below ``th.just_trained_below`` right after it was trained); empty if it does not.

    >>> collapse_reasons([[97.0, None, None], [96.2, 74.7, None], [50.2, 89.8, 50.2]])
    ['T3 just trained: 50.2']
    """
    return [f"T{k + 1} just trained: {row[k]:.1f}" for k, row in enumerate(acc)
            if row[k] is not None and row[k] < th.just_trained_below]


def large_drops(acc: Sequence[Sequence[float | None]], th: Thresholds = Thresholds()) -> list[str]:
    """Every task whose accuracy fell by more than ``th.drop_above`` points while the next task trained.

    >>> large_drops([[97.0, None, None], [96.2, 74.7, None], [50.2, 89.8, 50.2]])
    ['T1 -46.0 in T3']
    """
    return [f"T{j + 1} -{acc[k - 1][j] - acc[k][j]:.1f} in T{k + 1}" for k in range(1, len(acc)) for j in range(k)
            if acc[k - 1][j] is not None and acc[k][j] is not None and acc[k - 1][j] - acc[k][j] > th.drop_above]


def trace_summary(records: Sequence[Mapping[str, Any]], classes_per_task: int) -> dict[str, Any]:
    """What a trace shows beyond the per-task matrix.

    - ``min_old``: the lowest accuracy of a task already trained, at any traced step (value, step, task);
    - ``max_dip``: the largest fall of one task's accuracy between two traced evaluations (points, step, task);
    - ``em_min_old_class``: the fewest EM samples of any class of an earlier task (count, step, label),
      from train records (the EM fills a new class's share during its task);
    - ``worst_class``: the lowest accuracy of a class at a task's end (after ``end_task``), with where
      most of its samples went instead (value, step, label, predicted label);
    - ``new_into_old``: of the errors on the task just trained, at each task's end, the share (percent)
      predicted as a class of an earlier task (rather than as the other class of the same task);
    - ``swaps_per_step``: swapped-in samples per step over the run; ``max_lag``, ``max_pending``;
    - ``step_s``: the median seconds per train step;
    - ``late_current``: per task (by index; None for a task with no end record), the mean and the standard deviation of its own accuracy over the
      traced evaluations in the second half of its training: what the model learned of the task,
      less the luck of the one step that ends it (the newest task's class-IL accuracy swings by tens
      of points between steps, in RAM-only runs too);
    - ``replay_loss``: per task, the mean cross-entropy of the replayed batches while it trained.
    """
    out: dict[str, Any] = {"min_old": None, "max_dip": None, "em_min_old_class": None, "worst_class": None,
                           "new_into_old": None, "swaps_per_step": None, "max_lag": None, "max_pending": None,
                           "step_s": None, "late_current": None, "replay_loss": None}
    ends = {r["task"]: r["step"] for r in records if r.get("phase") == "end_task"}
    late: list[tuple[float, float] | None] = []
    losses: list[float | None] = []
    for k in range(max(ends) + 1 if ends else 0):
        if k not in ends:  # a task the trace saw no end of (a run killed mid-task): nothing to say
            late.append(None)
            losses.append(None)
            continue
        start = ends.get(k - 1, 0)
        mine = [r for r in records if r.get("phase") == "train" and r["task"] == k]
        vals = [r["acc"][k] for r in mine if "acc" in r and r["step"] > start + (ends[k] - start) / 2]
        late.append((float(np.mean(vals)), float(np.std(vals))) if vals else None)
        ce = [r["replay_loss"] for r in mine if r.get("replay_loss") is not None]
        losses.append(float(np.mean(ce)) if ce else None)
    if any(v is not None for v in late):
        out["late_current"] = late
    if any(v is not None for v in losses):
        out["replay_loss"] = losses
    into_old = errors = 0
    for r in records:
        if r.get("phase") != "end_task" or "class_acc" not in r:
            continue
        for label, v in r["class_acc"].items():
            if out["worst_class"] is None or v < out["worst_class"][0]:
                went = r.get("confusion", {}).get(label, {})
                out["worst_class"] = (v, r["step"], int(label), int(max(went, key=went.get)) if went else None)
        first_new = r["task"] * classes_per_task
        for label in range(first_new, first_new + classes_per_task):
            for pred, k in r.get("confusion", {}).get(str(label), {}).items():
                errors += k
                into_old += k if int(pred) < first_new else 0
    if errors:
        out["new_into_old"] = round(100.0 * into_old / errors, 1)
    evals = [r for r in records if "acc" in r]
    for r in evals:
        for j, v in enumerate(r["acc"][:r["task"]]):
            if out["min_old"] is None or v < out["min_old"][0]:
                out["min_old"] = (v, r["step"], j + 1)
    for a, b in zip(evals, evals[1:]):
        for j in range(min(len(a["acc"]), len(b["acc"]))):
            dip = a["acc"][j] - b["acc"][j]
            if dip > 0 and (out["max_dip"] is None or dip > out["max_dip"][0]):
                out["max_dip"] = (round(dip, 2), b["step"], j + 1)
    for r in records:
        if r.get("phase") != "train" or "em" not in r or r["task"] == 0:
            continue
        old = [int(label) for label in range(r["task"] * classes_per_task)]
        counts = [(r["em"].get(str(c), 0), c) for c in old]
        least, label = min(counts)
        if out["em_min_old_class"] is None or least < out["em_min_old_class"][0]:
            out["em_min_old_class"] = (least, r["step"], label)
    if records and "swapped_in" in records[-1] and records[-1]["step"]:
        out["swaps_per_step"] = records[-1]["swapped_in"] / records[-1]["step"]
        out["max_lag"] = max(r.get("swap_lag", 0) for r in records)
        out["max_pending"] = max(r.get("pending_writes", 0) for r in records)
    steps = sorted(r["step_s"] for r in records if r.get("phase") == "train" and r.get("step_s"))
    if steps:
        out["step_s"] = steps[len(steps) // 2]
    return out


def summarize(meta: Mapping[str, Any], result: Mapping[str, Any] | None, records: Sequence[Mapping[str, Any]],
              th: Thresholds = Thresholds()) -> dict[str, Any]:
    """One table row from a run's ``run.json``, ``result.json`` (None if it failed) and trace."""
    row: dict[str, Any] = {k: meta.get(k) for k in ("cell", "seed", "condition", "repeat", "status", "load_start",
                                                     "load_mean", "wall_s", "cpu_s", "error")}
    row["integrity_errors"] = sum((meta.get("integrity_errors") or {}).values())
    row["final"] = row["just_trained"] = row["collapse"] = row["drops"] = None
    if result is not None:
        acc = result["acc_matrix"]
        row["final"] = result["final_avg_accuracy"]
        row["task_il"] = result.get("task_il_accuracy")
        row["just_trained"] = [acc[k][k] for k in range(len(acc))]
        row["rows"] = acc
        row["collapse"] = collapse_reasons(acc, th)
        row["drops"] = large_drops(acc, th)
        row["final_loss"] = result.get("final_loss")
    stream = (result or {}).get("stream") or {"num_classes": 10, "tasks": 5}  # a failed run: issue 20's streams
    row["trace"] = trace_summary(records, stream["num_classes"] // stream["tasks"])
    return row


def load_rows(out: Path, th: Thresholds = Thresholds()) -> list[dict[str, Any]]:
    """A row for every finished run under ``out`` (a folder with ``run.json``)."""
    from trainers.trace import read_trace  # imports torch: only when the table is built, not while runs go

    rows = []
    for meta_path in sorted(out.glob("*/run.json")):
        d = meta_path.parent
        meta = json.loads(meta_path.read_text())
        result = json.loads((d / "result.json").read_text()) if (d / "result.json").is_file() else None
        records = read_trace(d / "trace.jsonl") if (d / "trace.jsonl").is_file() else []
        rows.append({"dir": d.name, **summarize(meta, result, records, th)})
    return rows


# ---- the table -----------------------------------------------------------------------------------------
def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def table_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-run markdown table."""
    lines = ["| run | condition | load start / mean | final class-IL | just trained, per task | collapse | "
             "one-task drops | "
             "trace: lowest old task (step, task) | trace: largest dip (step, task) | "
             "EM: fewest of an old class (step, label) | worst class at a task end (step, label -> mostly) | "
             "just-trained errors into old classes | swaps/step | max lag / pending | s/step | "
             "integrity errors | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("trace") or {}
        jt = "/".join(f"{v:.1f}" for v in r["just_trained"]) if r.get("just_trained") else "-"
        collapse = "-" if r.get("collapse") is None else ("**yes**: " + "; ".join(r["collapse"]) if r["collapse"]
                                                          else "no")
        drops = "-" if r.get("drops") is None else ("; ".join(r["drops"]) or "none")
        mo, dip, em, worst = t.get("min_old"), t.get("max_dip"), t.get("em_min_old_class"), t.get("worst_class")
        status = r.get("status") or "-"
        if status != "ok" and r.get("error"):
            status += f": {r['error'][:120]}"
        lines.append(
            f"| {r['cell']} s{r['seed']} r{r['repeat']} | {r['condition']} | {_f(r.get('load_start'), '{:.2f}')} / "
            f"{_f(r.get('load_mean'), '{:.2f}')} | {_f(r.get('final'), '{:.2f}')} | {jt} | {collapse} | {drops} | "
            f"{f'{mo[0]:.1f} ({mo[1]}, T{mo[2]})' if mo else '-'} | "
            f"{f'{dip[0]:.1f} ({dip[1]}, T{dip[2]})' if dip else '-'} | "
            f"{f'{em[0]} ({em[1]}, {em[2]})' if em else '-'} | "
            f"{f'{worst[0]:.1f} ({worst[1]}, {worst[2]} -> {worst[3]})' if worst else '-'} | "
            f"{_f(t.get('new_into_old'), '{:.0f} %')} | {_f(t.get('swaps_per_step'))} | "
            f"{_f(t.get('max_lag'), '{:.0f}')} / {_f(t.get('max_pending'), '{:.0f}')} | {_f(t.get('step_s'), '{:.2f}')} | "
            f"{r.get('integrity_errors', 0)} | {status} |")
    return lines


def pair_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each carousel run with its RAM-only reference (same seed; the same condition and repeat when
    there is one, else the first reference run of that seed): accuracy right after learning each task."""
    refs: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("just_trained"):
            refs[(r["cell"], r["seed"])].append(r)
    out = []
    for r in rows:
        ref_cell = CELLS[r["cell"]].reference if r["cell"] in CELLS else None
        if not ref_cell or not r.get("just_trained") or not refs.get((ref_cell, r["seed"])):
            continue
        cands = refs[(ref_cell, r["seed"])]
        ref = next((c for c in cands if c["condition"] == r["condition"] and c["repeat"] == r["repeat"]), cands[0])
        a, b = r["just_trained"], ref["just_trained"]
        out.append({"run": r["dir"] if "dir" in r else f"{r['cell']}-s{r['seed']}", "reference": ref.get("dir"),
                    "carousel": a, "ram": b, "carousel_mean": sum(a) / len(a), "ram_mean": sum(b) / len(b),
                    "carousel_final": r["final"], "ram_final": ref["final"]})
    return out


def repeat_groups(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Final accuracy of every run of one (cell, seed), by condition: how repeatable a seeded run is."""
    groups: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("final") is not None:
            groups[(r["cell"], r["seed"])][r["condition"]].append(r["final"])
    out = []
    for (cell, seed), by in sorted(groups.items()):
        finals = [v for vs in by.values() for v in vs]
        if len(finals) > 1:
            out.append({"cell": cell, "seed": seed, "finals": {k: v for k, v in by.items()},
                        "spread": max(finals) - min(finals)})
    return out


def cell_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every cell over its runs (seeds, conditions, repeats): runs, collapses, mean final accuracy,
    the mean accuracy of each task right after it (end of task, and over the second half of its
    training from the trace), how much that swings between traced steps, the mean replay
    cross-entropy and the share of the just-trained task's errors that went to old classes."""
    by: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("final") is not None:
            by[r["cell"]].append(r)

    def mean(vals: Iterable[float | None]) -> float | None:
        got = [v for v in vals if v is not None]
        return float(np.mean(got)) if got else None

    out = []
    for cell, rs in by.items():
        lates = [v for r in rs for v in ((r.get("trace") or {}).get("late_current") or []) if v is not None]
        out.append({"cell": cell, "runs": len(rs), "collapsed": sum(1 for r in rs if r.get("collapse")),
                    "final": mean(r["final"] for r in rs),
                    "final_sd": float(np.std([r["final"] for r in rs])),
                    "just_trained": mean(v for r in rs for v in r["just_trained"]),
                    "late_current": mean(m for m, _ in lates), "late_swing": mean(sd for _, sd in lates),
                    "replay_loss": mean(v for r in rs for v in ((r.get("trace") or {}).get("replay_loss") or [])),
                    "new_into_old": mean((r.get("trace") or {}).get("new_into_old") for r in rs),
                    "integrity_errors": sum(r.get("integrity_errors", 0) for r in rs)})
    return out


def write_table(out: Path, th: Thresholds = Thresholds()) -> list[dict[str, Any]]:
    """``table.md`` and ``starvation.json`` from every run under ``out``; returns the rows."""
    rows = load_rows(out, th)
    pairs, groups, cells = pair_rows(rows), repeat_groups(rows), cell_summary(rows)
    text = [f"Starvation runs under {out} (collapse: a task below {th.just_trained_below:g} % class-IL right after "
            f"training it; one-task drops: a task falling more than {th.drop_above:g} points while the next trains)",
            "", "By cell (means over its runs; 'late' = the task's own accuracy over the second half of its "
            "training, from the trace, and its swing: the standard deviation between traced steps):", "",
            "| cell | runs | collapsed | final (sd) | just trained, at the task's end | just trained, late "
            "(swing) | replay CE | new-task errors into old classes | integrity errors |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        text.append(f"| {c['cell']} | {c['runs']} | {c['collapsed']} | {_f(c['final'], '{:.2f}')} "
                    f"({c['final_sd']:.2f}) | {_f(c['just_trained'])} | {_f(c['late_current'])} "
                    f"({_f(c['late_swing'])}) | {_f(c['replay_loss'], '{:.3f}')} | "
                    f"{_f(c['new_into_old'], '{:.0f} %')} | {c['integrity_errors']} |")
    text += ["", "Every run:", "", *table_lines(rows)]
    if pairs:
        text += ["", "Accuracy of each task right after learning it (class-IL), carousel against RAM-only, same seed:",
                 "", "| run | RAM-only reference | carousel | RAM-only | mean: carousel / RAM | final: carousel / RAM |",
                 "|---|---|---|---|---|---|"]
        for p in pairs:
            text.append(f"| {p['run']} | {p['reference']} | {'/'.join(f'{v:.1f}' for v in p['carousel'])} | "
                        f"{'/'.join(f'{v:.1f}' for v in p['ram'])} | {p['carousel_mean']:.1f} / {p['ram_mean']:.1f} | "
                        f"{p['carousel_final']:.2f} / {p['ram_final']:.2f} |")
    if groups:
        text += ["", "Same cell and seed, several runs (final class-IL by condition):", "",
                 "| cell | seed | finals | spread |", "|---|---|---|---|"]
        for g in groups:
            finals = "; ".join(f"{c}: {', '.join(f'{v:.2f}' for v in vs)}" for c, vs in g["finals"].items())
            text.append(f"| {g['cell']} | {g['seed']} | {finals} | {g['spread']:.2f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(text) + "\n")
    (out / "starvation.json").write_text(json.dumps({"thresholds": vars(th), "cells": cells, "runs": rows,
                                                     "pairs": pairs, "repeats": groups}, indent=1, default=str))
    return rows


# ---- the command ---------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.starvation", description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default="derpp-carousel,er-carousel,derpp-ram,er-ram",
                   help=f"comma-separated, each optionally with its own seeds (er-ram:10+11); known: {', '.join(CELLS)}")
    p.add_argument("--seeds", type=_ints, help="seeds for every cell without its own (default: each cell's)")
    p.add_argument("--conditions", default="quiet,loaded", help=f"comma-separated; known: {', '.join(CONDITIONS)}")
    p.add_argument("--repeats", type=int, default=1, help="runs of each (cell, seed, condition): repeatability")
    p.add_argument("--out", default="runs/starvation", help="folder for the runs and the table")
    p.add_argument("--trace-every", type=int, default=5)
    p.add_argument("--trace-eval-every", type=int, default=25)
    p.add_argument("--trace-eval-size", type=int, default=200)
    p.add_argument("--run-args", default="", help="more `trainers run` flags for every run, appended (they win), "
                   "e.g. \"--data-root ../shared/datasets\"")
    p.add_argument("--no-verify", action="store_true", help="do not set CAROUSEL_VERIFY=1 for the runs")
    p.add_argument("--io-dir", help="where the I/O hog writes (default: the temp folder, where runs keep their tiers)")
    p.add_argument("--run-timeout-s", type=float, default=7200.0, help="stop a run after this long")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs that failed (default: keep them)")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from the runs in --out")
    p.add_argument("--just-trained-below", type=float, default=60.0)
    p.add_argument("--drop-above", type=float, default=30.0)
    args = p.parse_args(None if argv is None else list(argv))
    out = Path(args.out)
    th = Thresholds(args.just_trained_below, args.drop_above)
    # A SIGTERM unwinds like Ctrl-C: the run's process group and the hogs are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.table_only:
        try:
            runs = plan(parse_cells(args.cells, args.seeds), [c for c in args.conditions.split(",") if c],
                        args.repeats)
        except ValueError as exc:
            p.error(str(exc))
        trace = ["--trace-every", str(args.trace_every), "--trace-eval-every", str(args.trace_eval_every),
                 "--trace-eval-size", str(args.trace_eval_size)]
        extra = shlex.split(args.run_args)
        for i, run in enumerate(runs):
            d = out / run.name
            meta = d / "run.json"
            if meta.is_file() and (args.retry_failed is False or json.loads(meta.read_text())["status"] == "ok"):
                print(f"starvation: {run.name}: done before, skipped", flush=True)
                continue
            done = execute(run, d, trace, extra, verify=not args.no_verify,
                           scratch=Path(args.io_dir) if args.io_dir else None, timeout_s=args.run_timeout_s)
            print(f"starvation: [{i + 1}/{len(runs)}] {run.name}: {done['status']} in {done['wall_s']:.0f} s"
                  + (f" ({done['error']})" if done["error"] else ""), flush=True)
            write_table(out, th)  # after every run: a long round can be read while it goes on
    rows = write_table(out, th)
    print((out / "table.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
