"""The daemon's wire protocol: framed requests and replies, JSON metadata, raw tensor bytes.

A frame is a 24-byte header, then ``meta_len`` bytes of UTF-8 JSON (an object), then
``payload_len`` bytes of raw tensor data::

    offset size field
    0      4    magic        b"CRSL"
    4      1    version      1
    5      1    op           see Op
    6      2    flags        0 (reserved)
    8      4    meta_len     <= MAX_META_BYTES
    12     8    payload_len  meta_len + payload_len <= the daemon's max_frame_bytes
    20     4    crc          CRC-32C of bytes 0..19, the metadata and the payload

The payload is the concatenation of the tensors listed in ``meta["tensors"]`` as
``[name, dtype, shape]`` triples, each C-contiguous, in order; dtypes come from an allow-list and the
sizes must add up to ``payload_len`` exactly. Nothing received is ever unpickled: a tensor is
``np.frombuffer`` over the received bytes, checked against the memory's schema by the caller.
See ``docs/protocol.md`` for the operations.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import google_crc32c
import numpy as np

MAGIC = b"CRSL"
VERSION = 1
HEADER = struct.Struct("<4sBBHIQI")
MAX_META_BYTES = 1 << 20
MAX_DIMS = 8
MAX_NAME_CHARS = 64       # a tensor's name (a memory's field names are at most 64 characters too)
MAX_ELEMENTS = 1 << 40    # a tensor's element count, zero-length dimensions left out
# Metadata is small and flat: these bound what parsing or printing a legal-but-extreme value may
# cost (a 5,000-digit integer, deep nesting), so no allocation or CPU is sized by the value.
MAX_META_DEPTH = 32
INT_RANGE = (-(1 << 63), (1 << 63) - 1)  # every metadata integer fits an int64
# What may travel as tensor bytes: plain numbers only (no object, string or void dtypes).
WIRE_DTYPES = frozenset({"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                         "float16", "float32", "float64", "bool"})


class Op(enum.IntEnum):
    HELLO = 1        # {memory, token?, pid, version} -> {schema, session, shm}
    ADD = 2          # {first?}, tensors x, y, task, extras (inline or upload segment) -> ids (none with first)
    SAMPLE = 3       # {n, classes?, tasks?, seed?, balanced?} -> tensors id, x, y, task, extras
    OBSERVE = 4      # tensors ids, logits?, loss? -> {}
    STATS = 5        # {} -> {stats}
    CHECKPOINT = 6   # {} -> {}
    FLUSH = 7        # {timeout_s?} -> {}
    SUBSCRIBE = 8    # {n, classes?, tasks?, balanced?} -> {ring: segment, layout}
    UNSUBSCRIBE = 9  # {ring} -> {}
    UPLOAD = 10      # {nbytes} -> {segment, size}: a per-connection segment for ADD's tensors
    STATUS = 11      # {} -> the daemon's status (every memory)
    PING = 12        # {} -> {}
    RETAIN = 13      # {classes?}, tensors ids int64, weights float32 -> {kept, entered, left} (coreset memories)
    LEASE = 14       # {n} -> {first, n}: ids this connection's later ADDs ({first}) use, in order
    OK = 128
    ERROR = 129


class ProtocolError(Exception):
    """A frame that breaks the protocol: the peer gets an error frame and the connection closes."""


class RemoteError(Exception):
    """An error the daemon reported for one request; ``kind`` says which (``input``, ``store``, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def encode(op: int, meta: Mapping[str, Any] | None = None, tensors: Sequence[tuple[str, np.ndarray]] = ()) -> list:
    """A frame as a list of buffers (header, metadata, tensor bytes...) for ``sendmsg``/``writelines``."""
    meta = dict(meta or {})
    arrays = []
    if tensors:
        desc = []
        for name, arr in tensors:
            arr = np.asarray(arr)
            if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
                arr = np.ascontiguousarray(arr)
            if arr.dtype.name not in WIRE_DTYPES:
                raise TypeError(f"tensor {name!r}: dtype {arr.dtype} cannot travel (allowed: {sorted(WIRE_DTYPES)})")
            desc.append([name, arr.dtype.name, list(arr.shape)])
            arrays.append(arr)
        meta["tensors"] = desc
    body = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    payload_len = sum(a.nbytes for a in arrays)
    head = HEADER.pack(MAGIC, VERSION, int(op), 0, len(body), payload_len, 0)
    crc = google_crc32c.Checksum(head[:20])
    crc.update(body)
    # google_crc32c takes bytes only; the copy is cheaper than the checksum itself.
    views = [a.tobytes() for a in arrays]
    for v in views:
        crc.update(v)
    head = head[:20] + crc.digest()[::-1]  # Checksum.digest() is big-endian; the header is little-endian
    return [head, body, *views]


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None: the metadata stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def crc_of(head: bytes, meta: bytes, payload: bytes | bytearray | memoryview) -> int:
    c = google_crc32c.Checksum(bytes(head[:20]))
    c.update(bytes(meta))
    if len(payload):
        c.update(payload if isinstance(payload, bytes) else bytes(payload))
    return int.from_bytes(c.digest(), "big")


def parse_header(head: bytes, max_frame_bytes: int) -> tuple[int, int, int, int]:
    """``(op, meta_len, payload_len, crc)``; raises :class:`ProtocolError` before anything is read."""
    magic, version, op, flags, meta_len, payload_len, crc = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r}): not a carousel client")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} not supported (this daemon speaks {VERSION})")
    if op not in Op._value2member_map_:
        raise ProtocolError(f"unknown op {op}")
    if flags:
        raise ProtocolError(f"reserved flags set: {flags:#x}")
    if meta_len > MAX_META_BYTES:
        raise ProtocolError(f"metadata of {meta_len} bytes exceeds {MAX_META_BYTES}")
    if meta_len + payload_len > max_frame_bytes:
        raise ProtocolError(f"frame of {meta_len + payload_len} bytes exceeds max_frame_bytes={max_frame_bytes}")
    return op, meta_len, payload_len, crc


def _parse_int(text: str) -> int:
    # Called by the JSON scanner with the digits as written: refused before int() sees them
    # (CPython refuses over 4,300 digits with a bare ValueError, and converting is quadratic).
    if len(text) > 20:
        raise ProtocolError(f"integer of {len(text)} characters in the metadata (every integer must fit an int64)")
    value = int(text)
    if not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise ProtocolError(f"integer {value} in the metadata does not fit an int64")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"number {text[:32]}{'...' if len(text) > 32 else ''} in the metadata is not a "
                            "finite float64")
    return value


def _parse_constant(text: str) -> float:
    raise ProtocolError(f"{text} is not JSON (the metadata is strict JSON: no NaN or Infinity)")


_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)


def decode_meta(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The metadata of a frame: a strict-JSON object in UTF-8, nested at most ``MAX_META_DEPTH``
    deep, each integer an int64 and each number finite. Raises :class:`ProtocolError` and nothing else.

    >>> decode_meta(b'{"n": 8, "classes": [1, 2]}')
    {'n': 8, 'classes': [1, 2]}
    >>> decode_meta(b'{"n": ' + b'9' * 5000 + b'}')
    Traceback (most recent call last):
    ...
    carousel.daemon.wire.ProtocolError: integer of 5000 characters in the metadata (every integer must fit an int64)
    >>> decode_meta(b'{"a": ' + b'[' * 100 + b']' * 100 + b'}')
    Traceback (most recent call last):
    ...
    carousel.daemon.wire.ProtocolError: metadata nested deeper than 32 levels
    """
    if not raw:
        return {}
    try:
        meta = _DECODER.decode(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"metadata is not UTF-8 JSON: {exc}") from None
    except RecursionError:  # nesting beyond the interpreter's limit; _check_depth catches the rest
        raise ProtocolError(f"metadata nested deeper than {MAX_META_DEPTH} levels") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"metadata must be a JSON object, got {type(meta).__name__}")
    _check_depth(meta)
    return meta


def _check_depth(meta: dict) -> None:
    # A loop, not recursion. The JSON scanner itself accepts nesting up to the interpreter's
    # recursion limit; printing or comparing such a value later would raise RecursionError there.
    todo: list[tuple[Any, int]] = [(meta, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > MAX_META_DEPTH:
            raise ProtocolError(f"metadata nested deeper than {MAX_META_DEPTH} levels")
        for child in value.values() if isinstance(value, dict) else value:
            if isinstance(child, (dict, list)):
                todo.append((child, depth + 1))


def tensor_specs(meta: Mapping[str, Any], total: int | None) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    """Validated ``(name, dtype, shape, nbytes)`` of ``meta["tensors"]``; their sizes must add up
    to ``total`` (the payload length) when given. Raises :class:`ProtocolError`."""
    raw = meta.get("tensors", [])
    if not isinstance(raw, list) or len(raw) > 64:
        raise ProtocolError("'tensors' must be a list of at most 64 [name, dtype, shape] entries")
    out = []
    size = 0
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], str) and isinstance(entry[2], list)):
            raise ProtocolError(f"tensor entry must be [name, dtype, shape], got {str(entry)[:80]}")
        name, dtype, shape = entry
        if len(name) > MAX_NAME_CHARS:
            raise ProtocolError(f"tensor name {name[:64]!r}... is longer than {MAX_NAME_CHARS} characters")
        if dtype not in WIRE_DTYPES:
            raise ProtocolError(f"tensor {name[:64]!r}: dtype {dtype[:32]!r} not allowed "
                                f"(allowed: {', '.join(sorted(WIRE_DTYPES))})")
        if len(shape) > MAX_DIMS or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40
                                            for d in shape):
            raise ProtocolError(f"tensor {name[:64]!r}: shape {str(shape)[:80]} is not a list of at most "
                                f"{MAX_DIMS} non-negative ints")
        if math.prod(d for d in shape if d) > MAX_ELEMENTS:  # numpy refuses such a shape even when empty
            raise ProtocolError(f"tensor {name!r}: shape {shape} has more than {MAX_ELEMENTS} elements")
        dt = np.dtype(dtype)
        nbytes = dt.itemsize * math.prod(shape)
        size += nbytes
        if size > 1 << 40:
            raise ProtocolError("tensor sizes overflow")
        out.append((name, dt, tuple(shape), nbytes))
    if total is not None and size != total:
        raise ProtocolError(f"tensors add up to {size} bytes but the payload has {total}")
    return out


def split_tensors(specs, payload: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """Views of ``payload`` as the tensors ``specs`` describe (no copy; raw bytes, never unpickled)."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, dt, shape, nbytes in specs:
        if name in out:
            raise ProtocolError(f"tensor {name[:64]!r} sent twice")
        out[name] = np.frombuffer(payload, dtype=dt, count=nbytes // dt.itemsize, offset=offset).reshape(shape)
        offset += nbytes
    return out
