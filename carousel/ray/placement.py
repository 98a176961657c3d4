"""Where the shard actors run: one Ray scheduling strategy per shard.

A shard's tiers live on its node's flash and disk, so a restarted shard must come back to that
node: both strategies pin it there. ``node_affinity`` places shard ``k`` on ``nodes[k % len(nodes)]``
with hard affinity (``soft=False``: if that node is gone, the shard stays down rather than open
empty tiers elsewhere). ``spread`` / ``strict_spread`` reserve one placement-group bundle per
shard with Ray's SPREAD / STRICT_SPREAD strategy (strict: one shard per node, so a cluster with
fewer nodes than shards cannot place them); a bundle stays on its node for the group's life.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from ..config import ConfigError
from .config import ShardingConfig

__all__ = ["ShardPlacementError", "alive_nodes", "resolve_nodes", "strategies"]


class ShardPlacementError(RuntimeError):
    """The cluster cannot place the shards as configured (unknown node, too few nodes)."""


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's alive nodes, ordered by address then id (a stable order for round-robin)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: (n.get("NodeManagerAddress", ""), n["NodeID"]))


def resolve_nodes(wanted: tuple[str, ...]) -> list[str]:
    """Node ids for ``wanted`` (node ids or IP addresses); all alive nodes when empty."""
    nodes = alive_nodes()
    if not wanted:
        return [n["NodeID"] for n in nodes]
    out = []
    for w in wanted:
        match = [n["NodeID"] for n in nodes if w in (n["NodeID"], n.get("NodeManagerAddress"))]
        if not match:
            known = ", ".join(f"{n['NodeID'][:12]}.. ({n.get('NodeManagerAddress')})" for n in nodes)
            raise ShardPlacementError(f"sharding.nodes: no alive node is {w!r}; alive: {known}")
        out.append(match[0])
    return out


def strategies(sharding: ShardingConfig) -> tuple[list[Any], Any]:
    """One scheduling strategy per shard, and the placement group they use (None for node affinity)."""
    n = sharding.n_shards
    if sharding.placement == "node_affinity":
        nodes = resolve_nodes(sharding.nodes)
        if not nodes:
            raise ShardPlacementError("the Ray cluster has no alive node")
        return [NodeAffinitySchedulingStrategy(node_id=nodes[k % len(nodes)], soft=False) for k in range(n)], None
    if sharding.num_cpus <= 0:
        raise ConfigError(None, "sharding.num_cpus", f"a {sharding.placement} placement reserves a bundle of CPUs "
                                                     "per shard; give num_cpus > 0")
    pg = placement_group([{"CPU": float(sharding.num_cpus)}] * n, strategy=sharding.placement.upper(),
                         name=f"carousel.{sharding.name}", lifetime="detached" if sharding.detached else None)
    ready, _ = ray.wait([pg.ready()], timeout=sharding.placement_timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise ShardPlacementError(
            f"sharding.placement = {sharding.placement!r}: no room for {n} bundles of {sharding.num_cpus} CPU within "
            f"{sharding.placement_timeout_s} s on {len(alive_nodes())} alive node(s)"
            + ("; strict_spread needs one node per shard" if sharding.placement == "strict_spread" else ""))
    return [PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=k) for k in range(n)], pg
