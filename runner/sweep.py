"""A sweep as a whole: its own MLflow run, jobs Hydra could not even compose, and its end.

The sweeper (hydra_plugins/runner_sweeper) hands the launching of jobs to ``run_sweep``, which opens the
sweep's run (the parent of its jobs' runs), launches, and always ends: the sweep's table is printed and its
run closed FINISHED, FAILED (some job failed) or KILLED (Ctrl-C, SIGTERM, or some job stopped and none
failed), whatever the comparison or the report ran into (that becomes one line and a tag). The exit code says
whether any job failed or was stopped. A sweep
run left RUNNING by a process that died (SIGKILL, a lost machine) is closed by the next sweep on its host.
MLflow is the record, so the table reads the sweep's runs back from it whichever launcher ran the jobs.
"""

import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from hydra.core.utils import JobStatus
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf

from runner.catalogue import SWEEP_TABLE, describe
from runner.compare import Rejudged, compare
from runner.config import CONF, REBASELINE, MlflowConfig, option_label, run_name
from runner.errors import RunnerError, one_line
from runner.host import HOST, boot_id
from runner.job import Stopped, Terminated, alive, sigterm_raises
from runner.launch import missing_bytecode_hint, start_server, stop_server
from runner.overrides import no_such_option, search_dirs, value_error
from runner.record import JobRecord, Outcome
from runner.report import answers, write_report
from runner.tracking import Tracker

# Overrides that say where a sweep is recorded, not what it measures: left out of its run's name.
WHERE = ("mlflow.", "hydra.", "hydra/", "cache_dir=")
EXIT_STOPPED = {"Ctrl-C": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


def run_sweep(
    master: DictConfig, arguments: list[str], launch: Callable[[list[str]], Sequence[Any]], jobs_here: bool = False
) -> None:
    """Open the sweep's run, launch its jobs with ``launch`` (Hydra's sweep), and end it, always. ``jobs_here``:
    the jobs run in this process (not a SLURM or local_gpus launcher's), so their workers' server starts now."""
    if jobs_here:
        start_server()  # started by the entry point already, unless this process was started otherwise
        hint = missing_bytecode_hint()
        if hint:
            print(hint, flush=True)
    else:
        stop_server()  # the entry point could not tell that the jobs run elsewhere (a launcher set in a file)
    tracker = open_tracker(master)
    close_abandoned_sweeps(tracker)
    command = " ".join(arguments) or "(defaults)"
    chosen = " ".join(a for a in arguments if not a.startswith(WHERE)) or "(defaults)"
    sweep_id = tracker.start_sweep(
        f"{chosen[:100]} ({datetime.now():%Y-%m-%d %H:%M})",
        command,
        {"host": HOST, "pid": str(os.getpid()), "boot_id": boot_id()},
    )
    problems: list[str] = []
    done_before: list[str] = []
    try:
        with sigterm_raises():
            try:
                batches = launch([*arguments, f"sweep_id={sweep_id}"])
                done_before = [  # jobs that had ended in an earlier sweep (run_job returns done:<run id>)
                    str(job.return_value).removeprefix("done:")
                    for batch in batches
                    for job in batch
                    if job.status == JobStatus.COMPLETED and str(job.return_value).startswith("done:")
                ]
            except Exception as error:  # a launcher or a job that could not record itself: end with the table
                problems.append(launch_problem(error))
            finish(tracker, sweep_id, done_before, problems)
    except (Stopped, KeyboardInterrupt, Terminated) as stop:
        stopped(tracker, sweep_id, stop)


def launch_problem(error: Exception) -> str:
    """One line on why the launcher stopped: for a job scheduler's refusal or a job it ended, what to check."""
    line = one_line(error)
    if "sbatch" in line:  # submitit could not submit: SLURM refused the jobs as asked
        return f"SLURM refused the sweep's jobs: {line} (check hydra.launcher.partition and the resources asked)"
    if type(error).__name__ == "UncompletedJobError":  # submitit: a job ended without a result
        return f"a job ended without finishing, so the sweep stopped waiting: {line} (its run says why)"
    if type(error).__name__ == "FailedJobError":  # submitit: a task raised; its message holds the trace and its log
        trace = str(error).split("----------------------")
        raised = (
            next((ln.strip() for ln in reversed(trace[1].splitlines()) if ln.strip()), "") if len(trace) > 2 else ""
        )
        log = next((ln.strip()[2:] for ln in str(error).splitlines() if ln.strip().startswith("- ")), "")
        return f"the sweep stopped early: a task failed: {raised or line}" + (f" (its log: {log})" if log else "")
    return f"the sweep stopped early: {line}"


def open_tracker(master: DictConfig) -> Tracker:
    try:
        return Tracker(MlflowConfig(**OmegaConf.to_container(master.mlflow, resolve=True)))
    except RunnerError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def stopped(tracker: Tracker, sweep_id: str, stop: BaseException) -> None:
    """Compare the jobs that ended (their verdicts would otherwise wait for the next sweep or ``python -m
    runner.compare``), close the sweep's run as KILLED and say in one line what was stopped, what is recorded,
    how to resume; below it, any earlier run whose verdict the ended jobs changed, as a finished sweep says them. A
    second stop while comparing leaves the verdicts to the next comparison, not the run open."""
    how = stop.signal_name if isinstance(stop, Stopped) else "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
    finished = [r for r in tracker.records(f"tags.sweep_id = '{sweep_id}'") if r.outcome is not Outcome.KILLED]
    compared = " and compared" if any(record.ok for record in finished) else ""
    rejudged: list[Rejudged] = []
    try:
        if compared:
            rejudged = compare(tracker, finished, sweep_id)
    except (Exception, KeyboardInterrupt, Terminated) as error:
        compared = f" (not compared: {one_line(error) or type(error).__name__})"
    job = f"job {stop.name} (run {stop.run_id}) closed as KILLED; " if isinstance(stop, Stopped) else ""
    tracker.end_sweep(sweep_id, "KILLED", {"stopped": f"by {how}"})
    print(
        f"\nStopped by {how}: {job}{len(finished)} ended job(s) are recorded{compared} in sweep {sweep_id}; "
        "run the same command again to resume where it stopped.",
        file=sys.stderr,
        flush=True,
    )
    print_rejudged(rejudged, sys.stderr)
    raise SystemExit(EXIT_STOPPED[how])


def print_rejudged(rejudged: list[Rejudged], stream: TextIO | None = None) -> None:
    """The earlier runs whose verdicts a sweep's runs changed, each on a line of its own (nothing where none), to
    ``stream`` (standard output where None)."""
    if rejudged:
        print(
            "Earlier runs' verdicts changed by this sweep's runs (their own sweeps' tables and reports are older):",
            file=stream,
        )
        for change in rejudged:
            print(f"  {change.line()}", file=stream, flush=True)


def finish(tracker: Tracker, sweep_id: str, done_before: list[str], problems: list[str]) -> None:
    """Compare the sweep's runs, log its report, print its table, close its run; exit non-zero if a job failed or
    was stopped."""
    records = tracker.records(f"tags.sweep_id = '{sweep_id}'") + [tracker.record(run_id) for run_id in done_before]
    rejudged: list[Rejudged] = []
    try:
        rejudged = compare(tracker, records, sweep_id)
        records = [tracker.record(r.run_id) for r in records]
    except Exception as error:  # the table matters more than the comparison: say what went wrong, go on
        problems.append(f"the comparison failed: {one_line(error)}")
    report = ""
    if records:
        try:
            with tempfile.TemporaryDirectory() as folder:
                write_report(tracker, Path(folder), records)
                tracker.log_folder(sweep_id, Path(folder), "report")
            report = tracker.artifact_path(sweep_id, "report/report.html")
        except Exception as error:
            problems.append(f"the report failed: {one_line(error)}")
    table = format_table(records, set(done_before))
    earlier = f", {len(done_before)} done in earlier sweeps" if done_before else ""
    where = f"experiment '{tracker.experiment_name}' ({tracker.tracking_uri})"
    print(f"\nSweep {sweep_id}: {len(records)} job(s) in {where}{earlier}")
    print(table)
    for answer in answers(records):
        print(f"Answer: {answer.line()}")
    print_rejudged(rejudged)
    for problem in problems:
        print(f"WARNING: {problem}", file=sys.stderr)
    if report:
        print(f"Report: {report}")
    print(f"MLflow: {tracker.ui_link(sweep_id)}")
    # A stopped job (a scheduler's time limit, a lost process) is no failure of what it measured, as the report
    # counts it; but the sweep did not do all it was asked, so it still ends non-zero.
    failed = [r for r in records if r.outcome is Outcome.FAILED]
    stopped = [r for r in records if r.outcome is Outcome.KILLED]
    tags = {"jobs": str(len(records)), "jobs_failed": str(len(failed)), "jobs_stopped": str(len(stopped))}
    tags["mlflow.note.content"] = note(records)
    if problems:
        tags["sweep_problems"] = "; ".join(problems)
    tracker.log_text(sweep_id, table + "\n", "sweep.txt")
    tracker.end_sweep(sweep_id, "FAILED" if failed or problems else "KILLED" if stopped else "FINISHED", tags)
    if failed:
        print(f"{len(failed)} of {len(records)} job(s) failed: {', '.join(r.name for r in failed)}", file=sys.stderr)
    if stopped:
        names = ", ".join(r.name for r in stopped)
        print(
            f"{len(stopped)} of {len(records)} job(s) stopped: {names}; run the same command again to resume them",
            file=sys.stderr,
        )
    if failed or stopped or problems:
        raise SystemExit(1)


def note(records: list[JobRecord]) -> str:
    """The sweep's answer and table in Markdown: MLflow shows it as the sweep run's description."""
    lines = [f"**Answer.** {answer.line()}" for answer in answers(records)]
    lines += ["", "| job | outcome | latency (s) | speedup | pace | note |", "|---|---|---:|---:|---|---|"]
    latency, speedup = describe("latency_s"), describe("speedup_vs_baseline")
    for r in records:
        pace = str(r.comparison.pace) if r.comparison else "-"
        why = (r.why or (r.comparison.why if r.comparison else "")).replace("|", "/")[:200]
        lines.append(
            f"| {r.name} | {r.outcome} | {latency.show(r.metrics.get('latency_s'))} | "
            f"{speedup.show(r.metrics.get('speedup_vs_baseline'))} | {pace} | {why} |"
        )
    return "\n".join([*lines, "", "The report: this run's artifacts, report/report.html."])


def close_abandoned_sweeps(tracker: Tracker) -> None:
    """Close as KILLED the RUNNING sweep runs of this host whose process is gone (or whose machine restarted)."""
    for sweep in tracker.running_sweeps():
        tags = sweep.data.tags
        pid = tags.get("pid", "")
        if tags.get("host") == HOST and (tags.get("boot_id") != boot_id() or not (pid.isdigit() and alive(int(pid)))):
            tracker.end_sweep(
                sweep.info.run_id, "KILLED", {"stopped": f"abandoned: its process ({pid} on {HOST}) died"}
            )


def describe_compose_error(error: Exception, chosen: dict[str, str], dirs: Sequence[Path] = (CONF,)) -> str:
    """One line for a job Hydra could not compose (``chosen``: its overrides; ``dirs``: the folders its options come
    from, conf/ and the sweep's search path's): the key, the value and what is allowed."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and "/" in error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return no_such_option(group, option, list(error.options or []), dirs)
    cause = error.__cause__ or error
    key = getattr(cause, "full_key", None)
    if key and key in chosen:
        return value_error(key, chosen[key]) or f"{key}={chosen[key]}: {one_line(cause)}"
    return f"{key}: {one_line(cause)}" if key else one_line(error)


def record_uncomposable(master: DictConfig, overrides: list[str], error: Exception) -> str:
    """Record a job whose config could not be composed as a failed run; return its one-line error."""
    chosen = dict(item.split("=", 1) for item in overrides if "=" in item)
    choices = master.hydra.runtime.choices
    params = {group: chosen.get(group, choices.get(group)) for group in ("model", "task", "accelerator")}
    params.update({key.lstrip("+~"): value for key, value in chosen.items() if key != "sweep_id"})
    res = chosen.get("res", OmegaConf.select(master, "res"))
    height, width = chosen.get("height", res), chosen.get("width", res)
    model, accelerator = option_label("model", params["model"]), option_label("accelerator", params["accelerator"])
    batch, switch_res, dtype = (chosen.get(key) for key in ("batch", "switch_res", "dtype"))
    name = run_name(model, params["task"], height, width, accelerator, batch or 1, switch_res, dtype)
    dirs = search_dirs(OmegaConf.select(master, "hydra.searchpath", default=[])) or [CONF]
    message = describe_compose_error(error, chosen, dirs)
    tracker = open_tracker(master)
    tags = {"host": HOST, "pid": str(os.getpid()), "boot_id": boot_id()}
    run_id = tracker.record_never_ran(name, params, chosen.get("sweep_id", ""), tags, Outcome.FAILED, message)
    print(f"[{name}] FAILED: {message} (run {run_id})", flush=True)
    return message


def with_baseline_again(jobs: list[tuple[list[str], bool, str]]) -> list[list[str]]:
    """The batch, each job given as (overrides, whether its accelerator is its baseline, its ``rebaseline``),
    with each baseline stamped ``baseline_again=true`` a second time right after the last of its job's
    accelerated runs: an eager baseline's mean moved 9-26% between sweeps minutes apart on one H200 start while
    its graphed runs held within 0.1% (BENCHMARKS.md, "A baseline measured again"), so one measured before them
    says little of the host during them. Whether it is measured is decided when its turn comes (run_job,
    compare.baseline_again: ``rebaseline=auto`` measures it again only where the first kept its GPU busy under
    80%; whatever ``rebaseline`` says, a baseline a resumed sweep found done on another machine start is measured
    there, so that the job's new runs have one to be compared with)."""
    batch = [overrides for overrides, _, _ in jobs]
    # Only a baseline before some of its job's accelerated runs: one after them all has nothing to follow.
    after = sorted(((last, first) for first, last in _baselines_with_runs(jobs).items() if last > first), reverse=True)
    for index, first in after:
        batch.insert(index + 1, [*batch[first], "baseline_again=true"])
    return batch


def baselines_after(jobs: list[tuple[list[str], bool, str]]) -> list[list[str]]:
    """Where a launcher runs the jobs side by side, in no set order (``local_gpus``): the second slots of the
    baselines (as ``with_baseline_again``, the jobs given alike, each stamped with its GPU slot), launched once
    every job of the first batch has ended, in the batches ``second_batches`` makes of them."""
    return [[*jobs[first][0], "baseline_again=true"] for first in _baselines_with_runs(jobs)]


def second_batches(after: list[list[str]], concurrency: dict[int, int]) -> list[list[list[str]]]:
    """``baselines_after``'s second slots as batches, each of as many baselines as there were jobs at once while
    their jobs' last accelerated runs were timed (``concurrency``: a GPU slot -> that run's ``concurrent_jobs``), so
    that each is measured as its runs were, and a comparison may use it: a run left alone on its GPU at a sweep's
    end (1 job at once) gets a baseline measured alone, the runs of slots that ended side by side one measured side
    by side. A slot with no such run in the sweep counts as side by side with every other. The most at once first."""
    groups: dict[int, list[list[str]]] = {}
    for overrides in after:
        at_once = concurrency.get(_gpu_slot(overrides), len(after))
        groups.setdefault(min(max(at_once, 1), len(after)), []).append(overrides)
    return [
        members[start : start + at_once]
        for at_once, members in sorted(groups.items(), reverse=True)
        for start in range(0, len(members), at_once)
    ]


def batches_after(master: DictConfig, after: list[list[str]]) -> list[list[list[str]]]:
    """``second_batches`` of the second slots ``after``, once their sweep's jobs have ended, from what its runs
    recorded."""
    sweep_ids = {item[len("sweep_id=") :] for overrides in after for item in overrides if item.startswith("sweep_id=")}
    tracker = open_tracker(master)
    records = [record for sweep_id in sweep_ids for record in tracker.records(f"tags.sweep_id = '{sweep_id}'")]
    return second_batches(after, last_concurrency(records))


def last_concurrency(records: list[JobRecord]) -> dict[int, int]:
    """Each GPU slot's last finished accelerated run among a sweep's ``records`` -> how many jobs ran at once
    during its timed calls."""
    last: dict[int, JobRecord] = {}
    for record in records:
        if not record.ok or record.is_baseline or record.gpu_slot is None:
            continue
        if record.gpu_slot not in last or record.measured_ms >= last[record.gpu_slot].measured_ms:
            last[record.gpu_slot] = record
    return {slot: record.conditions.concurrent_jobs for slot, record in last.items()}


def by_gpu_slot(batch: Sequence[Sequence[str]]) -> list[list[int]]:
    """Where each GPU slot's jobs are in ``batch`` (as ``with_gpu_slots`` stamps them), in the batch's order, the
    slots in the order of their first jobs: what a launcher that runs a slot's jobs one after another in one task
    sends as one task (hydra_plugins/runner_slurm). A job without a slot is a task of its own."""
    tasks: dict[tuple[str, int], list[int]] = {}
    for index, overrides in enumerate(batch):
        slot = _gpu_slot(list(overrides))
        tasks.setdefault(("job", index) if slot is None else ("slot", slot), []).append(index)
    return list(tasks.values())


def _gpu_slot(overrides: list[str]) -> int | None:
    slots = [item.removeprefix("gpu_slot=") for item in overrides if item.startswith("gpu_slot=")]
    return int(slots[-1]) if slots and slots[-1].isdigit() else None


def _baselines_with_runs(jobs: list[tuple[list[str], bool, str]]) -> dict[int, int]:
    """Where each baseline with accelerated runs of its job is in the batch -> where the last of those is."""
    baselines: dict[tuple[str, ...], int] = {}  # the job's key -> where its baseline is
    last: dict[tuple[str, ...], int] = {}  # the job's key -> where its last accelerated run is
    for index, (overrides, is_baseline, rebaseline) in enumerate(jobs):
        if is_baseline and rebaseline in REBASELINE:  # a bad value fails the jobs once
            baselines[_job_key(overrides)] = index
        elif not is_baseline:
            last[_job_key(overrides)] = index
    return {first: last[key] for key, first in baselines.items() if key in last}


def with_gpu_slots(batch: list[list[str]]) -> list[list[str]]:
    """Stamp every job with a ``gpu_slot``: jobs that differ only in their accelerator share one, so that on a
    host with several GPUs they run on one GPU, one after another, and compare like with like (the same
    physical GPU), while other jobs run on the other GPUs."""
    slots: dict[tuple[str, ...], int] = {}
    for overrides in batch:
        overrides.append(f"gpu_slot={slots.setdefault(_job_key(overrides), len(slots))}")
    return batch


def _job_key(overrides: list[str]) -> tuple[str, ...]:
    """What a job is without its accelerator (and without the sweeper's own stamp of a second baseline)."""
    return tuple(item for item in overrides if not item.startswith(("accelerator=", "accelerator.", "baseline_again=")))


def format_table(records: list[JobRecord], earlier: set[str] = frozenset()) -> str:
    """A plain-text table of runs: name, outcome, key metrics and the verdicts, and the error or skip reason;
    runs in ``earlier`` are marked as done by an earlier sweep."""
    shown = [describe(key) for key in SWEEP_TABLE if any(key in r.metrics for r in records)]
    header = ["job", "outcome", *(m.heading for m in shown), "pace", "note"]
    rows = [header]
    for record in records:
        cells = [m.show(record.metrics.get(m.key)) for m in shown]
        pace = str(record.comparison.pace) if record.comparison else "-"
        note = record.why or (
            record.comparison.why if record.comparison and record.comparison.pace.value in NOTED else ""
        )
        note = f"done in an earlier sweep (run {record.run_id})" if record.run_id in earlier else note
        rows.append([record.name, str(record.outcome), *cells, pace, note])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ("  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


NOTED = ("inconclusive", "no baseline")  # paces whose reason the table spells out
