"""The README's DataLoader recipe: stream and replay batches from one DataLoader with workers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import carousel
from tests.daemon.harness import start_daemon


@pytest.fixture
def daemon(tmp_path):
    d = start_daemon(tmp_path, memory={"em_size": 64, "sample_shape": [1, 8, 8]}, swap={"start_task": 0},
                     metrics=False)
    yield d
    assert d.stop() == 0


def test_stream_and_replay_from_one_dataloader_with_workers(daemon):
    n = 200
    x = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # pixel (0, 0) names the stream sample
    stream = TensorDataset(x, torch.arange(n) % 5)
    mem = carousel.connect(daemon.socket)
    ds = carousel.StreamReplayDataset(stream, daemon.socket, batch_size=16, replay_size=8, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pin_memory without an accelerator only warns
        loader = DataLoader(ds, batch_size=None, num_workers=2, pin_memory=True)
        orders = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            seen, replayed = [], 0
            for xb, yb, replay in loader:  # what a training step does with it:
                assert xb.dtype == torch.uint8 and xb.shape[1:] == (1, 8, 8) and len(xb) <= 16
                assert isinstance(replay, carousel.Batch) and len(replay) <= 8
                if len(replay):
                    replayed += 1
                    assert replay.x.shape[1:] == (1, 8, 8)
                    mem.observe(replay.ids, logits=torch.randn(len(replay), 5))
                mem.add(xb, yb, task=0)  # the trainer adds the stream batch after its step
                seen += xb[:, 0, 0, 0].tolist()
            assert sorted(seen) == list(range(n))  # every stream sample once per epoch, over both workers
            # Workers draw ahead of the step (prefetch) and the trainer's adds are posted (they reach
            # the workers' connections when the daemon has handled them), so the first pass may meet
            # an empty memory throughout. A call with a reply applies every earlier add; from then
            # on every stream batch comes with its replay batch.
            assert mem.stats()["added"] == (epoch + 1) * n
            assert epoch == 0 or replayed == len(loader)
            orders.append(seen)
    assert orders[0] != orders[1]  # set_epoch reshuffles
    assert mem.stats()["added"] == 2 * n
    mem.close()


def test_stream_replay_dataset_arguments():
    stream = TensorDataset(torch.zeros(10, 2), torch.zeros(10))
    assert len(carousel.StreamReplayDataset(stream, "/nowhere", batch_size=4)) == 3
    assert len(carousel.StreamReplayDataset(stream, "/nowhere", batch_size=4, drop_last=True)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        carousel.StreamReplayDataset(stream, "/nowhere", batch_size=0)
    with pytest.raises(TypeError, match="unknown replay filters"):
        carousel.StreamReplayDataset(stream, "/nowhere", clases=[1])
