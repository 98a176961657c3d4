"""carousel: a storage-tiered replay memory for continual learning.

A small episodic memory (EM) in RAM, every sample also kept on flash (LMDB) and disk (Zarr)
tiers, and a swap engine that refills EM slots with other stored samples in the background, so a
learner replays far more of its past at the same speed (Carousel Memory, CarM, DAC 2022).

>>> from carousel import CarouselMemory  # doctest: +SKIP
>>> mem = CarouselMemory.from_toml("deploy/profiles/laptop.toml")  # doctest: +SKIP
"""

from .batch import Batch
from .config import CarouselConfig, ConfigError, load_config
from .memory import CarouselMemory, MemoryInputError
from .write_behind import WriteBehindError

__version__ = "0.1.0"
__all__ = ["Batch", "CarouselConfig", "CarouselMemory", "ConfigError", "MemoryInputError", "WriteBehindError",
           "load_config", "__version__"]
