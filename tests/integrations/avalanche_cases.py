"""CarouselReplayPlugin inside Avalanche's own Naive strategy on a 2-experience SplitMNIST-sized stream.

Collected through ``test_avalanche.py``: in-process where avalanche-lib imports, else in the
interpreter ``CAROUSEL_AVALANCHE_PYTHON`` names (``.ci/run`` builds one).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import avalanche  # noqa: E402,F401  (test_avalanche.py imports this module only where it imports)
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from avalanche.benchmarks import nc_benchmark  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import ReplayPlugin  # noqa: E402

from carousel.integrations.avalanche import CarouselReplayPlugin  # noqa: E402


class Split(TensorDataset):
    def __init__(self, x, y):
        super().__init__(x, y)
        self.targets = y


def split_mnist_sized(seed=0):
    """4 classes of 28x28 images (coarse random patterns + noise) in 2 experiences, as SplitMNIST is split."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(4, 1, 7, 7, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    y = torch.arange(4).repeat(300)
    x = (protos[y] + 0.25 * torch.randn(len(y), 1, 28, 28, generator=g)).clamp(0, 1)
    yt = torch.arange(4).repeat(50)
    xt = (protos[yt] + 0.25 * torch.randn(len(yt), 1, 28, 28, generator=g)).clamp(0, 1)
    return nc_benchmark(Split(x, y), Split(xt, yt), n_experiences=2, task_labels=False, seed=0)


def train(plugin, seed=0):
    torch.manual_seed(seed)
    bm = split_mnist_sized(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 4))
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, eval_mb_size=100,
                     plugins=[plugin] if plugin else [], evaluator=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for exp in bm.train_stream:
            strategy.train(exp, num_workers=0)
    model.eval()
    correct = total = 0
    with torch.no_grad():  # accuracy on the first experience's test data, after both experiences
        for x, y, *_ in torch.utils.data.DataLoader(bm.test_stream[0].dataset, batch_size=100):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return strategy, correct / total


@pytest.mark.parametrize("tiered", [False, True])
def test_naive_with_carousel_replay_runs_end_to_end_and_remembers(tmp_path, tiered):
    tiers = [{"kind": "lmdb", "capacity": 10_000}] if tiered else None
    plugin = CarouselReplayPlugin(mem_size=64, tiers=tiers, root=tmp_path / "mem")
    try:
        strategy, acc_first = train(plugin)
        mem = plugin.memory
        if tiered:
            mem.flush()
            mem._engine.wait_idle()  # swaps run in the background: count them once done
        stats = mem.stats()
        assert stats["added"] == 1200  # every training sample of both experiences went to the memory
        assert stats["tiers"]["ram"]["samples"] == 64
        if tiered:
            assert stats["tiers"]["0-lmdb"]["samples"] == 1200 and stats["swapped_in"] > 10
        b = mem.sample(64, seed=0)
        assert set(b.y.tolist()) == {0, 1, 2, 3}  # the EM spans both experiences' classes
        assert b.x.dtype == torch.float32 and tuple(b.x.shape[1:]) == (1, 28, 28)
    finally:
        plugin.close()
    _, acc_naive = train(None)
    assert acc_first > acc_naive + 0.2, (acc_first, acc_naive)  # replay kept experience 0 alive


def test_same_loop_as_avalanches_own_replay_plugin(tmp_path):
    plugin = CarouselReplayPlugin(mem_size=64, root=tmp_path / "m")
    try:
        _, ours = train(plugin)
    finally:
        plugin.close()
    _, theirs = train(ReplayPlugin(mem_size=64))
    assert ours > 0.5 and theirs > 0.5  # both remember the first experience (chance: 0.25, naive ~0)
