"""The baseline: plain diffusers, as loaded (PyTorch's scaled-dot-product attention)."""

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from runner.accelerators import Target


@dataclass
class NoAccelerator:
    def check(self, device: torch.device) -> None:
        pass

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        pass

    def tags(self) -> dict[str, str]:
        return {}
