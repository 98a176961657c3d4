"""RELIABILITY item 19: an invalid profile -> exit code 2, stderr names file, key and reason; nothing started.

Every case is one mistake in an otherwise valid profile, in the single-memory layout (``[daemon]``
beside ``[memory]``, ``[swap]``, ``[[tiers]]``) or the multi-memory one (``[memories.NAME.memory]``
...): invalid TOML, an unknown key (answered with a did-you-mean), an out-of-range value, in the
``[daemon]`` table and in a memory section. Each profile is given to ``carousel check-config``, and
four of them also to ``carousel serve --config``, as real processes run side by side, and neither may
create the data, state, tier or socket folders it names. (Profiles that load but cannot run on
this machine -- too large for its RAM, folders that cannot be made -- are test_preflight.py's.)
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from carousel.config import ConfigError, load_config
from carousel.daemon.profile import load_profile

from .profiles import CAROUSEL, dump_toml, multi_profile, set_key, single_profile

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Case:
    name: str
    layout: str                 # "single" or "multi"
    edit: str                   # a dotted key to set, or "text:OLD=>NEW" to break the TOML text itself
    value: object
    key: str                    # what the error names
    reason: str                 # what the error says (a substring)
    serve: bool = False         # also through `carousel serve` (one case of each kind: each run costs ~1 s)

    def write(self, root: Path) -> Path:
        data = (single_profile if self.layout == "single" else multi_profile)(root)
        if self.edit.startswith("text:"):
            old, new = self.edit[5:].split("=>")
            text = dump_toml(data)
            assert old in text, old
            text = text.replace(old, new, 1)
        else:
            text = dump_toml(set_key(data, self.edit, self.value))
        path = root / "profile.toml"
        path.write_text(text)
        return path


CASES = [
    # the single-memory layout: [daemon] beside [memory], [swap], [[tiers]]
    Case("toml-single", "single", "text:em_size = 16=>em_size = ", None, "<toml>", "(at line 8, column 11)"),
    Case("daemon-unknown-single", "single", "daemon.max_client", 8, "daemon.max_client",
         "unknown key; did you mean 'max_clients'?"),
    Case("daemon-range-single", "single", "daemon.ring_slots", 1, "daemon.ring_slots", "must be in [2, 64], got 1",
         serve=True),
    Case("memory-unknown-single", "single", "swap.worker", 2, "swap.worker", "unknown key; did you mean 'workers'?",
         serve=True),
    Case("tier-range-single", "single", "tiers.0.capacity", 0, "tiers[0].capacity", "must be >= 1, got 0"),
    # the multi-memory layout: [daemon] and [memories.NAME.memory], [memories.NAME.swap], ...
    Case("toml-multi", "multi", "text:[memories.mnist.swap]=>[memories.mnist.swap", None, "<toml>",
         "Expected ']' at the end of a table declaration (at line 32, column 21)", serve=True),
    Case("daemon-unknown-multi", "multi", "daemon.socket_dri", "/x", "daemon.socket_dri",
         "unknown key; did you mean 'socket_dir'?"),
    Case("daemon-range-multi", "multi", "daemon.max_frame_bytes", "1KiB", "daemon.max_frame_bytes",
         "must be in [4096, 17179869184], got 1024"),
    Case("memory-unknown-multi", "multi", "memories.mnist.swap.ration", 0.3, "memories.mnist.swap.ration",
         "unknown key; did you mean 'ratio'?"),
    Case("memory-range-multi", "multi", "memories.cifar.memory.em_size", 0, "memories.cifar.memory.em_size",
         "must be >= 1, got 0", serve=True),
]
RUNS = [(case, command) for case in CASES for command in ("check-config", "serve") if command == "check-config"
        or case.serve]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CAROUSEL, *args], capture_output=True, text=True, timeout=90)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, subprocess.CompletedProcess]]:
    """Every run, each in a fresh folder that holds only its profile."""
    jobs = {}
    for case, command in RUNS:
        profile = case.write(tmp_path_factory.mktemp(f"{case.name}-{command}"))
        args = ["check-config", str(profile)] if command == "check-config" else ["serve", "--config", str(profile)]
        jobs[(case.name, command)] = (profile, args)
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        futures = {k: pool.submit(_run, args) for k, (_, args) in jobs.items()}
        return {k: (jobs[k][0], f.result()) for k, f in futures.items()}


@pytest.mark.parametrize("layout", [single_profile, multi_profile], ids=["single", "multi"])
def test_the_base_profiles_are_valid(layout, tmp_path):
    """So each case below fails on its one mistake and nothing else. (In-process: the deploy
    profiles already go through `carousel check-config` as processes, in test_profiles.py.)"""
    profile = tmp_path / "profile.toml"
    profile.write_text(dump_toml(layout(tmp_path)))
    assert tomllib.loads(profile.read_text()) == layout(tmp_path)
    loaded = load_profile(profile)
    assert sorted(loaded.memories) == (["default"] if layout is single_profile else ["cifar", "mnist"])


@pytest.mark.parametrize(("case", "command"), RUNS, ids=[f"{c.name}-{cmd}" for c, cmd in RUNS])
def test_invalid_profile_exits_2_naming_file_key_and_reason(case, command, results):
    profile, done = results[(case.name, command)]
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    line = done.stderr.strip()
    assert line.startswith(f"carousel: invalid profile: {profile}: {case.key}: "), line
    assert case.reason in line, line
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    # Nothing started: no data, state, tier or socket folder, no lock file -- only the profile.
    assert [p.name for p in profile.parent.iterdir()] == ["profile.toml"]


# ---- a truncated file is located: where the document ends, on its last line ---------------------------
TRUNCATED = '[daemon]\nmetrics = ""\n[memory]\nsample_shape = [3, 8, 8]\nem_size = '  # cut off in line 5


def test_a_truncated_profile_is_located(tmp_path):
    path = tmp_path / "profile.toml"
    path.write_text(TRUNCATED)
    with pytest.raises(ConfigError) as info:
        load_profile(path)  # what check-config and serve call
    assert info.value.key == "<toml>"
    assert "line 5" in info.value.reason, info.value.reason


def test_a_truncated_memory_file_is_located_on_its_last_line(tmp_path):
    path = tmp_path / "memory.toml"
    path.write_text("[memory]\nsample_shape = [3, 8, 8]\nem_size = ")  # 3 lines, the last cut off
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "<toml>"
    assert "line 3" in info.value.reason, info.value.reason
