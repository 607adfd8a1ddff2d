#!/usr/bin/env bash
# Build lrmt_fast with CUDA, run the CUDA tests and the benchmarks on the GPU, and write
# benchmarks/results/<cuda device>.json (+ roofline PNG) and the pytest-benchmark JSON.
#
#   bash benchmarks/run_gpu.sh            # from the repository root, on a machine with a GPU
#
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default: the
# visible GPU's compute capability), MAX_JOBS (default 4), BENCH_MIN_TIME (default 3 s).
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-4}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$(python -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")')"
  export TORCH_CUDA_ARCH_LIST
fi
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "run_gpu.sh: no CUDA GPU visible to torch")'

echo "== build (LRMT_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
LRMT_CUDA=1 pip install --no-build-isolation --no-deps -e .
python -m lrmt_fast info

mkdir -p benchmarks/results
echo "== CUDA tests"
python -m pytest -q -m cuda tests/test_fused_ops.py
echo "== fused-op tests (CPU and CUDA)"
python -m pytest -q tests/test_fused_ops.py

DEV="$(python -c 'from benchmarks.measure import results_stem; print(results_stem("cuda"))')"
echo "== pytest-benchmark suite (CUDA cases)"
python -m pytest benchmarks/ --benchmark-only -k cuda \
  --benchmark-json "benchmarks/results/${DEV}_pytest_benchmark.json"
echo "== lrmt bench (CUDA): records, table and roofline"
python -m benchmarks.report --device cuda --min-time "${BENCH_MIN_TIME:-3}"
echo "== done: benchmarks/results/${DEV}.json, ${DEV}_roofline.png, ${DEV}_pytest_benchmark.json"
