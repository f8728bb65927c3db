"""The pipeline's execution device looked up once, not at the start of every call.

A diffusers pipeline asks ``_execution_device`` at the start of each call (instruct-pix2pix twice), and that
property walks every submodule of every component looking for accelerate's and diffusers' offloading hooks:
for SDXL's 2,717 modules, 8 ms of Python on this project's CPU machine (``benchmarks/execution_device.py``),
spent before the call has queued any GPU work, so the GPU waits for it. A kernel profile of a
``compile_graph_fast`` call on an H200 begins with a 6.9 ms gap of host time before its first operation
(BENCHMARKS.md, "the text's keys once"). The runner never offloads: where no component holds such a hook, the
answer cannot change between calls, so it is looked up once when the accelerator is applied and returned from
then on. The same device, so the same images. On an H200 it took the time before the first denoising step of a
``compile_graph_fast`` call from 16.1 ms to 9.1 ms at 512 px and from 19.2 ms to 11.9 ms at 1024 px (BENCHMARKS.md,
"the host's work around the steps"); part of ``compile_graph_fast``, ``fp8_compile`` and ``deepcache_compile``.

What it leaves: diffusers' ``get_module_execution_device``, which SDXL's pipelines call before each text
encoder and the VAE's decode, walks those modules the same way; it is a module-level function, which only
patching diffusers itself would change.
"""

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.hooks.group_offloading import _is_group_offload_enabled

from runner.accelerators import Accelerator, Target, named_like
from runner.config import ConfigError


def offloaded(module: torch.nn.Module) -> bool:
    """Whether accelerate's offloading hooks or diffusers' group offloading hold a part of ``module``."""
    return _is_group_offload_enabled(module) or any(hasattr(part, "_hf_hook") for part in module.modules())


@dataclass
class DeviceOnceAccelerator(Accelerator):
    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and offloaded(component):
                raise ConfigError(
                    f"device_once: the pipeline's {name} is offloaded (accelerate's or diffusers' hooks), so its "
                    "execution device can change between calls; use an accelerator without DeviceOnceAccelerator among "
                    "its parts, e.g. accelerator=compile_graph"
                )
        device = pipe._execution_device
        pipe.__class__ = named_like(
            type(pipe), "device_once", {"_execution_device": property(lambda self: self._runner_execution_device)}
        )
        pipe._runner_execution_device = device
