"""A sweep as a whole: jobs Hydra could not even compose, and the table printed when the sweep ends.

The sweeper (hydra_plugins/runner_sweeper) calls these; MLflow is the record, so the table reads the
sweep's runs back from it whichever launcher ran the jobs.
"""

import tempfile
from datetime import datetime
from pathlib import Path

from hydra.errors import CompactHydraException, MissingConfigException
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf

from runner.config import MlflowConfig, run_name
from runner.errors import RunnerError, one_line
from runner.report import write_report
from runner.tracking import Tracker


class SweepFailed(RunnerError, CompactHydraException):
    """Some jobs of the sweep failed; the table above names them and why (Hydra prints it without a trace)."""


def describe_compose_error(error: Exception) -> str:
    """One line for a job Hydra could not compose: the key, the value and what is allowed."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and "/" in error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        options = ", ".join(error.options or [])
        return f"{group}={option}: no such {group}; choose one of {options} (or add conf/{group}/{option}.yaml)"
    cause = error.__cause__ or error
    key = getattr(cause, "full_key", None)
    return f"{key}: {one_line(cause)}" if key else one_line(error)


def record_uncomposable(master: DictConfig, overrides: list[str], error: Exception) -> str:
    """Record a job whose config could not be composed as a failed run; return its one-line error."""
    chosen = dict(item.split("=", 1) for item in overrides if "=" in item)
    choices = master.hydra.runtime.choices

    def value(key: str, default: object) -> str:
        return str(chosen.get(key, default))

    res = value("res", OmegaConf.select(master, "res"))
    name = run_name(
        value("model", choices.get("model")),
        value("task", choices.get("task")),
        value("height", res),
        value("width", res),
        value("accelerator", choices.get("accelerator")),
    )
    message = describe_compose_error(error)
    tracker = Tracker(MlflowConfig(**OmegaConf.to_container(master.mlflow, resolve=True)))
    params = {key.lstrip("+~"): item for key, item in chosen.items() if key != "sweep_id"}
    run_id = tracker.record(name, params, chosen.get("sweep_id", ""), failed=message)
    print(f"[{name}] FAILED: {message} (run {run_id})", flush=True)
    return message


def start_sweep(master: DictConfig, arguments: list[str]) -> str:
    """Open the sweep's own MLflow run, the parent of its jobs' runs; its run id is the sweep's id."""
    tracker = Tracker(MlflowConfig(**OmegaConf.to_container(master.mlflow, resolve=True)))
    command = " ".join(arguments) or "(defaults)"
    return tracker.start_sweep(f"sweep {datetime.now():%Y-%m-%d %H:%M} {command}"[:120], command)


def report_sweep(master: DictConfig, sweep_id: str, done_before: list[str]) -> None:
    """Print the sweep's table, compare its runs, log its report into the sweep's run, and raise SweepFailed
    (a non-zero exit) if any job failed. ``done_before``: runs of earlier sweeps that this one did not repeat."""
    tracker = Tracker(MlflowConfig(**OmegaConf.to_container(master.mlflow, resolve=True)))
    runs = tracker.sweep_runs(sweep_id) + [tracker.run(run_id) for run_id in done_before]
    print(
        f"\nSweep {sweep_id}: {len(runs)} job(s) in experiment '{tracker.experiment_name}' "
        f"({master.mlflow.tracking_uri})" + (f", {len(done_before)} done in earlier sweeps" if done_before else "")
    )
    failed = [run for run in runs if run.data.tags.get("outcome") not in ("ok", "skipped")]
    if runs:
        with tempfile.TemporaryDirectory() as folder:
            runs = write_report(tracker, Path(folder), runs)
            tracker.client.log_artifacts(sweep_id, folder, "report")
        table = format_table(runs, set(done_before))
        tracker.client.log_text(sweep_id, table + "\n", "sweep.txt")
        print(table)
        print(
            f"Report: the sweep's run {sweep_id}, artifacts report/report.html; "
            "python -m runner.report writes one for the whole experiment."
        )
    tracker.set_tags(sweep_id, {"jobs": str(len(runs)), "jobs_failed": str(len(failed))})
    tracker.client.set_terminated(sweep_id, "FAILED" if failed else "FINISHED")
    if failed:
        names = ", ".join(run.info.run_name for run in failed)
        raise SweepFailed(f"{len(failed)} of {len(runs)} job(s) failed: {names}")


COLUMNS = (
    ("latency_s", "latency s", "{:.3f}"),
    ("its", "it/s", "{:.2f}"),
    ("warmup_s", "warmup s", "{:.1f}"),
    ("peak_mem_gib", "peak GiB", "{:.2f}"),
    ("peak_rss_gib", "peak RSS GiB", "{:.2f}"),
)


def format_table(runs: list[Run], earlier: set[str] = frozenset()) -> str:
    """A plain-text table of runs: name, outcome, key metrics, and the error or skip reason; runs in
    ``earlier`` are marked as done by an earlier sweep."""
    shown = [c for c in COLUMNS if any(c[0] in run.data.metrics for run in runs)]
    header = ["job", "outcome", *(title for _, title, _ in shown), "note"]
    rows = [header]
    for run in runs:
        metrics, tags = run.data.metrics, run.data.tags
        cells = [fmt.format(metrics[key]) if key in metrics else "-" for key, _, fmt in shown]
        note = tags.get("error") or tags.get("skip_reason") or ""
        note = f"done in an earlier sweep (run {run.info.run_id})" if run.info.run_id in earlier else note
        rows.append([run.info.run_name, tags.get("outcome", run.info.status.lower()), *cells, note])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ("  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]) for row in rows)
    return "\n".join(line.rstrip() for line in lines)
