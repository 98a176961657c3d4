"""CarouselBuffer called exactly as Mammoth's rehearsal models call their Buffer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carousel.integrations.mammoth import CarouselBuffer
from trainers.streams import generated_stream


def flip(x: torch.Tensor) -> torch.Tensor:  # a per-example transform, as Mammoth passes self.transform
    return torch.flip(x, dims=[-1]) if torch.rand(()) < 0.5 else x


class ER:
    """Mammoth's ER observe(): replay concatenated to the stream batch, then add_data."""

    def __init__(self, net, buffer, minibatch_size=16):
        self.net, self.buffer, self.minibatch_size = net, buffer, minibatch_size
        self.opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def observe(self, inputs, labels, not_aug_inputs, task):
        real_batch_size = inputs.shape[0]
        self.opt.zero_grad()
        if not self.buffer.is_empty():
            buf_inputs, buf_labels = self.buffer.get_data(self.minibatch_size, transform=flip, device="cpu")
            inputs = torch.cat((inputs, buf_inputs))
            labels = torch.cat((labels, buf_labels))
        loss = F.cross_entropy(self.net(inputs), labels)
        loss.backward()
        self.opt.step()
        self.buffer.add_data(examples=not_aug_inputs, labels=labels[:real_batch_size])
        self.added = getattr(self, "added", {})
        for e, lab in zip(not_aug_inputs, labels[:real_batch_size]):
            self.added[e.numpy().tobytes()] = (int(lab), None)
        return loss.item()


class DERPP(ER):
    """Mammoth's DER++ observe(): two draws (logits, then labels), add_data with logits and task labels."""

    def observe(self, inputs, labels, not_aug_inputs, task):
        self.opt.zero_grad()
        outputs = self.net(inputs)
        loss = F.cross_entropy(outputs, labels)
        if not self.buffer.is_empty():
            buf_inputs, _, buf_logits, _ = self.buffer.get_data(self.minibatch_size, transform=flip, device="cpu")
            loss = loss + 0.3 * F.mse_loss(self.net(buf_inputs), buf_logits)
            buf_inputs, buf_labels, _, buf_tasks = self.buffer.get_data(self.minibatch_size, transform=flip)
            assert buf_tasks.dtype == torch.int64 and (buf_tasks <= task).all()
            loss = loss + 0.5 * F.cross_entropy(self.net(buf_inputs), buf_labels)
        loss.backward()
        self.opt.step()
        self.buffer.add_data(examples=not_aug_inputs, labels=labels, logits=outputs.data,
                             task_labels=torch.full((len(labels),), task, dtype=torch.long))
        self.added = getattr(self, "added", {})
        for e, lab, lg in zip(not_aug_inputs, labels, outputs.data):
            self.added[e.numpy().tobytes()] = (int(lab), lg.clone())
        return loss.item()


def train(model_cls, buffer, tasks=3):
    torch.manual_seed(0)
    stream = generated_stream(tasks=tasks, train_per_class=60, test_per_class=20)
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, stream.num_classes))
    model = model_cls(net, buffer)
    for task in stream.tasks:
        x = torch.from_numpy(task.train_x).float() / 255
        y = torch.from_numpy(task.train_y)
        for lo in range(0, len(y), 16):
            model.observe(x[lo:lo + 16], y[lo:lo + 16], x[lo:lo + 16].clone(), task.index)
    return model.added


@pytest.mark.parametrize("model_cls", [ER, DERPP])
@pytest.mark.parametrize("tiered", [False, True])
def test_mammoth_models_run_unchanged_on_a_carousel_buffer(tmp_path, model_cls, tiered):
    tiers = [{"kind": "lmdb", "capacity": 10000}] if tiered else None
    with CarouselBuffer(40, "cpu", tiers=tiers, root=tmp_path / "buf") as buf:
        added = train(model_cls, buf)
        assert len(buf) == 40 and buf.num_seen_examples == 3 * 2 * 60
        assert buf.used_attributes == (["examples", "labels"] if model_cls is ER
                                       else ["examples", "labels", "logits", "task_labels"])
        if tiered:
            buf.memory.flush()
            buf.memory._engine.wait_idle()  # swaps run in the background: count them once done
        stats = buf.stats()
        assert stats["added"] == 360
        if tiered:  # every sample on flash, the EM rotated by swaps (each draw is observed)
            assert stats["tiers"]["0-lmdb"]["samples"] == 360 and stats["swapped_in"] > 10
        else:
            assert stats["swapped_in"] == 0
        # Whatever the swaps did, every replayed example comes back with its own label (and logits).
        drawn = buf.get_data(40)
        assert len(drawn[0]) == 40
        for i, e in enumerate(drawn[0]):
            label, logits = added[e.numpy().tobytes()]
            assert int(drawn[1][i]) == label
            if logits is not None:
                torch.testing.assert_close(drawn[2][i], logits)
        classes = set(drawn[1].tolist())
        assert len(classes) >= 4  # replay spans the tasks seen, not just the last one


def test_get_data_options_and_order_of_the_tuple():
    with CarouselBuffer(20) as buf:
        with pytest.raises(RuntimeError, match="add_data"):
            buf.get_data(4)
        x = torch.arange(30 * 2, dtype=torch.float32).reshape(30, 2)
        buf.add_data(examples=x[:10], labels=torch.arange(10) % 4, logits=x[:10, :1] * 2,
                     task_labels=torch.zeros(10, dtype=torch.long))
        buf.add_data(examples=x[10:], labels=torch.arange(10, 30) % 4, logits=x[10:, :1] * 2,
                     task_labels=torch.ones(20, dtype=torch.long))
        idx, ex, lab, lg, tl = buf.get_data(8, return_index=True)
        assert idx.dtype == torch.int64 and ex.shape == (8, 2) and lg.shape == (8, 1)
        torch.testing.assert_close(lg[:, 0], ex[:, 0] * 2)  # the fields of one sample stay together
        ex, lab, lg, tl = buf.get_data(100, mask_task_out=1)
        assert (tl == 0).all() and len(ex) <= 10
        ex, *_ = buf.get_data(5, transform=lambda e: e + 1000)
        assert (ex >= 1000).all()
        everything = buf.get_all_data()
        assert len(everything) == 4 and everything[0].shape == (20, 2)
        with pytest.raises(ValueError, match="holds"):  # a field the buffer was not made with
            buf.add_data(examples=x[:2], labels=torch.zeros(2, dtype=torch.long), true_labels=torch.zeros(2))
        buf.observe(logits=torch.randn(len(ex), 4))  # CarM-ranked report of the last draw
        with pytest.raises(RuntimeError, match="last get_data"):
            buf.observe()


def test_mask_task_out_by_classes_per_task_and_empty(tmp_path):
    buf = CarouselBuffer(12, tiers=[{"kind": "zarr", "capacity": 1000, "chunk": 8}], root=tmp_path / "b")
    x = torch.rand(24, 3)
    buf.add_data(examples=x, labels=torch.arange(24) % 4)
    _, labels = buf.get_data(12, mask_task_out=0, cpt=2)  # task 0 = classes 0, 1
    assert (labels >= 2).all()
    with pytest.raises(ValueError, match="cpt"):
        buf.get_data(4, mask_task_out=0)
    assert (tmp_path / "b" / "tier0-zarr").is_dir()
    buf.empty()
    assert buf.is_empty() and len(buf) == 0 and not any((tmp_path / "b").iterdir())
    buf.add_data(examples=torch.rand(4, 5), labels=torch.zeros(4, dtype=torch.long))  # a new shape: a new memory
    assert buf.get_data(2)[0].shape == (2, 5)
    buf.close()
    assert (tmp_path / "b").exists()  # a root given by the caller stays


def test_buffer_on_a_daemon_memory(tmp_path):
    import carousel
    from tests.daemon.harness import start_daemon
    d = start_daemon(tmp_path, memory={"em_size": 16, "sample_shape": [6], "dtype": "float32",
                                        "extras": {"logits": {"shape": [3], "dtype": "float32"}}},
                     swap={"start_task": 0}, metrics=False)
    try:
        client = carousel.connect(d.socket)
        buf = CarouselBuffer(16, memory=client)
        for _ in range(5):
            buf.add_data(examples=torch.rand(8, 6), labels=torch.randint(0, 3, (8,)), logits=torch.rand(8, 3))
        for _ in range(10):
            ex, lab, lg = buf.get_data(8)
            assert ex.shape == (8, 6) and lg.shape == (8, 3)
        with pytest.raises(RuntimeError, match="not the buffer's"):
            buf.empty()
        assert client.stats()["added"] == 40
        buf.close()
        client.close()
    finally:
        assert d.stop() == 0
