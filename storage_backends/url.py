"""Parsing store URLs: ``scheme:///absolute/path?key=value&...`` (or ``scheme://relative/path``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import InvalidURLError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class StoreURL:
    """A parsed store URL."""

    scheme: str
    path: Path
    params: dict[str, str]
    text: str

    def take(self, allowed: dict[str, str]) -> dict[str, str]:
        """Return the params with defaults filled in; unknown keys raise :class:`InvalidURLError`."""
        unknown = sorted(set(self.params) - set(allowed))
        if unknown:
            raise InvalidURLError(f"{self.text}: unknown parameter(s) {unknown}; allowed: {sorted(allowed)}")
        return {**allowed, **self.params}


def parse_url(url: str) -> StoreURL:
    if not isinstance(url, str):
        raise InvalidURLError(f"a store URL is a string, got {type(url).__name__}")
    parts = urlsplit(url)
    if not parts.scheme or "://" not in url:
        raise InvalidURLError(f"{url!r}: expected scheme:///path, e.g. lmdb:///var/lib/carousel/flash")
    path = unquote(parts.netloc + parts.path)
    if not path:
        raise InvalidURLError(f"{url!r}: no path")
    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise InvalidURLError(f"{url!r}: malformed query: {exc}") from None
    for key, value in pairs:
        if key in params:
            raise InvalidURLError(f"{url!r}: parameter {key!r} given twice")
        params[key] = value
    return StoreURL(parts.scheme.lower(), Path(path), params, url)


def parse_size(text: str | int, what: str = "size") -> int:
    """``"4GiB"`` -> 4294967296; plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise InvalidURLError(f"{what}={text!r}: expected a byte count such as 1048576, 64MiB or 4GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def parse_bool(text: str, what: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise InvalidURLError(f"{what}={text!r}: expected 1/0, true/false, yes/no or on/off")


def parse_int(text: str, what: str, lo: int, hi: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidURLError(f"{what}={text!r}: expected an integer") from None
    if not lo <= value <= hi:
        raise InvalidURLError(f"{what}={value}: must be in [{lo}, {hi}]")
    return value
