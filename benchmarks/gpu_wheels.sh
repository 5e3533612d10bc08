#!/usr/bin/env bash
# Download the wheels a GPU lease lacks into .whl/ (git-ignored), on a machine that can reach PyPI.
# The lease's image has torch, Triton, peft and numpy but not bitsandbytes, which the QLoRA providers
# need; carry ".whl" in the device call and benchmarks/gpu_run.sh installs what it finds there.
#
#   bash benchmarks/gpu_wheels.sh        # bitsandbytes 0.50.2 for CPython 3.12 on x86-64 Linux (~43 MB)
#
# Variables: PY_VERSION (3.12, the GPU image's python3), BNB_VERSION (0.50.2).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "bitsandbytes==${BNB_VERSION:-0.50.2}"
ls -l .whl
