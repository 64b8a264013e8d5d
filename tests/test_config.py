"""The shared config machinery (tiermem/config.py): Choice enums, ConfigDict's
to_dict/from_dict round trip on every config dataclass."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.batcher import BatcherConfig, OverloadMode
from runtime.distributed.planner import CostModel
from runtime.distributed.sharded import ShardOptions, Transport
from runtime.model import DLRMConfig, Interaction
from runtime.service import ServingConfig
from runtime.session import RuntimeConfig
from tiermem.cache.cache import Admission, CacheConfig, CacheIndex
from tiermem.cache.policy import Policy
from tiermem.cache.prefetch import PrefetchConfig
from tiermem.config import Choice, ConfigDict, TierConfig, TierKind
from tiermem.errors import ConfigError
from tiermem.format import TableSpec
from traces.synth import GeneratorConfig, Pooling, PoolingKind


def _json_round_trip(cfg: ConfigDict) -> None:
    d = json.loads(json.dumps(cfg.to_dict()))  # JSON's types only
    assert type(cfg).from_dict(d) == cfg
    assert type(cfg).from_dict(d).to_dict() == d


# -- enums -------------------------------------------------------------------------------

@pytest.mark.parametrize("enum", [TierKind, Policy, Admission, CacheIndex, OverloadMode,
                                  Transport, Interaction])
def test_choices_parse_their_values_and_name_the_valid_ones(enum: type[Choice]) -> None:
    for m in enum:
        assert enum.parse(m.value) is m and enum.parse(m.value.upper()) is m
        assert enum.parse(m) is m
        assert m == m.value and f"{m}" == m.value == str(m)  # str-like in comparisons, text
        assert json.dumps(m) == json.dumps(m.value)
    with pytest.raises(ConfigError) as e:
        enum.parse("no-such-choice")
    assert "'no-such-choice'" in str(e.value)
    assert all(m.value in str(e.value) for m in enum)


@pytest.mark.parametrize(("make", "field_word"), [
    (lambda: CacheConfig(capacity_rows=4, policy="mru"), "policy"),
    (lambda: CacheConfig(capacity_rows=4, dynamic="mru"), "policy"),
    (lambda: CacheConfig(capacity_rows=4, admission="bloom"), "admission"),
    (lambda: CacheConfig(capacity_rows=4, index="btree"), "index"),
    (lambda: BatcherConfig(overload="drop"), "overload"),
    (lambda: ShardOptions(transport="grpc"), "transport"),
    (lambda: DLRMConfig(1, 2, 1, (2,), (1,), interaction="dot"), "interaction"),
])
def test_config_fields_take_the_strings_and_reject_others(make, field_word: str) -> None:
    with pytest.raises(ConfigError, match=field_word):
        make()


def test_strings_become_members() -> None:
    c = CacheConfig(capacity_rows=4, policy="HYBRID", dynamic="clock", admission="tinylfu",
                    index="dense")
    assert (c.policy, c.dynamic, c.admission, c.index) == (
        Policy.HYBRID, Policy.CLOCK, Admission.TINYLFU, CacheIndex.DENSE)
    assert c.policy == "hybrid"  # the strings users compare with keep working
    assert BatcherConfig(overload="wait").overload is OverloadMode.WAIT
    assert ShardOptions(transport="tasks").transport is Transport.TASKS


# -- to_dict / from_dict -----------------------------------------------------------------

def test_every_config_round_trips_through_json() -> None:
    cache = CacheConfig(policy="hybrid", capacity_fraction=0.25, admission="tinylfu",
                        dynamic="s3fifo", pinned_fraction=0.5, index="hash")
    for cfg in (
        TierConfig(kind="ssd", io_threads=4, direct_io=True),
        cache,
        PrefetchConfig(lookahead=3),
        RuntimeConfig(tier=TierConfig(kind="cxl"), num_threads=2, cache=cache,
                      prefetch=PrefetchConfig()),
        RuntimeConfig(num_threads=None),
        BatcherConfig(max_batch_size=64, overload="wait", max_queue_delay_ms=5.0),
        ServingConfig(BatcherConfig(workers=2), default_deadline_ms=100.0, warmup=False),
        DLRMConfig(13, 16, 26, (512, 256, 16), (512, 256, 1), "torchrec"),
        GeneratorConfig((10, 20, 30), alpha=(1.0, 1.1, 1.2), keys=("a", "b", "c"),
                        pooling=(Pooling(), Pooling.parse("uniform:1:4"),
                                 Pooling(PoolingKind.LOGNORMAL, 3.0, sigma=0.5))),
        GeneratorConfig((5,), pooling=Pooling.parse("fixed:2")),
        CostModel(rtt_us=10.0, id_bytes=4),
        TableSpec("t", 10, 4, "int8"),
        ShardOptions(transport="tasks", timeout_s=2.0),
    ):
        _json_round_trip(cfg)


def test_to_dict_holds_json_types() -> None:
    d = RuntimeConfig(tier=TierConfig(kind="ssd"), cache=CacheConfig(capacity_rows=8)).to_dict()
    assert d["tier"]["kind"] == "ssd" and type(d["tier"]["kind"]) is str
    assert d["cache"]["policy"] == "lru" and type(d["cache"]["policy"]) is str
    assert type(d["pooling"]) is str
    assert DLRMConfig(1, 2, 1, (2,), (4, 1)).to_dict()["top_mlp"] == [4, 1]
    s = ServingConfig().to_dict()
    assert s["batcher"]["overload"] == "reject" and type(s["batcher"]["overload"]) is str


def test_nested_dicts_are_built() -> None:
    s = ServingConfig.from_dict({"batcher": {"max_batch_size": 7, "overload": "wait"},
                                 "warmup": False})
    assert s.batcher == BatcherConfig(max_batch_size=7, overload=OverloadMode.WAIT)
    r = RuntimeConfig.from_dict({"tier": {"kind": "ssd"}, "cache": {"capacity_rows": 3},
                                 "prefetch": {"lookahead": 1}})
    assert r.tier.kind is TierKind.SSD and r.cache == CacheConfig(capacity_rows=3)
    assert r.prefetch == PrefetchConfig(lookahead=1)
    g = GeneratorConfig.from_dict({"table_rows": [4, 5], "pooling": [{"kind": "fixed"},
                                                                      {"kind": "fixed"}]})
    assert g.table_rows == (4, 5) and g.pooling == (Pooling(), Pooling())


@pytest.mark.parametrize(("cls", "d", "where"), [
    (ServingConfig, {"max_batch_size": 7}, "ServingConfig"),  # flat keys are gone
    (ServingConfig, {"batcher": {"max_batch": 7}}, "BatcherConfig"),
    (RuntimeConfig, {"tier": {"knd": "ssd"}}, "TierConfig"),
    (RuntimeConfig, {"cache": {"capacity_rows": 3, "size": 1}}, "CacheConfig"),
    (CostModel, {"rtt": 1}, "CostModel"),
    (GeneratorConfig, {"table_rows": [3], "rows": 1}, "GeneratorConfig"),
])
def test_unknown_keys_are_named_with_the_class(cls, d, where: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown {where} field\(s\).*; known: "):
        cls.from_dict(d)


def test_missing_required_fields_and_non_mappings() -> None:
    with pytest.raises(ConfigError, match=r"missing DLRMConfig field\(s\): \['top_mlp'\]"):
        DLRMConfig.from_dict({"num_dense": 1, "embedding_dim": 2, "num_tables": 1,
                              "bottom_mlp": [2]})
    with pytest.raises(ConfigError, match="TierConfig: expected a mapping"):
        TierConfig.from_dict(["kind", "ssd"])  # type: ignore[arg-type]


def test_table_spec_reads_its_keys_of_a_store_entry() -> None:
    entry = {"name": "t", "rows": 4, "dim": 2, "dtype": "float16", "chunk_rows": 2}
    assert TableSpec.from_dict(entry) == TableSpec("t", 4, 2, "float16")
    assert TableSpec.from_dict({"name": "t", "rows": 4, "dim": 2}).dtype.value == "float32"


_names = st.text(alphabet="abcdefghij", min_size=1, max_size=6)


@st.composite
def _cache_configs(draw: st.DrawFn) -> CacheConfig:
    size = draw(st.sampled_from(["capacity_rows", "capacity_bytes", "capacity_fraction"]))
    value = (draw(st.floats(0.01, 1.0)) if size == "capacity_fraction"
             else draw(st.integers(1, 1 << 40)))
    return CacheConfig(**{size: value}, policy=draw(st.sampled_from(list(Policy))),
                       dynamic=draw(st.sampled_from([p.value for p in Policy])),
                       admission=draw(st.sampled_from([None, "tinylfu"])),
                       pinned_fraction=draw(st.floats(0, 1)),
                       lfu_aging_period=draw(st.integers(0, 1000)),
                       index=draw(st.sampled_from(list(CacheIndex))))


_batchers = st.builds(
    BatcherConfig, max_batch_size=st.integers(1, 1 << 20), max_delay_ms=st.floats(0, 1e5),
    max_queue_requests=st.integers(1, 1 << 20), overload=st.sampled_from(["reject", "wait"]),
    wait_timeout_s=st.floats(0, 100), prefetch_batches=st.integers(0, 8),
    max_queue_delay_ms=st.none() | st.floats(0.001, 1e6), workers=st.integers(1, 16))

_tiers = st.builds(TierConfig, kind=st.sampled_from(list(TierKind)),
                   prefetch_distance=st.integers(0, 4096), io_threads=st.integers(1, 1024),
                   direct_io=st.booleans(), cxl_latency_ns=st.floats(0, 1e4),
                   cxl_bandwidth_gbps=st.floats(0.1, 1e3), verify=st.booleans())

_runtimes = st.builds(
    RuntimeConfig, tier=_tiers, num_threads=st.none() | st.just("auto") | st.integers(1, 64),
    pooling=st.sampled_from(["sum", "mean"]), cache=st.none() | _cache_configs(),
    trace_dense=st.booleans())

_servings = st.builds(ServingConfig, batcher=_batchers,
                      default_deadline_ms=st.none() | st.floats(0.001, 3.6e6),
                      warmup=st.booleans())

_generators = st.integers(1, 4).flatmap(lambda n: st.builds(
    GeneratorConfig, table_rows=st.tuples(*[st.integers(1, 10**9)] * n),
    batch_size=st.integers(1, 4096), alpha=st.floats(0, 3) | st.tuples(*[st.floats(0, 3)] * n),
    pooling=st.just(Pooling()) | st.tuples(*[st.builds(Pooling, mean=st.integers(0, 50)
                                                       .map(float))] * n),
    locality=st.floats(0, 0.99), drift=st.floats(0, 1),
    keys=st.none() | st.lists(_names, min_size=n, max_size=n, unique=True).map(tuple),
    seed=st.integers(0, 2**31)))


@settings(max_examples=60, deadline=None)
@given(cfg=st.one_of(_cache_configs(), _batchers, _tiers, _runtimes, _servings, _generators))
def test_generated_configs_round_trip(cfg: ConfigDict) -> None:
    _json_round_trip(cfg)


@settings(max_examples=40, deadline=None)
@given(cfg=st.one_of(_batchers, _tiers, _servings),
       extra=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3, unique=True))
def test_generated_unknown_keys_are_rejected_and_named(cfg: ConfigDict, extra: list[str]) -> None:
    known = {f.name for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    extra = [k for k in extra if k not in known]
    if not extra:
        return
    with pytest.raises(ConfigError) as e:
        type(cfg).from_dict({**cfg.to_dict(), **dict.fromkeys(extra, 1)})
    assert str(sorted(extra)) in str(e.value) and type(cfg).__name__ in str(e.value)
