"""Hydra sweeper for the runner (Hydra finds sweepers only under the hydra_plugins namespace).

Hydra's basic sweeper composes every job of a sweep before launching any, and one bad value (an unknown
model, a resolution that is not a number) aborts them all. This one records such a job as a failed MLflow
run with a one-line reason and launches the rest. The sweep is an MLflow run of its own, the parent of its
jobs' runs (its id is stamped on every job), and always ends with a table, a comparison of the runs and a
report logged to that run, exiting non-zero if any job failed. Each job's baseline comes again after the job's
accelerated runs (``rebaseline``): in the batch where its jobs run one after another (Hydra's own launcher, and
SLURM's, hydra_plugins/runner_slurm, one task per GPU slot), in batches after it where ``local_gpus`` runs them side
by side (as many at once as the job's last run had). The logic lives in runner/sweep.py.
"""

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from runner.sweep import (
    baselines_after,
    batches_after,
    record_uncomposable,
    run_sweep,
    with_baseline_again,
    with_gpu_slots,
)


class ResilientSweeper(BasicSweeper):
    # The baselines' second slots where the launcher runs jobs side by side: launched once the launcher has
    # returned from the current batch (its jobs ended), in batches of as many at once as their jobs' last runs had.
    after: Sequence[list[str]] = ()
    queued: Sequence[list[list[str]]] = ()

    def sweep(self, arguments: list[str]) -> None:
        # Hydra's own launcher runs the jobs in this process: their workers' server can start at once.
        run_sweep(self.config, arguments, super().sweep, jobs_here=isinstance(self.launcher, BasicLauncher))

    def is_done(self) -> bool:
        return super().is_done() and not self.after and not self.queued

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        if self.after:
            self.queued, self.after = batches_after(self.config, list(self.after)), ()
        if self.queued:
            batch, self.queued = self.queued[0], self.queued[1:]
            return batch
        composable = []
        for overrides in super().get_job_batch():
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                is_baseline = cfg.hydra.runtime.choices.accelerator == cfg.quality.baseline
                composable.append((list(overrides), is_baseline, str(cfg.rebaseline)))
            except (HydraException, OmegaConfBaseException) as error:
                record_uncomposable(self.config, list(overrides), error)
        # A baseline's second measurement follows its job's accelerated runs: in the batch where a slot's jobs run
        # in order, one after another (Hydra's own launcher; the SLURM launcher, a slot's jobs in one task: it says
        # so); where local_gpus runs them side by side, in no set order, in batches of their own after them (as
        # many at once as their jobs' last runs had).
        if isinstance(self.launcher, BasicLauncher) or getattr(self.launcher, "runs_slots_in_order", False):
            return with_gpu_slots(with_baseline_again(composable))
        batch = with_gpu_slots([overrides for overrides, _, _ in composable])
        # By name: Hydra's plugin discovery executes the launcher's module afresh, so its class is not the one an
        # import here would give, and isinstance fails.
        if type(self.launcher).__name__ == "LocalLauncher":  # submitit's local executor: local_gpus
            self.after = baselines_after([(batch[i], *job[1:]) for i, job in enumerate(composable)])
        return batch
