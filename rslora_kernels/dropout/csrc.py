"""Loader of the C++ extension in ``rslora_kernels/csrc/`` (the dropout stream on CPU tensors),
compiled on first use.

The extension is built with ``torch.utils.cpp_extension.load`` the first time it is needed and cached
in torch's extensions directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), so
installing the package needs no compiler and no torch in pip's build environment. The sources ship
inside the package (package data), so every install has them: a source checkout, ``pip install -e .``,
``pip install .`` or a wheel.

If the extension cannot be built (no C++ compiler, no ninja, sources missing), the CPU falls back to
the PyTorch implementation of the same stream (``rslora_kernels.dropout.stream.keep_mask_torch``:
identical bits, several times slower) and says so once with a ``RuntimeWarning`` naming the cause.
Set ``RSLORA_KERNELS_REQUIRE_CSRC=1`` to make that an error instead (CI does, so a broken build cannot
hide behind the fallback).
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["csrc_ops", "csrc_error", "missing_tool", "CSRC_DIR"]

CSRC_DIR = Path(__file__).resolve().parents[1] / "csrc"  # rslora_kernels/csrc, shipped as package data
_SOURCES = ("philox_dropout.cpp",)
_NAME = "rslora_kernels_csrc"

_lock = threading.Lock()
_state = {"tried": False, "error": None}


def _require() -> bool:
    return os.environ.get("RSLORA_KERNELS_REQUIRE_CSRC", "0") not in ("", "0")


def missing_tool() -> Optional[str]:
    """A plain-words reason why a build cannot even start, or None."""
    sources = [CSRC_DIR / s for s in _SOURCES]
    if not all(s.is_file() for s in sources):
        return (f"the C++ sources {', '.join(map(str, sources))} are not there (they ship in the package as "
                "rslora_kernels/csrc/: reinstall it)")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found (looked for {cxx!r} on PATH; set CXX or install g++/clang++)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (torch.utils.cpp_extension needs it: `pip install ninja`)"
    return None


def _build() -> None:
    from torch.utils.cpp_extension import load

    # at::parallel_for is an OpenMP pragma in ATen's headers (torch's parallel backend on Linux):
    # without -fopenmp it would silently run on one thread. The libgomp torch loaded is reused.
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    load(name=_NAME, sources=[str(CSRC_DIR / s) for s in _SOURCES],
         extra_cflags=["-O3", *omp], extra_ldflags=omp, is_python_module=False, verbose=False)


def _try_load() -> None:
    reason = missing_tool()
    if reason is None:
        try:
            _build()
            return
        except Exception as exc:  # compiler errors arrive as RuntimeError/CalledProcessError/OSError
            reason = f"building {CSRC_DIR} failed: {type(exc).__name__}: {exc}"
    _state["error"] = reason
    if _require():
        raise RuntimeError(f"rslora_kernels: the C++ dropout extension is required "
                           f"(RSLORA_KERNELS_REQUIRE_CSRC=1) but unavailable: {reason}")
    warnings.warn(f"rslora_kernels: the C++ dropout extension is unavailable ({reason}). "
                  "CPU dropout masks now come from the PyTorch implementation of the same Philox stream: "
                  "the same bits, but slower.", RuntimeWarning, stacklevel=3)


def csrc_ops():
    """``torch.ops.rslora_kernels`` with the C++ ops loaded, or None if the extension is unavailable
    (warned once; an error instead under ``RSLORA_KERNELS_REQUIRE_CSRC=1``)."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    _try_load()
                finally:
                    _state["tried"] = True
    if _state["error"] is not None:
        if _require():
            raise RuntimeError(f"rslora_kernels: the C++ dropout extension is unavailable: {_state['error']}")
        return None
    return torch.ops.rslora_kernels


def csrc_error() -> Optional[str]:
    """Why the extension is unavailable (None if it loaded or was not tried yet)."""
    return _state["error"]
