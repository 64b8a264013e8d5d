"""``tiermem create-store``, ``info`` and ``verify``: making, listing and scrubbing stores."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["cmd_create_store", "cmd_info", "cmd_verify", "register"]


def _table_list(s: str) -> list[tuple[str, int, int]]:
    """``name:rows:dim,...`` or ``rows:dim,...`` (names t0, t1, ...)."""
    out = []
    for i, item in enumerate(p for p in s.split(",") if p.strip()):
        parts = item.strip().split(":")
        try:
            if len(parts) == 3:
                out.append((parts[0], int(parts[1]), int(parts[2])))
            elif len(parts) == 2:
                out.append((f"t{i}", int(parts[0]), int(parts[1])))
            else:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad table {item!r}: expected name:rows:dim or rows:dim") from None
    if not out:
        raise argparse.ArgumentTypeError("no tables given")
    return out


def register(subparsers: Any) -> None:
    subparsers.add_parser(
        "create-store", help="create a store: random tables or from a checkpoint",
        description="Create a tiermem store (a zarr v3 group). Creation streams in blocks and "
                    "is atomic: an interrupted run leaves no store.",
        options=_create_options, handler=cmd_create_store)
    subparsers.add_parser("info", help="show a store's tables, sizes and dtypes",
                          description="Validate a store and list its tables.",
                          options=_info_options, handler=cmd_info)
    subparsers.add_parser(
        "verify", help="check every block of a store against its checksum",
        description="Scrub a store: read every chunk file once and check each 4 KiB block "
                    "against its checksum. Exit 0 if all match, 1 naming every bad block, 2 "
                    "if the store cannot be checked.",
        options=_verify_options, handler=cmd_verify)


def _create_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("out", help="path of the new store (a folder, e.g. tables.zarr)")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--random", metavar="TABLES", type=_table_list,
                     help="random tables: name:rows:dim,... (or rows:dim,...)")
    src.add_argument("--from-checkpoint", metavar="CKPT",
                     help="a torch checkpoint in the facebookresearch/dlrm or TorchRec layout")
    c.add_argument("--layout", choices=["auto", "dlrm", "torchrec"], default="auto",
                   help="checkpoint layout (default: detect)")
    c.add_argument("--dtype", choices=["float32", "float16", "int8"], default="float32",
                   help="row storage type; int8 is row-wise quantized (scale, bias per row)")
    c.add_argument("--seed", type=int, default=0, help="seed of random tables")
    c.add_argument("--overwrite", action="store_true", help="replace an existing store")
    c.add_argument("--no-progress", "--quiet", "-q", dest="no_progress", action="store_true",
                   help="no progress bar (there is one only when stderr is a terminal)")


def _info_options(i: argparse.ArgumentParser) -> None:
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="machine-readable output")


def _verify_options(v: argparse.ArgumentParser) -> None:
    v.add_argument("store")
    v.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    v.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_create_store(args: argparse.Namespace) -> int:
    from tiermem.format import create_random_store, table_specs

    progress = not args.no_progress and sys.stderr.isatty()  # never a bar into a pipe
    if args.from_checkpoint:
        from runtime.convert import store_from_checkpoint

        info = store_from_checkpoint(args.from_checkpoint, args.out, layout=args.layout,
                                     dtype=args.dtype, overwrite=args.overwrite,
                                     progress=progress)
    else:
        info = create_random_store(args.out, table_specs(args.random, args.dtype), seed=args.seed,
                                   overwrite=args.overwrite, progress=progress)
    print(f"created {info.path}: {len(info.tables)} tables, {info.nbytes / 2**20:.1f} MiB")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from tiermem.format import open_store

    info = open_store(args.store)
    if args.json:
        print(json.dumps({"path": str(info.path), "nbytes": info.nbytes, "attrs": info.attrs,
                          "version": info.version,
                          "checksums": "tmh64 per 4 KiB block" if info.verified else "unverified",
                          "tables": [{**t.spec.to_dict(), "chunk_rows": t.chunk_rows,
                                      "nbytes": t.spec.nbytes} for t in info.tables]}, indent=2))
        return 0
    print(f"store {info.path}: {len(info.tables)} tables, {info.nbytes / 2**20:.1f} MiB")
    print(f"format {info.version}, " + (("checksums per 4 KiB block" + (
        " and per row" if info.version >= 3 else "") + " (checked on every read; "
        "`tiermem verify` scrubs it all)") if info.verified else
                                        "unverified: no checksums (an older store; recreate it)"))
    print(f"{'table':<24} {'rows':>14} {'dim':>5} {'dtype':>8} {'MiB':>10} {'chunk rows':>11}")
    for t in info.tables:
        s = t.spec
        print(f"{s.name:<24} {s.rows:>14,} {s.dim:>5} {s.dtype.value:>8} "
              f"{s.nbytes / 2**20:>10.2f} {t.chunk_rows:>11,}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every block matches, 1 naming every bad block (table, rows, block, file)
    when some do not, 2 for a store that cannot be opened or has no checksums (a version-1
    store: ``tiermem info`` calls it unverified). The progress bar is drawn on a terminal
    only."""
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
