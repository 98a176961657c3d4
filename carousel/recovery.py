"""A memory's crash recovery: its checkpoint file, the catalog rebuilt from the tiers, the EM refilled.

The tiers are the truth. :func:`rebuild_catalog` lists every tier's ids (an id found in two tiers
after a crash mid-demotion is kept in the first), takes labels and task ids from the last
checkpoint (``<state_dir>/em-state.npz``, written by :func:`save_state`: label/task columns, EM slot
list, statistics) and reads only samples stored after it; :func:`refill_em` then refills the EM
from the checkpointed slot list or, without one, a class-balanced random draw. New ids start above
every stored id, every id the checkpoint knew and the reserved bound (:mod:`carousel.ids`).
``CarouselMemory`` runs both when it opens; nothing here runs on the data path.

An adopted read-only tier (an image folder, ``storage_backends.image_folder``; the last tier) is
learnt differently: its ids are ``0 .. N-1`` and its labels come from its listing
(``store.get_labels``: nothing decoded), registered *dormant* (see :mod:`carousel.catalog`); it is
never deleted from; its samples count neither as ``seen`` by admission nor towards the current
task, and a fresh memory's EM is not filled from it (that would replay classes the stream has not
reached). :func:`check_adoption` pins the folder's listing in ``<state_dir>/adopted.json`` the
first time, and refuses to open the memory if the listing changed since (ids would name other
images) or if the memory already handed out ids when the folder was added (they would clash).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage_backends import CorruptRecordError

from .catalog import EVICTED, UNUSED, Catalog
from .config import WEIGHT_FIELD
from .em_pool import EMPool, balanced_weights
from .ids import IdAllocator, read_bound
from .integrity import Verifier
from .kinds import Codec, RawCodec
from .tiers import Tier

log = logging.getLogger("carousel.memory")  # the memory's logger: recovery is part of opening one

STATE_FILE = "em-state.npz"
ADOPTED_FILE = "adopted.json"  # the adopted tier's listing, pinned (check_adoption)


class AdoptionError(ValueError):
    """An adopted tier that cannot be used as it is (its listing changed, its ids clash); the
    memory raises it as a ``ConfigError`` naming the tier."""


def load_state(state_dir: Path | None) -> dict[str, np.ndarray]:
    """The last checkpoint's arrays (empty without one). Checked loosely: the tiers stay the
    truth, the checkpoint only saves reading labels and restores the EM and statistics."""
    path = state_dir / STATE_FILE if state_dir else None
    if path is None or not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as st:
            return {k: st[k] for k in st.files}
    except (OSError, ValueError, EOFError) as exc:
        log.warning("ignoring an unreadable checkpoint %s: %s", path, exc)
        return {}


def save_state(state_dir: Path, state: Mapping[str, np.ndarray]) -> None:
    """Replace the checkpoint durably: temp file, fsync, rename, fsync of the folder."""
    tmp = state_dir / (STATE_FILE + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **state)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, state_dir / STATE_FILE)
    fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)


@dataclass
class Recovered:
    """What :func:`rebuild_catalog` found: the id allocator (next id above every id ever handed
    out), the samples seen (for admission), and ``report`` (``memory.recovered``: samples found,
    labels read from records)."""

    ids: IdAllocator
    seen: int
    report: dict[str, Any]


def rebuild_catalog(catalog: Catalog, tiers: list[Tier], codec: Codec, verifier: Verifier | None,
                    state: Mapping[str, np.ndarray], state_dir: Path | None) -> Recovered:
    """Rebuild the catalog from the tiers (they are the truth) after a restart or a crash.

    Labels and task ids of ids the last checkpoint knew come from it (a sample's label never
    changes and ids are never reused, see carousel.ids); only samples stored after it are
    read. An id found in two tiers (a crash mid-demotion) is kept in the first. New ids start
    above every stored id, every id the checkpoint knew and the reserved bound.

    In the integrity mode the reference CRCs of ids the checkpoint knew come from it (they were
    computed at ``add()``, so they tell a wrong record on storage); the others' come from their
    records as read here, which proves less: such a record is its own reference.
    """
    ckpt_labels = state.get("label", np.zeros(0, np.int64))
    ckpt_crc = _checkpoint_crcs(verifier, state)
    ckpt_tasks = state.get("task", np.zeros(0, np.int64))
    ckpt_nbytes = state.get("nbytes", np.zeros(0, np.uint32))
    raw = isinstance(codec, RawCodec)
    top = -1
    seen = read = 0
    adopted = 0
    for tier in tiers:
        ids = tier.store.ids()
        if not ids.size:
            continue
        top = max(top, int(ids.max()))
        if tier.readonly:
            adopted = _learn_adopted(catalog, tier, ids, codec, verifier)
            continue
        known = ids < catalog.label.size
        known[known] = catalog.home[ids[known]] >= 0
        if known.any():
            tier.store.delete_many(ids[known])
        ids = ids[~known]
        have = ids < ckpt_labels.size
        have[have] = ckpt_labels[ids[have]] >= 0
        if not raw:  # a record's size is in the checkpoint (from this version on) or in the record
            have[have] = ids[have] < ckpt_nbytes.size
            have[have] = ckpt_nbytes[ids[have]] > 0
        catalog.register(ids[have], ckpt_labels[ids[have]], ckpt_tasks[ids[have]], tier.index)
        if not raw:
            catalog.nbytes[ids[have]] = ckpt_nbytes[ids[have]]
        if verifier is not None:
            _recover_references(catalog, verifier, tier, ids[have], ckpt_crc)
        unknown = ids[~have]
        for lo in range(0, unknown.size, 4096):
            part = unknown[lo:lo + 4096]
            fields = tier.store.get_many(part)
            catalog.register(part, fields["y"].astype(np.int64), fields["task"].astype(np.int64), tier.index)
            catalog.nbytes[part] = codec.nbytes(fields)
            if verifier is not None:
                catalog.crc[part] = verifier.crcs(fields)
        if raw:
            catalog.nbytes[ids] = codec.nbytes({"y": ids})
        seen += ids.size
        read += unknown.size
    # Never reuse an id the checkpoint knew, even one evicted since (its label there is final),
    # nor one an add() handed out that a crash lost before write-behind stored it.
    allocator = IdAllocator.open(state_dir if tiers else None, max(top + 1, ckpt_labels.size))
    # Columns for every id below the next one, so a skipped or lost id reads as UNUSED (label
    # -1) in observe() and retain() instead of running off the arrays; samples the checkpoint
    # knew that are on no tier now were evicted.
    catalog.ensure_capacity(allocator.next_id)
    gone = np.flatnonzero(ckpt_labels >= 0)
    catalog.home[gone[catalog.home[gone] == UNUSED]] = EVICTED
    if adopted:  # classes the stream brought before the checkpoint are swapped in again
        streamed = ckpt_labels[adopted:]
        catalog.open_classes(streamed[streamed >= 0])
    total_seen = max(seen, int(state["seen"][0])) if "seen" in state else seen
    report = {"samples": seen, "labels_read": read, **({"adopted": adopted} if adopted else {})}
    return Recovered(allocator, total_seen, report)


def _learn_adopted(catalog: Catalog, tier: Tier, ids: np.ndarray, codec: Codec, verifier: Verifier | None) -> int:
    """Register an adopted read-only tier's samples, dormant, labels from its listing when the
    store has one (``get_labels``), else from its records; returns how many ids it numbers (its
    top id + 1: stream ids start above). Never deletes: an id an earlier tier holds too cannot
    happen (stream ids start above the folder's, see :func:`check_adoption`) and is refused."""
    clash = ids < catalog.label.size
    clash[clash] = catalog.home[ids[clash]] >= 0
    if clash.any():
        raise AdoptionError(f"ids {ids[clash][:8].tolist()} are on a writable tier and on the adopted tier "
                         f"{tier.store.url}: the adopted folder changed, or was added to a memory that held samples")
    get_labels = getattr(tier.store, "get_labels", None)
    for lo in range(0, ids.size, 1 << 16):
        part = ids[lo:lo + (1 << 16)]
        fields = get_labels(part) if get_labels is not None else tier.store.get_many(part)
        catalog.register(part, fields["y"].astype(np.int64), fields["task"].astype(np.int64), tier.index,
                         dormant=True)
    catalog.nbytes[ids] = codec.nbytes({"y": ids})
    if verifier is not None:  # such a record is its own reference: read (and decode) every image once
        log.info("integrity mode: reading the %d adopted samples of %s for their references", ids.size,
                 tier.store.url)
        for lo in range(0, ids.size, 4096):
            part = ids[lo:lo + 4096]
            while part.size:
                try:
                    catalog.crc[part] = verifier.crcs(tier.store.get_many(part))
                    break
                except CorruptRecordError as exc:  # unusable images: evicted for this open
                    catalog.home[exc.ids] = EVICTED
                    log.warning("%s", exc)
                    part = part[~np.isin(part, exc.ids)]
    return int(ids.max()) + 1


def check_adoption(state_dir: Path, tiers: list[Tier], state: Mapping[str, np.ndarray]) -> None:
    """Pin the adopted tier's listing in ``<state_dir>/adopted.json``, or check it against the pin.

    Raises :class:`AdoptionError` (the memory turns it into a ``ConfigError``) when the listing changed
    since the memory adopted the folder (its ids would name other images than the catalog and
    the checkpoint say), or when a memory that already handed out ids is given a folder to adopt
    (the folder's ids, ``0 .. N-1``, would clash with them). Written atomically before anything
    else happens, so a crash leaves either no pin (and a memory that holds nothing) or the pin.
    """
    tier = next((t for t in tiers if t.readonly), None)
    if tier is None:
        return
    store = tier.store
    listing = {"url": store.url, "samples": int(store.ids().max()) + 1 if len(store) else 0,
               "digest": getattr(store, "listing_digest", None)}
    path = state_dir / ADOPTED_FILE
    if path.exists():
        try:
            pinned = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise AdoptionError(f"{path} is unreadable ({exc}): cannot tell whether the adopted folder changed") from None
        if pinned.get("samples") != listing["samples"] or pinned.get("digest") != listing["digest"]:
            raise AdoptionError(
                f"the adopted folder {store.url} changed since this memory adopted it ({pinned.get('samples')} "
                f"images then, {listing['samples']} now, listing digest {str(pinned.get('digest'))[:12]} then, "
                f"{str(listing['digest'])[:12]} now): its ids would name other images. Restore the folder as it "
                f"was, or start a new memory (empty tiers and state_dir {state_dir})")
        return
    used = [what for what, found in (
        ("samples on the writable tiers", any(len(t.store) for t in tiers if not t.readonly)),
        ("a checkpoint", "label" in state and bool((state["label"] >= 0).any())),
        ("reserved ids", state_dir.exists() and read_bound(state_dir) > 0)) if found]
    if used:
        raise AdoptionError(f"cannot adopt {store.url} into a memory that already handed out sample ids ({', '.join(used)} "
                         f"in {state_dir}): the folder's ids 0..{listing['samples'] - 1} would clash with them; "
                         "start a new memory (empty tiers and state_dir)")
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (ADOPTED_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(listing, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoint_crcs(verifier: Verifier | None, state: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The checkpoint's reference CRCs (rows by id), if it has them for this memory's checked fields."""
    if verifier is None or "crc" not in state or "crc_fields" not in state:
        return None
    crc, names = state["crc"], tuple(str(v) for v in state["crc_fields"].tolist())
    if names != verifier.checked or crc.ndim != 2 or crc.shape[1] != len(names) or crc.dtype != np.uint32:
        log.warning("the checkpoint's integrity references are for the fields %s, not %s: taking them from "
                    "the stored records", list(names), list(verifier.checked))
        return None
    return crc


def _recover_references(catalog: Catalog, verifier: Verifier, tier: Tier, ids: np.ndarray,
                        ckpt_crc: np.ndarray | None) -> None:
    """Reference CRCs of stored ``ids`` the checkpoint knew: its own (from ``add()``), or, where
    it has none (written without the integrity mode), computed from the records."""
    if ckpt_crc is not None:
        ok = ids < ckpt_crc.shape[0]
        catalog.crc[ids[ok]] = ckpt_crc[ids[ok]]
        ids = ids[~ok]
    for lo in range(0, ids.size, 4096):
        part = ids[lo:lo + 4096]
        catalog.crc[part] = verifier.crcs(tier.store.get_many(part))


def refill_em(pool: EMPool, catalog: Catalog, tiers: list[Tier], codec: Codec, state: Mapping[str, np.ndarray],
              rng: np.random.Generator, coreset: bool, current_task: int) -> int:
    """Fill the EM from storage: the checkpointed slots when there are some, else a
    class-balanced random draw. Returns the current task (the checkpoint's, else the highest
    stored; ``current_task`` when there is nothing to read)."""
    if not tiers or not catalog.n:
        return current_task
    n = catalog.n
    stored = np.flatnonzero(catalog.home[:n] >= 0)
    # An adopted tier's samples never fill a fresh EM nor tell the current task: they may hold
    # every class of the data set, future tasks' too (only the checkpointed slots bring them back).
    adopted = [t.index for t in tiers if t.readonly]
    if adopted:
        stored = stored[~np.isin(catalog.home[stored], adopted)]
    want = np.zeros(0, np.int64)
    if state:
        want = state["slot_ids"]
        m = min(n, state["correct"].size)
        for col in ("correct", "entropy", "loss", "replays", "weight"):
            if col in state:  # checkpoints older than the coreset weights have no "weight"
                getattr(catalog, col)[:min(m, state[col].size)] = state[col][:m]
        current_task = int(state["current_task"][0])
        want = want[(want >= 0) & (want < n)]
        want = want[catalog.home[want] >= 0][: pool.size]
    # A coreset's free slots are free on purpose (retain() chose fewer samples): keep them so.
    top_up = not (state and coreset)
    if top_up and want.size < min(pool.size, stored.size):
        rest = np.setdiff1d(stored, want)
        extra = rng.choice(rest, min(pool.size - want.size, rest.size), replace=False,
                           p=balanced_weights(catalog.label[rest]))
        want = np.concatenate([want, extra])
    if not current_task >= 0 and stored.size:
        current_task = int(catalog.task[stored].max())
    for tier in tiers:
        sel = want[catalog.home[want] == tier.index]
        if not sel.size:
            continue
        data = codec.decode(tier.store.get_many(sel))
        if WEIGHT_FIELD in data and coreset:
            data[WEIGHT_FIELD] = catalog.weight[sel]  # as retain() last set it, not as stored
        free = np.flatnonzero(pool.slot_ids < 0)[: sel.size]
        pool.write(free, sel, data)
        catalog.slot[sel] = free
    return current_task
