"""Hydra sweeper for the runner (Hydra finds sweepers only under the hydra_plugins namespace).

Hydra's basic sweeper composes every job of a sweep before launching any, and one bad value (an unknown
model, a resolution that is not a number) aborts them all. This one records such a job as a failed MLflow
run with a one-line reason and launches the rest. The sweep is an MLflow run of its own, the parent of its
jobs' runs (its id is stamped on every job), and always ends with a table, a comparison of the runs and a
report logged to that run, exiting non-zero if any job failed. Where its jobs run one after another, each
job's baseline comes again after the job's accelerated runs (``rebaseline``). The logic lives in
runner/sweep.py.
"""

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from runner.sweep import record_uncomposable, run_sweep, with_baseline_again, with_gpu_slots


class ResilientSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> None:
        # Hydra's own launcher runs the jobs in this process: their workers' server can start at once.
        run_sweep(self.config, arguments, super().sweep, jobs_here=isinstance(self.launcher, BasicLauncher))

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        composable = []
        for overrides in super().get_job_batch():
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                is_baseline = cfg.hydra.runtime.choices.accelerator == cfg.quality.baseline
                composable.append((list(overrides), is_baseline, str(cfg.rebaseline)))
            except (HydraException, OmegaConfBaseException) as error:
                record_uncomposable(self.config, list(overrides), error)
        # A baseline's second measurement follows its job's accelerated runs only where jobs run in order, one
        # after another: SLURM's and local_gpus' jobs run side by side, on GPUs and in an order of their own.
        in_order = isinstance(self.launcher, BasicLauncher)
        return with_gpu_slots(with_baseline_again(composable) if in_order else [o for o, _, _ in composable])
