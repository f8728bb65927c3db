#!/usr/bin/env bash
# Fills .whl/ with the packages our GPU machine's image lacks (README, "A GPU machine without internet";
# benchmarks/device_env.sh installs them there): CPython 3.12, manylinux x86_64, the versions resolved in this
# checkout's environment. The image already has torch, transformers, accelerate, safetensors, huggingface_hub,
# tokenizers, torchmetrics, numpy, pandas, scipy, pillow, matplotlib and pyarrow: they are not sent (the limit
# is 64 MiB a call); pytest comes for the GPU tests. Run here, where pip reaches an index: bash benchmarks/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
packages=(
  diffusers hydra-core omegaconf hydra-submitit-launcher submitit cloudpickle
  mlflow mlflow-skinny mlflow-tracing alembic SQLAlchemy Mako sqlparse graphene graphql-core graphql-relay
  Flask flask-cors Werkzeug itsdangerous blinker gunicorn huey cachetools databricks-sdk google-auth pyasn1
  pyasn1_modules cryptography cffi pycparser opentelemetry-api opentelemetry-sdk opentelemetry-proto
  opentelemetry-semantic-conventions protobuf GitPython gitdb smmap Markdown nvidia-ml-py fastapi starlette
  uvicorn h11 anyio pydantic pydantic_core typing-inspection annotated-types annotated-doc typing_extensions
  python-dotenv importlib_metadata zipp docker skops prettytable wcwidth
  pytest pytest-xdist execnet pluggy iniconfig Pygments
)
pins=()
frozen=$(python3 -m pip freeze)  # once: grep -m1 on a live pipe broke pip's output (BrokenPipeError) under pipefail
for name in "${packages[@]}"; do
  pins+=("$(grep -i -m1 "^${name//_/[-_]}==" <<<"$frozen")") || { echo "not installed here: $name" >&2; exit 1; }
done
rm -rf .whl && mkdir .whl
platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl "${pins[@]}"
python3 -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"  # PyPI has it only as source
du -sh .whl
