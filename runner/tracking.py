"""MLflow: where every job is recorded, as a run, whether it finished, failed, was skipped or stopped.

``Tracker`` is the one writer and reader of the tracking store; its MLflow client stays private. It
writes a job's run from the job's params, the worker's result and the comparison's verdicts, and reads
runs back as typed records (runner/record.py). A run's MLflow status is FINISHED (outcome ok or skipped),
FAILED or KILLED. The default store is SQLite under ``mlruns/`` with artifacts beside it; an MLflow server
works the same. Against a server every request has a short timeout and two retries, and a server that does
not answer is one line naming it, within seconds.
"""

import contextlib
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from PIL import Image

from runner.config import MlflowConfig
from runner.errors import RunnerError
from runner.record import (
    Comparison,
    JobRecord,
    Outcome,
    QualityResult,
    WorkerResult,
    comparison_metrics,
    comparison_tags,
    conditions_tags,
    measurement_tags,
    quality_tags,
)

# The runner reports its own progress; MLflow's bars for every small download only bury it.
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
# One retry policy for every request to a server: a short timeout, two retries a second apart (MLflow's own
# defaults wait minutes on a server that is down). Set before the client reads them; a user's values win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
# Against a server MLflow prints a "View run ... at" line for every run it closes; the sweep prints one link.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
PROBE_TIMEOUT_S = 5
# MLflow's UI opens an experiment in its runs table (not its GenAI traces view) when it is of this kind.
KIND_TAG = "mlflow.experimentKind"
KIND = {KIND_TAG: "custom_model_development"}
MAX_TAG_CHARS = 1000  # long errors are cut here; the whole traceback is the artifact error.txt
NOTE_TAG, MAX_NOTE_CHARS = "mlflow.note.content", 8000  # a run's description (MLflow's own limit for a tag)
SQLITE_PREFIX = "sqlite:///"
STATUS = {Outcome.OK: "FINISHED", Outcome.SKIPPED: "FINISHED", Outcome.FAILED: "FAILED", Outcome.KILLED: "KILLED"}
WHY_TAG = {Outcome.SKIPPED: "skip_reason", Outcome.FAILED: "error", Outcome.KILLED: "error"}


class TrackingError(RunnerError):
    """The tracking store cannot be reached; the message names it and what to do."""


class Tracker:
    """One experiment of one tracking store."""

    def __init__(self, cfg: MlflowConfig) -> None:
        artifact_root = None
        uri = cfg.tracking_uri
        if uri.startswith(SQLITE_PREFIX):
            database = Path(uri.removeprefix(SQLITE_PREFIX))
            database.parent.mkdir(parents=True, exist_ok=True)
            artifact_root = (database.parent / "artifacts").resolve().as_uri()
        elif uri.startswith(("http://", "https://")):
            _probe(uri)
        self.tracking_uri = uri
        self._client = MlflowClient(tracking_uri=uri)
        self.experiment_name = cfg.experiment
        self.experiment_id = self._experiment_id(cfg.experiment, artifact_root)

    def _experiment_id(self, name: str, artifact_root: str | None) -> str:
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            with contextlib.suppress(MlflowException):  # another job of the sweep may have created it first
                self._client.create_experiment(name, artifact_location=artifact_root, tags=KIND)
            experiment = self._client.get_experiment_by_name(name)
            if experiment is None:
                raise TrackingError(f"mlflow.experiment={name}: could not be created in {self.tracking_uri}")
        if experiment.tags.get(KIND_TAG) != KIND[KIND_TAG]:
            self._client.set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND[KIND_TAG])
        return experiment.experiment_id

    # Jobs

    def start_job(self, name: str, params: dict[str, Any], sweep_id: str, tags: dict[str, str]) -> str:
        """A job's run, RUNNING, under its sweep's run when it has one."""
        tags = {**tags, "kind": "job", "outcome": str(Outcome.RUNNING)}
        if sweep_id:
            tags.update({"sweep_id": sweep_id, "mlflow.parentRunId": sweep_id})
        run = self._client.create_run(self.experiment_id, run_name=name, tags=tags)
        self._log(run.info.run_id, params=params)
        return run.info.run_id

    def record_result(self, run_id: str, result: WorkerResult, folder: Path) -> None:
        """Log what the worker measured: params, metrics (and per-call series), facts and verdicts as tags,
        and the files it left in ``folder`` (its images, the input image, its traceback)."""
        tags = dict(result.facts)
        if result.image_key:
            tags["image_key"] = result.image_key
        for part, to_tags in (
            (result.conditions, conditions_tags),
            (result.measurement, measurement_tags),
            (result.quality, quality_tags),
        ):
            if part is not None:
                tags.update(to_tags(part))
        series = [
            Metric(key, float(value), _now_ms(), step)
            for key, values in result.series.items()
            for step, value in enumerate(values)
        ]
        self._log(run_id, params=result.params, metrics=result.metrics, tags=tags, extra_metrics=series)
        for name in ("input.png", "error.txt"):
            if (folder / name).is_file():
                self._client.log_artifact(run_id, str(folder / name))
        if (folder / "images").is_dir() and any((folder / "images").iterdir()):
            self._client.log_artifacts(run_id, str(folder / "images"), "images")

    def end_job(self, run_id: str, outcome: Outcome, why: str = "", metrics: dict[str, float] | None = None) -> None:
        """Close a job's run with its outcome (and, unless it finished, why), logging its last ``metrics``."""
        tags = {"outcome": str(outcome)}
        if outcome in WHY_TAG:
            tags[WHY_TAG[outcome]] = why or "failed before it started"
        self._log(run_id, tags=tags, metrics=metrics or {})
        self._client.set_terminated(run_id, STATUS[outcome])

    def record_never_ran(
        self, name: str, params: dict[str, Any], sweep_id: str, tags: dict[str, str], outcome: Outcome, why: str
    ) -> str:
        """A job that never ran: skipped (the reason) or failed before it started (the error)."""
        run_id = self.start_job(name, params, sweep_id, tags)
        self.end_job(run_id, outcome, why)
        return run_id

    def write_comparison(self, run_id: str, comparison: Comparison) -> None:
        self._log(run_id, metrics=comparison_metrics(comparison), tags=comparison_tags(comparison))

    def write_quality(self, run_id: str, quality: QualityResult, metrics: dict[str, float]) -> None:
        self._log(run_id, metrics=metrics, tags=quality_tags(quality))

    def prepend_to_note(self, run_id: str, text: str) -> bool:
        """Put a paragraph atop a run's MLflow note (its description in the UI), where a reader meets it first;
        False where MLflow no longer holds the run (deleted, then purged)."""
        try:
            note = self._client.get_run(run_id).data.tags.get(NOTE_TAG, "")
        except MlflowException:
            return False
        self._log(run_id, tags={NOTE_TAG: f"{text}\n\n{note}" if note else text})
        return True

    def log_file(self, run_id: str, path: Path, folder: str | None = None) -> None:
        self._client.log_artifact(run_id, str(path), folder)

    def log_folder(self, run_id: str, path: Path, folder: str) -> None:
        self._client.log_artifacts(run_id, str(path), folder)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._client.log_text(run_id, text, artifact_file)

    # Sweeps

    def start_sweep(self, name: str, command: str, tags: dict[str, str]) -> str:
        """A sweep's own run, the parent of its jobs' runs; its run id is the sweep's id."""
        run = self._client.create_run(self.experiment_id, run_name=name, tags={**tags, "kind": "sweep"})
        self._log(run.info.run_id, params={"command": command}, tags={"sweep_id": run.info.run_id})
        return run.info.run_id

    def end_sweep(self, sweep_id: str, status: str, tags: dict[str, str]) -> None:
        """Close a sweep's run: FINISHED, FAILED (some job failed) or KILLED (stopped)."""
        self._log(sweep_id, tags=tags)
        self._client.set_terminated(sweep_id, status)

    def artifact_path(self, run_id: str, artifact: str) -> str:
        """Where a run's artifact lies: a local path for a local store, else its URI."""
        root = self._client.get_run(run_id).info.artifact_uri.rstrip("/")
        return f"{root.removeprefix('file://')}/{artifact}" if root.startswith("file://") else f"{root}/{artifact}"

    def ui_link(self, run_id: str) -> str:
        """How to open a run in MLflow's UI, in its model-training view (MLflow 3 starts in its GenAI view)."""
        page = f"#/experiments/{self.experiment_id}/runs/{run_id}?workflowType=machine_learning"
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"{self.tracking_uri.rstrip('/')}/{page}"
        return f"mlflow ui --backend-store-uri {self.tracking_uri}, then http://127.0.0.1:5000/{page}"

    def running_sweeps(self) -> list[Run]:
        return self._search("tags.kind = 'sweep' and attributes.status = 'RUNNING'")

    # Reading

    def records(self, filter_string: str = "") -> list[JobRecord]:
        """The experiment's jobs (not sweeps' own runs), oldest first, optionally filtered (a user's filter
        that MLflow cannot parse is one line naming it and the syntax)."""
        try:
            runs = self._search(" and ".join(f for f in ("tags.kind = 'job'", filter_string) if f))
        except MlflowException as error:
            if not filter_string or error.error_code != "INVALID_PARAMETER_VALUE":
                raise
            raise TrackingError(
                f"--filter {filter_string!r}: {error.message}; write MLflow's filter syntax, values quoted, "
                "e.g. \"params.res = '1024' and tags.outcome = 'ok'\""
            ) from None
        return [JobRecord.from_run(run) for run in runs]

    def record(self, run_id: str) -> JobRecord:
        return JobRecord.from_run(self._client.get_run(run_id))

    def kept_record(self, run_id: str) -> JobRecord | None:
        """The run as a record, or None where MLflow no longer holds it (deleted, then purged by ``mlflow gc``)."""
        try:
            return self.record(run_id)
        except MlflowException:
            return None

    def find_quality_baseline(self, image_key: str, accelerator: str, sweep_id: str, device: str) -> JobRecord | None:
        """The run whose images a job's are compared with: a finished run of the same job (``image_key``) with
        the baseline accelerator, from the same sweep if there is one, else on the same kind of device, else
        any; the newest of those."""
        found = self.records(
            f"tags.image_key = '{image_key}' and params.accelerator = '{accelerator}' and tags.outcome = 'ok'"
        )
        for preferred in (
            lambda r: r.sweep_id == sweep_id and bool(sweep_id),
            lambda r: r.conditions.device_name == device,
            lambda r: True,
        ):
            chosen = [record for record in found if preferred(record)]
            if chosen:
                return chosen[-1]
        return None

    def download_images(self, run_id: str) -> dict[str, Image.Image]:
        """A run's generated images, by file name."""
        with tempfile.TemporaryDirectory() as folder:
            try:
                local = Path(self._client.download_artifacts(run_id, "images", folder))
            except (MlflowException, OSError):
                return {}
            return {path.name: Image.open(path).convert("RGB") for path in sorted(local.glob("*.png"))}

    def download(self, run_id: str, artifact: str = "", into: Path | None = None) -> Path | None:
        """One artifact of a run (default: its first generated image), downloaded; None if it has none."""
        if not artifact:
            images = sorted(a.path for a in self._client.list_artifacts(run_id, "images"))
            if not images:
                return None
            artifact = images[0]
        else:
            parent = str(Path(artifact).parent)
            if artifact not in {a.path for a in self._client.list_artifacts(run_id, None if parent == "." else parent)}:
                return None
        folder = into or Path(tempfile.mkdtemp(prefix="runner-artifact-"))
        return Path(self._client.download_artifacts(run_id, artifact, str(folder)))

    def find_t2i_image(self, model: str, height: int, width: int) -> tuple[Path, str] | None:
        """The first image of the newest finished text-to-image run of ``model`` at this size without an
        accelerator, downloaded; and where it came from. None if there is no such run. A baseline measured again
        (``again_of``) is not one: a sweep measures it between its jobs' runs, and image-to-image runs of one
        sweep must start from the same run's pixels whichever side of it they ran on."""
        found = self.records(
            f"params.model = '{model}' and params.task = 't2i' and params.height = '{height}' "
            f"and params.width = '{width}' and tags.outcome = 'ok'"
        )
        for record in reversed([r for r in found if r.is_baseline and not r.again_of]):
            image = self.download(record.run_id)
            if image is not None:
                return image, f"run {record.run_id} ({record.name}) images/{image.name}"
        return None

    def _search(self, filter_string: str) -> list[Run]:
        runs, token = [], None
        while True:
            page = self._client.search_runs(
                [self.experiment_id],
                filter_string,
                max_results=1000,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _log(
        self,
        run_id: str,
        *,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        extra_metrics: list[Metric] | None = None,
    ) -> None:
        """Everything in batches within MLflow's limits (100 params, 100 tags, 1000 metrics a request)."""
        now = _now_ms()
        items = {
            "params": [Param(key, _text(value)) for key, value in (params or {}).items()],
            "tags": [
                RunTag(key, _text(value)[: MAX_NOTE_CHARS if key == NOTE_TAG else MAX_TAG_CHARS])
                for key, value in (tags or {}).items()
            ],
            "metrics": [Metric(key, float(value), now, 0) for key, value in (metrics or {}).items()]
            + (extra_metrics or []),
        }
        for kind, size in (("params", 100), ("tags", 100), ("metrics", 1000)):
            for start in range(0, len(items[kind]), size):
                self._client.log_batch(run_id, **{kind: items[kind][start : start + size]})


def _probe(uri: str) -> None:
    """Raise TrackingError unless something answers HTTP at ``uri`` within a few seconds."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # an answer, if not a healthy one: the requests themselves will say more
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(
            f"mlflow.tracking_uri={uri}: no tracking server answers there ({reason}); start one (README, "
            "'A shared tracking server': mlflow server --host 127.0.0.1 --port 5000 ...) or use the local "
            "default, mlflow.tracking_uri=sqlite:///mlruns/mlflow.db"
        ) from None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: Any) -> str:
    return "null" if value is None else str(value)
