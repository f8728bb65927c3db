"""Hydra sweeper for the runner (Hydra finds sweepers only under the hydra_plugins namespace).

Hydra's basic sweeper composes every job of a sweep before launching any, and one bad value (an unknown
model, a resolution that is not a number) aborts them all. This one records such a job as a failed MLflow run with
a one-line reason and launches the rest. The sweep is an MLflow run of its own, the parent of its jobs'
runs (its id is stamped on every job); it ends with a table, a comparison of the runs and a report logged
to that run, exiting non-zero if any job failed. The logic lives in runner/sweep.py.
"""

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobStatus
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from runner.sweep import record_uncomposable, report_sweep, start_sweep


class ResilientSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> None:
        sweep_id = start_sweep(self.config, arguments)
        batches = super().sweep([*arguments, f"sweep_id={sweep_id}"])
        done_before = [  # jobs that had finished in an earlier sweep (runner.job.run_job returns done:<run id>)
            job.return_value.removeprefix("done:")
            for batch in batches
            for job in batch
            if job.status == JobStatus.COMPLETED and str(job.return_value).startswith("done:")
        ]
        report_sweep(self.config, sweep_id, done_before)

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        composable = []
        for overrides in super().get_job_batch():
            try:
                self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            except (HydraException, OmegaConfBaseException) as error:
                record_uncomposable(self.config, list(overrides), error)
            else:
                composable.append(overrides)
        return composable
