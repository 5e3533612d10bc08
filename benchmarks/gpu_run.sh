#!/usr/bin/env bash
# One short GPU lease, every number: environment, headline sweep, CUDA numerics, tuner, determinism,
# compute-sanitizer and as much of the wider sweep as time allows -- into ONE folder of at most 8
# files (what a lease brings back), with summary.md rewritten after every step and on a kill.
#
#   COMMIT=$(git rev-parse --short HEAD) RESULTS_ROOT=$OUT bash benchmarks/gpu_run.sh   # on the GPU machine
#                                                   (COMMIT: the lease's copy of the tree has no .git,
#                                                    or a stale one; a COMMIT given wins over git)
#   RESULTS_ROOT=/tmp/x bash benchmarks/gpu_run.sh --dry-run  # the same steps on the CPU, in seconds (CI)
#
# Files written to RESULTS_ROOT (default benchmarks/results/<UTC stamp>_<gpu>_<commit>/), none in a
# subfolder:
#   summary.md           each step's PASS / FAIL / TIMED OUT / SKIPPED and wall time, cache hits,
#                        the headline table, the numerics, determinism and sanitizer verdicts
#   sweep.csv            headline sweep rows, appended as each case finishes
#   sweep_wide.csv       wider-sweep rows, likewise
#   tuned_configs.json   the tuner's table
#   profile.md           the step profile: host vs GPU time and the kernels of a step; host us per
#                        step at a tiny shape (benchmarks.host)
#   logs.tar.gz          every step's full output, sweep and train-step JSON/Markdown/CSV/plots; rebuilt
#                        after each step (the train-step table is in summary.md)
#
# Time plan (seconds; each step is time-boxed, and no step starts after RUN_BUDGET=420 s of the run;
# the lease's own start, 30-40 s on the H200s of 2026-11-27, comes on top; there a full run took 284 s):
#   a  environment                                            20
#   p  precompile: every variant of b-g, all cores           120   (cold: ~300 x ~2 s / 16 cores, plus
#      enumeration: ~65 s expected on an H200 lease)
#   b  headline sweep (bf16, M=8192, K=N=4096, p=0.1,         75
#      r 16 64 256 2048, triton/composite/eager, fwd+bwd)
#   b-train-step  a training step of a Llama-3-8B-shaped     120   (benchmarks.train_step --preset gpu:
#      model (4 layers, 8192 tokens, bf16): peft, peft-bf16,       r 16 and 256, p 0.1 then 0, loss curve
#      auto/triton/composite/siblings patched                       vs fp32; no new case after 90 s)
#      (`auto` from an empty decision cache: it measures on first use and the notes give its choice
#      and first-use seconds)
#   b-profile  step profile: step / CUDA-graph / host time   120   (benchmarks.profile_step,
#      and kernels, r 16 and 2048, p=0.1; DoRA at r 16;           profile.md)
#      then host us per step at the tiny shape, every row         (benchmarks.host, real launches;
#      (LoRA, DoRA, QLoRA, PEFT), r 16, p 0 and 0.1                its table appended to profile.md)
#   c  CUDA numerics: bf16/fp16 op tests + mask parity        90   (118 tests, 8 pytest-xdist workers;
#      selection: benchmarks.precompile.NUMERICS_TESTS)
#   d  tuner, 7b-attn at r 16, 256, 64 (benchmarks/tune.py)   75   (CUDA-graph timing: ~10 s a case)
#   e  determinism, bf16 (backward twice, bit-equal)          30
#   f  compute-sanitizer memcheck, one ragged case per kernel 60
#   g  wider sweep (the headline in GPU time first --         what is left
#      --timing graph --, DoRA in GPU time, then other shapes, p=0 and more ranks, fwd/bwd apart,
#      eager_fp32, peft, compiled, QLoRA)
# Expected compiles, counted by `python -m benchmarks.precompile --list` (Triton 3.9, sm_90, 132 SMs,
# on a CPU machine): 309 distinct variants -- b 21, b-train-step 21, c 198, d 52, e 28, f 20, g-wide-graph 30,
# g-wide-dora 27, g-wide-shapes 23, g-wide-ranks 29, g-wide-modes 20 (steps share some) -- all
# compiled in step p (201 variants took 16-19 s on the 16 cores of an H200 lease). Step c's count
# comes from running its tests on meta tensors; a test that launches a kernel after its first check
# is missed and compiles during c. Step d's comes from forcing every candidate config the tuner
# forces (benchmarks.precompile.TUNE_ARGS). summary.md reports, per step, the compiles Triton still
# had to do (0 where the enumeration was complete).
#
# Compile cache: TRITON_CACHE_DIR, default .triton-cache-sm90 if the checkout has it (a cache built
# ahead on a CPU machine with `python -m benchmarks.precompile --arch 90 --binary-only --cache-dir .triton-cache-sm90`
# under the GPU machine's Triton and Python, and carried along), else .triton-cache. Step p reports
# how many variants it found there (hits) and how many it compiled (misses); a miss costs time only.
#
# Wheels: any *.whl in .whl/ (carried along; benchmarks/gpu_wheels.sh downloads bitsandbytes there)
# is installed into a temporary folder on PYTHONPATH first, so the QLoRA providers run.
#
# Variables: RESULTS_ROOT, RUN_BUDGET (420), PYTHON, COMMIT (wins over git), TUNE_ARGS
# (default: benchmarks.precompile.TUNE_ARGS, whose launches step p compiles), NUMERICS_WORKERS (8), and per step <STEP>_LIMIT (ENV, PRECOMPILE, SWEEP, NUMERICS, TUNE,
# DETERMINISM, SANITIZER, TRAIN_STEP) in seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (only --dry-run)" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}  # python3: the GPU image's torch interpreter
# a COMMIT given by the caller wins over git: a lease's copy of the tree may carry a stale .git
if [ -n "${COMMIT:-}" ]; then
  DIRTY=""
else
  COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  DIRTY=$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo "+dirty" || true)
fi
export COMMIT  # the sweep and the tuner record it
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  GPU="dry run (CPU, Triton interpreter)"
else
  unset TRITON_INTERPRET
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
fi
GPU_TAG=$(echo "${GPU:-nogpu}" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-//; s/-$//')
STAMP=$(date -u +%Y%m%d-%H%M)
ROOT=${RESULTS_ROOT:-benchmarks/results/${STAMP}_${GPU_TAG}_${COMMIT}${DIRTY}}
mkdir -p "$ROOT" && ROOT=$(cd "$ROOT" && pwd)
rm -f "$ROOT"/{summary.md,sweep.csv,sweep_wide.csv,tuned_configs.json,logs.tar.gz,profile.md}  # a reused folder: no mixing of runs
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")  # per-step outputs, packed into logs.tar.gz
RUN_BUDGET=${RUN_BUDGET:-420}
if [ "$DRY" = 1 ]; then
  export TRITON_CACHE_DIR=$STAGE/triton-cache
elif [ -z "${TRITON_CACHE_DIR:-}" ]; then
  if [ -d .triton-cache-sm90 ]; then export TRITON_CACHE_DIR=$PWD/.triton-cache-sm90; else export TRITON_CACHE_DIR=$PWD/.triton-cache; fi
fi
mkdir -p "$TRITON_CACHE_DIR"
# auto's first-use decisions (docs/tuning.md) start from an empty cache in the staging folder, so the
# train-step's `auto` rows pay and report the first-use measurement; the cache file lands in logs.tar.gz
export RSLORA_KERNELS_CACHE_DIR=$STAGE/autotune-cache
CACHE_AT_START=$(ls "$TRITON_CACHE_DIR" | wc -l)
# wheels carried along in .whl/ (benchmarks/gpu_wheels.sh: bitsandbytes for the QLoRA providers)
WHEELS="none carried"
if [ "$DRY" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run_site.XXXXXX")
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$SITE"; WHEELS="installed: $(cd .whl && echo *.whl)"
  else
    WHEELS="install FAILED: $(cd .whl && echo *.whl)"
  fi
fi
echo "gpu_run: writing to $ROOT (staging $STAGE), cache $TRITON_CACHE_DIR ($CACHE_AT_START entries)"

STEPS=$STAGE/steps.tsv   # name <TAB> status <TAB> wall s <TAB> limit s <TAB> note
: > "$STEPS"
CURRENT="" CHILD=""

# --------------------------------------------------------------------------------------------------
# Summary and packing: after every step, and from the traps
# --------------------------------------------------------------------------------------------------
cache_new() {  # entries added to the cache since snapshot $1, as "N (kernel xN, ...)"
  local added
  added=$(comm -13 "$1" <(ls "$TRITON_CACHE_DIR" | sort))
  [ -z "$added" ] && { echo 0; return; }
  # each entry is one kernel variant (or a launcher stub Triton builds on first launch), named by its files
  echo "$(echo "$added" | wc -l) ($(for d in $added; do ls "$TRITON_CACHE_DIR/$d" | grep -v '^__grp__' | head -1 | sed 's/\..*//'; done | sort | uniq -c | awk '{printf "%s%s x%s", (NR>1?", ":""), $2, $1}'))"
}

section() {  # section TITLE FILE [sed program]: a fenced excerpt of a staged file, if present
  [ -s "$2" ] || return 0
  printf '\n## %s\n\n```\n' "$1"
  sed -n "${3:-1,\$p}" "$2" | cut -c1-400
  printf '```\n'
}

write_summary() {
  {
    echo "# GPU run $STAMP: ${GPU:-no GPU}, commit ${COMMIT}${DIRTY}"
    echo
    echo "\`$( [ "$DRY" = 1 ] && echo 'bash benchmarks/gpu_run.sh --dry-run' || echo 'bash benchmarks/gpu_run.sh')\`;" \
         "run budget ${RUN_BUDGET} s, $((SECONDS)) s elapsed; full outputs in logs.tar.gz."
    echo
    echo "| step | status | wall s | limit s | compiles during the step / note |"
    echo "|---|---|---|---|---|"
    awk -F'\t' '{printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5}' "$STEPS"
    [ -n "$CURRENT" ] && echo "| $CURRENT | RUNNING when this summary was written | | | |"
    echo
    echo "Compile cache: \`$TRITON_CACHE_DIR\`, $CACHE_AT_START entries at the start, $(ls "$TRITON_CACHE_DIR" | wc -l) now."
    grep -h '^precompile:\|^  compiled\|^check-jit' "$STAGE/p-precompile.log" 2>/dev/null | sed 's/^ *//; s/^/- /'
    if [ -f "$STAGE/cache.after-p" ]; then
      echo "- compiles after step p (variants its enumeration missed, the tuner's candidates, launcher stubs):" \
           "$(cache_new "$STAGE/cache.after-p")"
    fi
    section "Environment" "$STAGE/a-env.log"
    if [ -s "$STAGE/sweep/sweep.md" ]; then
      printf '\n## Headline sweep\n\n'
      sed -n '1,/^All rows:/p' "$STAGE/sweep/sweep.md" | sed '$d'
    fi
    if [ -s "$STAGE/train_step/train_step.md" ]; then
      printf '\n## Training step: Llama-shaped model, PEFT vs patched\n\n'
      cat "$STAGE/train_step/train_step.md"
    fi
    if [ -s "$ROOT/profile.md" ]; then
      printf '\n## Step profile (host vs GPU time)\n\n'
      sed -n '/^| r |/,/^$/p' "$ROOT/profile.md"
    fi
    section "CUDA numerics (pytest)" "$STAGE/c-numerics.log" '/^FAILED\|^ERROR\|passed\|failed\|error/p'
    [ -s "$STAGE/d-tune.log" ] && section "Tuner (last lines)" "$STAGE/d-tune.log" "$(( $(wc -l < "$STAGE/d-tune.log") > 8 ? $(wc -l < "$STAGE/d-tune.log") - 7 : 1 )),\$p"
    section "Determinism" "$STAGE/e-determinism.log"
    section "compute-sanitizer" "$STAGE/f-sanitizer.log" '/^note\|ERROR SUMMARY\|^ragged\|NON-FINITE\|Invalid\|=========.*[Ee]rror/p'
    section "Wider sweep: presets run and not reached" "$STAGE/g-wide-sweep.log" '/^== \|^note: not reached/p'
    for md in "$STAGE"/sweep-*/sweep.md; do
      [ -s "$md" ] || continue
      printf '\n## Wider sweep: %s\n\n' "$(basename "$(dirname "$md")" | sed 's/^sweep-//')"
      sed -n '1,/^All rows:/p' "$md" | sed '$d'
    done
  } > "$ROOT/summary.md.tmp" && mv "$ROOT/summary.md.tmp" "$ROOT/summary.md"
  tar -czf "$ROOT/logs.tar.gz.tmp" -C "$STAGE" --exclude=triton-cache . 2>/dev/null && mv "$ROOT/logs.tar.gz.tmp" "$ROOT/logs.tar.gz"
}

on_signal() {
  [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null && sleep 2
  [ -n "$CURRENT" ] && printf '%s\tTIMED OUT (run stopped by a signal)\t%s\t\t\n' "$CURRENT" "$((SECONDS - STEP_T0))" >> "$STEPS"
  CURRENT=""
  write_summary
  rm -rf "$STAGE"
  exit 143
}
trap on_signal TERM INT

# step NAME LIMIT NOTE -- command...: time-boxed, output to $STAGE/NAME.log, then summary + tarball
step() {
  local name=$1 limit=$2 note=$3; shift 4
  local left=$((RUN_BUDGET - SECONDS))
  if [ "$left" -lt 5 ]; then
    printf '%s\tSKIPPED: out of run budget\t0\t%s\t%s\n' "$name" "$limit" "$note" >> "$STEPS"; write_summary; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  ls "$TRITON_CACHE_DIR" | sort > "$STAGE/cache.before"
  CURRENT=$name STEP_T0=$SECONDS
  echo "gpu_run: step $name (limit $limit s)"
  timeout -k 5 "$limit" "$@" > "$STAGE/$name.log" 2>&1 &
  CHILD=$!
  wait "$CHILD"; local rc=$?
  CHILD=""
  local status
  case $rc in
    0) status=PASS ;; 124|137) status="TIMED OUT after $limit s" ;; *) status="FAIL (exit $rc)" ;;
  esac
  local compiles; compiles=$(cache_new "$STAGE/cache.before")
  [ "$name" = p-precompile ] && ls "$TRITON_CACHE_DIR" | sort > "$STAGE/cache.after-p"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - STEP_T0))" "$limit" \
    "compiles: $compiles${note:+; $note}" >> "$STEPS"
  CURRENT=""
  echo "gpu_run: step $name: $status ($((SECONDS - STEP_T0)) s)"
  write_summary
}

skip() {  # skip NAME REASON
  printf '%s\tSKIPPED: %s\t0\t\t\n' "$1" "$2" >> "$STEPS"; write_summary
}

# --------------------------------------------------------------------------------------------------
# The steps, most valuable first
# --------------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  PLAN=dry SWEEP_PRESET=dry-headline WIDE_PRESETS="dry-wide" DEVICE_ARGS="--device cpu"
  mapfile -t NUMERICS < <("$PY" -c "from benchmarks.precompile import DRY_NUMERICS_TESTS as t; print(*t, sep=chr(10))")
  DET_ARGS=(--device cpu --backend triton --dtypes bf16 --scale 32) RAGGED_ARGS=(--device cpu --small)
  TUNE=(--dry-run) PRECOMPILE_EXTRA=(--limit 1 --workers 1) NUMERICS_WORKERS=0
  PROFILE_ARGS=(--shape 72x40 --m 33 --ranks 3 --dropout 0.1 --dtype fp32 --dora-providers composite)
  mapfile -t TRAIN_STEP_ARGS < <("$PY" -c "from benchmarks.precompile import DRY_TRAIN_STEP_ARGS as t; print(*t, sep=chr(10))")
  TRAIN_STEP_ARGS+=(--device cpu)
  HOST_ARGS="--device cpu --ranks 3 --ps 0.1 --rounds 3 --steps 2 --top 5 --rows triton composite eager"
else
  PLAN=gpu SWEEP_PRESET=headline DEVICE_ARGS=""
  WIDE_PRESETS=""  # benchmarks.sweep.WIDE_PRESETS, read in step g (importing the sweep loads torch)
  mapfile -t NUMERICS < <("$PY" -c "from benchmarks.precompile import NUMERICS_TESTS as t; print(*t, sep=chr(10))")
  DET_ARGS=(--dtypes bf16) RAGGED_ARGS=()
  if [ -n "${TUNE_ARGS:-}" ]; then read -r -a TUNE <<< "$TUNE_ARGS"
  else mapfile -t TUNE < <("$PY" -c "from benchmarks.precompile import TUNE_ARGS as t; print(*t, sep=chr(10))"); fi
  PRECOMPILE_EXTRA=()  # the tuner stops itself (--time-budget) before its step's limit
  NUMERICS_WORKERS=${NUMERICS_WORKERS:-8}
  PROFILE_ARGS=(--ranks 16 2048 --dropout 0.1 --dora-providers triton composite peft-dora)
  mapfile -t TRAIN_STEP_ARGS < <("$PY" -c "from benchmarks.precompile import TRAIN_STEP_ARGS as t; print(*t, sep=chr(10))")
  HOST_ARGS="--ranks 16 --ps 0 0.1 --rounds 15 --steps 10 --top 25"
fi

env_report() {
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "commit: ${COMMIT}${DIRTY}"
  echo "host: $(getconf _NPROCESSORS_ONLN) CPU cores"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  command -v compute-sanitizer > /dev/null && compute-sanitizer --version | tail -1 || echo "compute-sanitizer: not found"
  "$PY" - <<'EOF'
import os, platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
else:
    print("device: no CUDA device visible to torch" + (" (dry run)" if os.environ.get("TRITON_INTERPRET") else ""))
try:
    import xdist  # noqa: F401
    print("pytest-xdist: yes")
except ImportError:
    print("pytest-xdist: no")
EOF
  echo "TRITON_CACHE_DIR: $TRITON_CACHE_DIR ($CACHE_AT_START entries at start)"
  echo "wheels (.whl/): $WHEELS"
}
export -f env_report
export PY COMMIT DIRTY TRITON_CACHE_DIR CACHE_AT_START WHEELS
step a-env "${ENV_LIMIT:-20}" "" -- bash -c env_report

step p-precompile "${PRECOMPILE_LIMIT:-120}" "plan $PLAN" -- \
  "$PY" -m benchmarks.precompile --plan "$PLAN" "${PRECOMPILE_EXTRA[@]}" $( [ "$DRY" = 1 ] && echo --arch 90 )

step b-sweep "${SWEEP_LIMIT:-75}" "rows in sweep.csv" -- \
  "$PY" -m benchmarks.sweep --preset "$SWEEP_PRESET" $DEVICE_ARGS --out "$STAGE/sweep" --csv "$ROOT/sweep.csv"

step b-train-step "${TRAIN_STEP_LIMIT:-120}" "table in summary.md; CSV, JSON, plot in logs.tar.gz" -- \
  "$PY" -m benchmarks.train_step "${TRAIN_STEP_ARGS[@]}" --out "$STAGE/train_step"

profile_and_host() {  # the step profile into profile.md, then benchmarks.host's report appended to it
  "$PY" -m benchmarks.profile_step --out "$ROOT" "$@"; local rc=$?
  # shellcheck disable=SC2086  # HOST_ARGS: words
  if "$PY" -m benchmarks.host $HOST_ARGS --out "$STAGE/host.md"; then
    { echo; cat "$STAGE/host.md"; } >> "$ROOT/profile.md"
  else
    rc=1
  fi
  return $rc
}
export -f profile_and_host
export HOST_ARGS STAGE ROOT
step b-profile "${PROFILE_LIMIT:-120}" "profile.md" -- bash -c 'profile_and_host "$@"' _ "${PROFILE_ARGS[@]}"

XDIST=()
if [ "$NUMERICS_WORKERS" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "$NUMERICS_WORKERS"); fi
step c-numerics "${NUMERICS_LIMIT:-90}" "${XDIST[*]:-one process}" -- \
  "$PY" -m pytest -q -p no:cacheprovider --durations=5 "${XDIST[@]}" "${NUMERICS[@]}"

step d-tune "${TUNE_LIMIT:-75}" "table in tuned_configs.json" -- \
  "$PY" -m benchmarks.tune --out "$ROOT/tuned_configs.json" "${TUNE[@]}"

step e-determinism "${DETERMINISM_LIMIT:-30}" "" -- "$PY" -m benchmarks.determinism "${DET_ARGS[@]}"

if [ "$DRY" = 0 ] && command -v compute-sanitizer > /dev/null; then
  # no caching allocator: each tensor its own cudaMalloc, so memcheck sees an access past its end
  step f-sanitizer "${SANITIZER_LIMIT:-60}" "memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1" -- \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m benchmarks.ragged "${RAGGED_ARGS[@]}"
else
  step f-sanitizer "${SANITIZER_LIMIT:-60}" "compute-sanitizer absent: ran without it" -- \
    bash -c 'echo "note: compute-sanitizer absent: ran without it"; exec "$0" "$@"' "$PY" -m benchmarks.ragged "${RAGGED_ARGS[@]}"
fi

# g: one sweep per preset while time is left; each stops starting cases 20 s before its limit
wide_sweeps() {
  local rc=0 preset left
  [ -n "$WIDE_PRESETS" ] || WIDE_PRESETS=$("$PY" -c "from benchmarks.sweep import WIDE_PRESETS as p; print(*p)") || return
  for preset in $WIDE_PRESETS; do
    left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 25 ]; then echo "note: not reached (time): $preset"; continue; fi
    echo "== $preset ($left s left)"
    "$PY" -m benchmarks.sweep --preset "$preset" $DEVICE_ARGS --out "$STAGE/sweep-$preset" --csv "$ROOT/sweep_wide.csv" \
      --time-budget $((left - 20)) || rc=$?
  done
  return $rc
}
export -f wide_sweeps
export WIDE_PRESETS DEVICE_ARGS STAGE ROOT
export DEADLINE=$((RUN_BUDGET - 3))
if [ $((DEADLINE - SECONDS)) -lt 25 ]; then
  skip g-wide-sweep "out of run budget ($((RUN_BUDGET - SECONDS)) s left; a sweep needs 25)"
else
step g-wide-sweep $((RUN_BUDGET - SECONDS)) "rows in sweep_wide.csv" -- bash -c 'SECONDS='"$SECONDS"'; wide_sweeps'
fi

write_summary
echo "gpu_run: done in $SECONDS s; $(ls "$ROOT" | wc -l) files in $ROOT"
awk -F'\t' '{printf "  %-14s %s (%s s)\n", $1, $2, $3}' "$STEPS"
rm -rf "$STAGE"
