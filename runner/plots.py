"""The report's pictures: each accelerated run's speedup and memory against its baseline, one row per job and
accelerator, on ratio axes, so jobs of any size sit side by side and the verdict shows in the colour; and,
where jobs ran at several batch sizes, images per second against the batch size."""

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib import ticker

from runner.record import JobRecord, Pace, dtype_where_they_differ

COLOURS = {Pace.FASTER: "#2a9d4b", Pace.SLOWER: "#c0392b", Pace.SAME: "#8c8c8c", Pace.INCONCLUSIVE: "#e69f00"}


def plot_speedups(records: list[JobRecord], folder: Path) -> list[Path]:
    """``speedup.png`` in ``folder`` for the compared accelerated runs among ``records``; nothing if none."""
    rows = [
        r
        for r in records
        if not r.is_baseline and r.comparison and r.comparison.speedup and r.comparison.pace in COLOURS
    ]
    if not rows:
        return []
    rows.sort(key=lambda r: (r.task, r.model, r.size, r.conditions.device_name, -r.comparison.speedup))
    labels = [run_label(r, records) for r in rows]
    figure, (speed, memory) = plt.subplots(
        1, 2, figsize=(11, 1.6 + 0.32 * len(rows)), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    y = range(len(rows))
    colours = [COLOURS[r.comparison.pace] for r in rows]
    speedups = [r.comparison.speedup for r in rows]
    speed.barh(y, speedups, color=colours)
    speed.set_xscale("log")
    speed.set_xlim(min(0.8, min(speedups) / 1.3), max(1.25, max(speedups) * 1.5))  # room for the labels
    speed.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}×"))
    speed.xaxis.set_minor_formatter(ticker.NullFormatter())
    speed.xaxis.set_major_locator(ticker.FixedLocator([0.25, 0.5, 1, 2, 4, 8, 16]))
    speed.axvline(1.0, color="black", linewidth=0.8)
    speed.set_yticks(list(y), labels, fontsize=8)
    speed.invert_yaxis()
    speed.set_title("speedup against the baseline (log scale; colour: pace)", fontsize=9)
    for i, row in enumerate(rows):
        speed.annotate(f"{row.comparison.speedup:.2f}×", (row.comparison.speedup, i), fontsize=7, va="center")
    ratios = [r.comparison.mem_ratio or 0.0 for r in rows]
    memory.barh(y, ratios, color="#4c72b0")
    memory.set_xlim(0, max(1.25, max(ratios) * 1.15))
    memory.axvline(1.0, color="black", linewidth=0.8)
    memory.set_title("peak memory against the baseline", fontsize=9)
    for i, ratio in enumerate(ratios):
        memory.annotate(f"{ratio:.2f}×", (ratio, i), fontsize=7, va="center")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    figure.legend(handles, [str(p) for p in COLOURS], fontsize=7, loc="lower center", ncol=len(COLOURS), frameon=False)
    figure.tight_layout(rect=(0, 0.06 if len(rows) < 6 else 0.03, 1, 1))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "speedup.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path]


def plot_throughput(records: list[JobRecord], folder: Path) -> list[Path]:
    """``throughput.png``: images/s against images per call, one line per job and accelerator; only where some
    job ran at more than one batch size."""
    lines: dict[str, dict[int, float]] = defaultdict(dict)
    for r in records:
        if "images_per_s" in r.metrics:
            lines[run_label(r, records)][r.batch] = r.metrics["images_per_s"]
    lines = {label: points for label, points in lines.items() if len(points) > 1}
    if not lines:
        return []
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for label, points in sorted(lines.items()):
        batches = sorted(points)
        axes.plot(batches, [points[b] for b in batches], marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.set_xlabel("images per call (batch)")
    axes.set_ylabel("images/s")
    axes.set_ylim(bottom=0)
    axes.set_title("throughput against batch size", fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "throughput.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path]


def run_label(run: JobRecord, records: list[JobRecord]) -> str:
    """A run's job and accelerator, with its dtype where ``records`` hold more than one."""
    dtype = dtype_where_they_differ(run, records)
    return f"{run.model} {run.task} {run.size}{' ' + dtype if dtype else ''} · {run.accelerator}"
