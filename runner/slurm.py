"""SLURM, as a job of the runner sees it: which SLURM job it runs in, why SLURM stopped it, and whether the
SLURM job a run recorded is still running (so a run whose node was lost can be closed from another node).
Everything here asks SLURM's own commands (scontrol, squeue) and says nothing where they are missing."""

import os
import subprocess

TIMEOUT_S = 10
ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}


def job_id() -> str:
    """This process's SLURM job (``<array job>_<task>`` in a job array), or "" outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


def why_stopped(job: str, exiting: bool = False) -> str:
    """Why ``job`` is ending, in words, from what SLURM says of it: its time limit, a cancel, or (``exiting``:
    the job's own process was told to exit while SLURM still runs it) submitit ending it at SLURM's warning
    that the time limit is near; "" where SLURM does not say."""
    fields = _show(job)
    if not fields:
        return ""
    limit, ran = fields.get("TimeLimit", "?"), fields.get("RunTime", "?")
    if fields.get("Reason") == "TimeLimit":
        return f"stopped by SLURM: its time limit ({limit}) was reached after {ran}"
    if exiting and fields.get("JobState") == "RUNNING":
        return (
            f"stopped after {ran} of its SLURM time limit ({limit}): submitit ends a job when SLURM warns that the "
            "limit is near (hydra.launcher.signal_delay_s before it); raise hydra.launcher.timeout_min"
        )
    return f"stopped by SLURM (job {job}: {fields.get('JobState', '?')}, reason {fields.get('Reason', '?')})"


def still_running(job: str) -> bool | None:
    """Whether SLURM still runs (or will run) ``job``; None where squeue cannot be asked."""
    try:
        listed = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if listed.returncode != 0:  # an id SLURM has forgotten is an error to squeue: the job is long gone
        return False if "Invalid job id" in listed.stderr else None
    return any(state.strip() in ALIVE for state in listed.stdout.splitlines())


def _show(job: str) -> dict[str, str]:
    try:
        shown = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=TIMEOUT_S
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(part.split("=", 1) for part in shown.split() if "=" in part)
