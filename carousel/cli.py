"""The ``carousel`` command line.

``carousel store info URL``    schema, record count, bytes on disk, chunking of a store
``carousel store verify URL``  read every record, check every checksum (corrupt ones are
                               quarantined when the store is writable); exit 1 if any failed
Exit codes: 0 ok, 1 corrupt records found, 2 bad usage or a store that cannot be opened.
"""

from __future__ import annotations

import argparse
import sys

from storage_backends import CorruptRecordError, StoreError, open_store

from . import __version__


def _info(url: str) -> int:
    with open_store(url) as store:
        print(f"url:        {store.url}")
        print(f"backend:    {type(store).__name__}")
        print(f"records:    {len(store)}")
        print(f"on disk:    {store.nbytes} bytes")
        print(f"chunks:     {store.num_chunks()} x {store.chunk_rows} rows")
        print(f"quarantine: {store.quarantined_ids().size} records")
        print("schema:")
        for name, spec in store.schema.items():
            print(f"  {name:<12} {spec.dtype.name:<8} {spec.shape}")
    return 0


def _verify(url: str) -> int:
    bad = 0
    checked = 0
    with open_store(url) as store:
        for i in range(store.num_chunks()):
            try:
                checked += store.get_chunk(i).ids.size
            except CorruptRecordError as exc:
                bad += exc.ids.size
                print(f"corrupt: {exc}", file=sys.stderr)
                checked += store.get_chunk(i).ids.size  # the rest of the chunk, corrupt ones gone
            except IndexError:
                break  # the store shrank while we walked (generic chunking)
    print(f"verified {checked} records, {bad} corrupt")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carousel", description="storage-tiered replay memory")
    parser.add_argument("--version", action="version", version=f"carousel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    store = sub.add_parser("store", help="inspect a storage tier").add_subparsers(dest="action", required=True)
    store.add_parser("info", help="schema, size and chunking of a store").add_argument("url")
    store.add_parser("verify", help="check every record's checksum").add_argument("url")
    args = parser.parse_args(argv)
    try:
        return {"info": _info, "verify": _verify}[args.action](args.url)
    except StoreError as exc:
        print(f"carousel: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
