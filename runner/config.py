"""The job's typed configuration, and what is derived from it.

Hydra composes the YAML under ``conf/`` onto these dataclasses (registered as the ``schema`` config), so a
wrong type is refused while composing. ``to_config`` converts a composed config once, at the entry point,
and ``check`` refuses values that are well-typed but wrong, naming the key, the value and what is allowed.

Each setting says in its field's metadata (``setting``) what it means and what it is part of: the run's
params (``param``), the digest of everything that decides the images (``images``: how a run finds its
baseline), and the digest of the whole job (``identity``: how a sweep resumes). ``logged_params``,
``image_facts`` and ``config_hash`` derive those from the schema, so none is listed by hand.
"""

import copy
import hashlib
import json
import re
import typing
from collections.abc import Iterator
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import II, MISSING, DictConfig, OmegaConf, open_dict

from runner.errors import RunnerError

WEIGHTS = ("pretrained", "random")
DTYPES = ("auto", "fp16", "bf16", "fp32")
REBASELINE = ("auto", "always", "never")  # when a sweep measures a baseline again (Config.rebaseline)
INPUTS = ("prompt", "image")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class ConfigError(RunnerError, ValueError):
    """A configuration value that cannot be used; the message names the key, the value and the fix."""


def setting(
    default: Any = NO_DEFAULT,
    *,
    help: str = "",
    param: str = "",
    images: bool = False,
    identity: bool = True,
    factory: Any = NO_DEFAULT,
) -> Any:
    """A schema field: its meaning (``help``), the MLflow param it is logged as (``param``), whether it
    decides the images (``images``) and whether it is part of the job's identity (``identity``)."""
    metadata = {"help": help, "param": param, "images": images, "identity": identity}
    if factory is not NO_DEFAULT:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TaskPipeline:
    """Which diffusers pipeline serves one task of a model, and the call arguments it adds."""

    pipeline: str = MISSING  # import path, e.g. diffusers.StableDiffusionXLPipeline
    call_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class SchedulerSpec:
    """A scheduler to swap in, built from the checkpoint's scheduler config plus ``options``."""

    scheduler: str = setting(MISSING, help="import path of the scheduler", param="scheduler", images=True)
    options: dict[str, Any] = setting(factory=dict, help="the scheduler's options", images=True)


@dataclass
class ModelConfig:
    id: str | None = setting(
        None, help="hub id or local folder that weights=pretrained loads", param="model_id", images=True
    )
    architecture: str = setting(
        MISSING, help="folder under runner/architectures that weights=random builds", param="architecture", images=True
    )
    weights: str = setting("pretrained", help="pretrained | random", param="weights", images=True)
    revision: str | None = setting(None, help="the checkpoint's revision", param="revision", images=True)
    variant: str | None = setting(
        None, help="fp16 where the checkpoint publishes half-precision files", param="variant", images=True
    )
    denoiser: str = setting("unet", help="the pipeline attribute that runs once per denoising step")
    steps: int = setting(MISSING, help="the model's default number of steps")
    guidance_scale: float = setting(MISSING, help="the model's default guidance scale")
    scheduler: SchedulerSpec | None = setting(None, help="a scheduler to swap in (scheduler, options)")
    load_args: dict[str, Any] = setting(factory=dict, help="extra pipeline components or flags", images=True)
    tasks: dict[str, TaskPipeline] = setting(factory=dict, help="task name -> pipeline and call arguments")
    init_seed: int = setting(0, help="seeds random weights, so every run of one model gets the same", images=True)
    label: str | None = setting(
        None, help="the model's short name in run names (the file's name if unset), e.g. RV4L", identity=False
    )


@dataclass
class TaskConfig:
    title: str = setting(MISSING, help="how reports name the task", param="task_title")
    inputs: list[str] = setting(factory=lambda: ["prompt"], help="what the pipeline is given: prompt, image")
    prompt: str = setting(MISSING, help="the task's default prompt")
    image: str | None = setting(None, help="image-to-image input: a file, a URL, t2i, t2i:<model>, or empty")
    call_args: dict[str, Any] = setting(factory=dict, help="the pipeline call's extra arguments", images=True)


@dataclass
class JobNames:
    """The options Hydra chose for this job, as typed on the command line."""

    model: str = setting(MISSING, param="model", images=True)
    task: str = setting(MISSING, param="task", images=True)
    accelerator: str = setting(MISSING, param="accelerator")
    # Short names for run names, from the model's and the accelerator's `label:` (their files' names if unset)
    model_label: str = setting("", identity=False)
    accelerator_label: str = setting("", identity=False)


@dataclass
class MlflowConfig:
    tracking_uri: str = setting("sqlite:///mlruns/mlflow.db", help="the MLflow store, or a server's http:// URI")
    experiment: str = setting("diffusion-bench", help="the MLflow experiment")


@dataclass
class QualityConfig:
    # auto: the real CLIP below for pretrained weights; the tiny in-code CLIP for random weights, whose
    # images are noise (either score is then meaningless, and flagged so).
    clip_model: str = setting("auto", help="CLIP of the CLIP score: auto, tiny, a hub id or a folder")
    clip_revision: str | None = setting(None, help="the CLIP model's revision")
    reference_clip: str = setting("openai/clip-vit-base-patch16", help="what clip_model=auto picks for real weights")
    baseline: str = setting("none", help="the accelerator whose runs are the baseline", param="quality.baseline")
    # README, "Judging quality", says why these values.
    min_ssim: float = setting(
        0.95, help="quality unaffected: mean SSIM to the baseline at least this", param="quality.min_ssim"
    )
    max_clip_drop_pct: float = setting(
        1.0,
        help="quality unaffected: CLIP score at most this % below the baseline's",
        param="quality.max_clip_drop_pct",
    )


@dataclass
class CostConfig:
    gpu_hour_usd: float | None = setting(None, help="the device's price per hour: logs usd_per_1k_images")
    per_device: dict[str, float] = setting(
        factory=dict, help="prices per hour by device name (device_name tag), used where gpu_hour_usd is unset"
    )


@dataclass
class Config:
    names: JobNames = field(default_factory=JobNames)
    model: ModelConfig = setting(MISSING, help="a file in conf/model/")
    task: TaskConfig = setting(MISSING, help="a file in conf/task/")
    accelerator: dict[str, Any] = setting(
        MISSING, help="a file in conf/accelerator/; accelerator.<option>= sets its options"
    )
    res: int = setting(1024, help="square images of res x res px; a positive multiple of 8", param="res")
    height: int = setting(II("res"), help="image height (follows res)", param="height", images=True)
    width: int = setting(II("res"), help="image width (follows res)", param="width", images=True)
    switch_res: int | None = setting(
        None,
        help="after the timed calls, switch the same process to this res and back, timing the first call at each",
        param="switch_res",
    )
    steps: int = setting(II("model.steps"), help="denoising steps; the model's unless set", param="steps", images=True)
    guidance_scale: float = setting(
        II("model.guidance_scale"),
        help="classifier-free guidance; the model's unless set",
        param="guidance_scale",
        images=True,
    )
    prompt: str = setting(II("task.prompt"), help="the prompt; the task's unless set", param="prompt")
    prompts: str | None = setting(
        None, help="a prompt set (photo, edits) or a file, one prompt a line", param="prompts"
    )
    negative_prompt: str | None = setting(None, help="the negative prompt", param="negative_prompt", images=True)
    seed: int = setting(0, help="timed call i uses seed + i", param="seed", images=True)
    batch: int = setting(1, help="images per call (num_images_per_prompt)", param="batch", images=True)
    warmup: int = setting(1, help="untimed calls before timing (compilation lands here)", param="warmup")
    runs: int = setting(10, help="timed calls", param="runs")
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N (auto: cuda if present)")
    dtype: str = setting("auto", help="auto, fp16, bf16 or fp32 (auto: fp16 on cuda, fp32 on cpu)")
    pin_cpu: bool = setting(True, help="on CUDA, pin the GPU-launching thread to a core of its own", param="pin_cpu")
    cache_dir: str = setting("~/.cache/diffusion-bench", help="compile caches, GPU and core leases")
    gpu_lease: bool = setting(True, help="each job takes one GPU of its own, waiting while all are taken")
    gpu_slot: int | None = setting(
        None, help="stamped by the sweeper: jobs differing only in accelerator share a GPU", identity=False
    )
    force: bool = setting(
        False, help="run jobs again though their exact configuration already finished", identity=False
    )
    rebaseline: str = setting(
        "auto",
        help="measure each job's baseline again after its accelerated runs in a sweep: auto (when the baseline "
        "kept its GPU busy under 80%: bound by the host, whose speed moves), always, never",
        identity=False,
    )
    baseline_again: bool = setting(
        False, help="stamped by the sweeper on a baseline's second measurement in one sweep", identity=False
    )
    log_images: bool = setting(True, help="log the generated PNGs")
    sweep_id: str = setting("", help="stamped by the sweeper on every job of one sweep", identity=False)
    quality: QualityConfig = field(default_factory=QualityConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    mlflow: MlflowConfig = setting(factory=MlflowConfig, identity=False)


CONF = Path(__file__).resolve().parents[1] / "conf"


def help_text() -> str:
    """``python -m runner --help``: every setting of the schema with its meaning and default."""
    lines = [
        "python -m runner [-m] key=value ...     one job, or a sweep over comma-separated values",
        "python -m runner.compare | python -m runner.report [--help]     compare runs; write the report",
        "",
        "Groups (one option each, or several comma-separated to sweep; a file in conf/<group>/):",
        "$APP_CONFIG_GROUPS",
        "Settings (key=value; README.md, 'Running jobs', says more):",
    ]
    for key, meta, default in _described(Config):
        empty = default is NO_DEFAULT or default is MISSING or default in (None, "", {}, [])
        shown = "" if empty else f" (default: {_shown(default)})"
        lines.append(f"  {key:28} {meta['help']}{shown}")
    lines += ["", "Example: python -m runner -m model=realvisxl_v4,realvisxl_v4_lightning res=512,1024"]
    return "\n".join(lines) + "\n"


def _described(cls: type, prefix: str = "") -> Iterator[tuple[str, dict, Any]]:
    hints = typing.get_type_hints(cls)
    for item in fields(cls):
        key, kind = f"{prefix}{item.name}", hints[item.name]
        nested = kind if is_dataclass(kind) else next((a for a in typing.get_args(kind) if is_dataclass(a)), None)
        if item.metadata.get("help"):
            default = item.default_factory() if item.default_factory is not NO_DEFAULT else item.default
            yield key, dict(item.metadata), None if is_dataclass(default) else default
        if nested is not None and typing.get_origin(kind) is not dict:
            yield from _described(nested, f"{key}.")


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


ConfigStore.instance().store(name="schema", node=Config)
ConfigStore.instance().store(
    group="hydra/help",
    name="runner",
    node={"app_name": "runner", "header": "", "footer": "", "template": help_text()},
)


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
    names = config.names
    names.model_label = config.model.label or names.model
    # An accelerator's label is a name, not an option: it is neither built into the accelerator nor logged.
    names.accelerator_label = str(config.accelerator.pop("label", None) or names.accelerator)
    check(config)
    return config


def switched_config(cfg: DictConfig) -> Config | None:
    """The job's config at ``switch_res`` (whatever follows res, follows it: the call's size arguments), for
    the worker's calls after switching; None when the job does not switch."""
    if cfg.get("switch_res") is None:
        return None
    other = copy.deepcopy(cfg)
    with open_dict(other):
        other.res, other.switch_res = cfg.switch_res, None
    return to_config(other)


def _check_switch(cfg: Config) -> None:
    value = cfg.switch_res
    if value is None or value <= 0 or value % 8:
        raise ConfigError(f"switch_res={value}: must be a positive multiple of 8, e.g. 512 or 1024")
    if value == cfg.res:
        raise ConfigError(f"switch_res={value}: equals res; switch to another size, or drop switch_res")
    if cfg.height != cfg.res or cfg.width != cfg.res:
        raise ConfigError(
            f"switch_res={value} switches between square sizes, but height={cfg.height} and width={cfg.width} "
            f"are set apart from res={cfg.res}: drop height/width, or switch_res"
        )


def check(cfg: Config) -> None:
    """Raise ConfigError for the first value that is well-typed but unusable."""
    for key in ("res", "height", "width"):
        value = getattr(cfg, key)
        if value <= 0 or value % 8:
            raise ConfigError(f"{key}={value}: must be a positive multiple of 8, e.g. 512 or 1024")
    if cfg.switch_res is not None:
        _check_switch(cfg)
    for key, least in (("runs", 1), ("steps", 1), ("warmup", 0), ("batch", 1)):
        value = getattr(cfg, key)
        if value < least:
            raise ConfigError(f"{key}={value}: must be at least {least}")
    if not DEVICE_PATTERN.fullmatch(cfg.device):
        raise ConfigError(f"device={cfg.device}: use auto, cpu, cuda or cuda:N")
    _check_choice("dtype", cfg.dtype, DTYPES)
    _check_choice("rebaseline", cfg.rebaseline, REBASELINE)
    _check_choice("model.weights", cfg.model.weights, WEIGHTS)
    for needed in cfg.task.inputs:
        _check_choice("task.inputs", needed, INPUTS)
    if not 0 <= cfg.quality.min_ssim <= 1:
        raise ConfigError(f"quality.min_ssim={cfg.quality.min_ssim}: must be between 0 and 1")
    prices = {
        "cost.gpu_hour_usd": cfg.cost.gpu_hour_usd,
        **{f"cost.per_device.{k}": v for k, v in cfg.cost.per_device.items()},
    }
    for key, price in prices.items():
        if price is not None and price < 0:
            raise ConfigError(f"{key}={price}: a price per hour cannot be negative")
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


def run_name(
    model: str,
    task: str,
    height: int | str,
    width: int | str,
    accelerator: str,
    batch: object = 1,
    switch_res: object = None,
    dtype: object = "auto",
) -> str:
    """The run's readable name, e.g. RV4/t2i/1024/none (.../768x1024/... when not square, .../1024-b4/... for
    four images a call, .../1024+512/... for a job that switches to 512 px after its timed calls, .../1024-bf16/...
    for a dtype set by hand), from the model's and the accelerator's labels: short enough that the jobs of one
    experiment differ within the 15 characters MLflow's run list shows of a job under its sweep."""
    size = f"{height}" if str(height) == str(width) else f"{height}x{width}"
    size += f"-b{batch}" if str(batch) not in ("1", "None") else ""
    size += f"-{dtype}" if dtype not in (None, "auto", "None", "null") else ""
    size += f"+{switch_res}" if switch_res not in (None, "None", "null") else ""
    return f"{model}/{task}/{size}/{accelerator}"


def option_label(group: str, option: str) -> str:
    """The ``label`` of conf/<group>/<option>.yaml, or the option's name: for jobs whose config could not be
    composed or converted, so that a failed job is named as it would have been had it run."""
    try:
        node = OmegaConf.load(CONF / group / f"{option}.yaml")
    except (OSError, yaml.YAMLError):  # no such option, or a file that does not parse: the job's error says so
        return option
    label = node.get("label") if isinstance(node, DictConfig) else None
    return str(label or option)


def job_name(cfg: Config) -> str:
    names = cfg.names
    return run_name(
        names.model_label or names.model,
        names.task,
        cfg.height,
        cfg.width,
        names.accelerator_label or names.accelerator,
        cfg.batch,
        cfg.switch_res,
        cfg.dtype,
    )


# What is derived from the schema.


def _settings(node: Any, prefix: str = "") -> Iterator[tuple[str, dict, Any]]:
    """(dotted key, metadata, value) of every setting under ``node``, nested dataclasses walked into and
    skipped entirely where their own field says identity=False."""
    for item in fields(node):
        value, key = getattr(node, item.name), f"{prefix}{item.name}"
        if is_dataclass(value):
            if item.metadata.get("identity", True):
                yield from _settings(value, f"{key}.")
        else:
            yield key, dict(item.metadata), value


def logged_params(cfg: Config) -> dict[str, Any]:
    """The run's params: every setting that names its param, the call's extra arguments (``call.*``) and the
    accelerator's options (``accelerator.*``)."""
    params = {meta["param"]: value for _, meta, value in _settings(cfg) if meta.get("param")}
    params.setdefault("scheduler", "checkpoint default")
    for key, value in call_args(cfg).items():
        params[f"call.{key}"] = value
    for key, value in cfg.accelerator.items():
        if key != "_target_":
            params[f"accelerator.{key}"] = value
    return params


def call_args(cfg: Config) -> dict[str, Any]:
    """The pipeline call's extra arguments: the task's, then the model's for this task."""
    served = cfg.model.tasks.get(cfg.names.task)
    return {**cfg.task.call_args, **(served.call_args if served else {})}


def image_facts(cfg: Config) -> dict[str, Any]:
    """Every setting that decides the images (not the accelerator), and the pipeline serving the task."""
    facts = {key: value for key, meta, value in _settings(cfg) if meta.get("images")}
    if cfg.model.scheduler is None:
        facts["model.scheduler"] = None
    facts["pipeline"] = asdict(cfg.model.tasks[cfg.names.task]) if cfg.names.task in cfg.model.tasks else None
    return facts


def config_hash(cfg: Config) -> str:
    """A digest of the job's whole configuration except which sweep ran it, where it is recorded and force:
    the same digest is the same job."""
    values = {key: value for key, meta, value in _settings(cfg) if meta.get("identity", True)}
    return digest(values)


def digest(values: Any) -> str:
    """A short, stable digest of plain values (nested dataclasses included)."""
    return hashlib.sha256(json.dumps(_plain(values), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
