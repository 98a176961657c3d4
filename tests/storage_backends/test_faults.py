"""Faults and bad input (RELIABILITY.md, faults 5-8 and 17): a typed error, nothing stored lost.

Full map and full disk, read-only directories and file systems, flipped bytes in records, truncated
and damaged files, missing stores, a second writer, and every kind of malformed request. Each test
asserts the typed error *and* that the store is exactly what it was before (same ids, same bytes)
and still usable.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from storage_backends import (
    CorruptRecordError,
    CorruptStoreError,
    InvalidURLError,
    MissingIdsError,
    SchemaError,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreNotFoundError,
    StorePermissionError,
    open_store,
    row_manifest,
)
from tests.storage_backends.crash_records import fields

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = {"x": ((3, 32, 32), "uint8"), "y": ((), "int64"), "task": ((), "int16")}
REC_NBYTES = 3 * 32 * 32 + 8 + 2
NOBODY = 65534



def batch(b, n=64):
    """Batch ``b``: ids ``[b * n, (b + 1) * n)`` and their records."""
    ids = np.arange(b * n, (b + 1) * n, dtype=np.int64)
    return ids, fields(ids, b)


# Child scripts get the very same functions.
FIELDS_SRC = "\n" + inspect.getsource(fields) + "\n\n" + inspect.getsource(batch) + "\n"

FLAVOURS = {  # URL query per store flavour
    "lmdb": ("lmdb", ""),
    "lmdb-sync0": ("lmdb", "sync=0"),
    "zarr": ("zarr", "chunk=16&codec=none"),
    "zarr-zstd": ("zarr", "chunk=16&codec=zstd&sync=0"),
    "flat": ("flat", "chunk=16"),
    "flat-sync0": ("flat", "chunk=16&sync=0"),
    "files": ("files", "chunk=16"),
    "files-sync0": ("files", "chunk=16&sync=0&codec=zstd"),
}


def make_url(path: Path, flavour: str, extra: str = "") -> str:
    scheme, query = FLAVOURS[flavour]
    q = "&".join(p for p in (query, extra) if p)
    return f"{scheme}://{path}" + (f"?{q}" if q else "")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_child(src: str, *args: str, tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    script = tmp_path / f"child_{abs(hash(src)) % 10**8}.py"
    script.write_text("import numpy as np\n" + FIELDS_SRC + src)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env=child_env(), timeout=timeout)


def filled(url: str, n_batches: int = 3):
    """Create a store with ``n_batches`` batches of 64 records; return ``(ids, fields)`` written."""
    all_ids, all_fields = [], []
    with open_store(url, SCHEMA) as store:
        for b in range(n_batches):
            ids, f = batch(b)
            store.put_many(ids, f)
            all_ids.append(ids)
            all_fields.append(f)
    return np.concatenate(all_ids), {k: np.concatenate([f[k] for f in all_fields]) for k in SCHEMA}


def state(store) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    ids = store.ids()
    assert len(store) == ids.size
    return ids, store.get_many(ids)


def assert_records(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert np.array_equal(got[name], want[name]), f"field {name!r} differs"


def assert_store_holds(url: str, ids: np.ndarray, want: dict[str, np.ndarray]) -> None:
    """Reopen with the URL only: exactly ``ids`` (any order given), with exactly ``want``."""
    with open_store(url) as store:
        got_ids, got = state(store)
    order = np.argsort(ids)
    assert np.array_equal(got_ids, ids[order])
    assert_records(got, {k: v[order] for k, v in want.items()})


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file of a store but the lock files (which hold a pid or reader slots)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name not in ("writer.lock", "lock.mdb")}


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([old ^ 0x5A]))


def find_payload(files, payload: bytes) -> tuple[Path, int]:
    """The one file and offset holding ``payload`` (stored bytes of a record's x)."""
    hits = []
    for path in files:
        data = path.read_bytes()
        pos = data.find(payload)
        while pos >= 0:
            hits.append((path, pos))
            pos = data.find(payload, pos + 1)
    assert len(hits) == 1, f"expected the payload once on disk, found it {len(hits)} times"
    return hits[0]


# ---- 5. full map, full store -----------------------------------------------------------------
@pytest.mark.timeout(60)
def test_lmdb_map_grows_far_past_map_size(tmp_path):
    url = f"lmdb://{tmp_path / 's'}?map_size=64KiB"
    ids, want = filled(url, 30)  # 1,920 records, ~6 MB: ~90x the initial map
    with open_store(url) as store:
        assert store._env.info()["map_size"] >= 6 * 2**20
    assert_store_holds(url, ids, want)


@pytest.mark.timeout(60)
def test_lmdb_max_size_raises_store_full_and_writes_nothing(tmp_path):
    url = f"lmdb://{tmp_path / 's'}?map_size=1MiB&max_size=2MiB"
    model_ids, model = [], []
    with open_store(url, SCHEMA) as store:
        for b in range(40):
            ids, f = batch(b)
            try:
                store.put_many(ids, f)
            except StoreFullError as exc:
                assert isinstance(exc, OSError)
                assert "max_size" in str(exc)
                full_at = b
                break
            model_ids.append(ids)
            model.append(f)
        else:
            pytest.fail("40 batches (8 MB) fit under max_size=2MiB")
        assert full_at >= 2
        failed = np.arange(full_at * 64, (full_at + 1) * 64)
        assert not store.contains(failed).any(), "part of the failed batch is visible"
        ids = np.concatenate(model_ids)
        want = {k: np.concatenate([f[k] for f in model]) for k in SCHEMA}
        assert len(store) == ids.size
        assert_records(store.get_many(ids), want)

        # A replace of many existing records does not fit either: the old bytes must survive.
        big = np.arange(0, min(ids.size, 192))
        with pytest.raises(StoreFullError):
            store.put_many(big, fields(big, 777))
        assert_records(store.get_many(ids), want)

        # Deleting frees pages: a smaller put then fits.
        store.delete_many(ids[:128])
        small_ids, small = np.arange(100_000, 100_032), fields(np.arange(100_000, 100_032), 5)
        store.put_many(small_ids, small)
        assert_records(store.get_many(small_ids), small)
    keep = ids[128:]
    assert_store_holds(url, np.concatenate([keep, small_ids]),
                       {k: np.concatenate([want[k][128:], small[k]]) for k in SCHEMA})


FILL_SRC = r'''
import json, os, resource, signal, sys
from storage_backends import StoreFullError, open_store

SCHEMA = {"x": ((3, 32, 32), "uint8"), "y": ((), "int64"), "task": ((), "int16")}
url, limit, ballast = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if limit:
    # Writes past the limit fail with EFBIG (SIGXFSZ ignored) as on a full disk with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
store = open_store(url, SCHEMA)
report = {"full_at": None}
for b in range(2000):
    ids, f = batch(b)
    try:
        store.put_many(ids, f)
    except StoreFullError as exc:
        report.update(full_at=b, oserror=isinstance(exc, OSError), msg=str(exc))
        break
if report["full_at"] is not None:
    b = report["full_at"]
    report["failed_visible"] = int(store.contains(np.arange(b * 64, (b + 1) * 64)).sum())
    report["len"] = len(store)
    acked = np.arange(b * 64)
    got = store.get_many(acked)
    parts = [batch(i) for i in range(b)]
    report["intact"] = all(np.array_equal(got[k], np.concatenate([p[1][k] for p in parts])) for k in SCHEMA)
    # Space comes back (the ballast is deleted, the limit lifted): the same batch now fits.
    if ballast:
        os.unlink(ballast)
    if limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    ids, f = batch(b)
    store.put_many(ids, f)
    report["after_free"] = bool(np.array_equal(store.get_many(ids)["x"], f["x"]))
store.close()
print(json.dumps(report))
'''


# (tmpfs size, ballast bytes) per scheme: the store fills the tmpfs after a batch or more, and
# deleting the ballast frees room for the batch that met the full disk. The flat store allocates
# rows.bin 1,024 rows (3 MiB of these records) at a time, then doubles it: on 8 MiB with 2.5 MiB of
# ballast the first allocation fits and the second (6 MiB) only once the ballast is gone.
TMPFS = {"lmdb": ("3m", 640 * 1024), "zarr": ("3m", 640 * 1024), "flat": ("8m", 5 * 512 * 1024),
         "files": ("3m", 640 * 1024)}
# RLIMIT_FSIZE per scheme: the Zarr store meets it in its manifest journal (chunk files stay
# smaller), the LMDB store in data.mdb, the flat store when rows.bin doubles from 3 to 6 MiB, the
# files store in its manifest journal (~1.3 KB a batch; each file holds one record).
RLIMIT = {"lmdb": 2**20, "zarr": 96 * 1024, "flat": 4 * 2**20, "files": 16 * 1024}


@pytest.fixture
def small_fs(request, tmp_path):
    """``(directory, RLIMIT_FSIZE or 0, ballast file or "")`` that runs out of space quickly
    for the test's ``flavour``."""
    scheme = FLAVOURS[request.node.callspec.params["flavour"]][0]
    if request.param == "rlimit":
        d = tmp_path / "fs"
        d.mkdir()
        yield d, RLIMIT[scheme], ""
        return
    d = tmp_path / "fs"
    d.mkdir()
    size, ballast_bytes = TMPFS[scheme]
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}); the rlimit variant covers the case")
    try:
        ballast = d / "ballast"
        ballast.write_bytes(os.urandom(ballast_bytes))
        yield d, 0, str(ballast)
    finally:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("small_fs", ["tmpfs", "rlimit"], indirect=True)
@pytest.mark.parametrize("flavour", ["lmdb", "lmdb-sync0", "zarr", "zarr-zstd", "flat", "flat-sync0", "files",
                                     "files-sync0"])
def test_full_disk_raises_store_full_and_loses_nothing(tmp_path, small_fs, flavour):
    d, limit, ballast = small_fs  # on the tmpfs every store meets ENOSPC wherever it comes
    url = make_url(d / "store", flavour)
    r = run_child(FILL_SRC, url, str(limit), ballast, tmp_path=tmp_path)
    assert r.returncode == 0, f"rc {r.returncode}: {r.stderr[-4000:]}"
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["full_at"] is not None, "the store never filled up"
    b = report["full_at"]
    assert b >= 1, report
    assert report["oserror"], report
    assert report["failed_visible"] == 0, f"part of the batch that met the full disk is visible: {report}"
    assert report["len"] == b * 64, report
    assert report["intact"], "records acknowledged before the disk filled read back wrong"
    assert report["after_free"], report
    parts = [batch(i) for i in range(b + 1)]
    assert_store_holds(url, np.concatenate([p[0] for p in parts]),
                       {k: np.concatenate([p[1][k] for p in parts]) for k in SCHEMA})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fail_at", ["snapshot", "new journal"])
@pytest.mark.parametrize("flavour", ["zarr", "flat"])  # the stores with a row manifest (the files store shares theirs)
def test_manifest_compaction_meeting_a_full_disk_fails_no_call_and_loses_nothing(tmp_path, monkeypatch, fail_at,
                                                                                 flavour):
    """A manifest compaction runs after the call's journal entry is durable. If it meets a full
    disk the call has still succeeded (raising would report "nothing was written" for a visible
    batch), and the old snapshot and journal must stay in charge: a half-made generation left on
    disk would win at the next open and hide every entry appended after it."""
    url = make_url(tmp_path / "store", flavour)
    schema = {"y": ((), "int64")}
    ids = np.arange(1000)  # 20 kB per journal entry: past the 4 KiB threshold on every call
    open_store(url, schema).close()
    monkeypatch.setattr(row_manifest, "COMPACT_MIN_BYTES", 4096)
    enospc = OSError(errno.ENOSPC, "No space left on device")
    if fail_at == "snapshot":
        def write_atomic(path, data):
            raise enospc

        monkeypatch.setattr(row_manifest, "_write_atomic", write_atomic)
    else:
        real_open = os.open

        def os_open(path, flags, mode=0o777, **kw):
            if Path(path).name.startswith("journal-") and flags & os.O_TRUNC:
                raise enospc
            return real_open(path, flags, mode, **kw)

        monkeypatch.setattr(os, "open", os_open)
    with open_store(url) as store:
        for v in range(6):
            store.put_many(ids, {"y": ids * 100 + v})
            assert np.array_equal(store.get_many(ids)["y"], ids * 100 + v)
        store.delete_many(ids[:10])
    monkeypatch.undo()  # space is back
    manifest = tmp_path / "store" / "manifest"
    assert sorted(p.name for p in manifest.iterdir()) == \
        ["journal-00000000000000000001.log", "snapshot-00000000000000000001.bin"]
    with open_store(url) as store:
        assert np.array_equal(store.ids(), ids[10:])
        assert np.array_equal(store.get_many(ids[10:])["y"], ids[10:] * 100 + 5)


# ---- 8. read-only directory and file system ------------------------------------------------------
NOBODY_SRC = r'''
import hashlib, os, sys
from pathlib import Path
from storage_backends import StorePermissionError, open_store

SCHEMA = {"x": ((3, 32, 32), "uint8"), "y": ((), "int64"), "task": ((), "int16")}
url, store_dir, scratch = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

def digest():
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(store_dir.rglob("*")) if p.is_file()}

def chmod_tree(writable):
    for p in [store_dir, *store_dir.rglob("*")]:
        if p.is_dir():
            p.chmod(0o700 if writable else 0o500)
        else:
            p.chmod(0o600 if writable else 0o400)

def read_all(store):
    ids = store.ids()
    return ids, store.get_many(ids)

def same(a, b):
    assert np.array_equal(a[0], b[0])
    for k in SCHEMA:
        assert np.array_equal(a[1][k], b[1][k]), k

if os.geteuid() == 0:
    # Warm up as root (zarr and numcodecs import lazily), then become nobody for good: the
    # interpreter may live where nobody cannot exec it (here: under /root, mode 0700), so
    # subprocess's user= is not an option.
    with open_store(url.replace(str(store_dir), str(scratch / "warm")), SCHEMA) as s:
        ids, f = batch(0, 4)
        s.put_many(ids, f)
        s.get_many(ids)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    try:
        (scratch / "probe").write_bytes(b"")  # root-owned 0700 directory
    except PermissionError:
        pass
    else:
        raise SystemExit("still able to write as root after dropping privileges")
print("uid", os.getuid(), flush=True)

with open_store(url, SCHEMA) as s:
    for b in range(2):
        s.put_many(*batch(b))
    before = read_all(s)
chmod_tree(writable=False)
files = digest()

try:
    open_store(url)
except StorePermissionError as exc:
    print("rw-open:", exc, flush=True)
else:
    raise SystemExit("opened a read-only store for writing")
assert digest() == files, "a refused open changed files"

with open_store(url + ("&" if "?" in url else "?") + "mode=ro") as ro:
    same(read_all(ro), before)
    ids, f = batch(5)
    try:
        ro.put_many(ids, f)
    except StorePermissionError:
        pass
    else:
        raise SystemExit("put_many on a mode=ro store did not raise")
    try:
        ro.delete_many(before[0][:3])
    except StorePermissionError:
        pass
    else:
        raise SystemExit("delete_many on a mode=ro store did not raise")
    same(read_all(ro), before)
assert digest() == files, "reading a read-only store changed files"

if url.startswith(("zarr", "files")):
    # The permission changes while the store is open for writing: the chunk (or record file) write
    # fails. (The LMDB and flat stores write through files they opened before: nothing to refuse them.)
    chmod_tree(writable=True)
    with open_store(url) as s:
        chmod_tree(writable=False)
        ids, f = batch(6)
        try:
            s.put_many(ids, f)
        except StorePermissionError as exc:
            print("runtime:", exc, flush=True)
        else:
            raise SystemExit("a put into a directory made read-only did not raise")
        assert not s.contains(ids).any()
        same(read_all(s), before)
    chmod_tree(writable=True)
    with open_store(url) as s:
        same(read_all(s), before)
print("OK", flush=True)
'''


@pytest.fixture
def nobody_dir():
    """A directory owned by nobody outside pytest's 0700 tmp tree (nobody must reach it)."""
    d = Path(tempfile.mkdtemp(prefix="carousel-ro-"))
    if os.geteuid() == 0:  # otherwise permission bits bind us already
        d.chmod(0o755)
        os.chown(d, NOBODY, NOBODY)
    scratch = Path(tempfile.mkdtemp(prefix="carousel-root-"))
    try:
        yield d, scratch
    finally:
        for p in (d, scratch):
            for sub in [p, *p.rglob("*")]:
                if sub.is_dir():
                    sub.chmod(0o700)
            shutil.rmtree(p, ignore_errors=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flavour", ["lmdb", "zarr", "flat", "files"])
def test_read_only_directory_gives_permission_error_and_ro_mode_reads(tmp_path, nobody_dir, flavour):
    d, scratch = nobody_dir
    store_dir = d / "store"
    url = make_url(store_dir, flavour)
    r = run_child(NOBODY_SRC, url, str(store_dir), str(scratch), tmp_path=tmp_path)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("OK"), f"{r.stdout}\n{r.stderr[-4000:]}"
    if os.geteuid() == 0:
        assert "uid 65534" in r.stdout
    assert "rw-open:" in r.stdout and str(store_dir) in r.stdout  # the error names the store


@pytest.fixture
def ro_bind_mount(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    dst.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root); the nobody test covers permission bits")
    try:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        yield src, dst
    finally:
        if subprocess.run(["umount", str(dst)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(dst)], capture_output=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flavour", ["lmdb", "zarr", "flat", "files"])
def test_read_only_file_system_gives_permission_error_and_ro_mode_reads(ro_bind_mount, flavour):
    src, dst = ro_bind_mount
    ids, want = filled(make_url(src / "store", flavour), 2)
    files = tree_digest(src / "store")
    with pytest.raises(StorePermissionError, match="mode=ro"):
        open_store(make_url(dst / "store", flavour))  # even root cannot write here (EROFS)
    with open_store(make_url(dst / "store", flavour, "mode=ro")) as ro:
        got_ids, got = state(ro)
        assert np.array_equal(got_ids, ids)
        assert_records(got, want)
        with pytest.raises(StorePermissionError):
            ro.put_many(*batch(9))
    assert tree_digest(src / "store") == files


# ---- 7. flipped bytes in records; damaged chunks ------------------------------------------------
def damage_record(store_dir: Path, flavour: str, x_bytes: bytes, where: str) -> None:
    """Flip a byte of the record whose x is ``x_bytes``: in its x, or in its CRC-32C trailer (or,
    for the files store, remove its file)."""
    scheme = FLAVOURS[flavour][0]
    if scheme == "files":  # one file per record: the record's bytes (x first), then its CRC-32C
        path, off = find_payload(sorted((store_dir / "data").rglob("*.rec")), x_bytes)
        if where == "missing":
            path.unlink()
        else:
            flip_byte(path, off + {"x": 1500, "trailer": REC_NBYTES + 2}[where])
    elif scheme == "zarr":  # x lives in its own chunk files; the checksums in the manifest
        assert where == "x"
        path, off = find_payload(sorted(p for p in (store_dir / "x" / "c").rglob("*") if p.is_file()), x_bytes)
        flip_byte(path, off + 1500)
    else:
        # An LMDB value and a flat row alike: the record's bytes (x first), then its CRC-32C.
        path, off = find_payload([store_dir / {"lmdb": "data.mdb", "flat": "rows.bin"}[scheme]], x_bytes)
        flip_byte(path, off + {"x": 1500, "trailer": REC_NBYTES + 2}[where])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flavour, where", [("lmdb", "x"), ("lmdb", "trailer"), ("zarr", "x"),
                                            ("flat", "x"), ("flat", "trailer"), ("files", "x"),
                                            ("files", "trailer"), ("files", "missing")])
def test_flipped_byte_in_a_record_is_detected_and_quarantined(tmp_path, flavour, where):
    store_dir = tmp_path / "store"
    url = make_url(store_dir, flavour)
    ids, want = filled(url, 3)
    victim = 70
    keep = ids != victim
    damage_record(store_dir, flavour, want["x"][victim].tobytes(), where)

    with open_store(url + ("&" if "?" in url else "?") + "mode=ro") as ro:  # detected, left in place
        for request in ([victim], ids):  # never a wrong tensor, alone or in a batch
            with pytest.raises(CorruptRecordError, match=r"\b70\b") as info:
                ro.get_many(request)
            assert info.value.ids.tolist() == [victim]
        assert victim in ro.ids()
        assert ro.quarantined_ids().size == 0

    with open_store(url) as store:
        with pytest.raises(CorruptRecordError, match=r"\b70\b") as info:
            store.get_many([3, victim, 150])
        assert info.value.ids.tolist() == [victim]
        assert isinstance(info.value, StoreError)
        assert store.quarantined_ids().tolist() == [victim]
        assert victim not in store.ids()
        assert len(store) == ids.size - 1
        assert not store.contains([victim])[0]
        with pytest.raises(MissingIdsError):
            store.get_many([victim])
        assert_records(store.get_many(ids[keep]), {k: v[keep] for k, v in want.items()})
    with open_store(url) as store:  # the quarantine is persistent
        assert store.quarantined_ids().tolist() == [victim]
        assert np.array_equal(store.ids(), ids[keep])
        # ... and the store usable: the id can be written afresh
        store.put_many([victim], fields([victim], 42))
        assert_records(store.get_many([victim]), fields([victim], 42))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_damaged_zstd_chunk_gives_corrupt_record_error(tmp_path, damage):
    store_dir = tmp_path / "store"
    url = make_url(store_dir, "zarr-zstd")
    ids, want = filled(url, 3)
    with open_store(url) as store:
        assert store.chunk_rows == 16
        in_chunk = store.get_chunk(4).ids  # chunk 4 of x is the file x/c/4/0/0/0
    assert in_chunk.size == 16
    path = store_dir / "x" / "c" / "4" / "0" / "0" / "0"
    size = path.stat().st_size
    if damage == "flip":
        flip_byte(path, size // 2)
    elif damage == "truncate":
        os.truncate(path, size // 3)
    else:
        path.write_bytes(os.urandom(size))

    with open_store(url) as store:
        with pytest.raises(CorruptRecordError) as info:
            store.get_many(in_chunk)
        bad = info.value.ids
        assert bad.size >= 1 and np.isin(bad, in_chunk).all(), bad
        if damage != "flip":  # the whole chunk is undecodable
            assert np.array_equal(np.sort(bad), np.sort(in_chunk))
        assert np.array_equal(store.quarantined_ids(), np.sort(bad))
        rest = ~np.isin(ids, bad)
        assert np.array_equal(store.ids(), ids[rest])
        assert_records(store.get_many(ids[rest]), {k: v[rest] for k, v in want.items()})


# ---- damaged store files ----------------------------------------------------------------------
TRUNC_OPEN_SRC = r'''
import sys
from storage_backends import open_store
for url in (sys.argv[1], sys.argv[1] + "?mode=ro"):
    try:
        with open_store(url) as s:
            s.get_many(s.ids())
        print("OPENED", flush=True)
    except Exception as exc:
        print(type(exc).__name__, exc, flush=True)
'''


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keep", ["10 bytes", "1 page + 100", "half", "90%"])
def test_truncated_lmdb_file_raises_corrupt_store_not_a_signal(tmp_path, keep):
    store_dir = tmp_path / "store"
    url = f"lmdb://{store_dir}"
    filled(url, 3)
    data = store_dir / "data.mdb"
    size = data.stat().st_size
    os.truncate(data, {"10 bytes": 10, "1 page + 100": 4096 + 100, "half": size // 2, "90%": size * 9 // 10}[keep])
    # In a child: LMDB maps the file, and touching a page past its end would be SIGBUS.
    r = run_child(TRUNC_OPEN_SRC, url, tmp_path=tmp_path, timeout=60)
    assert r.returncode == 0, f"the open died (rc {r.returncode}, {-r.returncode if r.returncode < 0 else ''}" \
                              f" is the signal): {r.stderr[-3000:]}"
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("CorruptStoreError ") for line in lines), r.stdout


def journal_entries(path: Path) -> list[tuple[int, int]]:
    """``(offset, length)`` of each entry of a Zarr manifest journal holding only puts."""
    data = path.read_bytes()
    out, off = [], 0
    while off < len(data):
        magic, op, n = struct.unpack_from("<2sBxI", data, off)
        assert magic == b"CJ" and op == 1
        out.append((off, 12 + 20 * n))
        off += 12 + 20 * n
    return out


def journal_of(store_dir: Path) -> Path:
    (path,) = sorted((store_dir / "manifest").glob("journal-*.log"))
    return path


@pytest.mark.timeout(60)
def test_torn_last_journal_entry_drops_only_the_last_batch(tmp_path):
    store_dir = tmp_path / "store"
    url = make_url(store_dir, "zarr")
    ids, want = filled(url, 4)
    journal = journal_of(store_dir)
    entries = journal_entries(journal)
    assert len(entries) == 4
    os.truncate(journal, journal.stat().st_size - 5)
    keep = ids < 3 * 64
    assert_store_holds(url, ids[keep], {k: v[keep] for k, v in want.items()})
    assert journal.stat().st_size == entries[-1][0]  # the torn tail was cut off
    with open_store(url) as store:  # and appending goes on cleanly after it
        store.put_many(*batch(7))
    more = np.concatenate([ids[keep], batch(7)[0]])
    assert_store_holds(url, more, {k: np.concatenate([v[keep], batch(7)[1][k]]) for k, v in want.items()})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("at", ["magic", "op", "count", "checksum", "payload"])
def test_damaged_middle_journal_entry_is_corrupt_store(tmp_path, at):
    store_dir = tmp_path / "store"
    url = make_url(store_dir, "zarr")
    filled(url, 4)
    journal = journal_of(store_dir)
    off, length = journal_entries(journal)[1]
    flip_byte(journal, off + {"magic": 0, "op": 2, "count": 5, "checksum": 9, "payload": 100}[at])
    files = tree_digest(store_dir)
    for u in (url, url + "&mode=ro"):
        with pytest.raises(CorruptStoreError, match="journal"):
            open_store(u)
    # Acknowledged batches after the damage must not be cut away by the refused open.
    assert tree_digest(store_dir) == files
    assert journal.stat().st_size == 4 * length


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "not-carousel", "array-json"])
def test_corrupt_zarr_json_raises_store_error_and_releases_the_lock(tmp_path, damage):
    store_dir = tmp_path / "store"
    url = make_url(store_dir, "zarr")
    ids, want = filled(url, 2)
    target = store_dir / ("x/zarr.json" if damage == "array-json" else "zarr.json")
    good = target.read_bytes()
    target.write_bytes({"garbage": b"{{{ not json", "empty": b"", "truncated": good[: len(good) // 2],
                        "not-carousel": good.replace(b"carousel-zarr", b"somebody-else"),
                        "array-json": b"[1, 2"}[damage])
    for u in (url, url + "&mode=ro"):
        with pytest.raises(StoreError) as info:
            open_store(u)
        assert isinstance(info.value, CorruptStoreError), repr(info.value)
    target.write_bytes(good)  # repaired: the failed opens left no lock behind
    assert_store_holds(url, ids, want)


# ---- missing store -------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", ["lmdb", "zarr", "flat", "files"])
def test_missing_store(tmp_path, flavour):
    missing = tmp_path / "nope" / "store"
    with pytest.raises(StoreNotFoundError) as info:
        open_store(make_url(missing, flavour))
    assert isinstance(info.value, FileNotFoundError)
    assert str(missing) in str(info.value)
    with pytest.raises(StoreNotFoundError):
        open_store(make_url(missing, flavour, "mode=ro"), SCHEMA)  # ro never creates
    assert not (tmp_path / "nope").exists(), "a failed open created directories"


# ---- 17. one writer per store ---------------------------------------------------------------------
HOLD_SRC = r'''
import sys
from storage_backends import open_store
store = open_store(sys.argv[1])
print("HOLDING", flush=True)
sys.stdin.readline()
store.close()
print("CLOSED", flush=True)
'''


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flavour", ["lmdb", "zarr", "flat", "files"])
def test_second_writer_is_refused_naming_the_holder(tmp_path, flavour):
    url = make_url(tmp_path / "store", flavour)
    ids, want = filled(url, 1)
    script = tmp_path / "hold.py"
    script.write_text(HOLD_SRC)
    holder = subprocess.Popen([sys.executable, str(script), url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        assert holder.stdout.readline().strip() == "HOLDING", holder.stderr.read()
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            open_store(url)
        if flavour == "lmdb":  # MVCC: readers never wait for the writer
            with open_store(make_url(tmp_path / "store", flavour, "mode=ro")) as ro:
                assert_records(ro.get_many(ids), want)
        else:  # the Zarr, flat and files readers share the lock: refused while a writer holds it
            with pytest.raises(StoreLockedError):
                open_store(make_url(tmp_path / "store", flavour, "mode=ro"))
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "CLOSED"
        assert holder.wait(30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with open_store(url) as store:
        store.put_many(*batch(1))
    assert_store_holds(url, np.concatenate([ids, batch(1)[0]]),
                       {k: np.concatenate([want[k], batch(1)[1][k]]) for k in SCHEMA})


@pytest.mark.parametrize("flavour", ["lmdb", "zarr", "flat", "files"])
def test_second_writer_in_the_same_process_is_refused(tmp_path, flavour):
    url = make_url(tmp_path / "store", flavour)
    ids, want = filled(url, 1)
    with open_store(url) as first:
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            open_store(url)
        first.put_many(*batch(1))  # the refused open did not disturb the first handle's lock
        with pytest.raises(StoreLockedError):
            open_store(url)
    with open_store(url) as again:
        assert len(again) == 128
    with pytest.raises(StoreClosedError):
        first.get_many(ids)


# ---- bad input -----------------------------------------------------------------------------------
def _bad_puts():
    ids = np.arange(500, 504)
    good = fields(ids, 3)

    def with_(**kw):
        return {**good, **kw}

    return {
        "x wrong shape": (ids, with_(x=np.zeros((4, 3, 32, 31), np.uint8)), SchemaError),
        "x wrong batch size": (ids, with_(x=np.zeros((5, 3, 32, 32), np.uint8)), SchemaError),
        "x float64 into uint8": (ids, with_(x=good["x"].astype(np.float64)), SchemaError),
        "task out of int16 range": (ids, with_(task=np.array([1, 2, 40000, 3])), SchemaError),
        "task below int16 range": (ids, with_(task=np.array([1, 2, -40000, 3])), SchemaError),
        "y float with fraction": (ids, with_(y=np.array([1.5, 2, 3, 4])), SchemaError),
        "missing field": (ids, {"x": good["x"], "y": good["y"]}, SchemaError),
        "extra field": (ids, with_(z=np.zeros(4)), SchemaError),
        "duplicate ids": (np.array([500, 501, 501, 503]), good, SchemaError),
        "negative id": (np.array([500, -1, 502, 503]), good, SchemaError),
        "2-D ids": (ids.reshape(2, 2), good, SchemaError),
        "float ids": (ids.astype(np.float64), good, SchemaError),
        "huge uint64 id": (np.array([500, 2**63, 502, 503], dtype=np.uint64), good, SchemaError),
        "fields not a mapping": (ids, [good["x"], good["y"], good["task"]], SchemaError),
    }


BAD_PUTS = _bad_puts()


@pytest.fixture(params=["lmdb", "zarr", "flat", "files"])
def small_store(request, tmp_path):
    url = make_url(tmp_path / "store", request.param)
    ids, want = filled(url, 2)
    with open_store(url) as store:
        yield store, ids, want, url


@pytest.mark.parametrize("case", list(BAD_PUTS))
def test_bad_put_raises_schema_error_and_changes_nothing(small_store, case):
    store, ids, want, url = small_store
    bad_ids, bad_fields, error = BAD_PUTS[case]
    files = tree_digest(store.path)
    with pytest.raises(error) as info:
        store.put_many(bad_ids, bad_fields)
    assert isinstance(info.value, ValueError) and isinstance(info.value, StoreError)
    assert np.array_equal(store.ids(), ids)
    assert not store.contains(np.arange(500, 504)).any()
    assert_records(store.get_many(ids), want)
    assert tree_digest(store.path) == files, "a rejected call touched the files"
    good_ids = np.arange(500, 504)
    store.put_many(good_ids, fields(good_ids, 3))  # still usable
    assert_records(store.get_many(good_ids), fields(good_ids, 3))


def test_bad_reads_and_deletes_raise_typed_errors_and_change_nothing(small_store):
    store, ids, want, url = small_store
    with pytest.raises(MissingIdsError) as info:
        store.get_many([1, 999, 5, 1000])
    assert isinstance(info.value, KeyError)
    assert info.value.ids.tolist() == [999, 1000] and "999" in str(info.value)
    with pytest.raises(MissingIdsError):
        store.delete_many([1, 2, 999])  # one unknown id: nothing is deleted
    with pytest.raises(SchemaError):
        store.delete_many([1, 2, 2])
    with pytest.raises(SchemaError):
        store.get_many([[1, 2]])
    with pytest.raises(SchemaError):
        store.contains([-3])
    assert np.array_equal(store.ids(), ids)
    assert_records(store.get_many(ids), want)
    assert store.get_many([5, 5])["y"].tolist() == [want["y"][5]] * 2  # repeats are fine for reads


BAD_URLS = [
    *[f"{scheme}://{{path}}?{query}" for scheme in ("lmdb", "zarr", "flat", "files") for query in
      ("bogus=1", "synch=1", "sync=1&sync=0", "sync=maybe", "mode=rx")],
    "s3://{path}",  # unknown scheme
    "{path}",  # no scheme
    "lmdb://{path}?map_size=lots",
    "lmdb://{path}?max_size=-1",
    "lmdb://{path}?flush_s=soon",
    "zarr://{path}?codec=lz4",
    "zarr://{path}?chunk=0",
    "zarr://{path}?level=99",
    "zarr://{path}?readers=-1",
    "flat://{path}?chunk=0",
    "flat://{path}?chunk=lots",
    "flat://{path}?codec=zstd",  # a Zarr option, unknown to the flat store
    "flat://{path}?map_size=1GiB",  # an LMDB option
    "files://{path}?inflight=0",
    "files://{path}?inflight=lots",
    "files://{path}?layout=tiles",
    "files://{path}?readers=2",  # a Zarr option
]


@pytest.mark.parametrize("template", BAD_URLS)
def test_bad_url_raises_invalid_url_error_and_creates_nothing(tmp_path, template):
    url = template.format(path=tmp_path / "new")
    with pytest.raises(InvalidURLError) as info:
        open_store(url, SCHEMA)
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "new").exists(), "a rejected URL created the store directory"


@pytest.mark.parametrize("flavour", ["lmdb", "zarr", "flat", "files"])
def test_bad_url_on_existing_store_and_schema_mismatch_change_nothing(tmp_path, flavour):
    url = make_url(tmp_path / "store", flavour)
    ids, want = filled(url, 1)
    files = tree_digest(tmp_path / "store")
    with pytest.raises(InvalidURLError):
        open_store(url + ("&" if "?" in url else "?") + "bogus=1")
    with pytest.raises(SchemaError):
        open_store(url, {**SCHEMA, "task": ((), "int32")})
    with pytest.raises(SchemaError):
        open_store(url, {"x": SCHEMA["x"], "y": SCHEMA["y"]})
    assert tree_digest(tmp_path / "store") == files
    assert_store_holds(url, ids, want)  # and no lock was left behind

