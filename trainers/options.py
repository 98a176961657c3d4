"""The settings of a run and the flags that set them (``python -m trainers run`` / ``compare``).

Torch-free on purpose: ``python -m trainers run --help`` (and a mistyped flag) answers from here
before the runner and its models load torch (~2 s).

>>> cfg = config_from_args(run_parser().parse_args(["--method", "derpp", "--hparam", "alpha=0.1"]))
>>> cfg.method, cfg.memory, cfg.hparams
('derpp', 'ram', {'alpha': 0.1})
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from .streams import BENCHMARKS

__all__ = ["ARCHS", "MODES", "RunConfig", "add_run_arguments", "config_from_args", "run_parser"]

ARCHS = ("auto", "mlp", "reduced-resnet18", "resnet18")
MODES = ("ram", "carousel", "storage")  # the memory modes (trainers.memories.open_memory builds them)
LR_SCHEDULES = ("constant", "cosine")    # trainers.run.lr_at


@dataclass
class RunConfig:
    """One run's settings (the CLI flags); saved into the result JSON."""

    benchmark: str = "split-fashion-mnist"
    method: str = "er"
    memory: str = "ram"
    memory_kind: str = "plain"
    tier_capacity: str | None = None        # carousel mode's default tier: "50000" samples or "2MiB"
    theta: float | None = None              # saliency memories: keep pixels with saliency >= theta
    em_size: int = 200
    profile: str | None = None
    swap_workers: int | None = None
    swap_ratio: float | None = None
    swap_mode: str = "deterministic"        # carousel mode: swaps at step boundaries (repeatable) or "async"
    daemon: bool = False
    connect: str | None = None
    tasks: int | None = None
    arch: str = "auto"
    epochs: int = 1
    batch_size: int = 32
    replay_size: int = 32
    lr: float | None = None
    lr_schedule: str = "cosine"            # from lr to ~0 over each task's steps, or "constant" (before issue 20)
    hparams: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    data_root: str | None = None
    download: bool = False
    limit_per_class: int | None = None
    eval_limit: int | None = None          # test samples per task (None: all)
    device: str = "cpu"
    threads: int | None = None
    out: str | None = None
    progress: bool = True
    label: str | None = None               # the run's name in tables and figures (default: the memory mode)
    trace_every: int = 0                   # a trace record every N steps (trace.jsonl, trace.png); 0: off
    trace_eval_every: int = 0              # trace: class-IL on a fixed test subset every M steps; 0: off
    trace_eval_size: int = 200             # trace: test samples per task in that subset


def add_run_arguments(p: argparse.ArgumentParser, *, memory: bool = True) -> None:
    """The flags ``run`` and ``compare`` share."""
    p.add_argument("--benchmark", default="split-fashion-mnist", choices=[*BENCHMARKS, "generated"])
    p.add_argument("--tasks", type=int, help="split-cifar100: 10 (10x10, default) or 20 (20x5)")
    p.add_argument("--method", default="er", help="er, derpp, icarl, gdumb, gcr")
    if memory:
        p.add_argument("--memory", default="ram", choices=MODES, help="ram: the classic buffer; carousel: EM + storage "
                       "tiers with swapping; storage: replay read from a store of all past samples (ST-L)")
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-kind", default="plain", choices=("plain", "coreset", "saliency"),
                   help="coreset: every sample carries a weight and GCR re-selects with retain(ids, weights); "
                   "saliency (carousel mode): samples are stored as their Grad-CAM-salient pixels and completed "
                   "on the way back into RAM")
    p.add_argument("--tier-capacity", help="carousel mode, default tier: its capacity, in samples (50000) or "
                   "bytes (\"2MiB\"); default: room for the whole stream")
    p.add_argument("--theta", type=float, help="--memory-kind saliency: keep pixels with saliency >= theta "
                   "(default 0.6)")
    p.add_argument("--em-size", type=int, default=200, help="samples the RAM episodic memory holds (the RAM budget)")
    p.add_argument("--profile", help="carousel mode: a carousel profile TOML ([swap], [[tiers]]; [memory] is "
                   "fitted to the benchmark); default: one LMDB tier holding every sample, ratio 0.5, carm")
    p.add_argument("--swap-workers", type=int, help="carousel mode: swap threads; 0 = synchronous swapping (ablation)")
    p.add_argument("--swap-ratio", type=float, help="carousel mode: override [swap].ratio")
    p.add_argument("--swap-mode", default="deterministic", choices=("deterministic", "async"),
                   help="carousel mode: deterministic (default: swaps land at step boundaries, one step after "
                   "they are asked for, so a seed gives the same run) or async (swaps land whenever storage "
                   "delivers, as CarM runs them: not repeatable)")
    p.add_argument("--daemon", action="store_true", help="carousel mode: run the memory in a `carousel serve` "
                   "subprocess and train through carousel.connect")
    p.add_argument("--connect", help="carousel mode: the socket of a running daemon (its memory must be empty)")
    p.add_argument("--arch", default="auto", choices=ARCHS,
                   help="auto: MLP for split-mnist, reduced ResNet-18 (nf 20) otherwise")
    p.add_argument("--epochs", type=int, default=1, help="epochs per task")
    p.add_argument("--published", action="store_true",
                   help="the published schedule: 50 epochs per task and the full ResNet-18 (nf 64); use a GPU")
    p.add_argument("--batch-size", type=int, default=32, help="stream samples per step")
    p.add_argument("--replay-size", type=int, default=32, help="replay samples per draw")
    p.add_argument("--lr", type=float, help="default: the method's best setting for the benchmark")
    p.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES,
                   help="cosine (default): within each task the learning rate falls from --lr towards 0 along a half "
                        "cosine over the task's steps, so a task ends on a settled model rather than mid-swing (see "
                        "docs/collapses.md); constant: --lr throughout (the trainers before issue 20)")
    p.add_argument("--hparam", action="append", default=[], metavar="NAME=VALUE",
                   help="a method hyper-parameter, e.g. alpha=0.1 (repeatable)")
    p.add_argument("--data-root", help="data sets folder (default: ../shared/datasets, data, /usr/share/datasets)")
    p.add_argument("--download", action="store_true", help="download missing data sets from their canonical sources")
    p.add_argument("--limit-per-class", type=int, help="train samples per class (quick runs)")
    p.add_argument("--eval-limit", type=int, help="test samples per task (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--trace-every", type=int, default=0, metavar="N",
                   help="every N steps, record the loss, the replayed classes, the EM's class histogram and the "
                   "swap counters to trace.jsonl (plotted to trace.png); default 0: off")
    p.add_argument("--trace-eval-every", type=int, default=0, metavar="M",
                   help="trace: every M steps (and after every task) also the class-IL accuracy of each seen "
                   "task on a fixed subset of its test set; default 0: off")
    p.add_argument("--trace-eval-size", type=int, default=200, metavar="K",
                   help="trace: test samples per task in that subset (default 200)")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    hparams = {}
    for item in args.hparam:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--hparam {item!r}: expected NAME=VALUE")
        hparams[name] = float(value)
    cfg = RunConfig(benchmark=args.benchmark, method=args.method, memory=getattr(args, "memory", "ram"),
                    memory_kind=args.memory_kind, tier_capacity=args.tier_capacity, theta=args.theta,
                    em_size=args.em_size, profile=args.profile, swap_workers=args.swap_workers,
                    swap_ratio=args.swap_ratio, swap_mode=args.swap_mode, daemon=args.daemon, connect=args.connect, tasks=args.tasks,
                    arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, replay_size=args.replay_size,
                    lr=args.lr, lr_schedule=args.lr_schedule, hparams=hparams, seed=getattr(args, "seed", 0), data_root=args.data_root,
                    download=args.download, limit_per_class=args.limit_per_class, eval_limit=args.eval_limit,
                    device=args.device, threads=args.threads, progress=not args.no_progress,
                    trace_every=args.trace_every, trace_eval_every=args.trace_eval_every,
                    trace_eval_size=args.trace_eval_size)
    if args.published:
        cfg.epochs, cfg.arch = 50, "resnet18"
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg



def run_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m trainers run``."""
    p = argparse.ArgumentParser(prog="python -m trainers run",
                                description="one continual-learning run -- a method, a benchmark, a memory mode")
    add_run_arguments(p)
    p.add_argument("--out", default=None, help="folder for result.json and accuracy.png (default: runs/NAME)")
    return p
