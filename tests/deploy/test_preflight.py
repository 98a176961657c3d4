"""Profiles that load but cannot start or work here: refused at the door, naming the TOML key.

Each case is one problem in an otherwise valid profile (single- or multi-memory layout): an EM,
write-behind queue or prefetch queue larger than any machine's RAM, a record larger than a store
takes, an unknown policy, a tier, state, data or socket folder that cannot be created (its parent
is a regular file: that stops root too, and these tests may run as root), a socket folder the
daemon would refuse, a socket path too long to bind. ``carousel check-config`` exits 2 with
``FILE: KEY: REASON`` on stderr; ``carousel serve`` (one case of each kind) prints exactly one
line ``carousel: cannot start: FILE: KEY: REASON`` and exits 2. Neither prints a traceback, and neither leaves anything
behind (the writability probes included). All of it runs as real processes, side by side: none
of them imports torch (~0.5 s each).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from carousel.daemon.profile import DaemonProfile
from carousel.daemon.preflight import MachineRam, check_profile, human_bytes, machine_ram

from .profiles import CAROUSEL, dump_toml, multi_profile, set_key, single_profile

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Case:
    name: str
    layout: str          # "single" or "multi"
    edit: str            # a dotted key of the profile to set
    value: object        # its value; "{root}" is replaced by the case's folder
    key: str             # the TOML key the error names
    reason: str          # a substring of the reason
    setup: str = ""      # "file": ROOT/a-file is a regular file; "open-dir": ROOT/open is a 0755 folder
    serve: bool = False  # also through `carousel serve` (one case of each kind: each run costs ~0.6 s of CPU)

    def write(self, root: Path) -> Path:
        if self.setup == "file":
            (root / "a-file").write_text("not a folder\n")
        elif self.setup == "open-dir":
            (root / "open").mkdir()
            os.chmod(root / "open", 0o755)
        data = (single_profile if self.layout == "single" else multi_profile)(root)
        value = self.value.replace("{root}", str(root)) if isinstance(self.value, str) else self.value
        path = root / "profile.toml"
        path.write_text(dump_toml(set_key(data, self.edit, value)))
        return path


RAM = "of RAM with its queues full, more than the"
NOT_A_FOLDER = "/a-file is not a folder"
CASES = [
    Case("em-huge", "single", "memory.em_size", 10**12, "memory.em_size", RAM, serve=True),
    Case("queue-huge", "single", "write_behind.queue_samples", 10**15, "write_behind.queue_samples", RAM,
         serve=True),
    Case("prefetch-huge", "single", "swap.prefetch_depth", 10**13, "swap.prefetch_depth", RAM, serve=True),
    Case("em-huge-multi", "multi", "memories.mnist.memory.em_size", 10**12, "memories.mnist.memory.em_size", RAM),
    Case("record-huge", "single", "memory.sample_shape", [3, 10000, 10000], "memory.sample_shape",
         "a store holds records of at most 268,435,456", serve=True),
    Case("extra-huge", "single", "memory.extras", {"logits": {"shape": [1 << 27], "dtype": "float32"}},
         "memory.extras.logits.shape", "a store holds records of at most 268,435,456"),
    Case("admission-unknown", "single", "memory.admission", "fifo", "memory.admission", "fifo"),
    Case("tier-under-file", "single", "tiers.0.path", "{root}/a-file/flash", "tiers[0].path", NOT_A_FOLDER, "file"),
    Case("tier-under-file-multi", "multi", "memories.cifar.tiers.1.path", "{root}/a-file/disk",
         "memories.cifar.tiers[1].path", NOT_A_FOLDER, "file", serve=True),
    Case("tier-is-a-file", "single", "tiers.0.path", "{root}/a-file", "tiers[0].path", "exists and is not a folder",
         "file"),
    Case("state-under-file", "single", "memory.state_dir", "{root}/a-file/state", "memory.state_dir", NOT_A_FOLDER,
         "file"),
    Case("state-under-file-multi", "multi", "memories.mnist.memory.state_dir", "{root}/a-file/state",
         "memories.mnist.memory.state_dir", NOT_A_FOLDER, "file"),
    Case("data-under-file", "multi", "daemon.data_dir", "{root}/a-file/data", "daemon.data_dir", NOT_A_FOLDER, "file",
         serve=True),
    Case("socket-under-file", "single", "daemon.socket_dir", "{root}/a-file/sock", "daemon.socket_dir", NOT_A_FOLDER,
         "file", serve=True),
    Case("socket-dir-open", "single", "daemon.socket_dir", "{root}/open", "daemon.socket_dir",
         "has mode 755: others could reach or replace the socket", "open-dir", serve=True),
    Case("socket-path-long", "single", "daemon.socket_dir", "{root}/" + "s" * 100, "daemon.socket_dir",
         "a Unix socket path must be shorter than 108"),
]
RUNS = [(case, command) for case in CASES for command in ("check-config", "serve") if command == "check-config"
        or case.serve]
SERVED = [case for case in CASES if case.serve]


def _tree(root: Path) -> dict[str, int]:
    """Every entry under ``root`` with its mode: what a run may not change."""
    return {str(p.relative_to(root)): p.lstat().st_mode for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def results():
    """Every run, in a fresh short folder of its own (a socket path must fit 108 bytes)."""
    roots, jobs = [], {}

    def run(args):
        return subprocess.run([*CAROUSEL, *args], capture_output=True, text=True, timeout=90)

    try:
        for case, command in RUNS:
            root = Path(tempfile.mkdtemp(prefix="cz-"))
            roots.append(root)
            profile = case.write(root)
            args = ["check-config", str(profile)] if command == "check-config" else ["serve", "--config", str(profile)]
            jobs[(case.name, command)] = (profile, _tree(root), args)
        with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
            futures = {k: pool.submit(run, args) for k, (_, _, args) in jobs.items()}
            yield {k: (jobs[k][0], jobs[k][1], f.result(), _tree(jobs[k][0].parent)) for k, f in futures.items()}
    finally:
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_check_config_refuses_naming_the_key(case, results):
    profile, before, done, after = results[(case.name, "check-config")]
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert all(line.startswith(f"carousel: invalid profile: {profile}: ") for line in lines), lines
    assert len(lines) == 1, lines  # the one problem of the case, nothing else
    assert lines[0].startswith(f"carousel: invalid profile: {profile}: {case.key}: "), lines[0]
    assert case.reason in lines[0], lines[0]
    assert f"{profile}: ok" not in done.stdout
    assert after == before, "check-config made or left something"


@pytest.mark.parametrize("case", SERVED, ids=[c.name for c in SERVED])
def test_serve_cannot_start_in_one_line(case, results):
    profile, before, done, after = results[(case.name, "serve")]
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"carousel: cannot start: {profile}: {case.key}: "), lines[0]
    assert case.reason in lines[0], lines[0]
    assert after == before, "serve made something before refusing"


def test_check_config_prints_the_ram_estimate(tmp_path):
    """A valid profile: each part of the RAM named with its key, the total against this machine's."""
    root = Path(tempfile.mkdtemp(prefix="cz-"))
    try:
        profile = root / "profile.toml"
        profile.write_text(dump_toml(set_key(multi_profile(root), "memories.cifar.memory.em_size", 1000)))
        done = subprocess.run([*CAROUSEL, "check-config", str(profile)], capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    record = 3 * 8 * 8 + 8 + 2  # x, y (int64), task (int16)
    out = done.stdout
    assert f"EM {human_bytes(1000 * (record + 24))} (memories.cifar.memory.em_size: 1,000 x {record + 24} B)" in out
    assert f"write-behind queue {human_bytes(4096 * record)} (memories.mnist.write_behind.queue_samples: " \
           f"4,096 x {record} B)" in out
    assert f"prefetch {human_bytes(512 * record)} (memories.cifar.swap.prefetch_depth: 512 x {record} B)" in out
    assert "(daemon.ring_slots: 8 x 256 rows" in out
    assert "RAM: ~" in out and "with the queues full" in out
    assert out.rstrip().endswith(f"{profile}: ok")


def test_check_config_without_machine_checks(tmp_path):
    """A profile for another device: --no-machine-checks validates it without sizing it to this one."""
    profile = tmp_path / "profile.toml"
    profile.write_text(dump_toml(set_key(single_profile(tmp_path), "memory.em_size", 10**12)))
    done = subprocess.run([*CAROUSEL, "check-config", "--no-machine-checks", str(profile)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "RAM" not in done.stdout and done.stdout.rstrip().endswith(f"{profile}: ok")


def _read_only_bind() -> list[str] | None:
    """A command prefix that runs its command in a private mount namespace in which ``$RO`` (an
    environment variable) is a read-only bind mount of itself -- a read-only file system that
    stops root too, gone with the process. None where namespaces or mounts are not allowed."""
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    prefix += ["sh", "-c", 'mount --bind -o ro "$RO" "$RO" && exec "$@"', "sh"]
    if shutil.which("unshare") is None:
        return None
    probe = Path(tempfile.mkdtemp(prefix="cz-"))
    try:
        done = subprocess.run([*prefix, "sh", "-c", 'touch "$RO/x"'], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "RO": str(probe)})
        return prefix if done.returncode != 0 and "Read-only file system" in done.stderr else None
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def test_a_tier_on_a_read_only_file_system():
    prefix = _read_only_bind()
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare -m / mount --bind -o ro refused)")
    root = Path(tempfile.mkdtemp(prefix="cz-"))
    try:
        ro = root / "ro"
        ro.mkdir()
        data = single_profile(root)
        data["tiers"][0]["path"] = str(ro / "flash")
        profile = root / "profile.toml"
        profile.write_text(dump_toml(data))
        before = _tree(root)
        env = {**os.environ, "RO": str(ro)}
        check = subprocess.run([*prefix, *CAROUSEL, "check-config", str(profile)], capture_output=True, text=True,
                               timeout=60, env=env)
        serve = subprocess.run([*prefix, *CAROUSEL, "serve", "--config", str(profile)], capture_output=True,
                               text=True, timeout=60, env=env)
        after = _tree(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    reason = f"tiers[0].path: the tier folder: cannot create {ro}/flash: {ro}: Read-only file system"
    assert check.returncode == 2 and check.stderr.strip() == f"carousel: invalid profile: {profile}: {reason}", \
        check.stderr
    assert serve.returncode == 2 and serve.stderr.strip() == f"carousel: cannot start: {profile}: {reason}", \
        serve.stderr
    assert after == before


def test_a_folder_this_user_cannot_write():
    """Permission bits, as an ordinary user: as uid 65534 when the tests run as root (root writes
    through permission bits), as ourselves otherwise."""
    kw = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
    if kw:
        try:
            subprocess.run([*CAROUSEL, "--version"], capture_output=True, timeout=60, check=True, cwd="/", **kw)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"this interpreter cannot run as uid 65534 ({exc}); the read-only case stands in")
    root = Path(tempfile.mkdtemp(prefix="cz-"))
    os.chmod(root, 0o755)
    try:
        locked = root / "locked"
        locked.mkdir()
        os.chmod(locked, 0o555)
        writable = root / "rw"
        writable.mkdir()
        os.chmod(writable, 0o777)
        data = single_profile(writable)
        data["tiers"][0]["path"] = str(locked / "flash")
        profile = root / "profile.toml"
        profile.write_text(dump_toml(data))
        os.chmod(profile, 0o644)
        before = _tree(root)
        done = subprocess.run([*CAROUSEL, "check-config", str(profile)], capture_output=True, text=True, timeout=60,
                              cwd=root, **kw)
        after = _tree(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert done.returncode == 2, (done.stdout, done.stderr)
    line = done.stderr.strip()
    assert line == (f"carousel: invalid profile: {profile}: tiers[0].path: the tier folder: cannot create "
                    f"{locked}/flash: {locked}: Permission denied"), line
    assert after == before


def test_a_socket_folder_of_another_user(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another uid needs root")
    root = Path(tempfile.mkdtemp(prefix="cz-"))
    try:
        sock = root / "sock"
        sock.mkdir(mode=0o700)
        os.chown(sock, 65534, 65534)
        profile = root / "profile.toml"
        profile.write_text(dump_toml(single_profile(root)))
        done = subprocess.run([*CAROUSEL, "serve", "--config", str(profile)], capture_output=True, text=True,
                              timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"carousel: cannot start: {profile}: daemon.socket_dir: {sock} is owned by uid "
                                   f"65534, not 0; the daemon refuses it"), done.stderr


# ---- the estimate against a machine, in-process -----------------------------------------------------------
def test_this_machines_ram_is_read():
    m = machine_ram()
    assert m.physical > 1 << 28 and 0 < m.total <= m.physical
    assert m.available is None or 0 < m.available <= m.physical


def test_a_cgroup_limit_below_the_physical_ram_is_the_bound(tmp_path):
    """Fits the machine's 64 GiB, not the container's 512 MiB: the largest part's key is named."""
    data = set_key(single_profile(tmp_path), "memory.em_size", 200_000)  # 200 k x (202 + 24) B = 43 MiB
    data = set_key(data, "swap.prefetch_depth", 2_000_000)                 # 2 M x 202 B = 385 MiB: the largest
    profile = DaemonProfile.from_dict(data, source="p.toml")
    small = MachineRam(physical=64 << 30, cgroup_limit=512 << 20, available=None)
    report = check_profile(profile, small, paths=False)
    assert [(e.file, e.key) for e in report.problems] == [("p.toml", "swap.prefetch_depth")]
    assert "more than the 512.0 MiB this machine has; prefetch takes 385.3 MiB of it (2,000,000 x 202 B)" \
        in report.problems[0].reason
    assert "the cgroup's memory limit" in small.describe()
    roomy = MachineRam(physical=64 << 30, cgroup_limit=None, available=None)
    assert check_profile(profile, roomy, paths=False).problems == []


def test_an_adopted_image_folder_is_checked_for_reading_never_written_and_counted(tmp_path):
    """The user's data set is only read: check-config never probes it by writing (its mtime stays),
    a missing one is named, and its images count in the catalog's RAM."""
    folder = tmp_path / "images"
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        for i in range(7):
            (folder / c / f"{i}.png").write_bytes(b"not decoded by the check")
    data = single_profile(tmp_path)
    data["tiers"].append({"kind": "files", "path": str(folder), "layout": "imagefolder"})
    before = os.stat(folder).st_mtime_ns
    report = check_profile(DaemonProfile.from_dict(data))
    assert not report.problems, report.problems
    assert os.stat(folder).st_mtime_ns == before  # no temp entry made and removed in it
    assert "1,014 samples" in report.bookkeeping["default"].how  # 1,000 on the LMDB tier + 14 images
    data["tiers"][1]["path"] = str(tmp_path / "nowhere")
    report = check_profile(DaemonProfile.from_dict(data))
    assert [p.key for p in report.problems] == ["tiers[1].path"]
    assert "does not exist" in report.problems[0].reason and not (tmp_path / "nowhere").exists()
