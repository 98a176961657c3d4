"""Where a client looks for the daemon (resolve_socket_path) and what it says when none answers (socket_hint)."""

from __future__ import annotations

import os
import socket

import pytest

from carousel.config import ConfigError
from carousel.daemon.profile import SOCKET_ENV, resolve_socket_path, socket_hint

from tests.daemon.harness import write_profile


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    return monkeypatch


def _profile(tmp_path, **daemon):
    return write_profile(tmp_path / "p.toml", daemon, {"em_size": 8, "sample_shape": [2]})


def test_precedence(env, tmp_path):
    profile = _profile(tmp_path, socket_dir=str(tmp_path / "run"))
    default = f"{tmp_path}/xdg/carousel/carousel.sock"
    assert resolve_socket_path() == default
    env.setenv(SOCKET_ENV, "/env/carousel.sock")
    assert resolve_socket_path() == "/env/carousel.sock"
    assert resolve_socket_path(config=profile) == f"{tmp_path}/run/carousel.sock"
    assert resolve_socket_path("/given.sock", config=profile) == "/given.sock"
    env.setenv(SOCKET_ENV, "  ")
    assert resolve_socket_path() == default, "a blank CAROUSEL_SOCKET is unset"
    env.delenv("XDG_RUNTIME_DIR")
    assert resolve_socket_path() == f"/tmp/carousel-{os.getuid()}/carousel.sock"


def test_tcp_passes_through(env):
    assert resolve_socket_path("tcp://127.0.0.1:7070") == "tcp://127.0.0.1:7070"
    env.setenv(SOCKET_ENV, "tcp://[::1]:7070")
    assert resolve_socket_path() == "tcp://[::1]:7070"


def test_a_profile_without_socket_dir_means_the_default(env, tmp_path):
    assert resolve_socket_path(config=_profile(tmp_path)) == f"{tmp_path}/xdg/carousel/carousel.sock"


def test_a_relative_socket_dir_is_the_profiles_folder(env, tmp_path):
    (tmp_path / "sub").mkdir()
    profile = write_profile(tmp_path / "sub" / "p.toml", {"socket_dir": "run"}, {"em_size": 8, "sample_shape": [2]})
    assert resolve_socket_path(config=os.path.relpath(profile)) == f"{tmp_path}/sub/run/carousel.sock"


def test_an_invalid_profile_names_file_and_key(env, tmp_path):
    profile = _profile(tmp_path, socket_dri="/x")
    with pytest.raises(ConfigError) as info:
        resolve_socket_path(config=profile)
    assert info.value.file == str(profile) and info.value.key == "daemon.socket_dri"
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_socket_path(config=tmp_path / "missing.toml")


def test_the_hint_says_what_is_there(tmp_path):
    ways = ("--socket PATH", "connect(PATH)", "--config PROFILE", "connect(config=PROFILE)", SOCKET_ENV,
            "carousel serve --config PROFILE")
    missing = str(tmp_path / "none.sock")
    dead = str(tmp_path / "dead.sock")
    afile = tmp_path / "file"
    afile.write_text("")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(dead)
        hints = {"missing": socket_hint(missing), "dead": socket_hint(dead), "file": socket_hint(str(afile)),
                 "tcp": socket_hint("tcp://127.0.0.1:1")}
    assert hints["missing"].startswith(f"no socket at {missing}: no daemon was started there.")
    assert hints["dead"].startswith(f"{dead} is a socket that no daemon accepts on")
    assert hints["file"].startswith(f"{afile} is not a socket.")
    assert hints["tcp"].startswith("nothing accepts connections at tcp://127.0.0.1:1.")
    for hint in hints.values():
        assert all(way in hint for way in ways), hint


def test_connect_without_a_daemon_fails_within_a_second_naming_the_path(env, tmp_path):
    import time

    import carousel

    sock = str(tmp_path / "nowhere" / "carousel.sock")
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as err:
        carousel.connect(sock)
    took = time.monotonic() - t0
    assert took < 2.0, f"connect() took {took:.1f} s to give up on a socket that never existed"
    assert sock in str(err.value) and "CAROUSEL_SOCKET" in str(err.value) and "config=" in str(err.value)
    env.setenv(SOCKET_ENV, sock)
    with pytest.raises(ConnectionError, match="nowhere"):
        carousel.connect()  # the variable is where it looked


def test_connect_finds_the_daemon_by_profile_and_variable(env, tmp_path):
    """``connect(config=PROFILE)`` and ``CAROUSEL_SOCKET`` reach the daemon the profile started."""
    import carousel
    from tests.daemon.harness import start_daemon

    d = start_daemon(tmp_path, tiers=None, metrics=False)
    try:
        with carousel.connect(config=d.profile) as c:
            assert c.daemon_pid == d.pid and c.address == d.socket
        env.setenv(SOCKET_ENV, d.socket)
        with carousel.connect() as c:
            assert c.daemon_pid == d.pid
    finally:
        d.close()


def test_connect_to_a_frozen_daemon_says_it_did_not_answer(env, tmp_path):
    """A daemon that takes the connection but never answers (SIGSTOP: wedged) is not called absent."""
    import signal

    import carousel
    from tests.daemon.harness import start_daemon

    d = start_daemon(tmp_path, tiers=None, metrics=False)
    os.kill(d.pid, signal.SIGSTOP)
    try:
        with pytest.raises(ConnectionError, match="did not answer HELLO within timeout_s=0.5 s"):
            carousel.connect(d.socket, timeout_s=0.5)
    finally:
        os.kill(d.pid, signal.SIGCONT)
        d.close()
