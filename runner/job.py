"""One job, seen from the sweep's process: check its config, open its MLflow run, measure it in a fresh
process (runner/worker.py) and record how that ended. Whatever happens, the job leaves a run behind:
finished, failed with its error, or skipped with the reason; and the sweep goes on.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config import ConfigError, MlflowConfig, run_name, skip_reason, to_config
from runner.errors import one_line
from runner.tracking import Tracker

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
    """Run one composed job; return its outcome: ok, failed or skipped."""
    tracker = Tracker(MlflowConfig(**OmegaConf.to_container(cfg.mlflow, resolve=True)))
    name = run_name(
        *(_lenient(cfg, key) for key in ("names.model", "names.task", "height", "width", "names.accelerator"))
    )
    params, sweep_id = job_params(cfg), str(cfg.sweep_id)
    try:
        config = to_config(cfg)
    except (ConfigError, OmegaConfBaseException) as error:
        return _ended(name, "failed", one_line(error), tracker.record(name, params, sweep_id, failed=one_line(error)))
    reason = skip_reason(config)
    if reason:
        return _ended(name, "skipped", reason, tracker.record(name, params, sweep_id, skipped=reason))

    run_id = tracker.start_run(name, params, sweep_id)
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    job_file = job_dir / "config.yaml"
    job_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_file(run_id, job_file)
    log_file = job_dir / "worker.log"
    try:
        error = launch_worker(tracker, run_id, job_file, log_file)
    except KeyboardInterrupt:
        tracker.kill(run_id, "interrupted by the user")
        raise
    finally:
        if log_file.exists():
            tracker.log_file(run_id, log_file)
    tracker.finish(run_id, error)
    return _ended(name, "failed" if error else "ok", error or "", run_id)


def launch_worker(tracker: Tracker, run_id: str, job_file: Path, log_file: Path) -> str | None:
    """Measure in a fresh process, echoing its output and keeping it in ``log_file``; return its error or None."""
    command = [sys.executable, "-m", "runner.worker", str(job_file), run_id]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (
        open(log_file, "w") as log,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as worker,
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
