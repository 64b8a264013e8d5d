"""``tiermem warmup``: fill Numba's on-disk kernel cache so that the first real run is warm.

Kernels are compiled per argument types: row dtype, row width (a kernel per
width up to 512), weighted or not, serial or parallel, cache or not. With
``--store`` (and ``--model``) the store's own tables are warmed on every tier
asked for, behind a cache with the prefetcher too; without, small temporary
stores of the ``--dtypes`` x ``--dims`` given are (default: the demo's
float32 x 16). All cache policies share one batch kernel, so one policy warms
them all. Later processes load the compiled code from ``__pycache__`` next to
the kernels (``tiermem warmup`` prints where) in well under a second.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["cmd_warmup", "register"]

_TIERS = ("dram", "ssd", "cxl")


def _csv(choices: tuple[str, ...] | None = None, kind: type = str):  # type: ignore[no-untyped-def]
    def parse(s: str) -> list[Any]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        out = []
        for x in items:
            if choices is not None and x not in choices:
                raise argparse.ArgumentTypeError(f"{x!r} is not one of {', '.join(choices)}")
            try:
                out.append(kind(x))
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad value {x!r}") from None
        return out
    return parse


def register(subparsers: Any) -> None:
    subparsers.add_parser(
        "warmup", help="compile every kernel into Numba's on-disk cache (first runs are warm)",
        description=__doc__.split("\n\n")[1].replace("\n", " "), options=_options,
        handler=cmd_warmup)


def _options(w: argparse.ArgumentParser) -> None:
    w.add_argument("--store", help="warm this store's tables (default: small temporary stores)")
    w.add_argument("--model", help="with --store: a checkpoint, to warm its whole session")
    w.add_argument("--tiers", type=_csv(_TIERS), default=list(_TIERS),
                   help="tiers to warm (default: dram,ssd,cxl)")
    w.add_argument("--no-cache", action="store_true",
                   help="skip the cache + prefetcher in front of ssd/cxl")
    w.add_argument("--dtypes", type=_csv(("float32", "float16", "int8")), default=["float32"],
                   help="without --store: row dtypes (default float32)")
    w.add_argument("--dims", type=_csv(kind=int), default=[16],
                   help="without --store: row widths (default 16, the demo's)")
    w.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def _warm_store(store: Path, model: str | None, tiers: list[str], cache: bool
                ) -> list[dict[str, Any]]:
    from tiermem.cache.cache import CacheConfig, CachedTier
    from tiermem.cache.policy import Policy
    from tiermem.cache.prefetch import PrefetchConfig
    from tiermem.config import TierConfig, TierKind
    from tiermem.format import open_store
    from tiermem.tiers import open_tier
    from tiermem.warmup import warm_tier

    out = []
    setups = [(t, False) for t in tiers] + [(t, True) for t in tiers if cache and t != "dram"]
    for kind, cached in setups:
        label = kind + ("+cache" if cached else "")
        ccfg = CacheConfig(policy=Policy.CLOCK, capacity_fraction=0.1) if cached else None
        pcfg = PrefetchConfig() if cached else None
        if model is not None:
            from runtime.session import InferenceSession, RuntimeConfig

            with InferenceSession.open(model, store, RuntimeConfig(
                    tier=TierConfig(kind=TierKind.parse(kind)), cache=ccfg, prefetch=pcfg)) as sess:
                rep = sess.warmup()
        else:
            tier = open_tier(open_store(store), TierConfig(kind=TierKind.parse(kind)))
            try:
                if ccfg is not None:  # cached
                    tier = CachedTier(tier, ccfg)
                rep = warm_tier(tier, prefetch=pcfg)
            finally:
                tier.close()
        out.append({"store": str(store), "setup": label, **rep})
    return out


def cmd_warmup(args: argparse.Namespace) -> int:
    from tiermem.errors import ConfigError

    if args.model is not None and args.store is None:
        raise ConfigError("--model needs --store (the store of the model's tables)")
    t0 = time.perf_counter()
    cache = not args.no_cache
    if args.store is not None:
        runs = _warm_store(Path(args.store), args.model, args.tiers, cache)
    else:
        from tiermem.format import create_random_store, table_specs

        bad = [d for d in args.dims if not 1 <= d <= 4096]
        if bad:
            raise ConfigError(f"--dims: widths must be in 1..4096, got {bad}")
        runs = []
        with tempfile.TemporaryDirectory(prefix="tiermem-warmup-") as tmp:
            for dtype in args.dtypes:
                for dim in args.dims:
                    path = Path(tmp) / f"{dtype}x{dim}.zarr"
                    create_random_store(path, table_specs(
                        [("a", 5000, dim), ("b", 300, dim), ("c", 40, dim)], dtype))
                    runs.extend(_warm_store(path, None, args.tiers, cache))
    from tiermem.kernels import kernel_cache_dir

    report = {"seconds": time.perf_counter() - t0, "kernel_cache": kernel_cache_dir(),
              "compiled": sum(r["compiled"] for r in runs),
              "loaded_from_cache": sum(r["loaded_from_cache"] for r in runs), "runs": runs}
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        for r in runs:
            print(f"{Path(r['store']).name:<22} {r['setup']:<10} {r['seconds']:6.2f} s  "
                  f"compiled {r['compiled']:>2}, loaded {r['loaded_from_cache']:>2}")
        print(f"warm: {report['compiled']} kernel(s) compiled, {report['loaded_from_cache']} "
              f"loaded, in {report['seconds']:.1f} s; cache: {report['kernel_cache']}")
    return 0
