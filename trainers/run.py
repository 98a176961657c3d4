"""``python -m trainers run``: one continual-learning run -- a method, a benchmark, a memory mode.

    python -m trainers run --benchmark split-fashion-mnist --method er --memory carousel --em-size 200

Trains task after task (one head over every class seen), evaluates every task seen after each
one (class-IL: argmax over the classes seen so far; task-IL: argmax within the task's classes),
and writes ``result.json`` (accuracy matrices, final average accuracy, forgetting, BWT, wall time
split into train / replay-sample / eval) and ``accuracy.png`` to ``--out``; with ``--trace-every N``
also ``trace.jsonl`` and ``trace.png`` (:mod:`trainers.trace`: per-step replayed classes, the EM's
class histogram, swap counters and, with ``--trace-eval-every M``, per-task accuracy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics, plot
from .augment import prepare
from .memories import MemorySpec, open_memory
from .methods import Context, PhaseTimer, get_method
from .models import MLP, reduced_resnet18, resnet18
# RunConfig and the flags live in options.py (torch-free); importable from here as before.
from .options import ARCHS, MODES, RunConfig, add_run_arguments, config_from_args, run_parser  # noqa: F401
from .streams import Stream, generated_stream, make_stream
from .trace import TRACE_FILE, Tracer



def build_model(arch: str, stream: Stream) -> torch.nn.Module:
    """``auto``: the MLP for Split-MNIST and generated data, the reduced ResNet-18 otherwise."""
    c = stream.input_shape[0]
    if arch == "auto":
        arch = "mlp" if stream.name in ("split-mnist", "split-generated") else "reduced-resnet18"
    if arch == "mlp":
        return MLP(stream.num_classes, in_features=int(np.prod(stream.input_shape)))
    if arch == "reduced-resnet18":
        return reduced_resnet18(stream.num_classes, in_channels=c)
    if arch == "resnet18":
        return resnet18(stream.num_classes, in_channels=c)
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")


def load_stream(cfg: RunConfig) -> Stream:
    if cfg.benchmark == "generated":
        # --limit-per-class caps the generated set too (100 a class): a limit never adds samples.
        per_class = 100 if cfg.limit_per_class is None else max(1, min(100, cfg.limit_per_class))
        return generated_stream(tasks=cfg.tasks or 5, seed=cfg.seed, train_per_class=per_class)
    return make_stream(cfg.benchmark, cfg.data_root, seed=cfg.seed, tasks=cfg.tasks, download=cfg.download,
                       limit_per_class=cfg.limit_per_class)


@torch.no_grad()
def evaluate(method, stream: Stream, upto: int, device: torch.device, eval_limit: int | None) -> tuple[list, list]:
    """Class-IL and task-IL accuracy (percent) on the test sets of tasks 0..upto."""
    seen = (upto + 1) * stream.classes_per_task
    cil, til = [], []
    for task in stream.tasks[:upto + 1]:
        xs, ys = task.test_x, task.test_y
        if eval_limit is not None:
            xs, ys = xs[:eval_limit], ys[:eval_limit]
        right_c = right_t = 0
        lo_c, hi_c = min(task.classes), max(task.classes) + 1
        for lo in range(0, len(ys), 512):
            x = prepare(torch.from_numpy(xs[lo:lo + 512]).to(device), stream, train=False)
            y = torch.from_numpy(ys[lo:lo + 512]).to(device)
            logits = method.predict(x).float()
            right_c += int((logits[:, :seen].argmax(1) == y).sum())
            right_t += int((logits[:, lo_c:hi_c].argmax(1) + lo_c == y).sum())
        cil.append(100.0 * right_c / len(ys))
        til.append(100.0 * right_t / len(ys))
    return cil, til


def lr_at(schedule: str, base: float, step: int, steps: int) -> float:
    """The learning rate of a task's ``step`` (0-based) of ``steps``: ``base`` throughout, or along a
    half cosine from ``base`` towards 0 (never 0: the last step still learns).

    >>> [round(lr_at("cosine", 0.1, s, 4), 4) for s in range(4)]
    [0.1, 0.0854, 0.05, 0.0146]
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    raise ValueError(f"unknown lr schedule {schedule!r}; known: constant, cosine")


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.benchmark`` with the ``cfg.memory`` mode; returns the result dict
    (also written to ``cfg.out/result.json`` when ``out`` is set)."""
    if cfg.memory not in MODES:
        raise ValueError(f"unknown memory mode {cfg.memory!r}; known: {', '.join(MODES)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    t_start = time.perf_counter()
    stream = load_stream(cfg)
    model = build_model(cfg.arch, stream).to(device)
    method_cls = get_method(cfg.method)
    out = Path(cfg.out) if cfg.out else None
    tracer: Tracer | None = None
    if cfg.trace_every or cfg.trace_eval_every:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        tracer = Tracer(stream, cfg.trace_every, cfg.trace_eval_every, cfg.trace_eval_size,
                        out / TRACE_FILE if out is not None else None, device)
    workdir = Path(tempfile.mkdtemp(prefix=f"carousel-{cfg.method}-{cfg.memory}-"))
    spec = MemorySpec(cfg.memory, cfg.em_size, admission=method_cls.admission,
                      extras=method_cls.extras(stream.num_classes), profile=cfg.profile,
                      swap_workers=cfg.swap_workers, swap_ratio=cfg.swap_ratio,
                      deterministic=cfg.swap_mode == "deterministic", daemon=cfg.daemon,
                      connect=cfg.connect, seed=cfg.seed, kind=cfg.memory_kind,
                      tier_capacity=cfg.tier_capacity, theta=cfg.theta)
    timer = PhaseTimer()
    try:
        opened = open_memory(spec, stream, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        if tracer is not None:
            tracer.close()
        raise
    label = cfg.label or cfg.memory
    acc_c = np.full((len(stream.tasks),) * 2, np.nan)
    acc_t = np.full_like(acc_c, np.nan)
    losses: list[float] = []
    try:
        ctx = Context(stream, model, opened.memory, device, cfg.batch_size, cfg.replay_size, cfg.lr, cfg.epochs,
                      cfg.seed, timer, torch.Generator(device=device).manual_seed(cfg.seed), cfg.memory_kind,
                      tiered=cfg.memory == "carousel")
        method = method_cls(ctx, em_size=cfg.em_size, **cfg.hparams)
        if tracer is not None:
            tracer.attach(method)
        print(f"{cfg.method} on {stream.name} ({len(stream.tasks)} tasks, {stream.source}); memory {opened.describe}",
              flush=True)
        order_rng = np.random.default_rng([cfg.seed, 11])
        for task in stream.tasks:
            method.begin_task(task)
            n = len(task.train_y)
            steps = cfg.epochs * -(-n // cfg.batch_size)
            bar = _progress(steps, f"[{label}] task {task.index + 1}/{len(stream.tasks)}", cfg.progress)
            step_in_task = 0
            with timer.timed("train"):
                for _ in range(cfg.epochs):
                    order = order_rng.permutation(n)
                    for lo in range(0, n, cfg.batch_size):
                        if cfg.lr_schedule != "constant":
                            for group in method.opt.param_groups:
                                group["lr"] = lr_at(cfg.lr_schedule, method.lr, step_in_task, steps)
                        step_in_task += 1
                        idx = np.sort(order[lo:lo + cfg.batch_size])
                        x = torch.from_numpy(task.train_x[idx])
                        y = torch.from_numpy(task.train_y[idx])
                        losses.append(method.train_step(x, y, task.index))
                        if tracer is not None:
                            tracer.after_step(method, opened.memory, task.index, losses[-1])
                        bar.update(1)
                        if bar.n % 50 == 0:
                            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            bar.close()
            with timer.timed("end_task"):
                method.end_task(task)
            if tracer is not None:
                tracer.after_task(method, opened.memory, task.index)
            with timer.timed("eval"):
                cil, til = evaluate(method, stream, task.index, device, cfg.eval_limit)
            acc_c[task.index, :task.index + 1] = cil
            acc_t[task.index, :task.index + 1] = til
            print(f"[{label}] after task {task.index + 1}: class-IL {np.mean(cil):.2f}%  task-IL {np.mean(til):.2f}%  "
                  f"per task {[round(v, 1) for v in cil]}", flush=True)
    finally:
        try:
            memory_stats = opened.close()
        finally:
            if out is not None and (workdir / "daemon.log").is_file():  # --daemon: kept for post-mortems
                out.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(workdir / "daemon.log", out / "daemon.log")
            shutil.rmtree(workdir, ignore_errors=True)
            if tracer is not None:
                tracer.close()
                if out is not None and tracer.records:  # also for a run that failed: what led up to it
                    try:
                        plot.trace_figure(tracer.records, out / "trace.png",
                                          f"{cfg.method} ({label}) on {stream.name}, seed {cfg.seed}")
                    except Exception as exc:  # noqa: BLE001 - a figure must not hide the run's own error
                        print(f"[{label}] trace figure failed: {exc!r}", file=sys.stderr)
    summary = metrics.summary(acc_c)
    seconds = dict(timer.seconds)
    result = {
        **summary,
        "task_il_accuracy": float(np.mean(acc_t[-1])),
        "acc_matrix": metrics.to_json_matrix(acc_c),
        "task_il_matrix": metrics.to_json_matrix(acc_t),
        "wall_time_s": {"total": time.perf_counter() - t_start,
                        # A trace's records inside the train loop are not training.
                        "train": seconds.get("train", 0.0) + seconds.get("end_task", 0.0)
                        - (tracer.step_seconds if tracer is not None else 0.0),
                        "replay_sample": seconds.get("replay_sample", 0.0),
                        "replay_observe": seconds.get("replay_observe", 0.0),
                        "memory_add": seconds.get("memory_add", 0.0),
                        "saliency": seconds.get("saliency", 0.0),
                        "eval": seconds.get("eval", 0.0),
                        "trace": tracer.seconds if tracer is not None else 0.0},
        "steps": len(losses),
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "memory": {"mode": cfg.memory, "describe": opened.describe, "stats": _plain(memory_stats)},
        "trace": ({"file": TRACE_FILE, "records": len(tracer.records), "every": cfg.trace_every,
                   "eval_every": cfg.trace_eval_every, "eval_size": cfg.trace_eval_size}
                  if tracer is not None else None),
        "stream": {"name": stream.name, "tasks": len(stream.tasks), "num_classes": stream.num_classes,
                   "class_order": list(stream.class_order), "source": stream.source},
        "config": asdict(cfg),
        "label": label,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
                    "torch": torch.__version__, "python": platform.python_version()},
    }
    print(f"[{label}] final average accuracy {result['final_avg_accuracy']:.2f}% (class-IL), "
          f"task-IL {result['task_il_accuracy']:.2f}%, forgetting {result['forgetting']:.2f}, "
          f"train {result['wall_time_s']['train']:.1f} s (replay sample {result['wall_time_s']['replay_sample']:.2f} s)",
          flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=1))
        plot.accuracy_figure({label: [acc_c]}, out / "accuracy.png", f"{cfg.method} on {stream.name}")
    return result


def _plain(d: Any) -> Any:
    """Stats as JSON-safe plain values."""
    if isinstance(d, dict):
        return {str(k): _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    if isinstance(d, (np.integer, np.floating)):
        return d.item()
    return d if isinstance(d, (int, float, str, bool, type(None))) else str(d)


class _NoBar:
    n = 0

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix(self, **_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m trainers run [flags]``: parse, run, write the results."""
    return run_from_args(run_parser().parse_args(argv))


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """One run from parsed ``run`` flags (``python -m trainers run`` parses them before torch loads)."""
    cfg = config_from_args(args)
    cfg.out = args.out or str(Path("runs") / f"{cfg.benchmark}-{cfg.method}-{cfg.memory}-s{cfg.seed}")
    try:
        result = run(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # The class name too: a RuntimeError subclass (an integrity check's error) is told apart.
        raise SystemExit(f"trainers run: {type(exc).__name__}: {exc}") from None
    traced = f", {cfg.out}/trace.jsonl and {cfg.out}/trace.png" if result["trace"] else ""
    print(f"wrote {cfg.out}/result.json, {cfg.out}/accuracy.png{traced}")
    return result
