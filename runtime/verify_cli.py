"""``tiermem verify STORE``: read every block of a store and check it against its checksum.

Exit 0 when every block matches, 1 naming every bad block (table, rows,
block, file) when some do not, 2 for a store that cannot be opened or has no
checksums (a version-1 store: ``tiermem info`` calls it unverified). The
progress bar is drawn on a terminal only.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_verify_command", "cmd_verify", "VERIFY_COMMANDS"]


def add_verify_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    v = sub.add_parser("verify", help="check every block of a store against its checksum",
                       description="Scrub a store: read every chunk file once and check each "
                       "4 KiB block against its checksum. Exit 0 if all match, 1 naming every "
                       "bad block, 2 if the store cannot be checked.")
    v.add_argument("store")
    v.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    v.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from tiermem.errors import StoreFormatError
    from tiermem.format import open_store
    from tiermem.integrity import scrub

    info = open_store(args.store)
    if not info.verified:
        raise StoreFormatError(f"{info.path} has no checksums (store format version "
                               f"{info.version}): nothing to verify; recreate it to add them")
    total = sum(t.spec.nbytes for t in info.tables)
    show = not args.quiet and sys.stderr.isatty()
    bad = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not show,
              leave=False) as bar:
        for b in scrub(info, on_bytes=bar.update):
            bad.append(b)
            if not args.json:
                tqdm.write(f"bad block: {b}", file=sys.stdout)
    if args.json:
        print(json.dumps({"store": str(info.path), "ok": not bad, "bad_blocks": [
            {"table": b.table, "array": b.what, "rows": list(b.rows), "chunk": b.chunk,
             "block": b.block, "file": str(b.path)} for b in bad]}, indent=2))
    elif bad:
        print(f"store {info.path}: {len(bad)} bad block(s) in "
              f"{len({(b.table, b.what, b.chunk) for b in bad})} file(s): the store is corrupt",
              file=sys.stderr)
    else:
        print(f"store {info.path}: all blocks match their checksums "
              f"({len(info.tables)} tables, {total / 2**20:.1f} MiB)")
    return 1 if bad else 0


VERIFY_COMMANDS = {"verify": cmd_verify}
