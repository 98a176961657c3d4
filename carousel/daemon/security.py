"""Who may talk to the daemon: the socket directory's checks, peer credentials and the TCP token.

The socket lives in a private directory (0700, or 0710 with ``daemon.allow_group``) that the
daemon refuses to use when others could write to it; a Unix peer is checked with ``SO_PEERCRED``
before a byte of it is read; a TCP peer must send the token in HELLO (RELIABILITY.md, items 9-10).
"""

from __future__ import annotations

import grp
import hmac
import os
import pwd
import socket
import stat
import struct
from typing import Any

from .errors import DaemonError

_PEERCRED = struct.Struct("3i")


def allowed_gid(name: str | None) -> int | None:
    """The gid of ``daemon.allow_group`` (None when unset); :class:`DaemonError` for an unknown group."""
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise DaemonError(f"daemon.allow_group: no group named {name!r}") from None


def prepare_socket_dir(path: str, group_gid: int | None) -> None:
    """Create the socket directory 0700 (0710 with an allowed group), or refuse one that others
    could write to, that another uid owns, or that is a symlink."""
    if not os.path.lexists(path):
        old = os.umask(0o077)
        try:
            os.makedirs(path, mode=0o700)
        finally:
            os.umask(old)
        if group_gid is not None:
            os.chown(path, -1, group_gid)
            os.chmod(path, 0o710)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise DaemonError(f"socket directory {path} is not a directory (or is a symlink); refusing to start")
    if st.st_uid != os.getuid():
        raise DaemonError(f"socket directory {path} is owned by uid {st.st_uid}, not {os.getuid()}; "
                          "refusing to start")
    bad = st.st_mode & (0o077 if group_gid is None or st.st_gid != group_gid else 0o067)
    if bad:
        raise DaemonError(f"socket directory {path} has mode {stat.S_IMODE(st.st_mode):o}: others could reach "
                          f"or replace the socket; make it 0700 (chmod 700 {path}) or remove it")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


def peer_allowed(uid: int, gid: int, group_gid: int | None) -> bool:
    """Whether a peer may connect: our own uid, or a member of the allowed group."""
    if uid == os.getuid():
        return True
    if group_gid is None:
        return False
    if gid == group_gid:
        return True
    try:
        return pwd.getpwuid(uid).pw_name in grp.getgrgid(group_gid).gr_mem
    except KeyError:
        return False


def read_token(path: str | None) -> bytes:
    """The TCP token from ``daemon.token_file``: mode 0600 or stricter, at least 16 bytes."""
    if path is None:
        raise DaemonError("daemon.tcp needs daemon.token_file")
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise DaemonError(f"daemon.token_file {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise DaemonError(f"daemon.token_file {path} has mode {stat.S_IMODE(st.st_mode):o}; make it 0600")
    if len(token) < 16:
        raise DaemonError(f"daemon.token_file {path}: the token must be at least 16 bytes")
    return token


def token_ok(token: Any, expected: bytes | None) -> bool:
    """Whether a HELLO's ``token`` is the daemon's (compared in constant time)."""
    # surrogatepass: JSON may carry a lone surrogate ("\ud800"), which strict UTF-8 cannot encode.
    return isinstance(token, str) and expected is not None and \
        hmac.compare_digest(token.encode("utf-8", "surrogatepass"), expected)
