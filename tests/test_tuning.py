"""The cache tuner: simulated policies x sizes, OPT as the bound, recommend(), MRC plot, CLI."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from tiermem.cache.policy import make_policy
from tiermem.errors import CapacityError, ConfigError, InvalidBatchError
from tiermem.features import SparseFeatures
from tiermem.kernels.dedupe import dedupe_first
from traces.formats import write_trace
from traces.synth import GeneratorConfig, Pooling, SyntheticTrace
from traces.tuning import (
    CacheLayout,
    SimResult,
    TuneResults,
    format_results,
    parse_size,
    plot_mrc,
    recommend,
    simulate,
)

ROWS = {"a": 3000, "b": 400, "c": 8000}
ALL = ["lru", "lfu", "fifo", "clock", "s3fifo", "static", "hybrid"]


def _trace(n_batches=12, seed=1, locality=0.0):
    return SyntheticTrace(GeneratorConfig(
        table_rows=tuple(ROWS.values()), keys=tuple(ROWS), batch_size=64, n_batches=n_batches,
        pooling=Pooling.parse("uniform:1:3"), alpha=1.0, locality=locality, seed=seed))


@pytest.fixture(scope="module")
def batches():
    return list(_trace())


@pytest.fixture(scope="module")
def results(batches):
    return simulate(batches, ROWS, ALL, ["1%", "2%", "5%", "20%"],
                    admission=[None, "tinylfu"])


# -- sizes --------------------------------------------------------------------------

def test_parse_size():
    assert parse_size("5%") == {"capacity_fraction": 0.05}
    assert parse_size("100%") == {"capacity_fraction": 1.0}
    assert parse_size(1000) == {"capacity_rows": 1000}
    assert parse_size("1000") == {"capacity_rows": 1000}
    assert parse_size("2MiB") == {"capacity_bytes": 2 << 20}
    assert parse_size("1.5GB") == {"capacity_bytes": 1_500_000_000}


@pytest.mark.parametrize("bad", ["0%", "150%", "-1%", "abc", "0", 0, -5, "5 parsecs", 2.5, ""])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


# -- simulation ---------------------------------------------------------------------

def test_counts_are_consistent(results):
    assert results.batches == 12 and results.profile_batches == 1  # default 10%
    assert results.capacities == {"1%": 114, "2%": 228, "5%": 570, "20%": 2280}
    labels = {r.policy for r in results.results}
    assert labels == {*ALL, "opt", *(f"{p}+tinylfu" for p in ALL if p != "static")}
    for r in results.results:
        assert r.hits + r.misses == r.accesses > 0
        assert 0 <= r.hit_lookups <= r.lookups == results.lookups
        assert r.capacity_rows == results.capacities[r.size]


def test_matches_a_direct_policy_loop(batches):
    """LRU over the per-batch distinct ids (first-occurrence order), the cache's semantics."""
    res = simulate(batches, ROWS, ["lru"], [300], profile_batches=2, opt=False).results[0]
    base = {"a": 0, "b": 3000, "c": 3400}
    pol = make_policy("lru", 300)
    for i, b in enumerate(batches):
        sf = b.sparse
        gids = np.concatenate([sf.table(k)[0] + base[k] for k in sf.keys])
        uniq, _, cnt = dedupe_first(gids)
        pol.access(uniq, cnt)
        if i == 1:
            pol.reset_stats()
    assert (res.hits, res.misses) == (pol.stats.hits, pol.stats.misses)


def test_opt_is_never_worse(results):
    for s in results.sizes:
        opt = results.get("opt", s)
        for r in results.results:
            if r.size == s:
                assert opt.misses <= r.misses, (r.policy, s)
    # and never worse with more room
    m = [results.get("opt", s).misses for s in ["1%", "2%", "5%", "20%"]]
    assert m == sorted(m, reverse=True)


@pytest.mark.parametrize("seed", [3, 4])
def test_opt_bound_holds_with_locality_and_no_warmup(seed):
    tr = _trace(n_batches=8, seed=seed, locality=0.5)
    for prof in (0, 3):
        res = simulate(tr, ROWS, ALL, [50, "3%"], admission=[None, "tinylfu"],
                       profile_batches=prof)
        for s in res.sizes:
            opt = res.get("opt", s)
            assert all(opt.misses <= r.misses for r in res.results if r.size == s)


def test_static_pins_the_profile_hot_set(batches):
    res = simulate(batches, ROWS, ["static", "hybrid"], [200], profile_batches=3, opt=False,
                   pinned_fraction=0.25)
    assert res.get("static", "200").pinned_rows == 200
    assert res.get("hybrid", "200").pinned_rows == 50


def test_sequence_rows_and_trace_rows(batches):
    a = simulate(batches, list(ROWS.values()), ["lru"], ["5%"], opt=False)
    b = simulate(_trace(), None, ["lru"], ["5%"], opt=False)
    c = simulate(batches, CacheLayout.from_rows(ROWS), ["lru"], ["5%"], opt=False)
    assert a.results[0].hits == b.results[0].hits == c.results[0].hits


def test_max_batches_and_sparse_features_input(batches):
    sfs = [b.sparse for b in batches]
    res = simulate(sfs, ROWS, "lru,fifo", "2%,5%", max_batches=5, profile_batches=1, opt=False)
    assert res.batches == 5 and res.sizes == ["2%", "5%"] and len(res.results) == 4


# -- errors ---------------------------------------------------------------------------

def test_bad_inputs(batches):
    with pytest.raises(ConfigError, match="unknown policy 'mru'"):
        simulate(batches, ROWS, ["mru"], ["1%"])
    with pytest.raises(ConfigError, match="0%"):
        simulate(batches, ROWS, ["lru"], ["0%"])
    with pytest.raises(ConfigError, match="101%"):
        simulate(batches, ROWS, ["lru"], ["101%"])
    with pytest.raises(CapacityError, match="exceeds"):
        simulate(batches, ROWS, ["lru"], [10**6])
    with pytest.raises(ConfigError, match="admission"):
        simulate(batches, ROWS, ["lru"], ["1%"], admission="bloom")
    with pytest.raises(ConfigError, match=r"1 of the trace's 3 tables.*first: c\).*store "
                                          r"tables: a, b.*--table-map"):
        simulate(batches, {"a": 3000, "b": 400}, ["lru"], ["1%"])
    with pytest.raises(ConfigError, match="nothing to measure"):
        simulate(batches, ROWS, ["lru"], ["1%"], profile_batches=12)
    with pytest.raises(ConfigError, match="pinned_fraction"):
        simulate(batches, ROWS, ["hybrid"], ["1%"], pinned_fraction=1.0)
    with pytest.raises(ConfigError, match="no policies"):
        simulate(batches, ROWS, [], ["1%"])
    bad = SparseFeatures(("a", "b", "c"), np.array([5000, 1, 1]), np.arange(4))
    with pytest.raises(InvalidBatchError, match="batch 0"):
        simulate([bad], ROWS, ["lru"], ["1%"], profile_batches=0)


# -- recommend ------------------------------------------------------------------------

def _fake(rates: dict[str, dict[str, float]], opt: dict[str, float] | None = None):
    caps = {"1%": 10, "5%": 50, "10%": 100}
    res = []
    for p, per in {**rates, **({"opt": opt} if opt else {})}.items():
        for s, h in per.items():
            hits = int(round(h * 1000))
            res.append(SimResult(p, None, s, caps[s], 1000, hits, 1000 - hits, 2000, 0, 0.1))
    return TuneResults(res, list(caps), caps, list(rates) + (["opt"] if opt else []), 10, 1,
                       2000, 1000)


def test_recommend_picks_the_smallest_size():
    r = _fake({"lru": {"1%": 0.5, "5%": 0.79, "10%": 0.9},
               "lfu": {"1%": 0.6, "5%": 0.82, "10%": 0.85}},
              opt={"1%": 0.95, "5%": 0.99, "10%": 1.0})
    rec = recommend(r, 0.8)
    assert rec.met and rec.size == "5%" and rec.policy == "lfu" and rec.capacity_rows == 50
    rec = recommend(r, 0.86)
    assert rec.met and (rec.size, rec.policy) == ("10%", "lru")
    rec = recommend(r, 0.5)
    assert (rec.size, rec.policy) == ("1%", "lfu")  # both meet it: the higher hit rate


def test_recommend_none_meets():
    r = _fake({"lru": {"1%": 0.5, "5%": 0.6, "10%": 0.7}}, opt={"1%": 0.7, "5%": 0.95, "10%": 1})
    rec = recommend(r, 0.9)
    assert not rec.met and rec.size is None and rec.policy is None
    assert "no simulated policy" in rec.message and "OPT would meet it at 5%" in rec.message
    rec = recommend(_fake({"lru": {"1%": 0.5, "5%": 0.6, "10%": 0.7}}), 0.9)
    assert "not even OPT" in rec.message
    with pytest.raises(ConfigError):
        recommend(r, 0)
    with pytest.raises(ConfigError):
        recommend(r, 1.5)


def test_recommend_on_a_simulation(results):
    rec = recommend(results, 0.3)
    if rec.met:
        assert rec.policy != "opt"
        smaller = [s for s in results.sizes if results.capacities[s] < rec.capacity_rows]
        for s in smaller:
            assert all(r.hit_rate < 0.3 for r in results.results
                       if r.size == s and r.policy != "opt")
    assert "recommendation" in format_results(results, rec) or not rec.met


# -- output ---------------------------------------------------------------------------

def test_plot_mrc_writes_a_png(results, tmp_path):
    out = plot_mrc(results, tmp_path / "mrc.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(ConfigError, match="does not exist"):
        plot_mrc(results, tmp_path / "nope" / "mrc.png")


def test_format_and_json(results):
    text = format_results(results)
    assert "lru+tinylfu" in text and "opt" in text and "20%" in text
    d = json.loads(json.dumps(results.to_dict()))
    assert d["measured_batches"] == 11 and len(d["results"]) == len(results.results)


# -- CLI -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native(tmp_path_factory, batches):
    p = tmp_path_factory.mktemp("tune") / "trace"
    write_trace(p, batches, rows=list(ROWS.values()))
    return p


def test_cli_tune(native, tmp_path, capsys):
    from runtime.cli import main

    rc = main(["tune", "--trace", str(native), "--policies", "lru,s3fifo,static,hybrid",
               "--sizes", "1%,5%,20%", "--admission", "none,tinylfu", "--target-hit-rate",
               "0.2", "--out", str(tmp_path / "t.json"), "--plot", str(tmp_path / "m.png"),
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "recommendation" in out and "s3fifo+tinylfu" in out
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["recommendation"]["met"] and d["sizes"] == ["1%", "5%", "20%"]
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,msg", [
    (["--policies", "lru,mru"], "unknown policy 'mru'"),
    (["--sizes", "0%"], "(0%, 100%]"),
    (["--sizes", "120%"], "(0%, 100%]"),
])
def test_cli_tune_errors(native, capsys, argv, msg):
    from runtime.cli import main

    rc = main(["tune", "--trace", str(native), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1


def test_cli_tune_missing_trace(tmp_path, capsys):
    from runtime.cli import main

    assert main(["tune", "--trace", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_tune_help_subprocess(python, subprocess_env, repo_root):
    p = subprocess.run([python, "-m", "runtime.cli", "tune", "--help"], cwd=repo_root,
                       env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--target-hit-rate" in p.stdout and "--plot" in p.stdout


def test_cli_tune_json_is_a_flag(native, tmp_path, capsys):
    """--json prints JSON to stdout (as replay and trace-stats), --out FILE writes it."""
    from runtime.cli import main

    base = ["tune", "--trace", str(native), "--policies", "lru", "--sizes", "5%", "-q"]
    assert main([*base, "--json", "--out", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == json.loads((tmp_path / "t.json").read_text())
    with pytest.raises(SystemExit) as e:  # the old `--json FILE`
        main([*base, "--json", str(tmp_path / "old.json")])
    assert e.value.code == 2 and not (tmp_path / "old.json").exists()


def test_cold_process_tune_compiles_nothing_while_timed(native, python, subprocess_env,
                                                        repo_root):
    """A fresh process has no kernel yet: the timed runs must find every one compiled."""
    p = subprocess.run([python, "-m", "runtime.cli", "tune", "--trace", str(native),
                        "--policies", "lru,s3fifo,hybrid", "--sizes", "5%,20%", "-q", "--json"],
                       cwd=repo_root, env=subprocess_env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["compiled_while_timed"] == 0 and d["compile_seconds"] > 0


def test_cli_tune_byte_sizes_need_row_bytes(native, capsys):
    from runtime.cli import main

    base = ["tune", "--trace", str(native), "--policies", "lru", "--sizes", "256KiB", "-q"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "'256KiB' is in bytes" in err and "--store" in err and "--row-bytes" in err
    assert main([*base, "--row-bytes", "64", "--json", "--no-opt"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["capacities"]["256KiB"] == 2**18 // 64
    with pytest.raises(ConfigError, match="row-bytes"):
        simulate(_trace(4), None, ["lru"], ["1MiB"])


def _run_with_stderr(argvs, python, env, cwd, tty):
    """Run CLI verbs (one process) with stderr a pipe or a pseudo-terminal; its stderr."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    code = ("import sys; from runtime.cli import main\n"
            f"sys.exit(max(main(a) for a in {argvs!r}))")
    if not tty:
        p = subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=120)
        return p.returncode, p.stderr
    master, slave = pty.openpty()
    # a window of 0 columns (the default) would make tqdm draw an empty bar
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    p = subprocess.Popen([python, "-c", code], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                         stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return p.wait(timeout=120), b"".join(chunks).decode(errors="replace")


def test_progress_only_on_a_terminal(native, python, subprocess_env, repo_root, tmp_path):
    """A pipe gets no bar characters from any verb; a terminal gets tune's bar (counting
    runs), and nothing from a --quiet verb."""
    tune = ["tune", "--trace", str(native), "--policies", "lru", "--sizes", "1%,5%"]
    verbs = [tune, ["trace-generate", str(tmp_path / "g"), "--tables", "100,200"],
             ["trace-stats", str(native), "--plots", str(tmp_path / "p")],
             ["trace-convert", str(native), "--out", str(tmp_path / "c")]]
    rc, err = _run_with_stderr(verbs, python, subprocess_env, repo_root, tty=False)
    assert rc == 0 and "\r" not in err and "%|" not in err and "/s]" not in err, err
    gen = ["trace-generate", str(tmp_path / "q"), "--tables", "100,200", "-q"]
    rc, err = _run_with_stderr([gen, tune], python, subprocess_env, repo_root, tty=True)
    assert rc == 0 and "simulate policy x size" in err and "run/s" in err, err
    assert "write trace" not in err


def test_mrc_axes_use_the_given_unit(results):
    from traces.tuning import _mrc_figure

    fig = _mrc_figure(results, target_hit_rate=0.6, name="tr")
    ax = fig.axes[0]
    assert "%" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1%", "2%", "5%", "20%"]
    assert list(ax.get_xticks()) == [1.0, 2.0, 5.0, 20.0]
    assert len(ax.get_xaxis().get_minor_locator().tick_values(1, 20)) == 0
    assert "tr" in ax.get_title()
    target = [ln for ln in ax.get_lines() if "target" in ln.get_label()]
    assert len(target) == 1 and np.allclose(target[0].get_ydata(), 0.4)
    import matplotlib.pyplot as plt

    plt.close(fig)
    rows = simulate(_trace(4), ROWS, ["lru"], ["100", "400"], opt=False)
    fig = _mrc_figure(rows)
    assert fig.axes[0].get_xlabel() == "cache size (rows)"
    plt.close(fig)
