"""Carousel inside the frameworks continual-learning users already have: one adapter module each (a front).
May import the memory core (and its framework, lazily); never the daemon; nothing in the core imports it.

Each integration lives in its own module and imports its framework only when used, so none of
them is a dependency of carousel:

- :mod:`carousel.integrations.mammoth`: ``CarouselBuffer``, Mammoth's rehearsal ``Buffer`` interface
  (``add_data`` / ``get_data`` / ``is_empty`` / ``len``) on a carousel memory (no framework import).
- :mod:`carousel.integrations.torchrl`: ``CarouselStorage``, a TorchRL ``Storage`` whose data lives
  in a carousel storage tier (LMDB flash or Zarr disk); ``pip install carousel[torchrl]``.
- PyTorch data loading: :class:`carousel.ReplayDataset` (an ``IterableDataset`` of replay batches
  from a daemon, one connection per ``DataLoader`` worker); the recipe is in the README.
"""
