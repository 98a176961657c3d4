"""ImageFolderStore on folders written here: ImageFolder's listing rules, the read contract,
channel conversions, quarantine of unusable images (in memory only), read-only refusals."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import threading

import numpy as np
import pytest

from storage_backends import (
    CorruptRecordError,
    InvalidURLError,
    MissingIdsError,
    SchemaError,
    StoreNotFoundError,
    StorePermissionError,
    open_store,
)
from storage_backends.image_folder import ImageFolderStore
from storage_backends.png import encode_png
from storage_backends.url import parse_url

GRAY = {"x": ((6, 5), "uint8"), "y": ((), "int64"), "task": ((), "int16")}


def image(label: int, i: int, channels: int = 1) -> np.ndarray:
    """A distinct image per (label, i): its pixels tell which it is."""
    base = np.full((6, 5), 40 * label + i, np.uint8)
    base[0, 0] = 7 * i + 1
    return base if channels == 1 else np.stack([base, base + 1, base + 2][:channels], axis=2)


@pytest.fixture
def folder(tmp_path):
    """b_cls and a_cls (listed a, b), a nested folder and an upper-case ending in a_cls, c_cls
    empty but for things that are not images; plus stray files the listing must ignore."""
    root = tmp_path / "data"
    for cls in ("b_cls", "a_cls", "c_cls"):
        (root / cls).mkdir(parents=True)
    for i in range(3):
        (root / "b_cls" / f"{i}.png").write_bytes(encode_png(image(1, i)))
    (root / "a_cls" / "sub").mkdir()
    (root / "a_cls" / "x.PNG").write_bytes(encode_png(image(0, 0)))
    (root / "a_cls" / "sub" / "y.png").write_bytes(encode_png(image(0, 1)))
    (root / "c_cls" / "notes.txt").write_text("not an image")
    (root / "c_cls" / "old.bmp").write_bytes(b"BM")
    (root / "top.png").write_bytes(encode_png(image(5, 9)))  # not in a class folder: ignored
    return root


def url(root, **opts) -> str:
    extra = "".join(f"&{k}={v}" for k, v in opts.items())
    return f"files://{root}?layout=imagefolder&mode=ro{extra}"


def test_listing_ids_labels_and_reads(folder, caplog):
    with caplog.at_level(logging.WARNING, "storage_backends.image_folder"):
        store = open_store(url(folder, classes_per_task=2, chunk=2), GRAY)
    assert "skipped 1 image" in caplog.text and "'c_cls' holds no PNG" in caplog.text
    assert isinstance(store, ImageFolderStore) and store.readonly
    assert store.classes == ["a_cls", "b_cls", "c_cls"] and store.class_to_idx["b_cls"] == 1
    # a_cls/x.PNG, then a_cls/sub/y.png (the walk is by folder), then b_cls/0..2
    assert [p.split("data/")[1] for p in store.path_of(store.ids())] == [
        "a_cls/x.PNG", "a_cls/sub/y.png", "b_cls/0.png", "b_cls/1.png", "b_cls/2.png"]
    assert store.ids().tolist() == [0, 1, 2, 3, 4] and len(store) == 5
    assert store.contains([4, 5, -1 + 1]).tolist() == [True, False, True]
    got = store.get_many([3, 0, 3])  # order kept, repeats repeated
    assert list(got) == ["x", "y", "task"] and got["x"].shape == (3, 6, 5) and got["x"].dtype == np.uint8
    assert got["x"].tolist() == [image(1, 1).tolist(), image(0, 0).tolist(), image(1, 1).tolist()]
    assert got["y"].tolist() == [1, 0, 1] and got["task"].dtype == np.int16
    assert store.get_labels([0, 4]) == {"y": pytest.approx([0, 1]), "task": pytest.approx([0, 0])}
    assert store.chunk_rows == 2 and store.num_chunks() == 3 and store.chunk_of([0, 3, 4]).tolist() == [0, 1, 2]
    chunks = list(store.iter_chunks())
    assert np.concatenate([c.ids for c in chunks]).tolist() == [0, 1, 2, 3, 4]
    assert chunks[1].fields["x"].tolist() == store.get_many([2, 3])["x"].tolist()
    with pytest.raises(MissingIdsError) as err:
        store.get_many([1, 9])
    assert err.value.ids.tolist() == [9]
    assert store.nbytes > 0
    digest = store.listing_digest
    store.close()
    with open_store(url(folder), GRAY) as again:  # the listing is stable across opens
        assert again.listing_digest == digest
        assert again.get_labels([4])["task"].tolist() == [0]  # classes_per_task=0: task 0
    (folder / "a_cls" / "z.png").write_bytes(encode_png(image(0, 2)))
    with open_store(url(folder), GRAY) as changed:
        assert changed.listing_digest != digest and changed.path_of([1])[0].endswith("a_cls/z.png")


def test_many_reads_in_flight_on_the_own_loop_and_on_a_bound_one(tmp_path):
    root = tmp_path / "many"
    for k in range(2):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(60):
            (root / f"c{k}" / f"{i:03d}.png").write_bytes(encode_png(image(k, i % 5)))
    with ImageFolderStore(parse_url(url(root, inflight=4)), None) as store:  # schema inferred: gray (H, W)
        assert store.schema["x"].shape == (6, 5)
        want = store.get_many(np.arange(120))
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        store.bind_loop(loop)  # as the swap engine offers its loop
        try:
            got = store.get_many(np.arange(119, -1, -1))
            assert got["x"].tolist() == want["x"][::-1].tolist()
        finally:
            store.bind_loop(None)
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
        assert store.get_many([5])["x"].tolist() == want["x"][[5]].tolist()  # its own loop again


def test_channels_are_converted_to_the_schema(tmp_path):
    root = tmp_path / "colour"
    (root / "k").mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    (root / "k" / "rgb.png").write_bytes(encode_png(rgb))
    (root / "k" / "rgba.png").write_bytes(encode_png(np.concatenate([rgb, np.full((6, 5, 1), 9, np.uint8)], 2)))
    (root / "k" / "gray.png").write_bytes(encode_png(rgb[:, :, 0]))
    with open_store(url(root)) as store:  # inferred from the first file (gray.png): (H, W)
        assert store.schema["x"].shape == (6, 5)
    with open_store(url(root), {**GRAY, "x": ((3, 6, 5), "uint8")}) as store:
        x = store.get_many([0, 1, 2])["x"]  # gray, rgb, rgba
        assert (x[0] == rgb[:, :, 0]).all()  # gray repeated into every channel
        assert (x[1] == rgb.transpose(2, 0, 1)).all() and (x[2] == x[1]).all()  # alpha dropped
    with open_store(url(root), {**GRAY, "x": ((1, 6, 5), "uint8")}) as store:
        luma = store.get_many([1])["x"][0, 0]
        Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed: its luma is not compared")
        assert luma.tolist() == np.asarray(Image.fromarray(rgb).convert("L")).tolist()


def test_unusable_images_are_quarantined_in_memory_only(folder):
    bad_size = folder / "b_cls" / "1.png"
    bad_size.write_bytes(encode_png(np.zeros((4, 4), np.uint8)))
    broken = folder / "b_cls" / "2.png"
    broken.write_bytes(encode_png(image(1, 2))[:-20])
    before = hashlib.sha256(bad_size.read_bytes() + broken.read_bytes()).hexdigest()
    with open_store(url(folder), GRAY) as store:
        with pytest.raises(CorruptRecordError, match=r"2 image\(s\) cannot be used: \[3, 4\].*4 x 4 pixels") as err:
            store.get_many([2, 3, 4, 0])
        assert err.value.ids.tolist() == [3, 4]
        assert store.ids().tolist() == [0, 1, 2] and len(store) == 3 and store.quarantined_ids().tolist() == [3, 4]
        assert store.contains([3, 2]).tolist() == [False, True]
        assert store.get_many([2, 0])["y"].tolist() == [1, 0]  # the others still read
        with pytest.raises(MissingIdsError):
            store.get_many([4])
        with pytest.raises(CorruptRecordError):  # a chunk holding it fails too, as other stores' do
            open_store(url(folder, chunk=8), GRAY).get_chunk(0)
    assert hashlib.sha256(bad_size.read_bytes() + broken.read_bytes()).hexdigest() == before  # untouched
    with open_store(url(folder), GRAY) as again:
        assert len(again) == 5  # quarantine lasts one open: nothing was written


def test_read_only_and_bad_configurations_are_refused(folder, tmp_path):
    with open_store(url(folder), GRAY) as store:
        with pytest.raises(StorePermissionError):
            store.put_many([9], {"x": np.zeros((1, 6, 5), np.uint8), "y": [0], "task": [0]})
        with pytest.raises(StorePermissionError):
            store.delete_many([0])
        store.flush()  # nothing to do, no error
    with pytest.raises(InvalidURLError, match="read-only"):
        open_store(f"files://{folder}?layout=imagefolder&mode=rw", GRAY)
    with pytest.raises(SchemaError, match=r"\['logits'\]"):
        open_store(url(folder), {**GRAY, "logits": ((3,), "float32")})
    with pytest.raises(SchemaError, match="uint8"):
        open_store(url(folder), {**GRAY, "x": ((6, 5), "float32")})
    with pytest.raises(StoreNotFoundError):
        open_store(url(tmp_path / "nowhere"), GRAY)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(encode_png(image(0, 0)))
    with pytest.raises(StoreNotFoundError, match="no class sub-folders"):
        open_store(url(tmp_path / "flat"), GRAY)


def test_jpeg_images_with_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed: JPEG folders are not read")
    root = tmp_path / "jpg"
    (root / "k").mkdir(parents=True)
    rgb = np.zeros((6, 5, 3), np.uint8) + np.array([200, 100, 50], np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95)
    (root / "k" / "a.jpg").write_bytes(buf.getvalue())
    with open_store(url(root)) as store:
        assert store.schema["x"].shape == (3, 6, 5)
        x = store.get_many([0])["x"][0]
        assert np.abs(x.astype(int) - rgb.transpose(2, 0, 1)).max() <= 8
