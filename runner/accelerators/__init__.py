"""Accelerators: each is one module here plus one YAML in conf/accelerator/.

An accelerator is a dataclass whose fields are its options; the YAML names it with ``_target_`` and sets
them. ``build_accelerator`` checks the options against the dataclass (unknown key or wrong type is refused
with the key's name), so adding one touches nothing else.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers import DiffusionPipeline
from hydra.utils import get_class
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config import ConfigError


@dataclass(frozen=True)
class Target:
    """What an accelerator works on, beyond the pipeline itself."""

    denoiser: str  # the pipeline attribute that runs once per denoising step (model.denoiser)
    device: torch.device
    dtype: torch.dtype
    cache_dir: Path  # where compiled artefacts may persist between processes (cache_dir=)
    shape_key: str  # names the job's model, size and dtype, for caches that hold one shape each


@runtime_checkable
class Accelerator(Protocol):
    def check(self, device: torch.device) -> None:
        """Raise ConfigError (one line, with the fix) if this accelerator cannot run on ``device``."""

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        """Change ``pipe`` in place; the runner's warmup calls pay for any compilation."""

    def tags(self) -> dict[str, str]:
        """Facts about this run worth filtering on (e.g. whether a compile cache was hit)."""


def build_accelerator(options: dict[str, Any]) -> Accelerator:
    """Instantiate the accelerator named by ``options['_target_']`` with the remaining options, type-checked."""
    target = options["_target_"]
    cls = get_class(target)
    values = {key: value for key, value in options.items() if key != "_target_"}
    try:
        typed = OmegaConf.merge(OmegaConf.structured(cls), values)
    except OmegaConfBaseException as error:
        first = str(error).splitlines()[0]
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"accelerator.{key}: {first}") from error
    accelerator = OmegaConf.to_object(typed)
    if not isinstance(accelerator, Accelerator):
        raise ConfigError(f"accelerator._target_={target}: not an accelerator (needs check, apply and tags)")
    return accelerator
