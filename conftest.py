"""pytest's collection for the whole tree (``--doctest-modules`` imports every module it finds).

The integrations and ``carousel.ray`` import their framework at module level. A newcomer's venv
(the README's quick start: no extras) has none of them, so a module that imports an optional
framework which does not import here (not installed, or, for Avalanche, a torchvision built for
another torch) is left out of collection instead of failing it; the tests of that framework say so
themselves (visible skips). Any other import error still fails collection loudly.

The docstring examples make their folders with ``tempfile.mkdtemp()``, as a user would; under pytest
each one's temporary folder is its own ``tmp_path`` (pytest removes those), so a test run leaves
nothing in the system's temporary folder.
"""

from __future__ import annotations

import importlib
import re
import tempfile
from functools import cache
from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem  # its home since pytest 2; scikit-learn's conftest imports it so too

OPTIONAL_FRAMEWORKS = ("ray", "torchrl", "tensordict", "avalanche", "torchvision", "kornia")
_ROOT = Path(__file__).parent
# Modules that may import an optional framework at module level.
_CANDIDATES = [*sorted((_ROOT / "carousel" / "ray").glob("*.py")),
               *sorted((_ROOT / "carousel" / "integrations").glob("*.py")),
               _ROOT / "tests" / "integrations" / "avalanche_cases.py"]


@cache
def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError beside a CPU torch
        return False
    return True


def _needs_missing_framework(path: Path) -> bool:
    """Whether ``path`` imports an optional framework that does not import here."""
    source = path.read_text()
    return any(re.search(rf"^\s*(import|from)\s+{fw}\b", source, re.MULTILINE) and not _imports(fw)
               for fw in OPTIONAL_FRAMEWORKS)


def _ignored() -> list[str]:
    out = []
    for path in _CANDIDATES:
        if _needs_missing_framework(path):
            out.append(str(path.relative_to(_ROOT)))
            continue
        # Its own imports are present, but it may import a sibling that needs a missing one.
        module = ".".join(path.relative_to(_ROOT).with_suffix("").parts)
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if exc.name and exc.name.split(".")[0] in OPTIONAL_FRAMEWORKS:
                out.append(str(path.relative_to(_ROOT)))
                continue
            raise
    return out


collect_ignore: list[str] = _ignored()


@pytest.fixture(autouse=True)
def _doctest_temp_folder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A docstring example's ``tempfile.mkdtemp()`` lands in its ``tmp_path`` (see above)."""
    if isinstance(request.node, DoctestItem):
        monkeypatch.setattr(tempfile, "tempdir", str(request.getfixturevalue("tmp_path")))
