"""Accelerators that exist only for tests: one with options (and no effect), two that die mid-job, one that
changes the images a little, and one that turns the VAE's output into NaN (black images)."""

import os
import signal
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from runner.accelerators import Accelerator, Target


@dataclass
class Options(Accelerator):
    interval: int = 2

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        pass

    def tags(self) -> dict[str, str]:
        return {"interval": str(self.interval)}


@dataclass
class Crash(Accelerator):
    """Kills its own process while the pipeline is being prepared, as an out-of-memory killer would."""

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Segfault(Accelerator):
    """Dies of a segmentation fault while the pipeline is being prepared, as a crash in native code would."""

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        os.kill(os.getpid(), signal.SIGSEGV)


@dataclass
class NotAnAccelerator:
    pass


@dataclass
class Perturb(Accelerator):
    """Adds a little noise to every denoiser output: a lossy accelerator in miniature."""

    scale: float = 0.05

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        generator = torch.Generator().manual_seed(0)

        def perturb(module, args, output):
            sample = output[0] if isinstance(output, tuple) else output.sample
            noise = torch.randn(sample.shape, generator=generator).to(sample.device, sample.dtype)
            return (sample + self.scale * noise,)

        pipe.unet.register_forward_hook(perturb)


@dataclass
class Blackout(Accelerator):
    """Makes the VAE decoder return NaN, as an overflowing fp16 VAE or a broken compiled graph would."""

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        pipe.vae.decoder.register_forward_hook(lambda module, args, output: torch.full_like(output, float("nan")))


@dataclass
class OutOfMemory(Accelerator):
    """Runs out of device memory at the first denoising step, as a batch too large for the GPU would."""

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        def fail(module, args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has 1.00 GiB free.")

        pipe.unet.register_forward_pre_hook(fail)
