#!/usr/bin/env bash
# Exp 1 CIFAR `quick` (or another profile) on a lent GPU machine whose calls carry at most 64 MiB
# and whose device time is short: the data travels in parts over several calls, and the run
# resumes across calls (and across sessions: its state comes back in $OUT/state.tgz).
#
# Here, once:                 bash experiments/gpu_quick.sh pack [PART_SIZE]
#     -> .gpu/parts/cifar10.tgz.NN (PART_SIZE each, as split -b takes it, default 44M: with the
#        13 MiB working tree (2026-12-05) under the 64 MiB a call carries) and .gpu/parts/SHA256SUMS
# On the device, one call per part, back to back (the machine keeps /tmp while warm):
#     carry [".gpu/parts/cifar10.tgz.NN", ".gpu/parts/SHA256SUMS"]
#     command: bash experiments/gpu_quick.sh stash
# On the device, then (carry the state of the last call too, if any: ".gpu/state.tgz"):
#     command: OUT=$OUT bash experiments/gpu_quick.sh run SECONDS
#     -> builds (benchmarks/run_gpu.sh's build), puts the data together and checks it, restores
#        .gpu/state.tgz, runs `lrmt exp1-cifar --profile $PROFILE --resume` for at most SECONDS,
#        and writes $OUT/state.tgz (the whole run folder: meta-training checkpoint, cached
#        meta-test runs) and, once finished, results.json, table.md and the figures
# Back here: cp <files_at>/state.tgz .gpu/state.tgz, and carry it in the next `run`.
#
# Environment: PROFILE (default quick), EXPERIMENT (default exp1-cifar), DEVICE (default cuda;
# cpu to try the steps here with PROFILE=smoke), DATA_SRC (pack: default data).
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."

PROFILE="${PROFILE:-quick}"
EXPERIMENT="${EXPERIMENT:-exp1-cifar}"
DEVICE="${DEVICE:-cuda}"
PARTS=.gpu/parts
STASH="${STASH:-/tmp/lrmt_parts}"
RUN_DIR="runs/gpu_${EXPERIMENT}_${PROFILE}"

die() { echo "gpu_quick.sh: $*" >&2; exit 2; }

case "${1:-}" in
pack)
  src="${DATA_SRC:-data}"
  [ -d "$src/cifar-10-batches-py" ] || die "no CIFAR-10 under $src (python ../shared/data/unpack.py $src)"
  rm -rf "$PARTS" && mkdir -p "$PARTS"
  tar -C "$src" -czf - cifar-10-batches-py | split -b "${2:-44M}" -d - "$PARTS/cifar10.tgz."
  (cd "$PARTS" && sha256sum cifar10.tgz.* > SHA256SUMS)
  ls -l "$PARTS"
  echo "device calls, one per part: carry [\"$PARTS/<part>\", \"$PARTS/SHA256SUMS\"], command: bash experiments/gpu_quick.sh stash"
  ;;
stash)
  mkdir -p "$STASH"
  n=0
  for f in "$PARTS"/cifar10.tgz.*; do [ -f "$f" ] && { cp "$f" "$STASH/" && n=$((n + 1)); }; done
  [ -f "$PARTS/SHA256SUMS" ] && cp "$PARTS/SHA256SUMS" "$STASH/"
  echo "stashed $n part(s); $STASH holds: $(cd "$STASH" && ls | tr '\n' ' ')"
  ;;
run)
  limit="${2:-}"
  [[ "$limit" =~ ^[0-9]+$ ]] || die "run needs SECONDS (the time the experiment may take in this call)"
  bash "$SELF" stash >/dev/null
  if [ ! -d data/cifar-10-batches-py ]; then
    [ -f "$STASH/SHA256SUMS" ] || die "no data: carry the parts (pack, then one stash call per part)"
    (cd "$STASH" && sha256sum -c --quiet SHA256SUMS) || die "the data parts in $STASH are missing or damaged; stash them again"
    mkdir -p data && cat "$STASH"/cifar10.tgz.* | tar -C data -xzf - || die "could not unpack the data"
  fi
  if [ "$DEVICE" = cuda ]; then
    GPU_BUILD_ONLY=1 bash benchmarks/run_gpu.sh || die "the build failed (see run_gpu.log in \$OUT)"
  fi
  if [ -f .gpu/state.tgz ] && [ ! -d "$RUN_DIR" ]; then
    mkdir -p runs && tar -C runs -xzf .gpu/state.tgz || die "could not restore .gpu/state.tgz"
  fi
  mkdir -p "$RUN_DIR"
  export PYTHONUNBUFFERED=1
  timeout -k 20 "$limit" python -m lrmt_fast "$EXPERIMENT" --profile "$PROFILE" --device "$DEVICE" \
    --data-root data --out "$RUN_DIR" --resume --no-progress 2>&1 | tee -a "$RUN_DIR/gpu_run.log"
  rc=${PIPESTATUS[0]}
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    tar -C runs -czf "$OUT/state.tgz" "$(basename "$RUN_DIR")"
    for f in results.json table.md curves.png fig6_curriculum.png fig7_delta_hist.png gpu_run.log; do
      [ -f "$RUN_DIR/$f" ] && cp "$RUN_DIR/$f" "$OUT/"
    done
  fi
  case "$rc" in
    0) echo "gpu_quick.sh: $EXPERIMENT $PROFILE finished" ;;
    124|137) echo "gpu_quick.sh: stopped after $limit s; carry state.tgz as .gpu/state.tgz and run again" ;;
    *) echo "gpu_quick.sh: $EXPERIMENT failed (exit $rc)" ;;
  esac
  exit "$rc"
  ;;
*)
  die "usage: gpu_quick.sh pack [PART_SIZE] | stash | run SECONDS (see the head of this file)"
  ;;
esac
