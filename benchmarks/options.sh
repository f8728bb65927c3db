#!/usr/bin/env bash
# The torch_compile options no table had measured, on one GPU in one call of the device tool:
#   bash benchmarks/options.sh RES [SWEEP ...]     # e.g. ... 1024 none,compile_graph fp8_ff_compile
# SDXL (random weights, 30 steps) at RES, by default: none and cuda_graph (this machine start's references),
# then each option in its own sweep, in order of expected compile time, while the script's time lasts (a
# cold compile each where the cache folder, CACHE_DIR, default /tmp/bench-cache, starts empty: a new machine
# start's /tmp may not be, so its file count goes in the environment file, and each compiled run logs
# compile_cache_files_at_start; CACHE_DIR=/tmp/cold-$RANDOM for a cold one): regional compile + graph,
# torch_compile's own graphs (mode reduce-overhead, 3 warmup calls: its graphs are recorded on a later call). An option
# whose compile outlives the time left is stopped and recorded as killed. Given SWEEPs (accelerator= values,
# overrides after a space) run instead. The variants live in benchmarks/conf/accelerator/. Results (MLflow
# database, logs) land in $OUT.
set -uo pipefail
. benchmarks/device_env.sh
res=$1
shift
sweeps=("$@")
((${#sweeps[@]})) || sweeps=(none,cuda_graph,regional_graph "torch_compile accelerator.mode=reduce-overhead warmup=3")
budget=${BUDGET:-570}  # seconds this script may take, inside the device tool's 600
{
  nvidia-smi --query-gpu=name,uuid,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import sys, torch, diffusers; print(sys.version.split()[0], torch.__version__, torch.version.cuda, diffusers.__version__)"
  cat /proc/sys/kernel/random/boot_id
  echo "cache ${CACHE_DIR:-/tmp/bench-cache}: $(find "${CACHE_DIR:-/tmp/bench-cache}" -type f 2>/dev/null | wc -l) files"
} 2>&1 | tee "$OUT/environment_$res.txt"
job=(model=sdxl_base model.weights=random steps=30 "res=$res" "cache_dir=${CACHE_DIR:-/tmp/bench-cache}"
  "hydra.searchpath=[file://$PWD/benchmarks/conf]")
for accelerator in "${sweeps[@]}"; do
  ((SECONDS < budget - 60)) || break
  name=$(echo "$accelerator" | tr " ,=/" "____")
  start=$SECONDS
  # shellcheck disable=SC2086  # an entry's words are separate overrides
  timeout $((budget - SECONDS - 15)) python3 -m runner -m "${job[@]}" accelerator=$accelerator 2>&1 | quiet \
    | tee "$OUT/sweep_${res}_$name.log"
  echo "$accelerator: $((SECONDS - start)) s wall" | tee -a "$OUT/walls.txt"
  cp mlruns/mlflow.db "$OUT/mlflow_$res.db"  # after each sweep: a call cut short still returns what ended
done
echo "script took ${SECONDS}s"
