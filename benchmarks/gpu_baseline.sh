#!/usr/bin/env bash
# Every GPU measurement behind BENCHMARKS.md's baseline section, in one call of the device tool:
#   GPU tests, the SDXL sweep (random weights, 512 and 1024 px, 30 steps, accelerator=none), and the
#   runner's overhead against bare pipe(...) calls. Results land in $OUT.
# Packages the device image lacks travel as wheels in .whl/ (README, "A GPU machine without internet").
set -uo pipefail
. benchmarks/device_env.sh
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch, diffusers, transformers; print(sys.version.split()[0], torch.__version__, torch.version.cuda, diffusers.__version__, transformers.__version__)"
  nproc; grep -m1 "model name" /proc/cpuinfo
} 2>&1 | tee "$OUT/environment.txt"
python3 -m pytest -q -m gpu tests 2>&1 | tail -5 | tee "$OUT/pytest_gpu.txt"
python3 -m runner +experiment=sdxl_random 2>&1 | tee "$OUT/sweep.log"
python3 - <<'PY' 2>&1 | tee -a "$OUT/sweep.log"
# Are the random-weight images finite and varied (not black, constant or NaN)?
import numpy as np
from pathlib import Path
from PIL import Image
for png in sorted(Path("mlruns/artifacts").glob("*/artifacts/images/000_seed0.png")):
    pixels = np.asarray(Image.open(png), dtype=np.float32)
    print(f"{png.parts[-4]}: mean {pixels.mean():.1f} std {pixels.std():.1f}")
PY
cp mlruns/mlflow.db "$OUT/"
for res in 512 1024; do
  python3 benchmarks/overhead.py "$OUT/overhead_$res.json" model=sdxl_base model.weights=random steps=30 res=$res runs=20 2>&1 \
    | tee -a "$OUT/overhead.log"
done
