"""storage_backends.png: round trips, every row filter (rows filtered here, by a reference written
for the test), sub-byte and palette images, and every kind of bad input refused with a clear error."""

from __future__ import annotations

import io
import struct
import sys
import zlib

import numpy as np
import pytest

from storage_backends.png import (
    ImageDecodeError,
    UnsupportedImageError,
    decode_image,
    decode_jpeg,
    decode_png,
    encode_png,
    png_header,
)

RNG = np.random.default_rng(7)


def chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def png(width, height, depth, colour, scan: bytes, *, interlace=0, extra=(), compress=True) -> bytes:
    """A PNG built by hand from already-filtered scanlines (each row: filter byte + bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    body = zlib.compress(scan) if compress else scan
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(chunk(t, p) for t, p in extra)
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def reference_filter(rows: list[list[int]], ftypes: list[int], bpp: int) -> bytes:
    """The PNG spec's filters, byte by byte in plain Python (independent of the codec's numpy ones)."""
    out = bytearray()
    prior = [0] * len(rows[0])
    for row, f in zip(rows, ftypes):
        out.append(f)
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = prior[i]
            c = prior[i - bpp] if i >= bpp else 0
            if f == 0:
                pred = 0
            elif f == 1:
                pred = a
            elif f == 2:
                pred = b
            elif f == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out.append((x - pred) % 256)
        prior = row
    return bytes(out)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_every_filter_type_from_rows_filtered_here(channels):
    img = RNG.integers(0, 256, (10, 7, channels), dtype=np.uint8)
    rows = [list(r) for r in img.reshape(10, -1).tolist()]
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    for ftypes in ([0] * 10, [1] * 10, [2] * 10, [3] * 10, [4] * 10, [0, 1, 2, 3, 4, 4, 3, 2, 1, 0]):
        data = png(7, 10, 8, colour, reference_filter(rows, ftypes, channels))
        got = decode_png(data)
        assert got.tolist() == (img[:, :, 0] if channels == 1 else img).tolist(), ftypes


@pytest.mark.parametrize("shape", [(28, 28), (5, 9, 1), (6, 4, 2), (13, 11, 3), (3, 17, 4), (1, 1)])
@pytest.mark.parametrize("filters", [0, 1, 2, 3, 4, "mixed"])
def test_encode_decode_round_trip(shape, filters):
    img = RNG.integers(0, 256, shape, dtype=np.uint8)
    f = RNG.integers(0, 5, shape[0]).tolist() if filters == "mixed" else filters
    data = encode_png(img, filters=f)
    want = img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img
    assert decode_png(data).tolist() == want.tolist()
    assert png_header(data) == (shape[0], shape[1], 1 if img.ndim == 2 else img.shape[2])
    assert decode_image(data).tolist() == want.tolist()


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_sub_byte_gray_and_palette(depth):
    width, height, top = 11, 3, 2**depth - 1
    values = RNG.integers(0, top + 1, (height, width))
    packed = []
    for row in values.tolist():  # samples packed most significant first, rows padded to a byte
        bits = "".join(format(v, f"0{depth}b") for v in row)
        bits += "0" * (-len(bits) % 8)
        packed.append([0] + [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)])
    scan = bytes(b for row in packed for b in row)
    gray = decode_png(png(width, height, depth, 0, scan))
    assert gray.tolist() == (values * (255 // top)).tolist()
    palette = RNG.integers(0, 256, (top + 1, 3), dtype=np.uint8)
    pal = decode_png(png(width, height, depth, 3, scan, extra=[(b"PLTE", palette.tobytes())]))
    assert pal.tolist() == palette[values].tolist()
    alpha = bytes(range(top + 1))
    rgba = decode_png(png(width, height, depth, 3, scan, extra=[(b"PLTE", palette.tobytes()), (b"tRNS", alpha)]))
    assert rgba.shape == (height, width, 4) and rgba[..., 3].tolist() == values.tolist()


def test_pillow_agrees_both_ways():
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed: the cross-check with it is skipped")
    for mode, shape in (("L", (21, 19)), ("RGB", (16, 23, 3)), ("RGBA", (9, 8, 4))):
        img = RNG.integers(0, 256, shape, dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img, mode).save(buf, "PNG", optimize=True)  # Pillow's adaptive filters
        assert decode_png(buf.getvalue()).tolist() == img.tolist()
        assert np.asarray(Image.open(io.BytesIO(encode_png(img, filters=4)))).tolist() == img.tolist()


def good() -> bytes:
    return encode_png(RNG.integers(0, 256, (8, 8), dtype=np.uint8))


@pytest.mark.parametrize("cut", [0, 5, 8, 20, 33, 40, -13, -1])
def test_truncated_files_are_refused(cut):
    with pytest.raises(ImageDecodeError, match="truncated|signature"):
        decode_png(good()[:cut])


def test_damaged_files_are_refused():
    data = bytearray(good())
    data[45] ^= 0x40  # inside the IDAT payload
    with pytest.raises(ImageDecodeError, match="fails its CRC-32"):
        decode_png(bytes(data))
    with pytest.raises(ImageDecodeError, match="bad signature"):
        decode_png(b"GIF89a" + bytes(40))
    with pytest.raises(ImageDecodeError, match="does not inflate"):
        decode_png(png(2, 2, 8, 0, b"\x00" * 50, compress=False))
    with pytest.raises(ImageDecodeError, match="inflates to 3 bytes"):
        decode_png(png(2, 2, 8, 0, b"\x00\x01\x02"))  # rows missing
    with pytest.raises(ImageDecodeError, match=r"inflates to 7\+ bytes"):
        decode_png(png(2, 2, 8, 0, bytes(20)))  # more data than the image has
    with pytest.raises(ImageDecodeError, match="filter type 5"):
        decode_png(png(2, 2, 8, 0, b"\x00\x01\x02\x05\x01\x02"))
    with pytest.raises(ImageDecodeError, match="without a PLTE"):
        decode_png(png(2, 1, 8, 3, b"\x00\x00\x00"))
    with pytest.raises(ImageDecodeError, match="palette index 5"):
        decode_png(png(2, 1, 8, 3, b"\x00\x00\x05", extra=[(b"PLTE", bytes(6))]))
    with pytest.raises(ImageDecodeError, match="neither a PNG nor a JPEG"):
        decode_image(b"plain text")


def test_unsupported_images_say_what_to_do():
    with pytest.raises(UnsupportedImageError, match="interlaced"):
        decode_png(png(2, 2, 8, 0, bytes(6), interlace=1))
    with pytest.raises(UnsupportedImageError, match="16-bit"):
        decode_png(png(2, 2, 16, 0, bytes(10)))
    with pytest.raises(UnsupportedImageError, match="critical chunk b'ABCD'"):
        decode_png(png(2, 2, 8, 0, bytes(6), extra=[(b"ABCD", b"x")]))
    decode_png(png(2, 2, 8, 0, bytes(6), extra=[(b"tEXt", b"k\x00v")]))  # ancillary: skipped


def test_jpeg_through_pillow_or_a_clear_error(monkeypatch):
    pytest.importorskip("PIL.Image", reason="Pillow is not installed: JPEG decoding is skipped")
    from PIL import Image
    img = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))
    for mode, arr in (("L", img), ("RGB", np.stack([img, img[::-1], img], axis=2))):
        buf = io.BytesIO()
        Image.fromarray(arr, mode).save(buf, "JPEG", quality=95)
        got = decode_image(buf.getvalue())
        assert got.shape == arr.shape and np.abs(got.astype(int) - arr).max() <= 12  # lossy, but that image
    with pytest.raises(ImageDecodeError, match="JPEG does not decode"):
        decode_jpeg(buf.getvalue()[:200])
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    with pytest.raises(UnsupportedImageError, match="pip install pillow"):
        decode_image(buf.getvalue())
