"""What TorchRL users do with a storage, run on TorchRL's own ``LazyTensorStorage`` (the reference)
and on ``CarouselStorage`` side by side: each case passing for the reference shows what TorchRL
promises; the same case on ``carousel`` shows we keep the promise (issue 23, items 6 and 8).
Carousel-only behaviour (locks, processes, snapshots) is in ``test_torchrl_process.py``."""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch

torchrl = pytest.importorskip("torchrl", reason="torchrl is not installed (pip install 'carousel[torchrl]')")
from tensordict import NonTensorStack, TensorDict, tensorclass  # noqa: E402
from torchrl.data import (LazyMemmapStorage, LazyTensorStorage, ReplayBuffer, SliceSampler,  # noqa: E402
                          TensorDictMaxValueWriter, TensorDictReplayBuffer, TensorDictRoundRobinWriter,
                          TensorStorage, TensorStorageCheckpointer)

from carousel.integrations.torchrl import CarouselStorage  # noqa: E402

_counter = itertools.count()


@tensorclass
class Step:
    """A tensorclass with a non-tensor field, as users write them."""

    obs: torch.Tensor
    reward: torch.Tensor
    note: str


@pytest.fixture(params=["reference", "carousel", "carousel-zarr", "carousel-flat"])
def make(request, tmp_path):
    """``make(max_size, **kwargs)``: a new empty storage of the kind under test (TorchRL's
    ``LazyTensorStorage``, or a ``CarouselStorage`` on an LMDB, a Zarr or a flat store)."""
    made = []

    def factory(max_size, **kwargs):
        if request.param == "reference":
            return LazyTensorStorage(max_size, **kwargs)
        kind = {"carousel-zarr": "zarr", "carousel-flat": "flat"}.get(request.param, "lmdb")
        storage = CarouselStorage(max_size, tmp_path / f"rb{next(_counter)}", kind=kind, chunk=4, **kwargs)
        made.append(storage)
        return storage

    factory.kind = request.param
    yield factory
    for storage in made:
        storage.close()


def steps(start, n):
    i = torch.arange(start, start + n)
    return TensorDict({"obs": i[:, None].float().repeat(1, 3), "action": i % 4,
                       "next": {"reward": i.float() / 10, "done": (i % 5 == 4)[:, None]}}, batch_size=[n])


# ---- item 6: wrong data, silently -----------------------------------------------------------------

def test_rb_set_set_at_and_update_change_the_stored_data(make):
    rb = ReplayBuffer(storage=make(10), batch_size=2)
    rb.extend(steps(0, 6))
    rb.set_("action", torch.full((6,), 7))
    assert rb[:]["action"].tolist() == [7] * 6
    rb.set_at_("obs", torch.full((2, 3), -1.0), torch.tensor([1, 4]))
    assert rb[:]["obs"][:, 0].tolist() == [0, -1, 2, 3, -1, 5]
    rb.update_(TensorDict({"next": {"reward": torch.ones(6)}}, batch_size=[6]))
    assert rb[:]["next", "reward"].tolist() == [1.0] * 6
    assert rb[:]["action"].tolist() == [7] * 6  # the other fields kept what set_ wrote
    rb[2] = steps(100, 1)[0]  # item assignment through the buffer
    assert rb[2]["obs"][0].item() == 100


def test_each_write_path_moves_the_mutation_revision_once(make):
    # Samplers key their caches (trajectory bounds, Sequence boundaries) on this revision.
    rb = TensorDictReplayBuffer(storage=make(8))
    storage = rb.storage
    writes = [lambda: rb.extend(TensorDict({"obs": torch.arange(4)}, [4])),
              lambda: rb.__setitem__(0, TensorDict({"obs": torch.tensor(10)}, [])),
              lambda: rb.set_at_("obs", torch.tensor([11]), torch.tensor([1])),
              lambda: rb.set_("obs", torch.arange(4) + 20),
              lambda: rb.update_(TensorDict({"obs": torch.arange(4) + 30}, [4])),
              lambda: rb.load_state_dict(rb.state_dict()),
              rb.empty]
    for write in writes:
        before = storage._mutation_revision
        write()
        assert storage._mutation_revision == before + 1


def test_item_assignment_in_an_ndim2_buffer(make):
    rb = ReplayBuffer(storage=make(102, ndim=2))
    rb.extend(TensorDict({"a": torch.arange(50).expand(2, 50), ("b", "c"): torch.arange(50).expand(2, 50)},
                         [2, 50]))
    rb[0, 3:5] = TensorDict({"a": torch.zeros(2, dtype=torch.long), ("b", "c"): torch.zeros(2, dtype=torch.long)},
                            [2])
    assert (rb[0, 3:5] == 0).all() and (rb[1, 3:5] != 0).all() and rb[0, 5]["a"].item() == 5


def test_boolean_mask_selects_where_true(make):
    storage = make(10)
    rb = ReplayBuffer(storage=storage, batch_size=2)
    rb.extend(steps(0, 6))
    mask = torch.tensor([False, True, False, True, True, False])
    assert storage.get(mask)["obs"][:, 0].tolist() == [1, 3, 4]
    assert rb[mask]["obs"][:, 0].tolist() == [1, 3, 4]
    assert rb[mask.numpy()]["action"].tolist() == [1, 3, 0]


def test_non_tensor_leaves_come_back(make):
    storage = make(10)
    rb = ReplayBuffer(storage=storage, batch_size=2)
    data = steps(0, 3)
    data.set_non_tensor("source", "env-a")  # one value for the whole batch
    data.set("tag", NonTensorStack("x", "y", "z"))  # one value per row
    rb.extend(data)
    got = storage.get(torch.tensor([2, 0]))
    assert got["tag"] == ["z", "x"] and got["source"] == ["env-a", "env-a"]
    assert storage.get(1)["tag"] == "y"
    assert rb.sample()["source"] == ["env-a", "env-a"]


def test_tensorclass_comes_back_as_itself_with_its_str_field(make):
    storage = make(8)
    storage.set(torch.arange(3), Step(obs=torch.arange(3.0)[:, None], reward=torch.ones(3), note="hello",
                                      batch_size=[3]))
    got = storage.get(torch.tensor([0, 2]))
    assert isinstance(got, Step)
    assert got.obs[:, 0].tolist() == [0.0, 2.0] and list(got.note) == ["hello", "hello"]


def test_extra_batch_dims_are_kept(make):
    storage = make(10)
    rb = ReplayBuffer(storage=storage, batch_size=2)
    data = TensorDict({"x": torch.arange(12).reshape(4, 3)}, batch_size=[4, 3])
    rb.extend(data)
    assert len(rb) == 4
    assert storage.get(torch.arange(4)).batch_size == torch.Size([4, 3])
    assert (storage.get(torch.arange(4))["x"] == data["x"]).all()
    assert rb.sample().batch_size == torch.Size([2, 3])


def test_index_shape_is_the_batch_shape(make):
    storage = make(10)
    storage.set(torch.arange(6), steps(0, 6))
    got = storage.get(torch.tensor([[0, 5], [2, 2]]))
    assert got.batch_size == torch.Size([2, 2])
    assert got["obs"][..., 0].tolist() == [[0, 5], [2, 2]]
    assert storage.get([[1], [3]]).batch_size == torch.Size([2, 1])


def test_negative_indices_count_from_the_end(make):
    storage = make(10)
    rb = ReplayBuffer(storage=storage, batch_size=2)
    rb.extend(steps(0, 6))
    assert rb[-1]["obs"][0].item() == 5
    assert storage.get(torch.tensor([-2, 0]))["obs"][:, 0].tolist() == [4, 0]
    with pytest.raises(IndexError):
        storage.get(torch.tensor([6]))  # not stored


# ---- item 8: what TorchRL users do with storages --------------------------------------------------

def test_it_is_a_tensor_storage_so_torchrl_picks_the_identity_collate_everywhere(make):
    from torchrl.data.map import tdstorage
    from torchrl.data.replay_buffers.storages import _get_default_collate

    storage = make(10)
    assert isinstance(storage, TensorStorage)
    batch = [steps(0, 2)]
    assert _get_default_collate(storage)(batch) is batch
    assert tdstorage._get_default_collate(storage)(batch) is batch  # the name TensorDictMap imported


def test_consuming_sampler_and_sequence_units(make):
    from torchrl.data.replay_buffers.sample_units import Sequence
    from torchrl.data.replay_buffers.samplers import ConsumingSampler

    rb = ReplayBuffer(storage=make(8), batch_size=3, sampler=ConsumingSampler())
    rb.extend(steps(0, 8))
    seen = [int(x) for batch in rb for x in batch["obs"][:, 0]]
    assert sorted(seen) == list(range(8)) and len(rb) == 0  # every step once, then consumed

    storage = make(10)
    TensorDictReplayBuffer(storage=storage, batch_size=2).extend(steps(0, 10))  # done at 4 and 9
    index, info = Sequence(length=4, episode_boundary="pad").expand(torch.tensor([2]), {}, storage)
    assert torch.as_tensor(index).tolist() == [2, 3, 4, 4]  # padded at the episode's end (done at 4)
    assert info["validity_mask"].tolist() == [True, True, True, False]


def test_update_if_present_patches_live_records_only(make):
    rb = TensorDictReplayBuffer(storage=make(6), writer=TensorDictRoundRobinWriter(track_generations=True),
                                batch_size=2)
    index = rb.extend(steps(0, 6))
    generation = rb._writer.generations_of(index)
    rb.extend(steps(100, 2))  # positions 0 and 1 now hold other records
    result = rb.update_if_present(index=index, generation=generation, patch={"action": torch.full((6,), 9)})
    assert result.updated.tolist() == [False, False, True, True, True, True]
    assert rb[:]["action"].tolist() == [100 % 4, 101 % 4, 9, 9, 9, 9]


def test_max_value_writer_adds_its_index_leaf_after_the_first_write(make):
    rb = TensorDictReplayBuffer(storage=make(4), writer=TensorDictMaxValueWriter(rank_key="score"), batch_size=2)
    for start in (0, 4, 8):
        data = steps(start, 4)
        data["score"] = data["obs"][:, 0]
        rb.extend(data)
    assert sorted(rb[:]["score"].tolist()) == [8.0, 9.0, 10.0, 11.0]  # the four best kept
    assert set(rb.sample()["obs"][:, 0].tolist()) <= {8.0, 9.0, 10.0, 11.0}
    one = steps(20, 1)[0]
    one["score"] = torch.tensor(20.0)
    rb.add(one)  # add() writes the element with an "index" leaf the storage has not seen
    assert sorted(rb[:]["score"].tolist()) == [9.0, 10.0, 11.0, 20.0]
    assert rb[:]["index"].shape == (4,)


def test_a_key_added_after_the_first_write(make):
    storage = make(6)
    storage.set(torch.arange(3), steps(0, 3))
    later = steps(3, 2)
    later["extra"] = torch.ones(2, 2)
    storage.set(torch.tensor([3, 4]), later)
    assert storage.get(torch.arange(5))["extra"][:, 0].tolist() == [0, 0, 0, 1, 1]  # zeros where never written
    assert storage.get(torch.arange(5))["obs"][:, 0].tolist() == [0, 1, 2, 3, 4]
    storage.set(torch.tensor([0]), TensorDict({"action": torch.tensor([3])}, [1]))  # fewer keys: the rest stay
    assert storage.get(0)["action"].item() == 3 and storage.get(0)["obs"][0].item() == 0


def test_pytrees_of_tensors(make):
    storage = make(10)
    rb = ReplayBuffer(storage=storage, batch_size=3)
    rb.extend({"obs": torch.arange(5.0)[:, None], "pair": (torch.arange(5), torch.ones(5, 2))})
    got = storage.get(torch.tensor([4, 1]))
    assert got["obs"][:, 0].tolist() == [4.0, 1.0] and got["pair"][0].tolist() == [4, 1]
    assert isinstance(got["pair"], tuple) and got["pair"][1].shape == (2, 2)
    assert rb.sample()["pair"][1].shape == (3, 2)


def test_bfloat16_and_other_dtypes(make):
    storage = make(5)
    values = torch.tensor([0.1, -2.5, 3e38, float("inf"), 1e-3])
    data = TensorDict({"bf": values.to(torch.bfloat16), "h": values.half(), "b": values > 0,
                       "u": torch.arange(5, dtype=torch.uint8)}, [5])
    storage.set(torch.arange(5), data)
    got = storage.get(torch.arange(5))
    assert got["bf"].dtype == torch.bfloat16 and torch.equal(got["bf"], data["bf"])
    assert torch.equal(got["h"], data["h"]) and torch.equal(got["b"], data["b"]) and got["u"].dtype == torch.uint8


def test_ndim2_time_by_envs_with_slice_sampler(make):
    storage = make(40, ndim=2)
    rb = TensorDictReplayBuffer(storage=storage, sampler=SliceSampler(num_slices=2, traj_key="traj"),
                                batch_size=8)
    envs, time = 2, 10
    t = torch.arange(time).expand(envs, time)
    data = TensorDict({"t": t, "env": torch.arange(envs)[:, None].expand(envs, time),
                       "traj": torch.arange(envs)[:, None].expand(envs, time).clone()}, batch_size=[envs, time])
    rb.extend(data)  # [envs, time]: the buffer writes along time
    assert len(rb) == 20 and storage.shape == torch.Size([10, 2])  # dim 0: time, dim 1: envs
    batch = rb.sample()
    slices = batch.reshape(2, 4)
    assert (slices["env"] == slices["env"][:, :1]).all()  # a slice stays in one env's trajectory
    assert (slices["t"].diff(dim=1) == 1).all()  # and consecutive in time
    assert storage.get((torch.tensor([3, 7]), torch.tensor([1, 0])))["t"].tolist() == [3, 7]


# LazyMemmapStorage warns when a state is loaded before its first write: what this test does on purpose.
@pytest.mark.filterwarnings("ignore:Loading the storage on an uninitialized TensorDict:UserWarning")
def test_state_dicts_move_between_storages(make, tmp_path):
    src = make(8)
    rb = ReplayBuffer(storage=src, batch_size=2)
    rb.extend(steps(0, 11))  # wrapped: positions 0..2 hold 8..10
    want = src.get(torch.arange(8))
    for target in (LazyTensorStorage(8), LazyMemmapStorage(8, scratch_dir=tmp_path / "mm"), make(8)):
        target_rb = ReplayBuffer(storage=target, batch_size=2)
        target_rb.load_state_dict(rb.state_dict())
        assert len(target) == 8 and (target.get(torch.arange(8)) == want).all()
        target_rb.extend(steps(50, 1))  # the writer resumed at 11 % 8
        assert target.get(3)["obs"][0].item() == 50


@pytest.mark.parametrize("source", [LazyTensorStorage, LazyMemmapStorage])
def test_a_torchrl_buffer_migrates_into_a_carousel_storage(tmp_path, source):
    old = ReplayBuffer(storage=source(8), batch_size=2)
    old.extend(steps(0, 11))
    new_storage = CarouselStorage(8, tmp_path / "rb")
    new = ReplayBuffer(storage=new_storage, batch_size=2)
    new.load_state_dict(old.state_dict())
    assert len(new) == 8 and (new[:] == old[:]).all()
    new.extend(steps(50, 1))
    old.extend(steps(50, 1))
    assert (new[:] == old[:]).all()  # the same ring, the same cursor
    new_storage.close()


def test_a_torchrl_dump_loads_into_a_carousel_storage(tmp_path):
    old = ReplayBuffer(storage=LazyMemmapStorage(8), batch_size=2)
    old.extend(steps(0, 11))
    old.dumps(tmp_path / "ckpt")
    storage = CarouselStorage(8, tmp_path / "rb")
    new = ReplayBuffer(storage=storage, batch_size=2)
    new.loads(tmp_path / "ckpt")  # the default checkpointer knows TorchRL's format
    assert len(new) == 8 and (new[:] == old[:]).all()
    new.extend(steps(50, 1))
    assert new[3]["obs"][0].item() == 50  # the writer's cursor came along
    storage.close()


def test_dumps_loads_snapshot_the_data(make, tmp_path):
    storage = make(8)
    rb = ReplayBuffer(storage=storage, batch_size=2)
    rb.extend(steps(0, 5))
    rb.dumps(tmp_path / "ckpt")
    rb.extend(steps(100, 3))  # after the dump: not in it
    fresh = make(8)
    fresh_rb = ReplayBuffer(storage=fresh, batch_size=2)
    fresh_rb.loads(tmp_path / "ckpt")
    assert len(fresh_rb) == 5 and fresh.get(torch.arange(5))["obs"][:, 0].tolist() == [0, 1, 2, 3, 4]
    rb.loads(tmp_path / "ckpt")  # and back into the buffer that wrote it
    assert len(rb) == 5 and storage.get(torch.arange(5))["obs"][:, 0].tolist() == [0, 1, 2, 3, 4]


def test_tensor_storage_checkpointer_is_honoured(make, tmp_path):
    # TorchRL hands a buffer's checkpointer= to its storage (replacing the storage's own).
    storage = make(8)
    rb = ReplayBuffer(storage=storage, batch_size=2, checkpointer=TensorStorageCheckpointer())
    rb.extend(steps(0, 6))
    rb.dumps(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "storage" / "storage_metadata.json").exists()  # TorchRL's format
    other = ReplayBuffer(storage=LazyMemmapStorage(8), batch_size=2)  # TorchRL reads it back
    other.loads(tmp_path / "ckpt")
    assert len(other) == 6 and other[:]["obs"][:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    back = make(8)
    back.checkpointer = TensorStorageCheckpointer()  # a storage used on its own keeps its checkpointer
    back.loads(tmp_path / "ckpt" / "storage")
    assert len(back) == 6 and back.get(torch.arange(6))["obs"][:, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_pickle_deepcopy_and_torch_save_of_a_buffer(make, tmp_path):
    rb = ReplayBuffer(storage=make(8), batch_size=2)
    rb.extend(steps(0, 5))
    torch.save(rb, tmp_path / "rb.pt")
    for copied in (pickle.loads(pickle.dumps(rb)), copy.deepcopy(rb),
                   torch.load(tmp_path / "rb.pt", weights_only=False)):
        assert len(copied) == 5 and copied[:]["obs"][:, 0].tolist() == [0, 1, 2, 3, 4]
        assert copied.sample()["obs"].shape == (2, 3)


def test_prioritized_sampler(make):
    from torchrl.data import PrioritizedSampler
    from torchrl.data.replay_buffers.samplers import prioritized

    if prioritized.SumSegmentTreeFp32 is None:  # TorchRL imports its C++ extension, and leaves None if it fails
        try:
            import torchrl._torchrl  # noqa: F401 - for the reason only
            reason = "no segment trees in it"
        except ImportError as exc:
            reason = str(exc)
        pytest.skip(f"PrioritizedSampler needs TorchRL's C++ extension, which does not load beside this torch "
                    f"({reason[:200]})")
    rb = TensorDictReplayBuffer(storage=make(8), sampler=PrioritizedSampler(8, alpha=0.7, beta=0.5), batch_size=4,
                                priority_key="td_error")
    data = steps(0, 8)
    data["td_error"] = torch.tensor([0.0] * 7 + [100.0])
    rb.extend(data)
    assert (rb.sample()["obs"][:, 0] == 7).float().mean() > 0.5


def test_a_non_tensor_key_added_after_the_first_write(tmp_path):
    # Carousel only: TorchRL's LazyTensorStorage raises IndexError here (tensordict 0.14.3).
    storage = CarouselStorage(6, tmp_path / "rb")
    storage.set(torch.arange(2), steps(0, 2))
    later = steps(2, 2)
    later.set("tag", NonTensorStack("c", "d"))
    storage.set(torch.tensor([2, 3]), later)
    got = storage.get(torch.arange(4))
    assert got["tag"] == [None, None, "c", "d"] and got["obs"][:, 0].tolist() == [0, 1, 2, 3]
    storage.close()
    reopened = CarouselStorage(6, tmp_path / "rb")  # the layout that knows the key was saved
    assert reopened.get(3)["tag"] == "d"
    reopened.close()


def test_a_non_tensor_leaf_that_is_not_json_is_refused_before_anything_is_stored(tmp_path):
    # Carousel only (LazyTensorStorage keeps any object in RAM): non-tensor leaves are stored as
    # JSON, never pickled, since nothing read back from a store may be unpickled.
    storage = CarouselStorage(6, tmp_path / "rb")
    storage.set(torch.arange(2), steps(0, 2))
    bad = steps(2, 2)
    bad.set("tag", NonTensorStack(object(), object()))
    with pytest.raises(TypeError, match="JSON"):
        storage.set(torch.tensor([2, 3]), bad)
    assert len(storage) == 2 and storage.get(torch.arange(2))["obs"][:, 0].tolist() == [0, 1]
    nested = steps(2, 2)
    nested.set("tag", NonTensorStack({"env": "a", "k": [1, 2]}, None))
    storage.set(torch.tensor([2, 3]), nested)  # JSON values come back as they were
    assert storage.get(torch.tensor([2, 3]))["tag"] == [{"env": "a", "k": [1, 2]}, None]
    storage.close()
