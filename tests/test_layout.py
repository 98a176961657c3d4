"""The house's layout: the arrows between carousel's rooms point one way, and every documented path imports.

``carousel/`` has three rooms (docs/design.md): the memory core at the top level, the daemon
(``carousel.daemon``) and the memory kinds (``carousel.kinds``), beside the fronts ``carousel.ray``
and ``carousel.integrations``. The rules, read from the source with ``ast`` (every ``import``
statement, also inside functions and ``TYPE_CHECKING`` blocks):

- a core module imports neither the daemon nor a front, and uses a kind only through the
  package's face (``carousel.kinds``) or its ABC (``carousel.kinds.base``);
- a kind imports nothing of carousel but other kinds and ``carousel.config``.

Exempt: the package face ``carousel/__init__.py`` (it re-exports from every room, lazily), the
command line (``cli.py``, ``__main__.py``) and the public alias modules kept for users.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "carousel"

# Top-level modules that are not the core: the package face, the command line, and the paths the
# README showed users before the kinds had a room (each re-exports from carousel.kinds).
NOT_CORE = {"carousel", "carousel.cli", "carousel.__main__", "carousel.saliency", "carousel.completion"}
ROOMS_AND_FRONTS = ("carousel.daemon", "carousel.kinds", "carousel.ray", "carousel.integrations")
KINDS_FACE = {"carousel.kinds", "carousel.kinds.base"}  # what the core may use of a kind
KINDS_MAY_USE = {"carousel.config"}  # what a kind may use of the core

Modules = Mapping[str, tuple[str, bool]]  # module name -> (source, whether it is a package's __init__)


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imported_modules(name: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module of ``known`` (or package) that module ``name`` imports, relative imports resolved.
    ``from P import x`` counts ``P.x`` when that is a module, else ``P``."""
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return out


def wrong_way_imports(modules: Modules) -> list[str]:
    """``"importer -> imported"`` for every import that breaks the rules above, sorted."""
    known = set(modules)
    bad = []
    for name, (source, is_package) in modules.items():
        core = name.count(".") <= 1 and name not in NOT_CORE and not any(_within(name, r) for r in ROOMS_AND_FRONTS)
        kind = _within(name, "carousel.kinds")
        for target in imported_modules(name, source, is_package, known):
            if not _within(target, "carousel"):
                continue
            if core and any(_within(target, r) for r in ROOMS_AND_FRONTS) and target not in KINDS_FACE:
                bad.append(f"{name} -> {target}")
            elif kind and not _within(target, "carousel.kinds") and target not in KINDS_MAY_USE:
                bad.append(f"{name} -> {target}")
    return sorted(bad)


def carousel_modules() -> dict[str, tuple[str, bool]]:
    """Every module under ``carousel/``, by name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path.read_text(), is_package)
    return out


def test_the_arrows_point_one_way():
    modules = carousel_modules()
    assert {"carousel.memory", "carousel.daemon.service", "carousel.kinds.base"} <= set(modules)
    assert wrong_way_imports(modules) == []


def test_the_check_catches_every_form_of_a_wrong_way_import():
    """Planted wrong-way imports in each syntax the tree uses are found; the allowed arrows are not."""
    face = ("from ..config import MemoryConfig\nfrom .base import Codec\nfrom .raw import RawCodec\n"
            "from .saliency_codec import SaliencyCodec\n", True)
    modules = {
        "carousel": ("from .daemon.client import connect\n", True),  # the package face: exempt
        "carousel.config": ("import os\n", False),
        "carousel.memory": ("from .kinds import Codec, make_codec\nfrom .kinds.base import Codec\n"
                            "from .daemon.client import MemoryClient\n", False),
        "carousel.swap_engine": ("def read():\n    from .kinds.saliency_codec import SaliencyCodec\n", False),
        "carousel.tiers": ("import carousel.daemon.wire\nfrom carousel.kinds import raw\n", False),
        "carousel.catalog": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                             "    from .ray.sharded import ShardedMemory\n", False),
        "carousel.cli": ("from .daemon.service import Daemon\n", False),  # the command line: exempt
        "carousel.kinds": face,
        "carousel.kinds.base": ("import numpy as np\n", False),
        "carousel.kinds.raw": ("from .base import Codec\nfrom ..memory import CarouselMemory\n", False),
        "carousel.kinds.saliency_codec": ("from ..daemon import wire\nfrom ..config import SALIENCY_FIELD\n", False),
        "carousel.daemon": ("", True),
        "carousel.daemon.wire": ("", False),
        "carousel.daemon.client": ("from ..memory import CarouselMemory\nfrom ..kinds.raw import RawCodec\n", False),
        "carousel.ray.sharded": ("from ..memory import CarouselMemory\n", False),
    }
    assert wrong_way_imports(modules) == [
        "carousel.catalog -> carousel.ray.sharded",
        "carousel.kinds.raw -> carousel.memory",
        "carousel.kinds.saliency_codec -> carousel.daemon.wire",
        "carousel.memory -> carousel.daemon.client",
        "carousel.swap_engine -> carousel.kinds.saliency_codec",
        "carousel.tiers -> carousel.daemon.wire",
        "carousel.tiers -> carousel.kinds.raw",
    ]


def test_the_check_runs_on_a_planted_tree(tmp_path, monkeypatch):
    """The tree walk itself sees a planted file: a copy of carousel/ with one wrong import fails."""
    import shutil
    copy = tmp_path / "carousel"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "catalog.py").write_text((copy / "catalog.py").read_text() + "\nfrom .daemon import handlers\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    assert wrong_way_imports(carousel_modules()) == ["carousel.catalog -> carousel.daemon.handlers"]


# ---- public paths ------------------------------------------------------------------------------------
# (module, names) that README.md, docs/design.md, docs/protocol.md and DESIGN.md show users.
DOCUMENTED = [
    ("carousel", ["CarouselMemory", "connect", "MemoryClient", "ReplayDataset", "StreamReplayDataset", "Batch",
                  "CarouselConfig", "ConfigError", "load_config", "MemoryInputError", "IntegrityError",
                  "DaemonRestartedError", "RemoteError", "WriteBehindError", "__version__"]),
    ("carousel.saliency", ["grad_cam", "last_conv_block"]),
    ("carousel.completion", ["Completion", "register_completion", "make_completion", "completions"]),
    ("carousel.kinds", ["Codec", "RawCodec", "SaliencyCodec", "make_codec"]),
    ("carousel.kinds.base", ["Codec"]),
    ("carousel.kinds.saliency", ["grad_cam", "last_conv_block"]),
    ("carousel.kinds.completion", ["Completion", "register_completion"]),
    ("carousel.policies", ["AdmissionPolicy", "SwapOutPolicy", "SwapInPolicy"]),
    ("carousel.daemon.profile", ["resolve_socket_path", "load_profile", "DaemonProfile"]),
    ("carousel.daemon.wire", ["Op", "encode", "ProtocolError", "RemoteError"]),
    ("carousel.daemon.shm", ["Segment", "Doorbell", "sweep"]),
    ("carousel.daemon.shm_ring", ["RingLayout", "BatchRing", "RingReader"]),
    ("carousel.daemon.client", ["connect", "MemoryClient", "DaemonRestartedError"]),
    ("carousel.daemon.dataset", ["ReplayDataset", "StreamReplayDataset"]),
    ("carousel.ray", ["route", "shard_of", "ShardingConfig"]),
    ("carousel.integrations.mammoth", ["CarouselBuffer"]),
    ("storage_backends", ["open_store", "StoreError"]),
]


@pytest.mark.parametrize(("module", "names"), DOCUMENTED, ids=[m for m, _ in DOCUMENTED])
def test_every_documented_path_imports(module, names):
    mod = importlib.import_module(module)
    assert [n for n in names if not hasattr(mod, n)] == []


def test_the_old_paths_are_the_same_objects():
    """The alias modules re-export: a completion registered through one is known through the other."""
    import carousel.completion
    import carousel.kinds.completion
    import carousel.kinds.saliency
    import carousel.saliency
    assert carousel.saliency.grad_cam is carousel.kinds.saliency.grad_cam

    @carousel.completion.register_completion
    class Keep(carousel.completion.Completion):
        name = "layout-test-keep"

        def fill(self, x, known, base=None):
            return x

    try:
        assert isinstance(carousel.kinds.completion.make_completion("layout-test-keep"), Keep)
        assert "layout-test-keep" in carousel.kinds.completion.completions()
    finally:
        carousel.kinds.completion._REGISTRY.pop("layout-test-keep")


def test_the_console_script_and_python_m_carousel_resolve():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target
    out = subprocess.run([sys.executable, "-m", "carousel", "--version"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("carousel "), out


def test_the_rooms_import_without_torch():
    """``import carousel`` and the daemon's and kinds' packages stay cheap: the command line's
    ``--help``, ``check-config`` and ``status`` never load torch."""
    code = ("import sys, carousel, carousel.daemon, carousel.kinds, carousel.daemon.profile, "
            "carousel.daemon.preflight, carousel.daemon.wire; print(sorted(m for m in sys.modules if m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out


def test_packaging_finds_every_package():
    """``pip install .`` (setuptools' ``packages.find``) ships the daemon's and the kinds' packages."""
    setuptools = pytest.importorskip("setuptools", reason="setuptools is not installed in this venv")
    find_packages = setuptools.find_packages
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(str(ROOT), include=find["include"]))
    on_disk = {".".join(p.relative_to(ROOT).parent.parts) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk <= found and {"carousel.daemon", "carousel.kinds"} <= found
