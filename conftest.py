"""pytest's collection for the whole tree (``--doctest-modules`` imports every module it finds).

The integrations and ``carousel.ray`` import their framework at module level; where a framework
does not import (not installed, or, for Avalanche, a torchvision built for another torch), their
modules are left out of collection instead of failing it. Their tests say so themselves (visible skips).
"""

from __future__ import annotations

import importlib


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError beside a CPU torch
        return False
    return True


collect_ignore: list[str] = []
if not _imports("avalanche"):
    collect_ignore += ["carousel/integrations/avalanche.py", "tests/integrations/avalanche_cases.py"]
if not (_imports("torchrl") and _imports("tensordict")):
    collect_ignore += ["carousel/integrations/torchrl.py"]
if not _imports("ray"):  # carousel.ray's pure parts (routing, allocation, layout, config) import without Ray
    collect_ignore += ["carousel/ray/sharded.py", "carousel/ray/placement.py"]
