"""CarouselBuffer's Mammoth interface, call by call: transforms, positions, the missing calls,
leaks and task boundaries (issue 23). Tiny EMs, 3x8x8 images."""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch import nn

from carousel.integrations.mammoth import CarouselBuffer

ROOT = Path(__file__).resolve().parents[2]


class BatchFlip(nn.Module):
    """Batched like a Kornia augmentation: takes (n, C, H, W), flips each image with p = 1/2."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 4, f"a batched transform gets the whole batch, got {tuple(x.shape)}"
        self.calls += 1
        flip = torch.rand(len(x)) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)


class SampleShift:
    """Per sample like a torchvision pipeline on tensors: takes (C, H, W), PIL-free."""

    def __init__(self, by: float) -> None:
        self.by, self.calls = by, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 3, f"a per-sample transform gets one image, got {tuple(x.shape)}"
        self.calls += 1
        return x + self.by


def images(n: int, first: int = 0) -> torch.Tensor:
    """Images whose pixels all equal their number: any row names its sample."""
    return torch.arange(first, first + n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 8, 8).clone()


def number(x: torch.Tensor) -> list[int]:
    return x.reshape(len(x), -1)[:, 0].round().long().tolist()


def lmdb(capacity: int = 10_000) -> list[dict]:
    return [{"kind": "lmdb", "capacity": capacity}]


# ---- 1. transforms ----------------------------------------------------------------------------------
def test_a_batched_module_sees_the_batch_and_a_callable_each_sample():
    with CarouselBuffer(16) as buf:
        buf.add_data(examples=images(12), labels=torch.arange(12) % 3)
        batched, per_sample = BatchFlip(), SampleShift(100.0)
        x, _ = buf.get_data(8, transform=batched)
        assert x.shape == (8, 3, 8, 8) and batched.calls == 1
        x, _ = buf.get_data(8, transform=per_sample)
        assert x.shape == (8, 3, 8, 8) and per_sample.calls == 8 and (x >= 100).all()
        assert buf.get_all_data(transform=batched)[0].shape == (12, 3, 8, 8) and batched.calls == 2
        assert buf.get_data_by_index([0, 1], transform=batched)[0].shape == (2, 3, 8, 8)
        assert buf.get_balanced_data(6, transform=batched)[0].shape == (6, 3, 8, 8)
        not_aug, aug, _ = buf.get_data(4, transform=per_sample, return_not_aug=True, not_aug_transform=batched)
        assert not_aug.shape == aug.shape == (4, 3, 8, 8)
        assert number(aug) == [v + 100 for v in number(not_aug)]  # the same samples, each way


# ---- 2. positions ------------------------------------------------------------------------------------
def test_fields_are_live_views_of_the_em_and_indexes_are_positions():
    with CarouselBuffer(16) as buf:
        buf.add_data(examples=images(10), labels=torch.arange(10) % 2, logits=torch.zeros(10, 4),
                     task_labels=torch.zeros(10, dtype=torch.long))
        assert buf.examples.shape == (16, 3, 8, 8) and buf.task_labels.dtype == torch.int64
        assert number(buf.examples[: len(buf)]) == list(range(10))  # filled in order, as Mammoth's
        idx, x, y, logits, tl = buf.get_data(6, return_index=True)
        assert torch.equal(buf.examples[idx], x) and torch.equal(buf.labels[idx], y)
        buf.logits[idx] = 7.0  # X-DER's in-place update
        buf.task_labels[idx] = 3
        _, _, logits, tl = buf.get_data_by_index(idx)
        assert (logits == 7).all() and (tl == 3).all()
        assert not hasattr(buf, "true_labels")  # a field not held reads as absent, as Mammoth's


def test_positions_hold_their_samples_while_swaps_run_and_writes_reach_storage(tmp_path):
    with CarouselBuffer(16, tiers=lmdb(), root=tmp_path / "b", swap={"start_task": 0}) as buf:
        for step in range(12):
            buf.add_data(examples=images(8, 8 * step), labels=torch.arange(8) % 4, logits=torch.zeros(8, 2))
        marked = set()
        for step in range(30):
            idx1, x1, _, _ = buf.get_data(8, return_index=True)
            assert buf.memory._engine.pending == 0  # the swaps asked last step were done before the draw
            idx2, x2, _, _ = buf.get_data(8, return_index=True)
            # The model writes to both draws' positions after the second draw (X-DER's order):
            # neither may have changed sample meanwhile.
            assert torch.equal(buf.examples[idx1], x1) and torch.equal(buf.examples[idx2], x2)
            for idx, x in ((idx1, x1), (idx2, x2)):
                buf.logits[idx] = x[:, 0, 0, :2] + 0.5  # a mark only this sample's row carries
                marked.update(number(x))
            buf.end_step()  # what attach(model) does after each meta_observe
        buf.memory.flush()
        buf.memory._engine.wait_idle()
        assert buf.stats()["swapped_in"] > 10
        # Every marked sample, in the EM now or read back from flash, carries its mark.
        held = buf.get_all_data()
        for x, logits in zip(held[0], held[2]):
            if number(x[None])[0] in marked:
                torch.testing.assert_close(logits, x[0, 0, :2] + 0.5)
        # A marked sample out of the EM now left it after its mark: its row went to flash with it.
        stored = buf.memory.tiers[0].store.get_many(torch.arange(96).numpy())
        left = sorted(marked - set(number(held[0])))
        assert left and all(stored["logits"][i][0] == i + 0.5 for i in left)


# ---- 3. the calls Mammoth's models make --------------------------------------------------------------
def test_add_data_with_every_field_a_subset_and_attention_maps():
    with CarouselBuffer(8, n_tasks=5) as buf:
        maps = [torch.rand(4, 2, 2), torch.rand(4, 3)]
        buf.add_data(examples=images(4), labels=torch.arange(4), true_labels=torch.arange(4) + 10,
                     sample_selection_scores=torch.rand(4), attention_maps=maps)
        assert buf.used_attributes == ["examples", "labels", "true_labels"]
        torch.testing.assert_close(buf.attention_maps[2][1], maps[1][2].byte())  # TwF's per-position maps
        buf.add_data(examples=images(2, 4), labels=torch.tensor([4, 5]))  # true labels left out: zeros
        assert buf.true_labels[:6].tolist() == [10, 11, 12, 13, 0, 0]
        assert not buf.is_full() and len(buf) == 6
        buf.add_data(examples=images(2, 6), labels=torch.tensor([6, 7]))
        assert buf.is_full()
    with CarouselBuffer(8, tiers=lmdb()) as tiered, pytest.raises(ValueError, match="attention maps"):
        tiered.add_data(examples=images(2), labels=torch.zeros(2, dtype=torch.long), attention_maps=maps)


def test_get_data_arguments_balanced_data_and_iteration():
    with CarouselBuffer(24, seed=1) as buf:
        buf.add_data(examples=images(24), labels=torch.arange(24) % 4, task_labels=torch.arange(24) // 12)
        idx, x, y, tl = buf.get_data(5, return_index=True, force_indexes=[3, 1, 20])
        assert idx.tolist() == [3, 1, 20] and number(x) == [3, 1, 20]
        _, y, tl = buf.get_data(30, mask_task_out=0)
        assert len(y) == 12 and (tl == 1).all()
        x, y, tl = buf.get_balanced_data(8, n_classes=2)
        assert len(set(y.tolist())) == 2 and y.bincount().max() == 4
        items = list(buf)
        assert len(items) == 24 and number(torch.stack([i[0] for i in items])) == list(range(24))
        x0, y0, _ = buf[5]
        assert x0.shape == (3, 8, 8) and int(y0) == 1
        loader = buf.get_dataloader(Namespace(seed=0), batch_size=10, shuffle=True, transform=SampleShift(1.0))
        batches = list(loader)
        assert [len(b[0]) for b in batches] == [10, 10, 4]
        assert sorted(v - 1 for b in batches for v in number(b[0])) == list(range(24))


def test_serialize_loads_back_through_mammoths_load_buffer_path_and_deepcopy(tmp_path):
    with CarouselBuffer(12, tiers=lmdb(), root=tmp_path / "a") as buf:
        buf.add_data(examples=images(12), labels=torch.arange(12) % 3, logits=torch.rand(12, 2))
        saved = buf.serialize()
        assert saved["examples"].shape == (12, 3, 8, 8) and set(saved) == {"examples", "labels", "logits"}
        copied = copy.deepcopy(buf).to("cpu")  # Mammoth's old_pickle checkpoint
    # What Mammoth's ContinualModel.load_buffer does with a serialized buffer:
    fresh = CarouselBuffer(12)
    for k, v in saved.items():
        setattr(fresh, k, v)
    fresh.attributes = list(saved)
    fresh.num_seen_examples = saved["examples"].shape[0]
    for loaded in (fresh, copied):
        everything = loaded.get_all_data()
        assert len(loaded) == 12 and all(torch.equal(a, b) for a, b in zip(everything, saved.values()))
        assert loaded.memory.tiers == []  # a copy is RAM-only
        loaded.close()


def test_sample_selection_strategies_and_buffer_size():
    with CarouselBuffer(20, sample_selection_strategy="balancoir", seed=3) as buf:
        labels = torch.cat([torch.zeros(200, dtype=torch.long), torch.arange(1, 5).repeat_interleave(10)])
        for lo in range(0, len(labels), 10):
            buf.add_data(examples=images(10, lo), labels=labels[lo:lo + 10])
        counts = buf.labels.bincount(minlength=5)
        assert counts[1:].min() >= 3  # rare classes got in at class 0's expense (reservoir: ~1 each)
    with pytest.raises(ValueError, match="unlimited"):
        CarouselBuffer(8, sample_selection_strategy="unlimited")
    with pytest.raises(ValueError, match="dataset"):
        CarouselBuffer(8, sample_selection_strategy="abs")
    buf = CarouselBuffer(8)
    buf.add_data(examples=images(8), labels=torch.zeros(8, dtype=torch.long))
    buf.buffer_size = 12  # Mammoth's fill_buffer sets it, then empties the buffer
    assert buf.buffer_size == 12 and len(buf.examples) == 8
    buf.empty()
    buf.add_data(examples=images(12), labels=torch.zeros(12, dtype=torch.long))
    assert len(buf) == 12 and len(buf.examples) == 12
    buf.close()


class Offsets:
    """Mammoth's dataset as ABS reads it: get_offsets() -> (first class of the task, end)."""

    def __init__(self) -> None:
        self.task = 0

    def get_offsets(self):
        return 2 * self.task, 2 * self.task + 2


@pytest.mark.parametrize("strategy", ["lars", "abs"])
def test_loss_aware_strategies_keep_what_the_scores_say(strategy):
    # ER-tricks passes minus the loss: a high-loss sample scores low and stays. Class 0 here is hard
    # (score -5), class 1 easy (0): the buffer fills up with class 0 (reservoir: half and half).
    dataset = Offsets()
    with CarouselBuffer(16, sample_selection_strategy=strategy, dataset=dataset, seed=2) as buf:
        for lo in range(0, 400, 8):
            y = torch.arange(8) % 2
            buf.add_data(examples=images(8, lo), labels=y, sample_selection_scores=-5.0 * (y == 0))
            idx, _, by = buf.get_data(4, return_index=True)
            buf.sample_selection_fn.update(idx, -5.0 * (by == 0))
        assert (buf.labels == 0).sum() >= 12
        if strategy == "abs":  # classes 0-1 were the current task's (a higher score went first)
            dataset.task = 1  # now they are past: a lower score goes first, the easy class 1 stays
            easy = set(number(buf.examples[buf.labels == 1]))
            for lo in range(400, 800, 8):
                buf.add_data(examples=images(8, lo), labels=torch.arange(8) % 2,
                             sample_selection_scores=-5.0 * (torch.arange(8) % 2 == 0))
            assert easy <= set(number(buf.examples)) and (buf.labels == 1).sum() > len(easy)


def test_labrs_balances_classes_and_lars_does_not():
    counts = {}
    for strategy in ("labrs", "lars"):
        with CarouselBuffer(16, sample_selection_strategy=strategy, seed=2) as buf:
            for lo in range(0, 400, 8):
                y = (torch.arange(8) == 0).long()  # class 1 is an eighth of the stream
                buf.add_data(examples=images(8, lo), labels=y, sample_selection_scores=torch.zeros(8))
            counts[strategy] = int((buf.labels == 1).sum())
    assert counts["labrs"] >= 6 and counts["lars"] <= 4


def test_scores_travel_with_their_samples_through_swaps(tmp_path):
    with CarouselBuffer(16, sample_selection_strategy="lars", tiers=lmdb(), root=tmp_path / "b",
                        swap={"start_task": 0}) as buf:
        for lo in range(0, 160, 8):
            buf.add_data(examples=images(8, lo), labels=torch.arange(8) % 4,
                         sample_selection_scores=-images(8, lo)[:, 0, 0, 0])
        updated = set()
        for _ in range(20):
            idx, x, _ = buf.get_data(8, return_index=True)
            buf.sample_selection_fn.update(idx, -x[:, 0, 0, 0] - 0.5)  # each sample's own new score
            updated.update(number(x))
            buf.end_step()
        assert _swapped(buf) > 5
        held = buf.get_all_data()[0]
        column = buf.memory.pool.tensors["selection_score"]
        # Every sample in the EM carries its own latest score, also one swapped out and back in since.
        expected = torch.tensor([-k - 0.5 if k in updated else -k for k in number(held)])
        assert torch.equal(column, expected)


# ---- 4. leaks ----------------------------------------------------------------------------------------
def test_an_unclosed_buffer_leaves_no_folder_when_collected(tmp_path):
    buf = CarouselBuffer(8, tiers=lmdb())
    buf.add_data(examples=images(8), labels=torch.zeros(8, dtype=torch.long))
    folder = Path(buf.memory.config.tiers[0].path).parent
    assert folder.is_dir()
    del buf
    gc.collect()
    assert not folder.exists()
    kept = CarouselBuffer(8, tiers=lmdb(), root=tmp_path / "mine")
    kept.add_data(examples=images(8), labels=torch.zeros(8, dtype=torch.long))
    del kept
    gc.collect()
    assert (tmp_path / "mine").is_dir()  # the user's root stays


def test_exit_with_an_open_swapping_buffer_is_quiet_and_clean(tmp_path):
    script = """
import torch
from carousel.integrations.mammoth import CarouselBuffer
buf = CarouselBuffer(16, tiers=[{"kind": "lmdb", "capacity": 1000}], swap={"start_task": 0})
for step in range(40):
    buf.add_data(examples=torch.rand(8, 3, 8, 8), labels=torch.randint(0, 4, (8,)))
    buf.get_data(8)
print("done")
"""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr
    assert run.stderr == ""  # no "swap engine swap error: ... cannot schedule new futures after shutdown"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("carousel-buffer-")]


# ---- 5. task boundaries ------------------------------------------------------------------------------
def _swapped(buf) -> int:
    buf.memory.flush()
    buf.memory._engine.wait_idle()
    return buf.stats()["swapped_in"]


def test_no_swapping_during_the_first_task_new_classes_start_the_next(tmp_path):
    with CarouselBuffer(16, tiers=lmdb(), root=tmp_path / "b") as buf:
        for task in range(2):
            for step in range(15):
                buf.add_data(examples=images(8, 100 * task + 8 * step), labels=torch.arange(8) % 2 + 2 * task)
                buf.get_data(8)
            if task == 0:
                assert _swapped(buf) == 0
        assert _swapped(buf) > 0 and buf.stats()["current_task"] == 1


class MammothLikeModel(nn.Module):
    """The hooks Mammoth's ContinualModel offers: its training loop calls meta_begin_task at each
    task, meta_observe each step, meta_end_task after (which moves current_task on)."""

    def __init__(self, buffer: CarouselBuffer) -> None:
        super().__init__()
        self.buffer, self._current_task = buffer, 0

    @property
    def current_task(self) -> int:
        return self._current_task

    def meta_begin_task(self, dataset) -> None:
        pass

    def meta_end_task(self, dataset) -> None:
        self._current_task += 1

    def meta_observe(self, inputs, labels, not_aug_inputs, epoch=None) -> float:
        if not self.buffer.is_empty():
            self.buffer.get_data(8)
        self.buffer.add_data(examples=not_aug_inputs, labels=labels)
        return 0.0


def test_attach_learns_tasks_from_the_model_in_a_domain_incremental_stream(tmp_path):
    with CarouselBuffer(16, tiers=lmdb(), root=tmp_path / "b") as buf:
        model = buf.attach(MammothLikeModel(buf))
        for task in range(2):  # the same classes in every task: no guess could tell
            model.meta_begin_task(None)
            for step in range(15):
                x = images(8, 100 * task + 8 * step)
                model.meta_observe(x, torch.arange(8) % 2, x)
            if task == 0:
                assert _swapped(buf) == 0
            model.meta_end_task(None)
        assert _swapped(buf) > 0
