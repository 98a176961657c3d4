"""Figures: average accuracy over the tasks seen after each task, one line per run or memory mode
(:func:`accuracy_figure`); one run's trace over its steps (:func:`trace_figure`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _curve(acc: Sequence[Sequence[float]]) -> np.ndarray:
    a = np.asarray(acc, dtype=np.float64)
    return np.array([np.nanmean(a[k, :k + 1]) for k in range(a.shape[0])])


def accuracy_figure(curves: Mapping[str, Sequence[Sequence[Sequence[float]]]], path: Path, title: str) -> Path:
    """``curves``: label -> one class-IL accuracy matrix per seed. Draws, per label, the mean over
    seeds of the average accuracy on tasks seen so far after each task, with a +-1 std band, and
    for a single run also each task's own accuracy over time (thin lines)."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, matrices in curves.items():
        ys = np.stack([_curve(m) for m in matrices])
        x = np.arange(1, ys.shape[1] + 1)
        mean = ys.mean(axis=0)
        line, = ax.plot(x, mean, marker="o", label=f"{label} (n={len(matrices)})")
        if len(matrices) > 1:
            std = ys.std(axis=0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        if len(curves) == 1 and len(matrices) == 1:
            a = np.asarray(matrices[0], dtype=np.float64)
            for j in range(a.shape[1]):
                ax.plot(x[j:], a[j:, j], lw=0.8, ls="--", alpha=0.7, label=f"task {j + 1}")
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("class-IL accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(np.arange(1, max(len(np.asarray(m[0])) for m in curves.values()) + 1))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _histograms(records: Sequence[Mapping[str, Any]], key: str, classes: list[str]) -> np.ndarray:
    """``(classes, records)`` counts of ``record[key]`` (missing: 0)."""
    return np.array([[float(r.get(key, {}).get(c, 0)) for r in records] for c in classes])


def trace_figure(records: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Five panels over the train steps of one run (records from :mod:`trainers.trace`): the EM's
    class histogram (stacked), the replayed classes' shares (stacked), swaps per step with the swap
    lag and pending writes, each task's accuracy on its trace subset with the loss, and each class's
    accuracy (the EM's colours). Dotted vertical lines mark task ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in records], dtype=np.float64)
    classes = sorted({c for r in records for key in ("em", "replayed") for c in r.get(key, {})}, key=int)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    colors = [cmap(int(c) % cmap.N) for c in classes]
    fig, axes = plt.subplots(5, 1, figsize=(9, 13.5), sharex=True)
    ax_em, ax_rep, ax_swap, ax_acc, ax_cls = axes
    if classes and any("em" in r for r in records):
        ax_em.stackplot(steps, _histograms(records, "em", classes), labels=classes, colors=colors, step="post")
        ax_em.legend(title="class", fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax_em.set_ylabel("EM samples per class")
    # Shares over the records that saw replays (an end_task record at a step already recorded has none).
    drawn = [r for r in records if sum(r.get("replayed", {}).values())]
    if classes and drawn:
        rep = _histograms(drawn, "replayed", classes)
        ax_rep.stackplot([r["step"] for r in drawn], rep / rep.sum(axis=0), colors=colors, step="pre")
    ax_rep.set_ylabel("replayed since last record:\nshare per class")
    ax_rep.set_ylim(0, 1)
    if len(records) > 1 and "swapped_in" in records[0]:
        d_steps = np.diff(steps)
        moved = d_steps > 0  # rates between records steps apart (not a record and its end_task twin)
        for key, style in (("swapped_in", "-"), ("swapped_out", "--")):
            per = np.diff([r.get(key, 0) for r in records])[moved] / d_steps[moved]
            ax_swap.step(steps[1:][moved], per, where="pre", ls=style, label=f"{key.replace('_', ' ')} per step")
        ax_swap.set_ylabel("swaps per step")
        twin = ax_swap.twinx()
        for key, color in (("swap_lag", "tab:red"), ("pending_writes", "tab:gray")):
            if key in records[0]:
                twin.plot(steps, [r.get(key, 0) for r in records], color=color, lw=0.8, label=key.replace("_", " "))
        twin.set_ylabel("queued")
        handles = ax_swap.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax_swap.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left")
    else:
        ax_swap.text(0.5, 0.5, "no swap counters (no storage tiers)", ha="center", va="center",
                     transform=ax_swap.transAxes)
    evals = [r for r in records if "acc" in r]
    if evals:
        n_tasks = max(len(r["acc"]) for r in evals)
        for j in range(n_tasks):
            pts = [(r["step"], r["acc"][j]) for r in evals if len(r["acc"]) > j]
            ax_acc.plot(*zip(*pts), marker=".", ms=3, lw=1, label=f"task {j + 1}")
        ax_acc.set_ylim(0, 100)
        ax_acc.legend(fontsize=7, ncol=2, loc="lower left")
    ax_acc.set_ylabel("class-IL acc per task,\ntrace subset (%)")
    losses = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    if losses:
        twin = ax_acc.twinx()
        twin.plot(*zip(*losses), color="black", lw=0.6, alpha=0.5)
        twin.set_ylabel("loss (black)")
    for c, color in zip(classes, colors):
        pts = [(r["step"], r["class_acc"][c]) for r in evals if c in r.get("class_acc", {})]
        if pts:
            ax_cls.plot(*zip(*pts), marker=".", ms=3, lw=1, color=color)
    ax_cls.set_ylim(0, 100)
    ax_cls.set_ylabel("class-IL acc per class (%)")
    ax_cls.set_xlabel("train step")
    for r in records:
        if r.get("phase") == "end_task":
            for ax in axes:
                ax.axvline(r["step"], color="black", ls=":", lw=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
