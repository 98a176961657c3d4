"""What a :class:`~carousel.integrations.mammoth.CarouselBuffer` owns and must let go of.

Mammoth never closes its buffer: a model keeps it until the process ends, and a checkpoint or a
``copy.deepcopy`` makes more. So the memory a buffer opened, and the temporary folder its tiers
live in when the user gave no ``root``, are released by a ``weakref.finalize``: when the buffer is
garbage-collected, or at interpreter exit at the latest. The finalizer holds this object, never
the buffer (a finalizer that refers to its object keeps it alive forever).

A memory still open at exit is closed earlier than that by :mod:`carousel.memory` itself, while
its threads can still use their thread pool (see ``_close_open_memories`` there); this
finalizer then finds it closed and only removes the folder.
"""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path
from typing import Any

__all__ = ["Owned"]


class Owned:
    """The memory a buffer opened and the folders to delete with it (``temp_root``: the
    buffer's own temporary folder, removed at release; ``created``: stores made under a root
    the user gave, removed by ``empty()`` only)."""

    def __init__(self) -> None:
        self.memory: Any = None
        self.temp_root: Path | None = None
        self.created: list[Path] = []

    def watch(self, owner: object) -> weakref.finalize:
        """Release everything when ``owner`` is collected or at interpreter exit."""
        return weakref.finalize(owner, self.release)

    def close_memory(self) -> None:
        """Close the memory (idempotent); its folders stay."""
        memory, self.memory = self.memory, None
        if memory is not None:
            memory.close()

    def delete_created(self) -> None:
        """Close the memory and delete the stores it made (not a root the user gave)."""
        self.close_memory()
        for path in self.created:
            shutil.rmtree(path, ignore_errors=True)
        self.created = []

    def release(self) -> None:
        """Close the memory and remove the temporary folder, if the buffer made one."""
        try:
            self.close_memory()
        finally:
            if self.temp_root is not None:
                shutil.rmtree(self.temp_root, ignore_errors=True)
                self.temp_root = None
