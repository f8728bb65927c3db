#!/usr/bin/env bash
# BENCHMARKS.md's accelerator table, both sizes, on one machine start, over as many device calls as it takes:
#   bash benchmarks/table.sh STEP [STEP ...]    each STEP is RES:ACCELERATOR[,ACCELERATOR...] or RES:all
#   e.g. bash benchmarks/table.sh 1024:none,cuda_graph,compile_graph 512:none,cuda_graph
# Each STEP is one sweep (SDXL base, random fp16 weights, 30 steps; benchmarks/options.sh) while the call's
# time lasts. RES:all sweeps every accelerator this stack runs: those already measured on this machine start
# are not run again (the runner resumes), so its table is the whole size's, each run against its own
# sweep's none. The MLflow database stays on the machine between calls of one start (mlruns/ is ignored).
# Everything comes back packed in $OUT/table.tgz, the MLflow database beside it; the folder packed is kept
# between calls too, so each call's archive holds the start's logs so far (and only that start's).
set -uo pipefail
# Every accelerator but onediff (no build for this stack), the quick ones and the slowest compile last.
ALL=none,cuda_graph,deepcache,deepcache_graph,fp8,compile_graph,compile_graph_fast,compile_graph_bf16,fp8_compile,deepcache_compile,torch_compile
for file in conf/accelerator/*.yaml; do
  name=$(basename "$file" .yaml)
  [[ ",$ALL,onediff," == *",$name,"* ]] || echo "table.sh: accelerator $name is not in ALL: add it" >&2
done
final=${OUT:-/tmp/bench-out}
budget=${BUDGET:-570}
# One folder per machine start (its boot id and its GPU): a later start on a machine that kept /tmp packs only its
# own logs (on 2026-12-03 a start's archive held the 1024 px logs of an earlier start, on another GPU; on
# 2026-12-04, with the folder named by the boot id alone, two starts' archives held logs of earlier starts whose
# environment files named other GPUs).
gpu=$(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null | head -1)
export OUT=/tmp/table-work/$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo this-start)${gpu:+-$gpu}
mkdir -p "$OUT" "$final"
for step in "$@"; do
  res=${step%%:*} accelerators=${step#*:}
  [ "$accelerators" = all ] && accelerators=$ALL
  left=$((budget - SECONDS - 25))
  ((left > 60)) || { echo "no time left for $step" | tee -a "$OUT/walls.txt"; continue; }
  BUDGET=$left bash benchmarks/options.sh "$res" "$accelerators"
done
tar czf "$final/table.tgz" -C "$OUT" .
cp mlruns/mlflow.db "$final/mlflow.db" 2>/dev/null
echo "table.sh took ${SECONDS}s"
