"""Comparing runs: which baseline each run is measured against, its speedup and memory, whether that makes
a verdict or only noise, late quality verdicts, and the best run.

    python -m runner.compare [--experiment NAME] [--tracking-uri URI] [--filter MLFLOW_FILTER]

**Like with like.** A run's time is compared only with a baseline run (``accelerator`` = ``quality.baseline``)
of the same job (``image_key``: everything that decides the images) measured under the same conditions
(runner/record.py, ``Conditions``): the same physical device on the same machine start, with as many of the
runner's jobs at once. Of those eligible, the same sweep's is preferred, else the newest; the tags
``baseline_run`` and ``baseline_why`` say which and why. A baseline run is compared with no other.

**Verdicts.** ``pace`` is ``faster`` or ``slower`` only if the mean latencies differ by at least 5% and by
more than twice the standard error of that difference, both runs' timed calls were steady (runner/measure.py,
``steadiness``; no other process in the way), and the eligible baselines agree with each other beyond noise.
Otherwise it is ``about as fast``, or ``inconclusive`` with the reason: rerun.

Where the chosen baseline kept the GPU busy under ``HOST_BOUND`` of its timed calls (``gpu_busy_share``), the
reason says so: its latency, and so the speedup, measure the host's CPU as much as the GPU; and where its
launching core ran the runner's fixed loop (``launch_core_loop_ms``) more than ``CORE_GAP`` slower or faster
than the run's did, it says that too: the host's speed moved between the two.

**Best.** ``best=true`` goes, per job and conditions, to the fastest run faster than its baseline with quality
unaffected; where there is none, to the newest steady baseline. It moves when a better run appears.

Comparing is a step of its own: at the end of every sweep (for the jobs its runs belong to, across sweeps),
and ``python -m runner.compare`` for a whole experiment. The report only reads what it wrote. A comparison can
change an earlier run's pace (a later baseline that disagrees with its own): it prints each such change and puts it
atop the MLflow note of the run's sweep, whose printed table and report said the old verdict.
"""

import argparse
import math
import sys
from collections import defaultdict
from typing import NamedTuple

from runner.config import MlflowConfig
from runner.errors import RunnerError, one_line
from runner.record import Comparison, Conditions, JobRecord, Pace, Quality, QualityResult, Steadiness
from runner.tracking import Tracker

FASTER = 1.05  # the smallest speedup worth calling one (and slowdown, 1/FASTER), whatever the noise
# A baseline whose GPU ran kernels less than this share of its timed calls waited on its host's CPU: eager SDXL
# read 21-54% on an H200, its graphed runs 90-95% (BENCHMARKS.md, "Cold compiles shown cold"). Said, not judged:
# the speedup is real on that host, and moves with its CPU.
HOST_BOUND = 0.8
# Said of such a baseline where its launching core's fixed loop (runner/host.py, LaunchThread) took a median this
# much longer or shorter than the run's: on one H200 start eager none's loop read 1.94 ms (calls steady at 3.894 s,
# 15% busy) and cuda_graph's minutes later 1.32 ms (BENCHMARKS.md, "The launching core's speed").
CORE_GAP = 0.15


class Rejudged(NamedTuple):
    """A run whose verdict a later comparison changed: a new baseline disagreed with the one it was judged against,
    or a run was measured again. The table and report its sweep printed said the verdict it had then."""

    run: JobRecord
    was: Comparison
    now: Comparison

    def line(self) -> str:
        return f"{self.run.name} (run {self.run.run_id[:8]}): {self.was.pace} -> {self.now.pace}: {self.now.why}"


def compare(tracker: Tracker, records: list[JobRecord], sweep_id: str = "") -> list[Rejudged]:
    """Compare the jobs that ``records`` belong to (every run of them, across sweeps) and write the verdicts.
    Returns the runs of other sweeps than ``sweep_id`` (the one comparing, whose table is yet to be printed) whose
    pace it changed; each one's sweep gets a line saying so atop its MLflow note, so the answer that sweep printed is
    not read as today's."""
    keys = sorted({record.image_key for record in records if record.ok and record.image_key})
    rejudged: list[Rejudged] = []
    for key in keys:
        members = tracker.records(f"tags.image_key = '{key}' and tags.outcome = 'ok'")
        if judge_late(tracker, members):
            members = tracker.records(f"tags.image_key = '{key}' and tags.outcome = 'ok'")
        by_id = {member.run_id: member for member in members}
        for run_id, comparison in compare_job(members).items():
            before = by_id[run_id].comparison
            if comparison != before:
                tracker.write_comparison(run_id, comparison)
            if before and before.pace is not comparison.pace and by_id[run_id].sweep_id != sweep_id:
                rejudged.append(Rejudged(by_id[run_id], before, comparison))
    by_sweep: dict[str, list[Rejudged]] = defaultdict(list)
    for change in rejudged:
        by_sweep[change.run.sweep_id].append(change)
    by = f"sweep {sweep_id}" if sweep_id else "python -m runner.compare"
    for earlier, changes in by_sweep.items():
        if earlier:
            lines = "\n".join(f"- {change.line()}" for change in changes)
            tracker.prepend_to_note(earlier, f"**Verdicts changed since this sweep ended**, by {by}:\n{lines}")
    return rejudged


def compare_job(members: list[JobRecord]) -> dict[str, Comparison]:
    """The comparison of every finished run of one job (one ``image_key``), by run id."""
    comparisons = {run.run_id: _compare_run(run, members) for run in members if run.ok}
    by_conditions: dict[tuple, list[JobRecord]] = defaultdict(list)
    for run in members:
        if run.ok:
            by_conditions[_alike(run.conditions)].append(run)
    best = {_best(runs, comparisons) for runs in by_conditions.values()} - {None}
    return {run_id: _with_best(c, run_id in best) for run_id, c in comparisons.items()}


def _compare_run(run: JobRecord, members: list[JobRecord]) -> Comparison:
    baselines = [m for m in members if m.is_baseline and m.ok]
    # newest last: by when each was measured, not opened (JobRecord.measured_ms)
    eligible = sorted((b for b in baselines if not b.conditions.unlike(run.conditions)), key=lambda b: b.measured_ms)
    if run.is_baseline:
        others = [b for b in eligible if b.run_id != run.run_id and pace(run, b) is not Pace.SAME]
        disagree = f"; it disagrees with {_latencies(others)} under the same conditions" if others else ""
        return Comparison(Pace.BASELINE, f"this is the baseline{disagree}", "self")
    if not eligible:
        return Comparison(Pace.UNCOMPARED, _why_none(run, baselines))
    chosen = next((b for b in reversed(eligible) if b.sweep_id == run.sweep_id and run.sweep_id), eligible[-1])
    why = (
        "the same sweep's baseline"
        if chosen.sweep_id == run.sweep_id and run.sweep_id
        else f"the newest of {len(eligible)} baseline(s) on the same device and machine start, from another sweep"
    )
    busy = host_bound(chosen)
    if busy is not None:
        why += (
            f"; its baseline kept the GPU busy {busy:.0%} of its timed calls: bound by the host, so the speedup "
            "moves with its CPU"
        )
        loops = core_gap(chosen, run)
        if loops is not None:
            why += (
                f", whose launching core ran a fixed loop in {loops[0]:.2f} ms against {loops[1]:.2f} ms during "
                "this run: the host's speed moved between them"
            )
    speedup = chosen.latency_s / run.latency_s if run.latency_s > 0 else None
    memory, base_memory = run.memory_gib, chosen.memory_gib
    ratio = memory / base_memory if memory and base_memory else None
    problems = [
        f"{'this run' if r is run else 'its baseline'} was {r.measurement.steadiness}: {r.measurement.why}"
        for r in (run, chosen)
        if r.measurement.steadiness is not Steadiness.STEADY
    ]
    if any(pace(a, b) is not Pace.SAME for i, a in enumerate(eligible) for b in eligible[i + 1 :]):
        each = _each(run, eligible)
        problems.append(f"the {len(eligible)} eligible baselines disagree ({_latencies(eligible)}){each}")
    if problems:
        return Comparison(
            Pace.INCONCLUSIVE, f"{why}; inconclusive, rerun: {'; '.join(problems)}", chosen.run_id, speedup, ratio
        )
    return Comparison(pace(run, chosen), why, chosen.run_id, speedup, ratio)


def host_bound(baseline: JobRecord) -> float | None:
    """The share of its timed calls a baseline kept the GPU busy, where it is under HOST_BOUND; else None (busy
    enough, or not read: CPU runs, GPUs whose driver keeps no utilisation samples)."""
    busy = baseline.metrics.get("gpu_busy_share")
    return busy if busy is not None and busy < HOST_BOUND else None


def core_gap(baseline: JobRecord, run: JobRecord) -> tuple[float, float] | None:
    """The baseline's and the run's fixed loops on their launching cores (ms), where the baseline was bound by its
    host and the two differ by more than CORE_GAP; else None."""
    base_loop, loop = baseline.metrics.get("launch_core_loop_ms"), run.metrics.get("launch_core_loop_ms")
    if host_bound(baseline) is None or not base_loop or not loop or abs(base_loop / loop - 1) <= CORE_GAP:
        return None
    return base_loop, loop


class Again(NamedTuple):
    """What a baseline's second slot in a sweep (runner/sweep.py, ``with_baseline_again``) does."""

    measure: bool
    why: str
    again_of: str = ""  # the first run it measures again; "" where it measures this machine start's first


def baseline_again(
    rebaseline: str, baselines: list[JobRecord], runs: list[JobRecord], sweep_id: str, start: tuple[str, str]
) -> Again:
    """Whether a baseline is measured after its job's accelerated runs, and why. ``baselines``: its finished
    runs, ``runs``: its job's finished accelerated runs, of any sweep; ``start``: this host and machine start.

    Measured as this start's first where the sweep measured the job's runs here but its baseline was done on
    another machine start (a sweep resumed there), with which they cannot be compared; measured again, as
    ``rebaseline`` says, where the job's newest runs on this start came after its newest baseline here (which
    also holds where an earlier sweep stopped before its second measurement)."""
    here = [b for b in baselines if (b.conditions.host, b.conditions.boot_id) == start]
    ours = [r for r in runs if (r.conditions.host, r.conditions.boot_id) == start]
    firsts = [b for b in here if not b.again_of]
    if not firsts:
        if baselines and any(r.sweep_id == sweep_id for r in ours):
            done = max(baselines, key=lambda b: b.measured_ms).run_id
            return Again(
                True,
                f"its run {done} was on another machine start, and this sweep's runs of the job compare "
                "only with a baseline of theirs",
            )
        return Again(False, "this sweep measured neither it nor its job's other runs on this machine start")
    newest = max(here, key=lambda b: b.measured_ms)
    if not any(r.measured_ms > newest.measured_ms for r in ours):
        return Again(False, f"none of its job's runs came after its run {newest.run_id}")
    first = max(firsts, key=lambda b: b.measured_ms)
    busy = first.metrics.get("gpu_busy_share")
    if rebaseline == "always" or (rebaseline == "auto" and busy is not None and busy < HOST_BOUND):
        why = f"the baseline again, after the job's accelerated runs (first: run {first.run_id})"
        return Again(True, why, first.run_id)
    if rebaseline == "never":
        return Again(False, "rebaseline=never")
    if busy is None:
        return Again(
            False,
            "its first run's GPU busy share was not read (a CPU run, or a driver without samples); "
            "rebaseline=always would measure it again",
        )
    return Again(
        False,
        f"its first run kept the GPU busy {busy:.0%} of its timed calls; rebaseline=always would measure it again",
    )


def pace(run: JobRecord, baseline: JobRecord) -> Pace:
    """faster, slower, or about as fast: a difference counts only if the mean latencies differ by at least 5%
    and by more than twice the standard error of that difference (from each run's timed calls)."""
    ours, theirs = run.metrics, baseline.metrics
    error = math.sqrt(
        ours.get("latency_std_s", 0) ** 2 / run.runs + theirs.get("latency_std_s", 0) ** 2 / baseline.runs
    )
    gained = baseline.latency_s - run.latency_s
    speedup = baseline.latency_s / run.latency_s
    if abs(gained) <= 2 * error or 1 / FASTER < speedup < FASTER:
        return Pace.SAME
    return Pace.FASTER if gained > 0 else Pace.SLOWER


def _why_none(run: JobRecord, baselines: list[JobRecord]) -> str:
    if not baselines:
        return f"no baseline: run accelerator={run.baseline_accelerator} for this job"
    reasons = sorted({run.conditions.unlike(b.conditions) for b in baselines})
    return (
        f"no baseline under the same conditions: the {len(baselines)} baseline run(s) of this job had "
        f"{', '.join(reasons)}; run accelerator={run.baseline_accelerator} beside it (with force=true: a finished "
        "baseline is otherwise not run again)"
    )


def _each(run: JobRecord, baselines: list[JobRecord]) -> str:
    """Where a run is faster (or slower) than each of the baselines that disagree: said with the speedups, so a
    withheld verdict still tells how far apart they leave it."""
    paces = {pace(run, baseline) for baseline in baselines}
    if len(paces) != 1 or paces == {Pace.SAME} or not run.latency_s > 0:
        return ""
    speedups = sorted(baseline.latency_s / run.latency_s for baseline in baselines)
    return f", though this run is {paces.pop()} than each ({speedups[0]:.2f}×-{speedups[-1]:.2f}×)"


def _latencies(runs: list[JobRecord]) -> str:
    again = {r.run_id: ", measured again" if r.again_of else "" for r in runs}
    return ", ".join(f"{r.latency_s:.3f} s (run {r.run_id[:8]}{again[r.run_id]})" for r in runs)


def _alike(conditions: Conditions) -> tuple:
    """What makes conditions alike (not the core a job happened to get)."""
    return (
        conditions.host,
        conditions.boot_id,
        conditions.device_name,
        conditions.gpu_uuid,
        conditions.concurrent_jobs,
    )


def _best(runs: list[JobRecord], comparisons: dict[str, Comparison]) -> str | None:
    """The fastest run faster than its baseline with quality unaffected; else the newest steady baseline."""
    faster = [r for r in runs if comparisons[r.run_id].pace is Pace.FASTER and r.quality.verdict is Quality.UNAFFECTED]
    if faster:
        return min(faster, key=lambda r: r.latency_s).run_id
    steady = [
        r
        for r in runs
        if r.is_baseline and r.measurement.steadiness is Steadiness.STEADY and r.quality.verdict is Quality.UNAFFECTED
    ]
    return steady[-1].run_id if steady else None


def _with_best(comparison: Comparison, best: bool) -> Comparison:
    return Comparison(
        comparison.pace, comparison.why, comparison.baseline_run, comparison.speedup, comparison.mem_ratio, best
    )


def judge_late(tracker: Tracker, members: list[JobRecord]) -> bool:
    """Judge the quality of runs that found no baseline when they ran but have one now (another sweep made
    it), as the worker would have; return whether any was judged."""
    waiting = [r for r in members if r.ok and not r.is_baseline and r.quality.verdict is Quality.UNKNOWN]
    baselines = [r for r in members if r.ok and r.is_baseline]
    if not (waiting and baselines):
        return False
    import torch  # only here: comparing needs torch for nothing else

    from runner.quality import judge

    judged = False
    for run in waiting:
        alike = [b for b in baselines if b.conditions.device_name == run.conditions.device_name] or baselines
        baseline = alike[-1]
        meaningful = not run.quality.clip_meaningless
        images = tracker.download_images(run.run_id)
        if not images:
            continue
        metrics, verdict, why = judge(
            images,
            tracker.download_images(baseline.run_id),
            run.metrics.get("clip_score") if meaningful else None,
            baseline.metrics.get("clip_score") if meaningful else None,
            list(run.quality.broken),
            float(run.params.get("quality.min_ssim", "0.95")),
            float(run.params.get("quality.max_clip_drop_pct", "1.0")),
            torch.device("cpu"),
        )
        quality = QualityResult(
            verdict,
            why,
            baseline.run_id,
            run.quality.clip_model,
            run.quality.clip_meaningless,
            run.quality.broken,
            judged_late=True,
        )
        tracker.write_quality(run.run_id, quality, metrics)
        judged = True
    return judged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=MlflowConfig.tracking_uri, help="MLflow store or server")
    parser.add_argument("--experiment", default=MlflowConfig.experiment, help="MLflow experiment")
    parser.add_argument("--filter", default="", help="MLflow filter on the runs, e.g. \"params.res = '1024'\"")
    args = parser.parse_args(argv)
    try:
        tracker = Tracker(MlflowConfig(tracking_uri=args.tracking_uri, experiment=args.experiment))
        records = tracker.records(args.filter)
        rejudged = compare(tracker, records)
    except RunnerError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    for change in rejudged:
        print(f"verdict changed: {change.line()}")
    jobs = len({r.image_key for r in records if r.ok and r.image_key})
    print(f"compared the runs of {jobs} job(s) in experiment '{args.experiment}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
