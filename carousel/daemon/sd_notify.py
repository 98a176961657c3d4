"""systemd's service notification protocol (``sd_notify``), without libsystemd.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a Unix datagram socket; ``@name`` is in the
abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). The daemon
sends ``READY=1`` once it serves, ``WATCHDOG=1`` while its event loop and filler thread are alive,
and ``STOPPING=1`` when it drains. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send ``message`` (``KEY=VALUE`` lines) to systemd; False when not run under ``Type=notify``."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False  # systemd gone or the socket unusable: nothing a daemon can do about it
    return True


def watchdog_period() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half systemd's ``WatchdogSec``), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        period = int(usec) / 2e6
    except ValueError:
        return None
    return period if period > 0 else None
