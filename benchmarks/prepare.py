"""The pipeline a benchmark script measures, prepared as the runner's worker prepares a job's: the job's
config composed from its overrides, the pipeline built, the task's input image (image-to-image) loaded, and
the accelerator checked and applied (with the worker's calibration call). Shared by benchmarks/overhead.py and
benchmarks/kernel_profile.py."""

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from runner.accelerators import build_accelerator
from runner.config import Config, compose_job, to_config
from runner.inputs import load_image, load_prompts
from runner.pipelines import build_pipeline
from runner.worker import (
    DTYPES,
    HARMLESS,
    TRUNCATION,
    accelerator_target,
    calibration_call,
    drop_log_lines,
    resolve_device,
    resolve_dtype,
)


@dataclass
class Prepared:
    cfg: Config
    device: torch.device
    pipe: Any
    image: Image.Image | None  # the task's input, None for text-to-image


def prepare(overrides: list[str]) -> Prepared:
    cfg = to_config(compose_job(*overrides))
    drop_log_lines(HARMLESS + TRUNCATION)
    device = resolve_device(cfg.device)
    dtype_name = resolve_dtype(cfg.dtype, device)
    pipe = build_pipeline(cfg.model, cfg.names.task, device, DTYPES[dtype_name])
    accelerator = build_accelerator(cfg.accelerator)
    accelerator.check(device)
    image = None
    if "image" in cfg.task.inputs:
        image, _ = load_image(cfg.task.image, cfg.names.model, cfg.width, cfg.height, lambda *_: None)
    calibration = calibration_call(cfg, pipe, load_prompts(cfg.prompts, cfg.prompt), image, device)
    accelerator.apply(pipe, accelerator_target(cfg, device, dtype_name, calibration))
    return Prepared(cfg, device, pipe, image)
