"""One job, seen from the sweep's process: convert and check its config once, open its MLflow run, measure
it in a fresh process (runner/worker.py) on a GPU and a core of its own, and record what it handed back.
Whatever happens, the job leaves a run behind: finished, failed with its error, skipped with the reason,
or killed (Ctrl-C, SIGTERM); and the sweep goes on.

Sweeps resume: a job whose exact configuration (the tag ``config_hash``) already has a finished or skipped
run is not run again unless ``force=true``. A run left RUNNING by a job process that died without a word
(SIGKILL, a lost machine) is closed as KILLED by the next job on that host.
"""

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner import slurm
from runner.compare import Again, baseline_again
from runner.config import (
    Config,
    ConfigError,
    MlflowConfig,
    config_hash,
    job_name,
    logged_params,
    option_label,
    run_name,
    skip_reason,
    switched_config,
    to_config,
)
from runner.errors import one_line
from runner.gpus import gpu_lease, visible_gpus
from runner.host import HOST, boot_id, core_lease, cores_near
from runner.launch import RESULT, SWITCHED, launch_worker, start_server
from runner.record import Outcome, WorkerResult
from runner.timeline import Timeline
from runner.tracking import Tracker


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler or a user stopping the sweep)."""


class Stopped(BaseException):
    """The job was stopped by Ctrl-C or SIGTERM; its run is closed as KILLED. The sweep stops too."""

    def __init__(self, signal_name: str, name: str, run_id: str) -> None:
        super().__init__(f"{signal_name}: job {name} (run {run_id}) closed as KILLED")
        self.signal_name, self.name, self.run_id = signal_name, name, run_id


def run_job(cfg: DictConfig) -> str:
    """Run one composed job; return ok, failed, skipped, or done:<run id> when it had already ended so."""
    began, timeline = time.perf_counter(), Timeline()
    start_server()  # its imports overlap what follows (in a sweep's own process it is running already)
    tracker = Tracker(MlflowConfig(**OmegaConf.to_container(cfg.mlflow, resolve=True)))
    close_abandoned(tracker)
    tags = {"host": HOST, "pid": str(os.getpid()), "boot_id": boot_id()}
    if slurm.job_id():
        tags["slurm_job_id"] = slurm.job_id()
    try:
        config, switched = to_config(cfg), switched_config(cfg)
    except (ConfigError, OmegaConfBaseException) as error:
        if _lenient(cfg, "baseline_again") is True:  # its first slot recorded this failure already
            return "not measured again"
        name, message = lenient_name(cfg), one_line(error)
        run_id = tracker.record_never_ran(name, fallback_params(cfg), _sweep_id(cfg), tags, Outcome.FAILED, message)
        return _ended(name, Outcome.FAILED, message, run_id)
    name, key = job_name(config), config_hash(config)
    tags["config_hash"] = key
    if config.gpu_slot is not None:  # the sweeper reads it back to batch the baselines' second slots
        tags["gpu_slot"] = str(config.gpu_slot)
    if config.baseline_again:  # the sweeper's second slot of this baseline, after the job's accelerated runs
        again = second_slot(tracker, config, key, name)
        if not again.measure:
            return "not measured again"
        if again.again_of:
            name, tags["baseline_again"] = f"{name} again", again.again_of
    done = config.force or config.baseline_again
    earlier = [] if done else [r for r in tracker.records(f"tags.config_hash = '{key}'") if r.outcome in DONE]
    if earlier:
        last = earlier[-1]
        print(f"[{name}] {DONE[last.outcome]} already as run {last.run_id}: not run again (force=true would)")
        return f"done:{last.run_id}"
    reason = skip_reason(config)
    if reason:
        run_id = tracker.record_never_ran(name, logged_params(config), config.sweep_id, tags, Outcome.SKIPPED, reason)
        return _ended(name, Outcome.SKIPPED, reason, run_id)

    run_id = tracker.start_job(name, logged_params(config), config.sweep_id, tags)
    try:
        with sigterm_raises() as warned:  # from here to the run's end a stop closes the run, wherever it lands
            outcome, why, result = measure_and_record(tracker, run_id, config, switched, name, timeline)
            if warned:  # the launcher's stop at a time-limit warning, swallowed where it landed: raised again here
                raise warned[0]
    except (KeyboardInterrupt, Terminated) as stop:
        signal_name = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
        why = (isinstance(stop, Terminated) and slurm.job_id() and slurm.why_stopped(slurm.job_id())) or ""
        tracker.end_job(run_id, Outcome.KILLED, why or f"stopped by {signal_name}")
        raise Stopped(signal_name, name, run_id) from None
    except BaseException as error:  # e.g. submitit ending a SLURM job at its time-limit warning (SIGUSR2)
        why = slurm.job_id() and slurm.why_stopped(slurm.job_id(), exiting=True)
        tracker.end_job(run_id, Outcome.KILLED, why or f"stopped: {one_line(error)}")
        raise
    spent = job_time(timeline, time.perf_counter() - began, result)
    if spent:
        print(f"[{name}] {time_summary(spent | (result.metrics if result else {}))}", flush=True)
    tracker.end_job(run_id, outcome, why, metrics=spent)
    return _ended(name, outcome, why, run_id)


def second_slot(tracker: Tracker, config: Config, key: str, name: str) -> Again:
    """What the sweeper's second slot of this baseline does (runner/compare.py, ``baseline_again``), said in a
    line: nothing, a measurement again of its first run, or this machine start's first measurement of it."""
    baselines = [r for r in tracker.records(f"tags.config_hash = '{key}'") if r.ok]
    jobs = sorted({r.image_key for r in baselines if r.image_key})
    runs = [
        r
        for image_key in jobs
        for r in tracker.records(f"tags.image_key = '{image_key}' and tags.outcome = 'ok'")
        if not r.is_baseline
    ]
    again = baseline_again(config.rebaseline, baselines, runs, config.sweep_id, (HOST, boot_id()))
    reason = skip_reason(config)
    if reason:
        again = Again(False, reason)
    if not again.measure:
        if reason or config.rebaseline != "never":  # never: nothing to say where nothing was asked
            print(f"[{name}] not measured again: {again.why}", flush=True)
    elif again.again_of:
        print(f"[{name} again] {again.why}", flush=True)
    else:
        print(f"[{name}] measured now: {again.why}", flush=True)
    return again


def measure_and_record(
    tracker: Tracker, run_id: str, config: Config, switched: Config | None, name: str, timeline: Timeline
) -> tuple[Outcome, str, WorkerResult | None]:
    """Hand the checked config (and the one it switches to) to a worker, and record whatever it handed back
    (also when it failed)."""
    folder = Path(HydraConfig.get().runtime.output_dir)
    job_file = folder / "config.yaml"
    job_file.write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
    tracker.log_file(run_id, job_file)
    (folder / SWITCHED).unlink(missing_ok=True)  # a folder reused by a later sweep (hydra.sweep.dir) keeps none
    if switched is not None:
        (folder / SWITCHED).write_text(OmegaConf.to_yaml(OmegaConf.structured(switched)))
    result = None
    try:
        outcome, why = measure_in_worker(config, name, folder, timeline)
    finally:
        with timeline.phase("record"):
            if (folder / "worker.log").exists():
                tracker.log_file(run_id, folder / "worker.log")
            result = WorkerResult.load(folder / RESULT)
            if result is not None:
                tracker.record_result(run_id, result, folder)
    return outcome, why, result


# What a job measures outside its timed calls, the accelerator's cost among it: the rest is the runner's own.
MEASURED = ("load_s", "accelerate_s", "warmup_s", "switch_s")


def job_time(timeline: Timeline, wall_s: float, result: WorkerResult | None) -> dict[str, float]:
    """The job's wall time and where it went: the job process's own phases (its setup is what no other phase
    took), and the runner's overhead: the wall time less queueing for a GPU, loading, applying the accelerator,
    warmup, the timed calls themselves and the calls that switch sizes (``switch_res``). Empty when the worker
    handed back no timed calls."""
    calls = result.series.get("call_latency_s") if result else None
    if not calls:
        return {}
    assert result is not None
    phases = timeline.seconds
    spent = {f"time_{name}_s": phases[name] for name in ("queued", "worker_exit", "record") if name in phases}
    job_own = sum(phases.get(name, 0.0) for name in ("queued", "worker", "record"))
    spent["time_job_setup_s"] = wall_s - job_own
    waited = phases.get("queued", 0.0)
    measured = sum(result.metrics.get(key, 0.0) for key in MEASURED) + sum(calls)
    spent.update(job_wall_s=wall_s, overhead_s=wall_s - waited - measured)
    return spent


def time_summary(metrics: dict[str, float]) -> str:
    """One line: the job's wall time, what was measured (loading, applying the accelerator, warmup, the timed
    calls), and the runner's own phases, largest first; the parts add up to the wall time, with waiting for a GPU
    where there was any."""
    waited = metrics.get("time_queued_s", 0.0)
    load, accelerate, warmup, switch = (metrics.get(key, 0.0) for key in MEASURED)
    calls = metrics["job_wall_s"] - metrics["overhead_s"] - waited - load - accelerate - warmup - switch
    measured = f"loading {load:.1f}"
    measured += f", applying the accelerator {accelerate:.1f}" if accelerate >= 0.05 else ""
    measured += f", warmup {warmup:.1f}, timed calls {calls:.1f}"
    measured += f", switching sizes {switch:.1f}" if switch else ""
    measured += f", waiting for a GPU {waited:.1f}" if waited >= 0.05 else ""
    own = sorted(
        (
            (key[5:-2].replace("_", " "), value)
            for key, value in metrics.items()
            if key.startswith("time_") and key not in ("time_queued_s", "time_timed_s") and value >= 0.05
        ),
        key=lambda item: -item[1],
    )
    parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in own)
    return f"wall {metrics['job_wall_s']:.1f} s: {measured}; the runner's own {metrics['overhead_s']:.1f} s ({parts})"


DONE = {Outcome.OK: "DONE", Outcome.SKIPPED: "SKIPPED"}


def measure_in_worker(config: Config, name: str, folder: Path, timeline: Timeline) -> tuple[Outcome, str]:
    """Run the worker on a GPU and a core of its own (when on CUDA)."""
    # A job on a GPU takes one of its own (runner/gpus.py), unless told which (device=cuda:N) or not to.
    wants_gpu = config.gpu_lease and config.device in ("auto", "cuda", "cuda:0")
    gpus = visible_gpus() if wants_gpu else []
    if gpus and config.gpu_slot is not None:  # a sweep's job waits for its slot's GPU (runner/sweep.py)
        gpus = [gpus[config.gpu_slot % len(gpus)]]
    cache = Path(config.cache_dir).expanduser()
    waiting = f"[{name}] waiting for {'its GPU' if len(gpus) == 1 else f'one of {len(gpus)} busy GPUs'}"
    with contextlib.ExitStack() as leases:
        with timeline.phase("queued"):
            gpu = leases.enter_context(gpu_lease(cache / "gpu-locks", gpus, waiting=lambda: print(waiting, flush=True)))
            cores = leases.enter_context(core_lease(cache / "core-locks", cores_near(gpu) if config.pin_cpu else []))
        with timeline.phase("worker"):
            outcome = launch_worker(folder, gpu, cores)
        written = folder / RESULT
        if written.exists():  # the worker writes its result last: from there to its end is its exit
            timeline.seconds["worker_exit"] = max(0.0, time.time() - written.stat().st_mtime)
        return outcome


def close_abandoned(tracker: Tracker) -> None:
    """Close as KILLED the RUNNING job runs whose job is gone: on this host, its process died (or the machine
    restarted); on another node, SLURM no longer runs the SLURM job it recorded (a node lost mid-job)."""
    for record in tracker.records("attributes.status = 'RUNNING'"):
        host, pid = record.conditions.host, record.pid
        if host == HOST and (record.conditions.boot_id != boot_id() or not (pid.isdigit() and alive(int(pid)))):
            why = f"abandoned: its job process ({pid} on {HOST}) died without ending it"
        elif host != HOST and record.slurm_job and slurm.still_running(record.slurm_job) is False:
            why = f"abandoned: SLURM no longer runs its job {record.slurm_job} (on {host}: a node lost mid-job?)"
        else:
            continue
        tracker.end_job(record.run_id, Outcome.KILLED, why)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# Signals a job scheduler's launcher binds to end a job when its time limit is near (submitit: SIGUSR2, or the one
# SUBMITIT_PREEMPT_SIGNAL names); their handlers raise to stop the job.
WARNINGS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2") if hasattr(signal, name))


@contextlib.contextmanager
def sigterm_raises() -> Iterator[list[BaseException]]:
    """Within the block SIGTERM raises Terminated, so the job can close its run; Python lets only the main
    thread handle signals, so elsewhere the block runs as it is.

    Yields the exceptions that a launcher's own handler of a WARNINGS signal raised: a handler's exception lands
    wherever the main thread was, and where that is inside a library's ``except Exception`` it goes no further.
    On 2026-12-04 SLURM's SIGCONT and SIGUSR2 came together: submitit's SIGUSR2 handler ran inside the logging of
    its SIGCONT one, logging swallowed the error meant to end the job, and the run was recorded as failed when
    the worker died rather than stopped at its time limit. The caller raises the first of them again."""
    raised: list[BaseException] = []
    if threading.current_thread() is not threading.main_thread():
        yield raised
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate)}
    for number in WARNINGS:
        handler = signal.getsignal(number)
        if callable(handler):
            previous[number] = signal.signal(number, _kept(handler, raised))
    try:
        yield raised
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def _kept(handler: Callable[[int, Any], Any], raised: list[BaseException]) -> Callable[[int, Any], None]:
    """``handler``, keeping in ``raised`` whatever it raises before raising it on."""

    def handle(signum: int, frame: Any) -> None:
        try:
            handler(signum, frame)
        except BaseException as error:
            raised.append(error)
            raise

    return handle


def lenient_name(cfg: DictConfig) -> str:
    """The run's name for a config that could not be converted: whatever of it can be read."""
    model, accelerator = _lenient(cfg, "names.model"), _lenient(cfg, "names.accelerator")
    return run_name(
        _lenient(cfg, "model.label") or option_label("model", str(model)),
        _lenient(cfg, "names.task"),
        _lenient(cfg, "height"),
        _lenient(cfg, "width"),
        _lenient(cfg, "accelerator.label") or option_label("accelerator", str(accelerator)),
        _lenient(cfg, "batch"),
        _lenient(cfg, "switch_res"),
        _lenient(cfg, "dtype"),
    )


def fallback_params(cfg: DictConfig) -> dict[str, Any]:
    """Params for a job whose config could not be converted: the options chosen and the overrides typed."""
    params = {key: _lenient(cfg, f"names.{key}") for key in ("model", "task", "accelerator")}
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.partition("=")
        if key != "sweep_id":
            params[key.lstrip("+~")] = value
    return params


def _sweep_id(cfg: DictConfig) -> str:
    return str(_lenient(cfg, "sweep_id") or "")


def _lenient(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``, or None where it is missing or cannot be resolved."""
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except OmegaConfBaseException:
        return None


def _ended(name: str, outcome: Outcome, detail: str, run_id: str) -> str:
    line = f"[{name}] {str(outcome).upper()}" + (f": {detail}" if detail else "") + f" (run {run_id})"
    print(line, file=sys.stderr if outcome is Outcome.FAILED else sys.stdout, flush=True)
    return str(outcome)
