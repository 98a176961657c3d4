"""iCaRL, GDumb and GCR: their selection routines, their memories, and short end-to-end runs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carousel import CarouselMemory
from trainers.augment import prepare
from trainers.methods import Context, get_method
from trainers.methods.gcr import gradient_coreset, last_layer_gradients
from trainers.methods.icarl import herding
from trainers.models import MLP
from trainers.streams import generated_stream

SHAPE = (1, 12, 12)


# ---- helpers ------------------------------------------------------------------------------------------
def stream_of(tasks: int = 2, per_class: int = 60, seed: int = 0):
    return generated_stream(tasks=tasks, classes_per_task=2, shape=SHAPE, train_per_class=per_class,
                            test_per_class=20, seed=seed)


def open_memory(method_cls, stream, em_size: int, tmp_path=None) -> CarouselMemory:
    memory = {"em_size": em_size, "sample_shape": list(stream.input_shape), "seed": 0,
              "admission": method_cls.admission,
              "extras": {k: {"shape": list(s), "dtype": d}
                         for k, (s, d) in method_cls.extras(stream.num_classes).items()}}
    cfg = {"memory": memory}
    if tmp_path is not None:  # tiered: every added sample goes to flash, replays swap from it
        cfg["tiers"] = [{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": 100000}]
        cfg["swap"] = {"ratio": 0.5, "workers": 0}  # synchronous swaps: counted by the time stats() asks
        memory["state_dir"] = str(tmp_path / "state")
    return CarouselMemory.from_dict(cfg)


def build(name: str, stream, memory, em_size: int, **hparams):
    torch.manual_seed(0)
    model = MLP(stream.num_classes, in_features=int(np.prod(stream.input_shape)), hidden=64)
    ctx = Context(stream, model, memory, batch_size=16, replay_size=16, seed=0,
                  generator=torch.Generator().manual_seed(0))
    return get_method(name)(ctx, em_size=em_size, **hparams)


def run_task(method, task, epochs: int = 1, bs: int = 16) -> None:
    method.begin_task(task)
    n = len(task.train_y)
    for _ in range(epochs):
        for lo in range(0, n, bs):
            method.train_step(torch.from_numpy(task.train_x[lo:lo + bs]), torch.from_numpy(task.train_y[lo:lo + bs]),
                              task.index)
    method.end_task(task)


def accuracy(method, stream, x: np.ndarray, y: np.ndarray) -> float:
    logits = method.predict(prepare(torch.from_numpy(x), stream, train=False))
    return float((logits.argmax(1) == torch.from_numpy(y)).float().mean())


def accuracy_upto(method, stream, upto: int) -> float:
    """Class-IL accuracy on the test sets of tasks 0..upto."""
    xs = np.concatenate([t.test_x for t in stream.tasks[:upto + 1]])
    ys = np.concatenate([t.test_y for t in stream.tasks[:upto + 1]])
    return accuracy(method, stream, xs, ys)


# ---- registry -------------------------------------------------------------------------------------------
def test_methods_are_registered_with_their_admission():
    for name, admission in (("icarl", "class_balanced"), ("gdumb", "class_balanced"), ("gcr", "class_balanced")):
        cls = get_method(name)
        assert cls.name == name and cls.admission == admission
    assert get_method("gcr").extras(10) == {"logits": ((10,), "float32"), "weight": ((), "float32")}


@pytest.mark.parametrize("name", ["icarl", "gdumb", "gcr"])
def test_em_size_is_required(name):
    stream = stream_of()
    memory = open_memory(get_method(name), stream, 20)
    ctx = Context(stream, MLP(stream.num_classes, in_features=144), memory)
    with pytest.raises(ValueError, match="em_size"):
        get_method(name)(ctx)
    memory.close()


# ---- iCaRL --------------------------------------------------------------------------------------------
def test_herding_first_pick_is_nearest_and_tracks_the_mean_faster_than_random():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 16, generator=g) + 2.0 * torch.randn(1, 16, generator=g)
    order = herding(feats, 40)
    assert len(order) == 40 and len(set(order.tolist())) == 40
    normed = F.normalize(feats, dim=1)
    mu = normed.mean(0)
    assert int(order[0]) == int((normed - mu).norm(dim=1).argmin())

    def gap(idx):  # distance from the running mean of the first k picks to the class mean, for every k
        running = normed[idx].cumsum(0) / torch.arange(1, len(idx) + 1).unsqueeze(1)
        return (running - mu).norm(dim=1)

    herd = gap(order)
    rand = torch.stack([gap(torch.randperm(300, generator=g)[:40]) for _ in range(20)]).mean(0)
    assert (herd < rand).all()
    assert (herd[4:] < 0.5 * rand[4:]).all()  # after a few picks, less than half chance's distance


def test_herding_caps_m_and_handles_empty():
    feats = torch.randn(5, 3)
    assert sorted(herding(feats, 10).tolist()) == [0, 1, 2, 3, 4]
    assert herding(feats, 0).numel() == 0


class FlatFeatures(nn.Module):
    """Features = the (normalized) pixels themselves: the NME classifier's answer is computable by hand."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(in_features, num_classes)

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.classifier(self.features(x))


def test_icarl_nme_predicts_the_class_whose_exemplar_mean_is_nearest():
    stream = stream_of(tasks=3)
    icarl = get_method("icarl")
    memory = open_memory(icarl, stream, 30)
    ctx = Context(stream, FlatFeatures(144, stream.num_classes), memory)
    method = icarl(ctx, em_size=30)
    t0, t1 = stream.tasks[0], stream.tasks[1]
    for task in (t0, t1):  # 4 classes of exemplars in the memory, classes 4 and 5 unseen
        method.begin_task(task)
        for c in task.classes:
            idx = np.flatnonzero(task.train_y == c)[:7]
            memory.add(torch.from_numpy(task.train_x[idx]), torch.from_numpy(task.train_y[idx]), task.index)
    method.compute_class_means()

    em = memory.sample(30)
    f = F.normalize(prepare(em.x, stream, train=False).flatten(1), dim=1)
    means = torch.stack([F.normalize(f[em.y == c].mean(0), dim=0) for c in range(4)])
    x = prepare(torch.from_numpy(t1.test_x), stream, train=False)
    logits = method.predict(x)
    assert logits.shape == (len(x), stream.num_classes)
    assert torch.isneginf(logits[:, 4:]).all()  # no exemplars, no mean: never predicted
    dist = torch.cdist(F.normalize(x.flatten(1), dim=1), means)
    torch.testing.assert_close(logits[:, :4], -dist, rtol=1e-4, atol=1e-5)
    assert torch.equal(logits.argmax(1), dist.argmin(1))
    assert float((logits.argmax(1) == torch.from_numpy(t1.test_y)).float().mean()) > 0.9
    memory.close()


def test_icarl_two_tasks_ends_with_exemplars_of_every_class():
    stream = stream_of(tasks=2)
    memory = open_memory(get_method("icarl"), stream, 40)
    method = build("icarl", stream, memory, 40)
    run_task(method, stream.tasks[0], epochs=2)
    assert Counter(memory.sample(40).y.tolist()) == {0: 20, 1: 20}  # m = 40 // 2
    run_task(method, stream.tasks[1], epochs=2)
    counts = Counter(memory.sample(40).y.tolist())
    assert counts == {0: 10, 1: 10, 2: 10, 3: 10}  # m = 40 // 4; old classes shrunk by the admission
    assert method.old_model is not None and method.old_classes == 4
    assert accuracy_upto(method, stream, 1) > 0.6  # NME over 4 classes (chance 0.25)
    memory.close()


# ---- GDumb ------------------------------------------------------------------------------------------------
def test_gdumb_memory_stays_class_balanced_and_learns_nothing_online():
    stream = stream_of(tasks=2)
    memory = open_memory(get_method("gdumb"), stream, 30)
    method = build("gdumb", stream, memory, 30, epochs=0)
    before = [p.detach().clone() for p in method.model.parameters()]
    for task in stream.tasks:
        method.begin_task(task)
        for lo in range(0, len(task.train_y), 16):
            loss = method.train_step(torch.from_numpy(task.train_x[lo:lo + 16]),
                                     torch.from_numpy(task.train_y[lo:lo + 16]), task.index)
            assert loss == 0.0
            counts = Counter(memory.sample(30).y.tolist())
            if sum(counts.values()) == 30:
                assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert all(torch.equal(a, b) for a, b in zip(before, method.model.parameters()))
    assert set(Counter(memory.sample(30).y.tolist()).values()) <= {7, 8}  # 30 over 4 classes
    memory.close()


def test_gdumb_end_task_retrains_from_scratch():
    stream = stream_of(tasks=2)
    memory = open_memory(get_method("gdumb"), stream, 40)
    method = build("gdumb", stream, memory, 40, epochs=15)
    task = stream.tasks[0]
    method.begin_task(task)
    for lo in range(0, len(task.train_y), 16):
        method.train_step(torch.from_numpy(task.train_x[lo:lo + 16]), torch.from_numpy(task.train_y[lo:lo + 16]), 0)
    with torch.no_grad():  # a poisoned model: only a real re-initialization recovers from NaN
        for p in method.model.parameters():
            p.fill_(float("nan"))
    method.end_task(task)
    assert all(torch.isfinite(p).all() for p in method.model.parameters())
    em = memory.sample(40)
    assert accuracy(method, stream, em.x.numpy(), em.y.numpy()) > 0.95
    logits = method.predict(prepare(em.x, stream, train=False))
    assert torch.isneginf(logits[:, 2:]).all()  # the head is masked to the classes seen
    memory.close()


# ---- GCR --------------------------------------------------------------------------------------------------
def relative_error(grads: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> float:
    target = grads.sum(0)
    return float((w @ grads[idx] - target).norm() / target.norm())


def test_gradient_coreset_matches_the_pool_gradient_better_than_random_subsets():
    g = torch.Generator().manual_seed(0)
    n, d, c, k = 300, 16, 4, 20
    feats = torch.relu(torch.randn(n, d, generator=g) + 0.5)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) + 2.0 * F.one_hot(labels, c)
    idx, w = gradient_coreset(feats, logits, labels, k, generator=g)
    assert len(idx) == k and len(set(idx.tolist())) == k
    assert (w >= 0).all() and w.dtype == torch.float32
    grads = last_layer_gradients(feats, logits, labels)
    ours = relative_error(grads, idx, w)
    chance = np.mean([relative_error(grads, torch.randperm(n, generator=g)[:k], torch.full((k,), n / k))
                      for _ in range(20)])
    assert ours < 0.5 * chance, (ours, chance)


def test_gradient_coreset_with_a_target_and_a_shortfall():
    g = torch.Generator().manual_seed(1)
    feats, labels = torch.rand(30, 4, generator=g), torch.zeros(30, dtype=torch.long)
    logits = torch.randn(30, 3, generator=g)
    grads = last_layer_gradients(feats, logits, labels)
    # The target is one sample's gradient: the pursuit needs that one sample, the rest is random fill.
    idx, w = gradient_coreset(feats, logits, labels, 5, target=grads[7], generator=g)
    assert len(idx) == 5 and len(set(idx.tolist())) == 5 and int(idx[0]) == 7
    assert (w >= 0).all() and abs(float(w[0]) - 1.0) < 1e-2
    assert gradient_coreset(feats, logits, labels, 100)[0].shape == (30,)  # k capped at N


def test_gcr_stores_coreset_weights_that_come_back_in_sample():
    stream = stream_of(tasks=2)
    memory = open_memory(get_method("gcr"), stream, 40)
    method = build("gcr", stream, memory, 40)
    run_task(method, stream.tasks[0])
    em = memory.sample(40)
    assert set(em.extras) == {"logits", "weight"}
    w = em.extras["weight"]
    assert len(em) == 40 and (w >= 0).all() and torch.isfinite(w).all()
    for c in (0, 1):  # per class, the weights were rescaled to average 1
        assert abs(float(w[em.y == c].mean()) - 1.0) < 1e-4
    assert float(w.std()) > 0  # real coreset weights, not all ones
    assert em.extras["logits"].shape == (40, stream.num_classes)
    run_task(method, stream.tasks[1])
    em = memory.sample(40)
    assert Counter(em.y.tolist()) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert (em.extras["weight"] >= 0).all()
    assert accuracy_upto(method, stream, 1) > 0.5
    memory.close()


# ---- reads of the whole EM are fresh -------------------------------------------------------------------
class StaleRing:
    """A memory whose unseeded ``sample(n)`` keeps answering with the first batch of that size, like a
    daemon client served from a ring batch drawn before the latest adds; seeded draws are fresh."""

    def __init__(self, memory) -> None:
        self.memory, self.first = memory, {}

    def add(self, *args, **kwargs):
        return self.memory.add(*args, **kwargs)

    def observe(self, *args, **kwargs):
        return self.memory.observe(*args, **kwargs)

    def end_step(self):
        return self.memory.end_step()

    def stats(self):
        return self.memory.stats()

    def sample(self, n, **kwargs):
        if kwargs.get("seed") is not None:
            return self.memory.sample(n, **kwargs)
        return self.first.setdefault(n, self.memory.sample(n, **kwargs))


@pytest.mark.parametrize("name", ["icarl", "gdumb"])
def test_whole_em_reads_do_not_take_a_stale_ring_batch(name):
    stream = stream_of(tasks=2)
    memory = open_memory(get_method(name), stream, 24)
    method = build(name, stream, StaleRing(memory), 24, **({"epochs": 5} if name == "gdumb" else {}))
    for task in stream.tasks:
        run_task(method, task)
    if name == "icarl":  # a mean for every class, from the exemplars added at the end of task 2
        assert method.has_mean[:4].all()
    assert accuracy_upto(method, stream, 1) > 0.6  # classes 2 and 3 are predicted too
    memory.close()


# ---- end to end on a tiered memory ---------------------------------------------------------------------
@pytest.mark.parametrize("name,tasks", [("icarl", 3), ("gdumb", 2), ("gcr", 3)])
def test_tiered_run_swaps(name, tasks, tmp_path):
    # iCaRL and GCR add only at the end of a task, so the flash tier holds samples the EM lacks only
    # once a second task's selection has evicted some: swaps start in the third task. GDumb offers
    # the whole stream, and swaps while it retrains at the end of the second task.
    stream = stream_of(tasks=tasks, per_class=40)
    em_size = 24
    memory = open_memory(get_method(name), stream, em_size, tmp_path)
    try:
        method = build(name, stream, memory, em_size, **({"epochs": 3} if name == "gdumb" else {}))
        for task in stream.tasks:
            run_task(method, task)
        stats = memory.stats()
        assert stats["swapped_in"] > 0 and stats["errors"]["swap"] is None
        counts = Counter(memory.sample(em_size).y.tolist())
        assert set(counts) == set(range(stream.num_classes))
        assert max(counts.values()) - min(counts.values()) <= 1
        assert torch.isfinite(method.predict(prepare(torch.from_numpy(stream.tasks[0].test_x), stream,
                                                     train=False))[:, :stream.num_classes].max(1).values).all()
    finally:
        memory.close()
