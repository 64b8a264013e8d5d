"""Trace analysis: reuse histogram bins, Meta locality_stats parsing, coverage, plots, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.cli import main as trace_main
from tiermem.errors import ConfigError
from tiermem.features import SparseFeatures
from traces.formats import NativeTrace
from traces.stats import (
    META2021_LOOKUP_FRACTIONS,
    META2022_LOOKUP_FRACTIONS,
    META_BIN_EDGES,
    analyze,
    bin_labels,
    format_stats,
    histogram_distance,
    meta_target,
    parse_locality_stats,
    plot_stats,
    reuse_histogram,
)
from traces.synth import GeneratorConfig, Pooling, SyntheticTrace, generate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
META = DATA / "meta_dlrm_datasets"
needs_data = pytest.mark.skipif(not DATA.is_dir(),
                                reason=f"real sample data not found at {DATA} (../shared absent)")

def _rows(values):
    return "\n".join(f"{lab}: {v}" for lab, v in zip(bin_labels(), values, strict=True))


SAMPLE = """fbgemm_t2_bs4.pt
Locality stats after processing 1 batches of size 4
Avg # of indices: 10
Avg # of unique cols: 5
Avg col size: 2.0
Histogram of col sizes:
""" + _rows([0.6, 0.2, 0.2] + [0] * 14) + """
[0, 1, 2]
Ratio of index distribution at different column sizes:
""" + _rows([0.3, 0.2, 0.5] + [0] * 14) + "\n"


def test_bins():
    assert len(META_BIN_EDGES) == 17 and bin_labels()[0] == "(0, 1]"
    assert bin_labels()[-1] == "(32768+"


def test_reuse_histogram_by_hand():
    # table a: id 5 x3, id 1 x1 ; table b: id 5 x1 (distinct from table a's 5), id 2 x2
    sf = SparseFeatures.from_tables({"a": ([5, 1, 5, 5], [0, 2, 4]), "b": ([5, 2, 2], [0, 1, 3])})
    h = reuse_histogram(sf)
    # column sizes: 3 -> (2,4], 1 -> (0,1], 1 -> (0,1], 2 -> (1,2]
    assert h.unique[:3].tolist() == [2, 1, 1] and h.unique.sum() == 4
    assert h.lookups[:3].tolist() == [2, 2, 3] and h.lookups.sum() == 7
    big = SparseFeatures.from_tables({"a": (np.zeros(40000, np.int64), [0, 40000])})
    assert reuse_histogram(big).lookups[-1] == 40000  # (32768+
    assert reuse_histogram(SparseFeatures.from_tables(
        {"a": (np.zeros(1024, np.int64), [0, 1024])})).unique[10] == 1  # (512, 1024]


def test_parse_locality_text():
    (s,) = parse_locality_stats(SAMPLE)
    assert s.name == "fbgemm_t2_bs4.pt" and s.batch_size == 4 and s.avg_indices == 10
    assert s.unique_fractions[:3] == (0.6, 0.2, 0.2)
    assert s.lookup_fractions[:3] == (0.3, 0.2, 0.5)
    with pytest.raises(ConfigError):
        parse_locality_stats("garbage\nmore garbage")


@needs_data
@pytest.mark.parametrize("year,const,n", [(2021, META2021_LOOKUP_FRACTIONS, 17),
                                          (2022, META2022_LOOKUP_FRACTIONS, 16)])
def test_meta_locality_files(year, const, n):
    stats = parse_locality_stats(META / f"locality_stats_{year}.txt")
    assert len(stats) == n
    mean = np.mean([s.lookup_fractions for s in stats], axis=0)
    np.testing.assert_allclose(mean, const, atol=6e-4)  # the built-in targets
    for s in stats:
        assert abs(sum(s.lookup_fractions) - 1) < 0.01
        assert abs(sum(s.unique_fractions) - 1) < 0.01
    if year == 2021:
        s0 = next(s for s in stats if s.name == "fbgemm_t856_bs65536_0.pt")
        assert s0.avg_indices == 468084223 and s0.avg_unique == 61644628
        assert s0.unique_fractions[0] == 0.423 and s0.lookup_fractions[0] == 0.056
        t = meta_target(META / "locality_stats_2021.txt", block="fbgemm_t856_bs65536_0.pt")
        assert t[0] == pytest.approx(0.056, abs=1e-3)
    np.testing.assert_allclose(meta_target(META / f"locality_stats_{year}.txt"),
                               meta_target(f"meta{year}"), atol=1e-3)


def test_analyze_and_plots(tmp_path):
    cfg = GeneratorConfig((1000, 100_000), batch_size=256, n_batches=4, alpha=1.1,
                          pooling=Pooling.parse("uniform:0:6"))
    st = analyze(SyntheticTrace(cfg))
    assert st.num_batches == 4 and st.num_samples == 1024
    assert st.num_lookups == sum(st.lookups_per_batch) == st.reuse.lookups.sum()
    assert st.pooling_hist.size == 7 and st.pooling_hist.sum() == 2 * 1024
    assert 2.5 < st.pooling_mean < 3.5
    assert all(u <= n for u, n in zip(st.unique_per_batch, st.lookups_per_batch, strict=True))
    # coverage: monotone, ends at 1, hot rows take a share well above their size
    assert np.all(np.diff(st.coverage_y) >= 0) and st.coverage_y[-1] == pytest.approx(1.0)
    assert st.coverage_at(0.001) > 0.1
    txt = format_stats(st, target=meta_target("meta2021"))
    assert "reuse histogram" in txt and "distance to target" in txt and "(32768+" in txt
    json.dumps(st.to_dict())
    paths = plot_stats(st, tmp_path / "plots", target=meta_target("meta2021"))
    assert [p.name for p in paths] == ["reuse.png", "coverage.png", "pooling.png", "unique.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distance():
    assert histogram_distance([1, 0], [0, 1]) == 1.0
    assert histogram_distance([0.5, 0.5], [1, 1]) == 0.0
    with pytest.raises(ConfigError):
        histogram_distance([1], [1, 0])


def test_cli_generate_stats_convert(tmp_path, capsys):
    out = tmp_path / "gen"
    assert trace_main(["trace-generate", str(out), "--tables", "1000,50000", "--batches", "3",
                       "--batch-size", "512", "--pooling", "lognormal:6:1:50:0.1",
                       "--drift", "0.001", "--calibrate-to", "meta2021"]) == 0
    o = capsys.readouterr().out
    assert "distance (total variation)" in o
    tr = NativeTrace(out)
    assert len(tr) == 3 and tr.rows == (1000, 50000)
    assert "calibration" in tr.attrs and tr.attrs["generator"]["batch_size"] == 512
    assert trace_main(["trace-stats", str(out), "--plots", str(tmp_path / "p"),
                       "--target", "meta2021"]) == 0
    assert "coverage" in capsys.readouterr().out
    assert (tmp_path / "p" / "reuse.png").is_file()
    assert trace_main(["trace-stats", str(out), "--json", "--batch-size", "1000"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["num_batches"] == 2 and d["num_samples"] == 1536
    # a bad file: one clear error line, exit code 2
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t2\n")
    assert trace_main(["trace-convert", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.tsv line 1" in err
    with pytest.raises(SystemExit):
        trace_main(["trace-generate", "--help"])


@needs_data
def test_cli_convert_real_criteo(tmp_path, capsys):
    src = DATA / "criteo_terabyte_day0_sample" / "criteo_tb_day0_sample_8324.tsv"
    assert trace_main(["trace-convert", str(src), "--out", str(tmp_path / "tb"),
                       "--rows", "dlrmv2", "--batch-size", "4096"]) == 0
    tr = NativeTrace(tmp_path / "tb")
    assert tr.batch_sizes == [4096, 4096, 132] and tr.num_dense == 13 and tr.has_labels


def test_plot_axes_are_readable():
    """pooling: integer ticks around the data; unique: y label, y from 0; reuse: short bin
    labels that match the bins, the target named."""
    import matplotlib.pyplot as plt

    from traces.stats import META_BIN_EDGES, _figures, meta_target, short_bin_labels

    batches = list(generate(GeneratorConfig((500, 30), batch_size=64, n_batches=4, seed=1)))
    st = analyze(batches)
    figs = dict((f, fig) for fig, f in _figures(st, meta_target("meta2021"), None, " of tr",
                                                "meta2021", np.arange(17)))
    pool = figs["pooling.png"].axes[0]
    ticks = [t for t in pool.get_xticks() if pool.get_xlim()[0] <= t <= pool.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks) and 1 in ticks
    assert pool.get_xlim()[0] >= -0.6
    uniq = figs["unique.png"].axes[0]
    assert uniq.get_ylabel() and uniq.get_ylim()[0] == 0
    assert uniq.get_ylim()[1] > 1.2 * max(st.lookups_per_batch)  # room for the legend
    reuse = figs["reuse.png"].axes[0]
    labels = [t.get_text() for t in reuse.get_xticklabels()]
    assert labels == short_bin_labels() and labels[:3] == ["1", "2", "3-4"]
    assert labels[-1] == ">32k" and labels[-2] == "16k-32k"
    # each label's range is its bin's: (lo, hi] holds the integers lo+1..hi
    for lab, lo in zip(labels[2:10], META_BIN_EDGES[2:10], strict=True):
        assert lab == f"{lo + 1}-{2 * lo}"
    assert [t.get_text() for t in reuse.get_legend().get_texts()] == ["this trace",
                                                                       "target (meta2021)"]
    assert "tr" in reuse.get_title()
    for f in figs.values():
        plt.close(f)
