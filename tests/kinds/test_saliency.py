"""Saliency-compressed memories (SAMC): the codec, completion, Grad-CAM, byte budgets, the memory
in every tier, restarts and the daemon."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from carousel import CarouselMemory, ConfigError, MemoryInputError
from carousel.kinds.completion import Completion, completions, make_completion, register_completion
from carousel.kinds import RawCodec, SaliencyCodec
from carousel.kinds.saliency import grad_cam, last_conv_block

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
SHAPE = (1, 28, 28)
FIELDS = {"x": (SHAPE, "uint8"), "y": ((), "int64"), "task": ((), "int16")}


def object_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images with an object on a dark background (like Fashion-MNIST) and a model-free saliency
    map (the blurred intensity: the object is what matters)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    x = np.zeros((n, 1, 28, 28), np.float32)
    for i in range(n):
        cy, cx, r = rng.integers(9, 19), rng.integers(9, 19), rng.integers(5, 9)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        x[i, 0] = blob * (120 + 80 * np.sin(xx / 3.0 + i)) + rng.normal(0, 8, (28, 28))
    return np.clip(x, 0, 255).astype(np.uint8), blurred_saliency(np.clip(x, 0, 255).astype(np.uint8))


def blurred_saliency(x: np.ndarray) -> np.ndarray:
    s = x[:, 0].astype(np.float32)
    for _ in range(3):  # a cheap blur
        p = np.pad(s, ((0, 0), (1, 1), (1, 1)), mode="edge")
        s = (p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] + s) / 5
    lo, hi = s.min(axis=(1, 2), keepdims=True), s.max(axis=(1, 2), keepdims=True)
    return (s - lo) / np.maximum(hi - lo, 1e-6)


def real_or_object_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    if (SHARED / "FashionMNIST").is_dir():
        from trainers.datasets import load_idx_set
        x = load_idx_set("fashion-mnist", SHARED).images[:n].reshape(n, *SHAPE)
        return x, blurred_saliency(x), "fashion-mnist"
    x, s = object_images(n)
    return x, s, "generated"


def batch(x, sal, y=None, task=0):
    n = len(x)
    return {"x": x, "y": np.zeros(n, np.int64) if y is None else y, "task": np.full(n, task, np.int16),
            "saliency": np.rint(sal * 255).astype(np.uint8)}


# ---- the codec ---------------------------------------------------------------------------------------
def test_kept_pixels_come_back_exactly_and_dropped_ones_are_filled():
    x, sal = object_images(16)
    codec = SaliencyCodec(FIELDS, theta=0.5, background_bits=0)
    rec = codec.encode(batch(x, sal, y=np.arange(16)))
    back = codec.decode(rec)
    keep = codec.keep_mask(np.rint(sal * 255).astype(np.uint8))[:, None]
    assert 0.05 < keep.mean() < 0.8
    np.testing.assert_array_equal(back["x"][keep], x[keep])
    np.testing.assert_array_equal(back["y"], np.arange(16))
    assert back["x"].dtype == np.uint8 and back["x"].shape == x.shape


def test_theta_zero_is_lossless():
    x, sal = object_images(8)
    codec = SaliencyCodec(FIELDS, theta=0.0)
    np.testing.assert_array_equal(codec.decode(codec.encode(batch(x, sal)))["x"], x)


def test_multichannel_and_other_dtypes_round_trip():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 1000, (4, 3, 8, 10)).astype(np.uint16)
    sal = rng.random((4, 8, 10))
    codec = SaliencyCodec({"x": ((3, 8, 10), "uint16"), "y": ((), "int64"), "task": ((), "int16"),
                           "logits": ((5,), "float32")}, theta=0.5)
    logits = rng.standard_normal((4, 5)).astype(np.float32)
    rec = codec.encode({**batch(x, sal), "logits": logits})
    back = codec.decode(rec)
    keep = np.broadcast_to((np.rint(sal * 255) >= codec._threshold)[:, None], x.shape)
    np.testing.assert_array_equal(back["x"][keep], x[keep])
    np.testing.assert_array_equal(back["logits"], logits)


def test_background_pixels_are_kept_coarse_and_sharp():
    x, sal = object_images(32)
    keep = np.broadcast_to((np.rint(sal * 255) >= 128)[:, None], x.shape)
    err, size = {}, {}
    for b in (1, 2, 4, 8):
        codec = SaliencyCodec(FIELDS, theta=0.5, background_bits=b)
        rec = codec.encode(batch(x, sal))
        back = codec.decode(rec)["x"]
        np.testing.assert_array_equal(back[keep], x[keep])           # salient: exact
        step = 1 << (8 - b)
        diff = np.abs(back.astype(int) - x.astype(int))[~keep]
        upper = x[~keep] >= step
        assert diff[upper].max() <= step // 2 + 1, (b, diff[upper].max())  # the rest: within half a step,
        assert (back[~keep][~upper] == 0).all()                            # the lowest step to 0: black stays black
        err[b], size[b] = diff.mean(), codec.nbytes(rec).mean()
    assert err[1] > err[2] > err[4] > err[8] == 0
    assert size[1] < size[2] < size[4] < size[8]


def test_bytes_per_sample_fall_with_theta_on_real_images():
    x, sal, source = real_or_object_images(512)
    raw = RawCodec(FIELDS).nbytes({"y": np.zeros(1)})[0]
    sizes = []
    for theta in (0.2, 0.4, 0.6, 0.8):
        codec = SaliencyCodec(FIELDS, theta=theta)
        sizes.append(codec.nbytes(codec.encode(batch(x, sal))).mean())
    assert all(a > b for a, b in zip(sizes, sizes[1:])), (source, sizes)
    assert sizes[2] * 2 <= raw, (source, sizes, raw)  # theta 0.6: at least 2x more samples per byte


# ---- completion ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", completions())
def test_completion_contract(name):
    rng = np.random.default_rng(2)
    x = rng.uniform(10, 200, (3, 2, 12, 12)).astype(np.float32)
    known = rng.random((3, 1, 12, 12)) < 0.4
    out = make_completion(name).fill(x.copy(), known)
    assert out.shape == x.shape and out.dtype == np.float32 and np.isfinite(out).all()
    kk = np.broadcast_to(known, x.shape)
    np.testing.assert_array_equal(out[kk], x[kk])
    # The fill never leaves the range of what was kept (a maximum principle).
    assert out.min() >= x[kk].min() - 1e-3 and out.max() <= x[kk].max() + 1e-3


@pytest.mark.parametrize("name", completions())
def test_completion_takes_dropped_pixels_from_a_base(name):
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 255, (2, 3, 8, 8)).astype(np.float32)
    base = rng.uniform(0, 255, (2, 3, 8, 8)).astype(np.float32)
    known = rng.random((2, 1, 8, 8)) < 0.5
    out = make_completion(name).fill(x, known, base)
    kk = np.broadcast_to(known, x.shape)
    np.testing.assert_array_equal(out[kk], x[kk])
    np.testing.assert_array_equal(out[~kk], base[~kk])


def test_the_thumbnail_makes_completion_far_closer_on_real_images_for_a_few_bytes():
    x, sal, source = real_or_object_images(256)
    err, size = {}, {}
    for thumb in (0, 4):
        codec = SaliencyCodec(FIELDS, theta=0.6, thumbnail=thumb, background_bits=0)
        rec = codec.encode(batch(x, sal))
        back = codec.decode(rec)["x"].astype(np.float32)
        dropped = ~np.broadcast_to(codec.keep_mask(np.rint(sal * 255).astype(np.uint8))[:, None], x.shape)
        err[thumb] = np.abs(back - x)[dropped].mean()
        size[thumb] = codec.nbytes(rec).mean()
    assert err[4] < 0.5 * err[0], (source, err)
    assert size[4] - size[0] <= 7 * 7 + 8, (source, size)  # the thumbnail: 49 bytes before zstd


def test_diffusion_fills_smooth_images_better_than_the_mean():
    yy, xx = np.mgrid[:28, :28].astype(np.float32)
    x = np.stack([np.sin(xx / 5 + k) * 60 + yy * 4 + 30 for k in range(4)])[:, None]
    known = np.ones((4, 1, 28, 28), bool)
    known[:, :, 6:20, 8:22] = False  # a big hole
    err = {n: np.abs(make_completion(n).fill(x, known) - x)[~np.broadcast_to(known, x.shape)].mean()
           for n in ("diffusion", "mean")}
    assert err["diffusion"] < 0.5 * err["mean"], err


def test_a_completion_plugs_in_by_name(tmp_path):
    @register_completion
    class Zero(Completion):
        name = "zero-test"

        def fill(self, x, known, base=None):
            return np.where(known, x, 0).astype(np.float32)

    cfg = saliency_config(tmp_path, completion="zero-test")
    with CarouselMemory.from_dict(cfg) as mem:
        assert mem.codec.completion.name == "zero-test"
    with pytest.raises(ConfigError, match="unknown completion"):
        CarouselMemory.from_dict(saliency_config(tmp_path / "b", completion="nope"))


# ---- Grad-CAM ----------------------------------------------------------------------------------------
def evidence_model() -> nn.Module:
    """conv (identity) -> ReLU -> GAP -> linear: class 0's evidence is brightness, class 1's its absence."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        head.bias.zero_()
    return nn.Sequential(conv, nn.ReLU(), nn.BatchNorm2d(1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def test_grad_cam_finds_the_evidence_and_leaves_the_model_as_it_was():
    model = evidence_model()
    model.train()
    x = torch.zeros(2, 1, 16, 16)
    x[0, 0, 2:6, 3:7] = 5.0
    x[1, 0, 10:14, 9:13] = 5.0
    bn_before = model[2].running_mean.clone()
    maps = grad_cam(model, x, model[1], classes=[0])
    assert maps.shape == (2, 16, 16) and maps.min() >= 0 and maps.max() <= 1
    for i, (r, c) in enumerate([(3, 4), (11, 10)]):
        peak = divmod(int(maps[i].argmax()), 16)
        assert abs(peak[0] - r) <= 2 and abs(peak[1] - c) <= 2, peak
        assert maps[i, r, c] > 0.6 and maps[i, 15 - r, 15 - c] < 0.2
    assert model.training and torch.equal(model[2].running_mean, bn_before)
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_keeps_everything_when_there_is_no_evidence():
    model = evidence_model()
    maps = grad_cam(model, torch.zeros(1, 1, 8, 8), model[1], classes=[0])
    assert torch.equal(maps, torch.ones(1, 8, 8))


def test_last_conv_block():
    from trainers.models import reduced_resnet18
    net = reduced_resnet18(4, in_channels=1)
    assert last_conv_block(net) is net.layer4
    maps = grad_cam(net, torch.randn(3, 1, 28, 28), last_conv_block(net), classes=[0, 1])
    assert maps.shape == (3, 28, 28)
    with pytest.raises(ValueError, match="no convolutional layer"):
        last_conv_block(nn.Sequential(nn.Linear(3, 2)))


# ---- the memory ----------------------------------------------------------------------------------------
def saliency_config(tmp_path, *, kind="lmdb", capacity=100000, em=32, theta=0.5, completion="diffusion",
                    ratio=0.5):
    tier = {"kind": kind, "path": str(tmp_path / f"t-{kind}"), "capacity": capacity, "codec": "zstd", "sync": False}
    if kind == "zarr":
        tier["chunk"] = 16
    return {"memory": {"em_size": em, "sample_shape": list(SHAPE), "kind": "saliency", "seed": 3,
                       "saliency": {"theta": theta, "completion": completion}},
            "swap": {"ratio": ratio, "start_task": 0}, "tiers": [tier]}


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("kind", ["lmdb", "zarr"])
def test_swapped_in_samples_are_completed_and_keep_their_salient_pixels(tmp_path, kind):
    x, sal = object_images(200)
    y = np.arange(200) % 4
    with CarouselMemory.from_dict(saliency_config(tmp_path, kind=kind)) as mem:
        ids = mem.add(torch.from_numpy(x), torch.from_numpy(y), 0, saliency=torch.from_numpy(sal)).numpy()
        mem.flush()
        for _ in range(40):  # replay and observe: the engine swaps stored (compressed) samples in
            b = mem.sample(16)
            mem.observe(b.ids, logits=torch.randn(len(b), 4))
        wait_for(lambda: mem.stats()["swapped_in"] >= 20)
        mem.checkpoint()
        b = mem.sample(32, seed=0)
        keep = (np.rint(sal * 255) >= mem.codec._threshold)[:, None]
        swapped = 0
        for i, xi in zip(b.ids.numpy(), b.x.numpy()):
            src = int(np.flatnonzero(ids == i)[0])
            np.testing.assert_array_equal(xi[keep[src]], x[src][keep[src]])
            swapped += not np.array_equal(xi, x[src])  # came back from storage: completed, not raw
        assert swapped > 0
        st = mem.stats()["tiers"][f"0-{kind}"]
        assert st["samples"] == 200
        assert st["record_bytes"] < 200 * 794 / 2  # what the budget counts: under half of raw
        assert mem.registry.get_sample_value("carousel_codec_seconds_total", {"op": "decode"}) > 0


def test_a_byte_budget_holds_over_twice_the_samples_when_compressed(tmp_path):
    x, sal = object_images(1500)
    y = np.arange(1500) % 5
    held = {}
    for kind in ("plain", "saliency"):
        cfg = saliency_config(tmp_path / kind, capacity="100KiB", em=8, ratio=0.0)
        cfg["memory"]["kind"] = kind
        extra = {"saliency": torch.from_numpy(sal)} if kind == "saliency" else {}
        with CarouselMemory.from_dict(cfg) as mem:
            for lo in range(0, 1500, 100):
                mem.add(torch.from_numpy(x[lo:lo + 100]), torch.from_numpy(y[lo:lo + 100]), 0,
                        **{k: v[lo:lo + 100] for k, v in extra.items()})
            mem.flush()
            st = mem.stats()["tiers"]["0-lmdb"]
            held[kind] = st["samples"]
            if kind == "saliency":
                assert st["record_bytes"] <= 100 * 1024
                assert mem.registry.get_sample_value("carousel_capacity_bytes", {"tier": "0-lmdb"}) == 100 * 1024
    assert held["plain"] <= 100 * 1024 // 794 + 8  # (+ the EM's samples, which never leave the last tier)
    assert held["saliency"] >= 2 * held["plain"], held


def test_record_sizes_survive_a_restart_with_or_without_the_checkpoint(tmp_path):
    x, sal = object_images(300)
    cfg = saliency_config(tmp_path, capacity="60KiB")
    with CarouselMemory.from_dict(cfg) as mem:
        mem.add(torch.from_numpy(x), torch.from_numpy(np.arange(300) % 3), 0, saliency=torch.from_numpy(sal))
        mem.flush()
        before = mem.stats()["tiers"]["0-lmdb"]
        assert before["record_bytes"] <= 60 * 1024
    with CarouselMemory.from_dict(cfg) as mem:
        assert mem.stats()["tiers"]["0-lmdb"]["record_bytes"] == before["record_bytes"]
        assert mem.recovered["labels_read"] == 0
    state = next(tmp_path.glob("*-state"))
    (state / "em-state.npz").unlink()
    with CarouselMemory.from_dict(cfg) as mem:  # sizes read back from the records themselves
        assert mem.stats()["tiers"]["0-lmdb"]["record_bytes"] == before["record_bytes"]
        assert mem.recovered["labels_read"] == before["samples"]
        assert len(mem.sample(64)) == 32


def test_bad_saliency_input_is_refused_and_changes_nothing(tmp_path):
    x, sal = object_images(4)
    with CarouselMemory.from_dict(saliency_config(tmp_path)) as mem:
        y = torch.zeros(4, dtype=torch.int64)
        with pytest.raises(MemoryInputError, match="missing \\['saliency'\\]"):
            mem.add(torch.from_numpy(x), y, 0)
        with pytest.raises(MemoryInputError, match="saliency"):
            mem.add(torch.from_numpy(x), y, 0, saliency=torch.zeros(4, 27, 28))
        with pytest.raises(MemoryInputError, match=r"\[0, 1\]"):
            mem.add(torch.from_numpy(x), y, 0, saliency=torch.full((4, 28, 28), 1.5))
        with pytest.raises(MemoryInputError, match="0..255"):
            mem.add(torch.from_numpy(x), y, 0, saliency=torch.full((4, 28, 28), 300, dtype=torch.int32))
        assert mem.stats()["added"] == 0
        ids = mem.add(torch.from_numpy(x), y, 0, saliency=torch.from_numpy(np.rint(sal * 255).astype(np.uint8)))
        assert ids.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("change, key", [
    (lambda c: c.pop("tiers"), "memory.kind"),
    (lambda c: c["tiers"][0].pop("codec"), "tiers[0].codec"),
    (lambda c: c["memory"].update(sample_shape=[784]), "memory.kind"),
    (lambda c: c["memory"]["saliency"].update(theta=1.5), "memory.saliency.theta"),
    (lambda c: c["memory"]["saliency"].update(thetta=0.5), "memory.saliency.thetta"),
    (lambda c: c["memory"].update(extras={"saliency": {"shape": [28, 28], "dtype": "uint8"}}),
     "memory.extras.saliency"),
])
def test_config_errors_name_the_key(tmp_path, change, key):
    cfg = saliency_config(tmp_path)
    change(cfg)
    with pytest.raises(ConfigError) as err:
        CarouselMemory.from_dict(cfg)
    assert err.value.key == key, err.value


def test_config_round_trips_through_toml(tmp_path):
    from carousel.config import CarouselConfig, load_config
    from carousel.toml_write import dump_toml
    cfg = CarouselConfig.from_dict(saliency_config(tmp_path, theta=0.35))
    path = tmp_path / "m.toml"
    path.write_text(dump_toml(cfg.to_dict()))
    again = load_config(path)
    assert again == cfg and again.memory.saliency.theta == 0.35
    assert again.tiers[0].url().endswith("&codec=zstd")


def test_saliency_memory_through_the_daemon_and_its_restart(tmp_path):
    import carousel
    from tests.daemon.harness import start_daemon
    x, sal = object_images(120)
    y = np.arange(120) % 3
    memory = {"em_size": 24, "sample_shape": list(SHAPE), "kind": "saliency"}
    tiers = [{"kind": "lmdb", "path": str(tmp_path / "flash"), "capacity": "40KiB", "codec": "zstd"}]
    d = start_daemon(tmp_path, memory=memory, tiers=tiers, swap={"start_task": 0}, metrics=False)
    try:
        client = carousel.connect(d.socket)
        client.add(x[:60], y[:60], 0, saliency=sal[:60])  # float maps, quantized by the memory
        client.add(x[60:], y[60:], 0, saliency=np.rint(sal[60:] * 255).astype(np.uint8))
        client.flush()
        with pytest.raises(carousel.MemoryInputError, match="saliency"):
            client.add(x[:2], y[:2], 0)
        for _ in range(20):
            b = client.sample(8)
            client.observe(b.ids, logits=torch.randn(len(b), 3))
        st = client.stats()["tiers"]["0-lmdb"]
        assert st["record_bytes"] <= 40 * 1024 and st["samples"] >= 24
        client.close()
    finally:
        assert d.stop() == 0
    d = start_daemon(tmp_path, memory=memory, tiers=tiers, swap={"start_task": 0}, metrics=False)
    try:
        client = carousel.connect(d.socket)
        assert client.stats()["tiers"]["0-lmdb"]["record_bytes"] == st["record_bytes"]
        b = client.sample(24, seed=0)
        assert len(b) == 24 and b.x.dtype == torch.uint8 and tuple(b.x.shape[1:]) == SHAPE
        client.close()
    finally:
        assert d.stop() == 0


def test_codes_decode_by_their_own_header_after_the_config_changes():
    x, sal = object_images(6)
    with_thumb = SaliencyCodec(FIELDS, theta=0.5, thumbnail=4, background_bits=0)
    without = SaliencyCodec(FIELDS, theta=0.5, thumbnail=0, background_bits=2)
    a, b = with_thumb.encode(batch(x[:3], sal[:3])), without.encode(batch(x[3:], sal[3:]))
    mixed = {k: np.concatenate([a[k], b[k]]) for k in a}
    for reader in (with_thumb, without):  # either config reads both kinds of code, even in one batch
        got = reader.decode(mixed)["x"]
        np.testing.assert_array_equal(got[:3], with_thumb.decode(a)["x"])
        np.testing.assert_array_equal(got[3:], without.decode(b)["x"])
