"""One job, seen from the sweep's process: check its config, open its MLflow run, measure it in a fresh
process (runner/worker.py) on a GPU of its own, and record how that ended. Whatever happens, the job leaves
a run behind: finished, failed with its error, killed, or skipped with the reason; and the sweep goes on.

Sweeps resume: a job whose exact configuration (the tag ``config_hash``) already has a finished run is not
run again unless ``force=true``. A run left RUNNING by a job process that died without a word (SIGKILL, a
lost machine) is closed as KILLED when the same job comes round again on the same host.
"""

import contextlib
import ctypes
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config import ConfigError, MlflowConfig, run_name, skip_reason, to_config
from runner.errors import one_line
from runner.gpus import gpu_lease, visible_gpus
from runner.tracking import Tracker

HOST = socket.gethostname()


class Terminated(BaseException):
    """SIGTERM arrived while the job ran (a scheduler or a user stopping the sweep)."""


# Params every run carries (config key -> param name), read leniently so a bad config still gets them.
PARAM_KEYS = {
    "names.model": "model",
    "model.id": "model_id",
    "model.weights": "weights",
    "model.architecture": "architecture",
    "model.variant": "variant",
    "model.revision": "revision",
    "names.task": "task",
    "task.title": "task_title",
    "res": "res",
    "height": "height",
    "width": "width",
    "names.accelerator": "accelerator",
    "steps": "steps",
    "guidance_scale": "guidance_scale",
    "seed": "seed",
    "warmup": "warmup",
    "runs": "runs",
    "pin_cpu": "pin_cpu",
    "prompt": "prompt",
    "prompts": "prompts",
    "negative_prompt": "negative_prompt",
    "model.scheduler.scheduler": "scheduler",
    "quality.min_ssim": "quality.min_ssim",
    "quality.max_clip_drop_pct": "quality.max_clip_drop_pct",
}


def run_job(cfg: DictConfig) -> str:
    """Run one composed job; return ok, failed, skipped, or done:<run id> when it had already finished."""
    tracker = Tracker(MlflowConfig(**OmegaConf.to_container(cfg.mlflow, resolve=True)))
    name = run_name(
        *(_lenient(cfg, key) for key in ("names.model", "names.task", "height", "width", "names.accelerator"))
    )
    params, sweep_id, key = job_params(cfg), str(_lenient(cfg, "sweep_id") or ""), config_hash(cfg)
    close_abandoned(tracker, key)
    done = [] if _lenient(cfg, "force") else tracker.jobs(f"tags.config_hash = '{key}' and tags.outcome = 'ok'")
    if done:
        print(f"[{name}] DONE already as run {done[-1].info.run_id}: not run again (force=true would)", flush=True)
        return f"done:{done[-1].info.run_id}"
    tags = {"config_hash": key, "host": HOST, "pid": str(os.getpid())}
    try:
        config = to_config(cfg)
    except (ConfigError, OmegaConfBaseException) as error:
        message = one_line(error)
        return _ended(name, "failed", message, tracker.record(name, params, sweep_id, tags, failed=message))
    reason = skip_reason(config)
    if reason:
        return _ended(name, "skipped", reason, tracker.record(name, params, sweep_id, tags, skipped=reason))

    run_id = tracker.start_run(name, params, sweep_id, tags)
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    job_file = job_dir / "config.yaml"
    job_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_file(run_id, job_file)
    log_file = job_dir / "worker.log"
    # A job on a GPU takes one of its own (runner/gpus.py), unless told which (device=cuda:N) or not to.
    wants_gpu = config.gpu_lease and config.device in ("auto", "cuda", "cuda:0")
    gpus = visible_gpus() if wants_gpu else []
    locks = Path(config.cache_dir).expanduser() / "gpu-locks"
    waiting = f"[{name}] waiting for one of {len(gpus)} busy GPU(s)"
    try:
        with _sigterm_raises(), gpu_lease(locks, gpus, waiting=lambda: print(waiting, flush=True)) as gpu:
            tracker.set_tags(run_id, {"gpu_lease": gpu or "none"})
            error = launch_worker(tracker, run_id, job_file, log_file, gpu)
    except (KeyboardInterrupt, Terminated) as stop:
        tracker.kill(run_id, "stopped by SIGTERM" if isinstance(stop, Terminated) else "interrupted by the user")
        if isinstance(stop, Terminated):
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        if log_file.exists():
            tracker.log_file(run_id, log_file)
    tracker.finish(run_id, error)
    return _ended(name, "failed" if error else "ok", error or "", run_id)


def config_hash(cfg: DictConfig) -> str:
    """A digest of the job's whole configuration except which sweep ran it, where it is recorded and force:
    the same digest is the same job."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # a broken config still gets a stable digest
        values = OmegaConf.to_container(cfg, resolve=False)
    for key in ("sweep_id", "mlflow", "force"):
        values.pop(key, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def close_abandoned(tracker: Tracker, key: str) -> None:
    """Close as KILLED the RUNNING runs of this job whose process on this host is gone."""
    for run in tracker.jobs(f"tags.config_hash = '{key}' and attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get("host") == HOST and tags.get("pid", "").isdigit() and not _alive(int(tags["pid"])):
            tracker.kill(
                run.info.run_id, f"abandoned: its job process ({tags['pid']} on {HOST}) died without ending it"
            )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises Terminated, so the job can close its run; Python lets only the main
    thread handle signals, so elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def _die_with_parent() -> None:
    """Run in the worker before it starts: be killed if the job's process dies, so no orphan holds the GPU."""
    with contextlib.suppress(OSError, AttributeError):  # PR_SET_PDEATHSIG exists on Linux only
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def launch_worker(tracker: Tracker, run_id: str, job_file: Path, log_file: Path, gpu: str | None) -> str | None:
    """Measure in a fresh process that sees only ``gpu`` (if given), echoing its output and keeping it in
    ``log_file``; return its error or None."""
    command = [sys.executable, "-m", "runner.worker", str(job_file), run_id]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {})}
    with (
        open(log_file, "w") as log,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=_die_with_parent
        ) as worker,
    ):
        try:
            assert worker.stdout is not None
            for line in worker.stdout:
                sys.stdout.write(line)
                log.write(line)
            code = worker.wait()
        except BaseException:
            worker.terminate()
            worker.wait(timeout=30)
            raise
    if code == 0:
        return None
    error = tracker.run(run_id).data.tags.get("error")
    if error:
        return error
    if code < 0:
        return f"the worker process was killed by {signal.Signals(-code).name} (out of memory?); see worker.log"
    return f"the worker process exited with code {code}; see worker.log"


def job_params(cfg: DictConfig) -> dict[str, Any]:
    """The run's params: the settings that define the job, its call arguments and accelerator options."""
    params = {name: _lenient(cfg, key) for key, name in PARAM_KEYS.items()}
    params["scheduler"] = params["scheduler"] or "checkpoint default"
    task = _lenient(cfg, "names.task")
    for source in ("task.call_args", f"model.tasks.{task}.call_args"):
        for key, value in (_lenient(cfg, source) or {}).items():
            params[f"call.{key}"] = value
    for key, value in (_lenient(cfg, "accelerator") or {}).items():
        if key != "_target_":
            params[f"accelerator.{key}"] = value
    return params


def _lenient(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``, or None where it is missing or cannot be resolved."""
    try:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except OmegaConfBaseException:
        return None
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _ended(name: str, outcome: str, detail: str, run_id: str) -> str:
    line = f"[{name}] {outcome.upper()}" + (f": {detail}" if detail else "") + f" (run {run_id})"
    print(line, file=sys.stderr if outcome == "failed" else sys.stdout, flush=True)
    return outcome
