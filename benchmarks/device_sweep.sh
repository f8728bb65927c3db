#!/usr/bin/env bash
# One call of the device tool: the GPU tests, then a sweep (the arguments are the runner's), with the
# MLflow database and the sweep's output brought back in $OUT.
#   bash benchmarks/device_sweep.sh model=sdxl_base model.weights=random steps=30 res=512,1024 accelerator=none,cuda_graph
set -uo pipefail
. benchmarks/device_env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/environment.txt"
python3 -m pytest -q -m gpu tests 2>&1 | tail -4 | tee "$OUT/pytest_gpu.txt"
python3 -m runner "$@" 2>&1 | quiet | tee "$OUT/sweep.log"
cp mlruns/mlflow.db "$OUT/"
