"""Whether a daemon profile can start and work on this machine, checked before anything is made.

``carousel check-config`` prints what :func:`check_profile` finds and ``carousel serve`` runs it
before it opens a memory, so a profile that loads but cannot run is refused at the door with the
TOML key to change (``memory.em_size``, ``tiers[0].path``, ``memories.cifar.swap.prefetch_depth``)
instead of dying in an allocation or a ``mkdir`` with a traceback:

- **RAM.** What the daemon holds once its queues are full: the process itself, each memory's EM
  (``em_size`` x the record of every field, plus its slot bookkeeping), its write-behind queue
  (``queue_samples`` x the record ``add()`` takes), its prefetch queue (``prefetch_depth`` decoded
  records, all classes together), one client's batch ring (``ring_slots`` x a 256-row batch), and
  the chunks its swap workers read from a chunked tier. More than the machine's RAM (physical, or
  the cgroup's limit when lower) is an error naming the key of the largest part. The catalog and
  the manifests grow with every sample stored (~128 B and ~64 B a sample at their peaks, see
  ``docs/design.md``): that figure at full tiers is printed, not refused, since it is reached only
  over a stream's life.
- **Paths.** Each tier's folder, ``memory.state_dir``, ``daemon.data_dir`` and ``daemon.socket_dir``
  must be writable folders, or creatable: their nearest existing ancestor is a folder in which a
  temporary entry can be made (and is removed at once). An existing socket folder must be one the
  daemon accepts (ours, a real folder, closed to others), and the socket path short enough to bind;
  ``daemon.token_file`` (with ``daemon.tcp``) must be a private file of 16 bytes or more.
- **Names.** Admission and swap policies and the memory's codec, as ``CarouselMemory`` checks
  them, and a record no larger than a store accepts.

Nothing here imports torch.

>>> from carousel.daemon.profile import DaemonProfile
>>> p = DaemonProfile.from_dict({"daemon": {"socket_dir": "/tmp/cz-doc", "metrics": ""},
...                              "memory": {"em_size": 10**12, "sample_shape": [3, 32, 32]}})
>>> report = check_profile(p, MachineRam(physical=16 << 30, cgroup_limit=None, available=None), paths=False)
>>> [(e.key, e.reason.split(";")[0]) for e in report.problems]  # doctest: +NORMALIZE_WHITESPACE
[('memory.em_size', 'the daemon would need ~2.8 PiB of RAM with its queues full, more than the
16.0 GiB this machine has')]
"""

from __future__ import annotations

import math
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from storage_backends.schema import MAX_RECORD_BYTES

from ..config import CarouselConfig, ConfigError
from ..integrity import verify_requested
from .profile import DaemonProfile

__all__ = ["CATALOG_BYTES", "MANIFEST_BYTES", "PROCESS_BYTES", "RING_ROWS", "MachineRam", "RamPart", "Report",
           "check_profile", "human_bytes", "machine_ram"]

# The daemon before any sample: Python, numpy, torch, prometheus (tests/deploy measures ~260 MB).
PROCESS_BYTES = 300 << 20
# The batch a ring is sized for: what a trainer typically draws (the README's figures use 256).
RING_ROWS = 256
# Bookkeeping per stored sample at its peak, measured by tests/deploy/test_profiles.py
# (test_bookkeeping_costs_are_what_the_profiles_budget): the catalog's columns while they double,
# and a Zarr or flat tier's manifest row.
CATALOG_BYTES = 128
MANIFEST_BYTES = 64
_SLOT_BYTES = 3 * 8  # an EM slot's id, label and task (int64 each) beside its fields
_SUN_PATH = 108      # sockaddr_un.sun_path on Linux, the terminating NUL included


def human_bytes(n: float) -> str:
    """``3229614080`` -> ``'3.0 GiB'``.

    >>> human_bytes(512), human_bytes(3 << 20), human_bytes(10**12 * 3106)
    ('512 B', '3.0 MiB', '2.8 PiB')
    """
    for unit, scale in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                        ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# ---- the machine ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MachineRam:
    """This machine's RAM: ``physical``, a cgroup's limit (None: none set), ``available`` now (MemAvailable)."""

    physical: int
    cgroup_limit: int | None
    available: int | None

    @property
    def total(self) -> int:
        """What a process here may hold at most: the physical RAM or the cgroup's limit, the lower."""
        return self.physical if self.cgroup_limit is None else min(self.physical, self.cgroup_limit)

    def describe(self) -> str:
        """``'23.5 GiB (22.8 GiB available now)'``, naming a cgroup limit when it is the bound."""
        limited = self.cgroup_limit is not None and self.cgroup_limit < self.physical
        text = human_bytes(self.total) + (" (the cgroup's memory limit)" if limited else "")
        if self.available is not None:
            text += f", {human_bytes(self.available)} available now"
        return text


def machine_ram() -> MachineRam:
    """Read the physical RAM (sysconf), the cgroup limit (v2 ``memory.max`` or v1
    ``memory.limit_in_bytes``; "max" or an absurd number means none) and MemAvailable."""
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = None
    for path in _cgroup_files():
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes 2**63 rounded to a page for "none"
            limit = int(text) if limit is None else min(limit, int(text))
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return MachineRam(physical, limit, available)


def _cgroup_files() -> Iterator[str]:
    root = "/sys/fs/cgroup"
    try:
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":  # v2: the unified hierarchy
                    yield os.path.join(root, path.lstrip("/"), "memory.max")
                elif "memory" in controllers.split(","):
                    yield os.path.join(root, "memory", path.lstrip("/"), "memory.limit_in_bytes")
    except (OSError, ValueError):
        pass
    # In a container the cgroup namespace puts our own group at the root.
    yield os.path.join(root, "memory.max")
    yield os.path.join(root, "memory", "memory.limit_in_bytes")


# ---- RAM -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RamPart:
    """One part of a memory's RAM: ``what`` it is, the TOML ``key`` that sizes it, ``nbytes``, ``how`` counted."""

    what: str
    key: str
    nbytes: int
    how: str

    def __str__(self) -> str:
        return f"{self.what} {human_bytes(self.nbytes)} ({self.key}: {self.how})"


@dataclass
class Report:
    """What :func:`check_profile` found: RAM by memory, the bookkeeping at full tiers, the problems."""

    machine: MachineRam
    ram: dict[str, list[RamPart]] = field(default_factory=dict)       # memory name -> its parts
    bookkeeping: dict[str, RamPart] = field(default_factory=dict)    # memory -> its catalog (+ manifests), tiers full
    problems: list[ConfigError] = field(default_factory=list)

    @property
    def ram_nbytes(self) -> int:
        """The process plus every memory's parts: what the daemon holds with its queues full."""
        return PROCESS_BYTES + sum(p.nbytes for parts in self.ram.values() for p in parts)

    def lines(self, name: str) -> list[str]:
        """check-config's lines about one memory's RAM."""
        out = ["  RAM: " + ", ".join(str(p) for p in self.ram.get(name, []))]
        if name in self.bookkeeping:
            part = self.bookkeeping[name]
            out.append(f"  grows with the samples stored: {part.what} {human_bytes(part.nbytes)} with the tiers full "
                       f"({part.key}: {part.how})")
        return out

    def summary(self) -> str:
        """check-config's line about the whole daemon's RAM against the machine's."""
        text = (f"RAM: ~{human_bytes(self.ram_nbytes)} with the queues full (the process ~{human_bytes(PROCESS_BYTES)} "
                f"and the memories), of {self.machine.describe()}")
        if self.machine.available is not None and self.ram_nbytes > self.machine.available:
            text += "; more than is available now: other processes will be swapped out or killed"
        grown = self.ram_nbytes + sum(p.nbytes for p in self.bookkeeping.values())
        if grown > self.machine.total:
            text += (f"; with the tiers full the bookkeeping takes it to ~{human_bytes(grown)}, more than this machine "
                     "has: lower the tier capacities or plan for a fresh memory before then")
        return text


def _record(fields: dict[str, tuple[tuple[int, ...], str]]) -> int:
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in fields.values())


def _memory_ram(profile: DaemonProfile, name: str, cfg: CarouselConfig, report: Report) -> None:
    key = lambda k: profile.memory_key(name, k)  # noqa: E731
    mc, sc = cfg.memory, cfg.swap
    fields = {"x": (tuple(mc.sample_shape), mc.dtype), "y": ((), "int64"), "task": ((), "int16"),
              **{n: (tuple(s), d) for n, (s, d) in mc.extras.items()}}
    record = _record(fields)
    if record > MAX_RECORD_BYTES:
        biggest = max(fields, key=lambda n: _record({n: fields[n]}))
        report.problems.append(ConfigError(
            profile.source, key("memory.sample_shape" if biggest == "x" else f"memory.extras.{biggest}.shape"),
            f"one sample takes {record:,} bytes with its label, task and extras; a store holds records of at most "
            f"{MAX_RECORD_BYTES:,}"))
        return
    _names(profile, name, cfg, fields, report)
    codec_inputs: dict[str, tuple[tuple[int, ...], str]] = {}
    if mc.kind == "saliency":
        from ..config import SALIENCY_FIELD
        codec_inputs = {SALIENCY_FIELD: (tuple(mc.sample_shape[-2:]), "uint8")}  # what add() takes beside (kinds.py)
    parts = [RamPart("EM", key("memory.em_size"), mc.em_size * (record + _SLOT_BYTES),
                     f"{mc.em_size:,} x {record + _SLOT_BYTES:,} B")]
    if cfg.tiers:
        queued = record + _record(codec_inputs)
        wb = cfg.write_behind.queue_samples
        parts.append(RamPart("write-behind queue", key("write_behind.queue_samples"), wb * queued,
                             f"{wb:,} x {queued:,} B"))
        parts.append(RamPart("prefetch", key("swap.prefetch_depth"), sc.prefetch_depth * record,
                             f"{sc.prefetch_depth:,} x {record:,} B"))
        for i, t in enumerate(cfg.tiers):
            if t.kind == "zarr":  # a swap worker reads a whole chunk at a time
                workers = max(1, sc.workers)
                parts.append(RamPart(f"tiers[{i}] chunk reads", key(f"tiers[{i}].chunk"), workers * t.chunk * record,
                                     f"{workers} worker(s) x {t.chunk:,} rows x {record:,} B"))
    slots = profile.daemon.ring_slots
    parts.append(RamPart("ring a client", "daemon.ring_slots", slots * RING_ROWS * record,
                         f"{slots} x {RING_ROWS} rows x {record:,} B, in /dev/shm"))
    report.ram[name] = parts
    if cfg.tiers:
        # An adopted folder's samples are all in the catalog: counted from the folder itself.
        samples = sum(adopted_count(t.path) if t.layout == "imagefolder" else t.capacity_for(record)
                      for t in cfg.tiers)
        rows = sum(t.capacity_for(record) for t in cfg.tiers if t.kind in ("zarr", "flat", "files"))  # row manifests
        try:
            verify = verify_requested(mc.verify)
        except ConfigError as exc:  # a CAROUSEL_VERIFY the memory would refuse
            report.problems.append(exc)
            verify = True
        # The integrity mode's reference CRCs: 4 bytes per field of every id, twice while they double.
        per_id = CATALOG_BYTES + (2 * 4 * len(fields) if verify else 0)
        how = f"{samples:,} samples x {per_id} B" + (f" + {rows:,} rows x {MANIFEST_BYTES} B" if rows else "")
        keys = " + ".join(key(f"tiers[{i}].capacity") for i in range(len(cfg.tiers)))
        report.bookkeeping[name] = RamPart("catalog" + (" and manifests" if rows else ""), keys,
                                           samples * per_id + rows * MANIFEST_BYTES, how)


def _names(profile: DaemonProfile, name: str, cfg: CarouselConfig, fields, report: Report) -> None:
    """The registry look-ups ``CarouselMemory`` makes before it allocates anything."""
    from ..kinds import make_codec
    from ..policies import make_admission, make_swap_in, make_swap_out

    mc, sc = cfg.memory, cfg.swap
    for k, make, value in (("memory.admission", make_admission, mc.admission),
                           ("swap.policy", make_swap_out, sc.policy), ("swap.swap_in", make_swap_in, sc.swap_in)):
        try:
            make(value)
        except ValueError as exc:
            report.problems.append(ConfigError(profile.source, profile.memory_key(name, k), str(exc)))
    try:
        make_codec(mc, fields)
    except ValueError as exc:
        k = "memory.saliency" if mc.kind == "saliency" else "memory.kind"
        report.problems.append(ConfigError(profile.source, profile.memory_key(name, k), str(exc)))


def _check_ram(profile: DaemonProfile, report: Report) -> None:
    need, machine = report.ram_nbytes, report.machine
    if need <= machine.total:
        return
    parts = [p for ps in report.ram.values() for p in ps]
    if not parts:  # a machine smaller than the process itself: nothing in the profile to lower
        return
    top = max(parts, key=lambda p: p.nbytes)
    report.problems.append(ConfigError(
        profile.source, top.key,
        f"the daemon would need ~{human_bytes(need)} of RAM with its queues full, more than the "
        f"{human_bytes(machine.total)} this machine has; {top.what} takes {human_bytes(top.nbytes)} of it "
        f"({top.how}): lower {top.key}"))


# ---- paths ---------------------------------------------------------------------------------------------
def _paths(profile: DaemonProfile) -> Iterator[tuple[str, str, str]]:
    """(key, path, what) of every folder the daemon creates or writes."""
    dc = profile.daemon
    for name, cfg in profile.memories.items():
        for i, t in enumerate(cfg.tiers):
            what = "adopted image folder" if t.layout == "imagefolder" else "tier folder"
            yield profile.memory_key(name, f"tiers[{i}].path"), t.path, what
        if cfg.memory.state_dir is not None:
            yield profile.memory_key(name, "memory.state_dir"), cfg.memory.state_dir, "state folder"
    data = profile.data_dir()
    yield "daemon.data_dir", data, "data folder" if dc.data_dir else "data folder (daemon.data_dir unset: its default)"
    yield "daemon.socket_dir", dc.resolved_socket_dir(), \
        "socket folder" if dc.socket_dir else "socket folder (daemon.socket_dir unset: its default)"


def _readable_folder(path: str) -> str | None:
    """Why ``path`` cannot be read as an image folder (None: it can)."""
    if not os.path.isdir(path):
        return f"{path} is not a folder" if os.path.lexists(path) else f"{path} does not exist"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"cannot read {path}: permission denied"
    return None


def adopted_count(path: str) -> int:
    """Files in the class folders of an image folder (what the tier will hold; 0 if unreadable)."""
    n = 0
    try:
        with os.scandir(path) as classes:
            for entry in classes:
                if entry.is_dir() and not entry.name.startswith("."):
                    with os.scandir(entry.path) as files:
                        n += sum(1 for f in files if f.is_file())
    except OSError:
        return 0
    return n


def _writable(path: str, probed: dict[str, str | None]) -> str | None:
    """Why ``path`` cannot be a folder we write in (None: it can). Tries a temp entry, removed at once."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            return f"{path} exists and is not a folder"
        where = path
    else:
        where = os.path.dirname(path)
        while not os.path.lexists(where):
            where = os.path.dirname(where)
        if not os.path.isdir(where):
            return f"cannot create {path}: {where} is not a folder"
    if where not in probed:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".carousel-check-", dir=where))
            probed[where] = None
        except OSError as exc:
            probed[where] = exc.strerror or str(exc)
    reason = probed[where]
    if reason is None:
        return None
    return f"cannot write in {path}: {reason}" if where == path else f"cannot create {path}: {where}: {reason}"


def _socket_dir(profile: DaemonProfile) -> str | None:
    """What ``carousel serve`` would refuse about the socket folder and path (server.prepare_socket_dir)."""
    path = profile.daemon.resolved_socket_dir()
    sock = os.path.join(path, "carousel.sock")
    if len(os.fsencode(os.path.abspath(sock))) >= _SUN_PATH:
        return (f"the socket path {sock} is {len(os.fsencode(sock))} bytes; a Unix socket path must be shorter "
                f"than {_SUN_PATH}: choose a shorter folder")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None  # made 0700 at start
    except OSError as exc:
        return f"cannot look at {path}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder (or is a symlink); the daemon refuses it"
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not {os.getuid()}; the daemon refuses it"
    if st.st_mode & (0o077 if profile.daemon.allow_group is None else 0o067):
        return (f"{path} has mode {stat.S_IMODE(st.st_mode):o}: others could reach or replace the socket, and the "
                f"daemon refuses it; chmod 700 {path}, or remove it")
    return None


def _token(path: str) -> str | None:
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            token = fh.read(4096).strip()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if st.st_mode & 0o077:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):o}; make it 0600"
    if len(token) < 16:
        return f"{path}: the token must be at least 16 bytes"
    return None


def _check_paths(profile: DaemonProfile, report: Report) -> None:
    probed: dict[str, str | None] = {}
    failed = set()
    for key, path, what in _paths(profile):
        # An adopted folder is the user's data set, read where it is: checked for reading, never
        # probed by writing into it (and it may sit on a read-only mount).
        reason = _readable_folder(path) if what == "adopted image folder" else _writable(path, probed)
        if reason is not None:
            failed.add(key)
            report.problems.append(ConfigError(profile.source, key, f"the {what}: {reason}"))
    reason = None if "daemon.socket_dir" in failed else _socket_dir(profile)
    if reason is not None:
        report.problems.append(ConfigError(profile.source, "daemon.socket_dir", reason))
    dc = profile.daemon
    if dc.tcp_address is not None and dc.token_file is not None:
        reason = _token(dc.token_file)
        if reason is not None:
            report.problems.append(ConfigError(profile.source, "daemon.token_file", reason))


# ---- all of it -----------------------------------------------------------------------------------------
def check_profile(profile: DaemonProfile, machine: MachineRam | None = None, *, paths: bool = True) -> Report:
    """Everything above, for a loaded profile; the problems come back in ``report.problems``
    (each a :class:`~carousel.config.ConfigError`: file, TOML key, reason), nothing is raised.
    ``paths=False`` skips the file-system checks (the RAM and names only)."""
    report = Report(machine if machine is not None else machine_ram())
    for name, cfg in profile.memories.items():
        _memory_ram(profile, name, cfg, report)
    _check_ram(profile, report)
    if paths:
        _check_paths(profile, report)
    return report
