"""Continual-learning metrics from an accuracy matrix ``a[k][j]``: accuracy (percent) on task
``j``'s test set after training on task ``k``; entries with ``j > k`` are not evaluated (NaN).

>>> a = [[90.0, float("nan")], [70.0, 80.0]]
>>> summary(a)
{'final_avg_accuracy': 75.0, 'avg_incremental_accuracy': 82.5, 'forgetting': 20.0, 'bwt': -20.0}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def summary(acc: Sequence[Sequence[float]]) -> dict[str, float]:
    """Final average accuracy, average incremental accuracy, forgetting and backward transfer.

    - ``final_avg_accuracy``: mean of the last row (every task, after the last).
    - ``avg_incremental_accuracy``: mean over k of the mean of ``a[k][:k+1]`` (Rebuffi et al.).
    - ``forgetting``: mean over j < T-1 of ``max_{k < T-1} a[k][j] - a[T-1][j]`` (Chaudhry et al.).
    - ``bwt``: mean over j < T-1 of ``a[T-1][j] - a[j][j]`` (Lopez-Paz & Ranzato).
    With one task, forgetting and BWT are 0.
    """
    a = np.asarray(acc, dtype=np.float64)
    t = a.shape[0]
    if a.shape != (t, t) or t == 0:
        raise ValueError(f"expected a square, non-empty accuracy matrix, got shape {a.shape}")
    final = float(np.mean(a[-1]))
    incremental = float(np.mean([np.mean(a[k, :k + 1]) for k in range(t)]))
    if t == 1:
        return {"final_avg_accuracy": final, "avg_incremental_accuracy": incremental, "forgetting": 0.0, "bwt": 0.0}
    forgetting = float(np.mean([np.nanmax(a[j:t - 1, j]) - a[-1, j] for j in range(t - 1)]))
    bwt = float(np.mean([a[-1, j] - a[j, j] for j in range(t - 1)]))
    return {"final_avg_accuracy": final, "avg_incremental_accuracy": incremental, "forgetting": forgetting, "bwt": bwt}


def to_json_matrix(acc: Sequence[Sequence[float]]) -> list[list[float | None]]:
    """The matrix with NaN (not evaluated) as None, for JSON."""
    return [[None if (v is None or math.isnan(v)) else round(float(v), 4) for v in row] for row in acc]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
