"""A memory's configuration: typed, frozen dataclasses loaded from TOML.

One file describes one memory: the episodic memory (EM) in RAM, how samples are swapped between the
EM and storage, the write-behind queue that feeds storage, and the storage tiers, fastest first::

    [memory]
    em_size = 500
    sample_shape = [3, 32, 32]
    [swap]
    ratio = 0.5
    [[tiers]]
    kind = "lmdb"
    path = "flash"           # relative paths are resolved against this file's folder
    capacity = 50000         # samples; "4GiB" is a byte budget

No tiers at all is a RAM-only replay buffer (the baseline). Everything is checked before anything
is started: invalid TOML, an unknown section or key, a wrong type or an out-of-range value raise
:class:`ConfigError`, which names the file, the key (``tiers[1].capacity``) and the reason.

Why one module of ~630 lines: one frozen dataclass per TOML section (``[memory]``, ``[swap]``,
``[write_behind]``, ``[[tiers]]``) and the loader that checks them share one set of small
validators (``_int``, ``_choice``, ...) and one error type; the daemon's profile
(:mod:`carousel.daemon.profile`) reuses them. Defaults live in one place, as STYLE.md asks.

>>> cfg = CarouselConfig.from_dict({"memory": {"em_size": 500, "sample_shape": [3, 32, 32]},
...                                 "tiers": [{"kind": "zarr", "path": "/data/disk", "capacity": "4GiB"}]})
>>> cfg.swap.ratio, cfg.tiers[0].capacity_bytes, cfg.tiers[0].capacity_for(3 * 32 * 32 + 8)
(0.5, 4294967296, 1394469)
>>> cfg.tiers[0].url()
'zarr:///data/disk?chunk=64&codec=none&sync=1'
>>> CarouselConfig.from_dict(cfg.to_dict()) == cfg
True
>>> CarouselConfig.from_dict({"memory": {"em_size": 500, "sample_shape": [8]}, "swap": {"ration": 0.3}})
Traceback (most recent call last):
...
carousel.config.ConfigError: swap.ration: unknown key; did you mean 'ratio'? known: adaptive, deterministic, \
max_lag_steps, policy, prefetch_depth, ratio, start_task, swap_in, workers
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

from storage_backends import ALLOWED_DTYPES, InvalidURLError
from storage_backends.url import parse_size

from .tiers import EVICTION_POLICIES

__all__ = ["CarouselConfig", "ConfigError", "MemoryConfig", "SaliencyConfig", "SwapConfig", "TierConfig", "WriteBehindConfig",
           "load_config"]

TIER_KINDS = ("lmdb", "zarr", "flat", "files")
#: A files tier's layouts: its own records, or class_name/*.png folders (read-only).
TIER_LAYOUTS = ("records", "imagefolder")
TIER_CODECS = ("none", "zstd")
RESERVED_FIELDS = frozenset({"x", "y", "task", "id"})  # the fields every sample already has
MEMORY_KINDS = ("plain", "coreset", "saliency")
WEIGHT_FIELD = "weight"  # a coreset memory's per-sample weight: float32, >= 0
SALIENCY_FIELD = "saliency"  # a saliency memory's add() input: (H, W) map in [0, 1] (or uint8 0..255)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")  # what storage_backends.Schema accepts
_MAX_WORKERS = 64
_MAX_CHUNK = 1 << 20  # the zarr store's own bound on chunk rows
_MAX_INFLIGHT = 1024  # the files store's own bound on reads in flight
DEFAULT_MAX_LABEL = 2**32 - 1  # any 32-bit class id (open-world streams hash classes into 2**31 and more)
# The largest max_label a config may set: carousel.ray packs (label, 16-bit task) pairs into one
# int64 key (label << 16 | task), so a label must stay below 2**47.
MAX_LABEL_LIMIT = 2**47 - 1


class ConfigError(ValueError):
    """A configuration that cannot be used: ``str()`` is ``"{file}: {key}: {reason}"``.

    ``file`` is None for a configuration built from a dict or directly; then ``str()`` is
    ``"{key}: {reason}"``. ``key`` is a dotted path (``swap.ratio``, ``tiers[1].capacity``), or
    ``<toml>`` for a file that does not parse and ``<file>`` for one that cannot be read.
    """

    def __init__(self, file: str | None, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        text = f"{key}: {reason}"
        ValueError.__init__(self, text if file is None else f"{file}: {text}")

    def __reduce__(self):  # so it crosses process boundaries intact
        return type(self), (self.file, self.key, self.reason)


# ---------------------------------------------------------------------------------------------------
# Value checks. Each raises ConfigError(None, key, reason) with the key relative to its dataclass;
# from_dict adds the file and the section prefix.


def _fail(key: str, reason: str):
    raise ConfigError(None, key, reason)


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _int(value: Any, key: str, lo: int | None = None, hi: int | None = None) -> int:
    # bool is a subclass of int: `workers = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(key, f"expected an integer, got {_show(value)}")
    if lo is not None and value < lo:
        _fail(key, f"must be >= {lo}, got {value}" if hi is None else f"must be in [{lo}, {hi}], got {value}")
    if hi is not None and value > hi:
        _fail(key, f"must be <= {hi}, got {value}" if lo is None else f"must be in [{lo}, {hi}], got {value}")
    return value


def _float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, f"expected a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        _fail(key, f"must be a finite number, got {value}")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        _fail(key, f"expected true or false, got {_show(value)}")
    return value


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        _fail(key, f"expected a string, got {_show(value)}")
    if not value.strip():
        _fail(key, "must not be empty")
    return value


def _choice(value: Any, key: str, allowed) -> str:
    value = _str(value, key)
    if value not in allowed:
        _fail(key, f"{value!r} is not one of {', '.join(sorted(allowed))}{_did_you_mean(value, allowed)}")
    return value


def _shape(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        _fail(key, f"expected a list of non-negative integers such as [3, 32, 32], got {_show(value)}")
    for i, dim in enumerate(value):
        _int(dim, f"{key}[{i}]", lo=0)
    return tuple(value)


def _path(value: Any, key: str) -> str:
    return os.path.normpath(os.path.expanduser(_str(value, key)))


def _did_you_mean(word: str, known) -> str:
    close = difflib.get_close_matches(word, sorted(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _within(inner: str, outer: str) -> bool:
    """Whether ``inner`` is ``outer`` or lies below it (both normalised)."""
    return os.path.commonpath([os.path.abspath(inner), os.path.abspath(outer)]) == os.path.abspath(outer)


# ---------------------------------------------------------------------------------------------------
# The sections.


@dataclass(frozen=True, slots=True)
class SaliencyConfig:
    """``[memory.saliency]``: how a ``kind = "saliency"`` memory compresses samples on storage (SAMC).

    A sample keeps the pixels whose saliency is >= ``theta``; the rest are dropped on storage and
    filled in by ``completion`` when the sample is read back, before it reaches the EM.
    """

    theta: float = 0.6                    # keep pixels with saliency >= theta, in [0, 1]
    completion: str = "diffusion"         # how dropped pixels are filled on read (carousel.kinds.completion registry)
    level: int = 3                        # zstd level of the code, in [1, 22]
    # Pixels below theta: kept at this many bits (of 8) -- coarse but sharp -- or dropped (0) and
    # completed on read, from a 1/thumbnail-scale image when thumbnail > 0.
    background_bits: int = 2
    thumbnail: int = 4

    def __post_init__(self) -> None:
        theta = _float(self.theta, "theta")
        if not 0.0 <= theta <= 1.0:
            _fail("theta", f"must be in [0, 1], got {theta}")
        object.__setattr__(self, "theta", theta)
        _str(self.completion, "completion")
        _int(self.level, "level", lo=1, hi=22)
        _int(self.thumbnail, "thumbnail", lo=0, hi=255)
        _int(self.background_bits, "background_bits", lo=0, hi=8)


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    """``[memory]``: the episodic memory (EM) in RAM and the samples it holds."""

    em_size: int                          # required; samples the EM holds in RAM, >= 1
    sample_shape: tuple[int, ...]         # required; shape of one sample's ``x``, e.g. (3, 32, 32)
    dtype: str = "uint8"                  # dtype of ``x``, one of storage_backends.ALLOWED_DTYPES
    seed: int = 0                         # seeds admission and swap sampling, >= 0
    admission: str = "reservoir"          # admission policy, by registered name (checked when built)
    # Labels need not be dense: every per-class count costs the number of distinct classes, never
    # the largest label; the bound only stops a stray value (a hash, a pointer) at the door.
    max_label: int = DEFAULT_MAX_LABEL    # largest label add() accepts (labels in [0, max_label]); <= 2**47 - 1
    # Extra per-sample fields beside x/y/task/id: name -> (shape, dtype), e.g. stored logits for DER.
    # TOML: [memory.extras.logits] shape = [10]  dtype = "float32"
    extras: Mapping[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # none (see above)
    state_dir: str | None = None          # catalog/state folder; None: the memory chooses, beside its tiers
    # "plain" replay samples, or "coreset": every sample carries a non-negative weight (the extra
    # field "weight", float32, 1.0 unless add() says otherwise) that sample() returns and
    # retain(ids, weights) sets (GCR); or "saliency": samples are stored compressed to their salient
    # pixels (add() takes a "saliency" map per sample) and completed when read back (SAMC).
    kind: str = "plain"
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)  # [memory.saliency], kind = "saliency"
    # The integrity mode (carousel.integrity): every batch sample() returns -- in-process, through the
    # daemon's rings and its socket -- is checked against a CRC-32C per field kept since add(); a wrong
    # pair raises IntegrityError. It costs a CRC pass over each batch (docs/design.md).
    verify: bool = False                  # off; CAROUSEL_VERIFY=1 turns it on for every memory a process opens

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        _int(self.em_size, "em_size", lo=1)
        _choice(self.kind, "kind", MEMORY_KINDS)
        set_(self, "sample_shape", _shape(self.sample_shape, "sample_shape"))
        _choice(self.dtype, "dtype", ALLOWED_DTYPES)
        _int(self.seed, "seed", lo=0)  # numpy's SeedSequence rejects negative seeds
        _str(self.admission, "admission")
        _int(self.max_label, "max_label", lo=0, hi=MAX_LABEL_LIMIT)
        if not isinstance(self.extras, Mapping):
            _fail("extras", f"expected a table of name -> {{shape, dtype}}, got {_show(self.extras)}")
        extras = {}
        for name, spec in self.extras.items():
            key = f"extras.{name}"
            if not isinstance(name, str) or not _NAME.match(name):
                _fail(key, "a field name is a letter then up to 63 letters, digits or underscores")
            if name in RESERVED_FIELDS:
                _fail(key, f"{name!r} is reserved; every sample already has {', '.join(sorted(RESERVED_FIELDS))}")
            if not isinstance(spec, (tuple, list)) or len(spec) != 2:
                _fail(key, f"expected (shape, dtype), got {_show(spec)}")
            extras[name] = (_shape(spec[0], f"{key}.shape"), _choice(spec[1], f"{key}.dtype", ALLOWED_DTYPES))
        if self.kind == "coreset":
            if extras.get(WEIGHT_FIELD, ((), "float32")) != ((), "float32"):
                _fail(f"extras.{WEIGHT_FIELD}", "is the coreset weight every sample of a kind = \"coreset\" memory "
                                               "has (float32, shape []); name your field otherwise")
            extras[WEIGHT_FIELD] = ((), "float32")
        if self.kind == "saliency" and len(self.sample_shape) not in (2, 3):
            _fail("kind", f"a saliency memory holds images, (H, W) or (C, H, W); sample_shape is {list(self.sample_shape)}")
        if SALIENCY_FIELD in extras:
            _fail(f"extras.{SALIENCY_FIELD}", "is the saliency map a kind = \"saliency\" memory takes in add(); "
                                             "name your field otherwise")
        if not isinstance(self.saliency, SaliencyConfig):
            _fail("saliency", f"expected a table [memory.saliency], got {_show(self.saliency)}")
        set_(self, "extras", MappingProxyType(extras))
        if self.state_dir is not None:
            set_(self, "state_dir", _path(self.state_dir, "state_dir"))
        _bool(self.verify, "verify")

    def __hash__(self) -> int:  # extras is a mapping; hash its items instead
        return hash((self.em_size, self.sample_shape, self.dtype, self.seed, self.admission, self.max_label,
                     tuple(sorted(self.extras.items())), self.state_dir, self.kind, self.saliency, self.verify))


@dataclass(frozen=True, slots=True)
class SwapConfig:
    """``[swap]``: how samples move between the EM and storage (CarM, DAC 2022)."""

    ratio: float = 0.5                    # fraction of each replayed batch swapped out for storage samples, in [0, 1]
    policy: str = "carm"                  # swap-out policy (which EM samples leave), by registered name
    swap_in: str = "same_class_random"    # swap-in policy (which stored samples come in), by registered name
    workers: int = 1                      # swap threads; 0 = synchronous swapping on the caller's thread; <= 64
    prefetch_depth: int = 512             # candidates kept read and decoded ahead, in total (split over classes), >= 0
    start_task: int = 1                   # swaps begin when the trainer's task index reaches this (CarM: 2nd task)
    adaptive: bool = False                # lower the effective ratio when storage cannot keep up
    max_lag_steps: int = 4                # training steps a swap may trail before it counts as lagging, >= 1
    # Swaps, capacity moves and swap-in candidates decided at step boundaries (end_step()) from
    # seeded draws and applied one step later, whatever the threads' timing: a seed gives the same
    # run twice. Storage I/O still runs in the background, overlapped with the next step.
    deterministic: bool = False           # true: swaps at step boundaries, repeatable (carousel.step_swaps)

    def __post_init__(self) -> None:
        ratio = _float(self.ratio, "ratio")
        if not 0.0 <= ratio <= 1.0:
            _fail("ratio", f"must be in [0, 1], got {ratio}")
        object.__setattr__(self, "ratio", ratio)
        _str(self.policy, "policy")
        _str(self.swap_in, "swap_in")
        _int(self.workers, "workers", lo=0, hi=_MAX_WORKERS)
        _int(self.prefetch_depth, "prefetch_depth", lo=0)
        _int(self.start_task, "start_task", lo=0)
        _bool(self.adaptive, "adaptive")
        _int(self.max_lag_steps, "max_lag_steps", lo=1)
        _bool(self.deterministic, "deterministic")
        if self.deterministic and self.adaptive:
            _fail("deterministic", "adaptive mode lowers the ratio when storage lags, which depends on timing: "
                                   "a deterministic memory cannot be adaptive (set adaptive = false)")


@dataclass(frozen=True, slots=True)
class WriteBehindConfig:
    """``[write_behind]``: the bounded queue between ``add()`` and the first storage tier."""

    queue_samples: int = 4096             # samples waiting to be written, at most; >= 1
    batch: int = 256                      # samples per storage write (one put_many), in [1, queue_samples]
    block_timeout_s: float = 30.0         # how long add() may block on a full queue before raising, > 0

    def __post_init__(self) -> None:
        _int(self.queue_samples, "queue_samples", lo=1)
        _int(self.batch, "batch", lo=1)
        if self.batch > self.queue_samples:
            _fail("batch", f"must be <= queue_samples ({self.queue_samples}), got {self.batch}; "
                           "a batch that does not fit the queue is never written")
        timeout = _float(self.block_timeout_s, "block_timeout_s")
        if timeout <= 0:
            _fail("block_timeout_s", f"must be > 0, got {timeout}")
        object.__setattr__(self, "block_timeout_s", timeout)


#: Keys that apply to one tier kind only: another kind refuses any value but the default.
_KIND_ONLY = {"chunk": "zarr", "inflight": "files", "layout": "files", "classes_per_task": "files"}


@dataclass(frozen=True, slots=True)
class TierConfig:
    """``[[tiers]]``: one storage tier, fastest first. Exactly one of the capacities is set.

    In TOML the capacity is one key: ``capacity = 50000`` (samples) or ``capacity = "4GiB"`` (bytes).
    A ``files`` tier keeps one file per sample and reads ``inflight`` of them at once (for network
    and parallel file systems); with ``layout = "imagefolder"`` it reads an existing
    ``class_name/*.png`` folder tree and writes nothing.
    """

    kind: str                             # required; "lmdb" (flash), "zarr" (disk), "flat" (fixed rows, mapped)
                                          # or "files" (one file per sample, many reads in flight)
    path: str                             # required; the store's folder, ~ expanded (relative: to the TOML file)
    capacity_samples: int | None = None   # capacity in samples, >= 1 ...
    capacity_bytes: int | None = None     # ... or in bytes, >= 1 (see capacity_for)
    sync: bool = True                     # fsync every write (the stores' sync=1)
    chunk: int = 64                       # zarr only: rows per chunk, in [1, 2**20]
    codec: str = "none"                   # "none" or "zstd" (compressed records; a saliency memory needs it)
    eviction: str = "class_balanced"      # over capacity: who demotes to the next tier (or leaves, from the last)
    class_quota: int = 0                  # max samples per class on this tier; 0 = no quota
    inflight: int = 32                    # files only: file reads in flight per storage read, in [1, 1024]
    layout: str = "records"               # files only: "records" (the store's own files) or "imagefolder"
                                          # (class_name/*.png folders, read-only: nothing is written to it;
                                          # no capacity: it holds the folder's images)
    classes_per_task: int = 0             # imagefolder only: a sample's task is label // this; 0 = task 0

    def __post_init__(self) -> None:
        _choice(self.kind, "kind", TIER_KINDS)
        object.__setattr__(self, "path", _path(self.path, "path"))
        _bool(self.sync, "sync")
        _int(self.chunk, "chunk", lo=1, hi=_MAX_CHUNK)
        _choice(self.codec, "codec", TIER_CODECS)
        if self.layout == "imagefolder" and self.codec != "none":
            _fail("codec", "an imagefolder tier reads the images as they are (PNG); it has no codec")
        if self.kind == "flat" and self.codec != "none":
            _fail("codec", "a flat tier keeps raw fixed-size rows (that is what makes its random reads one "
                           "gather); it has no codec: use an lmdb or zarr tier for zstd")
        _int(self.inflight, "inflight", lo=1, hi=_MAX_INFLIGHT)
        _choice(self.layout, "layout", TIER_LAYOUTS)
        _int(self.classes_per_task, "classes_per_task", lo=0, hi=1 << 31)
        if self.classes_per_task and self.layout != "imagefolder":
            _fail("classes_per_task", "applies to imagefolder tiers only (their tasks come from the folder's classes)")
        for name, only in _KIND_ONLY.items():
            if self.kind != only and getattr(self, name) != _TIER_DEFAULTS[name]:
                _fail(name, f"applies to {only} tiers only; this tier is {self.kind}")
        _choice(self.eviction, "eviction", EVICTION_POLICIES)
        _int(self.class_quota, "class_quota", lo=0)
        if self.layout == "imagefolder":  # it has no capacity
            if self.capacity_samples is not None or self.capacity_bytes is not None:
                _fail("capacity", "an imagefolder tier holds the folder's images, never more or fewer: its capacity "
                                  "is their count; remove capacity")
        elif (self.capacity_samples is None) == (self.capacity_bytes is None):
            _fail("capacity", "give exactly one of capacity_samples and capacity_bytes "
                              "(in TOML: capacity = 50000 samples or capacity = \"4GiB\")")
        if self.capacity_samples is not None:
            _int(self.capacity_samples, "capacity_samples", lo=1)
        if self.capacity_bytes is not None:
            _int(self.capacity_bytes, "capacity_bytes", lo=1)

    def url(self) -> str:
        """The ``storage_backends`` URL of this tier's store.

        >>> TierConfig("lmdb", "/var/lib/carousel/flash", capacity_samples=10, sync=False).url()
        'lmdb:///var/lib/carousel/flash?sync=0'
        >>> TierConfig("files", "/mnt/nfs/replay", capacity_samples=10, inflight=64).url()
        'files:///mnt/nfs/replay?sync=1&inflight=64'
        >>> TierConfig("files", "/data/cifar/train", layout="imagefolder").url()
        'files:///data/cifar/train?sync=1&inflight=32&layout=imagefolder&mode=ro'
        """
        path = quote(self.path, safe="/")  # parse_url unquotes; a '?' or '%' in a folder name survives
        sync = int(self.sync)
        if self.kind == "lmdb":
            return f"lmdb://{path}?sync={sync}" + ("&codec=zstd" if self.codec == "zstd" else "")
        if self.kind == "flat":
            return f"flat://{path}?sync={sync}"
        if self.kind == "files":
            url = f"files://{path}?sync={sync}&inflight={self.inflight}"
            if self.layout == "imagefolder":
                return url + "&layout=imagefolder&mode=ro" + \
                    (f"&classes_per_task={self.classes_per_task}" if self.classes_per_task else "")
            return url + ("&codec=zstd" if self.codec == "zstd" else "")
        return f"zarr://{path}?chunk={self.chunk}&codec={self.codec}&sync={sync}"

    def capacity_for(self, record_nbytes: int) -> int:
        """Capacity in samples for records of ``record_nbytes`` bytes each (at least 1; 0 for an
        imagefolder tier, which holds what its folder holds).

        >>> TierConfig("lmdb", "/f", capacity_bytes=1000).capacity_for(300)
        3
        """
        if self.capacity_samples is not None:
            return self.capacity_samples
        if self.capacity_bytes is None:  # an imagefolder tier: as many as the folder holds, unknown here
            return 0
        record_nbytes = _int(record_nbytes, "record_nbytes", lo=1)
        return max(1, self.capacity_bytes // record_nbytes)


_TIER_DEFAULTS = {f.name: f.default for f in fields(TierConfig)}


@dataclass(frozen=True, slots=True)
class CarouselConfig:
    """A whole memory's configuration; see the module docstring for the TOML layout."""

    memory: MemoryConfig                  # required: [memory]
    swap: SwapConfig = field(default_factory=SwapConfig)                         # [swap]; all defaults
    write_behind: WriteBehindConfig = field(default_factory=WriteBehindConfig)  # [write_behind]; all defaults
    tiers: tuple[TierConfig, ...] = ()    # [[tiers]], fastest first; none = RAM-only replay buffer (baseline)
    source: str | None = field(default=None, compare=False)  # the file it was loaded from, for messages

    def __post_init__(self) -> None:
        for name, cls in (("memory", MemoryConfig), ("swap", SwapConfig), ("write_behind", WriteBehindConfig)):
            if not isinstance(getattr(self, name), cls):
                _fail(name, f"expected a {cls.__name__}, got {_show(getattr(self, name))}")
        if not isinstance(self.tiers, (tuple, list)) or not all(isinstance(t, TierConfig) for t in self.tiers):
            _fail("tiers", f"expected a sequence of TierConfig, got {_show(self.tiers)}")
        object.__setattr__(self, "tiers", tuple(self.tiers))
        for j, tier in enumerate(self.tiers):
            for i in range(j):
                other = self.tiers[i].path
                inside, contains = _within(tier.path, other), _within(other, tier.path)
                if inside or contains:
                    how = "is the same folder as" if inside and contains else "lies inside" if inside else "contains"
                    _fail(f"tiers[{j}].path", f"{tier.path!r} {how} tiers[{i}].path {other!r}; "
                                              "each tier needs a folder of its own")
            state = self.memory.state_dir
            if state is not None and _within(state, tier.path):
                _fail("memory.state_dir", f"{state!r} lies inside tiers[{j}].path {tier.path!r}")
            if self.memory.kind == "saliency" and tier.codec != "zstd":
                _fail(f"tiers[{j}].codec", "a saliency memory stores variable-length codes in fixed-size records; "
                                           "give the tier codec = \"zstd\" so that the padding takes no room")
        if self.memory.kind == "saliency" and not self.tiers:
            _fail("memory.kind", "a saliency memory compresses samples on storage tiers and completes them on the "
                                 "way into RAM; a RAM-only memory (no [[tiers]]) has nowhere to keep them compressed")

    # -- TOML-shaped dicts ----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> CarouselConfig:
        """Build from a TOML-shaped dict (what ``tomllib`` returns, or :meth:`to_dict`).

        ``source`` names the file in errors; relative tier paths and ``state_dir`` are resolved
        against its folder. Raises :class:`ConfigError` for anything unknown, mistyped or out of range.
        """
        source = None if source is None else os.fspath(source)
        try:
            return _build(data, source)
        except ConfigError as exc:
            raise ConfigError(source, exc.key, exc.reason) from None

    def to_dict(self) -> dict[str, Any]:
        """A TOML-shaped dict of plain values (lists, no None) that :meth:`from_dict` turns back into ``self``."""
        memory: dict[str, Any] = {
            "em_size": self.memory.em_size, "sample_shape": list(self.memory.sample_shape),
            "dtype": self.memory.dtype, "seed": self.memory.seed, "admission": self.memory.admission,
            "max_label": self.memory.max_label,
            "extras": {name: {"shape": list(shape), "dtype": dtype}
                       for name, (shape, dtype) in self.memory.extras.items()
                       if not (self.memory.kind == "coreset" and name == WEIGHT_FIELD)},  # implied by kind
            "kind": self.memory.kind,
            "verify": self.memory.verify,
        }
        if self.memory.kind == "saliency":
            memory["saliency"] = {f.name: getattr(self.memory.saliency, f.name) for f in fields(SaliencyConfig)}
        if self.memory.state_dir is not None:
            memory["state_dir"] = self.memory.state_dir
        tiers = []
        for tier in self.tiers:
            entry: dict[str, Any] = {"kind": tier.kind, "path": tier.path}
            if tier.capacity_samples is not None:
                entry["capacity"] = tier.capacity_samples
            elif tier.capacity_bytes is not None:
                entry["capacity"] = _format_size(tier.capacity_bytes)
            for f in fields(TierConfig)[4:]:
                if _KIND_ONLY.get(f.name, tier.kind) == tier.kind:
                    entry[f.name] = getattr(tier, f.name)
            tiers.append(entry)
        return {
            "memory": memory,
            "swap": {f.name: getattr(self.swap, f.name) for f in fields(SwapConfig)},
            "write_behind": {f.name: getattr(self.write_behind, f.name) for f in fields(WriteBehindConfig)},
            "tiers": tiers,
        }


def load_config(path: str | os.PathLike[str]) -> CarouselConfig:
    """Read a TOML file into a :class:`CarouselConfig`; every problem is a :class:`ConfigError`."""
    file = os.fspath(path)
    return CarouselConfig.from_dict(read_toml(file), source=file)


def read_toml(file: str) -> dict[str, Any]:
    """Parse a TOML file; unreadable, non-UTF-8 or invalid TOML is a :class:`ConfigError` naming it."""
    try:
        with open(file, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(file, "<file>", f"cannot read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "<toml>", f"not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        reason = str(exc)  # "... (at line 3, column 5)"; tomllib 3.11 has no lineno attribute
        if "end of document" in reason:
            # The last line, whether or not the file ends with a newline.
            reason += f"; the document ends at line {len(raw.splitlines()) or 1}"
        raise ConfigError(file, "<toml>", reason) from None


# ---------------------------------------------------------------------------------------------------
# From a dict: the shape of the TOML (sections, keys, required keys) is checked here, the values by
# the dataclasses themselves, so a directly built config is held to the same rules.

_SECTIONS = {"memory": MemoryConfig, "swap": SwapConfig, "write_behind": WriteBehindConfig, "tiers": TierConfig}
_TOML_KEYS = {
    "memory": [f.name for f in fields(MemoryConfig)],
    "swap": [f.name for f in fields(SwapConfig)],
    "write_behind": [f.name for f in fields(WriteBehindConfig)],
    "tiers": ["kind", "path", "capacity"] + [f.name for f in fields(TierConfig)[4:]],
}
_REQUIRED = {"memory": ("em_size", "sample_shape"), "tiers": ("kind", "path"),  # capacity: see _build
             "swap": (), "write_behind": ()}
_EXTRA_KEYS = ("shape", "dtype")
_CAPACITY_KEYS = {"capacity_samples": "capacity", "capacity_bytes": "capacity"}  # dataclass field -> TOML key


def _check_keys(table: Any, prefix: str, known, required=(), what: str = "table") -> dict[str, Any]:
    if not isinstance(table, Mapping):
        _fail(prefix, f"expected a {what}, got {_show(table)}")
    for key in table:
        if key not in known:
            _fail(f"{prefix}.{key}", f"unknown key{_did_you_mean(key, known) or ';'} known: {', '.join(sorted(known))}")
    for key in required:
        if key not in table:
            _fail(f"{prefix}.{key}", "required key is missing")
    return dict(table)


def _prefixed(prefix: str, exc: ConfigError, rename: Mapping[str, str] = MappingProxyType({})) -> ConfigError:
    head, dot, rest = exc.key.partition(".")
    head = rename.get(head, head)
    return ConfigError(None, f"{prefix}.{head}{dot}{rest}", exc.reason)


def _section(cls, table: dict[str, Any], prefix: str, rename: Mapping[str, str] = MappingProxyType({})):
    try:
        return cls(**table)
    except ConfigError as exc:
        raise _prefixed(prefix, exc, rename) from None


def _resolve(path: Any, base: str | None) -> Any:
    if base is None or not isinstance(path, str):
        return path  # a non-string is reported by the dataclass
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(base, path)


def _build(data: Mapping[str, Any], source: str | None) -> CarouselConfig:
    if not isinstance(data, Mapping):
        _fail("<root>", f"expected a table of sections, got {_show(data)}")
    for name in data:
        if name not in _SECTIONS:
            owner = [section for section, keys in _TOML_KEYS.items() if name in keys]
            hint = f"; {name!r} belongs under [{owner[0]}];" if owner else _did_you_mean(name, _SECTIONS)
            _fail(name, f"unknown section{hint or ';'} known: {', '.join(_SECTIONS)}")
    if "memory" not in data:
        _fail("memory", "required section [memory] is missing (em_size and sample_shape at least)")
    base = None if source is None else os.path.dirname(os.path.abspath(source))

    memory = _check_keys(data["memory"], "memory", _TOML_KEYS["memory"], _REQUIRED["memory"], "table [memory]")
    extras = memory.get("extras", {})
    if not isinstance(extras, Mapping):
        _fail("memory.extras", f"expected tables such as [memory.extras.logits], got {_show(extras)}")
    extras = dict(extras)  # any name; MemoryConfig checks it
    for name, spec in extras.items():
        spec = _check_keys(spec, f"memory.extras.{name}", _EXTRA_KEYS, _EXTRA_KEYS, "table {shape, dtype}")
        extras[name] = (spec["shape"], spec["dtype"])
    memory["extras"] = extras
    if "saliency" in memory:
        table = _check_keys(memory["saliency"], "memory.saliency", [f.name for f in fields(SaliencyConfig)],
                            what="table [memory.saliency]")
        memory["saliency"] = _section(SaliencyConfig, table, "memory.saliency")
    if "state_dir" in memory:
        memory["state_dir"] = _resolve(memory["state_dir"], base)
    memory_cfg = _section(MemoryConfig, memory, "memory")

    swap = _section(SwapConfig, _check_keys(data.get("swap", {}), "swap", _TOML_KEYS["swap"], what="table [swap]"),
                    "swap")
    write_behind = _section(
        WriteBehindConfig,
        _check_keys(data.get("write_behind", {}), "write_behind", _TOML_KEYS["write_behind"],
                    what="table [write_behind]"),
        "write_behind")

    raw_tiers = data.get("tiers", [])
    if not isinstance(raw_tiers, (list, tuple)):
        _fail("tiers", f"expected an array of tables ([[tiers]]), got {_show(raw_tiers)}")
    tiers = []
    for i, raw in enumerate(raw_tiers):
        prefix = f"tiers[{i}]"
        table = _check_keys(raw, prefix, _TOML_KEYS["tiers"], _REQUIRED["tiers"], "table [[tiers]]")
        if table["kind"] in TIER_KINDS:  # an unknown kind is reported as such
            for name, only in _KIND_ONLY.items():
                if name in table and table["kind"] != only:
                    _fail(f"{prefix}.{name}", f"applies to {only} tiers only; this tier is {table.get('kind')!r}")
        if "capacity" in table:
            table.update(_capacity(table.pop("capacity"), f"{prefix}.capacity"))
        elif table.get("layout") != "imagefolder":  # the one tier without a capacity: it holds its folder
            _fail(f"{prefix}.capacity", "required key is missing")
        table["path"] = _resolve(table["path"], base)
        tiers.append(_section(TierConfig, table, prefix, _CAPACITY_KEYS))
    return CarouselConfig(memory_cfg, swap, write_behind, tuple(tiers), source)


def _capacity(value: Any, key: str) -> dict[str, int]:
    if isinstance(value, bool):
        _fail(key, f"expected a sample count such as 50000 or a size such as \"4GiB\", got {_show(value)}")
    if isinstance(value, int):
        return {"capacity_samples": value}
    if isinstance(value, str):
        if value.strip().isdigit():
            # "50000" would silently mean bytes: make the unit explicit either way.
            _fail(key, f"{value!r} has no unit: write {value.strip()} for samples or \"{value.strip()}B\" for bytes")
        try:
            return {"capacity_bytes": parse_size(value, "capacity")}
        except InvalidURLError as exc:
            _fail(key, str(exc))
    _fail(key, f"expected a sample count such as 50000 or a size such as \"4GiB\", got {_show(value)}")


def _format_size(nbytes: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"
