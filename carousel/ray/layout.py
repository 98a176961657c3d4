"""A shard's folder on its node: the shard's own memory configuration and its identity file.

Every shard keeps its tiers under ``{root}/shard-{k}/`` on the node it runs on::

    {root}/shard-{k}/shard.json      # {"shard": k, "n_shards": n, "routing": ...}: refuses another layout
    {root}/shard-{k}/memory.toml     # the shard's full memory config: CarouselMemory.open() works offline
    {root}/shard-{k}/tier0-lmdb/ ... # its tiers (relative tier paths of the memory config land here)
    {root}/shard-{k}/state/          # its checkpoint

One memory configuration serves every shard: a relative tier path (or ``state_dir``) is placed in
the shard's folder, an absolute one must contain ``{shard}`` (each shard needs its own stores).

>>> cfg = shard_config({"memory": {"em_size": 4, "sample_shape": [2]}, "tiers": [{"kind": "lmdb", "capacity": 9}]},
...                    "/data/mem", 1, 2)
>>> cfg.tiers[0].path, cfg.memory.state_dir
('/data/mem/shard-1/tier0-lmdb', '/data/mem/shard-1/state')
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import CarouselConfig, ConfigError, read_toml
from ..toml_write import dump_toml

__all__ = ["ShardLayoutError", "memory_dict", "shard_config", "shard_folder", "claim_folder", "write_memory_toml"]

_IDENTITY = "shard.json"
_FORMAT = 1


class ShardLayoutError(ValueError):
    """A shard folder that belongs to another layout (shard index, shard count or routing)."""


def shard_folder(root: str | os.PathLike[str], shard: int) -> Path:
    return Path(root) / f"shard-{shard}"


def memory_dict(memory: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """A memory configuration as a TOML-shaped dict: from a dict, or read from a TOML file (its
    relative tier paths stay relative: they are the shards' to place)."""
    if isinstance(memory, Mapping):
        return copy.deepcopy(dict(memory))
    if isinstance(memory, (str, os.PathLike)):
        return read_toml(os.fspath(memory))
    raise ConfigError(None, "memory", f"expected a TOML-shaped dict or a TOML file path, got {type(memory).__name__}")


def _place(path: Any, folder: Path, shard: int, n_shards: int, key: str) -> str:
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(None, key, f"expected a folder name, got {path!r}")
    try:
        placed = path.format(shard=shard)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(None, key, f"{path!r}: only {{shard}} may be substituted ({exc})") from None
    placed = os.path.expanduser(placed)
    if os.path.isabs(placed):
        if n_shards > 1 and placed == path:
            raise ConfigError(None, key, f"{path!r} is absolute, so every shard would share it; make it relative "
                                         "(placed in each shard's folder) or put {shard} in it")
        return placed
    return str(folder / placed)


def shard_config(memory: Mapping[str, Any] | str | os.PathLike[str], root: str | os.PathLike[str], shard: int,
                 n_shards: int) -> CarouselConfig:
    """Shard ``shard``'s memory configuration: ``memory`` with its tiers and state placed in
    ``{root}/shard-{shard}/``. Raises :class:`~carousel.ConfigError` for an unusable configuration."""
    data = memory_dict(memory)
    folder = shard_folder(root, shard)
    tiers = data.get("tiers", [])
    if not isinstance(tiers, list):
        raise ConfigError(None, "tiers", f"expected a list of tier tables, got {type(tiers).__name__}")
    placed = []
    for i, tier in enumerate(tiers):
        if not isinstance(tier, Mapping):
            raise ConfigError(None, f"tiers[{i}]", f"expected a table, got {type(tier).__name__}")
        tier = dict(tier)
        tier["path"] = _place(tier.get("path", f"tier{i}-{tier.get('kind', 'store')}"), folder, shard, n_shards,
                              f"tiers[{i}].path")
        placed.append(tier)
    if not placed:
        raise ConfigError(None, "tiers", "a shard needs at least one storage tier: a restarted shard reopens its "
                                         "samples from its tiers (a RAM-only shard would lose them all)")
    data["tiers"] = placed
    memory_table = dict(data.get("memory", {})) if isinstance(data.get("memory", {}), Mapping) else data.get("memory")
    if isinstance(memory_table, dict):
        memory_table["state_dir"] = _place(memory_table.get("state_dir", "state"), folder, shard, n_shards,
                                           "memory.state_dir")
        data["memory"] = memory_table
    return CarouselConfig.from_dict(data)


def claim_folder(folder: Path, shard: int, n_shards: int, routing: str) -> bool:
    """Make ``folder`` shard ``shard``'s of ``n_shards`` routed by ``routing``; returns whether it
    was already (a reopen). Raises :class:`ShardLayoutError` if it belongs to another layout:
    another shard count or routing would send known keys to other shards, and global ids would
    name the wrong samples."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _IDENTITY
    want = {"format": _FORMAT, "shard": shard, "n_shards": n_shards, "routing": routing}
    if path.exists():
        try:
            have = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ShardLayoutError(f"{path}: unreadable shard identity ({exc}); it names the shard this folder "
                                   "holds -- restore it or move the folder away") from None
        if {k: have.get(k) for k in want} != want:
            raise ShardLayoutError(
                f"{folder} holds shard {have.get('shard')} of {have.get('n_shards')} routed by "
                f"{have.get('routing')!r}; this memory asks for shard {shard} of {n_shards} routed by {routing!r}. "
                "Routing and ids depend on both: open it with its own layout, or use another root")
        return True
    _write_atomic(path, json.dumps(want, indent=1) + "\n")
    return False


def write_memory_toml(folder: Path, config: CarouselConfig) -> Path:
    """The shard's full memory config as ``memory.toml``, so ``CarouselMemory.open`` reads it offline."""
    path = folder / "memory.toml"
    _write_atomic(path, dump_toml(config.to_dict()))
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
