"""The report's picture: each accelerated run's speedup and memory against its baseline, one row per job and
accelerator, on ratio axes, so jobs of any size sit side by side and the verdict shows in the colour."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from runner.record import JobRecord, Pace

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
    labels = [f"{r.model} {r.task} {r.size} · {r.accelerator}" for r in rows]
    figure, (speed, memory) = plt.subplots(
        1, 2, figsize=(11, 1.2 + 0.32 * len(rows)), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    y = range(len(rows))
    colours = [COLOURS[r.comparison.pace] for r in rows]
    speed.barh(y, [r.comparison.speedup for r in rows], color=colours)
    speed.set_xscale("log")
    speed.axvline(1.0, color="black", linewidth=0.8)
    speed.set_yticks(list(y), labels, fontsize=8)
    speed.invert_yaxis()
    speed.set_title("speedup against the baseline (log scale; colour: pace)", fontsize=9)
    for i, row in enumerate(rows):
        speed.annotate(f"{row.comparison.speedup:.2f}×", (row.comparison.speedup, i), fontsize=7, va="center")
    ratios = [r.comparison.mem_ratio or 0.0 for r in rows]
    memory.barh(y, ratios, color="#4c72b0")
    memory.axvline(1.0, color="black", linewidth=0.8)
    memory.set_title("peak memory against the baseline", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    speed.legend(handles, [str(p) for p in COLOURS], fontsize=7, loc="lower right")
    figure.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "speedup.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path]
