"""carousel: a storage-tiered replay memory for continual learning.

A small episodic memory in RAM, every sample also kept on flash (LMDB) and disk (Zarr) tiers,
swapped asynchronously so a learner replays far more of its past at the same speed (CarM,
DAC 2022). Today this package holds the command line (``carousel store info|verify``); the
storage tiers are :mod:`storage_backends`.
"""

__version__ = "0.1.0"
