"""runtime/cli/options.py: flags generated from config dataclasses (names, types, defaults,
help from the attribute docstrings, Choice enums, bools, nested configs), values checked by
the class, the config built back; and every field of the real configs has its flag."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

import pytest

from runtime.cli.app import build_parser
from runtime.cli.options import ConfigOptions, config_fields
from tiermem.config import Choice
from tiermem.errors import ConfigError

HERE = "tests.test_cli_options"
"""This module as the options import it (pytest may import it under another name)."""


class Mode(Choice):
    """How it runs."""

    FAST = "fast"
    SAFE = "safe"


@dataclass(frozen=True)
class Inner:
    depth: int = 1 << 2
    """How deep it goes."""

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ConfigError(f"Inner.depth must be >= 1, got {self.depth}")


@dataclass(frozen=True)
class Outer:
    max_queue_delay_ms: float | None = None
    """A bound in 100% time."""
    mode: Mode = Mode.FAST
    on: bool = True
    """Switched on."""
    label: str = "x"
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.parse(self.mode))


def _same(got, want) -> bool:
    return type(got).__qualname__ == type(want).__qualname__ and repr(got) == repr(want)


def _parser(**kw):
    p = argparse.ArgumentParser(prog="t")
    return p, ConfigOptions(p, f"{HERE}:Outer", **kw)


def test_fields_read_from_source() -> None:
    got = {f.name: f for f in config_fields(f"{HERE}:Outer")}
    assert list(got) == [f.name for f in fields(Outer)]
    assert (got["max_queue_delay_ms"].kind, got["max_queue_delay_ms"].optional) == ("float", True)
    assert got["max_queue_delay_ms"].help == "A bound in 100% time."
    assert (got["mode"].kind, got["mode"].default, got["mode"].choices) == (
        "choice", "fast", ("fast", "safe"))
    assert got["mode"].help == "How it runs."  # no docstring of its own: the enum's
    assert got["inner"].config == f"{HERE}:Inner"
    assert config_fields(f"{HERE}:Inner")[0].default == 4


def test_flags_defaults_and_build() -> None:
    p, opts = _parser()
    a = p.parse_args([])
    assert _same(opts.build(a), Outer())
    a = p.parse_args(["--max-queue-delay-ms", "5", "--mode", "safe", "--no-on", "--label", "y",
                      "--depth", "7"])
    assert _same(opts.build(a), Outer(5.0, Mode.SAFE, False, "y", Inner(7)))
    helps = {a.dest: a.help for a in p._actions}
    assert helps["max_queue_delay_ms"] == "A bound in 100%% time."  # argparse's % escaped
    assert helps["depth"] == "How deep it goes. (default: 4)"


def test_bad_value_is_an_argparse_error_in_the_class_words(capsys) -> None:
    p, _ = _parser()
    for argv, words in ((["--depth", "0"], "Inner.depth must be >= 1, got 0"),
                        (["--depth", "x"], "expected an integer, got 'x'"),
                        (["--mode", "slow"], "unknown mode 'slow'; expected one of: fast, safe")):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
        assert words in capsys.readouterr().err


def test_prefix_names_exclude_defaults_and_fixed() -> None:
    p, opts = _parser(prefix="o", names={"mode": "how"}, exclude=("label", "depth"),
                      defaults={"on": False})
    flags = {s for a in p._actions for s in a.option_strings}
    assert {"--o-max-queue-delay-ms", "--how", "--o-on", "--no-o-on"} <= flags
    assert not {"--o-label", "--o-depth", "--depth"} & flags
    assert _same(opts.build(p.parse_args([]), label="z", depth=9),
                 Outer(None, Mode.FAST, False, "z", Inner(9)))
    with pytest.raises(ConfigError, match="names no field"):
        _parser(exclude=("nope",))


def test_every_field_of_the_real_configs_has_a_flag() -> None:
    """serve's options: TierConfig, CacheConfig (the capacity is --cache-size),
    PrefetchConfig, ServingConfig (prefetch_batches follows --prefetch-lookahead)."""
    ap = build_parser()
    a = ap.parse_args(["serve", "--model", "m", "--store", "s"])
    from tiermem.cache.cache import CacheConfig
    from tiermem.cache.prefetch import PrefetchConfig
    from tiermem.config import TierConfig

    for opts, cls, skip in ((a.tier_options, TierConfig, ()),
                            (a.cache_options, CacheConfig,
                             ("capacity_rows", "capacity_bytes", "capacity_fraction")),
                            (a.prefetch_options, PrefetchConfig, ())):
        assert set(opts.dests) == {f.name for f in fields(cls)} - set(skip), cls
        assert all(hasattr(a, d) for d in opts.dests.values())
    assert "prefetch_batches" not in a.serving_options.dests
    assert a.tier_options.build(a) == TierConfig()
    assert a.max_queue_requests == 1024 and a.warmup is True
