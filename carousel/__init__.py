"""carousel: a storage-tiered replay memory for continual learning.

A small episodic memory (EM) in RAM, every sample also kept on flash (LMDB) and disk (Zarr)
tiers, and a swap engine that refills EM slots with other stored samples in the background, so a
learner replays far more of its past at the same speed (Carousel Memory, CarM, DAC 2022).

Example (not a doctest: it needs a memory.toml and a running daemon)::

    from carousel import CarouselMemory
    mem = CarouselMemory.from_toml("memory.toml")  # in-process
    mem = carousel.connect()  # or served by `carousel serve`
"""

from .batch import Batch
from .config import CarouselConfig, ConfigError, load_config
from .inputs import MemoryInputError
from .memory import CarouselMemory
from .write_behind import WriteBehindError
from .client import DaemonRestartedError, MemoryClient, connect
from .dataset import ReplayDataset, StreamReplayDataset
from .wire import RemoteError

__version__ = "0.1.0"
__all__ = ["Batch", "CarouselConfig", "CarouselMemory", "ConfigError", "DaemonRestartedError", "MemoryClient", "MemoryInputError",
           "RemoteError", "ReplayDataset", "StreamReplayDataset", "WriteBehindError", "connect", "load_config", "__version__"]
