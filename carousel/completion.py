"""``carousel.completion``: the completion registry's path the README showed users, kept importable.

Completion lives in :mod:`carousel.kinds.completion` (the memory kinds' room); import it from
there. The registry is the same object: a completion registered through either path is known to
every saliency memory. Nothing inside carousel imports this module.

>>> import carousel.kinds.completion
>>> register_completion is carousel.kinds.completion.register_completion
True
"""

from __future__ import annotations

from .kinds.completion import Completion, completions, make_completion, register_completion

__all__ = ["Completion", "completions", "make_completion", "register_completion"]
