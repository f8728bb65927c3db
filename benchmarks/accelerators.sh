#!/usr/bin/env bash
# The accelerator table of BENCHMARKS.md at one resolution, in one call of the device tool (10 minutes):
#   bash benchmarks/accelerators.sh RES ACCELERATORS [WARM_RERUN] [GPU_TESTS]
# e.g. bash benchmarks/accelerators.sh 1024 none,cuda_graph,compile_graph,torch_compile compile_graph 1
# Runs the SDXL sweep (random weights, 30 steps) with one compile cache for all its jobs; then, while time
# is left, WARM_RERUN's job again in a new process (force=true: a warm start of the same config), and the
# GPU tests. Results (the MLflow database, logs) land in $OUT.
set -uo pipefail
. benchmarks/device_env.sh
res=$1 accelerators=$2 warm=${3:-} gpu_tests=${4:-0}
budget=570  # seconds this script may take, inside the device tool's 600
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader \
  | tee "$OUT/environment_$res.txt"
job=(model=sdxl_base model.weights=random steps=30 "res=$res" cache_dir=/tmp/bench-cache)
timeout $((budget - SECONDS - 20)) python3 -m runner -m "${job[@]}" "accelerator=$accelerators" 2>&1 | quiet \
  | tee "$OUT/sweep_$res.log"
if [ -n "$warm" ] && ((SECONDS < budget - 150)); then
  timeout $((budget - SECONDS - 20)) python3 -m runner -m "${job[@]}" "accelerator=$warm" force=true 2>&1 \
    | quiet | tee "$OUT/warm_$res.log"
fi
if [ "$gpu_tests" = 1 ] && ((SECONDS < budget - 90)); then
  timeout $((budget - SECONDS - 10)) python3 -m pytest -q -m gpu -n 4 tests 2>&1 | tail -15 \
    | tee "$OUT/pytest_gpu.txt"
fi
cp mlruns/mlflow.db "$OUT/mlflow_$res.db"
echo "script took ${SECONDS}s"
