"""Accelerators that exist only for tests: one with options to type-check, and one that dies mid-job."""

import os
import signal
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline


@dataclass
class Options:
    interval: int = 2

    def check(self, device: torch.device) -> None:
        pass

    def apply(self, pipe: DiffusionPipeline) -> None:
        pass

    def tags(self) -> dict[str, str]:
        return {"interval": str(self.interval)}


@dataclass
class Crash:
    """Kills its own process while the pipeline is being prepared, as an out-of-memory killer would."""

    def check(self, device: torch.device) -> None:
        pass

    def apply(self, pipe: DiffusionPipeline) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def tags(self) -> dict[str, str]:
        return {}


@dataclass
class NotAnAccelerator:
    pass
