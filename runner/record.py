"""The typed record of a job, and the one place that turns it into MLflow tags and back.

A job leaves one MLflow run: its params are the job's settings (derived from the schema in
runner/config.py), its metrics the measurements (named in runner/catalogue.py), its tags the facts and
verdicts typed here. The worker hands its part over as a ``WorkerResult`` (a JSON file beside
``worker.log``); the comparison adds a ``Comparison``; ``JobRecord.from_run`` reads it all back. Every
other module reads records, never tag strings.
"""

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # MLflow takes a second to import: the entry point starts the workers' server before it
    from mlflow.entities import Run


class Choice(str, Enum):
    """An enum whose members are their tag values (``str(member)`` is the value on every Python)."""

    def __str__(self) -> str:
        return self.value


class Outcome(Choice):
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"
    KILLED = "killed"  # stopped by Ctrl-C or SIGTERM, or abandoned by a process that died


class Quality(Choice):
    """Whether the images count as unaffected by the accelerator (tag ``quality_unaffected``)."""

    UNAFFECTED = "true"
    AFFECTED = "false"
    UNKNOWN = "unknown"


class Steadiness(Choice):
    """Whether the timed calls can carry a verdict (tag ``measurement``)."""

    STEADY = "steady"
    NOISY = "noisy"  # the calls' spread or drift is too large: their mean is not one figure
    CONTENDED = "contended"  # something else used the job's GPU or the host's CPUs while it was timed
    UNCHECKED = "unchecked"  # too few calls to tell


class Pace(Choice):
    """A run's speed against its baseline (tag ``pace``)."""

    BASELINE = "baseline"
    FASTER = "faster"
    SLOWER = "slower"
    SAME = "about as fast"
    INCONCLUSIVE = "inconclusive"  # measured, but noise, contention or disagreeing baselines forbid a verdict
    UNCOMPARED = "no baseline"  # no baseline was measured under the same conditions


@dataclass(frozen=True)
class Conditions:
    """What a measurement depends on beyond its configuration. Timings compare only between runs whose
    conditions are alike: the same physical device on the same machine start, as many jobs at once."""

    host: str = ""
    boot_id: str = ""  # the kernel's id of this machine start
    device_name: str = ""
    gpu_uuid: str = ""  # empty on the CPU
    concurrent_jobs: int = 1  # the most jobs of the runner on this host at once during the timed calls
    cores: str = ""  # the cores the launching thread was pinned to; empty when unpinned

    def unlike(self, other: "Conditions") -> str:
        """Why timings under ``other`` cannot be compared with these; empty when they can."""
        if not (self.boot_id and other.boot_id):
            return "its machine start is unknown"
        if self.gpu_uuid != other.gpu_uuid or self.device_name != other.device_name:
            return "another device"
        if self.host != other.host or self.boot_id != other.boot_id:
            return "another machine start"
        if self.concurrent_jobs != other.concurrent_jobs:
            return f"{other.concurrent_jobs} job(s) at once, not {self.concurrent_jobs}"
        return ""


@dataclass(frozen=True)
class Measurement:
    steadiness: Steadiness = Steadiness.UNCHECKED
    why: str = ""


@dataclass(frozen=True)
class QualityResult:
    verdict: Quality = Quality.UNKNOWN
    why: str = ""
    baseline_run: str = ""  # the run whose images these were compared with; "self" for a baseline run
    clip_model: str = ""
    clip_meaningless: str = ""  # why the CLIP score means nothing here (random weights, tiny CLIP); empty if it does
    broken: tuple[str, ...] = ()  # one line per broken image
    judged_late: bool = False  # judged by a comparison after the run, when its baseline had appeared


@dataclass(frozen=True)
class Comparison:
    pace: Pace
    why: str  # which baseline and why, or why there is no verdict
    baseline_run: str = ""  # "self" for a baseline run
    speedup: float | None = None  # the baseline's mean latency over this run's
    mem_ratio: float | None = None  # this run's peak memory over the baseline's
    best: bool = False


@dataclass
class WorkerResult:
    """What a job's worker process hands back to the job's process, which records it."""

    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=dict)  # per timed call, logged as steps
    facts: dict[str, str] = field(default_factory=dict)  # environment and accelerator tags
    image_key: str = ""
    conditions: Conditions | None = None
    measurement: Measurement | None = None
    quality: QualityResult | None = None
    error: str = ""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), default=str))

    @classmethod
    def load(cls, path: Path) -> "WorkerResult | None":
        """The result at ``path``, or None if the worker never wrote one (it died)."""
        if not path.is_file():
            return None
        values = json.loads(path.read_text())
        conditions, measurement, quality = (values.pop(key) for key in ("conditions", "measurement", "quality"))
        return cls(
            **values,
            conditions=Conditions(**conditions) if conditions else None,
            measurement=Measurement(Steadiness(measurement["steadiness"]), measurement["why"]) if measurement else None,
            quality=QualityResult(
                **{**quality, "verdict": Quality(quality["verdict"]), "broken": tuple(quality["broken"])}
            )
            if quality
            else None,
        )


# Writing: the tags each part of a record becomes.


def conditions_tags(conditions: Conditions) -> dict[str, str]:
    return {
        "host": conditions.host,
        "boot_id": conditions.boot_id,
        "device_name": conditions.device_name,
        "gpu_uuid": conditions.gpu_uuid or "none",
        "concurrent_jobs": str(conditions.concurrent_jobs),
        "pinned_cpu": conditions.cores or "none",
    }


def measurement_tags(measurement: Measurement) -> dict[str, str]:
    return {"measurement": str(measurement.steadiness), "measurement_why": measurement.why}


def quality_tags(quality: QualityResult) -> dict[str, str]:
    tags = {
        "quality_unaffected": str(quality.verdict),
        "quality_verdict": quality.why,
        "quality_baseline_run": quality.baseline_run or "none",
        "clip_model": quality.clip_model,
        "clip_score_meaningful": f"false: {quality.clip_meaningless}" if quality.clip_meaningless else "true",
    }
    if quality.broken:
        tags["broken_output"] = "; ".join(quality.broken)
    if quality.judged_late:
        tags["quality_judged"] = "later, when its baseline was found"
    return tags


def comparison_tags(comparison: Comparison) -> dict[str, str]:
    return {
        "pace": str(comparison.pace),
        "baseline_run": comparison.baseline_run or "none",
        "baseline_why": comparison.why,
        "best": str(comparison.best).lower(),
    }


def comparison_metrics(comparison: Comparison) -> dict[str, float]:
    ratios = {"speedup_vs_baseline": comparison.speedup, "mem_ratio_vs_baseline": comparison.mem_ratio}
    return {key: value for key, value in ratios.items() if value is not None}


# Reading: a run back as a record.


@dataclass(frozen=True)
class JobRecord:
    run_id: str
    name: str
    outcome: Outcome
    why: str  # the error, the skip reason or the reason it was stopped; empty for a finished run
    started_ms: int
    pid: str  # the job's process, on conditions.host
    slurm_job: str  # the SLURM job it ran in, if any
    sweep_id: str
    config_hash: str
    model: str
    task: str
    task_title: str
    size: str  # HxW
    batch: int  # images per call
    accelerator: str
    baseline_accelerator: str  # the accelerator whose runs are the baselines (quality.baseline)
    weights: str
    model_id: str
    runs: int
    image_key: str
    conditions: Conditions
    measurement: Measurement
    quality: QualityResult
    comparison: Comparison | None
    metrics: dict[str, float]
    params: dict[str, str]
    again_of: str = ""  # a baseline measured again after its job's accelerated runs: the first one's run id
    gpu_slot: int | None = None  # the sweeper's slot of its job (runner/sweep.py); None outside a sweep

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    @property
    def is_baseline(self) -> bool:
        return self.accelerator == self.baseline_accelerator

    @property
    def latency_s(self) -> float:
        return self.metrics.get("latency_s", float("nan"))

    @property
    def measured_ms(self) -> int:
        """When its measurement began: the run's start and then its wait for a GPU. A job opens its run before it
        queues for its GPU slot, so under local_gpus the order runs were opened in need not be the order they took
        the GPU in (CI saw a job's accelerated run opened first and measured second)."""
        return self.started_ms + round(self.metrics.get("time_queued_s", 0.0) * 1000)

    @property
    def memory_gib(self) -> float | None:
        """Peak memory of the timed calls: CUDA allocated (plus OneFlow's own) or the process's RSS on the CPU."""
        peak = self.metrics.get("peak_mem_gib", self.metrics.get("peak_rss_gib"))
        return None if peak is None else peak + self.metrics.get("oneflow_mem_gib", 0.0)

    @classmethod
    def from_run(cls, run: "Run") -> "JobRecord":
        params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
        outcome = _outcome(tags.get("outcome"), run.info.status)
        height, width = params.get("height", "?"), params.get("width", "?")
        return cls(
            run_id=run.info.run_id,
            name=run.info.run_name or run.info.run_id,
            outcome=outcome,
            why=tags.get("error") or tags.get("skip_reason") or "",
            started_ms=run.info.start_time or 0,
            pid=tags.get("pid", ""),
            slurm_job=tags.get("slurm_job_id", ""),
            sweep_id=tags.get("sweep_id", ""),
            config_hash=tags.get("config_hash", ""),
            model=params.get("model", "?"),
            task=params.get("task", "?"),
            task_title=params.get("task_title") or params.get("task", "?"),
            size=f"{height}x{width}",
            batch=int(params["batch"]) if params.get("batch", "").isdigit() else 1,
            accelerator=params.get("accelerator", "?"),
            baseline_accelerator=params.get("quality.baseline", "none"),
            weights=params.get("weights", "?"),
            model_id=_present(params.get("model_id")),
            runs=int(params["runs"]) if params.get("runs", "").isdigit() else 1,
            image_key=tags.get("image_key", ""),
            conditions=Conditions(
                host=tags.get("host", ""),
                boot_id=tags.get("boot_id", ""),
                device_name=tags.get("device_name", ""),
                gpu_uuid=_present(tags.get("gpu_uuid")),
                concurrent_jobs=int(tags.get("concurrent_jobs", "1") or 1),
                cores=_present(tags.get("pinned_cpu")),
            ),
            measurement=Measurement(
                Steadiness(tags["measurement"])
                if tags.get("measurement") in _values(Steadiness)
                else Steadiness.UNCHECKED,
                tags.get("measurement_why", ""),
            ),
            quality=QualityResult(
                verdict=Quality(tags.get("quality_unaffected", "unknown"))
                if tags.get("quality_unaffected") in _values(Quality)
                else Quality.UNKNOWN,
                why=tags.get("quality_verdict", ""),
                baseline_run=_present(tags.get("quality_baseline_run")),
                clip_model=tags.get("clip_model", ""),
                clip_meaningless=tags.get("clip_score_meaningful", "").removeprefix("false: ")
                if tags.get("clip_score_meaningful", "true") != "true"
                else "",
                broken=tuple(line for line in tags.get("broken_output", "").split("; ") if line),
                judged_late="quality_judged" in tags,
            ),
            comparison=Comparison(
                pace=Pace(tags["pace"]),
                why=tags.get("baseline_why", ""),
                baseline_run=_present(tags.get("baseline_run")),
                speedup=metrics.get("speedup_vs_baseline"),
                mem_ratio=metrics.get("mem_ratio_vs_baseline"),
                best=tags.get("best") == "true",
            )
            if tags.get("pace") in _values(Pace)
            else None,
            metrics=dict(metrics),
            params=dict(params),
            again_of=tags.get("baseline_again", ""),
            gpu_slot=int(tags["gpu_slot"]) if tags.get("gpu_slot", "").isdigit() else None,
        )


def dtype_where_they_differ(run: JobRecord, records: list[JobRecord]) -> str:
    """The run's dtype where the finished ``records`` were run in more than one (a dtype sweep: each its own
    job in the report and the plots), else ""."""
    dtypes = {record.params.get("dtype", "") for record in records if record.ok}
    return run.params.get("dtype", "?") if len(dtypes) > 1 else ""


def _outcome(tag: str | None, status: str) -> Outcome:
    if status == "KILLED":
        return Outcome.KILLED
    if tag in _values(Outcome):
        return Outcome(tag)
    return Outcome.RUNNING if status == "RUNNING" else Outcome.FAILED


def _values(enum: type[Choice]) -> set[str]:
    return {member.value for member in enum}


def _present(value: str | None) -> str:
    """A tag or param that says "none" or "null" when there is nothing, read as an empty string."""
    return "" if value in (None, "none", "null") else value
