"""MLflow: where every job is recorded, as a run, whether it finished, failed or was skipped.

A run's tag ``outcome`` is ``ok``, ``failed`` or ``skipped`` (its MLflow status is FINISHED, FAILED and
FINISHED); ``error`` or ``skip_reason`` say why in one line. The default store is SQLite under ``mlruns/``
with artifacts beside it; any other tracking URI (an MLflow server) works the same.
"""

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunTag
from mlflow.exceptions import MlflowException
from PIL import Image

from runner.config import MlflowConfig

# The runner reports its own progress; MLflow's bars for every small download only bury it.
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
# MLflow's UI opens an experiment in its runs table (not its GenAI traces view) when it is of this kind.
KIND_TAG = "mlflow.experimentKind"
KIND = {KIND_TAG: "custom_model_development"}
MAX_TAG_CHARS = 1000  # long errors are cut here; the whole traceback is the artifact error.txt
SQLITE_PREFIX = "sqlite:///"


class Tracker:
    """One experiment of one tracking store."""

    def __init__(self, cfg: MlflowConfig) -> None:
        artifact_root = None
        if cfg.tracking_uri.startswith(SQLITE_PREFIX):
            database = Path(cfg.tracking_uri.removeprefix(SQLITE_PREFIX))
            database.parent.mkdir(parents=True, exist_ok=True)
            artifact_root = (database.parent / "artifacts").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        self.experiment_name = cfg.experiment
        self.experiment_id = self._experiment_id(cfg.experiment, artifact_root)

    def _experiment_id(self, name: str, artifact_root: str | None) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            with contextlib.suppress(MlflowException):  # another job of the sweep may have created it first
                self.client.create_experiment(name, artifact_location=artifact_root, tags=KIND)
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise MlflowException(f"mlflow.experiment={name}: could not be created in {self.client.tracking_uri}")
        if experiment.tags.get(KIND_TAG) != KIND[KIND_TAG]:
            self.client.set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND[KIND_TAG])
        return experiment.experiment_id

    # Runs

    def start_run(self, name: str, params: dict[str, Any], sweep_id: str, tags: dict[str, str] | None = None) -> str:
        """A job's run, under its sweep's run when it has one."""
        tags = {**(tags or {}), "kind": "job", "outcome": "running"}
        if sweep_id:
            tags.update({"sweep_id": sweep_id, "mlflow.parentRunId": sweep_id})
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_sweep(self, name: str, command: str) -> str:
        """A sweep's own run, the parent of its jobs' runs; its run id is the sweep's id."""
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"kind": "sweep"})
        self.client.log_param(run.info.run_id, "command", command)
        self.set_tags(run.info.run_id, {"sweep_id": run.info.run_id})
        return run.info.run_id

    def finish(self, run_id: str, error: str | None = None) -> None:
        """End a started run: FINISHED with outcome ok, or FAILED with the error's first line."""
        if error is None:
            self.set_tags(run_id, {"outcome": "ok"})
            self.client.set_terminated(run_id, "FINISHED")
        else:
            self.set_tags(run_id, {"outcome": "failed", "error": error})
            self.client.set_terminated(run_id, "FAILED")

    def record(
        self,
        name: str,
        params: dict[str, Any],
        sweep_id: str,
        tags: dict[str, str] | None = None,
        *,
        skipped: str = "",
        failed: str = "",
    ) -> str:
        """Record a job that never ran: skipped (with the reason) or failed before starting (with the error)."""
        run_id = self.start_run(name, params, sweep_id, tags)
        if skipped:
            self.set_tags(run_id, {"outcome": "skipped", "skip_reason": skipped})
            self.client.set_terminated(run_id, "FINISHED")
        else:
            self.finish(run_id, failed or "failed before it started")
        return run_id

    def kill(self, run_id: str, reason: str) -> None:
        self.set_tags(run_id, {"outcome": "failed", "error": reason})
        self.client.set_terminated(run_id, "KILLED")

    # What a run holds

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(key, _text(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=items[start : start + 100])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(key, _text(value)[:MAX_TAG_CHARS]) for key, value in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, float(value), step=step)

    def log_metric_series(self, run_id: str, key: str, values: list[float]) -> None:
        for step, value in enumerate(values):
            self.client.log_metric(run_id, key, float(value), step=step)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_file(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def log_images(self, run_id: str, images: dict[str, Image.Image]) -> None:
        """Log images as PNG files under the run's ``images/`` folder, keyed by file name."""
        with tempfile.TemporaryDirectory() as folder:
            for name, image in images.items():
                image.save(Path(folder, name))
            self.client.log_artifacts(run_id, folder, "images")

    # Finding runs

    def run(self, run_id: str) -> Run:
        return self.client.get_run(run_id)

    def search(self, filter_string: str, max_results: int = 1000) -> list[Run]:
        return list(
            self.client.search_runs(
                [self.experiment_id], filter_string, max_results=max_results, order_by=["attributes.start_time ASC"]
            )
        )

    def jobs(self, filter_string: str = "") -> list[Run]:
        """The experiment's job runs (not sweeps' own runs), oldest first, optionally filtered."""
        return self.search(" and ".join(f for f in ("tags.kind = 'job'", filter_string) if f))

    def sweep_runs(self, sweep_id: str) -> list[Run]:
        return self.jobs(f"tags.sweep_id = '{sweep_id}'")

    def find_baseline(self, image_key: str, accelerator: str) -> Run | None:
        """The newest finished run of the same job (``image_key``) with the baseline accelerator, or None."""
        runs = self.search(
            f"tags.image_key = '{image_key}' and params.accelerator = '{accelerator}' and tags.outcome = 'ok'"
        )
        return runs[-1] if runs else None

    def download_images(self, run_id: str) -> dict[str, Image.Image]:
        """A run's generated images, by file name."""
        with tempfile.TemporaryDirectory() as folder:
            local = Path(self.client.download_artifacts(run_id, "images", folder))
            return {path.name: Image.open(path).convert("RGB") for path in sorted(local.glob("*.png"))}

    def find_t2i_image(self, model: str, height: int, width: int) -> tuple[Path, str] | None:
        """The first image of the newest finished text-to-image run of ``model`` at this size without an
        accelerator, downloaded; and where it came from. None if there is no such run."""
        runs = self.search(
            f"params.model = '{model}' and params.task = 't2i' and params.height = '{height}' "
            f"and params.width = '{width}' and params.accelerator = 'none' and tags.outcome = 'ok'"
        )
        for run in reversed(runs):
            images = sorted(a.path for a in self.client.list_artifacts(run.info.run_id, "images"))
            if images:
                folder = tempfile.mkdtemp(prefix="t2i-input-")
                local = self.client.download_artifacts(run.info.run_id, images[0], folder)
                return Path(local), f"run {run.info.run_id} ({run.info.run_name}) {images[0]}"
        return None


def _text(value: Any) -> str:
    return "null" if value is None else str(value)
