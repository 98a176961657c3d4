"""The frame format: round trips, and every malformed header or tensor list refused before use."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from carousel.daemon import wire


def _frame(op=wire.Op.PING, meta=None, tensors=()):
    return b"".join(wire.encode(op, meta, tensors))


def _parse(frame: bytes, max_bytes: int = 1 << 20):
    head = frame[:wire.HEADER.size]
    op, meta_len, payload_len, crc = wire.parse_header(head, max_bytes)
    body = frame[wire.HEADER.size:]
    assert len(body) == meta_len + payload_len
    assert wire.crc_of(head, body[:meta_len], body[meta_len:]) == crc
    meta = wire.decode_meta(body[:meta_len])
    return op, meta, wire.split_tensors(wire.tensor_specs(meta, payload_len), body[meta_len:])


def test_round_trip_with_tensors():
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    y = np.array([7, -1], dtype=np.int64)
    empty = np.zeros((0, 5), dtype=np.float32)
    op, meta, t = _parse(_frame(wire.Op.ADD, {"k": 1}, [("x", x), ("y", y), ("e", empty)]))
    assert op == wire.Op.ADD and meta["k"] == 1
    np.testing.assert_array_equal(t["x"], x)
    np.testing.assert_array_equal(t["y"], y)
    assert t["e"].shape == (0, 5) and t["e"].dtype == np.float32


def test_header_layout_is_the_documented_one():
    frame = _frame(wire.Op.STATS, {})
    magic, version, op, flags, meta_len, payload_len, crc = struct.unpack("<4sBBHIQI", frame[:24])
    assert (magic, version, op, flags, payload_len) == (b"CRSL", 1, wire.Op.STATS, 0, 0)
    assert frame[24:24 + meta_len] == b"{}"


@pytest.mark.parametrize("patch, match", [
    (lambda h: b"XXXX" + h[4:], "bad magic"),
    (lambda h: h[:4] + bytes([9]) + h[5:], "version 9"),
    (lambda h: h[:5] + bytes([77]) + h[6:], "unknown op"),
    (lambda h: h[:6] + b"\x01\x00" + h[8:], "reserved flags"),
    (lambda h: h[:12] + struct.pack("<Q", 1 << 40) + h[20:], "max_frame_bytes"),
    (lambda h: h[:8] + struct.pack("<I", (1 << 20) + 1) + h[12:], "metadata"),
])
def test_bad_headers_are_refused_before_the_body(patch, match):
    head = _frame(wire.Op.PING, {})[:24]
    with pytest.raises(wire.ProtocolError, match=match):
        wire.parse_header(patch(head), 1 << 30)


def test_checksum_covers_metadata_and_payload():
    frame = bytearray(_frame(wire.Op.ADD, {}, [("x", np.ones(16, np.uint8))]))
    frame[-1] ^= 0x10  # one flipped bit in the payload
    head = bytes(frame[:24])
    _, meta_len, _, crc = wire.parse_header(head, 1 << 20)
    assert wire.crc_of(head, bytes(frame[24:24 + meta_len]), bytes(frame[24 + meta_len:])) != crc


@pytest.mark.parametrize("tensors, match", [
    ([["x", "object", [1]]], "not allowed"),
    ([["x", "<U10", [1]]], "not allowed"),
    ([["x", "uint8", [-1]]], "non-negative"),
    ([["x", "uint8", [1 << 41]]], "non-negative"),
    ([["x", "uint8", [1] * 9]], "at most 8"),
    ([["x", "uint8", [True]]], "non-negative"),
    ([["x", "uint8"]], "name, dtype, shape"),
    ("x", "list"),
    ([["x", "uint8", [4]]], "payload has 3"),
])
def test_bad_tensor_lists_are_refused(tensors, match):
    with pytest.raises(wire.ProtocolError, match=match):
        wire.tensor_specs({"tensors": tensors}, 3)


def test_duplicate_tensor_names_are_refused():
    specs = wire.tensor_specs({"tensors": [["x", "uint8", [1]], ["x", "uint8", [1]]]}, 2)
    with pytest.raises(wire.ProtocolError, match="twice"):
        wire.split_tensors(specs, b"ab")


def test_pickled_bytes_stay_bytes():
    import pickle

    blob = pickle.dumps({"evil": ValueError("x")})
    op, meta, t = _parse(_frame(wire.Op.ADD, {}, [("x", np.frombuffer(blob, np.uint8))]))
    assert t["x"].tobytes() == blob  # raw bytes, never loaded


@pytest.mark.parametrize("raw", [b"[1, 2]", b"\xff\xfe", b"{", json.dumps("s").encode()])
def test_metadata_must_be_a_json_object(raw):
    with pytest.raises(wire.ProtocolError):
        wire.decode_meta(raw)


def test_encode_refuses_dtypes_that_cannot_travel():
    with pytest.raises(TypeError, match="cannot travel"):
        wire.encode(wire.Op.ADD, {}, [("x", np.array(["a"]))])


def test_zero_dimensional_tensors_keep_their_shape():
    op, meta, t = _parse(_frame(wire.Op.ADD, {}, [("y", np.array(3, dtype=np.int64))]))
    assert t["y"].shape == () and int(t["y"]) == 3
