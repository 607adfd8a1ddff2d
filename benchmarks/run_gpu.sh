#!/usr/bin/env bash
# Build lrmt_fast with CUDA, run the CUDA tests and the benchmarks on the GPU, and write
# benchmarks/results/<cuda device>.json (+ roofline PNG), the end-to-end CIFAR meta-training
# timing e2e_exp1_cifar_metatrain_<cuda device>.json and, unless GPU_QUICK=1, the
# pytest-benchmark JSON.
#
#   bash benchmarks/run_gpu.sh            # from the repository root, on a machine with a GPU
#   GPU_QUICK=1 bash benchmarks/run_gpu.sh   # one pass of about 8 minutes (a lent machine's budget)
#   GPU_BUILD_ONLY=1 bash benchmarks/run_gpu.sh   # the build stage alone (experiments/gpu_quick.sh)
#
# Stages, most valuable first (each under its own time limit; the log and every result file so
# far are copied to $OUT after each stage, so a run cut short still returns them): build; the
# CUDA kernel tests; lrmt bench; the TF32 check (benchmarks/tf32_check.py); the meta-test step with
# and without the gate trace (benchmarks/test_meta_test_step.py); the end-to-end CIFAR
# meta-training timing; the CUDA end-to-end tests (experiment smoke runs, NCCL).
#
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default: the
# visible GPU's compute capability), MAX_JOBS (default: the number of cores), BENCH_MIN_TIME
# (default 3 s, GPU_QUICK 1 s), COMPILE_TIMEOUT (default 300 s, GPU_QUICK 60 s), OUT (if set:
# the log and the result files are copied there, also when a stage fails).
set -uo pipefail
cd "$(dirname "$0")/.."

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ] && command -v nvcc >/dev/null; then
  CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
fi
export PATH="$CUDA_HOME/bin:$PATH"
if ! command -v python >/dev/null; then   # images with python3 only
  mkdir -p /tmp/lrmt_bin && ln -sf "$(command -v python3)" /tmp/lrmt_bin/python && export PATH="/tmp/lrmt_bin:$PATH"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
QUICK="${GPU_QUICK:-0}"
MIN_TIME="${BENCH_MIN_TIME:-$([ "$QUICK" = 1 ] && echo 1 || echo 3)}"
COMPILE_TIMEOUT="${COMPILE_TIMEOUT:-$([ "$QUICK" = 1 ] && echo 60 || echo 300)}"
LOG="$(mktemp)"
STATUS=0
T0=$(date +%s)

stage() { echo "== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
# copy the log and the result files so far to $OUT (after every stage)
save() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  cp "$LOG" "$OUT/run_gpu.log"
  for f in benchmarks/results/"${DEV:-none}"* benchmarks/results/e2e_exp1_cifar_metatrain_"${DEV:-none}".json; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  return 0
}
# run one stage under a time limit (seconds, first argument), keep going after a failure (the later
# stages still say something), remember it
run() {
  local limit="$1"; shift
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "!! failed ($rc$([ "$rc" = 124 ] && echo ": over its ${limit} s limit")): $*" | tee -a "$LOG"; STATUS=1; }
  save
  return "$rc"
}
finish() {
  stage "done (status $STATUS)"
  save
  exit "$STATUS"
}

run 60 python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "run_gpu.sh: no CUDA GPU visible to torch")' \
  || finish
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$(python -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")')"
  export TORCH_CUDA_ARCH_LIST
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG" || true

stage "build (LRMT_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, CUDA_HOME=$CUDA_HOME)"
# pip first (as the README); a machine without a package index whose pip takes the legacy
# `setup.py develop` path fails there (setuptools then asks pip for an isolated build
# environment: seen on the lent H200 machine, 2026-12-04), so the extension is then built in
# place, with the repository root on PYTHONPATH for everything below
if ! run 400 env LRMT_CUDA=1 python -m pip install -q --no-build-isolation --no-deps -e .; then
  STATUS=0
  stage "pip could not build the package here; building the extension in place (setup.py build_ext --inplace)"
  run 400 env LRMT_CUDA=1 python setup.py -q build_ext --inplace || finish
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
run 60 python -m lrmt_fast info
[ "${GPU_BUILD_ONLY:-0}" = 1 ] && finish     # experiments/gpu_quick.sh: the build alone
DEV="$(python -c 'from lrmt_fast.bench.measure import results_stem; print(results_stem("cuda"))')"
mkdir -p benchmarks/results

stage "CUDA kernel tests (fused op, T-BPTT, meta-training steps, CUDA graphs)"
run 300 python -m pytest -q -m cuda tests/test_fused_ops.py tests/test_graphed_update.py
if [ "$QUICK" != 1 ]; then
  stage "fused-op tests (CPU and CUDA)"
  run 900 python -m pytest -q -x tests/test_fused_ops.py
  stage "pytest-benchmark suite (CUDA cases)"
  run 1800 python -m pytest benchmarks/ --benchmark-only -k cuda \
    --benchmark-json "benchmarks/results/${DEV}_pytest_benchmark.json"
fi
stage "lrmt bench (CUDA): records, table and roofline (min time $MIN_TIME s, compile timeout $COMPILE_TIMEOUT s)"
run "${BENCH_LIMIT:-1800}" python -m lrmt_fast.bench.report --device cuda --min-time "$MIN_TIME" --compile-timeout "$COMPILE_TIMEOUT" \
  --update-records
stage "TF32: the tolerance rule with TF32 GEMMs (benchmarks/tf32_check.py)"
run 120 python -m lrmt_fast.bench.tf32_check --update-records
stage "meta-test step of 'ours' on ResNet-32 GN, with and without the gate trace (benchmarks/test_meta_test_step.py)"
run 300 python -m pytest -q benchmarks/test_meta_test_step.py --benchmark-only -k cuda \
  --benchmark-json "benchmarks/results/${DEV}_ours_step.json"
stage "end to end: Exp 1 CIFAR meta-training (ResNet-32 GN, quick settings, synthetic images), fused vs reference"
run 300 python -m lrmt_fast.bench.e2e_exp1_cifar_metatrain --device cuda --episodes "${E2E_EPISODES:-3}" --max-steps 20 \
  --update-records
stage "CUDA end-to-end tests (experiment smoke runs on the GPU, NCCL)"
run 300 python -m pytest -q -m cuda tests/test_exp1_cli.py tests/test_cifar_experiments.py tests/test_distributed.py \
  tests/test_gate_trace.py
finish
