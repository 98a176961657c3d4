"""A deliberately slow tier for tests: an ext4 file system on a loop device, and a cgroup (v1
``blkio``) whose processes are throttled to a few I/O operations a second on that device.

The kernel does the slowing, so every layer above -- page cache, LMDB, the daemon's threads -- is
the real one. Needs root, ``losetup``/``mkfs.ext4``/``mount``, and the v1 blkio throttle (this
machine has them); elsewhere :func:`slow_tier_or_skip` skips with the reason. Reads of pages in the
page cache never reach the device: :func:`drop_caches` empties it (root), as a cold start would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BLKIO = Path("/sys/fs/cgroup/blkio")


@dataclass
class SlowTier:
    mount: Path          # the file system on the throttled device
    device: str          # MAJ:MIN of the loop device
    cgroup: Path         # processes written to cgroup.procs are throttled on the device

    def throttle(self, read_iops: int = 0, write_iops: int = 0) -> None:
        """Limit the cgroup's I/O operations per second on the device (0: no limit)."""
        (self.cgroup / "blkio.throttle.read_iops_device").write_text(f"{self.device} {read_iops}\n")
        (self.cgroup / "blkio.throttle.write_iops_device").write_text(f"{self.device} {write_iops}\n")

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the throttled cgroup from its first instruction."""
        return ["sh", "-c", f'echo $$ > {self.cgroup}/cgroup.procs && exec "$@"', "sh", *argv]


def drop_caches() -> None:
    """Empty the page cache (clean, unmapped pages): the next reads come from the devices."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop device, mount, blkio cgroup)"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not (BLKIO / "cgroup.procs").exists():
        return "no cgroup v1 blkio controller at /sys/fs/cgroup/blkio (cgroup v2's io.max is not wired here)"
    return None


@contextlib.contextmanager
def slow_tier_or_skip(tmp_path: Path, size_mib: int = 256) -> Iterator[SlowTier]:
    """A throttle-able file system under ``tmp_path/slow``; skips the test when the machine cannot make one."""
    why = _why_not()
    if why:
        pytest.skip(f"no slowed tier here: {why}")
    image, mount = tmp_path / "slow.img", tmp_path / "slow"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    run = lambda *a: subprocess.run(a, capture_output=True, text=True)  # noqa: E731
    r = run("losetup", "-f", "--show", str(image))
    if r.returncode:
        pytest.skip(f"no slowed tier here: losetup failed: {r.stderr.strip()}")
    loop = r.stdout.strip()
    cgroup = BLKIO / f"carousel-test-{os.getpid()}-{tmp_path.name}"
    mounted = False
    try:
        r = run("mkfs.ext4", "-q", loop)
        if r.returncode == 0:
            r = run("mount", loop, str(mount))
        if r.returncode:
            pytest.skip(f"no slowed tier here: cannot make or mount a file system on {loop}: {r.stderr.strip()}")
        mounted = True
        st = os.stat(loop)
        cgroup.mkdir()
        yield SlowTier(mount, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", cgroup)
    finally:
        if cgroup.exists():
            for pid in (cgroup / "cgroup.procs").read_text().split():  # back to the root group, then remove
                with contextlib.suppress(OSError):
                    (BLKIO / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        if mounted:
            run("umount", "-l", str(mount))
        run("losetup", "-d", loop)
