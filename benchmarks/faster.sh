#!/usr/bin/env bash
# Issue "Faster still" on one GPU, in one call of the device tool: sweeps at one size, then a kernel profile
# (benchmarks/kernel_profile.py) of each named accelerator, from the compile cache the sweeps filled.
#   bash benchmarks/faster.sh RES SWEEP [SWEEP ...] [-- PROFILE ...]
#   e.g. bash benchmarks/faster.sh 1024 none,compile_graph,fp8,fp8_compile -- compile_graph fp8_compile
# SWEEPs are accelerator= values, as benchmarks/options.sh takes them (SDXL base, random fp16 weights, 30
# steps); each PROFILE is one accelerator (warmup 1, 5 timed calls, one profiled call). The device tool
# returns at most 8 files, so everything is packed into $OUT/faster_RES.tgz, the MLflow database beside it.
set -uo pipefail
final=${OUT:-/tmp/bench-out}
budget=${BUDGET:-570}
res=$1
shift
sweeps=()
while (($#)) && [ "$1" != "--" ]; do sweeps+=("$1"); shift; done
(($#)) && shift
profiles=("$@")
export OUT=/tmp/faster-work-$res
rm -rf "$OUT" && mkdir -p "$OUT"
touch "$OUT/.began"
per_profile=100  # load, a warm compile from the cache, 6 calls, the profiler's export
if ((${#sweeps[@]})); then
  BUDGET=$((budget - per_profile * ${#profiles[@]} - 20)) bash benchmarks/options.sh "$res" "${sweeps[@]}"
fi
. benchmarks/device_env.sh
for accelerator in "${profiles[@]}"; do
  ((SECONDS < budget - 40)) || break
  timeout $((budget - SECONDS - 25)) python3 benchmarks/kernel_profile.py "$OUT/profile_${accelerator}_$res" \
    model=sdxl_base model.weights=random steps=30 "res=$res" accelerator="$accelerator" warmup=1 runs=5 \
    cache_dir=/tmp/bench-cache "hydra.searchpath=[file://$PWD/benchmarks/conf]" 2>&1 | quiet \
    | tee "$OUT/profile_${accelerator}_$res.log"
done
# A failed job's worker.log (its Python stack, for a crash in native code) stays in the MLflow artifacts on
# the machine: bring back those of this call.
find mlruns/artifacts -name worker.log -newer "$OUT/.began" 2>/dev/null \
  | xargs -r grep -l -E "Traceback|Fatal Python error" | head -5 \
  | while read -r log; do cp "$log" "$OUT/worker_$(basename "$(dirname "$(dirname "$log")")").log"; done
find "$OUT" -name '*.trace.json.gz' -size +8M -delete  # what comes back is bounded; the JSON summaries stay
tar czf "$final/faster_$res.tgz" -C "$OUT" .
cp "$OUT/mlflow_$res.db" "$final/" 2>/dev/null
echo "faster.sh took ${SECONDS}s"
