"""The job's typed configuration.

Hydra composes the YAML under ``conf/`` onto these dataclasses (registered as the ``schema`` config), so a
wrong type or an unknown key is refused while composing. ``to_config`` converts a composed config once, at
the entry point, and ``check`` refuses values that are well-typed but wrong, naming the key, the value and
what is allowed.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import II, MISSING, DictConfig, OmegaConf, open_dict

from runner.errors import RunnerError

WEIGHTS = ("pretrained", "random")
DTYPES = ("auto", "fp16", "bf16", "fp32")
INPUTS = ("prompt", "image")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class ConfigError(RunnerError, ValueError):
    """A configuration value that cannot be used; the message names the key, the value and the fix."""


@dataclass
class TaskPipeline:
    """Which diffusers pipeline serves one task of a model, and the call arguments it adds."""

    pipeline: str = MISSING  # import path, e.g. diffusers.StableDiffusionXLPipeline
    call_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class SchedulerSpec:
    """A scheduler to swap in, built from the checkpoint's scheduler config plus ``options``."""

    scheduler: str = MISSING  # import path, e.g. diffusers.DPMSolverSinglestepScheduler
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    id: str | None = None  # hub id or local folder; what weights=pretrained loads
    architecture: str = MISSING  # folder of configs under runner/architectures, what weights=random builds
    weights: str = "pretrained"
    revision: str | None = None
    variant: str | None = None  # "fp16" where the checkpoint publishes half-precision files
    denoiser: str = "unet"  # the pipeline attribute that runs once per denoising step
    steps: int = MISSING
    guidance_scale: float = MISSING
    scheduler: SchedulerSpec | None = None
    load_args: dict[str, Any] = field(default_factory=dict)  # extra pipeline components or flags
    tasks: dict[str, TaskPipeline] = field(default_factory=dict)
    init_seed: int = 0  # seeds random weights, so every run of one model gets the same ones


@dataclass
class TaskConfig:
    title: str = MISSING  # how reports name the task, e.g. Text-to-image
    inputs: list[str] = field(default_factory=lambda: ["prompt"])  # what the pipeline is given
    prompt: str = MISSING
    image: str | None = None  # for tasks with an image input; see runner/inputs.py
    call_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobNames:
    """The options Hydra chose for this job, as typed on the command line."""

    model: str = MISSING
    task: str = MISSING
    accelerator: str = MISSING


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "diffusion-bench"


@dataclass
class QualityConfig:
    # auto: the real CLIP below for pretrained weights; the tiny in-code CLIP for random weights, whose
    # images are noise (either score is then meaningless, and flagged so).
    clip_model: str = "auto"  # auto | tiny | a hub id | a local folder
    clip_revision: str | None = None
    reference_clip: str = "openai/clip-vit-base-patch16"  # what auto picks for pretrained weights
    baseline: str = "none"  # the accelerator whose runs are the baseline every other run is compared with
    # A run counts as "quality unaffected" when, against the accelerator=none run of the same job, its mean
    # SSIM is at least min_ssim, its CLIP score is at most max_clip_drop_pct percent lower (when the CLIP
    # score means something), and no image is broken. README, "Judging quality", says why these values.
    min_ssim: float = 0.95
    max_clip_drop_pct: float = 1.0


@dataclass
class Config:
    names: JobNames = field(default_factory=JobNames)
    model: ModelConfig = MISSING
    task: TaskConfig = MISSING
    accelerator: dict[str, Any] = MISSING  # _target_ and options, checked by the accelerator's own dataclass
    res: int = 1024
    height: int = II("res")
    width: int = II("res")
    steps: int = II("model.steps")
    guidance_scale: float = II("model.guidance_scale")
    prompt: str = II("task.prompt")
    prompts: str | None = None  # a shipped prompt set (runner/prompts/) or a file; null: just `prompt`
    negative_prompt: str | None = None
    seed: int = 0
    warmup: int = 1
    runs: int = 10
    device: str = "auto"
    dtype: str = "auto"
    pin_cpu: bool = True  # on CUDA, pin the thread that launches GPU work to one core (runner/measure.py)
    cache_dir: str = "~/.cache/diffusion-bench"  # compiled artefacts that outlive a job; GPU leases
    gpu_lease: bool = True  # each job takes one GPU of its own, waiting while all are taken (runner/gpus.py)
    force: bool = False  # run a job again even if its exact configuration already finished
    log_images: bool = True
    sweep_id: str = ""  # stamped by the sweeper on every job of one sweep
    quality: QualityConfig = field(default_factory=QualityConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


ConfigStore.instance().store(name="schema", node=Config)
CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_job(*overrides: str) -> DictConfig:
    """A job's config as a Hydra run hands it to the job (names resolved, no hydra node), for scripts and
    tests that measure outside a sweep."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    OmegaConf.resolve(cfg.names)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def to_config(cfg: DictConfig) -> Config:
    """Convert a composed config into the typed ``Config`` and check its values."""
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, Config)
    check(config)
    return config


def check(cfg: Config) -> None:
    """Raise ConfigError for the first value that is well-typed but unusable."""
    for key in ("res", "height", "width"):
        value = getattr(cfg, key)
        if value <= 0 or value % 8:
            raise ConfigError(f"{key}={value}: must be a positive multiple of 8, e.g. 512 or 1024")
    for key, least in (("runs", 1), ("steps", 1), ("warmup", 0)):
        value = getattr(cfg, key)
        if value < least:
            raise ConfigError(f"{key}={value}: must be at least {least}")
    if not DEVICE_PATTERN.fullmatch(cfg.device):
        raise ConfigError(f"device={cfg.device}: use auto, cpu, cuda or cuda:N")
    _check_choice("dtype", cfg.dtype, DTYPES)
    _check_choice("model.weights", cfg.model.weights, WEIGHTS)
    for needed in cfg.task.inputs:
        _check_choice("task.inputs", needed, INPUTS)
    if not 0 <= cfg.quality.min_ssim <= 1:
        raise ConfigError(f"quality.min_ssim={cfg.quality.min_ssim}: must be between 0 and 1")
    if cfg.quality.max_clip_drop_pct < 0:
        raise ConfigError(f"quality.max_clip_drop_pct={cfg.quality.max_clip_drop_pct}: must be at least 0")
    if cfg.model.weights == "pretrained" and not cfg.model.id:
        raise ConfigError(
            f"model.id is empty for model={cfg.names.model}: weights=pretrained needs a hub id or a local "
            "folder (model.id=...), or use model.weights=random"
        )


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value}: choose one of {', '.join(allowed)}")


def skip_reason(cfg: Config) -> str | None:
    """Why this model cannot do this task at all (a skip, not a failure), or None."""
    if cfg.names.task in cfg.model.tasks:
        return None
    offered = ", ".join(sorted(cfg.model.tasks)) or "nothing"
    return f"model {cfg.names.model} has no {cfg.names.task} pipeline (it offers: {offered})"


def run_name(model: str, task: str, height: int | str, width: int | str, accelerator: str) -> str:
    """The run's readable name, e.g. realvisxl_v4/t2i/1024/none (or .../768x1024/... when not square)."""
    size = f"{height}" if str(height) == str(width) else f"{height}x{width}"
    return f"{model}/{task}/{size}/{accelerator}"
