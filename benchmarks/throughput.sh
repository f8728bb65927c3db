#!/usr/bin/env bash
# BENCHMARKS.md's energy and throughput table, in one call of the device tool (one GPU):
#   bash benchmarks/throughput.sh [RUNS] [ACCELERATORS]
# How the energy counter behaves at idle, then SDXL's architecture with random weights, 30 steps, 1024 px,
# batch 1, 4 and 8, plain diffusers against ACCELERATORS (default cuda_graph). Results (the MLflow database,
# logs) land in $OUT. The same command again resumes the sweep (a cold compile per batch size may not fit one
# call).
set -uo pipefail
. benchmarks/device_env.sh
runs=${1:-5}
accelerators=${2:-cuda_graph}
budget=560
{
  nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c "import sys, torch, diffusers, pynvml; print(sys.version.split()[0], torch.__version__, torch.version.cuda, diffusers.__version__, pynvml.__version__ if hasattr(pynvml, '__version__') else '')"
} 2>&1 | tee "$OUT/environment.txt"
python3 benchmarks/energy_counter.py "$OUT/energy_counter.json" 3 2>&1 | tail -1
timeout $((budget - SECONDS - 15)) python3 -m runner -m model=sdxl_base model.weights=random steps=30 res=1024 \
  batch=1,4,8 "accelerator=none,$accelerators" "runs=$runs" cost.gpu_hour_usd=2.5 cache_dir=/tmp/bench-cache 2>&1 \
  | quiet | tee -a "$OUT/sweep.log"
cp mlruns/mlflow.db "$OUT/mlflow.db"
echo "script took ${SECONDS}s"
