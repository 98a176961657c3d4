"""TCP on loopback: a token is required before anything else; batches come back in frames."""

from __future__ import annotations

import socket

import pytest
import torch

import carousel
from carousel.daemon import wire
from tests.daemon.harness import free_port, start_daemon


@pytest.fixture
def tcp_daemon(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    token.chmod(0o600)
    port = free_port()
    d = start_daemon(tmp_path, daemon={"tcp": f"127.0.0.1:{port}", "token_file": str(token)}, tiers=None)
    yield d, port, "s3cret-token-0123456789"
    d.stop()


def test_tcp_client_with_the_token_works(tcp_daemon):
    d, port, token = tcp_daemon
    with carousel.connect(f"tcp://127.0.0.1:{port}", token=token) as c:
        ids = c.add(torch.full((20, 3, 8, 8), 5, dtype=torch.uint8), torch.arange(20) % 4, task=0)
        assert ids.tolist() == list(range(20))
        b = c.sample(8)
        assert len(b) == 8 and (b.x == 5).all() and b.x.shape == (8, 3, 8, 8)
        assert c.stats()["added"] == 20


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789"])
def test_tcp_without_a_valid_token_is_refused(tcp_daemon, token):
    d, port, _ = tcp_daemon
    with pytest.raises(carousel.RemoteError) as err:
        carousel.connect(f"tcp://127.0.0.1:{port}", token=token, reconnect_s=0)
    assert err.value.kind == "auth"
    # Nor may a stranger skip HELLO: any other first frame closes the connection.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"".join(wire.encode(wire.Op.STATS, {})))
        head = s.recv(24, socket.MSG_WAITALL)
        op, meta_len, payload_len, _ = wire.parse_header(head, 1 << 20)
        assert op == wire.Op.ERROR
        assert b"auth" in s.recv(meta_len, socket.MSG_WAITALL)
        assert s.recv(1) == b""  # closed
    with carousel.connect(d.socket) as c:  # the Unix socket is unaffected
        assert c.stats()["added"] == 0


def test_tcp_needs_a_private_token_file(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    token.chmod(0o644)
    with pytest.raises(RuntimeError, match="0600"):
        start_daemon(tmp_path, daemon={"tcp": f"127.0.0.1:{free_port()}", "token_file": str(token)}, tiers=None,
                     timeout=30)
