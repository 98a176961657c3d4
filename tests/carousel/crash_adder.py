"""The child process of the id crash test (tests/carousel/test_ids.py): adds until it is killed.

A module of its own, so the test's fork server imports carousel once for all rounds (a fresh
interpreter per round would spend most of the test importing torch).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from carousel import CarouselMemory

SEQ_SPAN = 1000  # a token is (round * SEQ_SPAN + seq) * 100 + i: round, the add's number, the sample's place
PER_ADD = 100


def token_of(round_: int, seq: int, i: np.ndarray) -> np.ndarray:
    """The payload of sample ``i`` of add number ``seq`` in round ``round_`` (unique in the test)."""
    return (round_ * SEQ_SPAN + seq) * PER_ADD + np.asarray(i, np.int64)


def split_token(token: int) -> tuple[int, int, int]:
    """``(round, seq, i)`` of a token."""
    head, i = divmod(int(token), PER_ADD)
    round_, seq = divmod(head, SEQ_SPAN)
    return round_, seq, i


def add_until_killed(cfg: dict[str, Any], log_path: str, round_: int, seed: int) -> None:
    """Open the memory (recovering it after the last round's SIGKILL) and add batches of 1-32
    samples whose ``x`` is their token (8 bytes), writing ``seq first_id n`` to ``log_path`` after
    each add and flushing now and then, until the parent kills this process.

    The log is written with one ``write`` per line to an ``O_APPEND`` file: a SIGKILL loses no
    completed ``write`` (the data is in the kernel), so a line is there iff its add returned and
    the line was written -- no fsync needed, as no power is cut here.
    """
    rng = np.random.default_rng(seed)
    mem = CarouselMemory.from_dict(cfg)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    for seq in range(SEQ_SPAN):
        n = int(rng.integers(1, 33))
        tokens = token_of(round_, seq, np.arange(n))
        ids = mem.add(tokens.view(np.uint8).reshape(n, 8), tokens % 5, task=0).numpy()
        os.write(fd, f"{seq} {ids[0]} {n}\n".encode())
        if not (ids == np.arange(ids[0], ids[0] + n)).all():
            os.write(fd, b"NONCONSECUTIVE\n")
        if seq % 7 == 6:
            mem.flush()
    os.write(fd, b"DONE\n")  # not reached in the test: it kills every round long before
    os.close(fd)
