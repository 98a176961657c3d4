"""The ``saliency`` codec (kind ``saliency``, SAMC): a sample keeps only its salient pixels exactly.

``add()`` takes a saliency map per sample (``(H, W)``, in [0, 1] or 0..255); write-behind encodes each
sample as its bit-packed keep-mask (saliency >= ``theta``), the kept pixels, and the other pixels
at ``background_bits`` bits each (2 of 8 by default: coarse in value but sharp in space; the
lowest step decodes to 0, so a black background stays black) -- or, with ``background_bits = 0``,
not at all, with a coarse thumbnail (area averages over ``thumbnail`` x ``thumbnail`` cells) that
completion (:mod:`carousel.kinds.completion`) starts from. All zstd-compressed, in a fixed-size
``x_code`` field with its length in ``x_len``; the tiers compress their records (``codec =
"zstd"``), so the unused tail of ``x_code`` takes no room and the bytes on storage fall with
``theta``. Reading back (the swap engine's prefetch, recovery) decodes (and completes) before the
sample reaches the EM.

Measured (``python -m benchmarks.saliency``) on Fashion-MNIST with Grad-CAM maps of a reduced
ResNet-18 early in training (30 % of the pixels salient at theta 0.6), against 794-byte raw
records (575 bytes raw + zstd): 2-bit background 361 bytes/sample, and the same model classifies
the decoded images as well as the originals (78.0 vs 78.0 %); 1-bit 316 bytes (74.0 %); dropped
with a 1/4 thumbnail 315 bytes (74.8 %, visibly blurred); dropped without one 266 bytes (56.5 %:
the background fills with the object's border colour). Dropping is what SAMC does; the coarse
background is what keeps replay from teaching the model blurred images.

:meth:`SaliencyCodec.nbytes` is a record's real size (the code's length, not its padded field): the
measure of a tier's byte budget (``capacity = "64MiB"``), so compressed samples let more of them fit.

>>> import numpy as np
>>> codec = SaliencyCodec({"x": ((1, 8, 8), "uint8"), "y": ((), "int64"), "task": ((), "int16")}, theta=0.5)
>>> x = np.arange(64, dtype=np.uint8).reshape(1, 1, 8, 8)
>>> sal = np.zeros((1, 8, 8), np.uint8); sal[:, :, :4] = 255          # the left half is salient
>>> rec = codec.encode({"x": x, "y": np.zeros(1, np.int64), "task": np.zeros(1, np.int16), "saliency": sal})
>>> back = codec.decode(rec)
>>> bool((back["x"][0, 0, :, :4] == x[0, 0, :, :4]).all()), int(codec.nbytes(rec)[0]) < 64 + 10
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numcodecs import Zstd

from storage_backends import Schema

from ..config import SALIENCY_FIELD
from .base import Codec, Fields
from .completion import Completion, make_completion

CODE_FIELD = "x_code"  # a saliency record's code: mask bits + kept pixels, zstd, zero-padded
LEN_FIELD = "x_len"    # bytes of the code that are real


def _zstd_bound(n: int) -> int:
    """ZSTD_COMPRESSBOUND(n) plus a frame header's worth: no zstd frame of n bytes is longer."""
    return n + (n >> 8) + ((128 * 1024 - n) >> 11 if n < 128 * 1024 else 0) + 32


class SaliencyCodec(Codec):
    """Keep-mask, salient pixels exact, the rest coarse or dropped; zstd (see the module docstring)."""

    name = "saliency"

    def __init__(self, fields: Fields, theta: float = 0.6, completion: Completion | str = "diffusion",
                 level: int = 3, thumbnail: int = 4, background_bits: int = 2) -> None:
        super().__init__(fields)
        shape, dtype = self.fields["x"]
        if len(shape) not in (2, 3):
            raise ValueError(f"a saliency memory holds images, (H, W) or (C, H, W); x is {shape}")
        for name in (CODE_FIELD, LEN_FIELD, SALIENCY_FIELD):
            if name in self.fields:
                raise ValueError(f"field {name!r} is a saliency memory's own; name your extra field otherwise")
        self.theta = float(theta)
        # A map given as 0..255 keeps pixels >= this (theta 0 keeps everything).
        self._threshold = int(math.ceil(self.theta * 255 - 1e-9))
        self.completion = make_completion(completion) if isinstance(completion, str) else completion
        self._zstd = Zstd(level=level)
        self._shape = shape
        self._dtype = np.dtype(dtype)
        self._hw = shape[-2:]
        self._channels = shape[0] if len(shape) == 3 else 1
        self._mask_bytes = (self._hw[0] * self._hw[1] + 7) // 8
        if not 0 <= int(thumbnail) <= 255:
            raise ValueError(f"thumbnail must be a downscale factor in [0, 255], got {thumbnail}")
        if not 0 <= int(background_bits) <= 8:
            raise ValueError(f"background_bits must be in [0, 8], got {background_bits}")
        if background_bits and self._dtype.kind != "u":
            raise ValueError(f"background_bits > 0 quantizes unsigned pixels; x is {self._dtype} (use 0: drop "
                             "the background and complete it)")
        self.background_bits = int(background_bits)
        # A thumbnail is what completion starts from: only dropped pixels need one.
        self.thumbnail = int(thumbnail) if not self.background_bits else 0
        # Worst case: header, mask, the largest thumbnail (factor 1: the image again), every pixel.
        self._cap = _zstd_bound(2 + self._mask_bytes + 2 * math.prod(shape) * self._dtype.itemsize)
        self._rest = {k: v for k, v in self.fields.items() if k != "x"}
        self._rest_nbytes = Schema(self._rest).record_nbytes

    @property
    def inputs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {SALIENCY_FIELD: (tuple(self._hw), "uint8")}

    @property
    def stored(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {CODE_FIELD: ((self._cap,), "uint8"), LEN_FIELD: ((), "uint32"), **self._rest}

    def keep_mask(self, saliency: np.ndarray) -> np.ndarray:
        """``(n, H, W)`` bool: the pixels a sample keeps exactly (saliency >= theta)."""
        return np.asarray(saliency) >= self._threshold

    def encode(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(batch["x"]).reshape(-1, self._channels, *self._hw)
        keep = self.keep_mask(batch[SALIENCY_FIELD])
        n = x.shape[0]
        code = np.zeros((n, self._cap), np.uint8)
        lengths = np.zeros(n, np.uint32)
        bits = np.packbits(keep.reshape(n, -1), axis=1)
        # Decoding follows the header, not the config of the day.
        header = bytes([self.thumbnail, self.background_bits])
        thumbs = _thumbnails(x, self.thumbnail).astype(self._dtype) if self.thumbnail else None
        shift = self._dtype.itemsize * 8 - self.background_bits
        for i in range(n):
            parts = [header, bits[i].tobytes()]
            if thumbs is not None:
                parts.append(thumbs[i].tobytes())
            parts.append(np.ascontiguousarray(x[i][:, keep[i]]).tobytes())
            if self.background_bits:
                parts.append(_pack(x[i][:, ~keep[i]].ravel() >> shift, self.background_bits))
            frame = self._zstd.encode(b"".join(parts))
            if len(frame) > self._cap:  # cannot happen for a zstd frame (see _zstd_bound); say so if it does
                raise ValueError(f"a saliency code of {len(frame)} bytes exceeds its field ({self._cap})")
            code[i, :len(frame)] = np.frombuffer(frame, np.uint8)
            lengths[i] = len(frame)
        return {CODE_FIELD: code, LEN_FIELD: lengths, **{k: batch[k] for k in self._rest}}

    def decode(self, records: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        code, lengths = records[CODE_FIELD], records[LEN_FIELD]
        n = lengths.shape[0]
        h, w = self._hw
        c = self._channels
        x = np.zeros((n, c, h, w), self._dtype)
        known = np.zeros((n, 1, h, w), bool)
        base = np.zeros((n, c, h, w), np.float32)
        has_base = np.zeros(n, bool)
        top = np.iinfo(self._dtype).max if self._dtype.kind in "iu" else None
        for i in range(n):
            raw = bytes(self._zstd.decode(code[i, :int(lengths[i])].tobytes()))
            factor, bg_bits, off = raw[0], raw[1], 2
            keep = np.unpackbits(np.frombuffer(raw, np.uint8, self._mask_bytes, off))[: h * w].astype(bool)
            keep = keep.reshape(h, w)
            off += self._mask_bytes
            if factor:
                th, tw = -(-h // factor), -(-w // factor)
                thumb = np.frombuffer(raw, self._dtype, c * th * tw, off).reshape(c, th, tw)
                off += thumb.nbytes
                base[i] = _upsample(thumb.astype(np.float32), h, w, factor)
                has_base[i] = True
            kept = int(keep.sum()) * c
            x[i][:, keep] = np.frombuffer(raw, self._dtype, kept, off).reshape(c, -1)
            off += kept * self._dtype.itemsize
            if bg_bits:  # the rest, coarse: 0 stays 0 (a black background stays black), else mid-step
                v = _unpack(raw[off:], (h * w) * c - kept, bg_bits).astype(np.int64)
                shift = self._dtype.itemsize * 8 - bg_bits
                x[i][:, ~keep] = np.where(v == 0, 0, np.minimum((v << shift) + (1 << shift) // 2, top)
                                          ).astype(self._dtype).reshape(c, -1)
                known[i, 0] = True
            else:
                known[i, 0] = keep
        if not known.all():
            drop = ~known.reshape(n, -1).all(axis=1)  # only samples with dropped pixels are completed
            filled = self._complete(x[drop], known[drop], base[drop], has_base[drop])
            x[drop] = np.where(known[drop], x[drop], filled)
        out = {"x": x.reshape(n, *self._shape)}
        out.update({k: records[k] for k in self._rest if k in records})
        return out

    def _complete(self, x: np.ndarray, known: np.ndarray, base: np.ndarray, has_base: np.ndarray) -> np.ndarray:
        filled = self.completion.fill(x.astype(np.float32), known, base if has_base.all() else None)
        if has_base.any() and not has_base.all():  # a mix of codes written under two configs
            filled[has_base] = self.completion.fill(x[has_base].astype(np.float32), known[has_base],
                                                    base[has_base])
        if self._dtype.kind in "iu":
            info = np.iinfo(self._dtype)
            filled = np.clip(np.rint(filled), info.min, info.max)
        return filled.astype(self._dtype)

    def nbytes(self, records: Mapping[str, np.ndarray]) -> np.ndarray:
        # The code's real length, its length field and the other fields (label, task, extras).
        return records[LEN_FIELD].astype(np.int64) + (self._rest_nbytes + 4)


def _pack(values: np.ndarray, bits: int) -> bytes:
    """``bits``-bit unsigned values (each < 2**bits), packed big-endian, bit after bit."""
    planes = np.unpackbits(values.astype(np.uint8)[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(planes.ravel()).tobytes()


def _unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    """The inverse of :func:`_pack`: ``count`` values of ``bits`` bits."""
    planes = np.unpackbits(np.frombuffer(data, np.uint8))[: count * bits].reshape(count, bits)
    full = np.zeros((count, 8), np.uint8)
    full[:, 8 - bits:] = planes
    return np.packbits(full, axis=1)[:, 0]


def _thumbnails(x: np.ndarray, factor: int) -> np.ndarray:
    """``(n, C, ceil(H/f), ceil(W/f))`` area averages of ``x`` (edges replicated to a multiple of f)."""
    n, c, h, w = x.shape
    th, tw = -(-h // factor), -(-w // factor)
    p = np.pad(x.astype(np.float32), ((0, 0), (0, 0), (0, th * factor - h), (0, tw * factor - w)), mode="edge")
    t = p.reshape(n, c, th, factor, tw, factor).mean(axis=(3, 5))
    return np.rint(t) if x.dtype.kind in "iu" else t


def _upsample(thumb: np.ndarray, h: int, w: int, factor: int) -> np.ndarray:
    """Bilinear upsampling of a ``(C, th, tw)`` thumbnail back to ``(C, h, w)`` (cell centres aligned)."""
    def axis(size: int, cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(size) + 0.5) / factor - 0.5, 0, cells - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, cells - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    ylo, yhi, fy = axis(h, thumb.shape[1])
    xlo, xhi, fx = axis(w, thumb.shape[2])
    rows = thumb[:, ylo] * (1 - fy)[None, :, None] + thumb[:, yhi] * fy[None, :, None]
    return rows[:, :, xlo] * (1 - fx) + rows[:, :, xhi] * fx
