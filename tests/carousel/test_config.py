"""carousel.config: TOML in, frozen dataclasses out; every mistake names file, key and reason."""

import doctest
import os
import pickle
import re
import textwrap

import pytest

import carousel.config
from carousel.config import (CarouselConfig, ConfigError, MemoryConfig, SwapConfig, TierConfig, WriteBehindConfig,
                             load_config)
from storage_backends.url import parse_url

EXAMPLE = """\
[memory]
em_size = 500
sample_shape = [3, 32, 32]
dtype = "uint8"
seed = 0
[swap]
ratio = 0.5
policy = "carm"          # swap-out
swap_in = "same_class_random"
workers = 1              # 0 = synchronous
prefetch_depth = 512
[[tiers]]
kind = "lmdb"
path = "/var/lib/carousel/flash"
capacity = 50000         # samples; "4GiB" also accepted
"""

MINIMAL = {"memory": {"em_size": 10, "sample_shape": [4]}}


def write(tmp_path, text, name="carousel.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def with_(section, **values):
    """MINIMAL with one section's keys set."""
    data = {"memory": dict(MINIMAL["memory"])}
    data.setdefault(section, {})
    data[section] = {**data[section], **values}
    return data


def tier(**values):
    return {"kind": "lmdb", "path": "/t/flash", "capacity": 100, **values}


def error(data, source="conf.toml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        CarouselConfig.from_dict(data, source=source)
    exc = info.value
    assert str(exc) == f"{exc.file}: {exc.key}: {exc.reason}"
    assert exc.file == source
    return exc


# -- loading -----------------------------------------------------------------------------------------


def test_example_file_loads(tmp_path):
    cfg = load_config(write(tmp_path, EXAMPLE))
    assert cfg.memory == MemoryConfig(em_size=500, sample_shape=(3, 32, 32), dtype="uint8", seed=0)
    assert cfg.swap.ratio == 0.5 and cfg.swap.policy == "carm" and cfg.swap.swap_in == "same_class_random"
    assert cfg.swap.workers == 1 and cfg.swap.prefetch_depth == 512
    (flash,) = cfg.tiers
    assert flash.kind == "lmdb" and flash.path == "/var/lib/carousel/flash"
    assert flash.capacity_samples == 50000 and flash.capacity_bytes is None
    assert flash.capacity_for(3 * 32 * 32) == 50000
    assert cfg.source == str(tmp_path / "carousel.toml")


def test_defaults():
    cfg = CarouselConfig.from_dict(MINIMAL)
    assert cfg.tiers == ()  # RAM-only baseline
    assert cfg.memory == MemoryConfig(10, (4,), dtype="uint8", seed=0, admission="reservoir", extras={},
                                      state_dir=None)
    assert cfg.swap == SwapConfig(ratio=0.5, policy="carm", swap_in="same_class_random", workers=1,
                                  prefetch_depth=512, start_task=1, adaptive=False, max_lag_steps=4)
    assert cfg.write_behind == WriteBehindConfig(queue_samples=4096, batch=256, block_timeout_s=30.0)
    t = CarouselConfig.from_dict({**MINIMAL, "tiers": [tier()]}).tiers[0]
    assert (t.sync, t.chunk, t.codec, t.eviction, t.class_quota) == (True, 64, "none", "class_balanced", 0)


def test_configs_are_frozen_and_hashable():
    cfg = CarouselConfig.from_dict({"memory": {**MINIMAL["memory"], "extras": {"logits": {"shape": [10],
                                                                                         "dtype": "float32"}}}})
    with pytest.raises(AttributeError):
        cfg.swap.ratio = 0.1
    with pytest.raises(TypeError):
        cfg.memory.extras["more"] = ((), "int8")
    assert hash(cfg) == hash(CarouselConfig.from_dict(cfg.to_dict()))


def test_ints_are_accepted_for_floats():
    cfg = CarouselConfig.from_dict({**with_("swap", ratio=1), "write_behind": {"block_timeout_s": 5}})
    assert cfg.swap.ratio == 1.0 and isinstance(cfg.swap.ratio, float)
    assert isinstance(cfg.write_behind.block_timeout_s, float)


@pytest.mark.parametrize("text, nbytes", [("4GiB", 4 * 2**30), ("64MiB", 64 * 2**20), ("1.5KiB", 1536),
                                          ("1000B", 1000)])
def test_capacity_as_size_is_bytes(text, nbytes):
    t = CarouselConfig.from_dict({**MINIMAL, "tiers": [tier(capacity=text)]}).tiers[0]
    assert t.capacity_bytes == nbytes and t.capacity_samples is None
    assert t.capacity_for(1000) == max(1, nbytes // 1000)
    assert t.capacity_for(10 * nbytes) == 1  # never zero


def test_relative_paths_resolve_against_the_files_folder(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = write(conf_dir, """\
        [memory]
        em_size = 5
        sample_shape = [2]
        state_dir = "state"
        [[tiers]]
        kind = "lmdb"
        path = "data/flash"
        capacity = 10
        [[tiers]]
        kind = "zarr"
        path = "../disk/"
        capacity = "1GiB"
        [[tiers]]
        kind = "zarr"
        path = "~/cold"
        capacity = 10
        """)
    monkeypatch.chdir(tmp_path)  # not the file's folder
    cfg = load_config(os.path.relpath(path))
    assert cfg.tiers[0].path == str(conf_dir / "data" / "flash")
    assert cfg.tiers[1].path == str(tmp_path / "disk")
    assert cfg.tiers[2].path == os.path.expanduser("~/cold")
    assert cfg.memory.state_dir == str(conf_dir / "state")


def test_round_trip_through_to_dict():
    data = {
        "memory": {"em_size": 200, "sample_shape": [1, 28, 28], "dtype": "float32", "seed": 7,
                   "admission": "class_balanced", "state_dir": "/s/state",
                   "extras": {"logits": {"shape": [10], "dtype": "float16"}}},
        "swap": {"ratio": 0.25, "workers": 0, "adaptive": True, "start_task": 0},
        "write_behind": {"queue_samples": 64, "batch": 8, "block_timeout_s": 0.5},
        "tiers": [tier(sync=False, class_quota=30),
                  {"kind": "zarr", "path": "/t/disk", "capacity": "3GiB", "chunk": 64, "codec": "zstd"},
                  {"kind": "zarr", "path": "/t/cold", "capacity": "1000B"}],
    }
    cfg = CarouselConfig.from_dict(data)
    again = CarouselConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert again.tiers[1].capacity_bytes == 3 * 2**30 and again.tiers[2].capacity_bytes == 1000
    assert again.memory.extras == {"logits": ((10,), "float16")}
    assert "chunk" not in cfg.to_dict()["tiers"][0]  # an lmdb tier would reject it


# -- errors: file, key, reason -----------------------------------------------------------------------


@pytest.mark.parametrize("text, line", [
    ("[memory]\nem_size = 500\nsample_shape = \n[swap]\n", "line 3"),
    ("[memory]\nem_size = 500\nem_size = 5\n", "line 3"),  # a key given twice
    ("[memory]\nem_size = 500\nsample_shape = [3, 32\n", "ends at line 3"),  # tomllib: "at end of document"
])
def test_invalid_toml_names_file_and_line(tmp_path, text, line):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path) and info.value.key == "<toml>"
    assert line in info.value.reason
    assert str(info.value).startswith(f"{path}: <toml>: ")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.key == "<file>" and "No such file" in info.value.reason


def test_errors_from_a_file_name_the_file(tmp_path):
    path = write(tmp_path, EXAMPLE.replace("ratio = 0.5", "ratio = 2"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.key) == (str(path), "swap.ratio")
    assert str(info.value) == f"{path}: swap.ratio: must be in [0, 1], got 2.0"


def test_unknown_section():
    exc = error({**MINIMAL, "swpa": {}})
    assert exc.key == "swpa" and "unknown section" in exc.reason and "'swap'" in exc.reason
    exc = error({**MINIMAL, "em_size": 3})  # forgot the [memory] header
    assert exc.key == "em_size" and "[memory]" in exc.reason


def test_unknown_key_suggests_the_closest():
    exc = error(with_("swap", ration=0.3))
    assert exc.key == "swap.ration"
    assert "unknown key" in exc.reason and "did you mean 'ratio'?" in exc.reason
    exc = error({**MINIMAL, "tiers": [tier(), tier(path="/t/b", capcity=5)]})
    assert exc.key == "tiers[1].capcity" and "'capacity'" in exc.reason
    exc = error({"memory": {**MINIMAL["memory"], "extras": {"logits": {"shape": [1], "dtype": "int8",
                                                                       "dtyp": "x"}}}})
    assert exc.key == "memory.extras.logits.dtyp" and "unknown key" in exc.reason


@pytest.mark.parametrize("data, key, words", [
    ({"memory": {"em_size": "500", "sample_shape": [3]}}, "memory.em_size", "expected an integer, got str '500'"),
    ({"memory": {"em_size": 5, "sample_shape": 3}}, "memory.sample_shape", "expected a list"),
    ({"memory": {"em_size": 5, "sample_shape": [3, 2.5]}}, "memory.sample_shape[1]", "expected an integer"),
    (with_("swap", policy=3), "swap.policy", "expected a string"),
    (with_("swap", adaptive=1), "swap.adaptive", "expected true or false, got int 1"),
    (with_("write_behind", block_timeout_s="30"), "write_behind.block_timeout_s", "expected a number"),
    ({**MINIMAL, "tiers": [tier(sync="yes")]}, "tiers[0].sync", "expected true or false"),
    ({**MINIMAL, "tiers": [tier(capacity=[1])]}, "tiers[0].capacity", "sample count"),
    ({**MINIMAL, "tiers": {"kind": "lmdb"}}, "tiers", "[[tiers]]"),
    ({"memory": 5}, "memory", "expected a table"),
])
def test_wrong_type(data, key, words):
    exc = error(data)
    assert exc.key == key and words in exc.reason


@pytest.mark.parametrize("data, key", [
    (with_("swap", ratio=True), "swap.ratio"),
    (with_("swap", workers=True), "swap.workers"),
    ({"memory": {"em_size": True, "sample_shape": [3]}}, "memory.em_size"),
    ({"memory": {"em_size": 5, "sample_shape": [True]}}, "memory.sample_shape[0]"),
    ({**MINIMAL, "tiers": [tier(capacity=True)]}, "tiers[0].capacity"),
    ({**MINIMAL, "tiers": [tier(class_quota=False)]}, "tiers[0].class_quota"),
])
def test_bool_is_not_a_number(data, key):
    exc = error(data)
    assert exc.key == key and "got bool" in exc.reason


@pytest.mark.parametrize("data, key, words", [
    ({"memory": {"em_size": 0, "sample_shape": [3]}}, "memory.em_size", "must be >= 1, got 0"),
    ({"memory": {"em_size": 5, "sample_shape": [3, -1]}}, "memory.sample_shape[1]", ">= 0"),
    ({"memory": {"em_size": 5, "sample_shape": [3], "seed": -1}}, "memory.seed", ">= 0"),
    (with_("swap", ratio=1.01), "swap.ratio", "must be in [0, 1], got 1.01"),
    (with_("swap", ratio=-0.1), "swap.ratio", "must be in [0, 1]"),
    (with_("swap", ratio=float("nan")), "swap.ratio", "finite"),
    (with_("swap", workers=65), "swap.workers", "must be in [0, 64], got 65"),
    (with_("swap", prefetch_depth=-1), "swap.prefetch_depth", ">= 0"),
    (with_("swap", max_lag_steps=0), "swap.max_lag_steps", ">= 1"),
    (with_("write_behind", queue_samples=0), "write_behind.queue_samples", ">= 1"),
    (with_("write_behind", batch=0), "write_behind.batch", ">= 1"),
    (with_("write_behind", queue_samples=10, batch=11), "write_behind.batch", "<= queue_samples"),
    (with_("write_behind", block_timeout_s=0), "write_behind.block_timeout_s", "> 0"),
    ({**MINIMAL, "tiers": [tier(capacity=0)]}, "tiers[0].capacity", ">= 1"),
    ({**MINIMAL, "tiers": [tier(capacity="0B")]}, "tiers[0].capacity", ">= 1"),
    ({**MINIMAL, "tiers": [tier(capacity="4 gigs")]}, "tiers[0].capacity", "4GiB"),
    ({**MINIMAL, "tiers": [tier(capacity="5000")]}, "tiers[0].capacity", "no unit"),
    ({**MINIMAL, "tiers": [tier(kind="zarr", chunk=0)]}, "tiers[0].chunk", "must be in [1, 1048576]"),
    ({**MINIMAL, "tiers": [tier(class_quota=-1)]}, "tiers[0].class_quota", ">= 0"),
    (with_("swap", policy=""), "swap.policy", "must not be empty"),
    ({"memory": {"em_size": 5, "sample_shape": [3], "admission": " "}}, "memory.admission", "must not be empty"),
])
def test_out_of_range(data, key, words):
    exc = error(data)
    assert exc.key == key and words in exc.reason


@pytest.mark.parametrize("data, key", [
    ({}, "memory"),
    ({"memory": {"sample_shape": [3]}}, "memory.em_size"),
    ({"memory": {"em_size": 5}}, "memory.sample_shape"),
    ({**MINIMAL, "tiers": [{"kind": "lmdb", "capacity": 5}]}, "tiers[0].path"),
    ({**MINIMAL, "tiers": [tier(), {"path": "/t/x", "capacity": 5}]}, "tiers[1].kind"),
    ({**MINIMAL, "tiers": [{"kind": "lmdb", "path": "/t/x"}]}, "tiers[0].capacity"),
    ({"memory": {**MINIMAL["memory"], "extras": {"logits": {"shape": [10]}}}}, "memory.extras.logits.dtype"),
])
def test_missing_required(data, key):
    exc = error(data)
    assert exc.key == key and "missing" in exc.reason


@pytest.mark.parametrize("second, words", [
    ("/t/flash", "same folder"),
    ("/t/./flash/", "same folder"),
    ("/t/flash/inner", "lies inside"),
    ("/t", "contains"),
])
def test_tier_paths_must_be_distinct(second, words):
    exc = error({**MINIMAL, "tiers": [tier(), tier(kind="zarr", path=second)]})
    assert exc.key == "tiers[1].path" and words in exc.reason and "tiers[0].path" in exc.reason


def test_state_dir_may_not_lie_inside_a_tier():
    exc = error({"memory": {**MINIMAL["memory"], "state_dir": "/t/flash/state"}, "tiers": [tier()]})
    assert exc.key == "memory.state_dir" and "tiers[0].path" in exc.reason


@pytest.mark.parametrize("data, key", [
    ({"memory": {**MINIMAL["memory"], "dtype": "unit8"}}, "memory.dtype"),
    ({"memory": {**MINIMAL["memory"], "dtype": "complex64"}}, "memory.dtype"),
    ({"memory": {**MINIMAL["memory"], "extras": {"logits": {"shape": [10], "dtype": "float"}}}},
     "memory.extras.logits.dtype"),
])
def test_bad_dtype(data, key):
    exc = error(data)
    assert exc.key == key and "is not one of" in exc.reason and "uint8" in exc.reason


def test_bad_dtype_suggests():
    assert "did you mean 'uint8'?" in error({"memory": {**MINIMAL["memory"], "dtype": "unit8"}}).reason


@pytest.mark.parametrize("name, words", [("y", "reserved"), ("id", "reserved"), ("2nd", "letter"),
                                         ("has space", "letter")])
def test_bad_extra_names(name, words):
    exc = error({"memory": {**MINIMAL["memory"], "extras": {name: {"shape": [], "dtype": "int8"}}}})
    assert exc.key == f"memory.extras.{name}" and words in exc.reason


def test_bad_tier_kind():
    exc = error({**MINIMAL, "tiers": [tier(kind="lmbd", chunk=4)]})
    assert exc.key == "tiers[0].kind" and "files, flat, lmdb, zarr" in exc.reason
    assert "did you mean 'lmdb'?" in exc.reason
    exc = error({**MINIMAL, "tiers": [tier(kind="zarr", codec="gzip")]})
    assert exc.key == "tiers[0].codec" and "none, zstd" in exc.reason


def test_zarr_only_keys_on_an_lmdb_tier_are_errors():
    exc = error({**MINIMAL, "tiers": [tier(chunk=16)]})
    assert exc.key == "tiers[0].chunk" and "zarr tiers only" in exc.reason
    with pytest.raises(ConfigError, match="zarr tiers only"):
        TierConfig("lmdb", "/t/f", capacity_samples=5, chunk=16)


def test_an_lmdb_tier_may_compress_its_records():
    cfg = CarouselConfig.from_dict({**MINIMAL, "tiers": [tier(codec="zstd")]})
    assert cfg.tiers[0].url().endswith("&codec=zstd")
    assert CarouselConfig.from_dict(cfg.to_dict()) == cfg
    assert "codec" not in CarouselConfig.from_dict({**MINIMAL, "tiers": [tier()]}).tiers[0].url()


def test_a_flat_tier_has_no_codec_and_round_trips():
    cfg = CarouselConfig.from_dict({**MINIMAL, "tiers": [tier(kind="flat", sync=False)]})
    assert cfg.tiers[0].url().startswith("flat://") and cfg.tiers[0].url().endswith("?sync=0")
    assert CarouselConfig.from_dict(cfg.to_dict()) == cfg
    exc = error({**MINIMAL, "tiers": [tier(kind="flat", codec="zstd")]})
    assert exc.key == "tiers[0].codec" and "no codec" in exc.reason
    exc = error({**MINIMAL, "tiers": [tier(kind="flat", chunk=16)]})
    assert exc.key == "tiers[0].chunk" and "zarr tiers only" in exc.reason


def test_a_files_tier_reads_in_flight_and_round_trips():
    cfg = CarouselConfig.from_dict({**MINIMAL, "tiers": [
        tier(kind="files", path="/t/files"),
        tier(kind="files", path="/t/zfiles", inflight=1, codec="zstd", sync=False),
        {"kind": "files", "path": "/t/imgs", "layout": "imagefolder", "inflight": 1024}]})
    assert cfg.tiers[0].inflight == 32 and cfg.tiers[0].layout == "records"  # the defaults
    assert [t.url() for t in cfg.tiers] == [
        "files:///t/files?sync=1&inflight=32",
        "files:///t/zfiles?sync=0&inflight=1&codec=zstd",
        "files:///t/imgs?sync=1&inflight=1024&layout=imagefolder&mode=ro"]
    assert CarouselConfig.from_dict(cfg.to_dict()) == cfg
    assert "inflight" not in CarouselConfig.from_dict({**MINIMAL, "tiers": [tier()]}).to_dict()["tiers"][0]


def test_an_imagefolder_tier_has_no_capacity_or_codec_and_may_give_tasks():
    folder = {"kind": "files", "path": "/t/imgs", "layout": "imagefolder"}
    cfg = CarouselConfig.from_dict({**MINIMAL, "tiers": [tier(), {**folder, "classes_per_task": 2}]})
    t = cfg.tiers[1]
    assert t.capacity_samples is None and t.capacity_bytes is None and t.capacity_for(100) == 0
    assert t.url() == "files:///t/imgs?sync=1&inflight=32&layout=imagefolder&mode=ro&classes_per_task=2"
    assert "capacity" not in cfg.to_dict()["tiers"][1] and CarouselConfig.from_dict(cfg.to_dict()) == cfg
    exc = error({**MINIMAL, "tiers": [{**folder, "capacity": 10}]})
    assert exc.key == "tiers[0].capacity" and "remove capacity" in exc.reason
    exc = error({**MINIMAL, "tiers": [{**folder, "codec": "zstd"}]})
    assert exc.key == "tiers[0].codec" and "no codec" in exc.reason
    exc = error({**MINIMAL, "tiers": [tier(kind="files", classes_per_task=2)]})
    assert exc.key == "tiers[0].classes_per_task" and "imagefolder tiers only" in exc.reason
    exc = error({**MINIMAL, "tiers": [tier(classes_per_task=2)]})
    assert exc.key == "tiers[0].classes_per_task" and "files tiers only" in exc.reason
    exc = error({**MINIMAL, "tiers": [{"kind": "files", "path": "/t/f"}]})  # a records tier still needs one
    assert exc.key == "tiers[0].capacity"


@pytest.mark.parametrize("values, key, words", [
    ({"kind": "files", "inflight": 0}, "inflight", "[1, 1024]"),
    ({"kind": "files", "inflight": 1025}, "inflight", "[1, 1024]"),
    ({"kind": "files", "inflight": "8"}, "inflight", "integer"),
    ({"kind": "files", "layout": "tiles"}, "layout", "imagefolder, records"),
    ({"kind": "files", "chunk": 16}, "chunk", "zarr tiers only"),
    ({"kind": "lmdb", "inflight": 8}, "inflight", "files tiers only"),
    ({"kind": "zarr", "layout": "imagefolder"}, "layout", "files tiers only"),
])
def test_files_only_keys_are_checked(values, key, words):
    exc = error({**MINIMAL, "tiers": [tier(**values)]})
    assert exc.key == f"tiers[0].{key}" and words in exc.reason
    with pytest.raises(ConfigError, match=re.escape(words)):  # built directly too
        TierConfig(values.pop("kind"), "/t/f", capacity_samples=5, **values)


def test_errors_without_a_file():
    with pytest.raises(ConfigError) as info:
        CarouselConfig.from_dict(with_("swap", ratio=3))
    assert info.value.file is None and str(info.value) == "swap.ratio: must be in [0, 1], got 3.0"
    assert isinstance(info.value, ValueError)


def test_direct_construction_is_checked_too():
    with pytest.raises(ConfigError) as info:
        SwapConfig(workers=-1)
    assert info.value.key == "workers"
    with pytest.raises(ConfigError, match="exactly one"):
        TierConfig("lmdb", "/t/f")
    with pytest.raises(ConfigError, match="exactly one"):
        TierConfig("lmdb", "/t/f", capacity_samples=1, capacity_bytes=1)


def test_error_survives_pickling():
    exc = pickle.loads(pickle.dumps(ConfigError("a.toml", "swap.ratio", "too big")))
    assert (exc.file, exc.key, exc.reason) == ("a.toml", "swap.ratio", "too big")
    assert str(exc) == "a.toml: swap.ratio: too big"


# -- urls ---------------------------------------------------------------------------------------------


def test_urls():
    tiers = CarouselConfig.from_dict({**MINIMAL, "tiers": [
        tier(path="/t/flash"), tier(path="/t/flash-nosync", sync=False),
        {"kind": "zarr", "path": "/t/disk", "capacity": 5, "chunk": 64, "codec": "zstd", "sync": False},
        {"kind": "zarr", "path": "/t/odd?dir%", "capacity": 5},
    ]}).tiers
    assert [t.url() for t in tiers] == [
        "lmdb:///t/flash?sync=1",
        "lmdb:///t/flash-nosync?sync=0",
        "zarr:///t/disk?chunk=64&codec=zstd&sync=0",
        "zarr:///t/odd%3Fdir%25?chunk=64&codec=none&sync=1",
    ]
    parsed = parse_url(tiers[3].url())  # the stores' own parser gets the path and params back
    assert str(parsed.path) == "/t/odd?dir%" and parsed.params == {"chunk": "64", "codec": "none", "sync": "1"}


def test_docstring_examples_run():
    result = doctest.testmod(carousel.config)
    assert result.attempted >= 5 and result.failed == 0


def test_every_field_has_a_documented_default():
    source = open(carousel.config.__file__).read()
    for cls in (MemoryConfig, SwapConfig, WriteBehindConfig, TierConfig, CarouselConfig):
        for name in cls.__dataclass_fields__:
            assert re.search(rf"^\s+{name}: .*#", source, re.M), f"{cls.__name__}.{name} has no comment"


def test_unknown_eviction_policy_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        CarouselConfig.from_dict({"memory": {"em_size": 4, "sample_shape": [2]},
                                  "tiers": [{"kind": "lmdb", "path": "/t/a", "capacity": 5, "eviction": "lru"}]})
    assert err.value.key == "tiers[0].eviction" and "class_balanced" in str(err.value)
