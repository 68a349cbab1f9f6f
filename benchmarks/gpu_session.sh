#!/usr/bin/env bash
# One prepared GPU session: run it first on a lent H100/H200 (bare machine, preinstalled torch and
# triton, no internet, 16 cores). In at most 8 minutes of wall time it
#   build   builds crossvit_fast._C for this GPU's arch (pip install --no-build-isolation --no-deps
#           -e .; setup.py build_ext --inplace if pip cannot), MAX_JOBS = all cores
#   info    python -m crossvit_fast info (is _C built and loadable, which backends are available)
#   tests   the GPU test tier: pytest -m gpu tests
#   bench   the op benchmarks at reduced size: pytest benchmarks --benchmark-only --bench-quick
#   model   benchmarks/bench_model.py at reduced size (crossvit_18_240 B=64 bf16 training step;
#           GPU_SESSION_MODEL_ARGS replaces its options) with the cost ledger's estimate of each
#           row, then `python -m crossvit_fast cost` for the same shapes: measured vs estimated
# and writes under OUTDIR, few files (a device command brings back at most 8):
#   summary.md  session.json  build.log  tests.log  bench.log  bench.json  bench_rows.json
#   model.json
# then prints a short table last.
#
# Usage: benchmarks/gpu_session.sh OUTDIR [--dry-run]      (or GPU_SESSION_DRY_RUN=1)
# The dry run needs no GPU: each stage runs a stand-in that checks its plumbing (the helpers
# import, the GPU tier and the quick benchmark selection collect), and the summary is written.
#
# Time: each stage runs under `timeout` with its budget (GPU_SESSION_BUDGET_<STAGE> seconds
# overrides it), clamped so that every stage ends before the deadline (GPU_SESSION_DEADLINE_S
# after the start, default 440) while the summary keeps its reserve; a stage that fails or runs
# out of time is recorded and the next one still runs. Exit status 0 when every stage is ok.
set -uo pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
DRY=${GPU_SESSION_DRY_RUN:-0}
[[ ${2:-} == --dry-run ]] && DRY=1
[[ $# -le 2 && ( -z ${2:-} || ${2:-} == --dry-run ) ]] || usage

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${GPU_SESSION_DEADLINE_S:-440}))
SUMMARY_RESERVE=30 # seconds kept for the summary (it probes nvidia-smi, nvcc, torch)
KILL_AFTER=10      # a stage that ignores SIGINT is killed this long after its budget
STAGES=$(mktemp)
trap 'rm -f "$STAGES"' EXIT
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
: >"$OUT/build.log"
: >"$OUT/tests.log"
: >"$OUT/bench.log"

# record NAME STATUS RC SECONDS BUDGET LOG NOTE: one line of the stage table
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STAGES"; }

# stage NAME BUDGET LOG NOTE CMD...: CMD under `timeout`, output appended to OUTDIR/LOG
stage() {
  local name=$1 budget=$2 log=$3 note=$4
  shift 4
  local var="GPU_SESSION_BUDGET_${name^^}"
  budget=${!var:-$budget}
  local left=$((DEADLINE - $(date +%s) - SUMMARY_RESERVE - KILL_AFTER))
  if ((left < 5)); then
    echo "== [$name] skipped: no time left before the deadline"
    record "$name" no_time - 0 0 "$log" "skipped: no time left"
    return
  fi
  ((budget > left)) && budget=$left
  echo "== [$name] budget ${budget}s: $*" | tee -a "$OUT/$log"
  local t0 rc status
  t0=$(date +%s)
  timeout -s INT -k "$KILL_AFTER" "$budget" "$@" >>"$OUT/$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  local dt=$(($(date +%s) - t0))
  echo "== [$name] $status (exit $rc, ${dt}s)" | tee -a "$OUT/$log"
  record "$name" "$status" "$rc" "$dt" "$budget" "$log" "$note"
}

gpu_arch() { # this GPU's compute capability as TORCH_CUDA_ARCH_LIST wants it ("9.0")
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')
  [[ $cap =~ ^[0-9]+\.[0-9]+$ ]] || cap=$("$PY" -c \
    'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
  [[ $cap =~ ^[0-9]+\.[0-9]+$ ]] || cap=9.0 # no GPU visible (dry run): the Hopper target
  echo "$cap"
}

ARCH=${GPU_SESSION_ARCH:-$(gpu_arch)}
export TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "gpu_session: OUTDIR=$OUT dry_run=$DRY TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$MAX_JOBS python=$PY"

BUILD="$PY -m pip install --no-build-isolation --no-deps -v -e . || $PY setup.py build_ext --inplace"
MODEL=benchmarks/bench_model.py
if [[ $DRY == 1 ]]; then
  stage build 60 build.log "dry run: helpers only" "$PY" -c "from crossvit_fast.ops.cuda import build
print('would run:', '''$BUILD''')
print('arch list', build.arch_list(), '| why_no_build:', build.why_no_build())"
  stage info 60 build.log "" "$PY" -m crossvit_fast info
  stage tests 120 tests.log "dry run: collection" "$PY" -m pytest -m gpu tests --collect-only -q \
    -p no:cacheprovider
  stage bench 90 bench.log "dry run: collection" "$PY" -m pytest benchmarks --bench-quick \
    --ignore "$MODEL" --collect-only -q -p no:cacheprovider
else
  stage build 150 build.log "sm_${ARCH/./}" bash -c "$BUILD"
  stage info 30 build.log "" "$PY" -m crossvit_fast info
  timeout_opt=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_opt=(--timeout 120)
  stage tests 150 tests.log "pytest -m gpu" "$PY" -m pytest -m gpu tests -q -rfE \
    -p no:cacheprovider --durations=10 "${timeout_opt[@]}"
  stage bench 120 bench.log "--bench-quick" env CROSSVIT_BENCH_RESULTS="$OUT/bench_rows.json" \
    "$PY" -m pytest benchmarks --benchmark-only --bench-quick --benchmark-json "$OUT/bench.json" \
    --ignore "$MODEL" -s -q -p no:cacheprovider "${timeout_opt[@]}"
fi
MODEL_ARGS=${GPU_SESSION_MODEL_ARGS:---bench-model crossvit_18_240 --bench-batch 64 \
--bench-dtype bf16 --bench-mode train --bench-impl reference,reference_compiled,triton}
COST_ARGS="--model crossvit_18_240 --batch 64 --amp bf16 --top 12" # the same shapes
if [[ $DRY == 1 ]]; then
  stage model 60 bench.log "dry run: collection" bash -c "$PY -m pytest $MODEL --collect-only \
-q -p no:cacheprovider $MODEL_ARGS"
else
  stage model 180 bench.log "measured vs cost" bash -c "$PY -m pytest $MODEL --benchmark-only \
-q -p no:cacheprovider $MODEL_ARGS --benchmark-json '$OUT/model.json'; rc=\$?
for b in reference triton; do $PY -m crossvit_fast cost $COST_ARGS --backend \$b; done; exit \$rc"
fi

dry_flag=()
[[ $DRY == 1 ]] && dry_flag=(--dry-run)
if ! timeout -k 5 "$SUMMARY_RESERVE" "$PY" benchmarks/gpu_session_summary.py "$OUT" "$STAGES" \
  "${dry_flag[@]}"; then
  echo "gpu_session: the summary step failed; the stage table as recorded:"
  column -t -s $'\t' "$STAGES" 2>/dev/null || cat "$STAGES"
fi
echo "gpu_session: $(($(date +%s) - START)) s in all"
! grep -qv $'^[^\t]*\t\(ok\|skipped\)\t' "$STAGES"
