"""The ``tiermem`` command's start-up: which modules ``--help`` / ``info`` / ``--version``
import (not how long they take: the import graph is what a change breaks), the version,
Ctrl-C, and the ``serve`` port errors. Real subprocesses, each well under a second or two.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from importlib.metadata import version as dist_version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_ENTRY = Path(sys.executable).parent / "tiermem"
CLI = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "runtime.cli"]
HEAVY = ("torch", "numba", "zarr", "fastapi", "uvicorn", "ray", "matplotlib")
VERBS = ("demo", "create-store", "info", "predict", "trace-stats", "trace-generate",
         "trace-convert", "replay", "tune", "plan", "serve", "warmup", "verify")

# Runs the CLI's own main() the way the entry point does, then reports which heavy
# modules got imported: the help of every verb, --version, and info on a real store.
_PROBE = """
import contextlib, io, json, sys
from runtime.cli import main
codes = {}
for argv in [["--help"], ["--version"]] + [[v, "--help"] for v in %(verbs)r]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
out = io.StringIO()
with contextlib.redirect_stdout(out):
    codes["info"] = main(["info", %(store)r])
    codes["info --json"] = main(["info", "--json", %(store)r])
print(json.dumps({"codes": codes, "out": out.getvalue(),
                  "loaded": [m for m in %(heavy)r if m in sys.modules]}))
"""


def _run(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60,
                          **kw)


def test_help_version_info_import_no_torch(tmp_path: Path, subprocess_env) -> None:
    from tiermem.format import create_random_store, table_specs

    store = tmp_path / "s.zarr"
    create_random_store(store, table_specs([("a", 30, 4), ("b", 7, 8)], "float32"),
                        progress=False)
    code = _PROBE % {"verbs": VERBS, "store": str(store), "heavy": HEAVY}
    p = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.splitlines()[-1])
    assert got["codes"] == {"info": 0, "info --json": 0}
    assert "a " in got["out"] and '"name": "b"' in got["out"]  # info really ran
    assert got["loaded"] == [], f"tiermem --help/--version/info imported {got['loaded']}"


def test_packages_import_lazily_and_export_everything(subprocess_env) -> None:
    """``import runtime`` etc. load nothing heavy; every name in ``__all__`` still resolves
    to the object of its defining module."""
    code = ("import json, sys, runtime, runtime.distributed, tiermem, traces\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    p = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == []
    for pkg_name in ("runtime", "runtime.distributed", "tiermem", "traces"):
        pkg = importlib.import_module(pkg_name)
        for name in pkg.__all__:
            obj = getattr(pkg, name)
            module = importlib.import_module(pkg._LAZY[name])
            assert obj is getattr(module, name), f"{pkg_name}.{name}"
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            pkg.nope  # noqa: B018
    from runtime import InferenceSession
    from runtime.session import InferenceSession as direct

    assert InferenceSession is direct


def test_plan_strategy_choices_match_the_planner() -> None:
    from runtime.cli.plan import STRATEGY_CHOICES
    from runtime.distributed.planner import STRATEGIES

    assert STRATEGY_CHOICES == STRATEGIES


def test_version(subprocess_env) -> None:
    want = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert dist_version("tiermem") == want
    p = _run(["--version"], subprocess_env)
    assert p.returncode == 0 and p.stdout.strip() == f"tiermem {want}", p
    import tiermem

    assert tiermem.__version__ == want


def test_version_falls_back_to_pyproject_when_not_installed(tmp_path: Path) -> None:
    """A bare copy of the package beside a pyproject.toml (no distribution metadata:
    ``python -S``, no egg-info): the version is that pyproject's."""
    shutil.copytree(REPO / "tiermem", tmp_path / "tiermem",
                    ignore=shutil.ignore_patterns("__pycache__"))
    text = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(text.replace('version = "', 'version = "9.8.7+', 1))
    code = ("import importlib.metadata as md, tiermem\n"
            "try:\n    md.version('tiermem'); print('installed')\n"
            "except md.PackageNotFoundError:\n    print(tiermem.__version__)")
    p = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
    assert p.returncode == 0, p.stderr
    want = tomllib.loads(text)["project"]["version"]
    assert p.stdout.strip() == f"9.8.7+{want}"


@pytest.mark.parametrize("port", ["99999", "-1", "65536", "http"])
def test_serve_bad_port_is_an_argparse_error(port: str, subprocess_env) -> None:
    p = _run(["serve", "--model", "m.pt", "--store", "s.zarr", "--port", port], subprocess_env)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "argument --port: expected a port number 0..65535" in p.stderr


def test_serve_address_in_use_is_one_line(tmp_path: Path, subprocess_env) -> None:
    """The port is bound before the model loads, so a taken one fails at once (and the
    missing model files are never opened)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = _run(["serve", "--model", "nope.pt", "--store", "nope.zarr", "--port", str(port)],
                 subprocess_env, cwd=tmp_path)
    assert p.returncode == 2, p
    assert p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        f"tiermem serve: error: cannot bind 127.0.0.1:{port}: Address already in use (another "
        "process listens there: pick another --port, or --port 0 for a free one)"]


def test_ctrl_c_while_torch_imports(tmp_path: Path, subprocess_env) -> None:
    """SIGINT in the middle of ``import torch`` (predict's first step): "interrupted" and
    exit 130, no traceback. ``-X importtime`` says when torch's submodules are loading."""
    cmd = [sys.executable, "-X", "importtime", "-m", "runtime.cli", "predict", "--model",
           "m.pt", "--store", "s.zarr", "--batch", "b.npz", "--out", "p.npy"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if re.search(r"\|\s+torch\.\S+$", line):  # a torch submodule: inside `import torch`
                proc.send_signal(signal.SIGINT)
                break
        else:
            pytest.fail("torch was never imported:\n" + "".join(lines))
        rest = proc.stderr.read()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    torch_done = [ln for ln in rest.splitlines() if ln.rstrip().endswith("| torch")]
    assert not torch_done, "SIGINT came after torch had loaded"
    messages = [ln for ln in rest.splitlines() if not ln.startswith("import time:")]
    assert proc.returncode == 130, "\n".join(messages)
    assert len(messages) == 1 and re.fullmatch(r"tiermem( predict)?: interrupted", messages[0]), \
        messages


# one build per process: setuptools keeps state between the backend's calls
_BUILD = """
import json, sys, warnings, zipfile
from setuptools import build_meta
hook, out = sys.argv[1:]  # the backend rewrites sys.argv
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    built = getattr(build_meta, hook)(out)
with zipfile.ZipFile(f"{out}/{built}") as z:
    names = z.namelist()
    pth = [z.read(n).decode() for n in names if n.endswith(".pth")]
print(json.dumps({"warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
                  "tops": sorted({n.split("/")[0] for n in names}), "pth": pth}))
"""


def test_install_builds_without_warnings(tmp_path: Path) -> None:
    """What ``pip install -e .`` runs (the setuptools backend, on a copy of the project):
    no warning at all (pip 26 shows each, ~50 lines), the editable wheel is a plain .pth
    of the project root, and the wheel holds exactly the three packages."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    for pkg in ("tiermem", "runtime", "traces"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    got = {}
    for hook in ("build_editable", "build_wheel"):
        out = tmp_path / hook
        out.mkdir()
        p = subprocess.run([sys.executable, "-c", _BUILD, hook, str(out)], cwd=src,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        got[hook] = json.loads(p.stdout.splitlines()[-1])
        assert got[hook]["warnings"] == [], hook
    assert got["build_editable"]["pth"] == [f"{src.resolve()}\n"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert got["build_wheel"]["tops"] == sorted(["runtime", "tiermem", "traces",
                                                 f"tiermem-{version}.dist-info"])


def test_readme_activates_the_venv_before_its_commands() -> None:
    """`make demo` leaves `tiermem` in .venv/bin only: the README says to activate it before
    the first bare `tiermem` / `python` / `pip` line, and no line mixes in `.venv/bin/`."""
    text = (REPO / "README.md").read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    code = [ln for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
            for ln in block.splitlines()]
    activate = next(i for i, ln in enumerate(code)
                    if ln.split("#")[0].strip() == ". .venv/bin/activate")
    bare = [i for i, ln in enumerate(code) if re.match(r"(tiermem|python|pip) ", ln)]
    assert bare and activate < bare[0]
    assert not [ln for ln in code if ln.startswith(".venv/bin/")]
    assert prose.index("`. .venv/bin/activate`") < prose.index("`tiermem ")
