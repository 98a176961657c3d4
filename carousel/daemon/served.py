"""A memory as the daemon serves it: the memory, its name, and the per-memory write lock and epoch."""

from __future__ import annotations

import threading
from typing import Any

from ..memory import CarouselMemory


class Served:
    """One named memory and what the daemon keeps beside it."""

    def __init__(self, name: str, memory: CarouselMemory) -> None:
        self.name, self.memory = name, memory
        self.write_lock = threading.Lock()  # add / observe / checkpoint: one at a time per memory
        self.epoch = 0                      # bumped by every add: rings drop short batches made before it

    def schema(self) -> dict[str, Any]:
        """The fields ``add`` takes (a saliency memory's map included)."""
        return {name: [list(shape), dtype] for name, (shape, dtype) in self.memory.input_fields.items()}

