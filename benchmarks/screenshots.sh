#!/usr/bin/env bash
# Headless-Chromium screenshots of what a person reads: the experiment's report, MLflow's runs page (every
# sweep's jobs unfolded) and the newest sweep's own page, to be looked at by eye (Debian: apt-get install
# chromium).
#   bash benchmarks/screenshots.sh [TRACKING_URI] [OUT_DIR]      # defaults: the local store, reports/screenshots
set -euo pipefail
uri=${1:-sqlite:///mlruns/mlflow.db}
out=$(mkdir -p "${2:-reports/screenshots}" && cd "${2:-reports/screenshots}" && pwd)
python -m runner.report --tracking-uri "$uri" --out "$out/report"
shoot() {  # URL FILE WIDTHxHEIGHT
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size="${3/x/,}" \
    --virtual-time-budget=15000 --screenshot="$out/$2" "$1" 2>/dev/null
  echo "$out/$2"
}
shoot "file://$out/report/report.html" report.png 1280x2400
port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
python -m mlflow server --host 127.0.0.1 --port "$port" --backend-store-uri "$uri" --workers 1 >"$out/mlflow.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
read -r experiment sweep < <(python - "$uri" <<'PY'
import sys
from mlflow import MlflowClient
client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name("diffusion-bench")
sweeps = client.search_runs([experiment.experiment_id], "tags.kind = 'sweep'", order_by=["attributes.start_time DESC"])
print(experiment.experiment_id, sweeps[0].info.run_id if sweeps else "")
PY
)
page="http://127.0.0.1:$port/#/experiments/$experiment"
python benchmarks/ui_screenshot.py "$page/runs?workflowType=machine_learning" "$out/mlflow_runs.png" 1600x1000  # sweeps unfolded
[ -n "$sweep" ] && shoot "$page/runs/$sweep?workflowType=machine_learning" mlflow_sweep.png 1600x1300
