#!/usr/bin/env bash
# Why eager `none`'s calls spread 12-25% pinned to one core of an idle H200 host (BENCHMARKS.md, "Cold compiles
# shown cold"), in one device call:
#   bash benchmarks/eager_noise.sh [SWEEP ...]      # then each SWEEP (accelerator=..., overrides) while time lasts
# The same eager job (SDXL, random weights, 1024 px, 20 timed calls) three ways, one sweep each: pinned as the
# runner pins (the highest core), unpinned (pin_cpu=false), and pinned with the process held to cores 0-7
# (taskset: the lease pins core 7). benchmarks/threads_watch.py samples every core and thread throughout, each
# line of the sweeps is stamped with the wall clock (to place the timed calls), and `python -X importtime` of
# the workers' server's imports runs twice before (what a sweep's first job waits for). Results in
# $OUT/eager_noise.tgz.
set -uo pipefail
. benchmarks/device_env.sh
budget=${BUDGET:-570}
{
  nvidia-smi --query-gpu=name,uuid,driver_version,power.limit --format=csv,noheader
  python3 -c "import sys, torch, diffusers; print(sys.version.split()[0], torch.__version__, diffusers.__version__)"
  cat /proc/sys/kernel/random/boot_id
  lscpu
  for core in /sys/devices/system/cpu/cpu[0-9]*; do echo "$(basename "$core") siblings $(cat "$core/topology/thread_siblings_list" 2>/dev/null)"; done
  nvidia-smi topo -m
} > "$OUT/environment.txt" 2>&1
python3 benchmarks/threads_watch.py "$OUT/threads.json" &
watcher=$!
stamp() { python3 -u -c "import sys, time; [print(f'{time.time():.3f} {line}', end='', flush=True) for line in sys.stdin]"; }
for i in 1 2; do
  start=$SECONDS
  python3 -X importtime -c "from runner.launch import PRELOADED; [__import__(m) for m in PRELOADED]" 2> "$OUT/importtime$i.txt"
  echo "imports $i: $((SECONDS - start)) s" | tee -a "$OUT/walls.txt"
done
job=(model=sdxl_base model.weights=random steps=30 res=1024 warmup=1 "cache_dir=${CACHE_DIR:-/tmp/bench-cache}")
run() {  # NAME [PREFIX ...] -- OVERRIDES ...: one sweep, stamped, within the time left
  local name=$1 start=$SECONDS
  shift
  ((SECONDS < budget - 90)) || { echo "$name: no time left" | tee -a "$OUT/walls.txt"; return; }
  timeout $((budget - SECONDS - 15)) "$@" 2>&1 | stamp | tee "$OUT/$name.log" | grep -E "timed [0-9]+/|latency|Error|error" | tail -4
  echo "$name: $((SECONDS - start)) s wall" | tee -a "$OUT/walls.txt"
  cp mlruns/mlflow.db "$OUT/mlflow.db"
}
run pinned python3 -m runner -m "${job[@]}" runs=20 accelerator=none
run unpinned python3 -m runner -m "${job[@]}" runs=20 accelerator=none pin_cpu=false
run pinned_core7 taskset -c 0-7 python3 -m runner -m "${job[@]}" runs=20 accelerator=none force=true
for sweep in "$@"; do
  # shellcheck disable=SC2086  # a sweep's words are separate overrides
  run "sweep_$(echo "$sweep" | tr " ,=/" "____")" python3 -m runner -m "${job[@]}" $sweep
done
kill "$watcher"
wait "$watcher"
# One archive: the device tool brings back eight files at most, and on 2026-12-04 a log was left behind.
packed=$(mktemp -d)/eager_noise.tgz
tar czf "$packed" -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv "$packed" "$OUT/"
echo "eager_noise.sh took ${SECONDS}s"
