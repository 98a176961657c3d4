"""A small PNG codec on zlib + numpy, and JPEG through Pillow when it is installed.

Why our own: the base install has no Pillow, and an adopted image folder
(:mod:`storage_backends.image_folder`) must decode its PNGs in the prefetch path all the same. The
scope is what image data sets hold -- 8-bit, non-interlaced images:

- decoded: colour types gray (bit depths 1, 2, 4, 8), palette (1, 2, 4, 8; a ``tRNS`` chunk gives
  it alpha), gray + alpha, RGB and RGBA (8 bits); all five row filters (None, Sub, Up, Average,
  Paeth); ancillary chunks are skipped (their CRCs still checked);
- refused with :class:`UnsupportedImageError` (a clear message, nothing guessed): interlaced
  (Adam7) images, 16-bit samples, unknown critical chunks;
- refused with :class:`ImageDecodeError`: a bad signature, a truncated file, a chunk whose CRC-32
  does not match, a zlib stream that does not inflate to exactly the rows the header announces
  (inflating stops one byte past that size, so a small file cannot allocate more).

:func:`decode_png` returns ``(H, W)`` uint8 for gray, ``(H, W, C)`` for C = 2 (gray + alpha),
3 (RGB) or 4 (RGBA): the image's own layout; callers convert. :func:`encode_png` writes gray,
gray + alpha, RGB and RGBA with a chosen row filter (tests, tools, ``trainers``' folder writers).

Speed: None, Sub and Up rows are unfiltered with numpy (Sub is a running sum along the row, mod
256); Average and Paeth rows depend on the pixel just decoded to their left and run a Python loop
per byte (~0.1 us a byte here: a 28 x 28 gray image of Paeth rows ~0.1 ms, a 224 x 224 RGB one
~20 ms). Images this codec writes use Up rows by default, which decode at numpy's speed.

JPEG (:func:`decode_jpeg`) is decoded by Pillow when it imports; without it the error names
``pip install pillow``. :func:`decode_image` picks the decoder from the file's first bytes.

>>> import numpy as np
>>> img = np.arange(12, dtype=np.uint8).reshape(3, 4)
>>> data = encode_png(img, filters=4)
>>> data[:8] == PNG_SIGNATURE, decode_png(data).tolist() == img.tolist()
(True, True)
>>> png_header(data)
(3, 4, 1)
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from .errors import StoreError

__all__ = ["PNG_SIGNATURE", "ImageDecodeError", "UnsupportedImageError", "decode_image", "decode_jpeg",
           "decode_png", "encode_png", "png_header"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
#: Pixels one image may have: a header announcing more is refused before anything is inflated
#: (a 16 k x 16 k RGBA image is 1 GiB; data sets of training images are far below this).
MAX_PIXELS = 1 << 28

# colour type -> (name, channels before palette expansion, allowed bit depths)
_COLOUR_TYPES = {0: ("gray", 1, (1, 2, 4, 8, 16)), 2: ("RGB", 3, (8, 16)), 3: ("palette", 1, (1, 2, 4, 8)),
                 4: ("gray+alpha", 2, (8, 16)), 6: ("RGBA", 4, (8, 16))}
_CHANNELS_TO_COLOUR = {1: 0, 2: 4, 3: 2, 4: 6}


class ImageDecodeError(StoreError, ValueError):
    """Image bytes that are not a valid image: bad signature, truncated, CRC mismatch, bad zlib data."""


class UnsupportedImageError(ImageDecodeError):
    """A valid image this codec does not decode (interlaced or 16-bit PNG; JPEG without Pillow)."""


# ---- PNG: reading ---------------------------------------------------------------------------------
def _chunks(data: bytes | memoryview):
    """``(type, payload)`` of each chunk after the signature, CRC-checked, up to and with IEND."""
    mv = memoryview(data)
    if bytes(mv[:8]) != PNG_SIGNATURE:
        raise ImageDecodeError("not a PNG file (bad signature)")
    pos = 8
    while True:
        if pos + 8 > len(mv):
            raise ImageDecodeError(f"truncated PNG: the file ends at byte {len(mv)} before its IEND chunk")
        length, = struct.unpack_from(">I", mv, pos)
        ctype = bytes(mv[pos + 4:pos + 8])
        end = pos + 8 + length
        if length > 0x7FFFFFFF or end + 4 > len(mv):
            raise ImageDecodeError(f"truncated PNG: chunk {ctype!r} at byte {pos} announces {length} bytes, "
                                   f"the file has {max(0, len(mv) - pos - 12)} left")
        crc, = struct.unpack_from(">I", mv, end)
        if zlib.crc32(mv[pos + 4:end]) != crc:
            raise ImageDecodeError(f"PNG chunk {ctype!r} at byte {pos} fails its CRC-32 (damaged file)")
        yield ctype, mv[pos + 8:end]
        if ctype == b"IEND":
            return
        pos = end + 4


def _ihdr(payload: memoryview) -> tuple[int, int, int, int]:
    """``(width, height, bit depth, colour type)``, every field checked."""
    if len(payload) != 13:
        raise ImageDecodeError(f"PNG IHDR chunk of {len(payload)} bytes (13 expected)")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", payload)
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise ImageDecodeError(f"PNG of {width} x {height} pixels: both must be in [1, 2**31)")
    if colour not in _COLOUR_TYPES:
        raise ImageDecodeError(f"PNG colour type {colour} does not exist (0, 2, 3, 4 or 6)")
    name, _, depths = _COLOUR_TYPES[colour]
    if depth not in depths:
        raise ImageDecodeError(f"PNG {name} image of bit depth {depth} does not exist (allowed: {depths})")
    if depth == 16:
        raise UnsupportedImageError(f"16-bit PNG ({name}): only 8-bit images are decoded; convert the data set "
                                    "to 8 bits per sample")
    if compression != 0 or filtering != 0:
        raise ImageDecodeError(f"PNG compression method {compression} / filter method {filtering} (0 / 0 expected)")
    if interlace == 1:
        raise UnsupportedImageError("interlaced (Adam7) PNG: not decoded; re-save the image without interlacing")
    if interlace != 0:
        raise ImageDecodeError(f"PNG interlace method {interlace} does not exist")
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"PNG of {width} x {height} pixels: more than {MAX_PIXELS} pixels, refused")
    return width, height, depth, colour


def png_header(data: bytes | memoryview) -> tuple[int, int, int]:
    """``(height, width, channels)`` of a PNG from its header alone (channels after palette
    expansion: 3, or 4 with a ``tRNS`` chunk, for a palette image). Raises like :func:`decode_png`
    on a bad or unsupported header."""
    it = _chunks(data)
    ctype, payload = next(it)
    if ctype != b"IHDR":
        raise ImageDecodeError(f"PNG starts with chunk {ctype!r}, not IHDR")
    width, height, _, colour = _ihdr(payload)
    channels = _COLOUR_TYPES[colour][1]
    if colour == 3:  # the tRNS chunk, if any, comes before the first IDAT
        channels = 3
        for ctype, _ in it:
            if ctype == b"tRNS":
                channels = 4
            if ctype in (b"IDAT", b"IEND"):
                break
    return height, width, channels


def decode_png(data: bytes | memoryview) -> np.ndarray:
    """Decode a PNG: ``(H, W)`` uint8 for gray, ``(H, W, C)`` for gray + alpha, RGB, RGBA (and
    palette images, expanded to RGB or, with ``tRNS``, RGBA). Raises :class:`ImageDecodeError` for
    a damaged file and :class:`UnsupportedImageError` for an interlaced or 16-bit one."""
    header = None
    palette = alpha = None
    idat: list[memoryview] = []
    for ctype, payload in _chunks(data):
        if header is None:
            if ctype != b"IHDR":
                raise ImageDecodeError(f"PNG starts with chunk {ctype!r}, not IHDR")
            header = _ihdr(payload)
        elif ctype == b"IDAT":
            idat.append(payload)
        elif ctype == b"PLTE":
            if len(payload) % 3 or not 0 < len(payload) <= 768:
                raise ImageDecodeError(f"PNG PLTE chunk of {len(payload)} bytes (a multiple of 3, at most 768)")
            palette = np.frombuffer(payload, np.uint8).reshape(-1, 3)
        elif ctype == b"tRNS":
            alpha = np.frombuffer(payload, np.uint8)
        elif ctype == b"IEND":
            break
        elif ctype[0] & 0x20 == 0 and ctype != b"IHDR":  # an uppercase first letter: critical
            raise UnsupportedImageError(f"PNG critical chunk {ctype!r} is not understood")
    if not idat:
        raise ImageDecodeError("PNG without image data (no IDAT chunk)")
    width, height, depth, colour = header
    channels = _COLOUR_TYPES[colour][1]
    bpp = max(1, channels * depth // 8)  # bytes per complete pixel, as the filters count them
    row_bytes = (width * channels * depth + 7) // 8
    want = height * (row_bytes + 1)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(b"".join(idat), want + 1)  # one byte more tells "too long"
    except zlib.error as exc:
        raise ImageDecodeError(f"PNG image data does not inflate: {exc}") from None
    if len(raw) != want:
        raise ImageDecodeError(f"PNG image data inflates to {len(raw)}{'+' if len(raw) > want else ''} bytes; "
                               f"a {width} x {height} image has {want} (truncated or damaged file)")
    rows = _unfilter(np.frombuffer(raw, np.uint8).reshape(height, row_bytes + 1), bpp)
    if depth < 8:
        rows = _unpack_bits(rows, width, depth)
        if colour == 0:
            rows = rows * np.uint8(255 // (2**depth - 1))  # scaled to 0..255, as PNG readers do
    if colour == 3:
        if palette is None:
            raise ImageDecodeError("PNG palette image without a PLTE chunk")
        idx = rows.reshape(height, width)
        if int(idx.max()) >= palette.shape[0]:
            raise ImageDecodeError(f"PNG palette index {int(idx.max())} past the {palette.shape[0]} palette entries")
        if alpha is not None:
            full = np.full(256, 255, np.uint8)
            full[:min(alpha.size, 256)] = alpha[:256]
            return np.concatenate([palette[idx], full[idx][..., None]], axis=2)
        return palette[idx]
    if channels == 1:
        return rows.reshape(height, width)
    return rows.reshape(height, width, channels)


def _unfilter(scan: np.ndarray, bpp: int) -> np.ndarray:
    """Undo the per-row filters of ``scan`` (rows of filter byte + filtered bytes): the image bytes."""
    ftypes = scan[:, 0]
    if ftypes.max(initial=0) > 4:
        bad = int(np.flatnonzero(ftypes > 4)[0])
        raise ImageDecodeError(f"PNG row {bad} has filter type {int(ftypes[bad])} (0-4 exist)")
    out = np.array(scan[:, 1:])  # writable copy; None rows are done
    height, n = out.shape
    if not ftypes.any():
        return out
    prior = np.zeros(n, np.uint8)
    r = 0
    while r < height:
        f = int(ftypes[r])
        if f == 2:  # a run of Up rows is a running sum down the columns, from the row above the run
            end = r + 1
            while end < height and ftypes[end] == 2:
                end += 1
            block = out[r:end]
            block[0] += prior
            np.cumsum(block, axis=0, dtype=np.uint8, out=block)
            r = end
        else:
            row = out[r]
            if f == 1:  # Sub: a running sum along the row, per byte of a pixel (mod 256)
                if n % bpp == 0:
                    np.cumsum(row.reshape(-1, bpp), axis=0, dtype=np.uint8, out=row.reshape(-1, bpp))
                else:  # sub-byte pixels: bpp is 1
                    np.cumsum(row, dtype=np.uint8, out=row)
            elif f in (3, 4):
                out[r] = _avg_paeth(row.tobytes(), prior.tobytes(), bpp, f)
            r += 1
        prior = out[r - 1]
    return out


def _avg_paeth(row: bytes, prior: bytes, bpp: int, f: int) -> np.ndarray:
    """One Average (3) or Paeth (4) row: each byte depends on the one decoded just left of it."""
    cur = bytearray(row)
    n = len(cur)
    if f == 3:
        for i in range(min(bpp, n)):
            cur[i] = (cur[i] + (prior[i] >> 1)) & 0xFF
        for i in range(bpp, n):
            cur[i] = (cur[i] + ((cur[i - bpp] + prior[i]) >> 1)) & 0xFF
    else:
        for i in range(min(bpp, n)):
            cur[i] = (cur[i] + prior[i]) & 0xFF  # no left neighbour: Paeth picks the byte above
        for i in range(bpp, n):
            a, b, c = cur[i - bpp], prior[i], prior[i - bpp]
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[i] = (cur[i] + pred) & 0xFF
    return np.frombuffer(bytes(cur), np.uint8)


def _unpack_bits(rows: np.ndarray, width: int, depth: int) -> np.ndarray:
    """Sub-byte samples (1, 2 or 4 bits, most significant first) -> one uint8 per sample."""
    bits = np.unpackbits(rows, axis=1)[:, :width * depth].reshape(rows.shape[0], width, depth)
    weights = (1 << np.arange(depth - 1, -1, -1)).astype(np.uint8)
    return (bits * weights).sum(axis=2, dtype=np.uint8)


# ---- PNG: writing ---------------------------------------------------------------------------------
def encode_png(image: np.ndarray, *, filters: int | Sequence[int] = 2, level: int = 6) -> bytes:
    """Encode an 8-bit image as a PNG.

    Args:
        image: uint8 ``(H, W)`` or ``(H, W, 1)`` (gray), ``(H, W, 2)`` (gray + alpha),
            ``(H, W, 3)`` (RGB) or ``(H, W, 4)`` (RGBA).
        filters: the row filter, 0-4 (None, Sub, Up, Average, Paeth) for every row, or one per row.
            Up (the default) decodes fastest with :func:`decode_png`.
        level: zlib compression level, 0-9.

    Raises:
        ValueError: another dtype or shape, or a filter outside 0-4.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"encode_png takes uint8 images, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in _CHANNELS_TO_COLOUR) or 0 in img.shape:
        raise ValueError(f"encode_png takes (H, W) or (H, W, 1|2|3|4) images, got shape {img.shape}")
    height, width = img.shape[:2]
    channels = 1 if img.ndim == 2 else img.shape[2]
    rows = np.ascontiguousarray(img).reshape(height, width * channels)
    ftypes = np.broadcast_to(np.asarray(filters, dtype=np.int64), (height,))
    if ftypes.min() < 0 or ftypes.max() > 4:
        raise ValueError(f"PNG row filters are 0-4, got {sorted(set(ftypes.tolist()))}")
    scan = np.empty((height, width * channels + 1), np.uint8)
    scan[:, 0] = ftypes
    scan[:, 1:] = _filter(rows, ftypes, channels)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, _CHANNELS_TO_COLOUR[channels], 0, 0, 0)
    return b"".join([PNG_SIGNATURE, _chunk(b"IHDR", ihdr), _chunk(b"IDAT", zlib.compress(scan.tobytes(), level)),
                     _chunk(b"IEND", b"")])


def _filter(rows: np.ndarray, ftypes: np.ndarray, bpp: int) -> np.ndarray:
    """Forward filters: every row's predictor is known from the original bytes, so all vectorize."""
    x = rows.astype(np.int16)
    above = np.zeros_like(x)
    above[1:] = x[:-1]
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    upleft = np.zeros_like(x)
    upleft[1:, bpp:] = x[:-1, :-bpp]
    p = left + above - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - above), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, above, upleft))
    pred = np.select([ftypes[:, None] == 1, ftypes[:, None] == 2, ftypes[:, None] == 3, ftypes[:, None] == 4],
                     [left, above, (left + above) >> 1, paeth], 0)
    return ((x - pred) & 0xFF).astype(np.uint8)


def _chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


# ---- JPEG and dispatch ----------------------------------------------------------------------------
def decode_jpeg(data: bytes | memoryview) -> np.ndarray:
    """Decode a JPEG with Pillow: ``(H, W)`` uint8 for gray, ``(H, W, 3)`` for colour (CMYK and
    YCCK are converted to RGB, as Pillow's ``convert("RGB")`` does). Raises
    :class:`UnsupportedImageError` naming ``pip install pillow`` when Pillow is not installed, and
    :class:`ImageDecodeError` for a damaged file."""
    try:
        from PIL import Image
    except ImportError:
        raise UnsupportedImageError("JPEG images need Pillow, which is not installed: pip install pillow "
                                    "(or convert the data set to PNG)") from None
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            if img.format != "JPEG":
                raise ImageDecodeError(f"not a JPEG file (Pillow reads it as {img.format})")
            img.load()
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8).copy()
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, ValueError, SyntaxError, ... on bad files
        raise ImageDecodeError(f"JPEG does not decode: {type(exc).__name__}: {exc}") from None


def decode_image(data: bytes | memoryview) -> np.ndarray:
    """Decode a PNG or a JPEG, told apart by their first bytes (not by a file name)."""
    head = bytes(memoryview(data)[:8])
    if head == PNG_SIGNATURE:
        return decode_png(data)
    if head[:3] == JPEG_SOI:
        return decode_jpeg(data)
    raise ImageDecodeError(f"neither a PNG nor a JPEG file (first bytes {head!r})")
