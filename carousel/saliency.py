"""``carousel.saliency``: the Grad-CAM path the README showed users, kept importable.

Grad-CAM lives in :mod:`carousel.kinds.saliency` (the memory kinds' room); import it from there.
Nothing inside carousel imports this module.

>>> import carousel.kinds.saliency
>>> grad_cam is carousel.kinds.saliency.grad_cam
True
"""

from __future__ import annotations

from .kinds.saliency import grad_cam, last_conv_block

__all__ = ["grad_cam", "last_conv_block"]
