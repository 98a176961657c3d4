"""What every benchmark script ends with: the table printed, ``results.json`` and ``results.md`` written."""

from __future__ import annotations

import json
from pathlib import Path


def write(out: Path, results: dict, lines: list[str]) -> dict:
    """Print the markdown table ``lines`` and write it and ``results`` (as JSON) into ``out``."""
    table = "\n".join(lines)
    print(table)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table + "\n")
    return results
