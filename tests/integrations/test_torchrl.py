"""CarouselStorage under TorchRL's own replay buffer, writers and samplers."""

from __future__ import annotations

import pytest
import torch

torchrl = pytest.importorskip("torchrl", reason="torchrl is not installed (pip install 'carousel[torchrl]')")
from tensordict import TensorDict  # noqa: E402
from torchrl.data import (LazyTensorStorage, RandomSampler, ReplayBuffer, RoundRobinWriter,  # noqa: E402
                          SamplerWithoutReplacement, SliceSampler)

from carousel.integrations.torchrl import CarouselStorage  # noqa: E402


def transitions(start: int, n: int) -> TensorDict:
    i = torch.arange(start, start + n)
    return TensorDict({"obs": i[:, None].float().repeat(1, 4), "action": i % 3,
                       "next": {"obs": (i[:, None] + 1).float().repeat(1, 4), "reward": i.float() / 10}},
                      batch_size=[n])


def check_rows(td: TensorDict) -> None:
    """Every field of a row belongs to the same transition."""
    i = td["obs"][:, 0].long()
    torch.testing.assert_close(td["next", "obs"][:, 0], td["obs"][:, 0] + 1)
    torch.testing.assert_close(td["action"], i % 3)
    torch.testing.assert_close(td["next", "reward"], i.float() / 10)


@pytest.mark.parametrize("kind", ["lmdb", "zarr", "flat"])
def test_extend_and_sample_through_torchrl_writer_and_sampler(tmp_path, kind):
    storage = CarouselStorage(100, tmp_path / "rb", kind=kind, chunk=16)
    rb = ReplayBuffer(storage=storage, sampler=RandomSampler(), writer=RoundRobinWriter(), batch_size=32)
    ref = ReplayBuffer(storage=LazyTensorStorage(100), writer=RoundRobinWriter(), batch_size=32)
    for start in range(0, 250, 50):
        rb.extend(transitions(start, 50))
        ref.extend(transitions(start, 50))
    assert len(rb) == len(storage) == 100
    got = storage.get(torch.arange(100))
    want = ref.storage.get(torch.arange(100))
    assert (got == want).all()  # the same ring as TorchRL's own storage: positions hold the same data
    batch = rb.sample()
    assert batch.batch_size == torch.Size([32]) and set(batch.keys(include_nested=True, leaves_only=True)) == \
        {"obs", "action", ("next", "obs"), ("next", "reward")}
    check_rows(batch)
    assert batch["obs"][:, 0].min() >= 150  # the ring kept the newest 100
    one = storage.get(5)
    assert one.batch_size == torch.Size([]) and one["obs"].shape == (4,)
    rb.add(transitions(999, 1)[0])  # a single transition through the writer
    assert len(rb) == 100 and storage.get(50)["obs"][0] == 999  # the writer's cursor: 250 % 100
    storage.close()


@pytest.mark.parametrize("kind", ["lmdb", "zarr", "flat"])
def test_a_sampled_index_comes_back_in_its_order_with_its_repeats(tmp_path, kind):
    # A random sampler draws with replacement: the batch holds a repeated position as often, where
    # it was drawn, as LazyTensorStorage's does (read without dedup, one gather: the fast path).
    storage = CarouselStorage(20, tmp_path / "rb", kind=kind, chunk=4)
    ref = LazyTensorStorage(20)
    for s in (storage, ref):
        s.set(torch.arange(12), transitions(0, 12))
    index = torch.tensor([7, 3, 7, 0, 11, 3, 3])
    got, want = storage.get(index), ref.get(index)
    assert got.batch_size == want.batch_size == torch.Size([7]) and (got == want).all()
    assert got["obs"][:, 0].long().tolist() == index.tolist()
    got["obs"][0] += 1  # a batch of its own: writable, and no longer the storage's
    assert storage.get(7)["obs"][0] == 7
    assert (storage.get(index.reshape(7, 1)) == ref.get(index.reshape(7, 1))).all()  # shaped indices too
    storage.close()


def test_a_flat_storage_refuses_a_codec(tmp_path):
    with pytest.raises(ValueError, match="codec must be 'none'"):
        CarouselStorage(10, tmp_path / "rb", kind="flat", codec="zstd")


def test_slice_and_without_replacement_samplers(tmp_path):
    # (PrioritizedSampler needs TorchRL's C++ extension, which its wheel builds for another torch.)
    storage = CarouselStorage(120, tmp_path / "s")
    rb = ReplayBuffer(storage=storage, sampler=SliceSampler(num_slices=4, traj_key="episode"), batch_size=20)
    td = transitions(0, 120)
    td["episode"] = torch.arange(120) // 30  # 4 trajectories of 30 steps
    rb.extend(td)
    batch = rb.sample()
    episodes = batch["episode"].reshape(4, 5)
    assert (episodes == episodes[:, :1]).all()  # each slice stays inside one trajectory
    steps = batch["obs"][:, 0].reshape(4, 5)
    assert (steps.diff(dim=1) == 1).all()  # and is contiguous in time
    storage.close()
    storage = CarouselStorage(40, tmp_path / "w")
    rb = ReplayBuffer(storage=storage, sampler=SamplerWithoutReplacement(), batch_size=10)
    rb.extend(transitions(0, 40))
    seen = torch.cat([rb.sample()["obs"][:, 0] for _ in range(4)])
    assert sorted(seen.long().tolist()) == list(range(40))  # one epoch: every transition exactly once
    storage.close()


def test_state_dict_round_trip_and_reopen_after_restart(tmp_path):
    storage = CarouselStorage(50, tmp_path / "rb")
    rb = ReplayBuffer(storage=storage, writer=RoundRobinWriter(), batch_size=8)
    rb.extend(transitions(0, 70))
    state = rb.state_dict()
    before = storage.get(torch.arange(50))
    storage.close()
    # a new process: same folder, fresh objects; the state dict restores writer cursor and length
    storage2 = CarouselStorage(50, tmp_path / "rb")
    rb2 = ReplayBuffer(storage=storage2, writer=RoundRobinWriter(), batch_size=8)
    rb2.load_state_dict(state)
    assert len(rb2) == 50 and (storage2.get(torch.arange(50)) == before).all()
    rb2.extend(transitions(100, 1))
    assert storage2.get(20)["obs"][0] == 100  # the writer resumed where it stopped (70 % 50)
    check_rows(rb2.sample())
    storage2.close()
    with pytest.raises(ValueError, match="positions"):
        CarouselStorage(10, tmp_path / "other").load_state_dict(state["_storage"])


def test_plain_tensors_empty_and_bad_input(tmp_path):
    storage = CarouselStorage(20, tmp_path / "t")
    rb = ReplayBuffer(storage=storage, batch_size=5)
    rb.extend(torch.arange(30, dtype=torch.float32).reshape(15, 2))
    assert len(rb) == 15 and rb.sample().shape == (5, 2)
    with pytest.raises(IndexError, match="outside"):
        storage.get(17)
    with pytest.raises(ValueError, match="holds a tensor"):
        storage.set(torch.arange(2), TensorDict({"obs": torch.zeros(2, 2)}, batch_size=[2]))
    with pytest.raises(Exception):
        rb.extend(torch.zeros(3, 5))  # another shape than the schema learned from the first write
    assert len(rb) == 15  # the refused write changed nothing
    rb.empty()
    assert len(rb) == 0 and not list((tmp_path / "t").glob("gen-*"))
    rb.extend(transitions(0, 3))  # after empty() a new schema may start
    check_rows(rb.sample())
    storage.close()
