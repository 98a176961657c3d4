"""A real ``carousel serve`` for a benchmark: the profile written, the daemon a subprocess, a client.

The benchmarks that go through the daemon (``benchmarks.daemon``, ``benchmarks.ray_shards``, the
side-by-side run) start it the same way: ``[daemon]`` with the socket and data folders and no
metrics endpoint, plus the memory's TOML; the daemon's output goes to ``daemon.log`` beside the
profile. :meth:`ServedDaemon.close` closes the client and stops the daemon with SIGTERM (a clean
shutdown: drain, flush, checkpoint).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import carousel


class ServedDaemon:
    """``carousel serve`` on a profile in ``folder`` (its data folder too) serving ``memory_toml``,
    and ``client``, connected to it. ``socket_dir`` defaults to ``folder/sock`` (a Unix socket
    path ends at 108 bytes: pass a short one for a deep ``folder``). ``own_session``: the daemon in a
    session of its own, as one started from another terminal is (with the kernel's scheduler
    autogroups, a scheduling group of its own too); else in this process's session."""

    def __init__(self, folder: Path, memory_toml: str, socket_dir: Path | None = None,
                 own_session: bool = False) -> None:
        socket_dir = folder / "sock" if socket_dir is None else socket_dir
        profile = folder / "profile.toml"
        profile.write_text(f"[daemon]\nsocket_dir = \"{socket_dir}\"\ndata_dir = \"{folder}\"\nmetrics = \"\"\n"
                           + memory_toml)
        self.log = open(folder / "daemon.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "carousel", "serve", "--config", str(profile)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=own_session)
        self.socket = str(socket_dir / "carousel.sock")
        self.client: carousel.MemoryClient | None = None
        try:
            self.client = carousel.connect(self.socket, wait_s=60, reconnect_s=60)  # it is starting
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.log.close()

    def __enter__(self) -> ServedDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
