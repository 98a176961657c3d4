"""Figures: average accuracy over the tasks seen after each task, one line per run or memory mode."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

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
