#!/usr/bin/env bash
# One command for a GPU lease: environment report, the full test suite on CUDA (no interpreter),
# a determinism check, and the rank sweep -- all under one folder -- plus a one-file recorded copy
# (device, date, commit in it) meant to be committed to benchmarks/results/.
#
#   bash benchmarks/gpu_run.sh                 # from the repository root, on a machine with a GPU
#
# Designed to finish within about 10 minutes: every step has its own time limit (override with the
# variables below) and a step that runs out of time is reported as such, never hidden.
# It does not install torch or triton; it uses the ones present (the package itself is found via
# PYTHONPATH, or `pip install -e . --no-deps` beforehand).
#
#   RESULTS_ROOT    where to write (default benchmarks/results)
#   COMMIT          commit id to record when git is unavailable
#   TESTS_TIMEOUT   seconds for pytest              (default 210)
#   DET_TIMEOUT     seconds for the determinism run (default 60)
#   SWEEP_TIMEOUT   seconds for the main sweep      (default 240)
#   EXTRA_TIMEOUT   seconds for the other shapes    (default 60)
#   QLORA_TIMEOUT   seconds for the QLoRA sweep     (default 60; needs bitsandbytes, else skipped rows)
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}

COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export COMMIT  # the sweep records it when git is unavailable
DIRTY=$(git status --porcelain 2>/dev/null | grep -qv '^??' && echo "+dirty" || true)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
GPU_TAG=$(echo "${GPU:-nogpu}" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-//; s/-$//')
STAMP=$(date -u +%Y%m%d-%H%M)
ROOT=${RESULTS_ROOT:-benchmarks/results}
OUT="$ROOT/${STAMP}_${GPU_TAG}_${COMMIT}${DIRTY}"
mkdir -p "$OUT"
echo "writing to $OUT"

status() {  # status NAME RC TIMEOUT -> one summary line
  if [ "$2" = 0 ]; then echo "- $1: PASS"; elif [ "$2" = 124 ]; then echo "- $1: TIMED OUT after $3 s";
  else echo "- $1: FAIL (exit $2)"; fi
}

# 1. environment ------------------------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "commit: ${COMMIT}${DIRTY}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY - <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
else:
    print("device: NO CUDA DEVICE VISIBLE TO TORCH")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 2. test suite on CUDA -----------------------------------------------------------------------
T0=$SECONDS
timeout "${TESTS_TIMEOUT:-210}" $PY -m pytest -q -p no:cacheprovider --durations=15 > "$OUT/tests.txt" 2>&1
TESTS_RC=$?
echo "tests: rc=$TESTS_RC ($((SECONDS - T0)) s)"; tail -3 "$OUT/tests.txt"

# 3. determinism ------------------------------------------------------------------------------
T0=$SECONDS
timeout "${DET_TIMEOUT:-60}" $PY -m benchmarks.determinism > "$OUT/determinism.txt" 2>&1
DET_RC=$?
echo "determinism: rc=$DET_RC ($((SECONDS - T0)) s)"; tail -1 "$OUT/determinism.txt"

# 4. sweep: the headline shape in full, then the other shapes fwd+bwd at dropout 0.1 ----------
T0=$SECONDS
timeout "${SWEEP_TIMEOUT:-240}" $PY -m benchmarks.sweep --shapes 7b-attn --m 8192 --dropout 0.1 0.0 --out "$OUT/sweep" \
  --time-budget $(( ${SWEEP_TIMEOUT:-240} - 40 )) \
  > "$OUT/sweep.txt" 2> "$OUT/sweep.log"
SWEEP_RC=$?
echo "sweep: rc=$SWEEP_RC ($((SECONDS - T0)) s)"
T0=$SECONDS
timeout "${EXTRA_TIMEOUT:-60}" $PY -m benchmarks.sweep --shapes 7b-mlp-up 7b-mlp-down 8b-mlp-up --m 8192 \
  --modes fwd+bwd --dropout 0.1 --ranks 16 64 256 1024 --out "$OUT/sweep_shapes" --time-budget $(( ${EXTRA_TIMEOUT:-60} - 25 )) \
  > "$OUT/sweep_shapes.txt" 2> "$OUT/sweep_shapes.log"
EXTRA_RC=$?
echo "sweep (other shapes): rc=$EXTRA_RC ($((SECONDS - T0)) s)"
T0=$SECONDS  # QLoRA: 4-bit base (nf4, nested) against PEFT's, small to large M (dequant overhead vs M)
timeout "${QLORA_TIMEOUT:-60}" $PY -m benchmarks.sweep --shapes 7b-attn --m 16 1024 8192 --modes fwd+bwd --dropout 0.1 \
  --ranks 16 64 --providers eager triton --quant nf4 --out "$OUT/sweep_qlora" --time-budget $(( ${QLORA_TIMEOUT:-60} - 25 )) \
  > "$OUT/sweep_qlora.txt" 2> "$OUT/sweep_qlora.log"
QLORA_RC=$?
echo "sweep (QLoRA): rc=$QLORA_RC ($((SECONDS - T0)) s)"

# 5. recorded copy ----------------------------------------------------------------------------
REC="$ROOT/${STAMP}_${GPU_TAG}_${COMMIT}${DIRTY}.md"
{
  echo "# GPU run ${STAMP} on ${GPU:-no GPU}, commit ${COMMIT}${DIRTY}"
  echo
  echo "Produced by \`bash benchmarks/gpu_run.sh\`; full outputs in \`$(basename "$OUT")/\`."
  echo
  echo '```'; cat "$OUT/env.txt"; echo '```'
  echo
  status "test suite (python -m pytest -q, CUDA, no interpreter)" $TESTS_RC "${TESTS_TIMEOUT:-210}"
  echo "  $(tail -1 "$OUT/tests.txt")"
  status "determinism (backward twice, bit-equal)" $DET_RC "${DET_TIMEOUT:-60}"
  status "sweep 7b-attn" $SWEEP_RC "${SWEEP_TIMEOUT:-240}"
  status "sweep other shapes" $EXTRA_RC "${EXTRA_TIMEOUT:-60}"
  status "sweep QLoRA (--quant nf4)" $QLORA_RC "${QLORA_TIMEOUT:-60}"
  echo
  echo "## Sweep"
  echo
  if [ -s "$OUT/sweep/sweep.md" ]; then sed -n '1,/^All rows:/p' "$OUT/sweep/sweep.md" | sed '$d';
  else echo "(no sweep table: see sweep.log)"; fi
  if [ -s "$OUT/sweep_shapes/sweep.md" ]; then echo; sed -n '1,/^All rows:/p' "$OUT/sweep_shapes/sweep.md" | sed '$d'; fi
  if [ -s "$OUT/sweep_qlora/sweep.md" ]; then echo; sed -n '1,/^All rows:/p' "$OUT/sweep_qlora/sweep.md" | sed '$d'; fi
} > "$REC"
echo "recorded copy: $REC (commit it together with $OUT/sweep*/sweep.csv if wanted)"
