"""What the integrations share: a carousel memory shaped by the first batch a framework hands over."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..memory import CarouselMemory


def memory_for(x: torch.Tensor, em_size: int, root: Path, tiers: Sequence[Mapping[str, Any]],
               swap: Mapping[str, Any], seed: int, extras: Mapping[str, torch.Tensor] | None = None,
               admission: str = "reservoir") -> tuple[CarouselMemory, list[Path]]:
    """A memory of ``em_size`` EM slots for samples shaped like ``x[0]`` (and ``extras``' rows, stored
    as float32, or int64 for integer tensors), with ``tiers`` placed under ``root`` unless they name
    a ``path``; also returns the folders it placed there (the caller's to delete)."""
    memory: dict[str, Any] = {
        "em_size": em_size, "sample_shape": list(x.shape[1:]), "dtype": str(x.dtype).removeprefix("torch."),
        "seed": seed, "admission": admission,
        "extras": {k: {"shape": list(v.shape[1:]), "dtype": "float32" if v.is_floating_point() else "int64"}
                   for k, v in (extras or {}).items()}}
    placed = [{"path": str(root / f"tier{i}-{t.get('kind', 'store')}"), "sync": False, **t}
              for i, t in enumerate(tiers)]
    created = [Path(p["path"]) for p, t in zip(placed, tiers) if "path" not in t]
    if placed:
        memory["state_dir"] = str(root / "state")
        created.append(root / "state")
    return CarouselMemory.from_dict({"memory": memory, "swap": dict(swap), "tiers": placed}), created
