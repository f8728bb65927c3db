"""Plots where a picture beats a table: latency and peak memory per accelerator, grouped by job."""

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from mlflow.entities import Run

from runner.compare import memory_gib


def plot_runs(runs: list[Run], folder: Path) -> list[Path]:
    """``latency.png`` and ``memory.png`` in ``folder``: one group of bars per job (task, model, size, device),
    one bar per accelerator, the baseline first. Nothing for no runs."""
    if not runs:
        return []
    groups: dict[str, dict[str, Run]] = defaultdict(dict)
    for run in runs:
        p = run.data.params
        label = f"{p.get('model')}\n{p.get('task')} {p.get('height')}x{p.get('width')}"
        groups[label][p.get("accelerator", "?")] = run
    baselines = {r.data.params.get("accelerator") for r in runs if r.data.tags.get("baseline_run") == "self"}
    accelerators = sorted({a for group in groups.values() for a in group}, key=lambda a: (a not in baselines, a))
    folder.mkdir(parents=True, exist_ok=True)
    charts = (
        (
            "latency.png",
            "Mean latency per image (s), ± standard deviation of the timed calls",
            lambda r: (r.data.metrics.get("latency_s"), r.data.metrics.get("latency_std_s", 0.0)),
        ),
        ("memory.png", "Peak memory of the timed calls (GiB)", lambda r: (memory_gib(r), 0.0)),
    )
    paths = []
    for name, title, value in charts:
        figure, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.2))
        x, width = np.arange(len(groups)), 0.8 / len(accelerators)
        for i, accelerator in enumerate(accelerators):
            values = [value(group[accelerator]) if accelerator in group else (None, 0.0) for group in groups.values()]
            heights = [np.nan if v is None else v for v, _ in values]
            axes.bar(
                x - 0.4 + (i + 0.5) * width, heights, width, yerr=[e for _, e in values], capsize=3, label=accelerator
            )
        axes.set_xticks(x, list(groups), fontsize=8)
        axes.set_title(title, fontsize=10)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(folder / name, dpi=120)
        plt.close(figure)
        paths.append(folder / name)
    return paths
