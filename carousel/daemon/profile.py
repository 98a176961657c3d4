"""A daemon profile: the ``[daemon]`` settings plus the memories it serves, from one TOML file.

Two layouts. A single memory, served under the name ``default``, is a plain memory file (see
:mod:`carousel.config`) with an optional ``[daemon]`` table::

    [daemon]
    data_dir = "/var/lib/carousel"
    [memory]
    em_size = 500
    sample_shape = [3, 32, 32]
    [[tiers]]
    kind = "lmdb"
    path = "flash"
    capacity = 50000

Several memories (one per experiment or stream) live under ``[memories.NAME]``, each holding the
sections of a memory file (``[memories.cifar.memory]``, ``[[memories.cifar.tiers]]``, ...).
Errors are :class:`~carousel.config.ConfigError` with keys such as ``daemon.max_clients`` or
``memories.cifar.swap.ratio``.

Clients find the daemon with :func:`resolve_socket_path` (``carousel status``, ``carousel.connect``):
an explicit path, else a profile's socket, else ``$CAROUSEL_SOCKET``, else the default; when no
daemon answers there, :func:`socket_hint` says what was found and how to point elsewhere.

>>> p = DaemonProfile.from_dict({"daemon": {"metrics": ""},
...                              "memory": {"em_size": 8, "sample_shape": [2]}}, source=None)
>>> list(p.memories), p.daemon.metrics_address
(['default'], None)
>>> DaemonProfile.from_dict({"daemon": {"max_clients": 0}, "memory": {"em_size": 8, "sample_shape": [2]}})
Traceback (most recent call last):
...
carousel.config.ConfigError: daemon.max_clients: must be in [1, 4096], got 0
>>> DaemonProfile.from_dict({"daemon": {"hello_timeout_s": 0}, "memory": {"em_size": 8, "sample_shape": [2]}})
Traceback (most recent call last):
...
carousel.config.ConfigError: daemon.hello_timeout_s: must be in [0.01, 300], got 0
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from storage_backends import InvalidURLError
from storage_backends.url import parse_size

from ..config import (CarouselConfig, ConfigError, _check_keys, _fail, _float, _int, _prefixed, _resolve, _show,
                     read_toml)

__all__ = ["SOCKET_ENV", "SOCKET_NAME", "DaemonConfig", "DaemonProfile", "default_socket_dir", "load_profile",
           "resolve_socket_path", "socket_hint"]

SOCKET_NAME = "carousel.sock"      # the daemon's socket, inside daemon.socket_dir
SOCKET_ENV = "CAROUSEL_SOCKET"     # a client's socket (a path or tcp://HOST:PORT) when none is given

_MEMORY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # appears in socket ops, logs and metric labels
_MEMORY_SECTIONS = ("memory", "swap", "write_behind", "tiers")


def default_socket_dir() -> str:
    """``$XDG_RUNTIME_DIR/carousel``, else ``/tmp/carousel-$UID`` (still private: 0700, checked)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "carousel") if runtime else f"/tmp/carousel-{os.getuid()}"


def _address(value: Any, key: str) -> tuple[str, int] | None:
    if not isinstance(value, str):
        _fail(key, f"expected \"HOST:PORT\" or \"\" (off), got {_show(value)}")
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        _fail(key, f"expected \"HOST:PORT\" such as \"127.0.0.1:9464\", got {value!r}")
    return host.strip("[]"), int(port)


def _size(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        _fail(key, f"expected a byte count or a size such as \"64MiB\", got {_show(value)}")
    try:
        return value if isinstance(value, int) else parse_size(value, key)
    except InvalidURLError as exc:
        _fail(key, str(exc))


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The ``[daemon]`` table. Every limit has a safe default; see ``docs/protocol.md``."""

    data_dir: str | None = None          # lock file; None = the first memory's state/tier folder
    socket_dir: str | None = None        # None = default_socket_dir(); must be ours and 0700
    metrics: str = "127.0.0.1:9464"      # /metrics over HTTP; "" = off. Loopback unless you say otherwise
    tcp: str = ""                        # "127.0.0.1:7070" = also TCP (token required); "" = off
    token_file: str | None = None        # a file holding the TCP token (mode 0600)
    allow_group: str | None = None       # a group whose members may also connect over the Unix socket
    max_frame_bytes: int = 64 << 20      # any frame announcing more is refused before it is read
    max_clients: int = 64                # connections that completed HELLO; the next HELLO is told "busy"
    max_pending: int = 1024              # connections still before HELLO; the oldest is closed to make room
    max_inflight: int = 8                # requests running at once, all clients together; more wait
    read_timeout_s: float = 10.0         # a frame begun and not finished within this is dropped
    hello_timeout_s: float = 5.0         # a connection without a HELLO (and token, on TCP) by then is closed
    # Ready batches per standing sample request. 8, not 4: on busy cores the filler (SCHED_BATCH)
    # is put aside for a few steps at times, and 4 slots at a 2 ms step ran dry (sample p99 3-7 ms
    # through the daemon; 0.1-0.7 ms with 8, the client taking the freshest: benchmarks.stall
    # --busy, docs/results/stall.md "Fourth round").
    ring_slots: int = 8
    min_free_shm_bytes: int = 16 << 20   # refuse to start with less free /dev/shm than this
    torch_threads: int = 1               # intra-op threads of the daemon's copies; see below
    batch_scheduling: bool = True        # its threads under SCHED_BATCH: never preempt the trainer on wake-up
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name in ("data_dir", "socket_dir", "token_file"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str) or not value.strip():
                    _fail(name, f"expected a path, got {_show(value)}")
                object.__setattr__(self, name, os.path.normpath(os.path.expanduser(value)))
        if self.allow_group is not None and (not isinstance(self.allow_group, str) or not self.allow_group):
            _fail("allow_group", f"expected a group name, got {_show(self.allow_group)}")
        _address(self.metrics, "metrics")
        if _address(self.tcp, "tcp") is not None and self.token_file is None:
            _fail("token_file", "TCP needs a token: set token_file to a file only you can read")
        _int(self.max_frame_bytes, "max_frame_bytes", 4096, 1 << 34)
        _int(self.max_clients, "max_clients", 1, 4096)
        _int(self.max_pending, "max_pending", 1, 65536)
        _int(self.max_inflight, "max_inflight", 1, 1024)
        if not 0.01 <= _float(self.read_timeout_s, "read_timeout_s") <= 3600:
            _fail("read_timeout_s", f"must be in [0.01, 3600], got {self.read_timeout_s}")
        # Short: only a client that has not said who it is waits this long, holding a descriptor.
        if not 0.01 <= _float(self.hello_timeout_s, "hello_timeout_s") <= 300:
            _fail("hello_timeout_s", f"must be in [0.01, 300], got {self.hello_timeout_s}")
        _int(self.ring_slots, "ring_slots", 2, 64)
        _int(self.min_free_shm_bytes, "min_free_shm_bytes", 0)
        # 1 by default: beside a trainer that keeps every core busy, a parallel copy waits at its
        # barrier for a descheduled worker (milliseconds); a single-threaded one just runs.
        _int(self.torch_threads, "torch_threads", 1, 256)
        if not isinstance(self.batch_scheduling, bool):
            _fail("batch_scheduling", f"expected true or false, got {_show(self.batch_scheduling)}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            _fail("log_level", f"{self.log_level!r} is not one of debug, info, warning, error")

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return _address(self.metrics, "metrics")

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        return _address(self.tcp, "tcp")

    def resolved_socket_dir(self) -> str:
        return self.socket_dir or default_socket_dir()


_DAEMON_KEYS = [f.name for f in fields(DaemonConfig)]
_SIZES = ("max_frame_bytes", "min_free_shm_bytes")


@dataclass(frozen=True, slots=True)
class DaemonProfile:
    """What ``carousel serve`` runs: daemon settings and named memory configurations."""

    daemon: DaemonConfig
    memories: Mapping[str, CarouselConfig]
    source: str | None = field(default=None, compare=False)
    nested: bool = field(default=False, compare=False)  # memories under [memories.NAME], not one [memory]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> DaemonProfile:
        """Build from a TOML-shaped dict; ``source`` names the file in errors and anchors relative paths."""
        source = None if source is None else os.fspath(source)
        try:
            return _build(data, source)
        except ConfigError as exc:
            raise ConfigError(source, exc.key, exc.reason) from None

    def socket_path(self) -> str:
        """The Unix socket the daemon of this profile listens on: ``daemon.socket_dir`` + ``carousel.sock``."""
        return os.path.join(self.daemon.resolved_socket_dir(), SOCKET_NAME)

    def memory_key(self, name: str, key: str) -> str:
        """A memory's ``key`` as the TOML spells it: ``tiers[0].path`` in the single-memory layout,
        ``memories.NAME.tiers[0].path`` under ``[memories.NAME]``."""
        return f"memories.{name}.{key}" if self.nested else key

    def data_dir(self) -> str:
        """Where the daemon's lock file lives: ``daemon.data_dir``, else beside the first memory's data."""
        if self.daemon.data_dir is not None:
            return self.daemon.data_dir
        for cfg in self.memories.values():
            if cfg.memory.state_dir is not None:
                return os.path.dirname(cfg.memory.state_dir.rstrip("/")) or cfg.memory.state_dir
            if cfg.tiers:
                return os.path.dirname(cfg.tiers[0].path.rstrip("/")) or cfg.tiers[0].path
        return os.path.join(self.daemon.resolved_socket_dir(), "data")


def _build(data: Mapping[str, Any], source: str | None) -> DaemonProfile:
    if not isinstance(data, Mapping):
        _fail("<root>", f"expected a table of sections, got {_show(data)}")
    data = dict(data)
    base = None if source is None else os.path.dirname(os.path.abspath(source))
    raw = _check_keys(data.pop("daemon", {}), "daemon", _DAEMON_KEYS, what="table [daemon]")
    for key in ("data_dir", "socket_dir", "token_file"):
        if key in raw:
            raw[key] = _resolve(raw[key], base)
    for key in _SIZES:
        if key in raw:
            raw[key] = _size(raw[key], f"daemon.{key}")
    try:
        daemon = DaemonConfig(**raw)
    except ConfigError as exc:
        raise _prefixed("daemon", exc) from None

    memories: dict[str, CarouselConfig] = {}
    if "memories" in data:
        stray = [k for k in data if k != "memories"]
        if stray:
            _fail(stray[0], "with [memories.NAME] tables, every memory section goes under its name "
                            f"(e.g. [memories.default.{stray[0]}])")
        table = data["memories"]
        if not isinstance(table, Mapping) or not table:
            _fail("memories", f"expected tables such as [memories.default.memory], got {_show(table)}")
        for name, body in table.items():
            if not _MEMORY_NAME.match(name):
                _fail(f"memories.{name}", "a memory name is 1-64 letters, digits, '_', '.' or '-'")
            memories[name] = _memory(body, f"memories.{name}", source)
    else:
        memories["default"] = _memory(data, "", source)
    return DaemonProfile(daemon, memories, source, nested="memories" in data)


def _memory(body: Any, prefix: str, source: str | None) -> CarouselConfig:
    if not isinstance(body, Mapping):
        _fail(prefix or "<root>", f"expected the sections of a memory ({', '.join(_MEMORY_SECTIONS)}), "
                                  f"got {_show(body)}")
    try:
        return CarouselConfig.from_dict(body, source=None if source is None else source)
    except ConfigError as exc:
        raise ConfigError(None, f"{prefix}.{exc.key}" if prefix else exc.key, exc.reason) from None


def load_profile(path: str | os.PathLike[str]) -> DaemonProfile:
    """Read a daemon profile; every problem is a :class:`ConfigError` naming file, key and reason."""
    file = os.fspath(path)
    return DaemonProfile.from_dict(read_toml(file), source=file)


def resolve_socket_path(socket_path: str | os.PathLike[str] | None = None,
                        config: str | os.PathLike[str] | None = None) -> str:
    """Where a client looks for the daemon; the first of these that is given wins:

    1. ``socket_path``, as given: a Unix socket path, or ``tcp://HOST:PORT``;
    2. ``config``, a daemon profile (the file ``carousel serve --config`` ran): its
       ``daemon.socket_dir`` + ``/carousel.sock`` (the default folder when the profile sets none);
    3. the ``CAROUSEL_SOCKET`` environment variable, when set and not empty (a path or ``tcp://...``);
    4. the default: ``$XDG_RUNTIME_DIR/carousel/carousel.sock``, or ``/tmp/carousel-$UID/carousel.sock``
       without ``XDG_RUNTIME_DIR``.

    Raises :class:`~carousel.config.ConfigError` (file, key, reason) for a profile that does not load.

    >>> resolve_socket_path("/run/carousel/carousel.sock", config="ignored.toml")
    '/run/carousel/carousel.sock'
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> profile = os.path.join(folder, "p.toml")
    >>> _ = open(profile, "w").write('[daemon]\\nsocket_dir = "run"\\n[memory]\\nem_size = 8\\nsample_shape = [2]\\n')
    >>> resolve_socket_path(config=profile) == os.path.join(folder, "run", "carousel.sock")
    True
    """
    if socket_path is not None and os.fspath(socket_path):
        return os.fspath(socket_path)
    if config is not None:
        return load_profile(config).socket_path()
    env = os.environ.get(SOCKET_ENV, "")
    if env.strip():
        return env
    return os.path.join(default_socket_dir(), SOCKET_NAME)


def socket_hint(path: str) -> str:
    """What to tell someone whose client found no daemon at ``path``: what is there, and how to
    start a daemon or point the client elsewhere (the ways :func:`resolve_socket_path` knows).

    >>> print(socket_hint("/nonexistent/carousel.sock"))  # doctest: +NORMALIZE_WHITESPACE
    no socket at /nonexistent/carousel.sock: no daemon was started there. Start a daemon with
    `carousel serve --config PROFILE`, or point to a running one: --socket PATH or connect(PATH),
    --config PROFILE or connect(config=PROFILE) (the socket in its daemon.socket_dir), or the
    CAROUSEL_SOCKET variable (a socket path or tcp://HOST:PORT)
    """
    if path.startswith("tcp://"):
        there = f"nothing accepts connections at {path}"
    else:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            there = f"no socket at {path}: no daemon was started there"
        except OSError as exc:  # EACCES: a folder of another user (a daemon run as another uid?)
            there = f"cannot look at {path}: {exc.strerror}"
        else:
            there = (f"{path} is a socket that no daemon accepts on (the daemon stopped or died)" if stat.S_ISSOCK(mode)
                     else f"{path} is not a socket")
    return (f"{there}. Start a daemon with `carousel serve --config PROFILE`, or point to a running one: "
            "--socket PATH or connect(PATH), --config PROFILE or connect(config=PROFILE) (the socket in its "
            f"daemon.socket_dir), or the {SOCKET_ENV} variable (a socket path or tcp://HOST:PORT)")
