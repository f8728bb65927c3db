#!/usr/bin/env bash
# A sweep's own start, this checkout against another (an earlier commit's tree), on one machine start:
#   bash benchmarks/sweep_start.sh OTHER_TREE [ROUNDS [OVERRIDE ...]]   OTHER_TREE e.g. from
#   mkdir -p .device/old && git archive 1d8bf5b runner conf hydra_plugins | tar -x -C .device/old
# Runs the same one-job sweep (by default SDXL, random weights, 512 px, `none`, 2 timed calls) from OTHER_TREE
# and from here in turns, ROUNDS times (default 2), after one import that fills the page cache for both; each
# sweep has its own MLflow database, all one compile cache. For each: the command's wall time, and the job's
# own line (its `start`: the worker's start and imports). Also what this host's Python does with bytecode,
# which sets how long an import takes. Results in $OUT/sweep_start/.
set -uo pipefail
. benchmarks/device_env.sh
other=$(cd "$1" && pwd)
python3 -m compileall -q -j 0 "$other/runner" "$other/hydra_plugins" >/dev/null 2>&1
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
rounds=${2:-2}
shift $(($# < 2 ? $# : 2))
out=$OUT/sweep_start
mkdir -p "$out"
{
  env | grep -E "^PYTHON" | sort
  python3 -c "import sys, torch; print('dont_write_bytecode', sys.flags.dont_write_bytecode, 'pycache_prefix', sys.pycache_prefix, 'torch at', torch.__file__)"
  torch_dir=$(python3 -c "import os, torch; print(os.path.dirname(torch.__file__))")
  echo "torch .pyc files beside its sources: $(find "$torch_dir" -name '*.pyc' | wc -l) of $(find "$torch_dir" -name '*.py' | wc -l) .py"
  python3 -c "from runner.launch import missing_bytecode_hint as hint; print('the sweep says:', repr(hint()))"
  for attempt in 1 2; do
    start=$(now)
    python3 -c "import runner.worker"
    echo "import runner.worker, attempt $attempt: $(since "$start") s"
  done
} 2>&1 | tee "$out/environment.txt"
job=(model=sdxl_base model.weights=random steps=30 res=512 runs=2 accelerator=none)
(($#)) && job=("$@")
job+=(force=true cache_dir=/tmp/sweep-start-cache)
for round in $(seq "$rounds"); do
  for tree in other this; do
    dir=$PWD
    [ "$tree" = other ] && dir=$other
    name=${tree}_$round
    start=$(now)
    (cd "$dir" && PYTHONPATH="$dir${PYTHONPATH#"$PWD"}" python3 -m runner "${job[@]}" \
      "mlflow.tracking_uri=sqlite:///$out/$name.db" "hydra.sweep.dir=/tmp/sweep-start/$name") 2>&1 | quiet >"$out/$name.log"
    wall=$(since "$start")
    echo "$name: sweep wall ${wall} s; $(grep -m1 -E '\] wall ' "$out/$name.log")" | tee -a "$out/walls.txt"
  done
done
