#!/usr/bin/env bash
# cuDNN's float8 kernels against fp16's at SDXL's shapes, and the GPU tests of float8 convolutions, in one device
# call: what decides whether float8 convolutions (fp8's option convolutions) and float8 attention can take
# fp8_compile's 1024 px call under 0.80 s (issue "Faster still"). Everything comes back in $OUT/float8_kernels.tgz:
# each script's JSON and log, the tests' output, the environment.
#   bash benchmarks/float8_kernels.sh; BUDGET=400 bash benchmarks/table.sh "1024:none,fp8_compile,fp8_conv_compile"
set -uo pipefail
source benchmarks/device_env.sh
final=$OUT
work=/tmp/float8-kernels && rm -rf "$work" && mkdir -p "$work"
{ nvidia-smi; python3 -c "import torch, cudnn; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), cudnn.__version__, cudnn.backend_version_string())"; } > "$work/environment.txt" 2>&1
timeout 180 python3 benchmarks/fp8_conv.py "$work/fp8_conv.json" > "$work/fp8_conv.log" 2>&1
timeout 120 python3 benchmarks/fp8_attention.py "$work/fp8_attention.json" > "$work/fp8_attention.log" 2>&1
timeout 240 python3 -m pytest -m gpu -n 0 -p no:cacheprovider -q tests/test_float8_conv.py > "$work/gpu_tests.log" 2>&1
tail -3 "$work"/*.log
tar czf "$final/float8_kernels.tgz" -C "$work" .
echo "float8_kernels.sh took ${SECONDS}s"
