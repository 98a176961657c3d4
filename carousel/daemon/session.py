"""The daemon's session: an id per start, and a file in the data directory naming the last one.

An acknowledgement of durability (``flush``, ``checkpoint``) means something only to a client whose
adds went to the same session (docs/protocol.md). ``daemon.session`` records the last start's id and
whether it stopped cleanly (every memory flushed and checkpointed), so that the next start can tell
a reconnecting client that nothing it added was lost.
"""

from __future__ import annotations

import json
import os
from typing import Any

SESSION_NAME = "daemon.session"  # the last start's session id, and whether it shut down cleanly


def read_session(path: str) -> dict[str, Any]:
    """The previous start's ``{"session", "clean"}`` (empty if none, or unreadable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_session(path: str, session: str, clean: bool) -> None:
    """Replace the session file atomically and durably: a crash leaves the old one or the new one."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps({"session": session, "clean": clean}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

