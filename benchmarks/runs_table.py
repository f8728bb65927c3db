"""A machine start's runs as BENCHMARKS.md's per-run table, from its raw results (benchmarks/export_runs.py's JSON):
    python benchmarks/runs_table.py benchmarks/results/<date>-<device>/runs.json

One row per run in the order the runs began: the sweep (task, size, and its number among the start's sweeps of that
task and size), the accelerator, the mean latency and its CV, the time before the first denoising step, the denoising
and the decode (ms), the share of the timed calls at the GPU's power limit, the mean power, and SSIM / PSNR against
the run's baseline. A baseline measured again after a sweep's runs is listed after the table, not as a row."""

import json
import sys
from typing import Any


def row(run: dict[str, Any], sweep: str) -> str:
    metrics = run["metrics"]
    phases = " / ".join(f"{1000 * metrics[name]:.1f}" for name in ("text_encode_s", "denoise_s", "decode_s"))
    against = (
        f"{metrics['ssim_vs_baseline']:.5f} / {metrics['psnr_vs_baseline']:.1f} dB"
        if "ssim_vs_baseline" in metrics
        else ""
    )
    latency = f"{metrics['latency_s']:.4f}, {100 * metrics['latency_cv']:.1f}%"
    capped = f"{100 * metrics['power_capped_share']:.0f}%" if "power_capped_share" in metrics else "-"
    power = f"{metrics['avg_power_w']:.0f} W" if "avg_power_w" in metrics else "-"
    return f"| {sweep} | `{run['params']['accelerator']}` | {latency} | {phases} | {capped} | {power} | {against} |"


def table(runs: list[dict[str, Any]]) -> str:
    """The table and the line of baselines measured again, as BENCHMARKS.md gives them."""
    lines = [
        "| sweep | accelerator | latency | before / denoise / decode | power-capped | power | against `none` |",
        "|---|---|---|---|---|---|---|",
    ]
    numbers: dict[str, dict[str, int]] = {}  # each task and size's sweeps, numbered in the order they began
    again = []
    for run in sorted(runs, key=lambda run: run["start_time_ms"]):
        if run["status"] != "FINISHED" or "latency_s" not in run["metrics"]:
            continue  # a run the call's time stopped has no figures (it is in runs.json as KILLED)
        params = run["params"]
        kind = f"{params['task']} {params['res']}"
        sweeps = numbers.setdefault(kind, {})
        number = sweeps.setdefault(run["tags"]["sweep_id"], len(sweeps) + 1)
        if "baseline_again" in run["tags"]:  # the runner's tag, naming the sweep's first baseline run
            again.append(f"{kind}, {number}: {run['metrics']['latency_s']:.4f} s")
            continue
        lines.append(row(run, f"{kind}, {number}"))
    if again:
        lines += ["", f"Baselines measured again after their sweep's runs: {'; '.join(again)}."]
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        runs = json.load(file)
    if not isinstance(runs, list):  # 2026-11-25's two exports keyed their runs by name, with no start times or status
        sys.exit(
            f"{sys.argv[1]}: an export keyed by run name (2026-11-25's), without the start times this table is ordered "
            "by: give it a runs.json that benchmarks/export_runs.py wrote (a list of runs), or read that day's figures "
            "in its BENCHMARKS.md sections"
        )
    print(table(runs))
