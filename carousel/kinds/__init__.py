"""Memory kinds: codecs that turn samples into a tier's records and back (``raw``, ``saliency``), completion, Grad-CAM.
May import numpy, numcodecs, torch (Grad-CAM only), ``storage_backends`` and ``carousel.config``; never the daemon.

The memory core uses a kind only through this package's names below and :mod:`carousel.kinds.base`
(``tests/test_layout.py`` holds both rules). Modules:

- ``base.py``: the :class:`Codec` ABC;
- ``raw.py``: :class:`RawCodec` (kinds ``plain`` and ``coreset``);
- ``saliency_codec.py``: :class:`SaliencyCodec` (kind ``saliency``, SAMC);
- ``completion.py``: the :class:`~carousel.kinds.completion.Completion` ABC and registry that fill a
  saliency sample's dropped pixels on decode;
- ``saliency.py``: trainer-side Grad-CAM (``grad_cam``, ``last_conv_block``), torch only; never
  imported by the memory (nor here: ``import carousel.kinds`` stays torch-free).
"""

from __future__ import annotations

from ..config import MemoryConfig
from .base import Codec, Fields
from .raw import RawCodec
from .saliency_codec import SaliencyCodec

__all__ = ["Codec", "RawCodec", "SaliencyCodec", "make_codec"]


def make_codec(memory: MemoryConfig, fields: Fields) -> Codec:
    """The codec of a memory's kind."""
    if memory.kind == "saliency":
        sc = memory.saliency
        return SaliencyCodec(fields, sc.theta, sc.completion, sc.level, sc.thumbnail, sc.background_bits)
    return RawCodec(fields)
