"""Completion: fill the pixels a saliency-compressed sample dropped, before it reaches the EM.

A saliency memory stores only a sample's salient pixels (:mod:`carousel.kinds.saliency_codec`); when the swap
engine reads one back, a :class:`Completion` fills the rest -- in the prefetch path, so
``sample()`` never pays for it. One small ABC and a registry by name, so a learned completion
network (trained jointly with the learner, as SAMC suggests) plugs in with
:func:`register_completion` and ``[memory.saliency] completion = "its-name"``.

Built in:

- ``diffusion`` (default): harmonic fill -- every dropped pixel becomes the average of its
  neighbours, solved coarse to fine (a pyramid of masked averages gives each level its start, a
  few Jacobi sweeps smooth it), so a hole fills from its whole border in a handful of sweeps
  instead of the thousands plain diffusion needs. Vectorized over the batch and channels.
- ``mean``: every dropped pixel gets the mean of the sample's kept pixels (per channel): the
  cheapest fill, a baseline.

Both take a dropped pixel from the ``base`` when the code carries one (the saliency codec's
thumbnail, upsampled): measured, that beats every fill from the kept border (:func:`from_base`).

>>> import numpy as np
>>> x = np.zeros((1, 1, 4, 4), np.float32); x[..., :, 0] = 10; x[..., :, 3] = 20
>>> known = np.zeros((1, 1, 4, 4), bool); known[..., :, [0, 3]] = True
>>> filled = make_completion("diffusion").fill(x, known)
>>> bool(((filled[..., 1:3] > 10) & (filled[..., 1:3] < 20)).all())   # between its borders
True
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

_REGISTRY: dict[str, type[Completion]] = {}


class Completion(ABC):
    """Fills dropped pixels. ``fill`` gets float32 ``x`` ``(n, C, H, W)`` (dropped pixels hold
    anything), ``known`` ``(n, 1, H, W)`` bool and, when the code carries one, ``base``: a coarse
    estimate of the whole image ``(n, C, H, W)`` (the upsampled thumbnail); it returns
    ``(n, C, H, W)`` float32 with the known pixels unchanged."""

    name: ClassVar[str]

    @abstractmethod
    def fill(self, x: np.ndarray, known: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        """``x`` with every pixel where ``known`` is False filled in."""


def register_completion(cls: type[Completion]) -> type[Completion]:
    """Class decorator: make ``cls`` available by ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def make_completion(name: str) -> Completion:
    """The registered completion ``name``; ``ValueError`` names the known ones otherwise."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown completion {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def completions() -> list[str]:
    """Names of the registered completions."""
    return sorted(_REGISTRY)


def from_base(x: np.ndarray, known: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Dropped pixels from the base as it is.

    On Fashion-MNIST (theta 0.6, thumbnail 1/4) a one-off comparison while building this (not
    kept as a script) gave a mean error of 24 of 255 on dropped pixels, against 60-80 when the
    kept pixels' difference from the base is diffused into the hole and ~160 without a base: the
    kept region is the object, whose border says little about the background around it.
    ``tests/kinds/test_saliency.py`` checks the base halves the error at least.
    """
    return np.where(known, x, base).astype(np.float32)


def _masked_mean(x: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Per (sample, channel) mean of the known pixels, ``(n, C, 1, 1)``; 0 where none is known."""
    k = known.astype(np.float32)
    count = k.sum(axis=(2, 3), keepdims=True)
    return (x * k).sum(axis=(2, 3), keepdims=True) / np.maximum(count, 1.0)


@register_completion
class MeanFill(Completion):
    """Dropped pixels get the mean of the sample's kept pixels, per channel."""

    name = "mean"

    def fill(self, x: np.ndarray, known: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        if base is not None:
            return from_base(x, known, base)
        return np.where(known, x, _masked_mean(x, known)).astype(np.float32)


@register_completion
class DiffusionFill(Completion):
    """Harmonic fill, coarse to fine (see the module docstring)."""

    name = "diffusion"
    sweeps = 6  # Jacobi sweeps per pyramid level

    def fill(self, x: np.ndarray, known: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        if base is not None:
            return from_base(x, known, base)
        x = x.astype(np.float32, copy=False)
        k = np.broadcast_to(known, x.shape)
        start = self._start(x, known)
        out = np.where(k, x, start)
        return self._smooth(out, x, k)

    def _start(self, x: np.ndarray, known: np.ndarray) -> np.ndarray:
        """A first guess for every pixel: the filled half-resolution image, upsampled."""
        n, c, h, w = x.shape
        if min(h, w) <= 2 or known.all():
            return np.broadcast_to(_masked_mean(x, known), x.shape)
        # Masked 2x2 average pooling (odd sizes padded by edge replication).
        ph, pw = h + h % 2, w + w % 2
        xk = np.pad(x * known, ((0, 0), (0, 0), (0, ph - h), (0, pw - w)), mode="edge")
        kk = np.pad(known.astype(np.float32), ((0, 0), (0, 0), (0, ph - h), (0, pw - w)), mode="edge")
        sx = xk.reshape(n, c, ph // 2, 2, pw // 2, 2).sum(axis=(3, 5))
        sk = kk.reshape(n, 1, ph // 2, 2, pw // 2, 2).sum(axis=(3, 5))
        coarse_known = sk > 0
        coarse = np.where(coarse_known, sx / np.maximum(sk, 1.0), 0.0).astype(np.float32)
        if not coarse_known.any():
            return np.zeros_like(x)
        coarse = np.where(np.broadcast_to(coarse_known, coarse.shape), coarse, self._start(coarse, coarse_known))
        coarse = self._smooth(coarse, coarse, np.broadcast_to(coarse_known, coarse.shape))
        return coarse.repeat(2, axis=2).repeat(2, axis=3)[:, :, :h, :w]

    def _smooth(self, out: np.ndarray, x: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Jacobi sweeps of the 4-neighbour average on unknown pixels (edges replicated)."""
        for _ in range(self.sweeps):
            p = np.pad(out, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
            avg = (p[:, :, :-2, 1:-1] + p[:, :, 2:, 1:-1] + p[:, :, 1:-1, :-2] + p[:, :, 1:-1, 2:]) * 0.25
            out = np.where(k, x, avg)
        return out.astype(np.float32, copy=False)
