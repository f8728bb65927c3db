"""The report: the answer first, then every job in the shape of the original hand-written report.

    python -m runner.report [--experiment NAME] [--tracking-uri URI] [--out DIR] [--filter MLFLOW_FILTER]

It only reads: the comparison (runner/compare.py) has already judged the runs, at the end of their sweep or
by ``python -m runner.compare``. Reruns of one job are one row: the newest finished run of each configuration
on each device is shown (the others stay in MLflow). ``report.md`` links its images and plots, copied beside
it; ``report.html`` carries them inside, so it reads the same from disk, from MLflow's Artifacts tab or mailed.
"""

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from PIL import Image

from runner.catalogue import Metric, describe
from runner.compare import FASTER, core_gap, host_bound
from runner.config import MlflowConfig
from runner.errors import RunnerError, one_line
from runner.html import to_html
from runner.plots import plot_speedups, plot_throughput
from runner.record import JobRecord, Outcome, Pace, Quality, Steadiness, dtype_where_they_differ
from runner.tracking import Tracker

NOT_RUN = "Failed, stopped and skipped jobs"  # the report's last section
NO_IMAGES = "(no images in this artifact store: log_images=false, or the artifacts stayed where the runs ran)"
REPORT_IMAGE_PX = 384  # the report's copies of run images; MLflow keeps them at full size

DETAIL_COLUMNS = (
    "warmup_s",
    "compile_cache_files_at_start",  # whether that warmup compiled from an empty cache
    "switch_first_call_s",
    "switch_back_cost_s",
    "latency_s",
    "gpu_busy_share",  # how much of that latency the GPU ran kernels
    "its",
    "images_per_s",
    "energy_j_per_image",
    "usd_per_1k_images",
    "clip_score",
    "ssim_vs_baseline",
    "speedup_vs_baseline",
)


def write_report(tracker: Tracker, out: Path, records: list[JobRecord]) -> None:
    """Write ``report.md`` and ``report.html`` (with their images and plots) about ``records`` to ``out``."""
    shown = newest(records)
    (out / "images").mkdir(parents=True, exist_ok=True)
    finished = [r for r in shown if r.ok]
    plots = plot_speedups(finished, out / "plots") + plot_throughput(finished, out / "plots")
    text = Report(tracker, shown, records, out, plots).markdown()
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(to_html(text, f"Report: {tracker.experiment_name}", out))


def newest(records: list[JobRecord]) -> list[JobRecord]:
    """One record per configuration and device: the newest finished one, else the newest of any outcome."""
    finished = {r.config_hash for r in records if r.ok and r.config_hash}
    chosen: dict[tuple[str, str], JobRecord] = {}
    for record in sorted(records, key=lambda r: r.started_ms):
        if record.config_hash in finished and not record.ok:
            continue
        chosen[(record.config_hash or record.name, record.conditions.device_name)] = record
    return sorted(chosen.values(), key=lambda r: r.started_ms)


class Report:
    def __init__(
        self, tracker: Tracker, records: list[JobRecord], every: list[JobRecord], out: Path, plots: list[Path]
    ) -> None:
        """``records`` are the runs shown (the newest of each job); ``every`` also holds older runs, baselines
        that a shown run may have been compared with among them."""
        self.tracker, self.records, self.out, self.plots = tracker, records, out, plots
        self.total, self.by_id = len(every), {record.run_id: record for record in every}
        # A run's baseline from a sweep not reported here (a resumed sweep's, an older one on the same start):
        # read back, so that what the report says of the two (steadiness, the host's speed) does not depend on it.
        chosen = {r.comparison.baseline_run for r in records if r.comparison} - {"", "self", *self.by_id}
        kept = {run_id: tracker.kept_record(run_id) for run_id in sorted(chosen)}
        self.by_id.update((run_id, record) for run_id, record in kept.items() if record is not None)
        self.jobs: dict[tuple[str, str, str, str], list[JobRecord]] = defaultdict(list)
        for record in records:
            if record.ok:
                size = record.size + (f", batch {record.batch}" if record.batch > 1 else "")
                dtype = dtype_where_they_differ(record, records)  # a dtype sweep: each its own job
                size += f", {dtype}" if dtype else ""
                self.jobs[(record.task_title, record.model, size, record.conditions.device_name)].append(record)

    def markdown(self) -> str:
        lines = [
            "# Does acceleration make the pipelines faster, with quality unaffected?",
            "",
            f"Experiment `{self.tracker.experiment_name}`: {self._counts()}. Written {datetime.now():%Y-%m-%d %H:%M}"
            " by `python -m runner.report` from the runs in MLflow, measured as README.md (Measurement protocol) "
            "describes; timings compare only within one device, machine start and number of jobs at once.",
            "",
            "## Answer",
            "",
            *self._answer(),
            "",
            *self._job_lines(),
            "",
            *(f"![{plot.stem}](plots/{plot.name})" for plot in self.plots),
            "",
        ]
        for key in sorted(self.jobs, key=lambda k: (k[0] != "Text-to-image", k[0], k[1], _pixels(k[2]), k[3])):
            lines += self._job(key, sorted(self.jobs[key], key=_order))
        lines += self._not_run()
        return "\n".join(lines) + "\n"

    def _counts(self) -> str:
        outcomes = [r.outcome for r in self.records]
        devices = sorted({r.conditions.device_name for r in self.records} - {""})
        repeated = self.total - len(self.records)
        return (
            f"{len(self.records)} job(s): {outcomes.count(Outcome.OK)} finished, {outcomes.count(Outcome.FAILED)} "
            f"failed, {outcomes.count(Outcome.KILLED)} stopped, {outcomes.count(Outcome.SKIPPED)} skipped; on "
            f"{', '.join(devices) or 'no device'}"
            + (f" ({repeated} older run(s) of the same jobs not shown)" if repeated > 0 else "")
        )

    def _answer(self) -> list[str]:
        found = answers(self.records)
        if not found:
            return ["No accelerated run yet: sweep `accelerator=none,<other>` (the baseline first) to answer."]
        lines = [
            "| accelerator | answer | jobs | faster | quality unaffected | faster and unaffected | speedup "
            "| inconclusive | not compared | failed | stopped |",
            "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for a in found:
            lines.append(
                f"| {a.accelerator} | {a.cell} | {a.jobs} | {a.faster} | {a.unaffected} | {a.both} | {a.span} "
                f"| {a.inconclusive} | {a.uncompared} | {a.failed} | {a.stopped} |"
            )
        lines += [
            "",
            f"*Yes*: faster (by {FASTER:.2f}× or more, beyond the calls' noise) with quality unaffected in every job "
            "that could be judged; *inconclusive*: its timings or its baseline's were noisy or contended, rerun; *not "
            "compared*: no baseline measured under the same conditions; *stopped*: ended by Ctrl-C, a SIGTERM (a "
            "scheduler, a time limit) or its process's death, not by the accelerator: run the sweep again to resume.",
        ]
        if any(r.weights == "random" for r in self.records):
            lines += [
                "",
                "Runs with `weights=random` time exactly like the real models, but their images are noise: their "
                "CLIP scores mean nothing, so their quality is judged by similarity to the baseline alone.",
            ]
        return lines

    def _job_lines(self) -> list[str]:
        accelerated = [r for r in self.records if r.ok and not r.is_baseline]
        if not accelerated:
            return []
        lines = [
            "| job | accelerator | latency (s) | speedup | pace | quality unaffected | measurement |",
            "|---|---|---:|---:|---|---|---|",
        ]
        for key in sorted(self.jobs, key=lambda k: (k[0], k[1], _pixels(k[2]), k[3])):
            for record in sorted(self.jobs[key], key=_order):
                if record.is_baseline:
                    continue
                c = record.comparison
                lines.append(
                    f"| {_job_title(key)} | {record.accelerator} | {record.latency_s:.3f} | "
                    f"{describe('speedup_vs_baseline').show(c.speedup if c else None)} | "
                    f"{self._pace(record)} | {record.quality.verdict} | {record.measurement.steadiness} |"
                )
        return lines

    def _job(self, key: tuple[str, str, str, str], runs: list[JobRecord]) -> list[str]:
        first = runs[0]
        source = f"`{first.model_id}`" if first.model_id else "built in code"
        lines = [f"## {_job_title(key)}", "", f"{first.model}: {source}, {first.weights} weights.", ""]
        metrics = [describe(key) for key in DETAIL_COLUMNS if any(key in run.metrics for run in runs)]
        lines += [
            "| accelerator | " + " | ".join(m.heading for m in metrics) + " | peak memory (GiB) | pace | quality "
            "unaffected | measurement |",
            "|---|" + "---:|" * (len(metrics) + 1) + "---|---|---|",
        ]
        for run in runs:
            role = " (baseline, measured again after the others)" if run.again_of else " (baseline)"
            name = run.accelerator + (role if run.is_baseline else "")
            name += " **best**" if run.comparison and run.comparison.best else ""
            cells = [_cell(run, metric) for metric in metrics]
            memory = run.memory_gib
            lines.append(
                f"| {name} | {' | '.join(cells)} | {'-' if memory is None else f'{memory:.2f}'} | "
                f"{self._pace(run) if run.comparison else '-'} | {run.quality.verdict} | "
                f"{run.measurement.steadiness} |"
            )
        conclusion = " ".join(
            _sentence(r, self.by_id.get(r.comparison.baseline_run if r.comparison else "")) for r in runs
        )
        lines += ["", *self._images(runs), "", "**Conclusion.** " + conclusion, ""]
        return lines

    def _pace(self, run: JobRecord) -> str:
        """The verdict, and for one withheld, in a few words whose timings forbade it: a reader of the table
        sees why a steady run is inconclusive (its baseline was not) without reading the conclusion."""
        c = run.comparison
        if c is None:
            return "not compared"
        if c.pace is not Pace.INCONCLUSIVE:
            return str(c.pace)
        baseline = self.by_id.get(c.baseline_run)
        doubts = [
            f"{who} {r.measurement.steadiness}"
            for who, r in (("this run", run), ("baseline", baseline))
            if r is not None and r.measurement.steadiness is not Steadiness.STEADY
        ]
        if baseline is None:
            doubts.append("see MLflow's baseline_why")
        return f"inconclusive ({', '.join(doubts) or 'baselines disagree'})"

    def _images(self, runs: list[JobRecord]) -> list[str]:
        cells = []
        given = self._copy(runs[0], "input.png")
        if given:
            cells.append(f"![input]({given})")
        for run in runs:
            path = self._copy(run)
            if path:
                cells.append(f"![{run.accelerator}]({path})")
        return [" ".join(cells)] if cells else [NO_IMAGES]

    def _copy(self, run: JobRecord, artifact: str = "") -> str:
        """The run's first image (or ``artifact``) beside the report, at most REPORT_IMAGE_PX on a side (the
        full-size images stay in MLflow): a report of a large grid stays small enough to mail or commit.
        Its relative path, or ""."""
        target = self.out / "images" / f"{run.run_id[:12]}-{Path(artifact).stem or 'first'}.png"
        if not target.exists():
            downloaded = self.tracker.download(run.run_id, artifact)
            if downloaded is None:
                return ""
            with Image.open(downloaded) as image:
                image.thumbnail((REPORT_IMAGE_PX, REPORT_IMAGE_PX))
                image.save(target)
        return f"images/{target.name}"

    def _not_run(self) -> list[str]:
        missing = [r for r in self.records if not r.ok]
        if not missing:
            return [f"## {NOT_RUN}", "", "None: every job finished.", ""]
        lines = [f"## {NOT_RUN}", "", "| job | outcome | why |", "|---|---|---|"]
        for record in sorted(missing, key=lambda r: (r.outcome is Outcome.SKIPPED, r.name)):
            lines.append(f"| {record.name} | {record.outcome} | {record.why.replace('|', '/') or '?'} |")
        return [*lines, ""]


@dataclass(frozen=True)
class Answer:
    """The answer for one accelerator: in how many jobs it was faster, with quality unaffected."""

    accelerator: str
    jobs: int  # finished runs of it, one per job (the newest)
    faster: int
    unaffected: int
    both: int
    judged: int  # jobs whose pace is a verdict: faster, slower or about as fast
    inconclusive: int
    uncompared: int
    failed: int
    speedups: tuple[float, ...]  # of the judged jobs
    stopped: int = 0  # ended by Ctrl-C, SIGTERM or its process's death: no fault of the accelerator

    @property
    def verdict(self) -> str:
        if not self.judged:
            return "not answered"
        return "Yes" if self.both == self.judged else "Partly" if self.both else "No"

    @property
    def cell(self) -> str:
        """The answer as the report's table shows it: bold, and on how many of its jobs it rests when the
        others could not be judged (a Yes from 2 of 8 jobs is not a Yes from 8)."""
        if not self.judged:
            return self.verdict
        return f"**{self.verdict}**" + (f" ({self.judged} of {self.jobs} judged)" if self.judged < self.jobs else "")

    @property
    def span(self) -> str:
        return f"{min(self.speedups):.2f}×-{max(self.speedups):.2f}×" if self.speedups else "-"

    def line(self) -> str:
        """The answer in one line, as a sweep prints it under its table."""
        if not self.judged:
            why = (
                f"{self.inconclusive} inconclusive, {self.uncompared} not compared, {self.failed} failed, "
                f"{self.stopped} stopped"
            )
            return f"{self.accelerator}: not answered ({why})"
        return (
            f"{self.accelerator}: {self.verdict}, faster with quality unaffected in {self.both} of {self.judged} "
            f"judged job(s) ({self.span})"
        )


def answers(records: list[JobRecord]) -> list[Answer]:
    """One answer per accelerator under test (not the baseline) among ``records``, one run per job."""
    compared: dict[str, list[JobRecord]] = defaultdict(list)
    ended: dict[Outcome, dict[str, int]] = {Outcome.FAILED: defaultdict(int), Outcome.KILLED: defaultdict(int)}
    for record in newest(records):
        if record.is_baseline:
            continue
        if record.outcome in ended:
            ended[record.outcome][record.accelerator] += 1
        elif record.ok:
            compared[record.accelerator].append(record)
    found = []
    for accelerator in sorted({*compared, *ended[Outcome.FAILED], *ended[Outcome.KILLED]}):
        runs = compared.get(accelerator, [])
        paces = [r.comparison.pace if r.comparison else Pace.UNCOMPARED for r in runs]
        fast = [r for r, p in zip(runs, paces, strict=True) if p is Pace.FASTER]
        good = [r for r in runs if r.quality.verdict is Quality.UNAFFECTED]
        judged = [r for r, p in zip(runs, paces, strict=True) if p in (Pace.FASTER, Pace.SLOWER, Pace.SAME)]
        found.append(
            Answer(
                accelerator,
                len(runs),
                len(fast),
                len(good),
                len([r for r in fast if r in good]),
                len(judged),
                paces.count(Pace.INCONCLUSIVE),
                paces.count(Pace.UNCOMPARED),
                ended[Outcome.FAILED].get(accelerator, 0),
                tuple(r.comparison.speedup for r in judged if r.comparison and r.comparison.speedup),
                ended[Outcome.KILLED].get(accelerator, 0),
            )
        )
    return found


def _cell(run: JobRecord, metric: Metric) -> str:
    """A run's metric as the tables show it; latency with its standard deviation over the calls."""
    shown = metric.show(run.metrics.get(metric.key))
    spread = run.metrics.get("latency_std_s") if metric.key == "latency_s" else None
    return shown if spread is None else f"{shown} ± {spread:.3f}"


def _sentence(run: JobRecord, baseline: JobRecord | None) -> str:
    """One sentence on one run: how fast against its ``baseline`` (the run it was compared with), whether that is a
    verdict, whether the host's speed moved between the two, and quality."""
    c = run.comparison
    if run.is_baseline:
        busy = host_bound(run)
        bound = (
            f"; the GPU busy {busy:.0%} of it: bound by the host, so speedups over it move with the host's CPU"
            if busy is not None
            else ""
        )
        steadiness = run.measurement.steadiness
        return f"{run.accelerator} is the baseline ({run.latency_s:.3f} s; measurement {steadiness}{bound})."
    if c is None or c.pace is Pace.UNCOMPARED:
        return f"{run.accelerator}: not compared ({c.why if c else 'no comparison yet'})."
    speed = {
        Pace.FASTER: f"{c.speedup:.2f}× faster",
        Pace.SLOWER: f"{1 / c.speedup:.2f}× slower" if c.speedup else "slower",
        Pace.SAME: f"about as fast ({c.speedup:.2f}×, within the calls' noise or under {FASTER:.2f}×)",
        Pace.INCONCLUSIVE: f"inconclusive, rerun ({c.speedup:.2f}× measured; {c.why.split('rerun: ')[-1]})",
    }[c.pace]
    quality = {
        Quality.UNAFFECTED: "quality unaffected",
        Quality.AFFECTED: "quality affected",
        Quality.UNKNOWN: "quality not compared",
    }[run.quality.verdict]
    loops = core_gap(baseline, run) if baseline is not None else None
    if loops is not None:
        speed += (
            f" (the baseline's launching core ran a fixed loop in {loops[0]:.2f} ms, {loops[1]:.2f} ms during this "
            "run: the host's speed moved between them)"
        )
    return f"{run.accelerator}: {speed}, {quality} ({run.quality.why})."


def _job_title(key: tuple[str, str, str, str]) -> str:
    task, model, size, device = key
    return f"{task}, {model}, {size}" + (f" on {device}" if device else "")


def _order(run: JobRecord) -> tuple:
    """Baseline first, then the others fastest first."""
    return (not run.is_baseline, run.latency_s)


def _pixels(size: str) -> int:
    height, _, width = size.split(",")[0].partition("x")  # "512x512, batch 4, bf16": its first part
    return int(height) * int(width) if height.isdigit() and width.isdigit() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=MlflowConfig.tracking_uri, help="MLflow store or server")
    parser.add_argument("--experiment", default=MlflowConfig.experiment, help="MLflow experiment")
    parser.add_argument(
        "--out", type=Path, help="folder for report.md, report.html and their images (default: reports/<experiment>)"
    )
    parser.add_argument("--filter", default="", help="MLflow filter on the runs, e.g. \"params.res = '1024'\"")
    args = parser.parse_args(argv)
    try:
        tracker = Tracker(MlflowConfig(tracking_uri=args.tracking_uri, experiment=args.experiment))
        records = tracker.records(args.filter)
    except RunnerError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    if not records:
        where = f" matching {args.filter!r}" if args.filter else ""
        print(f"error: no job runs in experiment '{args.experiment}'{where}: nothing to report", file=sys.stderr)
        return 1
    out = args.out or Path("reports") / args.experiment
    write_report(tracker, out, records)
    print(f"wrote {out / 'report.md'} and {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
