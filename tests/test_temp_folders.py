"""The test command leaves nothing in the system's temporary folder: the docstring examples'
``tempfile.mkdtemp()`` folders go to their own ``tmp_path`` (the root ``conftest.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Docstring examples that make temporary folders (a store, a state folder, a profile, image files).
EXAMPLES = ["carousel/ids.py", "carousel/daemon/profile.py", "storage_backends/image_folder.py",
            "storage_backends/files_store.py"]


def test_docstring_examples_leave_nothing_in_the_temporary_folder(tmp_path):
    system_tmp = tmp_path / "tmp"
    system_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(system_tmp)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--doctest-modules",
                           f"--basetemp={tmp_path / 'base'}", *EXAMPLES],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    # 0, not 5 (nothing collected): the examples ran
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in system_tmp.iterdir()) == []
