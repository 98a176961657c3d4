"""RELIABILITY items 11 and 22, generated: frames built field by field (a header that is mostly
right, metadata JSON with every op's keys given plausible or wild values, deep nesting, 5,000-digit
integers, NaN, lone surrogates, tensor lists with bad dtypes, shapes and sizes; and plain random
bytes).

At the unit level, the decoder (``wire.parse_header``, ``decode_meta``, ``tensor_specs``,
``split_tensors``) raises nothing but :class:`wire.ProtocolError`, and the daemon's request
validators nothing but its request errors, whatever they are given. End to end, against one
real daemon, every frame gets an ERROR frame (never of kind ``internal``) or an OK, or the
documented close of a half-sent frame; the protocol-error and request counters move by exactly
one; each protocol error is one log line; no traceback reaches the log; and a client is still
served afterwards.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import carousel
from carousel.config import CarouselConfig
from carousel.daemon import handlers, wire
from carousel.daemon.errors import RequestError
from carousel.inputs import MemoryInputError
from carousel.memory import CarouselMemory

from .harness import free_port, start_daemon
from .rawwire import MAGIC, OP, connect_raw, crc32c, metric_sum, metric_values, recv_frame, request

MAX_FRAME = 1 << 18  # the fuzzed daemon's max_frame_bytes
OPS = {**OP, "RETAIN": 13}
# What each op reads from its metadata (besides "tensors").
KEYS = {"HELLO": ["memory", "token", "pid", "version"], "ADD": ["upload", "offset"],
        "SAMPLE": ["n", "classes", "tasks", "seed", "balanced"], "SUBSCRIBE": ["n", "classes", "tasks", "balanced"],
        "FLUSH": ["timeout_s"], "UNSUBSCRIBE": ["ring"], "UPLOAD": ["nbytes"], "RETAIN": ["classes"]}
# Kinds a daemon may answer a bad request with; "internal" (a bug) is not among them.
KINDS = {"protocol", "busy", "input", "unknown_memory", "store", "timeout", "shm", "io", "closed"}


class Raw(str):
    """JSON text emitted as is: what json.dumps cannot produce from a Python value."""


EXTREMES = [Raw("9" * 5000), Raw("-" + "7" * 4400), Raw("1" + "0" * 4000), Raw(str(1 << 63)), Raw(str(-(1 << 63) - 1)),
            Raw(str(1 << 64)), Raw("1e999"), Raw("-1e400"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"),
            Raw('"\\ud800"'), Raw('"\\udfff\\ud800x"'), Raw("[" * 5000 + "]" * 5000), Raw("[" * 33 + "]" * 33),
            Raw('{"a":' * 40 + "1" + "}" * 40), Raw("[" * 31 + "1" + "]" * 31), Raw("0." + "1" * 5000),
            Raw("[" + ",".join(["1234567890123456789"] * 4000) + "]")]

surrogates = st.integers(0xD800, 0xDFFF).map(chr)
texts = st.text(max_size=12) | st.lists(surrogates | st.characters(), max_size=6).map("".join)
scalars = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | texts
           | st.sampled_from(EXTREMES))
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texts, kids, max_size=4),
                      max_leaves=12)
plausible = {
    "memory": st.sampled_from(["default", "nope", ""]), "token": texts, "pid": st.integers(-1, 1 << 40),
    "version": st.integers(0, 3), "upload": st.booleans(), "n": st.integers(-2, 80),
    "classes": st.lists(st.integers(-1, 12), max_size=5), "tasks": st.lists(st.integers(-1, 3), max_size=3),
    "seed": st.integers(-1, 1 << 64), "balanced": st.booleans(), "ring": st.integers(-1, 3),
    "timeout_s": st.floats(-1, 4000) | st.integers(-1, 4000), "nbytes": st.integers(-1, 2 * MAX_FRAME),
    "offset": st.integers(-2, 2 * MAX_FRAME) | st.sampled_from([1 << 40, 1 << 63])}
names = st.sampled_from(["x", "y", "task", "ids", "logits", "loss", "weights", "id"]) | texts | st.just("n" * 65)
dtypes = st.sampled_from(sorted(wire.WIRE_DTYPES) + ["object", "O", "<U10", "V8", "float128", "complex64",
                                                      "datetime64[ns]", "int", "u1"]) | texts
dims = st.integers(0, 5) | st.sampled_from([-1, 1 << 39, 1 << 40, 1 << 62, 1 << 64])
shapes = st.lists(dims, max_size=4) | st.lists(st.integers(0, 2), min_size=8, max_size=10) | values
entries = st.tuples(names, dtypes, shapes).map(list) | values


@st.composite
def good_tensors(draw, op: str) -> list:
    """A tensor list the op accepts, or nearly: right names, dtypes and row shapes for ``n`` rows."""
    n = draw(st.integers(0, 4))
    if op == "ADD":
        out = [["x", "uint8", [n, 3, 8, 8]], ["y", "int64", [n]], ["task", "int16", [n]]]
    elif op == "RETAIN":
        out = [["ids", "int64", [n]], ["weights", "float32", [n]]]
    else:
        out = [["ids", "int64", [n]]] + draw(st.sampled_from([[], [["loss", "float32", [n]]],
                                                              [["logits", "float32", [n, 10]]]]))
    if draw(rarely(2)):  # one field of one entry broken
        k, field = draw(st.integers(0, len(out) - 1)), draw(st.integers(0, 2))
        out[k][field] = draw((names, dtypes, shapes)[field])
    return out


def to_json(v) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(to_json(x) for x in v) + "]"
    return json.dumps(v)  # NaN and infinities come out as NaN and Infinity: refused, as they must be


def payload_size(tensors) -> int | None:
    """The bytes ``tensors`` describe, when it is a list of well-formed entries (else None)."""
    if not isinstance(tensors, list):
        return None
    total = 0
    for e in tensors:
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[1], str) and e[1] in wire.WIRE_DTYPES
                and isinstance(e[2], list) and all(type(d) is int and d >= 0 for d in e[2])):
            return None
        total += np.dtype(e[1]).itemsize * math.prod(e[2])
    return total


@st.composite
def metas(draw, op: str) -> tuple[bytes, int]:
    """``(metadata bytes, payload length its tensors describe or -1)``."""
    keys = KEYS.get(op, [])
    wild = draw(rarely(2))  # else every key the op reads, with a plausible value (some out of range)
    meta = draw(st.fixed_dictionaries({}, optional={k: plausible[k] | values for k in keys}) if wild
                else st.fixed_dictionaries({k: plausible[k] for k in keys}))
    if draw(rarely(3)):
        meta.update(draw(st.dictionaries(texts | st.sampled_from(sorted(plausible)), values, max_size=3)))
    if op in ("ADD", "OBSERVE", "RETAIN") or draw(rarely(4)):
        which = draw(st.sampled_from(["good", "good", "good", "entries", "values"]))
        meta["tensors"] = draw(good_tensors(op if op in ("ADD", "RETAIN") else "OBSERVE") if which == "good"
                               else st.lists(entries, max_size=4) if which == "entries" else values)
    if draw(rarely(12)):
        return to_json(draw(values)).encode("utf-8", "surrogatepass"), -1  # not an object, maybe
    if draw(rarely(20)):
        return draw(st.binary(max_size=40)), -1
    size = payload_size(meta.get("tensors", []))
    return to_json(meta).encode("utf-8", "surrogatepass"), -1 if size is None else size


def rarely(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n + 1`` draws (shrinking towards False). Hypothesis draws integers
    with a bias to their bounds, so ``integers(0, n) == 0`` would come far more often than that."""
    return st.sampled_from([False] * n + [True])


@st.composite
def frames(draw) -> bytes:
    """One frame as bytes: mostly a right header over generated metadata and payload; some
    headers with one field broken; some announcing more than the daemon takes; some random bytes."""
    if draw(rarely(20)):
        return draw(st.binary(min_size=1, max_size=80))
    name = draw(st.sampled_from(sorted(set(OPS) - {"OK", "ERROR"}))) if draw(rarely(3)) is False \
        else draw(st.sampled_from(sorted(OPS)))
    meta, size = draw(metas(name))
    if 0 <= size <= 1 << 14 and not draw(rarely(5)):
        payload = draw(st.binary(min_size=size, max_size=size))
    else:
        payload = draw(st.binary(max_size=48))
    broken = draw(st.sampled_from([None] * 12 + ["magic", "version", "op", "flags", "crc", "oversize"]))
    magic = draw(st.binary(min_size=4, max_size=4)) if broken == "magic" else MAGIC
    version = draw(st.integers(0, 255)) if broken == "version" else 1
    op = draw(st.integers(0, 255)) if broken == "op" else OPS[name]
    flags = draw(st.integers(0, 0xFFFF)) if broken == "flags" else 0
    meta_len, payload_len = len(meta), len(payload)
    if broken == "oversize":  # announced beyond the limits: refused by the header alone, nothing more is sent
        meta_len, payload_len = draw(st.sampled_from([(wire.MAX_META_BYTES + 1, 0), (0, MAX_FRAME + 1),
                                                      (1 << 31, 1 << 40), (0, (1 << 64) - 1)]))
    head20 = struct.pack("<4sBBHIQ", magic, version, op, flags, meta_len, payload_len)
    crc = draw(st.integers(0, (1 << 32) - 1)) if broken == "crc" else crc32c(head20, meta, payload)
    head = head20 + struct.pack("<I", crc)
    return head if broken == "oversize" else head + meta + payload


def raw_frame(op: str, meta_json: str, payload: bytes = b"") -> bytes:
    """A well-formed frame around metadata written out as JSON text."""
    meta = meta_json.encode("utf-8", "surrogatepass")
    head20 = struct.pack("<4sBBHIQ", MAGIC, 1, OPS[op], 0, len(meta), len(payload))
    return head20 + struct.pack("<I", crc32c(head20, meta, payload)) + meta + payload


ADD_OK = '{"tensors": [["x", "uint8", [2, 3, 8, 8]], ["y", "int64", [2]], ["task", "int16", [2]]]}'
# RELIABILITY 22's legal-but-extreme values, run every time before the generated frames:
# (frame, over TCP, HELLO first).
NAMED = [
    (raw_frame("SAMPLE", '{"n": ' + "9" * 5000 + "}"), False, True),
    (raw_frame("SAMPLE", '{"n": 8, "seed": ' + "1" * 4000 + "}"), False, True),
    (raw_frame("SAMPLE", '{"n": 8, "classes": ' + "[" * 100_000 + "]" * 100_000 + "}"), False, True),
    (raw_frame("STATS", '{"a": ' + "[" * 900 + "]" * 900 + "}"), False, True),  # within Python's limit, not ours
    (raw_frame("FLUSH", '{"timeout_s": NaN}'), False, True),
    (raw_frame("FLUSH", '{"timeout_s": 1e999}'), False, True),
    (raw_frame("SAMPLE", '{"n": 8, "classes": [18446744073709551616]}'), False, True),
    (raw_frame("SAMPLE", '{"n": 8, "classes": [9223372036854775807, -9223372036854775808]}'), False, True),
    (raw_frame("SAMPLE", '{"n": 1.5, "seed": 2.5}'), False, True),
    (raw_frame("UPLOAD", '{"nbytes": 99999999999999999999}'), False, True),
    (raw_frame("UNSUBSCRIBE", '{"ring": [[[{"a": 1e308}]]]}'), False, True),
    (raw_frame("HELLO", '{"memory": ["default"]}'), False, False),
    (raw_frame("HELLO", '{"memory": "default", "token": "\\ud800"}'), True, False),
    (raw_frame("OBSERVE", '{"tensors": [["ids", "int64", [0, 1099511627775, 1099511627775]]]}'), False, True),
    (raw_frame("ADD", '{"tensors": [["' + "x" * 65 + '", "uint8", [1]]]}', b"\0"), False, True),
    (raw_frame("ADD", ADD_OK, bytes(2 * 192) + bytes(16) + bytes(4)), False, True),
    (raw_frame("ADD", ADD_OK, bytes(2 * 192) + bytes(16) + bytes(4)), False, False),
]


def _named(test):
    for data, tcp, hello_first in NAMED:
        test = example(data=data, tcp=tcp, hello_first=hello_first)(test)
    return test


def _announced(data: bytes) -> int:
    """How many bytes the frame at the start of ``data`` says it has (header included)."""
    if len(data) < wire.HEADER.size:
        return wire.HEADER.size
    _, _, _, _, meta_len, payload_len, _ = wire.HEADER.unpack(data[:wire.HEADER.size])
    return wire.HEADER.size + meta_len + payload_len


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])


# ---- unit level --------------------------------------------------------------------------------------
@FUZZ
@given(frames())
@example(NAMED[0][0])
@example(NAMED[2][0])
@example(NAMED[3][0])
def test_22_decoder_raises_only_protocol_errors(data):
    """RELIABILITY 11, 22: header, checksum, metadata and tensor list of any frame: decoded, or a
    ProtocolError; what decodes is strict, shallow JSON of int64s and finite floats, and tensors
    that fit the payload."""
    if len(data) < wire.HEADER.size:
        return
    head = data[:wire.HEADER.size]
    try:
        op, meta_len, payload_len, crc = wire.parse_header(head, MAX_FRAME)
        body = data[wire.HEADER.size:]
        if len(body) != meta_len + payload_len:
            return  # the daemon would wait for the rest (read_timeout_s): test_wire_security's item 12
        wire.crc_of(head, body[:meta_len], body[meta_len:])
        meta = wire.decode_meta(body[:meta_len])
        specs = wire.tensor_specs(meta, payload_len)
        arrays = wire.split_tensors(specs, memoryview(body)[meta_len:])
    except wire.ProtocolError:
        return
    assert isinstance(meta, dict)
    todo = [(meta, 1)]  # containers (objects, arrays) nested at most MAX_META_DEPTH deep, as decode_meta says
    while todo:
        v, depth = todo.pop()
        assert depth <= wire.MAX_META_DEPTH
        for c in (v.values() if isinstance(v, dict) else v):
            if isinstance(c, (dict, list)):
                todo.append((c, depth + 1))
            assert not isinstance(c, int) or wire.INT_RANGE[0] <= c <= wire.INT_RANGE[1]
            assert not isinstance(c, float) or math.isfinite(c)
    assert sum(a.nbytes for a in arrays.values()) == payload_len


@pytest.fixture(scope="module")
def memory():
    mem = CarouselMemory(CarouselConfig.from_dict({"memory": {"em_size": 64, "sample_shape": [3, 8, 8]}}))
    yield mem
    mem.close()


@FUZZ
@given(frames())
def test_22_request_validators_raise_only_request_errors(memory, data):
    """RELIABILITY 22: what decodes, given to the daemon's argument checks for sample/subscribe and
    add: accepted, or refused with a request error (an ERROR frame of kind input), never another
    exception."""
    try:
        _, meta_len, payload_len, _ = wire.parse_header(data[:wire.HEADER.size].ljust(wire.HEADER.size, b"\0"),
                                                        MAX_FRAME)
        body = data[wire.HEADER.size:]
        meta = wire.decode_meta(body[:meta_len])
        payload = memoryview(body)[meta_len:meta_len + payload_len]
        arrays = wire.split_tensors(wire.tensor_specs(meta, len(payload)), payload)
    except wire.ProtocolError:
        return
    def add():
        x, y, task, extras = handlers.add_arguments(arrays)
        memory.add(x, y, task, **extras)  # what the daemon runs: the memory's own checks, at the door

    for check in (lambda: handlers.sample_args(meta, memory), add):
        try:
            check()
        except (RequestError, MemoryInputError, wire.ProtocolError):
            pass


# ---- end to end ----------------------------------------------------------------------------------------
TOKEN = "fuzz-token-0123456789abcdef"
TOKEN_LINE = "tcp client without a valid token; closing"


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    token = base / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    port = free_port()
    d = start_daemon(base, tiers=None, daemon={"max_frame_bytes": MAX_FRAME, "read_timeout_s": 0.3,
                                               "hello_timeout_s": 30, "tcp": f"127.0.0.1:{port}",
                                               "token_file": str(token)})
    with carousel.connect(d.socket, use_shm=False) as c:
        c.add(np.zeros((8, 3, 8, 8), np.uint8), np.arange(8), 0)
    state = {"metrics": metric_values(d), "log_offset": d.log_path.stat().st_size}
    yield d, port, state
    d.close()


def _record(line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # not the daemon's JSON logging: asyncio's own, or a bare traceback
        return {"level": "error", "raw": line}


def _exchange(d, port: int, data: bytes, tcp: bool, hello_first: bool) -> tuple[tuple | None, bool]:
    """Send ``data`` on a fresh connection; ``(the reply frame or None, whether the daemon closed)``."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10) if tcp else connect_raw(d.socket, timeout=10)
    try:
        if hello_first:
            op, meta, _ = request(s, OP["HELLO"], {"memory": "default", "pid": os.getpid(), "version": 1,
                                                   **({"token": TOKEN} if tcp else {})})
            assert op == OP["OK"], meta
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the header was refused before the rest was read: the ERROR frame is still there
        reply = recv_frame(s)
        if reply is None:
            return None, True
        s.settimeout(0.2 if reply[0] == OP["ERROR"] and reply[1].get("error") in ("protocol", "auth") else 0.05)
        try:
            closed = s.recv(1) == b""
        except socket.timeout:
            closed = False
        except ConnectionResetError:
            closed = True
        return reply, closed
    finally:
        s.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=frames(), tcp=rarely(4), hello_first=rarely(3).map(lambda b: not b))
@_named
def test_22_every_frame_gets_an_answer_a_count_and_a_line(fuzz_daemon, data, tcp, hello_first):
    """RELIABILITY 11, 22: each generated frame (and each of NAMED), on a fresh Unix or TCP
    connection (after a HELLO or not), against one daemon: an OK or an ERROR frame (not
    ``internal``), and the counters and the log move by exactly that."""
    d, port, state = fuzz_daemon
    reply, closed = _exchange(d, port, data, tcp, hello_first)
    now = metric_values(d)
    before, state["metrics"] = state["metrics"], now
    raw = d.log_path.read_bytes()
    new_log, state["log_offset"] = raw[state["log_offset"]:].decode(errors="replace"), len(raw)
    records = [_record(line) for line in new_log.splitlines()]
    protocol = metric_sum(now, "carousel_protocol_errors_total") - metric_sum(before, "carousel_protocol_errors_total")
    refused = metric_sum(now, "carousel_connections_refused_total") - \
        metric_sum(before, "carousel_connections_refused_total")
    requests = {k[1]: v - before.get(k, 0.0) for k, v in now.items()
                if k[0] == "carousel_requests_total" and v != before.get(k, 0.0)}
    if hello_first:
        hello_key = frozenset({("op", "hello"), ("result", "ok")})
        requests[hello_key] -= 1
        requests = {k: v for k, v in requests.items() if v}
    msgs = [r.get("msg") for r in records]

    assert "Traceback" not in new_log and "Unhandled exception" not in new_log, new_log
    assert not [r for r in records if "exc" in r or r.get("level") == "error"], records
    assert d.proc.poll() is None, d.log()
    if reply is None:
        assert closed and not requests
        if tcp:  # a reset may have taken the ERROR frame with it: what the daemon counted still holds
            assert (protocol, refused, msgs) in ((1, 0, ["protocol error; closing"]), (0, 1, [TOKEN_LINE]),
                                                 (1, 0, ["half-sent frame timed out; closing"])), (protocol, msgs)
        else:  # the documented close without a reply: a frame that never arrived whole
            assert len(data) < _announced(data), (data[:64], msgs)
            assert protocol == 1 and msgs == ["half-sent frame timed out; closing"], (protocol, msgs)
        return
    op, meta, _ = reply
    assert op in (OP["OK"], OP["ERROR"]), reply
    if op == OP["ERROR"]:
        assert meta.get("error") in KINDS | ({"auth"} if tcp else set()), meta
        assert isinstance(meta.get("message"), str) and meta["message"], meta
    kind = meta.get("error") if op == OP["ERROR"] else None
    if kind == "protocol":
        assert closed, meta
        assert protocol == 1 and refused == 0 and msgs == ["protocol error; closing"], (protocol, msgs)
        # Counted as a request too when the op was known and the dispatcher refused it.
        assert requests in ({}, {k: 1 for k in requests if ("result", "protocol") in k}), requests
    elif kind == "auth":  # a TCP frame before a HELLO with the token
        assert closed and not hello_first, meta
        assert refused == 1 and protocol == 0 and msgs == [TOKEN_LINE] and not requests, (refused, msgs, requests)
    else:
        result = "ok" if op == OP["OK"] else kind
        assert protocol == 0 and refused == 0 and not closed and msgs == [], (protocol, closed, msgs)
        assert list(requests.values()) == [1] and ("result", result) in next(iter(requests)), (requests, result)


def test_22_daemon_serves_after_the_fuzz(fuzz_daemon):
    """RELIABILITY 11, 22: run after the end-to-end fuzz (the same daemon): still whole, still serving."""
    d, port, _ = fuzz_daemon
    with carousel.connect(d.socket) as c:
        assert len(c.sample(8, classes=list(range(8)))) == 8
        assert c.stats()["added"] >= 8
    with carousel.connect(f"tcp://127.0.0.1:{port}", token=TOKEN) as c:
        assert c.stats()["added"] >= 8
    assert d.proc.poll() is None
    assert d.stop() == 0
    assert "Traceback" not in d.log() and "Unhandled exception" not in d.log()
