#!/usr/bin/env bash
# The measurements behind BENCHMARKS.md's "Comparisons you can trust", one call of the device tool each:
#   RUNS=15 bash benchmarks/trust.sh parallel  # on a 2-GPU host: the same 4 jobs one at a time, all at once,
#                                              # and one at a time again (RUNS timed calls each, default 10)
#   bash benchmarks/trust.sh bare       # runner against bare diffusers, image-to-image, none and cuda_graph
# SDXL base's architecture with random weights, 30 steps. Results (logs, MLflow database, JSON) land in $OUT.
set -uo pipefail
. benchmarks/device_env.sh
budget=${BUDGET:-560}  # seconds this script may take, inside the device tool's 600
{
  nvidia-smi --query-gpu=index,name,uuid,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c "import sys, torch, diffusers, transformers, mlflow; print(sys.version.split()[0], torch.__version__, torch.version.cuda, diffusers.__version__, transformers.__version__, mlflow.__version__)"
  nproc; grep -m1 "model name" /proc/cpuinfo; cat /proc/sys/kernel/random/boot_id
  lscpu | grep -E "^(Thread|Core|Socket|NUMA)"
  for cpu in 28 29 30 31; do echo "cpu$cpu siblings $(cat /sys/devices/system/cpu/cpu$cpu/topology/thread_siblings_list)"; done
} 2>&1 | tee "$OUT/environment_$1.txt"
left() { echo $((budget - SECONDS - ${1:-10})); }
job=(model.weights=random cache_dir=/tmp/bench-cache)
sdxl=(model=sdxl_base steps=30)
case $1 in
parallel)
  # One job at a time, then all four at once, then one at a time again: the two one-at-a-time sweeps
  # bracket the parallel one (a host that drifts shows up between them) and tell how far a job's mean
  # moves between two sweeps under identical conditions, the floor under any "within N%" claim.
  grid=("${job[@]}" "${sdxl[@]}" res=512,1024 accelerator=none,cuda_graph runs=${RUNS:-10})
  two_gpus=(hydra/launcher=local_gpus hydra.launcher.gpus_per_node=2)
  for sweep in one_gpu two_gpu one_gpu_again; do
    start=$SECONDS
    case $sweep in
    one_gpu) args=("${grid[@]}") ;;  # each job on the GPU its slot gives it in the parallel sweep too
    two_gpu) args=("${two_gpus[@]}" "${grid[@]}" force=true) ;;
    one_gpu_again) args=("${grid[@]}" force=true) ;;
    esac
    timeout "$(left 10)" python3 -m runner -m "${args[@]}" 2>&1 | quiet | tee "$OUT/$sweep.log"
    echo "$sweep sweep: $((SECONDS - start)) s wall" | tee -a "$OUT/walls.txt"
  done
  cat mlruns/hydra/*/.submitit/*/*_0_log.out 2>/dev/null | quiet > "$OUT/two_gpu_jobs.log"
  ;;
bare)
  for args in "${sdxl[*]} task=i2i res=1024 accelerator=none" "${sdxl[*]} task=i2i res=1024 accelerator=cuda_graph" \
      "model=instruct_pix2pix task=i2i res=512 accelerator=none" \
      "model=instruct_pix2pix task=i2i res=512 accelerator=cuda_graph"; do
    name=$(echo "$args" | tr ' =' '_-')
    ((SECONDS < budget - 60)) || break
    # shellcheck disable=SC2086  # the words of $args are overrides
    timeout "$(left)" python3 benchmarks/overhead.py "$OUT/overhead_$name.json" "${job[@]}" $args runs=15 2>&1 \
      | quiet | tail -2 | tee -a "$OUT/overhead.log"
  done
  ((SECONDS < budget - 100)) && timeout "$(left)" python3 -m pytest -q -m gpu -n 4 -p no:cacheprovider tests 2>&1 \
    | tail -8 | tee "$OUT/pytest_gpu.txt"
  ;;
esac
cp mlruns/mlflow.db "$OUT/mlflow_$1.db" 2>/dev/null
echo "script took ${SECONDS}s"
