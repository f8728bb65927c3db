#!/usr/bin/env bash
# The original report's grid (conf/experiment/original_report.yaml) on one GPU, random weights, in calls of
# the device tool that each continue where the last stopped (resume): the same command, again, until the
# sweep ends with its table. Compile caches and the MLflow store stay on the machine while it stays up.
#   bash benchmarks/original_report.sh [BUDGET_S]
# The MLflow database and the sweep's log of this call land in $OUT.
set -uo pipefail
. benchmarks/device_env.sh
budget=${1:-570}
call=$(($(ls mlruns/original_report_call_* 2>/dev/null | wc -l) + 1))
mkdir -p mlruns && touch "mlruns/original_report_call_$call"
{
  nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,clocks.max.sm --format=csv,noheader
  python3 -c "import sys, torch, diffusers, transformers; print(sys.version.split()[0], torch.__version__, torch.version.cuda, diffusers.__version__, transformers.__version__)"
  echo "call $call on $(cat /proc/sys/kernel/random/boot_id); PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset}"
  python3 -c "import time; t = time.time(); import runner.worker; print(f'import runner.worker: {time.time() - t:.1f} s')"
} 2>&1 | tee "$OUT/environment_$call.txt"
if [ "$call" = 1 ]; then  # a CUDA job through the command line first: a broken setup stops here, not 40 jobs later
  timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cli.py 2>&1 | tail -3 | tee "$OUT/pytest_gpu.txt"
  grep -q " passed" "$OUT/pytest_gpu.txt" && ! grep -q "failed" "$OUT/pytest_gpu.txt" || exit 1
fi
# The GPU's clocks, temperature, power and throttle reasons every 10 s: what a drifting run ran on.
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active \
  --format=csv -l 10 >>"$OUT/gpu_$call.csv" 2>&1 &
timeout $((budget - SECONDS - 20)) python3 -m runner +experiment=original_report model.weights=random \
  cache_dir=/tmp/bench-cache 2>&1 | quiet \
  | tee "$OUT/sweep_$call.log"
cp mlruns/mlflow.db "$OUT/mlflow.db"
echo "call $call took ${SECONDS}s"
report=$(ls -td mlruns/artifacts/*/artifacts/report 2>/dev/null | head -1)
if [ -n "$report" ] && grep -q "^Report: " "$OUT/sweep_$call.log"; then  # the sweep ended: its report
  tar czf "$OUT/report.tgz" -C "$report" .
fi
