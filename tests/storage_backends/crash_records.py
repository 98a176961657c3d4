"""The deterministic records the crash and fault tests write (and their child processes too)."""

import numpy as np

SCHEMA = {"x": ((3, 32, 32), "uint8"), "y": ((), "int64"), "task": ((), "int16")}


def fields(ids, seed):
    """The records a put of ``ids`` with ``seed`` writes (random x, y and task tied to the seed)."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    return {"x": rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
            "y": np.asarray(ids, dtype=np.int64) * 1000 + seed,
            "task": np.full(n, seed % 65536 - 32768, dtype=np.int16)}
