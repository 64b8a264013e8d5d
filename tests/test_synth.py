"""The production-style generator: Zipf fit, pooling statistics, drift, locality, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tiermem.errors import ConfigError
from traces.presets import DLRMV2_MULTI_HOT, TABLE_PRESETS, table_preset
from traces.stats import ReuseHistogram, histogram_distance, meta_target, reuse_histogram
from traces.synth import (
    GeneratorConfig,
    Pooling,
    SyntheticTrace,
    calibrate,
    fit_zipf_alpha,
    format_calibration,
    generate,
    synthetic_batches,
    zipf_ids,
)

ALPHA_TOL = 0.05  # stated tolerance of the fitted Zipf exponent


def test_legacy_api_unchanged():
    # the formula runtime/demo.py relied on, written out
    rng = np.random.default_rng(3)
    u = np.random.default_rng(3).random(1000)
    k = (1.0 + u * ((500 + 1.0) ** -0.05 - 1.0)) ** (1.0 / -0.05)
    rank = np.maximum(np.minimum(k.astype(np.int64) - 1, 499), 0)
    got = zipf_ids(rng, 500, 1000, 1.05, seed=2)
    assert got.min() >= 0 and got.max() < 500
    # same ranks up to the fixed bijection: equal multiset of rank counts
    assert sorted(np.bincount(got, minlength=500)) == sorted(np.bincount(rank, minlength=500))
    b = list(synthetic_batches([10, 20], batch_size=4, n_batches=2, pooling=2, seed=1))
    assert len(b) == 2 and b[0].keys == ("t0", "t1") and b[0].values.size == 16
    again = list(synthetic_batches([10, 20], batch_size=4, n_batches=2, pooling=2, seed=1))
    np.testing.assert_array_equal(b[1].values, again[1].values)


@pytest.mark.parametrize("alpha", [0.7, 1.0, 1.05, 1.3])
def test_fitted_zipf_exponent(alpha):
    cfg = GeneratorConfig((200_000, 5_000), batch_size=20_000, n_batches=5, alpha=alpha,
                          pooling=Pooling(mean=4), seed=11)
    ids = np.concatenate([tb.sparse.table("t0")[0] for tb in generate(cfg)])
    assert abs(fit_zipf_alpha(ids, 200_000) - alpha) < ALPHA_TOL
    ids1 = np.concatenate([tb.sparse.table("t1")[0] for tb in generate(cfg)])
    assert abs(fit_zipf_alpha(ids1, 5_000) - alpha) < ALPHA_TOL


@pytest.mark.parametrize("pool,mean_tol", [
    (Pooling(mean=3), 0.0),
    (Pooling("uniform", 5.5, 1, 10), 0.02),
    (Pooling("lognormal", 8.0, sigma=1.0), 0.05),
    (Pooling("lognormal", 20.0, sigma=0.8, p_empty=0.15), 0.05),
])
def test_pooling_statistics(pool, mean_tol):
    rng = np.random.default_rng(0)
    x = pool.sample(rng, 200_000)
    assert x.min() >= 0
    assert abs(x.mean() - pool.expected_mean) <= mean_tol * pool.expected_mean + 1e-12
    if pool.kind == "uniform":
        assert x.min() == pool.low and x.max() == pool.high
    if pool.p_empty:
        assert abs((x == 0).mean() - pool.p_empty) < 0.01
    if pool.kind == "lognormal" and not pool.p_empty:
        # heavy tail: the 99th percentile is far above the median
        assert np.percentile(x, 99) > 5 * np.median(x)


def test_pooling_cap_and_parse():
    p = Pooling.parse("lognormal:10:1.5:40:0.1")
    x = p.sample(np.random.default_rng(1), 50_000)
    assert x.max() == 40 and abs((x == 0).mean() - 0.1) < 0.01
    assert Pooling.parse("7") == Pooling(mean=7)
    assert Pooling.parse("uniform:2:4").low == 2
    for bad in ("x", "uniform:4", "lognormal:0.2:1", "fixed:-1"):
        with pytest.raises(ConfigError):
            Pooling.parse(bad)


def test_presets_and_multi_hot():
    assert sum(TABLE_PRESETS["criteo_kaggle"]) == 33_762_577
    assert sum(TABLE_PRESETS["criteo_terabyte"]) == 882_774_559
    assert sum(TABLE_PRESETS["dlrmv2"]) == 204_184_588
    assert sum(DLRMV2_MULTI_HOT) == 214
    assert table_preset("10,20") == (10, 20)
    with pytest.raises(ConfigError):
        table_preset("nope")
    cfg = GeneratorConfig.from_preset("dlrmv2", pooling="dlrmv2", batch_size=64, n_batches=1)
    sf = next(iter(generate(cfg))).sparse
    assert sf.keys[0] == "C1"
    np.testing.assert_array_equal(sf.lengths.reshape(26, 64), np.repeat(
        np.array(DLRMV2_MULTI_HOT)[:, None], 64, axis=1))
    sf.validate_ids(cfg.table_rows)


def test_seeded_and_valid():
    cfg = GeneratorConfig((1000, 50, 7), batch_size=100, n_batches=3, alpha=(0.5, 1.0, 1.5),
                          pooling=Pooling.parse("uniform:0:4"), locality=0.2, drift=0.01,
                          seed=5)
    a, b = list(generate(cfg)), list(generate(cfg))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.sparse.values, y.sparse.values)
        x.sparse.validate_ids(cfg.table_rows)
    c = list(generate(GeneratorConfig.from_dict({**cfg.to_dict(), "seed": 6})))
    assert not np.array_equal(a[0].sparse.values, c[0].sparse.values)
    assert GeneratorConfig.from_dict(cfg.to_dict()) == cfg
    tr = SyntheticTrace(cfg)
    assert tr.rows == (1000, 50, 7) and len(list(tr)) == 3
    with pytest.raises(ConfigError):
        GeneratorConfig((10,), alpha=(1.0, 2.0))
    with pytest.raises(ConfigError):
        GeneratorConfig((0,))
    with pytest.raises(ConfigError):
        GeneratorConfig((10,), locality=1.5)


def _top(ids, k):
    u, c = np.unique(ids, return_counts=True)
    return set(u[np.argsort(-c)[:k]].tolist())


def test_drift_moves_the_hot_set():
    base = dict(table_rows=(100_000,), batch_size=20_000, n_batches=6, alpha=1.1, seed=2)
    still = [tb.sparse.values for tb in generate(GeneratorConfig(**base))]
    moving = [tb.sparse.values for tb in generate(GeneratorConfig(**base, drift=0.0005))]
    assert len(_top(still[0], 100) & _top(still[-1], 100)) > 80
    overlap = len(_top(moving[0], 100) & _top(moving[-1], 100))
    assert overlap < 60  # 5 batches x 50 ranks: the old top-100 cooled down by 250 ranks


def test_locality_adds_reuse_across_batches():
    def reuse(loc):
        cfg = GeneratorConfig((1_000_000,), batch_size=5000, n_batches=4, alpha=0.6,
                              locality=loc, seed=3)
        v = [tb.sparse.values for tb in generate(cfg)]
        return np.isin(v[-1], np.concatenate(v[:-1])).mean()

    assert reuse(0.5) > reuse(0.0) + 0.3


def test_alpha_spread_makes_tables_differ():
    cfg = GeneratorConfig((100,) * 8, alpha=1.0, alpha_spread=0.3, seed=1)
    a = cfg.table_alphas()
    assert a.std() > 0.15 and abs(math.exp(np.log(a).mean()) - 1.0) < 0.05


def test_calibration_recovers_known_parameters():
    truth = GeneratorConfig((50_000,) * 4, batch_size=4096, n_batches=1, alpha=0.9,
                            pooling=Pooling(mean=4), seed=1)
    h = ReuseHistogram()
    for tb in generate(GeneratorConfig(**{**truth.__dict__, "seed": 99})):
        h = h + reuse_histogram(tb.sparse)
    start = GeneratorConfig(truth.table_rows, batch_size=4096, n_batches=1, alpha=1.5,
                            pooling=Pooling(mean=4), seed=1)
    res = calibrate(h.lookup_fractions, start, fit_fraction=False, rounds=1)
    assert res.distance < 0.02 < res.baseline_distance
    assert abs(res.config.alpha - 0.9) < 0.1


def test_calibration_to_meta2021_improves():
    cfg = GeneratorConfig((200_000,) * 2, batch_size=8192, n_batches=1,
                          pooling=Pooling.parse("lognormal:8:1:100:0.15"), seed=0)
    res = calibrate("meta2021", cfg, rounds=1)
    assert res.distance < res.baseline_distance
    assert res.distance < 0.2
    assert res.distance == pytest.approx(histogram_distance(res.histogram,
                                                            meta_target("meta2021")))


def test_calibration_reports_unreachable_bins():
    """At 64 samples and one id per bag, no id is used more than 64 times in a batch: the
    bins from (64, 128] up are unreachable, and their target mass floors the distance."""
    from traces.stats import META_BIN_EDGES, bin_labels, meta_target

    cfg = GeneratorConfig((5000, 20), batch_size=64, n_batches=1, seed=3)
    res = calibrate("meta2021", cfg, rounds=1)
    tgt = meta_target("meta2021")
    assert res.max_column_size == 64
    cut = META_BIN_EDGES.index(64)
    assert res.unreachable_bins == bin_labels()[cut:]
    assert np.isclose(res.unreachable_mass, tgt[cut:].sum())
    assert res.distance >= res.unreachable_mass - 1e-9
    assert np.isclose(sum(res.bin_distance), res.distance)
    assert all(h == 0 for h in res.histogram[cut:])
    text = format_calibration(res, "meta2021")
    assert "(64, 128] and up" in text and text.count("unreachable") == len(bin_labels()) - cut + 1
    d = res.to_dict()
    assert d["unreachable_bins"] == res.unreachable_bins and len(d["bin_distance"]) == 17


def test_for_tables_keeps_names_rows_and_shape():
    cfg = GeneratorConfig.for_tables(["a", "b"], [7, 300], pooling="uniform:2:5", n_batches=3,
                                     batch_size=50, alpha=1.2)
    assert cfg.table_keys == ("a", "b") and cfg.table_rows == (7, 300)
    for tb in generate(cfg):
        tb.sparse.validate_ids(cfg.table_rows)
        assert 2 <= tb.sparse.lengths.min() and tb.sparse.lengths.max() <= 5
