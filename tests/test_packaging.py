"""Packaging: the sdist carries what setup.py needs to build bridge._C (csrc/ with its headers) and
no build outputs; the version is written once; the runtime requirements are what the code imports.

The sdist is built through setuptools' PEP 517 hook (what ``python -m build --sdist`` calls) from
a copy of the tree, so the test writes nothing into the checkout. Building bridge._C from that
sdist takes a CUDA compile; ``make check-sdist`` does it (and CI runs it)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
from email.parser import Parser
from pathlib import Path

import pytest

import bridge
import bridge._version

ROOT = Path(__file__).resolve().parent.parent
DIST = "bridge-peft-kernels"


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tarfile.TarFile:
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    # built extensions (bridge/_C*.so) are copied on purpose: the sdist must leave them out
    for folder in ("bridge", "kernels", "csrc", "tests"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "BRIDGE_BUILD_CUDA": "0"}  # listing files needs no torch or nvcc
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = proc.stdout.strip().splitlines()[-1]
    with tarfile.open(out / name) as tar:
        yield tar


def _members(tar: tarfile.TarFile) -> set[str]:
    return {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}


def _pkg_info(tar: tarfile.TarFile):
    top = tar.getmembers()[0].name.split("/")[0]
    return Parser().parsestr(tar.extractfile(f"{top}/PKG-INFO").read().decode())


def test_sdist_carries_csrc_and_the_sources_but_no_build_outputs(sdist):
    files = _members(sdist)
    csrc = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
            if p.suffix in (".cu", ".cuh", ".cpp", ".h", ".hpp")}
    assert any(f.endswith(".cu") for f in csrc) and any(f.endswith((".cuh", ".h")) for f in csrc)
    assert csrc <= files, f"missing from the sdist: {sorted(csrc - files)}"
    python = {p.relative_to(ROOT).as_posix() for d in ("bridge", "kernels")
              for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts}
    assert python <= files, f"missing from the sdist: {sorted(python - files)}"
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"} <= files
    leaked = sorted(f for f in files if f.endswith((".so", ".pyc")) or f.startswith(("tests/", "build/")))
    assert not leaked, f"build outputs or tests in the sdist: {leaked}"


def test_sdist_metadata_version_and_requirements(sdist):
    info = _pkg_info(sdist)
    assert info["Version"] == bridge._version.__version__
    requires = info.get_all("Requires-Dist")
    runtime = {r.split(";")[0].strip() for r in requires if "extra ==" not in r}
    names = {r.split(">")[0].split("<")[0].split("=")[0].strip() for r in runtime}
    # safetensors: bridge.peft.hf reads and writes adapter_model.safetensors; numpy is only for
    # Triton's CPU interpreter (tests) and the benchmarks, so only their extras name it
    assert names == {"torch", "triton", "safetensors"}, runtime
    numpy_extras = {r.split("extra ==")[1].strip(" '\"") for r in requires if r.startswith("numpy")}
    assert numpy_extras == {"test", "bench"}, requires
    megatron = [r for r in requires if r.startswith("megatron-core")]
    assert len(megatron) == 1 and ">=0.16" in megatron[0] and "<0.20" in megatron[0], megatron


def test_version_is_written_once():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "bridge._version.__version__"
    assert bridge.__version__ == bridge._version.__version__
    assert importlib.metadata.version(DIST) == bridge._version.__version__
