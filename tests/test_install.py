"""A non-editable install works away from the repository: a wheel built from the sources, installed
into a fresh virtual environment, builds and runs the C++ dropout stream from its own files.

The wheel is built from a copy of the package's files (the repository is left as it is) without
build isolation and installed with ``--no-deps``; the virtual environment sees this interpreter's
packages (torch, pip) but not the repository, and runs from a directory outside it. There, with
``RSLORA_KERNELS_REQUIRE_CSRC=1`` (a missing source or a failed build raises instead of falling
back to the PyTorch stream) and a fresh ``TORCH_EXTENSIONS_DIR`` (the extension compiled from the
installed source, not loaded from an earlier build), the installed package draws a CPU dropout mask;
it must equal the mask of the package under test here and the stream's PyTorch definition.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import rslora_kernels as rk
from rslora_kernels.dropout import csrc
from rslora_kernels.dropout.stream import keep_mask_torch

ROOT = Path(__file__).resolve().parents[1]
# what a build reads: the metadata (pyproject.toml names README.md as the long description) and the package
BUILD_FILES = ("pyproject.toml", "setup.py", "README.md")
SEED, SHAPE, P = 2**62 + 12345, (37, 1001), 0.3  # both key words set; odd sizes; not a power-of-two p

RUN_INSTALLED = f"""
import os, sys
import torch
import rslora_kernels as rk
from rslora_kernels.dropout import csrc

prefix = os.path.realpath(sys.prefix)
for what, path in (("the package", rk.__file__), ("its C++ source", str(csrc.CSRC_DIR))):
    assert os.path.realpath(path).startswith(prefix + os.sep), f"{{what}} is at {{path}}, not in the venv {{prefix}}"
ops = csrc.csrc_ops()  # RSLORA_KERNELS_REQUIRE_CSRC=1: raises if the extension cannot be built
assert ops is not None and csrc.csrc_error() is None, csrc.csrc_error()
mask = rk.dropout_mask({SEED}, {SHAPE}, {P})  # on the CPU: drawn by the C++ extension
direct = ops.philox_keep_mask({SEED}, {SHAPE[0]}, {SHAPE[1]}, {P}, 0)
torch.save({{"mask": mask, "direct": direct}}, sys.argv[1])
"""


def _run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _can_build_here() -> bool:
    """Whether this environment can build the wheel itself: setuptools >= 64 (pyproject's build
    requirement) that makes wheels on its own (>= 70.1) or with the ``wheel`` package. A fresh
    Python 3.11 venv (CI's) has setuptools 65.5 without ``wheel``."""
    try:
        version = tuple(int(v) for v in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (70, 1) or (version >= (64, 0) and importlib.util.find_spec("wheel") is not None)


def _source_copy(dest: Path) -> None:
    for name in BUILD_FILES:
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "rslora_kernels", dest / "rslora_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))


def _venv_seeing_this_environment(venv: Path) -> Path:
    """A venv whose own site-packages comes first, then this interpreter's packages (torch, pip):
    ``--system-site-packages`` gives the base interpreter's; when this interpreter is itself a venv
    (CI's), a .pth file adds its site-packages too. Neither path holds the repository."""
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    if sys.prefix != sys.base_prefix:
        (purelib / "_rslora_test_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


@pytest.mark.slow  # about 70 s on 2 cores, most of it the C++ build; marked only: `python -m pytest -q` (CI) runs it
def test_wheel_installed_elsewhere_builds_and_runs_the_cpu_dropout_stream(tmp_path):
    reason = csrc.missing_tool()
    if reason is not None:
        if os.environ.get("RSLORA_KERNELS_REQUIRE_CSRC", "0") not in ("", "0"):  # CI: the build is required
            pytest.fail(f"the C++ extension cannot be built here: {reason}")
        pytest.skip(f"the C++ extension cannot be built here: {reason}")

    # 1. a wheel from a copy of the sources; it must carry the C++ source as package data
    src = tmp_path / "src"
    src.mkdir()
    _source_copy(src)
    wheels = tmp_path / "wheels"
    isolation = ["--no-build-isolation"] if _can_build_here() else []  # else pip fetches setuptools to build
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", wheels, src])
    wheel, = wheels.glob("rslora_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rslora_kernels/csrc/philox_dropout.cpp" in names, sorted(n for n in names if not n.endswith(".py"))

    # 2. installed, not editable, into a fresh venv
    python = _venv_seeing_this_environment(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", wheel])

    # 3. run from outside the repository, the extension built from the installed source
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(RSLORA_KERNELS_REQUIRE_CSRC="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    out = tmp_path / "masks.pt"
    _run([python, "-c", RUN_INSTALLED, out], cwd=elsewhere, env=env, timeout=900)
    got = torch.load(out)

    want = rk.dropout_mask(SEED, SHAPE, P)  # the package under test (C++ or its PyTorch fallback)
    definition = keep_mask_torch(SEED, SHAPE[0], SHAPE[1], P)
    assert want.shape == SHAPE and torch.equal(want, definition)
    assert torch.equal(got["mask"], want)
    assert torch.equal(got["direct"], want)
    assert 0.6 < want.float().mean().item() < 0.8  # a real mask, not all kept or all dropped
