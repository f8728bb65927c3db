"""SLURM launcher for the runner (Hydra finds launchers only under the hydra_plugins namespace).

submitit's SLURM launcher makes each job a task of one SLURM job array, and SLURM places each task on whichever
node and GPU is free: a job's baseline and its accelerated runs then ran on different GPUs, and a run may only be
compared with a baseline measured on the same GPU and machine start (runner/compare.py), so most comparisons were
withheld. This launcher sends each GPU slot's jobs (those that differ only in their accelerator, and the baseline's
second measurement, as the sweeper stamps them: runner/sweep.py, ``with_gpu_slots``) as one task, which runs them one
after another on its node's GPU, in the batch's order. The job array has one task per slot; SLURM's
``timeout_min`` is then a slot's time, all its jobs'. A task stopped midway (its time limit, a lost node) leaves its
slot's later jobs unrun: the same command resumes them.
"""

import logging
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

from runner.sweep import by_gpu_slot

log = logging.getLogger(__name__)


def _job_lines(record: logging.LogRecord) -> bool:
    """A logging filter: False for submitit's launcher's line for a job it submits (``#n : overrides``)."""
    return not record.getMessage().startswith("\t#")


class SlotsSlurmLauncher(SlurmLauncher):
    # Read by the sweeper (hydra_plugins/runner_sweeper): a baseline's second measurement may follow its job's
    # accelerated runs in the same batch, since a slot's jobs run in order.
    runs_slots_in_order = True
    # One task's jobs, for each task of the current batch (sent to the nodes with the launcher itself).
    tasks: Sequence[list[tuple[int, list[str]]]] = ()
    first_task = 0

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        self.tasks = [
            [(initial_job_idx + index, list(job_overrides[index])) for index in indices]
            for indices in by_gpu_slot(job_overrides)
        ]
        self.first_task = initial_job_idx
        for number, jobs in enumerate(self.tasks):
            log.info(f"\tSLURM task {number}: job(s) {', '.join(f'#{index}' for index, _ in jobs)}, in this order")
            for index, overrides in jobs:
                log.info(f"\t#{index} : {' '.join(filter_overrides(overrides))}")
        # submitit's launcher submits one task per overrides it is given (each task's first job's stand for it here)
        # and calls this launcher with the task's number there. Its own "#n : overrides" lines would number the
        # tasks as jobs: left out.
        submitit_log = logging.getLogger(SlurmLauncher.__module__)
        submitit_log.addFilter(_job_lines)
        try:
            returned = super().launch([jobs[0][1] for jobs in self.tasks], initial_job_idx)
        finally:
            submitit_log.removeFilter(_job_lines)
        by_job = {
            index: job
            for jobs, task in zip(self.tasks, returned, strict=True)
            for (index, _), job in zip(jobs, task, strict=True)
        }
        return [by_job[initial_job_idx + index] for index in range(len(job_overrides))]

    def __call__(  # type: ignore[override]  # a task's jobs' returns, not one
        self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str, singleton_state: dict[Any, Any]
    ) -> list[JobReturn]:
        jobs = self.tasks[job_num - self.first_task]
        # Bound here: Hydra's plugin discovery may run this module again on the node, so the class this name
        # holds there need not be the one this launcher was unpickled as (super() goes by the method's own).
        run_one = super().__call__
        return [run_one(overrides, job_dir_key, index, job_id, singleton_state) for index, overrides in jobs]
