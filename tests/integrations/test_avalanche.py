"""The Avalanche integration's tests (``avalanche_cases.py``), wherever avalanche-lib can run.

avalanche-lib imports torchvision, and torchvision's wheels on the package index are built against
CUDA torch (their ``_C.so`` needs ``libtorch_cuda.so``): beside the CPU torch this project pins they
do not load. So the cases run in-process where avalanche imports, else in the interpreter named by
``CAROUSEL_AVALANCHE_PYTHON`` (``.ci/run`` builds a side venv with CUDA torch 2.13, torchvision,
avalanche-lib and carousel), else they are skipped, saying why.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("avalanche_cases.py")

try:
    import avalanche  # noqa: F401
    IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - a torchvision built for another torch raises RuntimeError
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

if IMPORT_ERROR is None:
    from .avalanche_cases import *  # noqa: F401,F403  (the cases, collected here)
else:
    def test_avalanche_cases_in_their_own_interpreter():
        python = os.environ.get("CAROUSEL_AVALANCHE_PYTHON")
        if not python:
            pytest.skip(f"avalanche-lib does not import here ({IMPORT_ERROR}); set CAROUSEL_AVALANCHE_PYTHON to "
                        "an interpreter where it does (.ci/run builds one)")
        proc = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                              capture_output=True, text=True, timeout=900, cwd=CASES.parents[2])
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        assert proc.returncode == 0 and "passed" in last and "skipped" not in last, \
            proc.stdout[-3000:] + proc.stderr[-2000:]
