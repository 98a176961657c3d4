"""DDP-style continual learning on Ray, replaying from a sharded carousel memory.

    python examples/ray_ddp.py                        # starts a local Ray cluster in this process
    python examples/ray_ddp.py --address auto         # joins a running cluster (ray start --head ...)
    python examples/ray_ddp.py --address 10.0.0.5:6379 --root /mnt/nvme/carousel --workers 4

What runs: one carousel shard per worker (a Ray actor holding a CarouselMemory with an LMDB tier
under ``--root`` on its node), and ``--workers`` training processes (Ray actors, each placed on its
shard's node) that form one ``torch.distributed`` (gloo) group and train one model with
``DistributedDataParallel`` on a class-incremental stream (Split Fashion-MNIST from
``../shared/datasets`` when present, else a generated stream). Every step, worker ``r`` takes its
slice of the stream batch, adds it to the sharded memory (routed by the samples' data set index,
so a sample always lives on the same shard), draws a replay batch -- half from its own shard
(``local_share = 0.5``), the rest from the others in proportion to their size -- and reports the
replayed samples' logits with ``observe``, which the owning shards' swap policies rank on.

The same code runs on one machine and on many: only ``ray.init(address=...)`` changes; shard
``k`` goes to the ``k``-th node (by address) and worker ``k`` follows it, so each worker's local
shard sits on its own node's flash. On one machine both shards and both workers share the node.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from carousel.ray import ShardedMemory, ShardingConfig

NAME = "ddp-example"


def load_stream(data: str, quick: bool):
    """Split Fashion-MNIST (the real files, when found) or a generated stream of the same shape."""
    from trainers.streams import generated_stream, make_stream
    from trainers.datasets import DatasetError
    if data == "fashion-mnist":
        try:
            return make_stream("split-fashion-mnist", limit_per_class=100 if quick else 1000, seed=0)
        except DatasetError as exc:
            print(f"Fashion-MNIST not found ({str(exc)[:80]}...): using a generated stream")
    return generated_stream(tasks=5, classes_per_task=2, shape=(1, 28, 28),
                            train_per_class=40 if quick else 400, test_per_class=20, seed=0)


@ray.remote
class TrainWorker:
    """One data-parallel rank: its model replica, its slice of every stream batch, its local shard."""

    def __init__(self, rank: int, world: int) -> None:
        torch.set_num_threads(1)  # ranks share the machine's cores with the shards
        self.rank, self.world = rank, world

    def rendezvous(self) -> str:
        """An address for the process group (rank 0's node, a free port)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return f"tcp://{ray.util.get_node_ip_address()}:{s.getsockname()[1]}"

    def train(self, init_method: str, stream, steps: int, batch: int, replay: int, seed: int) -> dict[str, Any]:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from trainers.augment import prepare
        from trainers.models import MLP

        dist.init_process_group("gloo", init_method=init_method, rank=self.rank, world_size=self.world)
        try:
            torch.manual_seed(seed)  # the same initial weights on every rank
            model = DistributedDataParallel(MLP(stream.num_classes, int(np.prod(stream.input_shape))))
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            # Attach to the shards by name; this rank's own shard serves half of each replay batch.
            mem = ShardedMemory.connect(NAME, local_shards=[self.rank], local_share=0.5)
            accuracy, degraded, t0 = [], 0, time.perf_counter()
            for task in stream.tasks:
                n = task.train_y.shape[0]
                for step in range(steps):
                    # the global batch of this step, then this rank's slice of it (data parallel)
                    idx = np.random.default_rng([seed, task.index, step]).choice(n, batch * self.world, replace=False)
                    mine = idx[self.rank::self.world]
                    x = torch.from_numpy(task.train_x[mine])
                    y = torch.from_numpy(task.train_y[mine])
                    # the data set index is the routing key: a sample always goes to the same shard
                    mem.add(x, y, task=task.index, keys=torch.from_numpy(task.index * 1_000_000 + mine))
                    rb = mem.sample(replay) if task.index > 0 else None
                    if rb is not None and len(rb):
                        degraded += bool(rb.unavailable)
                        xs, ys = torch.cat([x, rb.x]), torch.cat([y, rb.y])
                    else:
                        xs, ys = x, y
                    logits = model(prepare(xs, stream, train=True))
                    loss = torch.nn.functional.cross_entropy(logits, ys)
                    opt.zero_grad()
                    loss.backward()  # DDP averages the gradients over the ranks
                    opt.step()
                    if rb is not None and len(rb):
                        mem.observe(rb.ids, logits=logits[len(x):].detach())
                accuracy.append(self._evaluate(model.module, stream, task.index, prepare))
            seconds = time.perf_counter() - t0
            stats = mem.stats()
            mem.close()
            return {"rank": self.rank, "accuracy": accuracy, "seconds": seconds, "degraded_batches": degraded,
                    "steps": steps * len(stream.tasks), "shard_em": [s and s["tiers"]["ram"]["samples"]
                                                                     for s in stats["shards"]],
                    "added": stats["added"]}
        finally:
            dist.destroy_process_group()

    @staticmethod
    def _evaluate(model, stream, upto: int, prepare) -> float:
        """Accuracy on the test samples of every task seen so far."""
        xs = np.concatenate([t.test_x for t in stream.tasks[:upto + 1]])
        ys = np.concatenate([t.test_y for t in stream.tasks[:upto + 1]])
        with torch.no_grad():
            pred = model(prepare(torch.from_numpy(xs), stream, train=False)).argmax(1)
        return float((pred.numpy() == ys).mean())


def run(root: str, workers: int = 2, steps: int = 40, batch: int = 32, replay: int = 32, data: str = "fashion-mnist",
        quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Start the shards and the ranks on the connected Ray cluster, train, shut down; the results."""
    stream = load_stream(data, quick)
    memory = {"memory": {"em_size": 200, "sample_shape": list(stream.input_shape), "seed": seed},
              "swap": {"ratio": 0.5, "start_task": 1},
              "tiers": [{"kind": "lmdb", "capacity": 20_000, "path": "flash"}]}
    mem = ShardedMemory.create(memory, root, ShardingConfig(n_shards=workers, name=NAME, num_cpus=0.5))
    ranks = []
    try:
        where = [ident["node_id"] for ident in mem.identities()]
        ranks = [TrainWorker.options(num_cpus=1,
                                     scheduling_strategy=NodeAffinitySchedulingStrategy(where[r], soft=True))
                 .remote(r, workers) for r in range(workers)]
        init_method = ray.get(ranks[0].rendezvous.remote())
        stream_ref = ray.put(stream)  # once into the object store; every rank maps the arrays
        results = ray.get([w.train.remote(init_method, stream_ref, steps, batch, replay, seed) for w in ranks])
        totals = mem.stats()
        endpoints = mem.metrics_endpoints()
    finally:
        for w in ranks:
            ray.kill(w)
        mem.shutdown()
    return {"stream": stream.name, "workers": workers, "ranks": results, "stored": totals["stored"],
            "added": totals["added"], "metrics_endpoints": endpoints}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="join this Ray cluster (e.g. 'auto', '10.0.0.5:6379'); "
                                          "default: start a local one")
    parser.add_argument("--root", help="the shards' folder on every node (default: a fresh temporary folder)")
    parser.add_argument("--workers", type=int, default=2, help="ranks = shards")
    parser.add_argument("--steps", type=int, default=40, help="steps per task")
    parser.add_argument("--data", choices=["fashion-mnist", "generated"], default="fashion-mnist")
    parser.add_argument("--quick", action="store_true", help="a small stream and 5 steps per task")
    args = parser.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="carousel-ray-ddp-")
    if args.address:
        ray.init(address=args.address)
    else:  # shards (half a CPU each) and ranks (one each) must fit, also on a 2-core machine
        ray.init(num_cpus=max(os.cpu_count() or 1, args.workers * 2), include_dashboard=False)
    try:
        out = run(root, args.workers, 5 if args.quick else args.steps, data=args.data, quick=args.quick)
    finally:
        ray.shutdown()
    for r in out["ranks"]:
        print(f"rank {r['rank']}: accuracy after each task {[round(a, 3) for a in r['accuracy']]}, "
              f"{r['steps'] / r['seconds']:.1f} steps/s, degraded replay batches {r['degraded_batches']}")
    print(f"{out['added']} samples stored over {out['workers']} shards under {root}"
          + ("" if args.root else " (a temporary folder, removed now)"))
    print(json.dumps({k: v for k, v in out.items() if k != "ranks"}, default=str))
    if not args.root:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
