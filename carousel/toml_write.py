"""A tiny TOML writer: text that ``tomllib`` reads back as the same dict (profiles, run configs).

>>> dump_toml({"daemon": {"metrics": ""}, "tiers": [{"kind": "lmdb", "capacity": 8}]})
'[daemon]\\nmetrics = ""\\n\\n[[tiers]]\\nkind = "lmdb"\\ncapacity = 8\\n'
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["dump_toml"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"no TOML for {v!r} here")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {type(v).__name__} {v!r}")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, Mapping) for x in v)


def _emit(lines: list[str], path: list[str], table: Mapping[str, Any], header: str | None) -> None:
    plain = {k: v for k, v in table.items() if not isinstance(v, Mapping) and not _is_table_array(v)}
    # A table holding only sub-tables needs no header of its own; an empty one does, to exist.
    if header is not None and (plain or not table or header.startswith("[[")):
        lines += ["", header] if lines else [header]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in plain.items()]
    for k, v in table.items():
        dotted = ".".join(_key(p) for p in [*path, k])
        if isinstance(v, Mapping):
            _emit(lines, [*path, k], v, f"[{dotted}]")
        elif _is_table_array(v):
            for item in v:
                _emit(lines, [*path, k], item, f"[[{dotted}]]")


def dump_toml(data: Mapping[str, Any]) -> str:
    """TOML text for a dict of tables, arrays of tables and plain values (what profiles hold)."""
    lines: list[str] = []
    _emit(lines, [], data, None)
    return "\n".join(lines) + "\n"
